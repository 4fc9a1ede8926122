#!/usr/bin/env python
"""Benchmark of the tutorial 6 RPC pair against a broker, with two baselines in the same run.

Each workload starts its servers on queues of its own (bench_<uuid>, deleted afterwards)
and checks every answer. The baselines: the official tutorial's pair as a user runs it, and
a bare pair (the same server; a client that pipelines, with or without publisher confirms).
Rows that are compared take turns, so that they share the machine's load.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import astuple, dataclass, field
from pathlib import Path

import pika

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the project's scripts, from any working directory
from rpc_client import DEFAULT_URL, FibonacciRpcClient  # noqa: E402
from rpc_server import fib  # noqa: E402  a loop, as in the tutorial's server; checks answers too

READY = " [x] Awaiting RPC requests"
Call = Callable[..., object]  # fib(n) for an n, or for a list of n with window=
Case = tuple[Call, int, str, str]  # a row's call, n, the row it is compared with, its short name


@dataclass
class Run:  # what a client saw over some calls
    calls: int = 0
    seconds: float = 0.0  # wall clock
    cpu: float = 0.0  # CPU seconds of the client's process
    latencies: list[float] = field(default_factory=list)  # seconds, of calls one at a time


def measure(call: Call, ns: list[int], window: int = 0, run: Run | None = None) -> Run:
    """Time call on ns, one n at a time or window in flight, adding to run; check the answers."""
    run, answers, latencies = run or Run(), [], []
    cpu, start = time.process_time(), time.perf_counter()
    if window:
        answers = call(ns, window=window)
    else:
        for n in ns:
            sent = time.perf_counter()
            answers.append(call(n))
            latencies.append(time.perf_counter() - sent)
    run.seconds += time.perf_counter() - start
    run.cpu += time.process_time() - cpu
    if answers != [fib(n) for n in ns]:
        raise RuntimeError(f"wrong answers: asked fib of {ns[:5]}..., got {answers[:5]}...")
    run.calls += len(ns)
    run.latencies += latencies
    return run


def plain_server(url: str, queue: str, delay: float) -> int:
    """The tutorial's server: a quorum queue, prefetch 1, a loop fib, the ack after the reply."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    channel.queue_declare(queue=queue, durable=True, arguments={"x-queue-type": "quorum"})

    def on_request(ch, method, props, body: bytes) -> None:
        if delay:  # a fake slow server; the heartbeat interval (60 s) outlasts it
            time.sleep(delay)
        reply = pika.BasicProperties(correlation_id=props.correlation_id)
        answer = str(fib(int(body)))
        ch.basic_publish(exchange="", routing_key=props.reply_to, properties=reply, body=answer)
        ch.basic_ack(delivery_tag=method.delivery_tag)

    channel.basic_qos(prefetch_count=1)
    channel.basic_consume(queue=queue, on_message_callback=on_request)
    print(READY, flush=True)
    channel.start_consuming()
    return 0


class TutorialClient:
    """The tutorial's client: a call at a time, waiting in process_data_events(time_limit=None)."""

    def __init__(self, url: str, queue: str) -> None:
        self.connection = pika.BlockingConnection(pika.URLParameters(url))
        self.channel = self.connection.channel()
        self.reply_to = self.channel.queue_declare(queue="", exclusive=True).method.queue
        self.channel.basic_consume(self.reply_to, self.on_response, auto_ack=True)
        self.queue, self.corr_id, self.response = queue, "", b""

    def on_response(self, ch, method, props, body: bytes) -> None:
        if props.correlation_id == self.corr_id:
            self.response = body

    def send(self, n: int, corr_id: str) -> None:
        asking = pika.BasicProperties(reply_to=self.reply_to, correlation_id=corr_id)
        self.channel.basic_publish("", self.queue, str(n), asking)

    def call(self, n: int) -> int:
        self.corr_id, self.response = str(uuid.uuid4()), b""
        self.send(n, self.corr_id)
        while not self.response:
            self.connection.process_data_events(time_limit=None)
        return int(self.response)

    def close(self) -> None:
        self.connection.close()


class BareClient(TutorialClient):
    """The bare pair's client: window requests in flight; confirms: pika's blocking ones."""

    def __init__(self, url: str, queue: str, confirms: bool = False) -> None:
        super().__init__(url, queue)
        if confirms:
            self.channel.confirm_delivery()  # each basic_publish now waits for its confirm
        self.answers: dict[int, int] = {}

    def on_response(self, ch, method, props, body: bytes) -> None:
        self.answers[int(props.correlation_id)] = int(body)

    def call(self, n: int) -> int:
        return self.calls([n])[0]

    def calls(self, ns: list[int], window: int = 1) -> list[int]:
        self.answers.clear()
        for sent, n in enumerate(ns):
            while sent - len(self.answers) >= window:
                self.connection.process_data_events(time_limit=None)
            self.send(n, str(sent))
        while len(self.answers) < len(ns):
            self.connection.process_data_events(time_limit=None)
        return [self.answers[index] for index in range(len(ns))]


