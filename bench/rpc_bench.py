#!/usr/bin/env python
"""Benchmark of the tutorial 6 RPC pair: round trips per second, latency and client CPU.

    python bench/rpc_bench.py [--calls N] [--prefetch N] [--only WORKLOAD] [--json FILE]
    python bench/rpc_bench.py --quick   # a tiny run: does it work? (the tests run it)

It starts its own servers (`python rpc_server.py --quiet`) against the broker at
AMQP_URL (default localhost), each workload on queues of its own that it deletes
afterwards, checks every result, prints a table to stdout and shows its progress on
stderr. In the same run a bare pika pair, the tutorial's round trip with no
validation, logging or timeouts, does the same work, so that the cost of the
project's hardening shows as a ratio. The cases that a ratio compares take turns,
so that both see the same load from the rest of the machine. The figures are for
reading, not asserting: the exit status is 1 only when a result was wrong or a
workload failed.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import math
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypeVar

import pika
from pika.adapters.blocking_connection import BlockingChannel
from pika.exceptions import AMQPError
from pika.spec import Basic

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the project's modules, from any working directory
import rpc_client  # noqa: E402
import rpc_server  # noqa: E402

LOGGER = logging.getLogger("rpc_bench")
Case = TypeVar("Case")  # what names a case of a workload

READY = " [x] Awaiting RPC requests"
SEQUENTIAL_NS = (10, 30, 100_000)
WINDOWS = (1, 10, 100)
PREFETCHES = (1, 10, 50)
SLOW_N = 1_000_000  # the largest n a server answers by default: about 25 ms of work
TIMEOUT = 60.0  # seconds for any one call: a stuck workload fails instead of hanging
WORKLOAD_LIMIT = 180  # seconds for a whole workload; a full run takes about one minute


class ChildError(Exception):
    """A process of the benchmark's own exited, or never said it was ready."""


class TooLong(Exception):
    """A workload ran past WORKLOAD_LIMIT: something hangs (the bare client has no timeout)."""


# The measurements.


@dataclass
class Run:
    """What one client saw over a run of calls."""

    calls: int = 0
    seconds: float = 0.0  # wall clock, first request to last reply
    cpu: float = 0.0  # seconds of this process's CPU over the run
    latencies: list[float] = field(default_factory=list)  # seconds, of sequential calls
    correct: bool = True

    @classmethod
    def merged(cls, runs: Sequence[Run]) -> Run:
        """Runs of clients that started together: their calls over the slowest one's time."""
        return cls(
            calls=sum(run.calls for run in runs),
            seconds=max(run.seconds for run in runs),
            cpu=sum(run.cpu for run in runs),
            latencies=[latency for run in runs for latency in run.latencies],
            correct=all(run.correct for run in runs),
        )

    def extend(self, more: Run) -> None:
        """Add a later run of the same client's."""
        self.calls += more.calls
        self.seconds += more.seconds
        self.cpu += more.cpu
        self.latencies += more.latencies
        self.correct = self.correct and more.correct

    @property
    def calls_per_s(self) -> float:
        return self.calls / self.seconds


