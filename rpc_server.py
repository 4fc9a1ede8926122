#!/usr/bin/env python
"""RPC server of RabbitMQ tutorial 6 ("Remote procedure call"), for pika 1.x.

It consumes requests from rpc_queue, computes fib(n) and publishes the answer to the
request's reply_to queue with the request's correlation_id. Start several servers to
share the load. Beyond the tutorial, for production: bad requests get an error reply
instead of killing the server, n is bounded, long work runs in a worker process so
that heartbeats keep flowing, a lost connection is re-established, and SIGINT/SIGTERM
finish the requests in hand before exiting.
"""

from __future__ import annotations

import argparse
import decimal
import functools
import logging
import multiprocessing
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import pika
import pika.data
from pika.adapters.blocking_connection import BlockingChannel
from pika.exceptions import (
    AMQPChannelError,
    AMQPConnectionError,
    ConnectionWrongStateError,
)
from pika.spec import Basic

LOGGER = logging.getLogger("rpc_server")

DEFAULT_URL = "amqp://guest:guest@localhost:5672/%2F"
# NOTE: declared exactly as the official tutorials of every language declare it
# (durable, quorum), so their servers and clients share it with ours; a queue
# declared with other arguments fails with PRECONDITION_FAILED.
QUEUE_ARGUMENTS = {"x-queue-type": "quorum"}
# fib(1000000) has 208988 digits: under a second from request to printed answer.
MAX_N = 1_000_000
MAX_BODY = 64  # bytes; n up to the default bound needs seven
BACKOFF_CAP = 5.0  # seconds between reconnection attempts, at most
INLINE_N = 100_000  # smaller n take 2 ms at most: answered at once, no worker
PIKA_DECODE_VALUE = pika.data.decode_value  # pika's own; see decode_value below


def fib(n: int) -> decimal.Decimal:
    """Return the n-th Fibonacci number, by fast doubling: O(log n) steps.

    NOTE: decimal, not int, arithmetic: str() of a huge int takes quadratic time
    (seconds for a million digits) and is refused past 4300 digits, while a Decimal
    prints in linear time.
    """
    with decimal.localcontext() as ctx:
        ctx.prec, ctx.Emax = decimal.MAX_PREC, decimal.MAX_EMAX  # exact integers
        ctx.traps[decimal.Inexact] = True
        a, b = decimal.Decimal(0), decimal.Decimal(1)  # fib(k), fib(k + 1); k = 0
        for bit in bin(n)[2:]:  # k doubles at each bit, plus one where it is set
            c = a * (2 * b - a)  # fib(2k)
            d = a * a + b * b  # fib(2k + 1)
            a, b = (d, c + d) if bit == "1" else (c, d)
        return a


def parse_request(body: bytes, max_n: int) -> int:
    """Return n from a request body; raise ValueError saying what is wrong."""
    if len(body) > MAX_BODY:
        raise ValueError(f"request body is {len(body)} bytes, the limit is {MAX_BODY}")
    text = body.decode("utf-8", errors="replace").strip()
    # isascii: int() would also take "+5", "1_0" and non-ASCII digits.
    if not (text.isascii() and text.isdigit() and int(text) <= max_n):
        shown = text if len(text) <= 20 else text[:20] + "..."
        raise ValueError(f"n must be an integer from 0 to {max_n}, got {shown!r}")
    return int(text)


def answer(n: int) -> bytes:
    """The reply's body for n: fib(n) in decimal digits."""
    return str(fib(n)).encode()


def decode_value(encoded: bytes, offset: int) -> tuple[object, int]:
    """pika's decoder of a header value, but a timestamp it cannot represent is None.

    NOTE: other clients can send a timestamp header past the year 9999. pika's error
    on it drops the connection before we see the request, and the broker redelivers
    that request to us again and again: one message would stop the server for good.
    """
    try:
        return PIKA_DECODE_VALUE(encoded, offset)
    except (OverflowError, ValueError, OSError):  # what datetime.fromtimestamp raises
        if encoded[offset : offset + 1] != b"T":
            raise
        return None, offset + 9  # the type octet, then 8 bytes of seconds