@dataclass
class Bench:
    url: str
    sequential: tuple[int, int]  # turns that rows of calls one at a time take, calls a turn
    pipelined: tuple[int, int]  # the same for rows of calls 100 in flight
    clients: int  # client processes at once
    delay: float  # seconds the slow reply is late
    stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)  # the workload's
    rows: dict[str, dict[str, object]] = field(default_factory=dict)  # by label
    queues: list[str] = field(default_factory=list)

    def servers(self, script: Path, count: int, *options: str) -> str:
        """A new queue, deleted at the workload's end, and count servers on it, ready; its name."""
        self.queues.append(queue := f"bench_{uuid.uuid4().hex}")
        self.stack.callback(self.delete, queue)
        for _ in range(count):
            command = [sys.executable, script, "--url", self.url, "--queue", queue, *options]
            process = subprocess.Popen(command, stdout=subprocess.PIPE)
            self.stack.enter_context(process)  # waits for it, after the kill below
            self.stack.callback(process.kill)
            if process.stdout.readline() != f"{READY}\n".encode():  # its errors: on our stderr
                raise RuntimeError(f"{script.name} exited with {process.wait()}")
        return queue

    def ours(self, count: int = 1, *options: str) -> FibonacciRpcClient:
        queue = self.servers(ROOT / "rpc_server.py", count, "-q", *options)
        return self.open(FibonacciRpcClient(self.url, timeout=60, queue=queue))

    def plain(self, delay: float = 0) -> str:
        return self.servers(Path(__file__).resolve(), 1, "--delay", str(delay))

    def open(self, client: object) -> object:
        return self.stack.enter_context(contextlib.closing(client))

    def in_turns(self, cases: dict[str, Case], turns: tuple[int, int], window: int = 0) -> None:
        """Measure the cases count calls at a time, taking rounds turns; add their rows."""
        (rounds, count), runs = turns, {label: Run() for label in cases}
        for _ in range(rounds):
            for label, (call, n, _, _) in cases.items():
                measure(call, [n] * count, window, runs[label])
        for label, (_, _, base, name) in cases.items():
            self.add(label, runs[label], base, name)

    def delete(self, queue: str) -> None:
        with pika.BlockingConnection(pika.URLParameters(self.url)) as connection:
            connection.channel().queue_delete(queue=queue)

    def add(self, label: str, run: Run, base: str = "", name: str = "", note: str = "") -> None:
        """A row; compared with row base (called name): the ratio of calls/s, µs more per call."""
        rate, lat = run.calls / run.seconds, run.latencies
        cuts = statistics.quantiles(lat, n=100, method="inclusive") if len(lat) > 1 else lat * 99
        row = {"workload": label, "calls": run.calls, "calls_per_s": round(rate, 1)}
        row["p50_ms"] = round(cuts[49] * 1000, 3) if cuts else None
        row["p99_ms"] = round(cuts[98] * 1000, 3) if cuts else None
        row["cpu_us_per_call"] = round(run.cpu / run.calls * 1e6, 1)
        if base:
            base_rate = self.rows[base]["calls_per_s"]
            row["ratio"], row["ratio_of"] = round(rate / base_rate, 3), base
            more = 1e6 / rate - 1e6 / base_rate
            compared = f"x{row['ratio']:.2f} of {name}, {more:+.0f} µs/call"
            note = f"{compared}; {note}" if note else compared
        self.rows[label] = {**row, "note": note}


