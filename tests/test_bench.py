"""The benchmark: its quick mode against the real broker, its usage errors, its import.

What it measured is checked for presence and shape, never for speed: timings depend on
the machine.
"""

from __future__ import annotations

import importlib.util
import json
import socket
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pika
import pytest
from pika.exceptions import ChannelClosedByBroker

import rpc_server
from tests.support import (
    ROOT,
    connect,
    run_script,
)

BENCH = "bench/rpc_bench.py"
PAIRS = ["tutorial pair", "tutorial made safe", "aio-pika RPC", "FastStream request", "this pair"]
SEQUENTIAL = [f"sequential, {pair}" for pair in PAIRS]  # one call at a time: latencies measured
PIPELINED = [  # 100 calls in flight: no latency per call
    *(f"100 in flight, {pair}" for pair in PAIRS),
    "call_many window 100, the tutorial's server at prefetch 10",
    "call_many window 100, the tutorial made safe's server at prefetch 10",
    "call_many window 100, this server at prefetch 10",
]
QUICK_ROWS = [*SEQUENTIAL, *PIPELINED]


def load_bench(name: str = "rpc_bench") -> ModuleType:
    """The benchmark as a module: bench/ is a folder of scripts, not a package."""
    spec = importlib.util.spec_from_file_location(name, ROOT / BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quick_run(
    amqp_url: str, tmp_path_factory: pytest.TempPathFactory
) -> tuple[subprocess.CompletedProcess[str], dict]:
    """One `--quick --json FILE` run, shared by the tests that read what it wrote."""
    report = tmp_path_factory.mktemp("bench") / "bench.json"
    done = run_script(BENCH, "--quick", "--url", amqp_url, "--json", str(report), timeout=240)
    assert done.returncode == 0, done.stderr
    return done, json.loads(report.read_text())


def test_quick_run_gives_a_row_for_every_workload(quick_run: tuple) -> None:
    done, report = quick_run
    rows = report["rows"]
    assert [row["workload"] for row in rows] == QUICK_ROWS
    for row in rows:
        assert row["calls"] > 0 and row["calls_per_s"] > 0 and row["cpu_us_per_call"] > 0, row
    by_label = {row["workload"]: row for row in rows}
    for label in SEQUENTIAL:
        assert by_label[label]["calls"] == 20  # 10 calls in each of 2 rounds
        assert 0 < by_label[label]["p50_ms"] <= by_label[label]["p99_ms"], by_label[label]
    for label in PIPELINED:
        assert by_label[label]["p50_ms"] is None and by_label[label]["calls"] == 40
    # Each comparison is with an earlier row, and the note says the ratios stored, in order.
    for row in rows:
        earlier = QUICK_ROWS[: QUICK_ROWS.index(row["workload"])]
        assert set(row["ratios"]) <= set(earlier) and all(r > 0 for r in row["ratios"].values())
        notes = [note[: note.index(" of ") + 4] for note in row["note"].split("; ") if note]
        assert notes == [f"x{ratio:.2f} of " for ratio in row["ratios"].values()], row
    # This pair beside the four baselines, one call at a time and 100 in flight, and each
    # baseline but the tutorial's beside it; the pipelined servers beside the tutorial's.
    for mode in ("sequential", "100 in flight"):
        assert list(by_label[f"{mode}, this pair"]["ratios"]) == [f"{mode}, {p}" for p in PAIRS[:4]]
        assert by_label[f"{mode}, tutorial pair"]["ratios"] == {}
        for pair in PAIRS[1:4]:
            assert list(by_label[f"{mode}, {pair}"]["ratios"]) == [f"{mode}, tutorial pair"]
    assert list(by_label[PIPELINED[-1]]["ratios"]) == [PIPELINED[-3]]
    # The table on stdout: a header, then a line per row, in the same order.
    header, *lines = done.stdout.splitlines()
    assert header.split()[:2] == ["workload", "calls/s"]
    assert len(lines) == len(rows)
    for line, row in zip(lines, rows, strict=True):
        assert line.startswith(row["workload"]) and f" {row['calls_per_s']} " in line, line
    assert "Traceback" not in done.stderr


def test_quick_run_deletes_its_queues(amqp_url: str, quick_run: tuple) -> None:
    _, report = quick_run
    queues = report["queues"]
    # one a pair (5), then one a server at prefetch 10 (3)
    assert len(queues) == len(set(queues)) == 8
    with connect(amqp_url, "test_bench cleanup check") as connection:
        for name in queues:
            assert name.startswith("bench_")
            with pytest.raises(ChannelClosedByBroker) as raised:
                connection.channel().queue_declare(queue=name, passive=True)
            assert raised.value.reply_code == 404, name


@pytest.mark.parametrize(
    ("kind", "extra"),
    [("tutorial", {}), ("safe", {}), ("aio", {"x-dead-letter-exchange": "rpc.dlx"}), ("fast", {})],
)
def test_each_baseline_serves_a_durable_quorum_queue(amqp_url: str, kind: str, extra: dict) -> None:
    bench = load_bench()
    runner = bench.Bench(amqp_url, (1, 1), (1, 1))
    with runner.stack, connect(amqp_url, f"test_bench {kind} queue check") as connection:
        queue = runner.peer(kind)
        # A declare that differs in durability or arguments is refused with 406; aio-pika's
        # patterns.RPC adds a dead-letter exchange of its own.
        arguments = {**bench.QUORUM, **extra}
        connection.channel().queue_declare(queue, durable=True, arguments=arguments)


def test_a_wrong_answer_fails_the_run() -> None:
    bench = load_bench()
    run = bench.measure(rpc_server.fib, [10, 30])
    assert (run.calls, len(run.latencies)) == (2, 2) and run.seconds > 0
    with pytest.raises(RuntimeError, match="wrong answers"):
        bench.measure(lambda n: rpc_server.fib(n) + 1, [10, 30])
    with pytest.raises(RuntimeError, match="wrong answers"):  # one answer missing
        bench.measure(lambda ns, window: [rpc_server.fib(n) for n in ns[1:]], [10, 30], 100)


@pytest.mark.parametrize(
    "args", [["--no-such-option"], ["--json"], ["--url"], ["--quick", "extra"]]
)
def test_usage_errors_exit_2(args: list[str]) -> None:
    done = run_script(BENCH, *args)
    assert done.returncode == 2, done
    assert "usage:" in done.stderr and done.stdout == ""


def test_importing_the_benchmark_connects_to_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the benchmark connected or started a process on import")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(pika, "BlockingConnection", refuse)
    monkeypatch.setattr(subprocess, "Popen", refuse)
    for name in ("amqp_rpc", "rpc_client", "rpc_server"):  # imported afresh, under the same watch
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.delitem(sys.modules, "rpc_bench_import_check", raising=False)
    bench = load_bench("rpc_bench_import_check")
    assert bench.READY == " [x] Awaiting RPC requests"
    assert Path(bench.__file__) == ROOT / BENCH
