#!/usr/bin/env python
"""RPC server of RabbitMQ tutorial 6 ("Remote procedure call"), for pika 1.x: it consumes
rpc_queue and publishes fib(n) to each request's reply_to with its correlation_id. Beyond the
tutorial, for production: bad requests get an error reply, n is bounded, long work runs in a
thread, a request is acked once the broker confirms its reply, a lost node is replaced, and
SIGINT/SIGTERM finish the requests in hand."""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import logging
import os
import random
import re
import signal
import sys
import threading
import time
from collections.abc import Sequence
from urllib.parse import unquote

import pika
from pika.adapters.blocking_connection import BlockingChannel
from pika.exceptions import AMQPChannelError, AMQPConnectionError, ChannelClosedByBroker
from pika.spec import Basic

from rpc_client import DEFAULT_URL, LOG_FORMAT, URL_HELP, broker_parameters, close, connect

LOGGER = logging.getLogger("rpc_server")

# NOTE: as the official tutorials now declare it (durable, quorum), so that theirs and ours
# share it; a queue declared with other arguments fails with PRECONDITION_FAILED.
QUEUE_ARGUMENTS = {"x-queue-type": "quorum"}
MAX_N = 20_000  # fib(20000): 4180 digits, within the 4300 Python converts by default; ms
# seconds between reconnections, at most; a connection lost older than this: at once
BACKOFF_CAP = 5.0


def fib(n: int) -> int:
    """The tutorial's fib(n), as a loop: its recursion takes exponential time."""
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


def parse_request(body: bytes, max_n: int) -> int:
    """Return n from a request body; raise ValueError saying what is wrong."""
    text = body.decode("utf-8", errors="replace").strip()
    # The length first: a huge body is never parsed; isascii: int() takes "+5", "1_0", "٣".
    if not (
        len(text) <= len(str(max_n)) and text.isascii() and text.isdigit() and int(text) <= max_n
    ):
        shown = text if len(text) <= 20 else text[:20] + "..."
        raise ValueError(f"n must be an integer from 0 to {max_n}, got {shown!r}")
    return int(text)


def reply_queue(reply_to: str | bytes) -> str | bytes:
    """NAME from an AMQP 1.0 address /queues/NAME (percent-encoded), as RabbitMQ 4.0 hands
    it on from an AMQP 1.0 requester; else reply_to. NOTE: not /exchanges/...: a reply to
    an exchange that does not exist would cost us the channel, at each delivery."""
    match = re.fullmatch("/queues/([^/]+)", str(reply_to))  # bytes, if not UTF-8: no match
    return unquote(match.group(1)) if match else reply_to


def answer(n: int) -> tuple[str | None, bytes]:
    """The reply's type and body for fib(n)."""
    try:
        return None, str(fib(n)).encode()
    except Exception as error:  # one request's failure must not stop the server
        LOGGER.exception("fib(%d) failed", n)
        return "error", f"server error: {type(error).__name__}".encode()


def open_queue(connection: pika.BlockingConnection, queue: str) -> BlockingChannel:
    """A channel on which queue exists, declared by us or, failing that, by an operator."""
    channel = connection.channel()
    try:
        channel.queue_declare(queue=queue, durable=True, arguments=QUEUE_ARGUMENTS)
        return channel
    except ChannelClosedByBroker as error:
        if error.reply_code != 403:  # ACCESS_REFUSED: this account may not configure it
            raise
    channel = connection.channel()
    try:
        channel.queue_declare(queue=queue, passive=True)  # NOT_FOUND if no one declared it
    except ChannelClosedByBroker as error:  # both reasons, or the operator learns one
        text = f"{error.reply_text}, and this account may not declare it"
        raise ChannelClosedByBroker(error.reply_code, text) from None
    LOGGER.info("this account may not declare %r; using it as declared", queue)
    return channel


