#!/usr/bin/env python
"""RPC client of RabbitMQ tutorial 6 ("Remote procedure call"), for pika 1.x.

FibonacciRpcClient sends n to rpc_queue with a reply_to queue and a fresh
correlation_id, then waits for the reply that carries the same correlation_id.
Beyond the tutorial, for production: a call never hangs (it times out, and the
request expires with it), fails fast when no server consumes the queue, raises
the server's error replies, drops stray replies, and survives a lost connection.

    with FibonacciRpcClient() as fibonacci_rpc:
        fibonacci_rpc.call(30)  # 832040
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
import uuid
from collections import deque
from collections.abc import Sequence

import pika
from pika.adapters.blocking_connection import BlockingChannel
from pika.exceptions import AMQPConnectionError, AMQPError, ChannelClosedByBroker
from pika.spec import Basic

LOGGER = logging.getLogger("rpc_client")

DEFAULT_URL = "amqp://guest:guest@localhost:5672/%2F"
DEFAULT_TIMEOUT = 10.0  # seconds
# NOTE: a reply that has not come this many seconds after its request makes the
# client ask the broker whether any server consumes the queue, so that a call
# with no server fails fast; replies that come sooner cost no such question.
CHECK_AFTER = 0.25


class RpcError(Exception):
    """The server answered with an error; the message is the server's."""


class RpcConnectionError(ConnectionError):
    """The broker could not be reached, or the connection was lost."""


class NoServerError(RpcConnectionError):
    """No server consumes the request queue."""


class RpcTimeoutError(TimeoutError):
    """No reply came before the call's timeout."""


def to_int(digits: bytes) -> int:
    """Return int(digits), also past Python's 4300-digit limit on int(str)."""
    if len(digits) <= 4000:
        return int(digits)
    # Halves, joined by one multiplication: fast where one int() is quadratic.
    half = len(digits) // 2
    return to_int(digits[:-half]) * 10**half + to_int(digits[-half:])