def percentile(values: Sequence[float], p: float) -> float:
    """The nearest-rank percentile: the smallest value with p percent at or below it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def row(workload: str, case: str, run: Run, **extra: object) -> dict[str, object]:
    """A line of the table, and of the JSON."""
    figures: dict[str, object] = {
        "workload": workload,
        "case": case,
        "calls": run.calls,
        "seconds": round(run.seconds, 4),
        "calls_per_s": round(run.calls_per_s, 1),
        "p50_ms": None,
        "p99_ms": None,
        "cpu_us_per_call": round(run.cpu / run.calls * 1e6, 1),
        "correct": run.correct,
    }
    if run.latencies:
        figures["p50_ms"] = round(percentile(run.latencies, 50) * 1000, 3)
        figures["p99_ms"] = round(percentile(run.latencies, 99) * 1000, 3)
    return {**figures, **extra}


def timed_calls(call: Callable[[int], object], n: int, calls: int, budget: float) -> Run:
    """Call call(n) calls times, one after the other, or until budget seconds have passed."""
    expected = int(rpc_server.fib(n))
    run = Run()
    start_cpu, start = time.process_time(), time.perf_counter()
    stop_at = start + budget
    while run.calls < calls and time.perf_counter() < stop_at:
        sent = time.perf_counter()
        result = call(n)
        run.latencies.append(time.perf_counter() - sent)
        run.calls += 1
        run.correct = run.correct and result == expected
    run.seconds = time.perf_counter() - start
    run.cpu = time.process_time() - start_cpu
    return run


def timed_call_many(rpc: rpc_client.FibonacciRpcClient, ns: Sequence[int], window: int) -> Run:
    expected = [int(rpc_server.fib(n)) for n in ns]
    start_cpu, start = time.process_time(), time.perf_counter()
    results = rpc.call_many(ns, window=window)
    return Run(
        calls=len(ns),
        seconds=time.perf_counter() - start,
        cpu=time.process_time() - start_cpu,
        correct=results == expected,
    )


# The bare pair: the tutorial's round trip with nothing added.


def bare_server(queue_name: str, url: str, prefetch: int) -> None:
    """Answer fib(n) requests, with the tutorial's code and the project's fib; never returns."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    # Declared as the project declares it: the same kind of queue, the same round trip.
    channel.queue_declare(queue=queue_name, durable=True, arguments=rpc_server.QUEUE_ARGUMENTS)
    channel.basic_qos(prefetch_count=prefetch)

    def on_request(
        ch: BlockingChannel, method: Basic.Deliver, props: pika.BasicProperties, body: bytes
    ) -> None:
        response = str(rpc_server.fib(int(body)))
        ch.basic_publish(
            exchange="",
            routing_key=props.reply_to,
            properties=pika.BasicProperties(correlation_id=props.correlation_id),
            body=response,
        )
        ch.basic_ack(delivery_tag=method.delivery_tag)

    channel.basic_consume(queue=queue_name, on_message_callback=on_request)
    print(READY, flush=True)
    channel.start_consuming()


class BareClient:
    """The tutorial's client: no timeout, no check for a server, no logging."""

    def __init__(self, url: str, queue_name: str) -> None:
        self.connection = pika.BlockingConnection(pika.URLParameters(url))
        self.channel = self.connection.channel()
        self.callback_queue = self.channel.queue_declare(queue="", exclusive=True).method.queue
        self.channel.basic_consume(
            queue=self.callback_queue, on_message_callback=self.on_response, auto_ack=True
        )
        self.queue = queue_name
        self.replies: dict[str, bytes] = {}  # correlation_id -> body

    def on_response(
        self, ch: BlockingChannel, method: Basic.Deliver, props: pika.BasicProperties, body: bytes
    ) -> None:
        self.replies[props.correlation_id] = body

    def send(self, n: int) -> str:
        corr_id = str(uuid.uuid4())
        self.channel.basic_publish(
            exchange="",
            routing_key=self.queue,
            properties=pika.BasicProperties(reply_to=self.callback_queue, correlation_id=corr_id),
            body=str(n),
        )
        return corr_id

    def call(self, n: int) -> int:
        corr_id = self.send(n)
        while corr_id not in self.replies:
            self.connection.process_data_events(time_limit=None)
        # The project's decoder, not int(): int() is slow on big replies (and refused past
        # 4300 digits), so the ratio on fib(100000) would measure the decoders, not the round trip.
        return rpc_client.to_int(self.replies.pop(corr_id))

    def burst(self, ns: Sequence[int]) -> list[bytes]:
        """Send every request at once; return the reply bodies, undecoded, in the order of ns."""
        corr_ids = [self.send(n) for n in ns]
        deadline = time.monotonic() + TIMEOUT
        while not all(corr_id in self.replies for corr_id in corr_ids):
            if time.monotonic() > deadline:
                raise TimeoutError(f"replies missing after {TIMEOUT} s")
            self.connection.process_data_events(time_limit=1)
        return [self.replies.pop(corr_id) for corr_id in corr_ids]

    def close(self) -> None:
        if self.connection.is_open:
            self.connection.close()


