"""The benchmark, in its quick mode: it runs with one command and every result is right.

Only correctness is checked here, never a timing: the figures depend on the machine.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pika
import pytest
from pika.exceptions import ChannelClosedByBroker

from tests.conftest import ROOT, connect

BENCH = ROOT / "bench" / "rpc_bench.py"
WORKLOADS = {"sequential", "call_many", "clients", "slow_reply", "prefetch", "fairness"}


def load_bench() -> ModuleType:
    """The benchmark as a module: bench/ is a folder of scripts, not a package."""
    if "rpc_bench" not in sys.modules:
        spec = importlib.util.spec_from_file_location("rpc_bench", BENCH)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["rpc_bench"] = module  # its dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules["rpc_bench"]


def test_quick_run_measures_every_workload(amqp_url: str, tmp_path: Path) -> None:
    report = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--url", amqp_url, "--json", str(report)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,  # it finds the project's scripts from anywhere
    )
    assert done.returncode == 0, done.stderr
    figures = json.loads(report.read_text())
    rows = figures["rows"]
    assert {line["workload"] for line in rows} == WORKLOADS
    for line in rows:
        assert line["correct"] is True, line
        for key in ("calls", "seconds", "calls_per_s", "cpu_us_per_call"):
            assert line[key] > 0, (key, line)
    cases = {line["case"] for line in rows}
    for n in (10, 30, 100000):
        assert {f"fib({n}), bare", f"fib({n}), project"} <= cases
    sequential = [line for line in rows if line["workload"] == "sequential"]
    assert all(line["p50_ms"] > 0 for line in sequential)  # None: no latencies recorded
    assert all(line["vs_bare"] > 0 for line in sequential if line["case"].endswith("project"))
    many = {
        (line["servers"], line.get("window")) for line in rows if line["workload"] == "call_many"
    }
    # window None: the row of call(), one at a time, that call_many's rows are compared with
    assert many == {(1, None)} | {
        (servers, window) for servers in (1, 2) for window in (1, 10, 100)
    }
    clients = {(line["clients"], line["servers"]) for line in rows if line["workload"] == "clients"}
    assert clients == {(1, 1), (2, 1), (2, 2)}  # --quick runs 2 client processes
    assert {line["prefetch"] for line in rows if line["workload"] == "prefetch"} == {1, 10, 50}
    (slow,) = [line for line in rows if line["workload"] == "slow_reply"]
    assert slow["cpu_percent"] > 0
    # Each target is reported with what was measured; whether it was met is the machine's,
    # but the verdict must follow from the figure and the limit.
    assert len(figures["targets"]) == 5
    for goal in figures["targets"]:
        op, limit = goal["wanted"].split()
        wanted = goal["measured"] >= float(limit) if op == ">=" else goal["measured"] < float(limit)
        assert goal["met"] is wanted, goal
    # The table on stdout, a line per row in the JSON's order; the progress on stderr.
    assert done.stdout.startswith("workload ")
    table = done.stdout.split("\n\n")[0].splitlines()[1:]
    assert [line.split()[0] for line in table] == [line["workload"] for line in rows]
    assert "[1/5] sequential" in done.stderr
    assert "Traceback" not in done.stderr


def test_workloads_delete_their_queues(
    amqp_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bench = load_bench()
    made: list[str] = []
    new_queue = bench.new_queue

    def recording_new_queue(workload: str) -> str:
        made.append(new_queue(workload))
        return made[-1]

    monkeypatch.setattr(bench, "new_queue", recording_new_queue)
    argv = ["--quick", "--url", amqp_url, "--only", "sequential", "--only", "slow_reply"]
    assert bench.main(argv) == 0
    assert "fib(10), project" in capsys.readouterr().out
    assert len(made) == 7  # two for each n, one for the slow reply
    with connect(amqp_url, "test_bench cleanup check") as connection:
        for name in made:
            channel = connection.channel()
            with pytest.raises(ChannelClosedByBroker) as raised:
                channel.queue_declare(queue=name, passive=True)
            assert raised.value.reply_code == 404, name


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    bench = load_bench()
    with pytest.raises(SystemExit) as raised:
        bench.main(["--calls", "0"])
    assert raised.value.code == 2
    assert "--calls" in capsys.readouterr().err


def test_importing_the_benchmark_connects_to_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("connected on import")

    monkeypatch.setattr(pika, "BlockingConnection", refuse)
    monkeypatch.delitem(sys.modules, "rpc_bench", raising=False)  # imported afresh
    assert load_bench().READY == " [x] Awaiting RPC requests"
