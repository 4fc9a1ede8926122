"""Request/reply over RabbitMQ with pika 1.x: the machinery under rpc_server.py and rpc_client.py.

RpcServer answers each request on a queue with handler(body), the reply's body; RpcClient
sends a body and returns its reply's body. Each class opens with the steps of RabbitMQ's
tutorial 6, in its order; what production needs follows the step it guards, with its
reason. Bodies are bytes: what they mean is the application's.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import random
import re
import signal
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import unquote

import pika
import pika.channel
from pika.adapters.blocking_connection import BlockingChannel
from pika.exceptions import AMQPConnectionError, ChannelClosedByBroker
from pika.spec import Basic

import amqp_tracing

LOGGER = logging.getLogger("amqp_rpc")

DEFAULT_URL = "amqp://guest:guest@localhost:5672/%2F"
URL_HELP = (
    "broker URL, or several separated by commas for a cluster (default: $AMQP_URL, else "
    "localhost); heartbeat, TLS and retry settings go in its query string, e.g. ?heartbeat=30"
)
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# NOTE: as the official tutorials now declare it (durable, quorum), so that theirs and ours
# share it; a queue declared with other arguments fails with PRECONDITION_FAILED.
QUEUE_ARGUMENTS = {"x-queue-type": "quorum"}
DEFAULT_TIMEOUT = 10.0  # seconds a call waits for its reply
MAX_TIMEOUT = 315_360_000  # seconds, ten years: the longest expiration RabbitMQ takes
# NOTE: while a reply is late, the client asks every CHECK_EVERY s whether a server consumes the
# queue; none for NO_SERVER_AFTER s (servers that lose a node come back): the next node, or none.
CHECK_EVERY, NO_SERVER_AFTER = 0.25, 1.25
BLOCKED_TIMEOUT = 30.0  # seconds a resource alarm may block the server (a client: its timeout)
BACKOFF_CAP = 5.0  # seconds between reconnections, at most; after a long-lived one: at once
LOOK_EVERY = 5.0  # seconds between the server's looks at its queue


class RpcError(Exception):
    """The server answered with an error; the message is the server's."""


class RpcConnectionError(ConnectionError):
    """The broker could not be reached, or the connection was lost."""


class NoServerError(RpcConnectionError):
    """No server consumes the request queue."""


class RpcTimeoutError(TimeoutError):
    """No reply came before the call's timeout."""


class ConnectionLost(RpcConnectionError):
    """What a connection held is gone (our consumer, our channel): another connection may serve."""


class Refused(Exception):
    """The broker refused (nacked) a request of a call: it was not taken."""


@dataclass
class Delivery:  # a request in hand, and the connection and channel it came on
    connection: pika.BlockingConnection
    channel: pika.channel.Channel
    tag: int
    props: pika.BasicProperties
    span: object = None  # its OpenTelemetry span, when tracing (amqp_tracing)

    def __str__(self) -> str:
        return f"the request {self.props.correlation_id or self.props.message_id!r}"


