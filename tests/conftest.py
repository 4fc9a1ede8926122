"""Fixtures for tests against a real RabbitMQ broker (AMQP_URL, default localhost).

Servers run as real `python rpc_server.py` processes, each test on a queue of its
own. Without a broker, integration tests fail when CI=true and skip otherwise.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator

import pika
import pytest
from pika.adapters.blocking_connection import BlockingChannel
from pika.exceptions import AMQPError

import rpc_client
from tests import nodes
from tests.support import (
    READY,
    ROOT,
    URL,
    Amqp10Requester,
    Foreign,
    Requester,
    Server,
    connect,
    fail_or_skip,
)
from tests.tcp_proxy import TcpProxy


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
                fail_or_skip(f"no RabbitMQ broker answers at AMQP_URL (or localhost): {error!r}")
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


@pytest.fixture(scope="session")
def rabbitmq_version(amqp_url: str) -> tuple[int, int]:
    """The broker's (major, minor) at AMQP_URL, for what came in a minor release."""
    major, minor = server_version(amqp_url).split(".")[:2]
    return int(major), int(minor)


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


# --- fixtures --------------------------------------------------------------------------


@pytest.fixture
def proxies(amqp_url: str) -> Iterator[list[TcpProxy]]:
    """Two TCP proxies to the broker: as far as a script can tell, two nodes."""
    parameters = pika.URLParameters(amqp_url)
    pair = [TcpProxy((parameters.host, parameters.port)) for _ in range(2)]
    yield pair
    for tcp_proxy in pair:
        tcp_proxy.close()


@pytest.fixture
def requester(amqp_url: str, rpc_queue: str, request: pytest.FixtureRequest) -> Iterator[Requester]:
    sender = Requester(amqp_url, rpc_queue, f"requester {request.node.name}")
    yield sender
    sender.close()


@pytest.fixture
def amqp10(amqp_url: str, rpc_queue: str) -> Iterator[Amqp10Requester]:
    """A requester to the test's queue over AMQP 1.0 (RabbitMQ 4: mark the test rabbitmq4)."""
    sender = Amqp10Requester(amqp_url, rpc_queue)
    yield sender
    sender.close()


@pytest.fixture(scope="session")
def rabbitmqctl(amqp_url: str) -> Callable[..., str]:
    """Run rabbitmqctl against the broker the tests use; skip (fail in CI) where it cannot."""

    def run(*args: str, timeout: float = 120) -> str:
        done = subprocess.run(
            ["rabbitmqctl", *args], capture_output=True, text=True, timeout=timeout
        )
        assert done.returncode == 0, f"rabbitmqctl {' '.join(args)}: {done.stderr.strip()}"
        return done.stdout

    if shutil.which("rabbitmqctl") is None:
        fail_or_skip("rabbitmqctl is not on PATH, so the broker cannot be restarted or inspected")
    # The node rabbitmqctl reaches must be the one at AMQP_URL: it lists our probe.
    probe = f"rabbitmqctl probe {uuid.uuid4().hex}"
    with connect(amqp_url, probe):
        try:
            listed = run("-q", "list_connections", "client_properties", timeout=30)
        except (AssertionError, OSError, subprocess.SubprocessError) as error:
            fail_or_skip(f"rabbitmqctl cannot reach the broker: {error}")
    if probe not in listed:
        fail_or_skip("rabbitmqctl manages another broker than the one at AMQP_URL")
    return run


@pytest.fixture
def foreign_headers(monkeypatch: pytest.MonkeyPatch) -> None:
    encode_value = pika.data.encode_value

    def encode(pieces: list[bytes], value: object) -> int:
        if isinstance(value, Foreign):
            pieces.append(bytes(value))
            return len(value)
        return encode_value(pieces, value)

    monkeypatch.setattr(pika.data, "encode_value", encode)


# --- broker restart ---------------------------------------------------------------------


@pytest.fixture
def durable_reply_queue(amqp_url: str, rpc_queue: str) -> Iterator[str]:
    """A reply queue that outlives a broker restart, as an exclusive one does not."""
    name = f"{rpc_queue}_replies"
    yield name
    with connect(amqp_url, f"cleanup {name}") as connection:
        connection.channel().queue_delete(queue=name)


# --- secrets -----------------------------------------------------------------


@pytest.fixture
def marked_user(rabbitmqctl) -> Iterator[tuple[str, str]]:
    """A broker user whose password is a unique marker, deleted afterwards."""
    user, password = f"rpc_test_{uuid.uuid4().hex[:12]}", f"secret{uuid.uuid4().hex}"
    rabbitmqctl("add_user", user, password)
    try:
        rabbitmqctl("set_permissions", "-p", "/", user, ".*", ".*", ".*")
        yield user, password
    finally:
        rabbitmqctl("delete_user", user)


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
