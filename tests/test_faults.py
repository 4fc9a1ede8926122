"""Faults, load and hostile input against one real broker: every call answered once, correctly.

Servers run as real `rpc_server.py` processes on a queue of the test's own (conftest's
start_server). A connection is cut with a TCP proxy between one process and the broker
(tests/tcp_proxy.py), never with `rabbitmqctl close_all_connections`, which would cut
every other user of the broker too. Tests that restart the broker or add users to it
are marked disruptive; the cluster's faults are in test_cluster.py.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import pika
import pika.data
import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

import rpc_client
import rpc_server
from tests.conftest import (
    READY,
    ROOT,
    connect,
    digits,
    run_script,
    wait_until,
)
from tests.tcp_proxy import TcpProxy

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


def queued(channel: Any, queue: str) -> int:
    return channel.queue_declare(queue=queue, passive=True).method.message_count


def fail_or_skip(reason: str) -> None:
    """A missing tool fails the test in CI, where it must be there; elsewhere it skips."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}; CI needs it", pytrace=False)
    pytest.skip(reason)


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


# --- a server's connection lost -------------------------------------------------------------


def test_a_server_that_loses_its_node_takes_the_next_at_once_and_answers_all(
    start_server, proxies: list[TcpProxy], amqp_url: str, requester: Requester, broker
) -> None:
    urls = ",".join(through(amqp_url, tcp_proxy) for tcp_proxy in proxies)
    server = start_server("--url", urls, "--prefetch", "5", "--max-n", str(10**6))
    time.sleep(rpc_server.BACKOFF_CAP)  # a node that served a while: its loss costs no wait
    # In hand, not acked, when the node goes: redelivered and answered on the next.
    expected = {requester.send(b"600000"): 600000}
    server.wait_for(" [.] fib(600000)")
    for i in range(300):
        if i == 100:
            lost = next(tcp_proxy for tcp_proxy in proxies if tcp_proxy.links)
            lost.refusing = True  # the node is gone: it takes no connection either
            assert lost.drop_all() == 1
        n = (i * 7919) % 2000
        expected[requester.send(str(n).encode())] = n
        requester.poll(0.002)
    requester.wait(expected, timeout=60)
    for corr_id, n in expected.items():
        assert {(props.type, body) for props, body in requester.replies[corr_id]} == {
            (None, digits(n))
        }, f"fib({n})"
    # Answered twice only where a reply left and its ack did not: the prefetch window.
    assert sum(len(requester.replies[corr_id]) - 1 for corr_id in expected) <= 5
    assert server.stdout.count(READY) == 2
    assert reconnect_delays(server) == []  # the other node at once
    assert sum("connection lost" in line for line in server.stderr) == 1, server.stderr
    wait_until(lambda: queued(broker, requester.queue) == 0, 10, "request queue empty")
    # The work in hand finished on the lost connection, and its thread ended quietly.
    finished = "fib(600000) finished on a lost connection"
    wait_until(lambda: any(finished in line for line in server.stderr), 30, "the log line")
    assert not any("Traceback" in line for line in server.stderr), server.stderr


def test_server_backs_off_with_jitter_up_to_a_cap_when_every_node_fails(
    start_server, proxies: list[TcpProxy], amqp_url: str, rpc_queue: str, requester, broker
) -> None:
    server = start_server("--url", through(amqp_url, proxies[0]))
    proxies[0].refusing = True  # the broker is unreachable: each attempt fails
    proxies[0].drop_all()
    wait_until(lambda: reconnect_delays(server), 10, "first reconnection delay")
    # Deleted while the server is away: it must declare the queue again when it is back.
    broker.queue_delete(queue=rpc_queue)
    wait_until(lambda: len(reconnect_delays(server)) >= 8, 30, "eight failed attempts")
    proxies[0].refusing = False
    server.wait_for(READY, timeout=10)  # at most the 5 s cap after the last failure
    delays = reconnect_delays(server)[:8]
    for attempt, delay in enumerate(delays):
        base = min(5.0, 0.1 * 2**attempt)  # 0.1 s, doubling at each failure, 5 s at most
        # jitter: between half and all of it; the log rounds to 0.1 s
        assert base / 2 - 0.05 <= delay <= base + 0.05, f"attempt {attempt}: {delays}"
    bases = [min(5.0, 0.1 * 2**attempt) for attempt in range(len(delays))]
    assert any(abs(delay - base) > 0.1 for delay, base in zip(delays, bases, strict=True)), (
        f"no jitter: {delays}"
    )
    corr_id = requester.send(b"30")
    requester.wait([corr_id], timeout=20)
    assert requester.replies[corr_id][0][1] == b"832040"


