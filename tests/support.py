"""Helpers shared by the tests: servers, requests, URLs and the broker's own tools.

Fixtures live in conftest.py; everything else that more than one test uses lives here,
so that each test file opens with its tests.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote, urlsplit, urlunsplit

import pika
import pika.data
import pytest
from pika.adapters.blocking_connection import BlockingChannel
from rabbitmq_amqp_python_client import (
    AddressHelper,
    AMQPMessagingHandler,
    AmqpUri,
    ClassicQueueSpecification,
    ConsumerOptions,
    ConsumerSettleStrategy,
    Environment,
    Message,
    QuorumQueueSpecification,
)

import amqp_rpc
import rpc_server
from tests.tcp_proxy import TcpProxy

ROOT = Path(__file__).resolve().parent.parent
URL = os.environ.get("AMQP_URL") or amqp_rpc.DEFAULT_URL
READY = " [x] Awaiting RPC requests"


def connect(url: str, name: str) -> pika.BlockingConnection:
    """A connection named for the test, so that the broker's lists tell whose it is."""
    parameters = pika.URLParameters(url)
    parameters.client_properties = {"connection_name": name}
    return pika.BlockingConnection(parameters)


class Server:
    """A `python rpc_server.py` process, its output lines collected as they come."""

    def __init__(self, args: list[str], env: dict[str, str], code: str = "") -> None:
        # code: Python run in the script's place, to make a server of the script's parts.
        program = [sys.executable, "-c", code] if code else [sys.executable, ROOT / "rpc_server.py"]
        self.process = subprocess.Popen(
            [*program, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            start_new_session=True,  # its worker process goes with it in kill()
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self.readers = [
            threading.Thread(target=self._read, args=(stream, seen), daemon=True)
            for stream, seen in (
                (self.process.stdout, self.stdout),
                (self.process.stderr, self.stderr),
            )
        ]
        for reader in self.readers:
            reader.start()

    def _read(self, stream: IO[str], seen: list[str]) -> None:
        for line in stream:
            seen.append(line.rstrip("\n"))
            if stream is self.process.stdout:
                self.lines.put(line.rstrip("\n"))

    def wait_for(self, wanted: str, timeout: float = 20) -> None:
        """Wait until the server prints a line starting with wanted."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.lines.get(timeout=0.1).startswith(wanted):
                    return
            except queue.Empty:
                if self.process.poll() is not None:
                    break
        raise AssertionError(f"server never printed {wanted!r}; stderr: {self.stderr}")

    def wait(self, timeout: float = 20) -> int:
        """Wait for the process to exit and for all it printed; return its exit status."""
        status = self.process.wait(timeout)
        for reader in self.readers:
            reader.join(timeout)
        return status

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.wait(timeout)
        finally:
            self.kill()

    def kill(self) -> None:
        """SIGKILL the server and its worker process, if they still run."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


def run_script(name: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run one of the scripts; AMQP_URL is not passed on, so --url must say where."""
    return subprocess.run(
        [sys.executable, str(ROOT / name), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={k: v for k, v in os.environ.items() if k != "AMQP_URL"},
    )


def digits(n: int) -> bytes:
    """fib(n) in decimal digits, as a server sends it, however many digits it has."""
    limit = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(0)
    try:
        return str(rpc_server.fib(n)).encode()
    finally:
        sys.set_int_max_str_digits(limit)


def wait_until(condition: Callable[[], object], timeout: float, what: str) -> None:
    """Poll condition until it holds; fail, saying what did not happen, after timeout s."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.05)


def request(
    channel: BlockingChannel, queue: str, body: bytes, timeout: float = 20, **props: object
) -> tuple[pika.BasicProperties, bytes]:
    """Publish body to queue with a private reply queue; return the reply's properties and body."""
    reply_queue = channel.queue_declare(queue="", exclusive=True).method.queue
    corr_id = str(uuid.uuid4())
    channel.basic_publish(
        exchange="",
        routing_key=queue,
        properties=pika.BasicProperties(reply_to=reply_queue, correlation_id=corr_id, **props),
        body=body,
    )
    for method, properties, reply in channel.consume(
        reply_queue, auto_ack=True, inactivity_timeout=timeout
    ):
        channel.cancel()
        assert method is not None, f"no reply to {body[:40]!r} within {timeout} s"
        assert properties.correlation_id == corr_id
        return properties, reply
    raise AssertionError("unreachable")


def stray_reply(
    channel: BlockingChannel,
    queue: str,
    corr_id: str | None,
    body: bytes = b"999",
    **props: object,
) -> None:
    """Publish into a client's callback queue a reply it is not waiting for."""
    channel.basic_publish(
        exchange="",
        routing_key=queue,
        properties=pika.BasicProperties(correlation_id=corr_id, **props),
        body=body,
    )


# --- helpers ---------------------------------------------------------------------------


def with_query(url: str, query: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}{query}"


def named(url: str, name: str) -> str:
    """url with a connection_name in its query: the broker's lists then say whose it is."""
    return with_query(url, "client_properties=" + quote(repr({"connection_name": name})))


def through(url: str, proxy: TcpProxy) -> str:
    """url with the proxy's address in place of the broker's."""
    parts = urlsplit(url)
    credentials, _, _ = parts.netloc.rpartition("@")
    address = f"127.0.0.1:{proxy.port}"
    return urlunsplit(parts._replace(netloc=f"{credentials}@{address}" if credentials else address))


def catch(function: Callable[..., object], *args: object) -> object:
    """function(*args), or the exception it raised."""
    try:
        return function(*args)
    except Exception as error:  # returned: the test checks which
        return error


def reconnect_delays(server: Any) -> list[float]:
    """The delays the server announced before its reconnection attempts, in order."""
    return [
        float(found)
        for line in list(server.stderr)
        for found in re.findall(r"reconnecting in (\d+\.\d) s", line)
    ]


class Requester:
    """Sends requests with plain pika and collects every reply, duplicates included.

    A reply queue of its own, and no NoServerError check: a test that cuts a server's
    connection needs each request answered in the end, whatever the gap.
    """

    def __init__(self, url: str, queue: str, name: str) -> None:
        self.queue = queue
        self.connection = connect(url, name)
        self.channel = self.connection.channel()
        self.reply_queue = self.channel.queue_declare(queue="", exclusive=True).method.queue
        self.replies: defaultdict[Any, list[tuple[pika.BasicProperties, bytes]]] = defaultdict(list)
        self.channel.basic_consume(
            queue=self.reply_queue, on_message_callback=self.on_reply, auto_ack=True
        )

    def on_reply(
        self, ch: object, method: object, props: pika.BasicProperties, body: bytes
    ) -> None:
        self.replies[props.correlation_id].append((props, body))

    def send(self, body: bytes, **props: Any) -> str:
        corr_id = uuid.uuid4().hex
        self.channel.basic_publish(
            exchange="",
            routing_key=self.queue,
            properties=pika.BasicProperties(
                **{"reply_to": self.reply_queue, "correlation_id": corr_id, **props}
            ),
            body=body,
        )
        return corr_id

    def poll(self, seconds: float = 0) -> None:
        self.connection.process_data_events(time_limit=seconds)

    def wait(self, corr_ids: Iterable[str], timeout: float) -> None:
        """Process events until each of corr_ids has a reply."""
        deadline = time.monotonic() + timeout
        corr_ids = list(corr_ids)
        while missing := [c for c in corr_ids if not self.replies.get(c)]:
            assert time.monotonic() < deadline, f"{len(missing)} requests unanswered in {timeout} s"
            self.poll(0.1)

    def close(self) -> None:
        if self.connection.is_open:
            self.connection.close()


class Amqp10:
    """A connection speaking AMQP 1.0, with RabbitMQ's own client (RabbitMQ 4 only)."""

    def __init__(self, url: str, queue: str) -> None:
        parameters = pika.URLParameters(url.split(",")[0])
        credentials = parameters.credentials
        # NOTE: its URI parser does not decode the vhost /%2F; the fields are passed as such.
        uri = AmqpUri(
            host=parameters.host,
            port=parameters.port,
            user=credentials.username,
            password=credentials.password,
            vhost=parameters.virtual_host,
        )
        self.environment = Environment(amqp_uri=uri)
        self.connection = self.environment.connection()
        self.connection.dial()
        self.queue = queue

    def close(self) -> None:
        self.environment.close()


class Amqp10Requester(Amqp10):
    """Sends requests to the queue over AMQP 1.0, as RabbitMQ 4's requesters do."""

    def reply_queue(self, name: str) -> str:
        """Declare a queue of that name for replies, exclusive to this connection."""
        spec = ClassicQueueSpecification(name=name, is_exclusive=True, is_durable=False)
        self.connection.management().declare_queue(spec)
        return name

    def call(
        self, body: bytes, reply_to: str | None = None, timeout: float = 10
    ) -> tuple[str, Message]:
        """Send body with a message_id and no correlation_id; return the id and the reply.
        The reply is read from reply_to's queue, or with reply_to None, by direct reply-to."""
        publisher = self.connection.publisher(AddressHelper.queue_address(self.queue))
        handler = _OneMessage()
        if reply_to is None:
            options = ConsumerOptions(ConsumerSettleStrategy.DirectReplyTo)
            consumer = self.connection.consumer(message_handler=handler, consumer_options=options)
            reply_to = consumer.address  # /queues/amq.rabbitmq.reply-to.…, made for us
        else:
            queue = reply_to.removeprefix("/queues/")
            address = reply_to if queue != reply_to else AddressHelper.queue_address(queue)
            consumer = self.connection.consumer(address, message_handler=handler)
        message_id = uuid.uuid4().hex
        handler.start(timeout)
        try:
            with contextlib.suppress(_OneMessage.Got):  # the reply may come as we publish
                publisher.publish(Message(body=body, id=message_id, reply_to=reply_to))
                consumer.run()
        finally:
            publisher.close()
            consumer.close()
        assert handler.message is not None, f"no reply to {body!r} within {timeout} s"
        return message_id, handler.message


class Amqp10Responder(Amqp10):
    """Answers requests from the queue (declared as rpc_server.py does) over AMQP 1.0."""

    def __init__(self, url: str, queue: str) -> None:
        super().__init__(url, queue)
        self.connection.management().declare_queue(QuorumQueueSpecification(name=queue))
        self.handler = _OneMessage()
        # Consuming from now on: a client finds a server there before the first request.
        self.consumer = self.connection.consumer(
            AddressHelper.queue_address(queue), message_handler=self.handler
        )

    def serve_one(self, timeout: float = 10) -> Message:
        """Answer one request, as an AMQP 1.0 responder does: to its reply_to as given,
        correlated by its message id. Return the request."""
        self.handler.start(timeout)
        with contextlib.suppress(_OneMessage.Got):
            self.consumer.run()
        request = self.handler.message
        assert request is not None, f"no request within {timeout} s"
        publisher = self.connection.publisher(request.reply_to)
        reply = Message(body=str(rpc_server.fib(int(bytes(request.body)))).encode())
        reply.correlation_id = request.id
        publisher.publish(reply)
        publisher.close()
        return request


class _OneMessage(AMQPMessagingHandler):
    """Takes one message, or gives up timeout s after start(): either ends the consumer's run().

    NOTE: the exception that ends run() may come again from the client's next wait (the
    timer's does): only the first, while waiting, is raised."""

    class Got(Exception):
        pass

    def __init__(self) -> None:
        super().__init__(auto_accept=False)
        self.message: Message | None = None
        self.waiting = False

    def on_link_opened(self, event: Any) -> None:
        self.container = event.container

    def start(self, timeout: float) -> None:
        self.message, self.waiting = None, True
        self.timer = self.container.schedule(timeout, self)

    def on_timer_task(self, event: Any) -> None:
        if self.waiting:
            self.waiting = False
            raise self.Got

    def on_amqp_message(self, event: Any) -> None:
        if not self.waiting:
            return
        self.waiting = False
        self.timer.cancel()
        self.message = event.message
        if not event.delivery.settled:  # direct reply-to's are settled when sent
            self.delivery_context.accept(event)
        raise self.Got


def queued(channel: Any, queue: str) -> int:
    return channel.queue_declare(queue=queue, passive=True).method.message_count


def fail_or_skip(reason: str) -> None:
    """A missing tool fails the test in CI, where it must be there; elsewhere it skips."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}; CI needs it", pytrace=False)
    pytest.skip(reason)


def our_connections(rabbitmqctl: Callable[..., str], marker: str) -> tuple[int, int]:
    """How many connections, and channels on them, the broker has whose name holds marker."""
    pids = [
        connection["pid"]
        for connection in json.loads(
            rabbitmqctl("-q", "list_connections", "pid", "client_properties", "--formatter", "json")
        )
        if any(
            key == "connection_name" and marker in value
            for key, _, value in connection["client_properties"]
        )
    ]
    channels = json.loads(rabbitmqctl("-q", "list_channels", "connection", "--formatter", "json"))
    return len(pids), sum(channel["connection"] in pids for channel in channels)


class Foreign(bytes):
    """A header value as another client library may encode it: a type octet, then the value.

    pika cannot encode these (a timestamp past the year 9999, a double), but Java, .NET
    and Go clients can, and the broker passes them on.
    """


def wait_for_broker(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            connect(url, "broker restart probe").close()
            return
        except pika.exceptions.AMQPError:
            assert time.monotonic() < deadline, f"the broker did not answer within {timeout} s"
            time.sleep(0.2)


# --- soak -------------------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    """Resident memory of a process, in KiB."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return int(fields["VmRSS"].split()[0])


def free_port() -> int:
    """A local port nothing listens on (probably: it was free a moment ago)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Load:
    """A `python -m tests.load_client` process: one client calling in a loop (options: its)."""

    def __init__(self, url: str, queue: str, *options: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.load_client", url, queue, "--seconds", "150", *options],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={k: v for k, v in os.environ.items() if k != "AMQP_URL"},
        )
        assert self.process.stdout is not None
        ready = self.process.stdout.readline()
        assert ready == "ready\n", f"the load process did not start: {self.killed_stderr()}"
        self.answered = 0

    def going_on(self, more: int = 50) -> None:
        """Wait until the load has answered `more` calls since the last wait (or its start).
        Bounded by the load's own --seconds: then its summary line ends the wait, failing."""
        assert self.process.stdout is not None
        target = self.answered + more
        while self.answered < target:
            line = self.process.stdout.readline()
            assert line.startswith("answered "), f"the load ended: {line}{self.killed_stderr()}"
            self.answered = int(line.split()[1])

    def killed_stderr(self) -> str:
        self.process.kill()
        return self.process.communicate()[1]

    def finish(self, stop: bool = True) -> dict:
        """Stop calling (or, stop=False, wait until its bound stops it); return the summary,
        with the warnings the client logged."""
        if not stop:
            self.process.wait(timeout=150)
        out, err = self.process.communicate(input="", timeout=60)
        assert self.process.returncode == 0, err
        summary = json.loads(out.splitlines()[-1])
        summary["lost"] = err.count("connection lost during a call")
        summary["refused"] = err.count("the broker refused a request")
        return summary

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.communicate()