def start_worker(server_pid: int) -> None:
    """Set up the process that computes: signals are the server's, and it ends with it."""
    # NOTE: Ctrl-C signals the whole process group; the server decides when we stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def exit_when_orphaned() -> None:  # a SIGKILLed server cannot stop us itself
        while os.getppid() == server_pid:
            time.sleep(1)
        os._exit(1)

    threading.Thread(target=exit_when_orphaned, daemon=True).start()


def new_worker() -> ProcessPoolExecutor:
    return ProcessPoolExecutor(
        max_workers=1,
        # spawned, not forked: a fork would share our connection's socket
        mp_context=multiprocessing.get_context("spawn"),
        initializer=start_worker,
        initargs=(os.getpid(),),
    )


def serve(
    connection: pika.BlockingConnection, args: argparse.Namespace, signals: list[int]
) -> None:
    """Answer requests on connection until a signal comes, then finish those in hand."""
    channel = connection.channel()
    channel.queue_declare(queue=args.queue, durable=True, arguments=QUEUE_ARGUMENTS)
    channel.basic_qos(prefetch_count=args.prefetch)
    in_hand: set[int] = set()  # delivery tags of requests not yet answered
    worker = new_worker()

    def reply(
        delivery_tag: int, props: pika.BasicProperties, kind: str | None, body: bytes
    ) -> None:
        channel.basic_publish(
            exchange="",
            routing_key=props.reply_to,
            properties=pika.BasicProperties(correlation_id=props.correlation_id, type=kind),
            body=body,
        )
        # NOTE: the ack goes after the reply: a server that dies in between
        # leaves the request to be redelivered, never lost.
        channel.basic_ack(delivery_tag=delivery_tag)
        in_hand.discard(delivery_tag)

    def finish(delivery_tag: int, props: pika.BasicProperties, result: Callable[[], bytes]) -> None:
        """Reply with result(), or with an error reply where it raises."""
        try:
            kind, body = None, result()
        except Exception as error:  # one request's failure must not stop the server
            LOGGER.exception("a request failed")
            kind, body = "error", f"server error: {type(error).__name__}".encode()
        reply(delivery_tag, props, kind, body)

    def on_request(
        ch: BlockingChannel, method: Basic.Deliver, props: pika.BasicProperties, body: bytes
    ) -> None:
        nonlocal worker
        if not props.reply_to:
            LOGGER.warning(
                "dropped a request with no reply_to (correlation_id %r)", props.correlation_id
            )
            ch.basic_ack(delivery_tag=method.delivery_tag)
            return
        in_hand.add(method.delivery_tag)
        try:
            n = parse_request(body, args.max_n)
        except ValueError as error:
            LOGGER.info("invalid request: %s", error)
            reply(method.delivery_tag, props, "error", f"invalid request: {error}".encode())
            return
        if not args.quiet:
            print(f" [.] fib({n})", flush=True)
        if n < INLINE_N:
            finish(method.delivery_tag, props, functools.partial(answer, n))
            return
        # NOTE: longer work runs in another process so that this one goes on
        # answering heartbeats: a connection silent for two heartbeat intervals
        # is closed by the broker. Another thread is not enough: Decimal
        # arithmetic holds the GIL, for seconds at a time on a huge n.
        try:
            future = worker.submit(answer, n)
        except BrokenProcessPool:  # its process died (killed for memory, say)
            worker = new_worker()
            future = worker.submit(answer, n)
        future.add_done_callback(functools.partial(on_done, method.delivery_tag, props))

    def on_done(delivery_tag: int, props: pika.BasicProperties, future: Future[bytes]) -> None:
        try:
            # NOTE: pika is not thread-safe: the reply and the ack are handed
            # back to the connection's own thread.
            connection.add_callback_threadsafe(
                functools.partial(finish, delivery_tag, props, future.result)
            )
        except ConnectionWrongStateError:
            LOGGER.warning("connection lost before a reply; the broker redelivers the request")

    channel.basic_consume(queue=args.queue, on_message_callback=on_request)
    print(" [x] Awaiting RPC requests", flush=True)
    try:
        while not signals:  # channel.start_consuming(), but a signal can end it
            connection.process_data_events(time_limit=1)
        channel.stop_consuming()  # requests not yet handed to us go back to the queue
        while in_hand:
            connection.process_data_events(time_limit=1)
    finally:
        worker.shutdown(wait=False, cancel_futures=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Answer fib(n) requests from a RabbitMQ queue: the RPC server of tutorial 6.",
        epilog="Heartbeat, TLS and connection retry settings go in the URL's query string, "
        "e.g. amqp://guest:guest@localhost:5672/%2F?heartbeat=30&connection_attempts=5",
    )
    parser.add_argument(
        "--url",
        default=os.environ.get("AMQP_URL") or DEFAULT_URL,
        help="broker URL (default: $AMQP_URL, else amqp://guest:guest@localhost:5672/%%2F)",
    )
    parser.add_argument(
        "--queue", default="rpc_queue", help="queue to consume (default: %(default)s)"
    )
    parser.add_argument(
        "--prefetch",
        type=int,
        default=1,
        help="requests this server holds unacknowledged at once; 1 spreads slow calls fairly "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--max-n", type=int, default=MAX_N, help="largest n answered (default: %(default)s)"
    )
    volume = parser.add_mutually_exclusive_group()
    volume.add_argument("-q", "--quiet", action="store_true", help="print no [.] line per request")
    volume.add_argument(
        "-v", "--verbose", action="store_true", help="log debug detail, pika's included"
    )
    args = parser.parse_args(argv)
    if args.prefetch < 1 or args.max_n < 0:
        parser.error("--prefetch must be at least 1, and --max-n at least 0")
    return args