def serve(
    connection: pika.BlockingConnection, args: argparse.Namespace, signals: list[int]
) -> None:
    """Answer requests until a signal comes or the broker cancels our consumer."""
    channel = open_queue(connection, args.queue)
    channel.basic_qos(prefetch_count=args.prefetch)
    in_hand: set[int] = set()  # delivery tags of requests not yet acked
    # NOTE: a request is acked once the broker confirms its reply: a server whose node dies
    # between the two leaves it to be redelivered. Confirms are taken as they come, on the
    # channel underneath: BlockingChannel.confirm_delivery() makes each publish wait.
    pika_channel = channel._impl
    unconfirmed: dict[int, tuple[int, str | None]] = {}  # reply's number -> request's tag, id
    numbers = itertools.count(1)  # the broker numbers a channel's publishes from 1
    cancelled: list[object] = []
    channel.add_on_cancel_callback(cancelled.append)  # queue deleted, consumer timeout

    def on_confirm(frame: pika.frame.Method) -> None:  # in pika's I/O loop: no blocking calls
        confirm, last = frame.method, frame.method.delivery_tag
        for number in [n for n in unconfirmed if n <= last] if confirm.multiple else [last]:
            delivery_tag, corr_id = unconfirmed.pop(number)
            in_hand.discard(delivery_tag)
            if isinstance(confirm, Basic.Ack):
                pika_channel.basic_ack(delivery_tag)
                continue
            # NOTE: dropped, not requeued: sent again, it would be refused again (a full queue)
            LOGGER.warning("the broker refused the reply to %r; its request is dropped", corr_id)
            pika_channel.basic_nack(delivery_tag, requeue=False)

    pika_channel.confirm_delivery(ack_nack_callback=on_confirm)

    def reply(
        delivery_tag: int, props: pika.BasicProperties, kind: str | None, body: bytes
    ) -> None:
        # NOTE: AMQP 1.0 requesters (RabbitMQ 4's Requester) send only a message_id.
        corr_id = props.correlation_id or props.message_id
        properties = pika.BasicProperties(correlation_id=corr_id, type=kind)
        # Only queued here, sent by the I/O loop: its confirm cannot come before it is recorded.
        pika_channel.basic_publish("", reply_queue(props.reply_to), body, properties)
        unconfirmed[next(numbers)] = (delivery_tag, corr_id)

    def work(delivery_tag: int, props: pika.BasicProperties, n: int) -> None:
        # NOTE: pika is not thread-safe: the reply is handed back to the connection's thread.
        done = functools.partial(reply, delivery_tag, props, *answer(n))
        try:
            connection.add_callback_threadsafe(done)
        except AMQPConnectionError:  # lost meanwhile: the request is redelivered
            LOGGER.info("fib(%d) finished on a lost connection; another will answer it", n)

    def on_request(
        ch: BlockingChannel, method: Basic.Deliver, props: pika.BasicProperties, body: bytes
    ) -> None:
        if not props.reply_to:
            LOGGER.warning("dropped a request with no reply_to: %r", props.correlation_id)
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
        if n <= MAX_N:  # milliseconds of work: a thread would cost a quarter of the rate
            reply(method.delivery_tag, props, *answer(n))
            return
        # NOTE: longer work (a raised --max-n) runs in a thread, as in pika's threaded consumer
        # example, so that heartbeats flow: the broker closes a connection silent for two.
        threading.Thread(target=work, args=(method.delivery_tag, props, n), daemon=True).start()

    # NOTE: a channel the broker closes says so only at its next blocking call: asked here.
    pika_channel.add_on_close_callback(lambda _, reason: cancelled.append(reason))
    with contextlib.suppress(ChannelClosedByBroker):  # the reason is in cancelled
        channel.basic_consume(queue=args.queue, on_message_callback=on_request)
        print(" [x] Awaiting RPC requests", flush=True)
    look_at = time.monotonic() + 5
    while not signals and not cancelled:  # channel.start_consuming(), but these end it
        connection.process_data_events(time_limit=1)
        if time.monotonic() > look_at:  # NOTE: a cluster may lose the queue and not cancel us
            look_at = time.monotonic() + 5
            try:
                with connection.channel() as look:
                    # NOTE: a node cut off from its cluster (4.x) counts no consumer, not even us.
                    if not look.queue_declare(queue=args.queue, passive=True).method.consumer_count:
                        raise AMQPConnectionError("our node sees no consumer of ours: cut off?")
            except ChannelClosedByBroker as error:  # NOT_FOUND: our consumer is gone with it
                cancelled.append(error)
    # NOTE: NOT_FOUND: the queue deleted again as we declared it, as a cluster may; any other
    # reason (ACCESS_REFUSED to a reply, say) is a verdict that retrying cannot change.
    if not channel.is_open and getattr(cancelled[-1], "reply_code", None) != 404:
        raise cancelled[-1]
    if cancelled:
        why = getattr(cancelled[-1], "reply_text", "the broker cancelled it")  # else NOT_FOUND
        LOGGER.warning("our consumer was cancelled (%s); declaring the queue again", why)
    else:
        channel.stop_consuming()  # requests not yet handed to us go back to the queue
    while in_hand and channel.is_open:  # the replies' confirms too
        connection.process_data_events(time_limit=1)
    if channel.is_open:
        channel.close()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Answer fib(n) requests from a RabbitMQ queue: the RPC server of tutorial 6.",
    )
    parser.add_argument("--url", default=os.environ.get("AMQP_URL") or DEFAULT_URL, help=URL_HELP)
    parser.add_argument("--queue", default="rpc_queue", help="request queue (default: %(default)s)")
    parser.add_argument(
        "--prefetch",
        type=int,
        default=1,
        help="requests held unacknowledged at once; 1 spreads slow calls fairly (default: 1)",
    )
    parser.add_argument("--max-n", type=int, default=MAX_N, help="largest n (default: %(default)s)")
    volume = parser.add_mutually_exclusive_group()
    volume.add_argument("-q", "--quiet", action="store_true", help="print no [.] line per request")
    volume.add_argument("-v", "--verbose", action="store_true", help="log debug detail, pika's too")
    args = parser.parse_args(argv)
    if not 1 <= args.prefetch <= 65535:  # AMQP carries it in 16 bits
        parser.error(f"--prefetch must be from 1 to 65535, got {args.prefetch}")
    if len(args.queue.encode()) > 255:  # AMQP carries it in a short string
        parser.error(f"--queue must be at most 255 bytes, got {len(args.queue.encode())}")
    if args.max_n < 0:
        parser.error(f"--max-n must be at least 0, got {args.max_n}")
    try:
        args.nodes = broker_parameters(args.url, "rpc_server")
    except ValueError as error:
        parser.error(str(error))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    # NOTE: the signals received, in a plain list: a signal handler that takes a lock
    # (as threading.Event.set does) can deadlock with the code it interrupts.
    signals: list[int] = []

    def on_signal(signum: int, frame: object) -> None:
        LOGGER.info("%s: finishing the request in hand, then exiting", signal.Signals(signum).name)
        signals.append(signum)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    args = parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.INFO
    logging.basicConfig(level=level, format=LOG_FORMAT)
    if not args.verbose:
        logging.getLogger("pika").setLevel(logging.CRITICAL)  # its errors are ours to report
    sys.set_int_max_str_digits(0)  # a raised --max-n answers past 4300 digits
    connected_at: float | None = None  # when the last connection was made
    failures = 0  # connections refused, or lost soon after they were made, in a row
    while not signals:
        # Back off, capped, with jitter so that a fleet of servers does not reconnect
        # in step; a signal ends the wait.
        delay = failures and min(BACKOFF_CAP, 0.1 * 2 ** (failures - 1)) * random.uniform(0.5, 1)
        if delay:
            LOGGER.warning("reconnecting in %.1f s", delay)
        until = time.monotonic() + delay
        while not signals and time.monotonic() < until:
            time.sleep(0.05)
        try:
            connection = connect(args.nodes)
        except ConnectionError as error:
            if connected_at is None:  # the URL, user or password is most likely wrong
                print(f"rpc_server: {error}", file=sys.stderr)
                return 1
            LOGGER.warning("%s", error)
            failures += 1
            continue
        connected_at = time.monotonic()
        LOGGER.info("connected to %s:%s", args.nodes[-1].host, args.nodes[-1].port)  # moved last
        try:
            while not signals:
                serve(connection, args, signals)
        except AMQPChannelError as error:
            # Retrying cannot mend a queue declared otherwise, or a missing permission.
            print(f"rpc_server: the broker refused: {error!r}", file=sys.stderr)
            return 1
        except AMQPConnectionError as error:
            # NOTE: after a node that served a while, the next is tried at once; a connection
            # lost soon after it was made (a message pika cannot decode, say) backs off.
            soon = time.monotonic() - connected_at < BACKOFF_CAP
            failures = failures + 1 if soon else 0
            LOGGER.warning("connection lost (%r)", error)
        finally:
            close(connection)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