class Foreign(bytes):
    """A header value as another client library may encode it: a type octet, then the value.

    pika cannot encode these (a timestamp past the year 9999, a double), but Java, .NET
    and Go clients can, and the broker passes them on.
    """


@pytest.fixture
def foreign_headers(monkeypatch: pytest.MonkeyPatch) -> None:
    encode_value = pika.data.encode_value

    def encode(pieces: list[bytes], value: object) -> int:
        if isinstance(value, Foreign):
            pieces.append(bytes(value))
            return len(value)
        return encode_value(pieces, value)

    monkeypatch.setattr(pika.data, "encode_value", encode)


@pytest.mark.disruptive  # a policy on the broker, for the test's queue alone
@pytest.mark.local_rabbitmq
@pytest.mark.parametrize(
    "poison",
    [
        {"headers": {"t": Foreign(b"T" + b"\xff" * 8)}},  # a timestamp past the year 9999
        pytest.param(  # forged: RabbitMQ 3.10 answers with 541; 4.3 drops the reply
            {"reply_to": "amq.rabbitmq.reply-to.abc.def"}, marks=pytest.mark.rabbitmq3
        ),
    ],
    ids=["a-header-pika-cannot-decode", "a-forged-direct-reply-to"],
)
def test_a_request_that_costs_the_connection_is_dropped_by_the_delivery_limit(
    start_server, rabbitmqctl, requester: Requester, rpc_queue: str, broker, foreign_headers, poison
) -> None:
    # What the README tells operators of RabbitMQ 3.x to set (RabbitMQ 4 has it by default).
    policy = f"{rpc_queue}-limit"
    rabbitmqctl(
        "set_policy", policy, f"^{rpc_queue}$", '{"delivery-limit": 3}', "--apply-to", "queues"
    )
    try:
        server = start_server()
        poisoned = requester.send(b"30", **poison)
        after = requester.send(b"10")
        requester.wait([after], timeout=60)
        assert requester.replies[after][0][1] == b"55"
        assert poisoned not in requester.replies  # dropped by the broker, unanswered
        losses = sum("connection lost" in line for line in server.stderr)
        assert losses == 4, server.stderr  # the first delivery and three redeliveries
        assert len(reconnect_delays(server)) == 4  # backed off: no tight loop
        assert queued(broker, rpc_queue) == 0
    finally:
        rabbitmqctl("clear_policy", policy)


# --- broker restart ---------------------------------------------------------------------


@pytest.fixture
def durable_reply_queue(amqp_url: str, rpc_queue: str) -> Iterator[str]:
    """A reply queue that outlives a broker restart, as an exclusive one does not."""
    name = f"{rpc_queue}_replies"
    yield name
    with connect(amqp_url, f"cleanup {name}") as connection:
        connection.channel().queue_delete(queue=name)