def slow_server(queue_name: str, url: str, delay: float) -> None:
    """Answer fib(n) requests, each delay seconds after it came; never returns."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    channel.queue_declare(queue=queue_name, durable=True, arguments=rpc_server.QUEUE_ARGUMENTS)

    def reply(props: pika.BasicProperties, delivery_tag: int, response: str) -> None:
        channel.basic_publish(
            exchange="",
            routing_key=props.reply_to,
            properties=pika.BasicProperties(correlation_id=props.correlation_id),
            body=response,
        )
        channel.basic_ack(delivery_tag=delivery_tag)

    def on_request(
        ch: BlockingChannel, method: Basic.Deliver, props: pika.BasicProperties, body: bytes
    ) -> None:
        response = str(rpc_server.fib(int(body)))
        # NOTE: a timer, not a sleep: the connection goes on answering heartbeats.
        connection.call_later(delay, lambda: reply(props, method.delivery_tag, response))

    channel.basic_consume(queue=queue_name, on_message_callback=on_request)
    print(READY, flush=True)
    channel.start_consuming()


def client_process(queue_name: str, url: str, n: int, calls: int, budget: float) -> None:
    """One of several client processes: connect, say ready, then call at each "go"."""
    with rpc_client.FibonacciRpcClient(url, timeout=TIMEOUT, queue=queue_name) as fibonacci_rpc:
        fibonacci_rpc.call(n)  # warm up, before the clients start together
        print("ready", flush=True)
        for _ in sys.stdin:  # a line per turn; the end of the input ends the process
            run = timed_calls(fibonacci_rpc.call, n, calls, budget)
            print("result", json.dumps(asdict(run)), flush=True)


# The processes the benchmark starts.


class Child:
    """A process of the benchmark's: a server, or a client; its stdout lines queued as they come."""

    def __init__(self, args: Sequence[str], url: str) -> None:
        self.name = " ".join(args)
        # A file, not a pipe: a full pipe would block the child. Closed in stop().
        self.errors = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.errors,
            text=True,
            cwd=ROOT,
            env={**os.environ, "AMQP_URL": url, "PYTHONUNBUFFERED": "1"},
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)  # the end of its output

    def expect(self, prefix: str, timeout: float = 30) -> str:
        """Wait for the child's next line that starts with prefix; return it."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise ChildError(f"{self.name!r} printed no {prefix!r} in {timeout} s") from None
            if line is None:
                self.errors.seek(0)
                last = self.errors.read().strip().splitlines()[-3:]
                raise ChildError(f"{self.name!r} exited with {self.process.wait()}: {last}")
            if line.startswith(prefix):
                return line

    def tell(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def finish(self, timeout: float = 10) -> None:
        """End a client process: the end of its input, and it closes its connection."""
        assert self.process.stdin is not None
        self.process.stdin.close()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            LOGGER.warning("%r did not finish in %s s", self.name, timeout)

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.errors.close()


def project_server(queue_name: str, prefetch: int | None = None) -> list[str]:
    prefetching = [] if prefetch is None else ["--prefetch", str(prefetch)]
    return [str(ROOT / "rpc_server.py"), "--queue", queue_name, "--quiet", *prefetching]


def own(role: str, *args: object) -> list[str]:
    """The command that runs this file in one of its hidden roles."""
    return [str(Path(__file__).resolve()), role, *map(str, args)]


@contextlib.contextmanager
def servers(url: str, queue_name: str, commands: Sequence[Sequence[str]]) -> Iterator[None]:
    """Run the servers, each ready, for the with block; then stop them and delete the queue."""
    started: list[Child] = []
    try:
        for command in commands:
            started.append(Child(command, url))
        for child in started:
            child.expect(READY)
        yield
    finally:
        for child in started:
            child.stop()
        try:
            with pika.BlockingConnection(pika.URLParameters(url)) as connection:
                connection.channel().queue_delete(queue=queue_name)
        except AMQPError as error:
            LOGGER.warning("could not delete %s: %r", queue_name, error)


def client(settings: Settings, queue_name: str) -> rpc_client.FibonacciRpcClient:
    """The project's client, on queue_name."""
    return rpc_client.FibonacciRpcClient(settings.url, timeout=TIMEOUT, queue=queue_name)


def new_queue(workload: str) -> str:
    return f"rpc_bench_{workload}_{uuid.uuid4().hex[:12]}"


# The workloads. Each returns its rows.


