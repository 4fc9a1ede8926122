#!/usr/bin/env python
"""Benchmark of the tutorial 6 RPC pair against a broker, beside what a user would pick instead:
the official tutorial's pair, the tutorial made safe (publisher confirms on both channels, each
waited for, and mandatory), aio-pika's patterns.RPC and FastStream's broker.request() (both:
confirms, the ack after the reply). Each works durable quorum queues of its own (bench_<uuid>,
deleted afterwards); every answer of fib(30) is checked. Rows that are compared take turns, so
that they share the machine's load.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aio_pika
import pika
from aio_pika.patterns import RPC
from faststream.rabbit import Channel, QueueType, RabbitBroker, RabbitQueue
from pika.adapters.blocking_connection import BlockingChannel
from pika.spec import Basic, BasicProperties

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the project's scripts, from any working directory
from amqp_rpc import DEFAULT_URL  # noqa: E402
from rpc_client import FibonacciRpcClient  # noqa: E402
from rpc_server import fib  # noqa: E402  a loop, as in the tutorial's server; checks answers too

READY = " [x] Awaiting RPC requests"
QUORUM = {"x-queue-type": "quorum"}  # as the official tutorials declare rpc_queue
N = 30  # the tutorial's call
Call = Callable[..., object]  # fib(n) for an n, or for a list of n with window=
Case = tuple[Call, dict[str, str]]  # a row's call; the rows it is compared with, short names
PAIRS = ("tutorial pair", "tutorial made safe", "aio-pika RPC", "FastStream request", "this pair")
SERVERS = ("the tutorial's server", "the tutorial made safe's server", "this server")


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


def tutorial_server(url: str, queue: str, safe: bool, prefetch: int) -> int:
    """The tutorial's server: a loop fib, the ack after the reply; safe: confirms, mandatory."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    channel.queue_declare(queue=queue, durable=True, arguments=QUORUM)
    if safe:
        channel.confirm_delivery()  # each basic_publish now waits for its confirm
    channel.basic_qos(prefetch_count=prefetch)
    channel.basic_consume(queue, functools.partial(on_request, safe))
    print(READY, flush=True)
    channel.start_consuming()
    return 0


def on_request(
    safe: bool, ch: BlockingChannel, method: Basic.Deliver, props: BasicProperties, body: bytes
) -> None:
    reply = pika.BasicProperties(correlation_id=props.correlation_id)
    answer = str(fib(int(body)))
    ch.basic_publish("", props.reply_to, answer, reply, mandatory=safe)
    ch.basic_ack(delivery_tag=method.delivery_tag)


class TutorialClient:
    """The tutorial's client (call_many: window calls in flight); safe: confirms, mandatory."""

    def __init__(self, url: str, queue: str, safe: bool = False) -> None:
        self.connection = pika.BlockingConnection(pika.URLParameters(url))
        self.channel = self.connection.channel()
        if safe:
            self.channel.confirm_delivery()
        self.reply_to = self.channel.queue_declare(queue="", exclusive=True).method.queue
        self.channel.basic_consume(self.reply_to, self.on_response, auto_ack=True)
        self.queue, self.safe, self.answers = queue, safe, {}

    def on_response(
        self, ch: BlockingChannel, method: Basic.Deliver, props: BasicProperties, body: bytes
    ) -> None:
        self.answers[int(props.correlation_id)] = int(body)

    def call(self, n: int) -> int:
        return self.call_many([n])[0]

    def call_many(self, ns: list[int], window: int = 1) -> list[int]:
        self.answers.clear()
        for sent, n in enumerate(ns):
            while sent - len(self.answers) >= window:
                self.connection.process_data_events(time_limit=None)
            asking = pika.BasicProperties(reply_to=self.reply_to, correlation_id=str(sent))
            self.channel.basic_publish("", self.queue, str(n), asking, mandatory=self.safe)
        while len(self.answers) < len(ns):
            self.connection.process_data_events(time_limit=None)
        return [self.answers[index] for index in range(len(ns))]

    def close(self) -> None:
        self.connection.close()


async def aio_server(url: str, queue: str) -> None:
    """aio-pika's patterns.RPC serving fib: its channels confirm publishes by default."""
    connection = await aio_pika.connect(url)
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=1)
    rpc = await RPC.create(channel, exclusive=True)  # RabbitMQ 4 deprecates a transient one
    await rpc.register(queue, fib, durable=True, arguments=QUORUM)  # called as fib(n=...)
    print(READY, flush=True)
    await asyncio.Future()  # until killed