def wait_for_broker(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            connect(url, "broker restart probe").close()
            return
        except pika.exceptions.AMQPError:
            assert time.monotonic() < deadline, f"the broker did not answer within {timeout} s"
            time.sleep(0.2)


@pytest.mark.disruptive
@pytest.mark.local_rabbitmq
def test_broker_restart_server_serves_again_and_answers_queued_requests(
    start_server, rabbitmqctl, amqp_url: str, rpc_queue: str, durable_reply_queue: str
) -> None:
    big = 600_000  # seconds of work: in hand while the broker stops, the rest queued behind
    server = start_server("--max-n", str(big))
    ns = [0, 1, 10, 30, 10_000, 12_345]
    expected: dict[str, int] = {}
    with connect(amqp_url, f"requester {rpc_queue}") as connection:
        channel = connection.channel()
        channel.queue_declare(queue=durable_reply_queue, durable=True)
        for n in [big, *ns]:
            corr_id = uuid.uuid4().hex
            channel.basic_publish(
                exchange="",
                routing_key=rpc_queue,
                properties=pika.BasicProperties(
                    reply_to=durable_reply_queue, correlation_id=corr_id, delivery_mode=2
                ),
                body=str(n).encode(),
            )
            expected[corr_id] = n
        server.wait_for(f" [.] fib({big})")
        # A quorum queue counts a message once its log has it: a moment after the publish.
        wait_until(lambda: queued(channel, rpc_queue) == len(ns), 10, "the rest queued")
    try:
        rabbitmqctl("stop_app")
    finally:
        rabbitmqctl("start_app")  # whatever happens, the broker comes back for everyone
    wait_for_broker(amqp_url, timeout=60)
    wait_until(lambda: server.stdout.count(READY) == 2, 15, "server consuming again")
    before = server.stdout.index(READY, server.stdout.index(READY) + 1)
    assert not any(line in server.stdout[:before] for line in (f" [.] fib({n})" for n in ns)), (
        "the requests were answered before the restart: the test proved nothing"
    )
    replies: dict[str, list[tuple[str | None, bytes]]] = defaultdict(list)
    with connect(amqp_url, f"reply reader {rpc_queue}") as connection:
        channel = connection.channel()
        for method, props, body in channel.consume(
            durable_reply_queue, auto_ack=True, inactivity_timeout=30
        ):
            assert method is not None, f"unanswered: {set(expected) - set(replies)}"
            replies[props.correlation_id].append((props.type, body))
            if set(replies) == set(expected):
                break
        channel.cancel()
    for corr_id, n in expected.items():
        assert replies[corr_id] == [(None, digits(n))]


# --- a server killed, a client's connection lost ------------------------------------------


def test_a_request_is_acked_only_once_the_broker_confirms_its_reply(
    start_server, proxies: list[TcpProxy], amqp_url: str, requester: Requester, broker
) -> None:
    proxy, n = proxies[0], 200_000  # half a second of work each, in a thread
    server = start_server("--url", through(amqp_url, proxy), "--prefetch", "2", "--max-n", str(n))
    corr_ids = [requester.send(str(n).encode()) for _ in range(2)]
    for _ in corr_ids:
        server.wait_for(f" [.] fib({n})")
    # From now on no confirm reaches the server, while its frames still reach the broker.
    # (All is over before its check of the queue, every 5 s, which would wait for an answer.)
    proxy.deaf.set()
    requester.wait(corr_ids, timeout=30)  # both replies left: the second did not wait
    time.sleep(0.5)  # an ack sent without waiting for the confirm would be at the broker now
    server.kill()  # the broker requeues what the server had not acked
    wait_until(lambda: queued(broker, requester.queue) == 2, 10, "both requests requeued")


def test_server_killed_mid_request_another_answers_exactly_once(
    start_server, requester: Requester
) -> None:
    n = 600_000  # two seconds of work: the kill lands while it computes
    servers = [start_server("--max-n", str(n)), start_server("--max-n", str(n))]
    corr_id = requester.send(str(n).encode())
    wanted = f" [.] fib({n})"
    wait_until(lambda: any(wanted in s.stdout for s in servers), 20, "a server took it")
    killed, survivor = servers if wanted in servers[0].stdout else servers[::-1]
    killed.process.kill()  # SIGKILL: no reply, no ack, no goodbye
    killed.process.wait()
    requester.wait([corr_id], timeout=60)
    assert wanted in survivor.stdout  # the broker redelivered it to the other server
    requester.poll(1)  # time for a duplicate, were there one
    assert [body for _, body in requester.replies[corr_id]] == [digits(n)]
    assert survivor.process.poll() is None


@pytest.mark.parametrize("retries", [1, 0])
def test_client_loses_its_connection_during_a_call(
    start_server, proxies: list[TcpProxy], amqp_url: str, rpc_queue: str, requester, broker, retries
) -> None:
    server = start_server("--max-n", "600000")  # prefetch 1: one request at a time
    requester.send(b"600000")  # keeps the server busy while the call waits
    server.wait_for(" [.] fib(600000)")
    proxy = proxies[0]
    url = through(amqp_url, proxy)
    with rpc_client.FibonacciRpcClient(url, timeout=30, queue=rpc_queue, retries=retries) as client:
        outcome: list[object] = []
        caller = threading.Thread(target=lambda: outcome.append(catch(client.call, 30)))
        caller.start()
        wait_until(lambda: queued(broker, rpc_queue) == 1, 10, "the call's request queued")
        assert proxy.drop_all() == 1  # the client's connection, while it waits for the reply
        caller.join(30)
        if retries:
            assert outcome == [832040]  # sent again on a fresh connection
            assert proxy.accepted == 2
        else:
            [error] = outcome
            assert isinstance(error, rpc_client.RpcConnectionError)
            assert str(error).startswith("connection lost: ")
        # The same object, nothing rebuilt by the caller: the next call connects again.
        assert client.call(10) == 55


def test_an_idle_client_whose_connection_the_broker_closed_reconnects_at_no_cost(
    start_server, amqp_url: str, rpc_queue: str
) -> None:
    start_server()
    heartbeat = 1  # seconds: the broker closes a connection silent for two of them
    with rpc_client.FibonacciRpcClient(
        with_query(amqp_url, f"heartbeat={heartbeat}"), queue=rpc_queue, retries=0
    ) as client:
        assert client.call(10) == 55
        idle = client.connection
        time.sleep(4 * heartbeat)  # no I/O at all: no heartbeats from us
        assert client.call(30) == 832040  # retries=0, yet no RpcConnectionError
        assert client.connection is not idle  # it was closed, and replaced before sending


def test_a_call_over_a_network_gone_silent_ends_at_its_timeout(
    start_server, proxies: list[TcpProxy], amqp_url: str, rpc_queue: str
) -> None:
    start_server()
    proxy = proxies[0]
    with rpc_client.FibonacciRpcClient(through(amqp_url, proxy), queue=rpc_queue) as client:
        assert client.call(30) == 832040
        proxy.silent.set()  # a partition: nothing passes, nothing closes
        # Not RpcConnectionError at pika's heartbeat timeout, a minute or more later.
        with pytest.raises(rpc_client.RpcTimeoutError, match=r"within the timeout$"):
            client.call(30, timeout=2)
        proxy.drop_all()  # so that close() need not wait for the heartbeat timeout


@pytest.mark.local_rabbitmq
def test_a_deleted_callback_queue_is_a_lost_connection_and_the_next_call_reconnects(
    start_server, amqp_url: str, rpc_queue: str, rabbitmqctl
) -> None:
    server = start_server("--max-n", "600000")
    with rpc_client.FibonacciRpcClient(amqp_url, timeout=30, queue=rpc_queue, retries=0) as client:
        outcome: list[object] = []
        caller = threading.Thread(target=lambda: outcome.append(catch(client.call, 600000)))
        caller.start()
        server.wait_for(" [.] fib(600000)")
        rabbitmqctl("delete_queue", client.callback_queue)  # as an operator might
        caller.join(30)
        [error] = outcome
        assert isinstance(error, rpc_client.RpcConnectionError)
        assert "cancelled the consumer of our callback queue" in str(error)
        assert client.call(30) == 832040  # on a new connection, at no cost (retries=0)
        # Deleted while the client is idle: the next call reconnects before sending.
        rabbitmqctl("delete_queue", client.callback_queue)
        wait_until(
            lambda: client.connection.process_data_events(0) or client.broken, 10, "the cancel"
        )
        assert client.call(10) == 55


def test_a_long_computation_does_not_cost_the_server_its_connection(
    start_server, amqp_url: str, requester: Requester
) -> None:
    heartbeat, n = 1, 800_000  # seconds of work: several heartbeat intervals
    server = start_server(
        "--url", with_query(amqp_url, f"heartbeat={heartbeat}"), "--max-n", str(n)
    )
    corr_id = requester.send(str(n).encode())
    requester.wait([corr_id], timeout=120)
    [(props, body)] = requester.replies[corr_id]
    assert (props.type, body) == (None, digits(n))
    assert server.stdout.count(READY) == 1  # never reconnected
    assert not any("lost" in line for line in server.stderr), server.stderr


# --- load -----------------------------------------------------------------------------------

LOAD_NS = [0, 1, 2, 10, 30, 93, 500, 1000, 4000, 9999, 15_000, 20_000]


def load_client(url: str, queue: str, calls: str, seed: str) -> None:
    """One client process of the load test: prints a JSON summary of its calls."""
    answers = {n: rpc_server.fib(n) for n in LOAD_NS}
    rng = random.Random(int(seed))
    summary: dict[str, Any] = {"calls": 0, "wrong": [], "errors": []}
    with rpc_client.FibonacciRpcClient(url, timeout=30, queue=queue) as client:
        for _ in range(int(calls)):
            n = rng.choice(LOAD_NS)
            try:
                result = client.call(n)
            except Exception as error:  # recorded: the test fails on any
                summary["errors"].append(repr(error))
                continue
            summary["calls"] += 1
            if result != answers[n]:
                summary["wrong"].append(n)
    print(json.dumps(summary))


def test_load_eight_clients_two_servers(
    start_server, amqp_url: str, rpc_queue: str, broker, capsys: pytest.CaptureFixture[str]
) -> None:
    clients, calls = 8, 500
    servers = [start_server("--quiet"), start_server("--quiet")]
    code = "import sys; from tests.test_faults import load_client; load_client(*sys.argv[1:])"
    started = time.monotonic()
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", code, amqp_url, rpc_queue, str(calls), str(seed)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed in range(clients)
    ]
    summaries = []
    try:
        for process in processes:
            out, err = process.communicate(timeout=max(0.1, started + 120 - time.monotonic()))
            assert process.returncode == 0, err
            summaries.append(json.loads(out))
    finally:
        for process in processes:  # bounded: none outlives two minutes
            if process.poll() is None:
                process.kill()
                process.wait()
    elapsed = time.monotonic() - started
    with capsys.disabled():
        print(f"\n  load: {clients * calls} calls in {elapsed:.1f} s")
    assert summaries == [{"calls": calls, "wrong": [], "errors": []}] * clients
    assert queued(broker, rpc_queue) == 0
    assert all(server.process.poll() is None for server in servers)