class RpcServer:
    """Answers each request on queue with handler(body), the reply's body.

    A ValueError from handler makes the error reply "invalid request: <its message>"; any
    other exception is logged, and makes "server error: <its type>". handler runs in worker
    threads, prefetch of them at most, unless threaded=False. run() serves until SIGINT or
    SIGTERM, and finishes the requests in hand first.
    """

    def __init__(
        self,
        handler: Callable[[bytes], bytes],
        url: str | None = None,
        queue: str = "rpc_queue",
        prefetch: int = 1,
        threaded: bool = True,
        on_ready: Callable[[], object] = lambda: None,
    ) -> None:
        if not 1 <= prefetch <= 65535:  # AMQP carries it in 16 bits
            raise ValueError(f"prefetch must be from 1 to 65535, got {prefetch}")
        self.handler = handler
        self.nodes = broker_parameters(url or default_url(), "rpc_server")
        self.queue = checked_queue(queue)
        self.prefetch = prefetch
        self.on_ready = on_ready  # called each time the server consumes, after a reconnect too
        # NOTE: the handler runs in a worker thread, as in pika's threaded consumer example, so
        # that heartbeats flow while it works: the broker closes a connection silent for two.
        # threaded=False runs it in the connection's thread: for handlers that take milliseconds,
        # as two thread switches a request cost about a tenth of the rate.
        self.threaded = threaded
        self.workers = ThreadPoolExecutor(max_workers=prefetch, thread_name_prefix="rpc_handler")
        # NOTE: a plain list: a signal handler that takes a lock (Event.set) can deadlock.
        self.signals: list[int] = []
        self.connection: pika.BlockingConnection | None = None
        self.channel: BlockingChannel | None = None
        self.pika_channel: pika.channel.Channel | None = None  # the same, underneath()
        self.in_hand: set[int] = set()  # delivery tags of requests not yet acked
        self.unconfirmed: dict[int, tuple[int, str | None]] = {}  # reply's number -> tag, id
        self.published = 0  # replies published on this channel: the broker numbers them so
        self.cancelled: str | None = None  # why the broker cancelled our consumer
        self.closed: Exception | None = None  # why the broker closed our channel

    def run(self) -> None:
        """The tutorial's connection, then serve(); on a lost connection, the next node.

        Raises RpcConnectionError if no node takes the first connection, and the broker's
        AMQPChannelError for what retrying cannot change (a queue declared otherwise, say).
        """
        self.catch_signals()
        connected_at: float | None = None  # when the last connection was made
        failures = 0  # connections refused, or lost soon after they were made, in a row
        while not self.signals:
            self.back_off(failures)
            try:
                self.connection = open_connection(self.nodes)
            except RpcConnectionError as error:
                if connected_at is None:  # the URL, user or password is most likely wrong
                    raise
                LOGGER.warning("%s", error)
                failures += 1
                continue
            connected_at = time.monotonic()
            LOGGER.info("connected to %s:%s", self.nodes[-1].host, self.nodes[-1].port)
            try:
                while not self.signals:
                    self.serve()
            except (AMQPConnectionError, ConnectionLost) as error:
                # NOTE: after a node that served a while, the next is tried at once; a connection
                # lost soon after it was made (a message pika cannot decode, say) backs off.
                soon = time.monotonic() - connected_at < BACKOFF_CAP
                failures = failures + 1 if soon else 0
                LOGGER.warning("connection lost (%r)", error)
            finally:
                close_quietly(self.connection)

    def serve(self) -> None:
        """The tutorial's channel, queue_declare, basic_qos and basic_consume; then requests
        are answered until a signal, or until the broker cancels our consumer."""
        self.channel = self.open_queue()
        self.channel.basic_qos(prefetch_count=self.prefetch)
        self.watch()
        with contextlib.suppress(ChannelClosedByBroker):  # the reason is in self.closed
            self.channel.basic_consume(queue=self.queue, on_message_callback=self.on_request)
            self.on_ready()
        self.consume()
        self.finish()

    def on_request(
        self, ch: BlockingChannel, method: Basic.Deliver, props: pika.BasicProperties, body: bytes
    ) -> None:
        if not props.reply_to:  # nowhere to answer: acked, never redelivered
            LOGGER.warning("dropped a request with no reply_to: %r", props.correlation_id)
            ch.basic_ack(delivery_tag=method.delivery_tag)
            return
        self.in_hand.add(method.delivery_tag)
        span = amqp_tracing.start_request(self.queue, props)
        delivery = Delivery(self.connection, self.pika_channel, method.delivery_tag, props, span)
        if self.threaded:
            self.workers.submit(self.work, delivery, body)
        else:
            self.reply(delivery, *self.answer(body, span))

    def work(self, delivery: Delivery, body: bytes) -> None:
        """In a worker thread: compute the reply, and hand it to the connection's thread."""
        reply, failed = self.answer(body, delivery.span)
        publish = functools.partial(self.reply, delivery, reply, failed)
        try:
            delivery.connection.add_callback_threadsafe(publish)  # NOTE: pika is not thread-safe
        except AMQPConnectionError:  # lost meanwhile: the request is redelivered
            LOGGER.info("%s finished on a lost connection; another will answer it", delivery)
            amqp_tracing.end(delivery.span, None)

    def answer(self, body: bytes, span: object = None) -> tuple[bytes, bool]:
        """The reply's body for a request's, and whether it is an error reply."""
        try:
            with amqp_tracing.current(span):  # tracing: the handler's work is the request's
                return self.handler(body), False
        except ValueError as error:  # the request's fault
            LOGGER.info("invalid request: %s", error)
            return f"invalid request: {error}".encode(), True
        except Exception as error:  # one request's failure must not stop the server
            LOGGER.exception("the handler failed")
            return f"server error: {type(error).__name__}".encode(), True

    def reply(self, delivery: Delivery, body: bytes, failed: bool) -> None:
        """The tutorial's reply: published to reply_to, with the request's correlation_id."""
        channel, props = delivery.channel, delivery.props
        if channel is not self.pika_channel or not channel.is_open:  # redelivered, elsewhere
            amqp_tracing.end(delivery.span, None)
            return
        # NOTE: AMQP 1.0 requesters (RabbitMQ 4's Requester) send only a message_id.
        corr_id = props.correlation_id or props.message_id
        properties = pika.BasicProperties(correlation_id=corr_id, type="error" if failed else None)
        # Only queued here, sent by the I/O loop: its confirm cannot come before it is recorded.
        with amqp_tracing.current(delivery.span):
            channel.basic_publish("", reply_queue(props.reply_to), body, properties)
        amqp_tracing.end(delivery.span, body)
        self.published += 1
        self.unconfirmed[self.published] = (delivery.tag, corr_id)

    def on_confirm(self, frame: pika.frame.Method) -> None:  # in pika's I/O loop: no blocking
        """The tutorial's ack, once the broker confirms the reply: a server whose node dies
        between the two leaves the request to be redelivered, never lost."""
        confirm = frame.method
        if confirm.multiple:  # all up to this one
            numbers = [number for number in self.unconfirmed if number <= confirm.delivery_tag]
        else:
            numbers = [confirm.delivery_tag]
        for number in numbers:
            delivery_tag, corr_id = self.unconfirmed.pop(number)
            self.in_hand.discard(delivery_tag)
            if isinstance(confirm, Basic.Ack):
                self.pika_channel.basic_ack(delivery_tag)
                continue
            # NOTE: dropped, not requeued: sent again, it would be refused again (a full queue)
            LOGGER.warning("the broker refused the reply to %r; its request is dropped", corr_id)
            self.pika_channel.basic_nack(delivery_tag, requeue=False)

    # --- What production adds, step by step ------------------------------------------------

    def open_queue(self) -> BlockingChannel:
        """A channel on which the queue exists, declared by us or, failing that, by an operator."""
        channel = self.connection.channel()
        try:
            channel.queue_declare(queue=self.queue, durable=True, arguments=QUEUE_ARGUMENTS)
            return channel
        except ChannelClosedByBroker as error:
            if error.reply_code != 403:  # ACCESS_REFUSED: this account may not configure it
                raise
        channel = self.connection.channel()
        try:
            channel.queue_declare(queue=self.queue, passive=True)  # NOT_FOUND if none declared it
        except ChannelClosedByBroker as error:  # both reasons, or the operator learns one
            text = f"{error.reply_text}, and this account may not declare it"
            raise ChannelClosedByBroker(error.reply_code, text) from None
        LOGGER.info("this account may not declare %r; using it as declared", self.queue)
        return channel

    def watch(self) -> None:
        """Confirms for our replies, and word of a cancelled consumer or a closed channel."""
        self.pika_channel = underneath(self.channel)
        self.in_hand.clear()
        self.unconfirmed.clear()
        self.published = 0
        self.cancelled = None
        self.closed = None
        self.pika_channel.confirm_delivery(ack_nack_callback=self.on_confirm)
        self.channel.add_on_cancel_callback(self.on_cancel)  # queue deleted, consumer timeout
        self.pika_channel.add_on_close_callback(self.on_channel_closed)

    def on_cancel(self, frame: pika.frame.Method) -> None:
        self.cancelled = "the broker cancelled it"

    def on_channel_closed(self, channel: pika.channel.Channel, reason: Exception) -> None:
        self.closed = reason

    def consume(self) -> None:
        """The tutorial's start_consuming(), but a signal, a cancel or a close ends it."""
        look_at = time.monotonic() + LOOK_EVERY
        while not self.signals and self.cancelled is None and self.closed is None:
            self.connection.process_data_events(time_limit=1)
            if time.monotonic() > look_at:
                look_at = time.monotonic() + LOOK_EVERY
                self.look()

    def look(self) -> None:
        """NOTE: a cluster may lose the queue and not cancel us; and a node cut off from its
        cluster (4.x) counts no consumer, not even us: then another node is needed."""
        try:
            with self.connection.channel() as look:
                if not look.queue_declare(queue=self.queue, passive=True).method.consumer_count:
                    raise ConnectionLost("our node sees no consumer of ours: cut off?")
        except ChannelClosedByBroker as error:  # NOT_FOUND: our consumer is gone with it
            self.cancelled = error.reply_text

    def finish(self) -> None:
        """Stop consuming, unless the broker did; finish the requests in hand (their replies
        confirmed and acked); close the channel."""
        if self.closed is not None:
            # NOTE: NOT_FOUND: the queue deleted again as we declared it, as a cluster may; any
            # other reason (ACCESS_REFUSED to a reply, say) is a verdict retrying cannot change.
            if getattr(self.closed, "reply_code", None) != 404:
                raise self.closed
            self.cancelled = getattr(self.closed, "reply_text", "NOT_FOUND")
        if self.cancelled is not None:
            LOGGER.warning(
                "our consumer was cancelled (%s); declaring the queue again", self.cancelled
            )
        else:
            self.channel.stop_consuming()  # requests not yet handed to us go back to the queue
        while self.in_hand and self.channel.is_open:
            self.connection.process_data_events(time_limit=1)
        if self.channel.is_open:
            self.channel.close()

    def catch_signals(self) -> None:
        """SIGINT and SIGTERM (in the main thread) finish the requests in hand, then run() returns."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self.on_signal)
            signal.signal(signal.SIGTERM, self.on_signal)

    def on_signal(self, signum: int, frame: object) -> None:
        LOGGER.info("%s: finishing the requests in hand, then exiting", signal.Signals(signum).name)
        self.signals.append(signum)

    def back_off(self, failures: int) -> None:
        """Wait before a reconnection after failures in a row: capped, with jitter so that a
        fleet of servers does not reconnect in step. A signal ends the wait."""
        if not failures:
            return
        delay = min(BACKOFF_CAP, 0.1 * 2 ** (failures - 1)) * random.uniform(0.5, 1)
        LOGGER.warning("reconnecting in %.1f s", delay)
        until = time.monotonic() + delay
        while not self.signals and time.monotonic() < until:
            time.sleep(0.05)


@dataclass
class Request:  # one body of a call
    body: bytes
    deadline: float  # time.monotonic()'s
    corr_id: str = ""  # of its latest publish, set before it: "" (never sent) costs no retry
    span: object = None  # its OpenTelemetry span, from its first send, when tracing


@dataclass
class Reply:
    body: bytes
    error: bool  # an error reply: the server's message
    returned: bool  # no reply but the request itself, which no queue took (mandatory)


class Batch:
    """The requests of one call: sent in order, window at most in flight, answered in order."""

    def __init__(self, bodies: list[bytes], window: int, timeout: float) -> None:
        self.todo = deque(bodies)
        self.window = window
        self.timeout = timeout
        self.in_flight: deque[Request] = deque()  # oldest first
        self.done: list[tuple[Request, bytes]] = []  # in the order of bodies
        self.losses = 0  # losses while a request in flight may have been taken
        self.again = False  # the requests in flight go again, on a new connection


class RpcClient(contextlib.AbstractContextManager):
    """Sends request bodies to queue and returns their replies' bodies.

    call() and call_many() raise RpcError (an error reply), RpcTimeoutError, NoServerError
    (no server consumes the queue) or RpcConnectionError. A call lost with its connection
    is sent again, retries times at most: with retries=0, no request runs twice.
    """

    def __init__(
        self,
        url: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        queue: str = "rpc_queue",
        retries: int = 1,
    ) -> None:
        self.timeout = checked_timeout(timeout)
        # A connection blocked by a resource alarm is dropped when a call would time out.
        self.nodes = broker_parameters(url or default_url(), "rpc_client", blocked=timeout)
        self.queue = checked_queue(queue)
        self.retries = retries
        self.lock = threading.Lock()  # NOTE: pika is not thread-safe: threads sharing us take turns
        self.responses: dict[str, Reply | None] = {}  # correlation_id -> reply, None while awaited
        self.connection: pika.BlockingConnection | None = None
        self.channel: BlockingChannel | None = None
        self.callback_queue = ""
        self.blocked: str | None = None  # the broker's reason while a resource alarm blocks us
        self.broken: Exception | None = None  # why the broker cancelled us, or closed the channel
        self.nacked = False  # the broker refused a request on this channel
        self.refused = False  # the broker refused a request of this call
        self.no_server_since: float | None = None  # since when the queue counts no consumer
        self.connect()

    def connect(self) -> None:
        """The tutorial's connection, on the first node that takes our channel too."""
        self.close()
        self.connection = open_connection(self.nodes, self.open_channel)

    def open_channel(self, connection: pika.BlockingConnection) -> None:
        """The tutorial's channel, exclusive callback queue and consumer."""
        self.channel = connection.channel()
        # Server-named and exclusive: ours alone, and deleted when we disconnect.
        self.callback_queue = self.channel.queue_declare(queue="", exclusive=True).method.queue
        # NOTE: auto_ack: a reply has no one else to go to, and one left unacknowledged is held
        # by the broker (RabbitMQ 4 closes the channel after consumer_timeout, 30 min).
        self.channel.basic_consume(self.callback_queue, self.on_response, auto_ack=True)
        self.watch(connection)

    def on_response(
        self, ch: object, method: Basic.Deliver, props: pika.BasicProperties, body: bytes
    ) -> None:
        reply = Reply(body, error=props.type == "error", returned=isinstance(method, Basic.Return))
        if props.correlation_id in self.responses and self.responses[props.correlation_id] is None:
            self.responses[props.correlation_id] = reply
        else:  # a late reply to a call that timed out, a duplicate, or not ours
            LOGGER.debug("dropped a reply with correlation_id %r", props.correlation_id)

    def call(self, body: bytes, timeout: float | None = None) -> bytes:
        """The reply's body; raises RpcError, RpcTimeoutError or RpcConnectionError."""
        return self.calls([body], 1, timeout)[0]

    def send(self, request: Request) -> None:
        """The tutorial's publish, with our callback queue and a fresh correlation_id."""
        if not self.channel.is_open:  # closed by what wait() processed: nothing is sent
            raise ConnectionLost("the channel closed before the request was sent")
        corr_id = str(uuid.uuid4())
        # expiration: a request no server took in time is dropped, not computed for nobody.
        ttl = str(max(1, math.ceil((request.deadline - time.monotonic()) * 1000)))
        # message_id too: AMQP 1.0 responders reply with it as the correlation id.
        properties = pika.BasicProperties(
            reply_to=self.callback_queue, correlation_id=corr_id, message_id=corr_id, expiration=ttl
        )
        properties.headers = amqp_tracing.request_headers(request.span, corr_id)  # its trace's
        self.responses[corr_id] = None
        # mandatory: a request no queue takes comes back at once, as NoServerError.
        request.corr_id = corr_id  # before the publish: one that raises may have been sent
        # tracing: no mark if it raises, as the request may be sent again, in the same span
        with amqp_tracing.current(request.span, marks=False):
            self.channel.basic_publish("", self.queue, request.body, properties, mandatory=True)

    def wait(self, request: Request) -> bytes:
        """The tutorial's wait in process_data_events until the reply comes; its body, or raise."""
        self.no_server_since = None
        check_at = time.monotonic() + CHECK_EVERY
        while self.responses[request.corr_id] is None:
            check_at = self.check(request, check_at)
            # Blocks until an event or the time limit: no busy loop.
            limit = request.deadline if self.blocked else min(request.deadline, check_at)
            self.connection.process_data_events(time_limit=max(0.0, limit - time.monotonic()))
        reply = self.responses.pop(request.corr_id)
        if reply.returned:
            raise NoServerError(f"no queue {self.queue!r}, so no RPC server consumes it")
        if reply.error:
            raise RpcError(reply.body.decode("utf-8", errors="replace"))
        return reply.body

    # --- What production adds, step by step ------------------------------------------------

    def watch(self, connection: pika.BlockingConnection) -> None:
        """What the broker says of our calls: an alarm, a refused or returned request, our
        consumer cancelled (the callback queue deleted), our channel closed."""
        self.blocked = None
        self.broken = None
        self.nacked = False
        connection.add_on_connection_blocked_callback(self.on_blocked)
        connection.add_on_connection_unblocked_callback(self.on_blocked)
        underneath(self.channel).confirm_delivery(ack_nack_callback=self.on_confirm)
        self.channel.add_on_return_callback(self.on_response)  # mandatory requests no queue took
        self.channel.add_on_cancel_callback(self.on_cancel)
        underneath(self.channel).add_on_close_callback(self.on_channel_closed)

    def on_blocked(self, connection: object, frame: pika.frame.Method) -> None:
        self.blocked = getattr(frame.method, "reason", None)  # Unblocked has none

    def on_confirm(self, frame: pika.frame.Method) -> None:
        if isinstance(frame.method, Basic.Nack):
            self.nacked = True

    def on_cancel(self, frame: pika.frame.Method) -> None:
        self.broken = ConnectionLost("the broker cancelled the consumer of our callback queue")

    def on_channel_closed(self, channel: pika.channel.Channel, reason: Exception) -> None:
        self.broken = reason  # NOT_FOUND for check()'s question, say

    def on_consumer_count(self, frame: pika.frame.Method) -> None:  # check()'s answer
        if frame.method.consumer_count:
            self.no_server_since = None
        elif self.no_server_since is None:
            self.no_server_since = time.monotonic()

    def check(self, request: Request, check_at: float) -> float:
        """Raise if request cannot be answered in time; every CHECK_EVERY s, ask whether a
        server consumes the queue. Returns when to ask next."""
        now = time.monotonic()
        if now >= request.deadline:
            why = ""
            if self.blocked:
                why += f"; the broker blocks this connection: {self.blocked}"
            if self.refused:
                why += "; the broker refused it (is the queue full?)"
            raise RpcTimeoutError(f"no reply from {self.queue!r} within the timeout{why}")
        if self.nacked:
            raise Refused()
        if self.broken is not None:  # the broker cancelled our consumer, or closed the channel
            if getattr(self.broken, "reply_code", None) == 404:
                raise NoServerError(f"no queue {self.queue!r}, so no RPC server consumes it")
            raise self.broken
        if now < check_at or self.blocked:  # NOTE: a broker that blocks us would not answer
            return check_at
        if self.no_server_since is not None and now - self.no_server_since >= NO_SERVER_AFTER:
            raise NoServerError(f"no RPC server is consuming {self.queue!r}")
        # NOTE: asked underneath, as BlockingChannel.queue_declare would wait for the answer,
        # past the timeout if the network to the broker went silent.
        underneath(self.channel).queue_declare(
            self.queue, passive=True, callback=self.on_consumer_count
        )
        return now + CHECK_EVERY

    def call_many(
        self, bodies: Iterable[bytes], window: int = 100, timeout: float | None = None
    ) -> list[bytes]:
        """The replies' bodies in order, window requests in flight at once; raises as call()."""
        return self.calls(list(bodies), window, timeout)

    def calls(self, bodies: list[bytes], window: int, timeout: float | None) -> list[bytes]:
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        batch = Batch(bodies, window, checked_timeout(self.timeout if timeout is None else timeout))
        with self.lock:
            self.refused = False
            try:
                self.reconnect_if_closed()
                while batch.todo or batch.in_flight:
                    self.step(batch)
            except Exception as error:  # tracing: each request in flight ends its span with it
                for request in batch.in_flight:
                    amqp_tracing.failed(request.span, error)
                raise
            finally:
                self.responses.clear()  # replies still to come are strays now
        # NOTE: one reply per body, in the order of bodies, or none: never a shifted list.
        if [request.body for request, _ in batch.done] != bodies:
            raise RuntimeError(f"answered {len(batch.done)} of {len(bodies)} requests out of order")
        return [reply for _, reply in batch.done]

    def step(self, batch: Batch) -> None:
        """Send what the window lets, then wait for the oldest request's reply."""
        try:
            if batch.again:  # on a new connection, the requests in flight
                self.connect()
                batch.again = False
                for request in batch.in_flight:
                    self.send(request)
            while batch.todo and len(batch.in_flight) < batch.window:
                # NOTE: in flight before it is published: a publish that raises leaves it to be
                # sent again, never lost.
                deadline = time.monotonic() + batch.timeout
                span = amqp_tracing.start_call(self.queue)
                batch.in_flight.append(Request(batch.todo.popleft(), deadline, span=span))
                self.send(batch.in_flight[-1])
            reply = self.wait(batch.in_flight[0])
            amqp_tracing.end(batch.in_flight[0].span, reply)
            batch.done.append((batch.in_flight[0], reply))
            batch.in_flight.popleft()
        except (AMQPConnectionError, ConnectionLost, NoServerError) as error:
            self.after_loss(batch, error)
        except Refused:
            self.after_refusal(batch)

    def after_loss(self, batch: Batch, error: Exception) -> None:
        """NOTE: a lost connection took its callback queue; a cut-off node sees no server.
        The requests in flight go again, on the next node; retries bounds the resends of
        what may have run: with retries=0, none runs twice."""
        if any(request.corr_id for request in batch.in_flight):
            batch.losses += 1
        lost = not isinstance(error, NoServerError)
        if not lost and (batch.losses > self.retries or len(self.nodes) < 2):
            raise error
        if batch.losses > self.retries:
            raise RpcConnectionError(f"connection lost: {error!r}") from None
        batch.again = True
        what = "connection lost" if lost else "no server seen through this node"
        LOGGER.warning("%s during a call (%r); sending again", what, error)

    def after_refusal(self, batch: Batch) -> None:
        """NOTE: a nack is a request the broker did not take (a channel opened as the leader
        died refuses all, a full queue some): sent again at no cost to retries, unless others
        in flight may have been taken and retries=0."""
        if not self.retries and len(batch.in_flight) > 1:
            raise RpcConnectionError("the broker refused a request") from None
        batch.again = True
        self.refused = True
        LOGGER.warning("the broker refused a request; sending again")

    def reconnect_if_closed(self) -> None:
        """Reconnect, costing no retry, if the broker closed the connection while idle."""
        with contextlib.suppress(AMQPConnectionError):
            if self.connection is not None and self.channel.is_open:
                self.connection.process_data_events(0)  # learns of a close, or a cancel
                if self.broken is None:
                    return
        self.connect()

    def close(self) -> None:
        close_quietly(self.connection)  # one an alarm blocks is dropped by its blocked timeout
        self.connection = None

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# --- Connections, shared by both ---------------------------------------------------------


