#!/usr/bin/env python
"""RPC client of RabbitMQ tutorial 6 ("Remote procedure call"), for pika 1.x.

FibonacciRpcClient sends n to rpc_queue with a reply_to queue and a fresh correlation_id,
then waits for the reply with the same correlation_id. Beyond the tutorial, for production:
a call never hangs, fails fast when no server consumes the queue, raises the server's error
replies, and is not lost with a broker node. Usage: FibonacciRpcClient().call(30) == 832040
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import random
import re
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pika
from pika.exceptions import AMQPChannelError, AMQPConnectionError, NackError
from pika.spec import Basic

LOGGER = logging.getLogger("rpc_client")

DEFAULT_URL = "amqp://guest:guest@localhost:5672/%2F"
DEFAULT_TIMEOUT = 10.0  # seconds
MAX_TIMEOUT = 315_360_000  # seconds, ten years: the longest expiration RabbitMQ takes
# NOTE: while a reply is late, the client asks every CHECK_EVERY s whether a server consumes the
# queue; none for NO_SERVER_AFTER s (servers that lose a node come back): the next node, or none.
CHECK_EVERY, NO_SERVER_AFTER = 0.25, 1.25
BLOCKED_TIMEOUT = 30.0  # seconds a resource alarm may block the server (a client: its timeout)
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"  # both scripts'
URL_HELP = (  # both scripts'
    "broker URL, or several separated by commas for a cluster (default: $AMQP_URL, else "
    "localhost); heartbeat, TLS and retry settings go in its query string, e.g. ?heartbeat=30"
)


class RpcError(Exception):
    """The server answered with an error; the message is the server's."""


class RpcConnectionError(ConnectionError):
    """The broker could not be reached, or the connection was lost."""


class NoServerError(RpcConnectionError):
    """No server consumes the request queue."""


class RpcTimeoutError(TimeoutError):
    """No reply came before the call's timeout."""


def broker_parameters(
    urls: str, name: str, blocked: float = BLOCKED_TIMEOUT
) -> list[pika.URLParameters]:
    """Parameters for each node of a comma-separated list of URLs, in random order."""
    nodes = []
    for url in re.split(r",(?=amqps?://)", urls.strip()):  # a comma in a query stays
        if not url.startswith(("amqp://", "amqps://")):
            raise ValueError("invalid broker URL: it must start with amqp:// or amqps://")
        try:  # ssl_options in the query is evaluated, and its files read, here
            node = pika.URLParameters(url)
            node.host.encode("idna")  # as the socket will need it: "a..b" is no host
        except (ValueError, TypeError, SyntaxError, OSError) as error:
            raise ValueError(f"invalid broker URL: {error}") from None
        # NOTE: pika waits without a bound on a connection that a broker in a resource alarm
        # blocks, unless given a timeout. Named in the broker's list, unless the URL names it.
        node.blocked_connection_timeout = node.blocked_connection_timeout or blocked
        node.client_properties = {"connection_name": name, **(node.client_properties or {})}
        nodes.append(node)
    random.shuffle(nodes)  # a fleet of processes spreads over the cluster's nodes
    return nodes


def connect(nodes: list[pika.URLParameters], setup: Callable = bool) -> pika.BlockingConnection:
    """A connection to the first node that answers and takes setup() (bool: none), moved last."""
    errors = []  # where each node is, without the credentials (URLs carry passwords)
    for _ in nodes:
        nodes.append(node := nodes.pop(0))  # the next connect starts after it: a lost node last
        try:
            # NOTE: a node cut off from its cluster may refuse a queue_declare (541 INTERNAL_ERROR).
            setup(connection := pika.BlockingConnection(node))
            return connection
        except (AMQPConnectionError, OSError) as error:  # OSError: no such host
            errors.append(f"{node.host}:{node.port}: {error!r}")
    raise RpcConnectionError("cannot connect to the broker at " + "; ".join(errors))