def one_client(bench: Bench) -> None:
    """One client: a call at a time, then 100 in flight; the tutorial pair, the bare pair, ours."""
    tutorial = bench.open(TutorialClient(bench.url, bench.plain()))
    bare = bench.open(BareClient(bench.url, bench.plain()))
    confirmed = bench.open(BareClient(bench.url, bench.plain(), confirms=True))
    ours, two, ten = bench.ours(), bench.ours(2), bench.ours(1, "--prefetch", "10")
    tut10, tut30 = "sequential fib(10), tutorial pair", "sequential fib(30), tutorial pair"
    bare30, ours30 = "sequential fib(30), bare pair", "sequential fib(30), this pair"
    cases: dict[str, Case] = {
        tut10: (tutorial.call, 10, "", ""),
        "sequential fib(10), this pair": (ours.call, 10, tut10, "tutorial"),
        tut30: (tutorial.call, 30, "", ""),
        bare30: (bare.call, 30, tut30, "tutorial"),
        f"{bare30} + confirms": (confirmed.call, 30, bare30, "bare"),
        ours30: (ours.call, 30, tut30, "tutorial"),
    }
    bench.in_turns(cases, bench.sequential)
    bare_row, one_row = "window 100, bare pair", "call_many window 100, 1 server"
    cases = {
        bare_row: (bare.calls, 30, bare30, "sequential"),
        f"{bare_row} + blocking confirms": (confirmed.calls, 30, bare_row, "bare"),
        one_row: (ours.call_many, 30, ours30, "call()"),
        "call_many window 100, 2 servers": (two.call_many, 30, one_row, "1 server"),
        f"{one_row}, --prefetch 10": (ten.call_many, 30, one_row, "prefetch 1"),
    }
    bench.in_turns(cases, bench.pipelined, window=100)


def client_process(url: str, queue: str, calls: int, start: object) -> Run:
    """One of several client processes: connect, start with the others, call one at a time."""
    with FibonacciRpcClient(url, timeout=60, queue=queue) as rpc:
        rpc.call(30)
        start.wait(60)
        return measure(rpc.call, [30] * calls)


def client_processes(bench: Bench) -> None:
    """Several client processes at once, each making one call at a time, to two servers."""
    spawn = multiprocessing.get_context("spawn")  # processes that inherit no connection of ours
    with spawn.Manager() as manager, spawn.Pool(bench.clients) as pool:
        queue = bench.servers(ROOT / "rpc_server.py", 2, "-q")
        calls = bench.sequential[0] * bench.sequential[1]  # each, as many as a row of one client
        args = (bench.url, queue, calls, manager.Barrier(bench.clients))
        runs = pool.starmap(client_process, [args] * bench.clients)
    counts, seconds, cpu, latencies = zip(*map(astuple, runs), strict=True)
    run = Run(sum(counts), max(seconds), sum(cpu), [x for each in latencies for x in each])
    label = f"{bench.clients} client processes, 2 servers"
    bench.add(label, run, "sequential fib(30), this pair", "one client")


def slow_reply(bench: Bench) -> None:
    """One call whose reply comes seconds late (a fake server sleeps): the client's CPU meanwhile."""
    rpc = bench.open(FibonacciRpcClient(bench.url, timeout=60, queue=bench.plain(bench.delay)))
    run = measure(rpc.call, [30])
    note = f"client CPU {run.cpu * 1e3:.1f} ms, {run.cpu / run.seconds:.3%} of the wait"
    bench.add(f"one reply {bench.delay:g} s late", run, note=note)


def table(rows: list[dict[str, object]]) -> str:
    width = max(len(str(row["workload"])) for row in rows)
    lines = [f"{'workload':{width}}  calls/s   p50 ms   p99 ms  client CPU µs/call  note"]
    for row in rows:
        p50, p99 = ("-" if row[key] is None else row[key] for key in ("p50_ms", "p99_ms"))
        cells = f"{row['calls_per_s']:>7}  {p50:>7}  {p99:>7}  {row['cpu_us_per_call']:>18}"
        lines.append(f"{row['workload']:{width}}  {cells}  {row['note']}".rstrip())
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    url = os.environ.get("AMQP_URL") or DEFAULT_URL
    parser.add_argument("--url", default=url, help="broker URL (default: $AMQP_URL or localhost)")
    parser.add_argument("--json", metavar="FILE", help="also write the rows to FILE")
    parser.add_argument("--quick", action="store_true", help="tiny counts: does it all work?")
    parser.add_argument("--queue", help=argparse.SUPPRESS)  # run as plain_server on it
    parser.add_argument("--delay", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.queue:
        return plain_server(args.url, args.queue, args.delay)
    settings = ((2, 10), (2, 20), 2, 0.5) if args.quick else ((40, 50), (8, 400), 4, 3.0)
    bench = Bench(args.url, *settings)
    for workload in (one_client, client_processes, slow_reply):
        print(f"rpc_bench: {workload.__name__}", file=sys.stderr, flush=True)
        with contextlib.ExitStack() as bench.stack:
            workload(bench)  # raises on a wrong answer
    rows = list(bench.rows.values())
    print(table(rows))
    if args.json:
        report = {"rows": rows, "queues": bench.queues}
        Path(args.json).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