def default_url() -> str:
    return os.environ.get("AMQP_URL") or DEFAULT_URL


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
        if not node.blocked_connection_timeout:
            node.blocked_connection_timeout = blocked
        node.client_properties = {"connection_name": name, **(node.client_properties or {})}
        nodes.append(node)
    random.shuffle(nodes)  # a fleet of processes spreads over the cluster's nodes
    return nodes


def open_connection(
    nodes: list[pika.URLParameters],
    setup: Callable[[pika.BlockingConnection], object] | None = None,
) -> pika.BlockingConnection:
    """A connection to the first node that answers (and takes setup), that node moved last:
    the next connection starts after it, so a lost node is tried last."""
    errors = []  # where each node is, without the credentials (URLs carry passwords)
    for _ in range(len(nodes)):
        node = nodes.pop(0)
        nodes.append(node)
        connection = None
        try:
            connection = pika.BlockingConnection(node)
            if setup is not None:  # NOTE: a node cut off from its cluster may refuse it (541)
                setup(connection)
            return connection
        except (AMQPConnectionError, OSError) as error:  # OSError: no such host
            errors.append(f"{node.host}:{node.port}: {error!r}")
            close_quietly(connection)
    raise RpcConnectionError("cannot connect to the broker at " + "; ".join(errors))