# --- hostile input -----------------------------------------------------------------------

short_text = st.text(max_size=40)  # a short string holds 255 bytes: 40 characters always fit
header_value = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**63), 2**63 - 1),
        st.text(max_size=50),
        st.binary(max_size=50),
        st.datetimes(min_value=datetime(1970, 1, 1), max_value=datetime(9999, 12, 31)),
        st.decimals(min_value=-1000, max_value=1000, places=3),
        # (a timestamp past the year 9999 costs a connection: see the delivery-limit test)
        st.floats(allow_nan=False, allow_infinity=False).map(
            lambda v: Foreign(b"d" + struct.pack(">d", v))
        ),
        st.integers(-(2**15), 2**15 - 1).map(lambda v: Foreign(b"s" + struct.pack(">h", v))),
        st.integers(-128, 127).map(lambda v: Foreign(b"b" + struct.pack(">b", v))),
    ),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=10), children, max_size=3)
    ),
    max_leaves=8,
)
hostile_properties = st.fixed_dictionaries(
    {},
    optional={
        "correlation_id": short_text | st.binary(max_size=40),
        "content_type": short_text,
        "content_encoding": short_text,
        "headers": st.dictionaries(st.text(max_size=20), header_value, max_size=5),
        "delivery_mode": st.sampled_from([1, 2]),
        "priority": st.integers(0, 255),
        "expiration": st.integers(60_000, 10**9).map(str),  # never expires during the test
        "message_id": short_text,
        "timestamp": st.integers(0, 253402300799),  # up to the year 9999
        "type": short_text,
        "app_id": short_text,
    },
)
OURS, REQUEST_QUEUE = "<our reply queue>", "<the request queue>"
hostile_reply_to = st.one_of(
    st.just(OURS),
    st.sampled_from(
        [
            None,
            "",
            REQUEST_QUEUE,  # the reply comes back as a request without reply_to
            # (plain "amq.rabbitmq.reply-to" the broker refuses from a publisher that
            # does not consume it: it closes the publisher's channel, not ours to test)
            "amq.rabbitmq.reply-to.bogus",
            "no-such-queue",
        ]
    ),
    short_text | st.binary(min_size=1, max_size=40),
)
hostile_body = st.one_of(
    st.integers(0, 3000).map(lambda n: str(n).encode()),
    st.binary(max_size=100),
    st.text(max_size=30).map(str.encode),
    # huge: up to 8 MB, refused by its length alone
    st.tuples(st.binary(min_size=1, max_size=3), st.integers(65, 8 * 2**20)).map(
        lambda t: (t[0] * (t[1] // len(t[0]) + 1))[: t[1]]
    ),
)


def as_decoded(value: str | bytes | None) -> str | bytes | None:
    """A short string as pika decodes it: text where it is UTF-8, else the bytes."""
    try:
        return value.decode() if isinstance(value, bytes) else value
    except UnicodeDecodeError:
        return value


def test_hostile_requests_get_one_reply_each_and_the_queue_drains(
    start_server, requester: Requester, rpc_queue: str, broker, foreign_headers: None
) -> None:
    server = start_server("--quiet", "--prefetch", "1")

    @settings(
        max_examples=150,
        deadline=None,
        # The server is one for all examples; a failing one leaves it broken, so the
        # first failure is reported as found, not shrunk against a broken server.
        phases=[Phase.explicit, Phase.reuse, Phase.generate],
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(body=hostile_body, reply_to=hostile_reply_to, properties=hostile_properties)
    @example(body=b"7" * 65, reply_to=REQUEST_QUEUE, properties={})
    @example(body=b"30", reply_to=OURS, properties={"message_id": "m", "correlation_id": ""})
    def hostile(body: bytes, reply_to: str | bytes | None, properties: dict[str, Any]) -> None:
        route = {OURS: requester.reply_queue, REQUEST_QUEUE: rpc_queue}.get(reply_to, reply_to)
        requester.channel.basic_publish(
            exchange="",
            routing_key=rpc_queue,
            properties=pika.BasicProperties(reply_to=route, **properties),
            body=body,
        )
        # A fence behind it, of its priority (RabbitMQ 4 delivers 5 and above first): with
        # prefetch 1 the server takes the fence only after it has acked the request.
        fence = requester.send(b"1", priority=properties.get("priority"))
        requester.replies.clear()
        deadline = time.monotonic() + 10
        while fence not in requester.replies:
            assert time.monotonic() < deadline, "no reply to the fence: the request is stuck"
            requester.poll(0.05)
        replies = [
            reply for key, items in requester.replies.items() if key != fence for reply in items
        ]
        if reply_to != OURS:
            assert replies == []
            return
        [(props, reply)] = replies  # exactly one
        sent_id = properties.get("correlation_id") or properties.get("message_id")
        assert props.correlation_id == as_decoded(sent_id)
        assert props.type in (None, "error")
        if props.type is None:  # only a number is answered, and correctly
            n = int(body.decode().strip())
            assert reply == digits(n)
        if re.fullmatch(rb"\d{1,4}", body):
            assert props.type is None, reply

    hostile()
    assert server.process.poll() is None
    assert server.stdout.count(READY) == 1  # it never even lost its connection
    assert not any("Traceback" in line or " lost " in line for line in server.stderr)
    wait_until(lambda: queued(broker, rpc_queue) == 0, 10, "request queue empty")


# --- soak -------------------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    """Resident memory of a process, in KiB."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return int(fields["VmRSS"].split()[0])


@pytest.mark.local_rabbitmq
def test_soak_50000_calls_memory_flat_and_no_leaked_connections(
    start_server, rabbitmqctl, amqp_url: str, rpc_queue: str
) -> None:
    if not Path(f"/proc/{os.getpid()}/status").exists():
        fail_or_skip("no /proc here to read a process's resident memory from")
    marker = f"soak {uuid.uuid4().hex}"
    server = start_server(
        "--quiet", "--prefetch", "100", "--url", named(amqp_url, f"{marker} server")
    )
    wait_until(lambda: our_connections(rabbitmqctl, marker) == (1, 1), 10, "server listed")
    baseline = our_connections(rabbitmqctl, marker)
    answers = {n: rpc_server.fib(n) for n in range(rpc_server.MAX_N + 1)}
    rss = []
    for round_ in range(10):  # ten clients in turn, 5000 calls each, each closed after
        ns = [(round_ + i * 7919) % (rpc_server.MAX_N + 1) for i in range(5000)]
        with rpc_client.FibonacciRpcClient(
            named(amqp_url, f"{marker} client {round_}"), timeout=30, queue=rpc_queue
        ) as client:
            assert client.call_many(ns, window=100) == [answers[n] for n in ns]
        rss.append(rss_kib(server.process.pid))
    growth = rss[-1] - rss[0]
    assert growth < 10 * 1024, f"server RSS grew by {growth} KiB: {rss}"
    wait_until(
        lambda: our_connections(rabbitmqctl, marker) == baseline,
        10,
        f"connections and channels back to {baseline}",
    )
    assert server.process.poll() is None
    print(f"soak RSS KiB: {rss}")


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


def free_port() -> int:
    """A local port nothing listens on (probably: it was free a moment ago)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.disruptive
@pytest.mark.local_rabbitmq
def test_the_password_never_shows(
    start_server, marked_user: tuple[str, str], amqp_url: str, rpc_queue: str, caplog
) -> None:
    user, password = marked_user
    host = pika.URLParameters(amqp_url)
    url = f"amqp://{user}:{password}@{host.host}:{host.port}/%2F"
    seen: list[str] = []

    # Working, verbose: pika's debug log included.
    server = start_server("--verbose", "--max-n", "100", "--url", url)
    done = run_script("rpc_client.py", "--verbose", "--url", url, "--queue", rpc_queue, "30", "101")
    assert done.returncode == 1  # fib(101) is refused: an error reply
    assert " [.] Got 832040" in done.stdout
    seen += [done.stdout, done.stderr]
    assert server.stop() == 0
    seen += server.stdout + server.stderr
    assert any("DEBUG pika" in line for line in seen)  # verbose indeed

    # Failing: nothing listening, a refused login, a user that does not exist, bad URLs,
    # TLS to a port without it.
    wrong = [
        f"amqp://{user}:{password}@127.0.0.1:{free_port()}/%2F",
        f"amqps://{user}:{password}@{host.host}:{host.port}/%2F",
        f"amqp://{user}:not{password}@{host.host}:{host.port}/%2F",
        f"amqp://nobody_{user}:{password}@{host.host}:{host.port}/%2F",
        f"amqp://{user}:{password}@{host.host}:{host.port}/%2F?bogus=1",
        f"amqp://{user}:{password}@{host.host}:port/%2F",
    ]
    for bad in wrong:
        for script in ("rpc_server.py", "rpc_client.py"):
            done = run_script(script, "--verbose", "--url", bad, "--queue", rpc_queue)
            assert done.returncode in (1, 2), (script, bad, done.stderr)
            # the last line says what failed (--verbose logs pika's tracebacks before it)
            assert done.stderr.splitlines()[-1].startswith(script.removesuffix(".py")), done.stderr
            seen += [done.stdout, done.stderr]
        with (
            caplog.at_level("DEBUG", logger="pika"),
            pytest.raises((ValueError, ConnectionError)) as error,
        ):
            rpc_client.FibonacciRpcClient(bad, queue=rpc_queue)
        seen += [str(error.value), repr(error.value), caplog.text]
    leaks = [text for text in seen if password in text]
    assert leaks == []
