"""A RabbitMQ 4.3 cluster cut in two: one node cut off from the two others for 20 s.

The three nodes run in network namespaces (tests/partition.py), with net_ticktime = 10.
One client calls in a loop, on the node cut off or on the majority side; a server is on
each side. Every process is given all three URLs. The promises: no wrong answer, nothing
but the client's own errors (no raw pika exception), no NoServerError while a server the
client can reach consumes (a client on the node cut off moves), and service after the
heal. The figures (calls, errors, worst call, outages, times back in service after the
cut and after the heal) are printed, not asserted.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import datetime

import pika
import pytest

import amqp_rpc
import rpc_client
import rpc_server
from tests.partition import NamespacedNode, Partition, need_tools
from tests.support import READY, Server, wait_until

pytestmark = [pytest.mark.local_rabbitmq, pytest.mark.partition]

ANSWERS = [rpc_server.fib(n) for n in range(301)]
CUT = 20.0  # seconds
AFTER = 15.0  # seconds of calls after the heal


@pytest.mark.parametrize("client_side", ["cut off", "majority"])
def test_a_20_s_cut_of_one_node_no_wrong_answer_no_raw_exception(
    partition: Partition, queue: str, client_side: str
) -> None:
    """A server on each side; the client on the node cut off, or on the majority side."""
    name = f"partition client {uuid.uuid4().hex}"
    client = rpc_client.FibonacciRpcClient(partition.url(name), timeout=10, queue=queue)
    servers: list[Server] = []
    try:
        on = partition.node_of(name)
        assert client.nodes[-1].host == on.ip  # connect() moves the node it is on last
        cut_off = on if client_side == "cut off" else partition.nodes[partition.nodes.index(on) - 1]
        majority = {node.name for node in partition.nodes if node is not cut_off}
        # Its leader on the majority side: a cut leader leaves the queue without one for ~10 s.
        declare(partition, queue, on=next(n for n in partition.nodes if n.name in majority))
        servers = start_servers(partition, queue, [{cut_off.name}, majority])
        started_on = [where(partition, server) for server in servers]
        leader = partition.queue_info(queue)["leader"]
        calls: list[tuple[float, float, str]] = []
        wrong, raw = [], []
        start, cut_wall = time.monotonic(), time.time() + 2
        cut_at, heal_at = start + 2, start + 2 + CUT
        # NOTE: on timers, not after a rabbitmqctl: during a cut, one can block for 30 s.
        timers = [
            threading.Timer(2, partition.cut, [cut_off]),
            threading.Timer(2 + CUT, partition.heal),
        ]
        for timer in timers:
            timer.start()
        client_nodes = []
        while time.monotonic() < heal_at + AFTER:
            n = len(calls) % len(ANSWERS)
            started = time.monotonic()
            try:
                outcome = "ok" if client.call(n) == ANSWERS[n] else "wrong"
            except (rpc_client.RpcError, ConnectionError, TimeoutError) as error:
                outcome = type(error).__name__
            except Exception as error:  # counted, and the test fails on it
                outcome = "raw " + type(error).__name__
                raw.append(repr(error))
            calls.append((started, time.monotonic(), outcome))
            wrong += [n] if outcome == "wrong" else []
            if client.connection is not None:
                client_nodes.append(partition.by_address(client.nodes[-1].host).name)
            time.sleep(0.005)
        for timer in timers:
            timer.join()
        found = figures(calls, cut_at, heal_at)
        # Each server's connections after the cut: (s after the cut, node).
        found["servers"] = [
            [(round(t - cut_wall, 1), node) for t, node in connections(partition, server)[1:]]
            for server in servers
        ]
        cut_side = servers[started_on.index(cut_off.name)]
        print(
            f"\n{CUT:.0f} s cut of {cut_off.name} (queue leader {leader}); the client on"
            f" {on.name}, later on {sorted(set(client_nodes))}; servers started on"
            f" {started_on}, at the end on {[where(partition, s) for s in servers]}, having"
            f" lost their connection {[sum('connection lost' in line for line in s.stderr) for s in servers]}"
            f" times: {found}"
        )
        assert wrong == []
        assert raw == []
        # A server consumed on the majority side all along, and the client could reach it.
        assert "NoServerError" not in found["errors"]
        # The server on the node cut off saw it (its queue counts no consumer) and moved.
        assert any(
            node in majority and t < cut_wall + CUT for t, node in connections(partition, cut_side)
        ), cut_side.stderr
        assert found["back after the heal"] is not None, "no answer after the heal"
    finally:
        partition.heal()
        client.close()
        for server in servers:
            server.kill()


def test_a_new_client_whose_first_node_is_cut_off_connects_through_another(
    partition: Partition, queue: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cut-off node takes the connection, then refuses the callback queue (541
    INTERNAL_ERROR: the metadata store timed out, after about 30 s): the client moves on,
    and no raw pika exception comes out."""
    cut_off, *majority = partition.nodes
    declare(partition, queue, on=majority[0])
    servers = start_servers(partition, queue, [{node.name for node in majority}])
    monkeypatch.setattr(amqp_rpc.random, "shuffle", lambda nodes: None)  # the URLs' order
    name = f"partition client {uuid.uuid4().hex}"
    urls = partition.url(name).split(",")
    timers = [threading.Timer(0, partition.cut, [cut_off]), threading.Timer(45, partition.heal)]
    try:
        for timer in timers:
            timer.start()
        time.sleep(1)
        started = time.monotonic()
        with rpc_client.FibonacciRpcClient(",".join(urls), timeout=10, queue=queue) as client:
            took = time.monotonic() - started
            on = partition.by_address(client.nodes[-1].host)
            assert client.call(30) == 832040
        print(f"\na new client first given the cut-off node: on {on.name} after {took:.1f} s")
        assert on is not cut_off
    finally:
        for timer in timers:
            timer.cancel()
        partition.heal()
        for server in servers:
            server.kill()