async def fast_server(url: str, queue: str) -> None:
    """FastStream serving fib: its return value is the reply, confirmed, then the ack."""
    broker = RabbitBroker(url, logger=None)  # no log line a message, as ours runs with -q
    quorum = RabbitQueue(queue, queue_type=QueueType.QUORUM, durable=True)
    broker.subscriber(quorum, channel=Channel(prefetch_count=1))(fib)  # fib(30) from "30"
    await broker.start()
    print(READY, flush=True)
    await asyncio.Future()  # until killed


class AsyncClient:
    """An asyncio client as a synchronous caller runs it: call() each through the event loop's
    run_until_complete, call_many() as one gather with window calls in flight at most."""

    def __init__(self, url: str, queue: str) -> None:
        self.loop, self.queue = asyncio.new_event_loop(), queue
        self.loop.run_until_complete(self.connect(url))

    def call(self, n: int) -> int:
        return self.loop.run_until_complete(self.ask(n))

    def call_many(self, ns: list[int], window: int) -> list[int]:
        return self.loop.run_until_complete(self.gather(ns, window))

    async def gather(self, ns: list[int], window: int) -> list[int]:
        room = asyncio.Semaphore(window)
        return await asyncio.gather(*(self.ask_in(room, n) for n in ns))

    async def ask_in(self, room: asyncio.Semaphore, n: int) -> int:
        async with room:
            return await self.ask(n)

    def close(self) -> None:
        self.loop.run_until_complete(self.disconnect())
        self.loop.close()


class AioClient(AsyncClient):
    """aio-pika's patterns.RPC: its channels confirm publishes by default."""

    async def connect(self, url: str) -> None:
        self.connection = await aio_pika.connect(url)
        self.rpc = await RPC.create(await self.connection.channel(), exclusive=True)

    async def ask(self, n: int) -> int:
        return await self.rpc.call(self.queue, {"n": n})

    async def disconnect(self) -> None:
        await self.connection.close()


class FastClient(AsyncClient):
    """FastStream's broker.request(): direct reply-to, the request confirmed and mandatory.
    NOTE: it holds one lock per broker until the reply comes, so a gather of 100 requests
    has one in flight at a time: the row shows what a user who tries it gets."""

    async def connect(self, url: str) -> None:
        self.broker = RabbitBroker(url, logger=None)
        await self.broker.connect()

    async def ask(self, n: int) -> int:
        reply = await self.broker.request(n, queue=self.queue)
        return await reply.decode()

    async def disconnect(self) -> None:
        await self.broker.stop()


@dataclass
class Bench:
    url: str
    sequential: tuple[int, int]  # turns that rows of calls one at a time take, calls a turn
    pipelined: tuple[int, int]  # the same for rows of calls 100 in flight
    stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)  # servers, clients
    rows: dict[str, dict[str, object]] = field(default_factory=dict)  # by label
    queues: list[str] = field(default_factory=list)

    def start(self, script: Path, *options: str) -> str:
        """A server on a new queue, both gone when the stack closes, ready; the queue's name."""
        queue = f"bench_{uuid.uuid4().hex}"
        self.queues.append(queue)
        self.stack.callback(self.delete, queue)
        command = [sys.executable, script, "--url", self.url, "--queue", queue, *options]
        process = subprocess.Popen(command, stdout=subprocess.PIPE)
        self.stack.enter_context(process)  # waits for it, after the kill below
        self.stack.callback(process.kill)
        if process.stdout.readline() != f"{READY}\n".encode():  # its errors: on our stderr
            raise RuntimeError(f"{script.name} exited with {process.wait()}")
        return queue

    def ours(self, *options: str) -> FibonacciRpcClient:
        return self.client(self.start(ROOT / "rpc_server.py", "-q", *options))

    def client(self, queue: str) -> FibonacciRpcClient:
        return self.open(FibonacciRpcClient(self.url, timeout=60, queue=queue))

    def peer(self, kind: str, *options: str) -> str:
        """A server of the benchmark's own (tutorial, safe, aio or fast) on a new queue; its name."""
        return self.start(Path(__file__).resolve(), "--serve", kind, *options)

    def open(self, client: object) -> object:
        return self.stack.enter_context(contextlib.closing(client))

    def in_turns(self, cases: dict[str, Case], turns: tuple[int, int], window: int = 0) -> None:
        """Measure the cases count calls at a time, taking rounds turns; add their rows."""
        (rounds, count), runs = turns, {label: Run() for label in cases}
        for _ in range(rounds):
            for label, (call, _) in cases.items():
                measure(call, [N] * count, window, runs[label])
        for label, (_, bases) in cases.items():
            self.add(label, runs[label], bases)

    def delete(self, queue: str) -> None:
        with pika.BlockingConnection(pika.URLParameters(self.url)) as connection:
            connection.channel().queue_delete(queue=queue)

    def add(self, label: str, run: Run, bases: dict[str, str]) -> None:
        """A row; compared with rows bases (label: short name): calls/s ratio, µs more per call."""
        rate, lat = run.calls / run.seconds, run.latencies
        cuts = statistics.quantiles(lat, n=100, method="inclusive") if len(lat) > 1 else lat * 99
        row = {"workload": label, "calls": run.calls, "calls_per_s": round(rate, 1)}
        row["p50_ms"] = round(cuts[49] * 1000, 3) if cuts else None
        row["p99_ms"] = round(cuts[98] * 1000, 3) if cuts else None
        row["cpu_us_per_call"] = round(run.cpu / run.calls * 1e6, 1)
        row["ratios"], notes = {}, []
        for base, name in bases.items():
            base_rate = self.rows[base]["calls_per_s"]
            row["ratios"][base] = ratio = round(rate / base_rate, 3)
            more = 1e6 / rate - 1e6 / base_rate
            notes.append(f"x{ratio:.2f} of {name} ({more:+.0f} µs)")
        self.rows[label] = {**row, "note": "; ".join(notes)}