def close_quietly(connection: pika.BlockingConnection | None) -> None:
    """Close connection, if open; wait 2 s at most (a cut-off node may hold it until the heal)."""
    if connection is None:
        return
    closer = threading.Thread(target=close_connection, args=(connection,), daemon=True)
    closer.start()
    closer.join(2.0)


def close_connection(connection: pika.BlockingConnection) -> None:
    with contextlib.suppress(AMQPConnectionError):  # NOTE: pika's loop is per connection
        if connection.is_open:
            connection.close()


def underneath(channel: BlockingChannel) -> pika.channel.Channel:
    """NOTE: the channel under a BlockingChannel, for what it cannot do: take publisher
    confirms as they come (its confirm_delivery() makes each publish wait for its own), act
    inside the I/O loop's callbacks (ack as a confirm comes), say why the broker closed the
    channel, and ask a question without waiting for its answer."""
    return channel._impl


def reply_queue(reply_to: str | bytes) -> str | bytes:
    """NAME from an AMQP 1.0 address /queues/NAME (percent-encoded), as RabbitMQ 4.0 hands
    it on from an AMQP 1.0 requester; else reply_to. NOTE: not /exchanges/...: a reply to
    an exchange that does not exist would cost us the channel, at each delivery."""
    match = re.fullmatch("/queues/([^/]+)", str(reply_to))  # bytes, if not UTF-8: no match
    if match:
        return unquote(match.group(1))
    return reply_to


def checked_queue(queue: str) -> str:
    if len(queue.encode()) > 255:  # AMQP carries it in a short string
        raise ValueError(f"queue must be at most 255 bytes, got {len(queue.encode())}")
    return queue


def checked_timeout(timeout: float) -> float:
    """timeout, if a request can expire after it; raise ValueError otherwise."""
    if not 0 < timeout <= MAX_TIMEOUT:  # nan is neither
        raise ValueError(f"timeout must be a positive number of seconds, to ten years: {timeout}")
    return timeout


def setup_logging(verbose: bool, level: int) -> None:
    """For a script's main(): our lines on stderr; pika's only when verbose."""
    logging.basicConfig(level=logging.DEBUG if verbose else level, format=LOG_FORMAT)
    if not verbose:
        logging.getLogger("pika").setLevel(logging.CRITICAL)  # its errors are ours to report