@pytest.fixture(scope="module")
def partition() -> Iterator[Partition]:
    cluster = Partition(need_tools())
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.heal()
        cluster.remove()


@pytest.fixture
def queue(partition: Partition) -> Iterator[str]:
    """A queue name of the test's own, deleted afterwards."""
    name = f"rpc_partition_{uuid.uuid4().hex}"
    yield name
    partition.heal()
    connection = pika.BlockingConnection(pika.URLParameters(partition.nodes[0].url))
    connection.channel().queue_delete(queue=name)
    connection.close()


def declare(partition: Partition, queue: str, on: NamespacedNode) -> None:
    """Declare the queue as the server does, on a node that then leads it; wait for its
    three members."""
    connection = pika.BlockingConnection(pika.URLParameters(on.url))
    connection.channel().queue_declare(queue, durable=True, arguments=amqp_rpc.QUEUE_ARGUMENTS)
    connection.close()
    wait_until(lambda: len(partition.queue_info(queue)["online"]) == 3, 30, "three members")


def connections(partition: Partition, server: Server) -> list[tuple[float, str]]:
    """(wall-clock time, node) of each connection a server made, from its log lines
    "<asctime> INFO amqp_rpc: connected to HOST:PORT"."""
    return [
        (
            datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp(),
            partition.by_address(line.split("connected to ")[1].split(":")[0]).name,
        )
        for line in server.stderr
        if "amqp_rpc: connected to " in line
    ]


def where(partition: Partition, server: Server) -> str:
    """The node a server is connected to now."""
    return connections(partition, server)[-1][1]


def start_servers(partition: Partition, queue: str, on: list[set[str]]) -> list[Server]:
    """A server on a node of each set in on: servers given all three URLs pick a node at
    random, so servers are started until one has landed on each; the others are stopped."""
    wanted, kept, spare = list(on), [], []
    for i in range(30):
        env = {**os.environ, "AMQP_URL": partition.url(f"server {i}"), "PYTHONUNBUFFERED": "1"}
        server = Server(["--queue", queue, "--quiet"], env)
        server.wait_for(READY)
        node = where(partition, server)
        fits = next((nodes for nodes in wanted if node in nodes), None)
        (spare if fits is None else kept).append(server)
        if fits is not None:
            wanted.remove(fits)
        if not wanted:
            break
    for server in spare:
        server.kill()
    assert not wanted, f"no server landed on {wanted}"
    return kept


def figures(calls: list[tuple[float, float, str]], cut: float, heal: float) -> dict:
    """Calls (start, end, outcome) summed up, with the outages (from the start of a failed
    call to the end of the next answer, in s from the cut) and the times back in service."""
    outages: list[list[float]] = []
    for start, end, outcome in calls:
        if outcome != "ok" and not (outages and outages[-1][1] is None):
            outages.append([round(start - cut, 1), None])
        elif outcome == "ok" and outages and outages[-1][1] is None:
            outages[-1][1] = round(end - cut, 1)
    during = [out for out in outages if out[0] < heal - cut and (out[1] or 1e9) > 0]
    after = [out for out in outages if (out[1] or 1e9) > heal - cut]
    return {
        "calls": len(calls),
        "errors": dict(Counter(outcome for *_, outcome in calls if outcome != "ok")),
        "worst": round(max(end - start for start, end, _ in calls), 2),
        "outages": outages,
        # None: not before the heal; 0: never out of service
        "back after the cut": during[-1][1]
        if during and (during[-1][1] or 1e9) < heal - cut
        else (0.0 if not during else None),
        "back after the heal": round(after[-1][1] - (heal - cut), 1)
        if after and after[-1][1]
        else (0.0 if not after else None),
    }