def workloads(bench: Bench) -> None:
    """One client: a call at a time, then 100 in flight, with each pair; then prefetch 10."""
    tutorial = bench.open(TutorialClient(bench.url, bench.peer("tutorial")))
    safe = bench.open(TutorialClient(bench.url, bench.peer("safe"), safe=True))
    aio = bench.open(AioClient(bench.url, bench.peer("aio")))
    fast = bench.open(FastClient(bench.url, bench.peer("fast")))
    ours = bench.ours()
    modes = ("sequential", bench.sequential, 0), ("100 in flight", bench.pipelined, 100)
    for mode, turns, window in modes:
        tut, made, aiop, fasts, this = (f"{mode}, {pair}" for pair in PAIRS)
        method = "call_many" if window else "call"
        bases = {tut: "tutorial", made: "made safe", aiop: "aio-pika", fasts: "FastStream"}
        cases = {
            tut: (getattr(tutorial, method), {}),
            made: (getattr(safe, method), {tut: "tutorial"}),
            aiop: (getattr(aio, method), {tut: "tutorial"}),
            fasts: (getattr(fast, method), {tut: "tutorial"}),
            this: (getattr(ours, method), bases),
        }
        bench.in_turns(cases, turns, window)
    # The same client, ours, to one server of each kind that holds 10 requests at once.
    tut, made, this = (f"call_many window 100, {server} at prefetch 10" for server in SERVERS)
    cases = {
        tut: (bench.client(bench.peer("tutorial", "--prefetch", "10")).call_many, {}),
        made: (bench.client(bench.peer("safe", "--prefetch", "10")).call_many, {tut: "tutorial's"}),
        this: (bench.ours("--prefetch", "10").call_many, {tut: "tutorial's"}),
    }
    bench.in_turns(cases, bench.pipelined, window=100)


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
    hidden = argparse.SUPPRESS  # run as one of the peers' servers, on --queue
    parser.add_argument("--serve", choices=["tutorial", "safe", "aio", "fast"], help=hidden)
    parser.add_argument("--queue", help=hidden)
    parser.add_argument("--prefetch", type=int, default=1, help=hidden)
    args = parser.parse_args(argv)
    if args.serve == "aio":
        asyncio.run(aio_server(args.url, args.queue))
    if args.serve == "fast":
        asyncio.run(fast_server(args.url, args.queue))
    if args.serve:
        return tutorial_server(args.url, args.queue, args.serve == "safe", args.prefetch)
    settings = ((2, 10), (2, 20)) if args.quick else ((40, 50), (8, 400))
    bench = Bench(args.url, *settings)
    with bench.stack:
        workloads(bench)  # raises on a wrong answer
    rows = list(bench.rows.values())
    print(table(rows))
    if args.json:
        report = {"rows": rows, "queues": bench.queues}
        Path(args.json).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
