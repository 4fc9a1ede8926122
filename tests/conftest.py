"""Fixtures for tests against a real RabbitMQ broker (AMQP_URL, default localhost).

Servers run as real `python rpc_server.py` processes, each test on a queue of its
own. Without a broker, integration tests fail when CI=true and skip otherwise.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pika
import pytest
from pika.adapters.blocking_connection import BlockingChannel
from pika.exceptions import AMQPError

import rpc_client

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

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / "rpc_server.py"), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        for stream, seen in (
            (self.process.stdout, self.stdout),
            (self.process.stderr, self.stderr),
        ):
            threading.Thread(target=self._read, args=(stream, seen), daemon=True).start()

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

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()


@pytest.fixture
def start_server(amqp_url: str, rpc_queue: str) -> Iterator:
    """Start rpc_server.py on the test's queue (extra arguments appended); wait until ready."""
    servers: list[Server] = []

    def start(*args: str, ready: bool = True, env: dict[str, str] | None = None) -> Server:
        environment = {**os.environ, "AMQP_URL": amqp_url, "PYTHONUNBUFFERED": "1", **(env or {})}
        server = Server(["--queue", rpc_queue, *args], environment)
        servers.append(server)
        if ready:
            server.wait_for(READY)
        return server

    yield start
    for server in servers:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait()


@pytest.fixture
def client(amqp_url: str, rpc_queue: str) -> Iterator[rpc_client.FibonacciRpcClient]:
    with rpc_client.FibonacciRpcClient(amqp_url, timeout=10, queue=rpc_queue) as fibonacci_rpc:
        yield fibonacci_rpc


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test that uses the broker is marked integration (-m 'not integration' skips them)."""
    for item in items:
        if "amqp_url" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.integration)