def describe(parameters: pika.URLParameters) -> str:
    """Where the broker is, without the credentials (URLs carry passwords)."""
    return f"{parameters.host}:{parameters.port}, vhost {parameters.virtual_host!r}"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        logging.getLogger("pika").setLevel(logging.CRITICAL)  # its errors are ours to report
    try:
        parameters = pika.URLParameters(args.url)
    except ValueError as error:
        print(f"rpc_server: invalid broker URL: {error}", file=sys.stderr)
        return 2
    # Named in the broker's list of connections, unless the URL names it.
    parameters.client_properties = {
        "connection_name": "rpc_server",
        **(parameters.client_properties or {}),
    }
    where = describe(parameters)
    # NOTE: the signals received, in a plain list: a signal handler that takes a lock
    # (as threading.Event.set does) can deadlock with the code it interrupts.
    signals: list[int] = []
    connection: pika.BlockingConnection | None = None

    def on_signal(signum: int, frame: object) -> None:
        LOGGER.info("%s: finishing the requests in hand, then exiting", signal.Signals(signum).name)
        signals.append(signum)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    pika.data.decode_value = decode_value  # a poison header must not cost the connection
    attempt = 0  # failed connection attempts in a row
    while not signals:
        try:
            connection = pika.BlockingConnection(parameters)
            LOGGER.info("connected to %s", where)
            attempt = 0
            serve(connection, args, signals)
        except AMQPChannelError as error:
            # Retrying cannot mend a queue declared otherwise, or a missing permission.
            print(f"rpc_server: the broker at {where} refused: {error!r}", file=sys.stderr)
            return 1
        except (AMQPConnectionError, OSError) as error:  # OSError: no such host
            # NOTE: pika reports a connection reset during the handshake (a broker
            # restarting) as an authentication error, so only the first connection
            # gives up: then the URL, user or password is most likely wrong.
            if connection is None:
                print(
                    f"rpc_server: cannot connect to the broker at {where}: {error!r}",
                    file=sys.stderr,
                )
                return 1
            # A lost connection, a broker restart: back off, capped, with jitter
            # so that a fleet of servers does not reconnect in step.
            delay = min(BACKOFF_CAP, 0.1 * 2**attempt) * random.uniform(0.5, 1)
            attempt += 1
            LOGGER.warning(
                "connection to %s lost (%r); reconnecting in %.1f s", where, error, delay
            )
            time.sleep(delay)
        finally:
            if connection is not None and connection.is_open:
                connection.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