def close(connection: pika.BlockingConnection | None) -> None:
    """Close connection; wait 2 s at most (a cut-off node may hold it until the heal)."""

    def run() -> None:
        with contextlib.suppress(AMQPConnectionError):  # NOTE: pika's loop is per connection
            if connection is not None and connection.is_open:
                connection.close()

    (closer := threading.Thread(target=run, daemon=True)).start()
    closer.join(2.0)


def checked_timeout(timeout: float) -> float:
    """timeout, if a request can expire after it; raise ValueError otherwise."""
    if not 0 < timeout <= MAX_TIMEOUT:  # nan is neither
        raise ValueError(f"timeout must be a positive number of seconds, to ten years: {timeout}")
    return timeout


@dataclass
class Request:  # one n of a call
    n: int
    deadline: float
    corr_id: str = ""  # of its latest publish, set before it: "" (never sent) costs no retry


class FibonacciRpcClient(contextlib.AbstractContextManager):
    def __init__(
        self,
        url: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        queue: str = "rpc_queue",
        retries: int = 1,
    ) -> None:
        self.timeout = checked_timeout(timeout)
        # A connection blocked by a resource alarm is dropped when a call would time out.
        url = url or os.environ.get("AMQP_URL") or DEFAULT_URL
        self.nodes = broker_parameters(url, "rpc_client", blocked=timeout)
        if len(queue.encode()) > 255:  # AMQP carries it in a short string
            raise ValueError(f"queue must be at most 255 bytes, got {len(queue.encode())}")
        self.queue = queue
        self.retries = retries  # calls sent again after a lost connection; fib is idempotent
        self.lock = threading.Lock()  # NOTE: pika is not thread-safe: threads sharing us take turns
        # correlation_id -> (type, body) of its reply, or None while awaited
        self.responses: dict[str, tuple[str | None, bytes] | None] = {}
        self.connection: pika.BlockingConnection | None = None
        self.connect()

    def connect(self) -> None:
        self.close()
        self.connection = connect(self.nodes, self.open_channel)

    def open_channel(self, connection: pika.BlockingConnection) -> None:
        self.blocked: str | None = None  # the broker's reason while a resource alarm blocks us
        connection.add_on_connection_blocked_callback(self.on_blocked)
        connection.add_on_connection_unblocked_callback(self.on_blocked)
        self.channel = connection.channel()
        # NOTE: publisher confirms, for the nack of a request the broker did not take, on the
        # channel underneath: BlockingChannel.confirm_delivery() would wait for each in turn.
        self.channel._impl.confirm_delivery(ack_nack_callback=self.on_confirm)
        self.nacked, self.broken = False, None  # broken: why the broker cancelled us, or closed
        self.channel.add_on_return_callback(self.on_response)  # mandatory requests no queue took
        # Server-named and exclusive: ours alone, and deleted when we disconnect.
        self.callback_queue = self.channel.queue_declare(queue="", exclusive=True).method.queue
        # NOTE: auto_ack: a reply has no one else to be redelivered to; the queue is ours alone.
        self.channel.basic_consume(self.callback_queue, self.on_response, auto_ack=True)
        # NOTE: a deleted callback queue cancels our consumer: the calls in flight go again.
        self.channel.add_on_cancel_callback(self.on_cancel)
        # On the channel underneath: BlockingChannel does not say why the broker closed it.
        self.channel._impl.add_on_close_callback(self.on_channel_closed)

    def on_blocked(self, connection: object, frame: pika.frame.Method) -> None:
        self.blocked = getattr(frame.method, "reason", None)  # Unblocked has none

    def on_cancel(self, frame: pika.frame.Method) -> None:
        self.broken = AMQPConnectionError("the broker cancelled the consumer of our callback queue")

    def on_channel_closed(self, channel: object, reason: Exception) -> None:
        self.broken = reason  # NOT_FOUND for wait()'s question, say

    def on_consumer_count(self, frame: pika.frame.Method) -> None:  # wait()'s answer
        count = frame.method.consumer_count
        self.no_server_since = None if count else self.no_server_since or time.monotonic()

    def on_confirm(self, frame: pika.frame.Method) -> None:
        self.nacked = self.nacked or isinstance(frame.method, Basic.Nack)

    def on_response(
        self, ch: object, method: Basic.Deliver, props: pika.BasicProperties, body: bytes
    ) -> None:
        if props.correlation_id in self.responses and self.responses[props.correlation_id] is None:
            kind = "returned" if isinstance(method, Basic.Return) else props.type
            self.responses[props.correlation_id] = (kind, body)
        else:  # a late reply to a call that timed out, a duplicate, or not ours
            LOGGER.debug("dropped a reply with correlation_id %r", props.correlation_id)

    def call(self, n: int, timeout: float | None = None) -> int:
        """fib(n) from a server; raises RpcError, RpcTimeoutError or RpcConnectionError."""
        return self.call_many([n], window=1, timeout=timeout)[0]

    def call_many(
        self, ns: Sequence[int], window: int = 100, timeout: float | None = None
    ) -> list[int]:
        """[fib(n) for n in ns], window requests in flight at once; raises as call() would."""
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        timeout = checked_timeout(self.timeout if timeout is None else timeout)
        done: list[tuple[int, int]] = []  # (n, fib(n)) in the order of ns
        todo = deque(ns)
        in_flight: deque[Request] = deque()  # oldest first
        attempt, again = 0, False
        with self.lock:
            self.refused = False  # until the broker refuses (nacks) a request of this call
            try:
                self.reconnect_if_closed()
                while todo or in_flight:
                    try:
                        if again:  # on a new connection, the requests in flight
                            self.connect()
                            again = False
                            for request in in_flight:
                                self.send(request)
                        while todo and len(in_flight) < window:
                            # NOTE: in flight before it is published: a publish that raises
                            # leaves it to be sent again, never lost.
                            in_flight.append(Request(todo.popleft(), time.monotonic() + timeout))
                            self.send(in_flight[-1])
                        done.append((in_flight[0].n, self.wait(in_flight[0])))
                        in_flight.popleft()
                    # NOTE: a lost connection took its callback queue; a cut-off node sees no
                    # server; a nack is a request the broker did not take (a channel opened as the
                    # leader died refuses all, a full queue some). Those in flight go again, on the
                    # next node; retries bounds resends of what may have run: retries=0, none twice.
                    except (AMQPConnectionError, NoServerError) as error:
                        attempt += any(request.corr_id for request in in_flight)
                        lost = isinstance(error, AMQPConnectionError)
                        if not lost and (attempt > self.retries or len(self.nodes) < 2):
                            raise
                        if attempt > self.retries:
                            raise RpcConnectionError(f"connection lost: {error!r}") from None
                        again = True
                        what = "connection lost" if lost else "no server seen through this node"
                        LOGGER.warning("%s during a call (%r); sending again", what, error)
                    except NackError:
                        if not self.retries and len(in_flight) > 1:  # others may have been taken
                            raise RpcConnectionError("the broker refused a request") from None
                        again = self.refused = True
                        LOGGER.warning("the broker refused a request; sending again")
            finally:
                self.responses.clear()  # replies still to come are strays now
        # NOTE: one answer per n, in the order of ns, or none: never a shifted list.
        if [n for n, _ in done] != list(ns):
            raise RuntimeError(f"call_many answered {len(done)} of {len(ns)} requests out of order")
        return [answer for _, answer in done]

    def reconnect_if_closed(self) -> None:
        """Reconnect, costing no retry, if the broker closed the connection while idle."""
        with contextlib.suppress(AMQPConnectionError):
            if self.connection is not None and self.channel.is_open:
                self.connection.process_data_events(0)  # learns of a close, or a cancel
                if not self.broken:
                    return
        self.connect()

    def send(self, request: Request) -> None:
        if not self.channel.is_open:  # closed by what wait() processed: nothing is sent
            raise AMQPConnectionError("the channel closed before the request was sent")
        request.corr_id = corr_id = str(uuid.uuid4())
        # expiration: a request no server took in time is dropped, not computed for nobody.
        ttl = str(max(1, math.ceil((request.deadline - time.monotonic()) * 1000)))
        # message_id too: AMQP 1.0 responders reply with it as the correlation id.
        properties = pika.BasicProperties(
            reply_to=self.callback_queue, correlation_id=corr_id, message_id=corr_id, expiration=ttl
        )
        self.responses[corr_id] = None
        self.channel.basic_publish("", self.queue, str(request.n), properties, mandatory=True)

    def wait(self, request: Request) -> int:
        """Process events until request's reply comes; return its answer, or raise."""
        check_at = time.monotonic() + CHECK_EVERY
        self.no_server_since: float | None = None
        while self.responses[request.corr_id] is None:
            now = time.monotonic()
            if now >= request.deadline:
                why = f"; the broker blocks this connection: {self.blocked}" if self.blocked else ""
                why += "; the broker refused it (is the queue full?)" if self.refused else ""
                raise RpcTimeoutError(f"no reply from {self.queue!r} within the timeout{why}")
            if self.nacked:
                raise NackError([])
            if self.broken:  # the broker cancelled our consumer, or closed the channel
                if getattr(self.broken, "reply_code", None) == 404:
                    raise NoServerError(f"no queue {self.queue!r}, so no RPC server consumes it")
                raise self.broken
            # NOTE: no question to a broker that blocks us: it would not answer.
            if now >= check_at and not self.blocked:
                check_at = now + CHECK_EVERY
                if self.no_server_since and now - self.no_server_since >= NO_SERVER_AFTER:
                    raise NoServerError(f"no RPC server is consuming {self.queue!r}")
                # NOTE: asked on the channel underneath, as BlockingChannel.queue_declare would
                # wait for the answer, past the timeout if the network to the broker went silent.
                self.channel._impl.queue_declare(
                    self.queue, passive=True, callback=self.on_consumer_count
                )
            # Blocks until an event or the time limit: no busy loop.
            limit = request.deadline if self.blocked else min(request.deadline, check_at)
            self.connection.process_data_events(time_limit=limit - now)
        kind, body = self.responses[request.corr_id]
        if kind == "returned":
            raise NoServerError(f"no queue {self.queue!r}, so no RPC server consumes it")
        if kind == "error":
            raise RpcError(body.decode("utf-8", errors="replace"))
        try:
            return int(body)
        except ValueError as error:
            raise RpcError(f"cannot read the reply: {error}") from None

    def close(self) -> None:
        close(self.connection)  # one an alarm blocks is dropped by its blocked timeout
        self.connection = None

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Request fib(n) from the tutorial 6 RPC server.")
    parser.add_argument("n", nargs="*", type=int, default=[30], help="n to request (default: 30)")
    parser.add_argument("--url", default=os.environ.get("AMQP_URL") or DEFAULT_URL, help=URL_HELP)
    parser.add_argument("--queue", default="rpc_queue", help="request queue (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds per reply")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug detail, pika's too")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format=LOG_FORMAT)
    if not args.verbose:
        logging.getLogger("pika").setLevel(logging.CRITICAL)  # its errors are ours to report
    try:
        with FibonacciRpcClient(args.url, args.timeout, args.queue) as fibonacci_rpc:
            for n in args.n:
                print(f" [x] Requesting fib({n})", flush=True)
                response = fibonacci_rpc.call(n)
                print(f" [.] Got {response}", flush=True)
    except ValueError as error:  # the URL, the timeout or the queue
        parser.error(str(error))
    # AMQPChannelError: the broker refused something, a permission this account lacks, say.
    except (RpcError, ConnectionError, TimeoutError, AMQPChannelError) as error:
        print(f"rpc_client: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