@dataclass
class Settings:
    url: str
    calls: int  # round trips in a row; a tenth as many for fib(100000)
    budget: float  # seconds a row of sequential calls may take, at most
    clients: int  # client processes at once
    prefetch: int | None  # the project servers' --prefetch, but in the prefetch workload
    slow_delay: float  # seconds the slow reply takes
    bursts: tuple[int, ...]  # calls in each burst of slow and fast calls (prefetch)
    rounds: int  # turns that the cases of a workload take

    def calls_for(self, n: int) -> int:
        return self.calls if n < 10_000 else max(5, self.calls // 10)


def in_turns(cases: dict[Case, Callable[[], Run]], rounds: int) -> dict[Case, Run]:
    """Run each case rounds times, taking turns, so that all see the same load.

    NOTE: the machine is shared (the broker, the servers and anything else running):
    cases measured one after the other would compare a quiet minute with a busy one.
    """
    runs = {name: Run() for name in cases}
    for _ in range(rounds):
        for name, measure in cases.items():
            runs[name].extend(measure())
    return runs


def sequential(settings: Settings) -> list[dict[str, object]]:
    """One call at a time, from one client to one server: the bare pair and the project's."""
    rows: list[dict[str, object]] = []
    for n in SEQUENTIAL_NS:
        share = max(1, settings.calls_for(n) // settings.rounds)
        budget = settings.budget / settings.rounds
        bare_queue, project_queue = new_queue("sequential"), new_queue("sequential")
        bare = [own("bare-server", bare_queue)]
        project = [project_server(project_queue, settings.prefetch)]
        with (
            servers(settings.url, bare_queue, bare),
            servers(settings.url, project_queue, project),
            contextlib.closing(BareClient(settings.url, bare_queue)) as bare_client,
            client(settings, project_queue) as project_client,
        ):
            callers = {"bare": bare_client.call, "project": project_client.call}
            for call in callers.values():
                timed_calls(call, n, 20, budget)  # warm up
            runs = in_turns(
                {
                    pair: functools.partial(timed_calls, call, n, share, budget)
                    for pair, call in callers.items()
                },
                settings.rounds,
            )
        ratio = round(runs["project"].calls_per_s / runs["bare"].calls_per_s, 3)
        rows.append(row("sequential", f"fib({n}), bare", runs["bare"]))
        rows.append(row("sequential", f"fib({n}), project", runs["project"], vs_bare=ratio))
        LOGGER.info("  %s; %s", describe(rows[-2]), describe(rows[-1]))
    return rows


def in_flight(settings: Settings) -> list[dict[str, object]]:
    """call_many from one client, windows of 1, 10 and 100, to one server and to two.

    In turns with call(), one at a time to one server: the rate they are compared with.
    """
    share = max(1, settings.calls // settings.rounds)
    one, two = new_queue("call_many"), new_queue("call_many")
    with (
        servers(settings.url, one, [project_server(one, settings.prefetch)]),
        servers(settings.url, two, [project_server(two, settings.prefetch)] * 2),
        client(settings, one) as to_one,
        client(settings, two) as to_two,
    ):
        to_one.call_many([30] * 20, window=10)  # warm up
        to_two.call_many([30] * 20, window=10)
        # (servers, window) -> the measurement; window None: call(), one at a time
        cases = {(1, None): functools.partial(timed_calls, to_one.call, 30, share, TIMEOUT)}
        for count, rpc in ((1, to_one), (2, to_two)):
            for window in WINDOWS:
                cases[count, window] = functools.partial(timed_call_many, rpc, [30] * share, window)
        runs = in_turns(cases, settings.rounds)
    sequential = runs.pop((1, None))
    rows = [row("call_many", "fib(30), call() one at a time, 1 server", sequential, servers=1)]
    for (count, window), run in runs.items():
        case = f"fib(30), window {window}, {count} server{'s' * (count > 1)}"
        ratio = round(run.calls_per_s / sequential.calls_per_s, 3)
        extra = {"servers": count, "window": window, "vs_sequential": ratio}
        rows.append(row("call_many", case, run, **extra))
    for line in rows:
        LOGGER.info("  %s", describe(line))
    return rows


def client_processes(settings: Settings) -> list[dict[str, object]]:
    """Several client processes, each making one call at a time, to one server and to two.

    In turns with one client process alone: the rate they are compared with.
    """
    per_turn = max(1, settings.calls // settings.clients // settings.rounds)
    budget = settings.budget / settings.rounds

    def turn(group: Sequence[Child]) -> Run:
        for child in group:
            child.tell("go")
        results = [child.expect("result ", budget + TIMEOUT) for child in group]
        return Run.merged([Run(**json.loads(line.split(" ", 1)[1])) for line in results])

    with contextlib.ExitStack() as stack:
        cases = {}
        everyone: list[Child] = []
        for clients, count in ((1, 1), (settings.clients, 1), (settings.clients, 2)):
            queue_name = new_queue("clients")
            commands = [project_server(queue_name, settings.prefetch)] * count
            stack.enter_context(servers(settings.url, queue_name, commands))
            command = own("client", queue_name, 30, per_turn, budget)
            group = [stack.enter_context(Child(command, settings.url)) for _ in range(clients)]
            for child in group:
                child.expect("ready")
            cases[clients, count] = functools.partial(turn, group)
            everyone += group
        runs = in_turns(cases, settings.rounds)
        for child in everyone:
            child.finish()
    alone = runs[1, 1]
    rows = []
    for (clients, count), run in runs.items():
        case = f"fib(30), {clients} client{'s' * (clients > 1)}, {count} server{'s' * (count > 1)}"
        ratio = round(run.calls_per_s / alone.calls_per_s, 3)
        extra = {"clients": clients, "servers": count, "vs_one_client": ratio}
        rows.append(row("clients", case, run, **extra))
        LOGGER.info("  %s", describe(rows[-1]))
    return rows


def slow_reply(settings: Settings) -> list[dict[str, object]]:
    """One call whose reply takes seconds: the client's CPU while it waits."""
    queue_name = new_queue("slow")
    command = own("slow-server", queue_name, settings.slow_delay)
    with servers(settings.url, queue_name, [command]), client(settings, queue_name) as rpc:
        run = timed_calls(rpc.call, 30, 1, TIMEOUT)
    percent = round(run.cpu / run.seconds * 100, 3)
    rows = [row("slow_reply", f"fib(30), {settings.slow_delay:g} s late", run, cpu_percent=percent)]
    LOGGER.info("  %s", describe(rows[-1]))
    return rows


def prefetch(settings: Settings) -> list[dict[str, object]]:
    """The server's --prefetch: small calls through one server, and slow calls shared by two."""
    rows: list[dict[str, object]] = []
    share = max(1, settings.calls // settings.rounds)
    with contextlib.ExitStack() as stack:
        cases = {}
        for value in PREFETCHES:
            queue_name = new_queue("prefetch")
            stack.enter_context(
                servers(settings.url, queue_name, [project_server(queue_name, value)])
            )
            rpc = stack.enter_context(client(settings, queue_name))
            rpc.call_many([30] * 20, window=10)  # warm up
            cases[value] = functools.partial(timed_call_many, rpc, [30] * share, 100)
        runs = in_turns(cases, settings.rounds)
    for value, run in runs.items():
        ratio = round(run.calls_per_s / runs[1].calls_per_s, 3)
        case = f"fib(30), window 100, 1 server, prefetch {value}"
        rows.append(row("prefetch", case, run, prefetch=value, servers=1, vs_prefetch_1=ratio))
        LOGGER.info("  %s", describe(rows[-1]))
    for calls in settings.bursts:
        rows += fairness(settings, calls)
    return rows


def fairness(settings: Settings, calls: int) -> list[dict[str, object]]:
    """Bursts of slow and fast calls, alternately, all in flight at once, to two servers.

    A server holds up to prefetch requests and computes the slow ones one at a time,
    even while the other server is idle: the time a whole burst takes shows it.
    """
    mixed = [SLOW_N, 30] * (calls // 2)
    # Each distinct n computed once: fib(SLOW_N) takes tens of ms, and bursts repeat it.
    replies_for = {n: str(rpc_server.fib(n)).encode() for n in set(mixed)}
    expected = [replies_for[n] for n in mixed]

    def burst(bare: BareClient) -> Run:
        start_cpu, start = time.process_time(), time.perf_counter()
        replies = bare.burst(mixed)
        return Run(
            calls=len(mixed),
            seconds=time.perf_counter() - start,
            cpu=time.process_time() - start_cpu,
            correct=replies == expected,
        )

    with contextlib.ExitStack() as stack:
        cases = {}
        for value in PREFETCHES:
            queue_name = new_queue("fairness")
            commands = [project_server(queue_name, value)] * 2
            stack.enter_context(servers(settings.url, queue_name, commands))
            # NOTE: the bare client sends these and compares the replies as bytes: decoding
            # fib(1000000) costs a client more than computing it costs a server, and one
            # client decoding would hide how the two servers share the work.
            bare = stack.enter_context(contextlib.closing(BareClient(settings.url, queue_name)))
            bare.burst([30, 30])  # warm up
            cases[value] = functools.partial(burst, bare)
        runs = in_turns(cases, settings.rounds)
    rows = []
    for value, run in runs.items():
        ratio = round(run.calls_per_s / runs[1].calls_per_s, 3)
        case = f"bursts of {len(mixed)}: fib({SLOW_N}), fib(30), 2 servers, prefetch {value}"
        rows.append(row("fairness", case, run, prefetch=value, servers=2, vs_prefetch_1=ratio))
        LOGGER.info("  %s", describe(rows[-1]))
    return rows


WORKLOADS: dict[str, Callable[[Settings], list[dict[str, object]]]] = {
    "sequential": sequential,
    "call_many": in_flight,
    "clients": client_processes,
    "slow_reply": slow_reply,
    "prefetch": prefetch,
}


# The report.


def describe(line: dict[str, object]) -> str:
    return f"{line['case']}: {line['calls']} calls, {line['calls_per_s']}/s"


def first(rows: Sequence[dict[str, object]], workload: str, case: str) -> dict[str, object]:
    return next(line for line in rows if line["workload"] == workload and line["case"] == case)


def targets(rows: Sequence[dict[str, object]]) -> list[dict[str, object]]:
    """The issue's targets, each with the figure measured in this run."""
    project10 = first(rows, "sequential", "fib(10), project")
    project30 = first(rows, "sequential", "fib(30), project")
    project100k = first(rows, "sequential", "fib(100000), project")
    in_turn = first(rows, "call_many", "fib(30), call() one at a time, 1 server")
    many = max(
        line["calls_per_s"]
        for line in rows
        if line["workload"] == "call_many" and line["servers"] == 2
    )
    slow = next(line for line in rows if line["workload"] == "slow_reply")
    measured = [
        ("sequential fib(10): project / bare calls per s", project10["vs_bare"], ">=", 0.9),
        ("sequential fib(30): p50 ms", project30["p50_ms"], "<", 2.0),
        ("sequential fib(100000): p50 ms", project100k["p50_ms"], "<", 30.0),
        (
            "call_many, 2 servers, best window / call() one at a time, fib(30)",
            round(many / in_turn["calls_per_s"], 3),
            ">=",
            1.7,
        ),
        ("client CPU while waiting on a slow reply: % of the wait", slow["cpu_percent"], "<", 2.0),
    ]
    return [
        {
            "target": name,
            "measured": value,
            "wanted": f"{op} {limit}",
            "met": value >= limit if op == ">=" else value < limit,
        }
        for name, value, op, limit in measured
    ]


def table(rows: Sequence[dict[str, object]], goals: Sequence[dict[str, object]]) -> str:
    def cell(value: object) -> str:
        return "-" if value is None else str(value)

    head = ("workload", "case", "calls", "calls/s", "p50 ms", "p99 ms", "CPU us/call", "note")
    lines = []
    for line in rows:
        note = ""
        if "vs_bare" in line:
            note = f"x{line['vs_bare']} of bare"
        elif "vs_sequential" in line:
            note = f"x{line['vs_sequential']} of call()"
        elif "vs_one_client" in line:
            note = f"x{line['vs_one_client']} of 1 client"
        elif "vs_prefetch_1" in line:
            note = f"x{line['vs_prefetch_1']} of prefetch 1"
        elif "cpu_percent" in line:
            note = f"CPU {line['cpu_percent']}% of the wait"
        if not line["correct"]:
            note += " WRONG RESULTS"
        lines.append(
            (
                str(line["workload"]),
                str(line["case"]),
                str(line["calls"]),
                cell(line["calls_per_s"]),
                cell(line["p50_ms"]),
                cell(line["p99_ms"]),
                cell(line["cpu_us_per_call"]),
                note,
            )
        )
    widths = [max(len(cells[i]) for cells in (head, *lines)) for i in range(len(head))]

    def format_line(cells: Sequence[str]) -> str:
        return "  ".join(
            cell.ljust(width) if i in (0, 1, 7) else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(cells, widths))
        ).rstrip()

    out = [format_line(head), *map(format_line, lines), ""]
    for goal in goals:
        verdict = "met" if goal["met"] else "NOT MET"
        out.append(f"{verdict:8} {goal['target']}: {goal['measured']} (wanted {goal['wanted']})")
    return "\n".join(out)


# The command line.


def role(argv: Sequence[str]) -> int:
    """Run as one of the benchmark's own processes (hidden sub-commands)."""
    parser = argparse.ArgumentParser(prog="rpc_bench.py (a process of the benchmark's)")
    roles = parser.add_subparsers(dest="role", required=True)
    bare = roles.add_parser("bare-server")
    bare.add_argument("queue")
    bare.add_argument("--prefetch", type=int, default=1)
    slow = roles.add_parser("slow-server")
    slow.add_argument("queue")
    slow.add_argument("delay", type=float)
    caller = roles.add_parser("client")
    caller.add_argument("queue")
    caller.add_argument("n", type=int)
    caller.add_argument("calls", type=int)
    caller.add_argument("budget", type=float)
    args = parser.parse_args(argv)
    url = os.environ.get("AMQP_URL") or rpc_client.DEFAULT_URL
    if args.role == "bare-server":
        bare_server(args.queue, url, args.prefetch)
    elif args.role == "slow-server":
        slow_server(args.queue, url, args.delay)
    else:
        client_process(args.queue, url, args.n, args.calls, args.budget)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("bare-server", "slow-server", "client"):
        return role(argv)
    parser = argparse.ArgumentParser(
        description="Measure the RPC pair against a real broker: it starts its own servers, "
        "runs each workload, prints a table and checks every result.",
    )
    parser.add_argument(
        "--url",
        default=os.environ.get("AMQP_URL") or rpc_client.DEFAULT_URL,
        help="broker URL (default: $AMQP_URL, else amqp://guest:guest@localhost:5672/%%2F)",
    )
    parser.add_argument(
        "--calls",
        type=int,
        default=2000,
        help="round trips per row; a tenth as many for fib(100000) (default: %(default)s)",
    )
    parser.add_argument(
        "--clients", type=int, default=4, help="client processes at once (default: %(default)s)"
    )
    parser.add_argument(
        "--prefetch",
        type=int,
        help="the servers' --prefetch, in all workloads but prefetch (default: the server's)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a tiny run that checks the benchmark works; its figures mean nothing",
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=list(WORKLOADS),
        help="run this workload only (repeatable; default: all)",
    )
    parser.add_argument("--json", metavar="FILE", help="also write the figures to FILE")
    args = parser.parse_args(argv)
    if args.calls < 1 or args.clients < 1 or (args.prefetch or 1) < 1:
        parser.error("--calls, --clients and --prefetch must be at least 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("pika").setLevel(logging.CRITICAL)
    settings = Settings(
        url=args.url,
        calls=30 if args.quick else args.calls,
        budget=5.0 if args.quick else 20.0,
        clients=2 if args.quick else args.clients,
        prefetch=args.prefetch,
        slow_delay=0.5 if args.quick else 3.0,
        bursts=(2, 4) if args.quick else (20, 80),
        rounds=2 if args.quick else 10,
    )
    chosen = args.only or list(WORKLOADS)
    rows: list[dict[str, object]] = []
    for number, name in enumerate(chosen, 1):
        LOGGER.info("[%d/%d] %s", number, len(chosen), name)
        try:
            rows += run_workload(name, settings)
        except Exception as error:
            print(f"rpc_bench: {name} failed: {error!r}", file=sys.stderr)
            return 1
    goals = targets(rows) if not args.only else []
    print(table(rows, goals))
    if args.json:
        report = {"settings": asdict(settings), "rows": rows, "targets": goals}
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if not all(line["correct"] for line in rows):
        print("rpc_bench: some results were wrong", file=sys.stderr)
        return 1
    return 0


@contextlib.contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    """Raise TooLong in the with block after seconds, even in a blocking wait (Unix only)."""

    def on_alarm(signum: int, frame: object) -> None:
        raise TooLong(f"still running after {seconds} s")

    if not hasattr(signal, "SIGALRM"):
        yield
        return
    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def run_workload(name: str, settings: Settings) -> list[dict[str, object]]:
    """Run a workload, once: no rerun after an error, so that a failure always shows."""
    with time_limit(WORKLOAD_LIMIT):
        return WORKLOADS[name](settings)


if __name__ == "__main__":
    raise SystemExit(main())
