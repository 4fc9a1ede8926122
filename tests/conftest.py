"""Fixtures for tests against a real RabbitMQ broker (AMQP_URL, default localhost).

Servers run as real `python rpc_server.py` processes, each test on a queue of its
own. Without a broker, integration tests fail when CI=true and skip otherwise.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import pika
import pytest
from pika.adapters.blocking_connection import BlockingChannel
from pika.exceptions import AMQPError

import rpc_client
import rpc_server
from tests import nodes

ROOT = Path(__file__).resolve().parent.parent
URL = os.environ.get("AMQP_URL") or rpc_client.DEFAULT_URL
READY = " [x] Awaiting RPC requests"


@pytest.fixture(scope="session")
def amqp_url() -> str:
    """The broker's URL, once the broker answers; a loud failure in CI if it never does."""
    deadline = time.monotonic() + 15
    while True:
        try:
            pika.BlockingConnection(pika.URLParameters(URL)).close()
            return URL
        except AMQPError as error:
            if time.monotonic() > deadline:
                message = f"no RabbitMQ broker answers at AMQP_URL (or localhost): {error!r}"
                if os.environ.get("CI") == "true":
                    pytest.fail(message + "; CI needs one", pytrace=False)
                pytest.skip(message)
            time.sleep(0.5)


def server_version(url: str) -> str:
    """The version the broker at url gives in its connection handshake."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        return str(connection._impl.server_properties["version"])
    finally:
        connection.close()


@pytest.fixture(scope="session")
def rabbitmq_major(amqp_url: str) -> int:
    return int(server_version(amqp_url).split(".")[0])


@pytest.fixture(autouse=True)
def _only_on_its_version(request: pytest.FixtureRequest) -> None:
    """A test marked rabbitmq3 or rabbitmq4 holds for that major version only: skipped on
    the other, saying so (scripts/test runs each on a broker of its version). The version
    is the broker's at AMQP_URL, or for a test that starts nodes of its own, theirs."""
    for major in (3, 4):
        if request.node.get_closest_marker(f"rabbitmq{major}"):
            if "amqp_url" in request.fixturenames:
                found, where = request.getfixturevalue("rabbitmq_major"), "at AMQP_URL"
            else:
                found, where = nodes.rabbitmq_major(), "of the local rabbitmq-server"
            if found != major:
                pytest.skip(f"RabbitMQ {major} behaviour; the RabbitMQ {where} is {found}.x")


def pytest_report_header(config: pytest.Config) -> str:
    """Which RabbitMQ and Erlang the integration tests run on."""
    if "not integration" in (config.option.markexpr or ""):
        return "RabbitMQ: none needed (-m 'not integration')"
    first = URL.split(",")[0]
    try:
        rabbitmq = server_version(first + ("&" if "?" in first else "?") + "connection_attempts=1")
    except AMQPError as error:
        return f"RabbitMQ: none answers at AMQP_URL ({error!r})"
    erlang = "unknown (rabbitmq-diagnostics does not reach its node)"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(
            ["rabbitmq-diagnostics", "-q", "erlang_version"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if done.returncode == 0:
            erlang = done.stdout.strip()
    return f"RabbitMQ {rabbitmq}; its node's Erlang (rabbitmq-diagnostics): {erlang}"


def connect(url: str, name: str) -> pika.BlockingConnection:
    """A connection named for the test, so that the broker's lists tell whose it is."""
    parameters = pika.URLParameters(url)
    parameters.client_properties = {"connection_name": name}
    return pika.BlockingConnection(parameters)


@pytest.fixture
def broker(amqp_url: str, request: pytest.FixtureRequest) -> Iterator[BlockingChannel]:
    """A channel of the test's own, for declaring, publishing and inspecting."""
    connection = connect(amqp_url, request.node.name)
    yield connection.channel()
    if connection.is_open:
        connection.close()


@pytest.fixture
def rpc_queue(amqp_url: str) -> Iterator[str]:
    """A queue name of this test's own, deleted afterwards."""
    name = f"rpc_test_{uuid.uuid4().hex}"
    yield name
    connection = connect(amqp_url, f"cleanup {name}")
    connection.channel().queue_delete(queue=name)
    connection.close()


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


@pytest.fixture
def start_server(amqp_url: str, rpc_queue: str) -> Iterator:
    """Start rpc_server.py on the test's queue (extra arguments appended); wait until ready."""
    servers: list[Server] = []

    def start(
        *args: str, ready: bool = True, env: dict[str, str] | None = None, code: str = ""
    ) -> Server:
        environment = {**os.environ, "AMQP_URL": amqp_url, "PYTHONUNBUFFERED": "1", **(env or {})}
        server = Server(
            ["--queue", rpc_queue, *args], {**environment, "PYTHONPATH": str(ROOT)}, code
        )
        servers.append(server)
        if ready:
            server.wait_for(READY)
        return server

    yield start
    for server in servers:
        server.kill()


@pytest.fixture
def client(amqp_url: str, rpc_queue: str) -> Iterator[rpc_client.FibonacciRpcClient]:
    with rpc_client.FibonacciRpcClient(amqp_url, timeout=10, queue=rpc_queue) as fibonacci_rpc:
        yield fibonacci_rpc


@pytest.fixture(autouse=True)
def _restore_what_main_changes() -> Iterator[None]:
    """Tests that call a script's main() in this process leave its global changes behind."""
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    pika_level = logging.getLogger("pika").level
    int_digits = sys.get_int_max_str_digits()  # rpc_server.main lifts it
    yield
    for sig, handler in handlers.items():
        signal.signal(sig, handler)
    logging.getLogger("pika").setLevel(pika_level)
    sys.set_int_max_str_digits(int_digits)


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


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--disruptive",
        action="store_true",
        help="also run the tests that restart the broker or change its users (on when CI=true)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test that uses the broker is marked integration (-m 'not integration' skips them).

    Tests marked disruptive run only when asked for, or in CI: they restart the broker
    at AMQP_URL or change its users, and that broker may be a developer's own.
    """
    run_disruptive = config.getoption("--disruptive") or os.environ.get("CI") == "true"
    for item in items:
        if "amqp_url" in getattr(item, "fixturenames", ()) or "local_rabbitmq" in item.keywords:
            item.add_marker(pytest.mark.integration)
        if "disruptive" in item.keywords and not run_disruptive:
            item.add_marker(pytest.mark.skip(reason="disturbs the broker: run with --disruptive"))