class FibonacciRpcClient:
    def __init__(
        self,
        url: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        queue: str = "rpc_queue",
        retries: int = 1,
    ) -> None:
        try:
            self.parameters = pika.URLParameters(url or os.environ.get("AMQP_URL") or DEFAULT_URL)
        except ValueError as error:
            raise ValueError(f"invalid broker URL: {error}") from None
        self.parameters.client_properties = {
            "connection_name": "rpc_client",  # shown in the broker's list of connections
            **(self.parameters.client_properties or {}),
        }
        self.timeout = timeout
        self.queue = queue
        self.retries = retries  # calls sent again after a lost connection; fib is idempotent
        # correlation_id -> (type, body) of its reply, or None while awaited
        self.responses: dict[str, tuple[str | None, bytes] | None] = {}
        self.connection: pika.BlockingConnection | None = None
        self.connect()

    def connect(self) -> None:
        self.close()
        try:
            self.connection = pika.BlockingConnection(self.parameters)
        except (AMQPConnectionError, OSError) as error:  # OSError: no such host
            raise RpcConnectionError(
                f"cannot connect to the broker at {self.where}: {error!r}"
            ) from None
        self.channel = self.connection.channel()
        # Server-named and exclusive: ours alone, and deleted when we disconnect.
        result = self.channel.queue_declare(queue="", exclusive=True)
        self.callback_queue = result.method.queue
        # NOTE: auto_ack: a reply is never redelivered to anyone else, as the
        # queue is exclusive to this connection.
        self.channel.basic_consume(
            queue=self.callback_queue, on_message_callback=self.on_response, auto_ack=True
        )

    @property
    def where(self) -> str:
        """The broker's address, without the credentials (URLs carry passwords)."""
        p = self.parameters
        return f"{p.host}:{p.port}, vhost {p.virtual_host!r}"

    def on_response(
        self, ch: BlockingChannel, method: Basic.Deliver, props: pika.BasicProperties, body: bytes
    ) -> None:
        if props.correlation_id in self.responses and self.responses[props.correlation_id] is None:
            self.responses[props.correlation_id] = (props.type, body)
        else:  # a late reply to a call that timed out, a duplicate, or not ours
            LOGGER.debug("dropped a reply with correlation_id %r", props.correlation_id)

    def call(self, n: int, timeout: float | None = None) -> int:
        """Return fib(n) as computed by a server.

        Raises RpcError when the server answers with an error, RpcTimeoutError when
        no reply comes within timeout seconds (default: the client's), NoServerError
        when no server consumes the queue, and RpcConnectionError when the broker is
        lost and sending again (retries) did not help.
        """
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        for attempt in range(self.retries + 1):
            try:
                if self.connection is None or not self.channel.is_open:
                    self.connect()
                self.corr_id = self.send(n, deadline)
                return self.result(*self.wait(self.corr_id, deadline))
            except AMQPConnectionError as error:
                self.connection = None  # the next attempt, or call, reconnects
                if attempt == self.retries:
                    raise RpcConnectionError(
                        f"connection to {self.where} lost: {error!r}"
                    ) from None
                LOGGER.warning("connection lost during a call (%r); sending again", error)
        raise AssertionError("unreachable")

    def call_many(
        self, ns: Sequence[int], window: int = 100, timeout: float | None = None
    ) -> list[int]:
        """Return [fib(n) for n in ns], with up to window requests in flight at once.

        Each request has call()'s timeout and raises as call() would; the first
        failure in the order of ns raises. A lost connection is not retried here.
        """
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        timeout = self.timeout if timeout is None else timeout
        if self.connection is None or not self.channel.is_open:
            self.connect()
        results: list[int] = []
        in_flight: deque[tuple[str, float]] = deque()  # (corr_id, deadline), oldest first
        try:
            for n in ns:
                deadline = time.monotonic() + timeout
                in_flight.append((self.send(n, deadline), deadline))
                if len(in_flight) == window:
                    results.append(self.result(*self.wait(*in_flight.popleft())))
            while in_flight:
                results.append(self.result(*self.wait(*in_flight.popleft())))
        except AMQPConnectionError as error:
            self.connection = None
            raise RpcConnectionError(f"connection to {self.where} lost: {error!r}") from None
        finally:
            for corr_id, _ in in_flight:  # their replies, if any come, are strays now
                self.responses.pop(corr_id, None)
        return results

    def send(self, n: int, deadline: float) -> str:
        """Publish a request for fib(n); return its correlation_id."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RpcTimeoutError(f"fib({n}): timed out before it was sent")
        corr_id = str(uuid.uuid4())
        self.channel.basic_publish(
            exchange="",
            routing_key=self.queue,
            properties=pika.BasicProperties(
                reply_to=self.callback_queue,
                correlation_id=corr_id,
                # The broker drops a request that no server took in time,
                # instead of a server computing it for nobody.
                expiration=str(math.ceil(remaining * 1000)),
            ),
            body=str(n),
        )
        self.responses[corr_id] = None
        return corr_id

    def wait(self, corr_id: str, deadline: float) -> tuple[str | None, bytes]:
        """Process events until corr_id's reply comes; return its type and body."""
        check_at = time.monotonic() + CHECK_AFTER
        try:
            while self.responses[corr_id] is None:
                now = time.monotonic()
                if now >= deadline:
                    raise RpcTimeoutError(f"no reply within the timeout from {self.queue!r}")
                if now >= check_at:
                    self.check_server()
                    check_at = deadline
                # Blocks until an event or the time limit: no busy loop.
                self.connection.process_data_events(time_limit=min(deadline, check_at) - now)
            return self.responses[corr_id]
        finally:
            del self.responses[corr_id]  # a late reply is a stray one now

    def check_server(self) -> None:
        """Raise NoServerError unless the queue exists and a server consumes it."""
        try:
            declared = self.channel.queue_declare(queue=self.queue, passive=True)
        except ChannelClosedByBroker as error:  # 404: no such queue
            self.close()  # the broker closed the channel: the next call reconnects
            raise NoServerError(
                f"no RPC server is consuming {self.queue!r}: {error.reply_text}"
            ) from None
        if declared.method.consumer_count == 0:
            raise NoServerError(f"no RPC server is consuming {self.queue!r}")

    @staticmethod
    def result(kind: str | None, body: bytes) -> int:
        if kind == "error":
            raise RpcError(body.decode("utf-8", errors="replace"))
        try:
            return to_int(body)
        except ValueError:
            raise RpcError(f"reply is not an integer: {body[:40]!r}") from None

    def close(self) -> None:
        if self.connection is not None and self.connection.is_open:
            self.connection.close()
        self.connection = None

    def __enter__(self) -> FibonacciRpcClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Request fib(n) from the RPC server of tutorial 6 and print the answers.",
        epilog="Heartbeat, TLS and connection retry settings go in the URL's query string, "
        "e.g. amqp://guest:guest@localhost:5672/%2F?heartbeat=30&connection_attempts=5",
    )
    parser.add_argument("n", nargs="*", type=int, default=[30], help="n to request (default: 30)")
    parser.add_argument(
        "--url",
        default=os.environ.get("AMQP_URL") or DEFAULT_URL,
        help="broker URL (default: $AMQP_URL, else amqp://guest:guest@localhost:5672/%%2F)",
    )
    parser.add_argument("--queue", default="rpc_queue", help="request queue (default: %(default)s)")
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        help="seconds to wait for each reply (default: %(default)s)",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log debug detail, pika's included"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        logging.getLogger("pika").setLevel(logging.CRITICAL)  # its errors are ours to report
    if hasattr(sys, "set_int_max_str_digits"):
        sys.set_int_max_str_digits(0)  # print results past 4300 digits too
    try:
        with FibonacciRpcClient(args.url, args.timeout, args.queue) as fibonacci_rpc:
            for n in args.n:
                print(f" [x] Requesting fib({n})", flush=True)
                response = fibonacci_rpc.call(n)
                print(f" [.] Got {response}", flush=True)
    except (RpcError, ConnectionError, TimeoutError, ValueError, AMQPError) as error:
        print(f"rpc_client: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
