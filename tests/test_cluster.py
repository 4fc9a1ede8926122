"""A three-node RabbitMQ cluster losing nodes, a resource alarm and a cancelled consumer.

The nodes are started from the local rabbitmq-server on loopback (tests/nodes.py),
c1..c3 on ports 5781-5783 (in slot 0), once for the module. Every test has a quorum
queue of its own with a member on each node; a node killed (SIGKILL: no goodbye to
anyone) is started again with its data, and the queue's three members are back,
before the next test. Servers and load clients are real processes given all three
URLs, which each shuffles. The promise under test: no call lost, none answered
wrongly, none later than its timeout (RpcTimeoutError would say so), and no
NoServerError while servers reconnect. The memory and disk alarms are raised on a
single node of its own (alarm1, port 5685), so that they disturb nothing else.
On RabbitMQ 4 the nodes set consumer_disconnected_timeout low (tests/nodes.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import pika
import pytest

import amqp_rpc
import rpc_client
import rpc_server
from tests.nodes import CLUSTER_PORTS, Node, port, rabbitmq_major, start_cluster
from tests.support import (
    READY,
    Load,
    Server,
    fail_or_skip,
    named,
    run_script,
    wait_until,
)

pytestmark = pytest.mark.local_rabbitmq

ANSWERS = [rpc_server.fib(n) for n in range(301)]
ALARM_PORT = port(5685)


def test_each_node_killed_in_turn_under_load_every_call_answered(
    cluster: list[Node], queue: str, start_servers
) -> None:
    servers = start_servers(2)

    def kill_each_node_in_turn(going_on: Callable[[], None]) -> None:
        for node in cluster:
            node.kill()
            going_on()  # with two nodes
            restore(cluster, queue)
            going_on()  # with three again

    check(
        "each node killed in turn",
        run_loads(cluster_url(cluster), queue, 2, kill_each_node_in_turn),
        servers,
    )
    for server in servers:  # each lost its node once at least, and moved
        assert any("connection lost" in line for line in server.stderr), server.stderr


def test_the_queue_leader_killed_under_load_every_call_answered(
    cluster: list[Node], queue: str, start_servers
) -> None:
    servers = start_servers(2)
    killed: list[str] = []

    def kill_the_leader(going_on: Callable[[], None]) -> None:
        leader = next(node for node in cluster if node.name == queue_info(cluster, queue)["leader"])
        killed.append(leader.name)
        leader.kill()
        wait_until(
            lambda: queue_info(cluster, queue).get("leader") not in (None, leader.name),
            30,
            "a new leader",
        )
        going_on()  # with the new leader
        restore(cluster, queue)

    summaries = run_loads(cluster_url(cluster), queue, 2, kill_the_leader)
    check(f"queue leader {killed[0]} killed", summaries, servers)


@contextlib.contextmanager
def client_on_the_leader(
    cluster: list[Node], queue: str, start_servers
) -> Iterator[tuple[rpc_client.FibonacciRpcClient, Node, str]]:
    """A client, its node made the queue's leader, two servers on the queue; and the
    client's connection name, to find its node again."""
    name = f"cluster test {uuid.uuid4().hex}"
    with rpc_client.FibonacciRpcClient(
        cluster_url(cluster, name), timeout=10, queue=queue, retries=1
    ) as client:
        node = node_of(cluster, name)
        declare(cluster, queue, on=node)
        start_servers(2)
        yield client, node, name


def test_the_client_node_killed_calls_go_on(
    cluster: list[Node], queue: str, start_servers, caplog: pytest.LogCaptureFixture
) -> None:
    """The client's node leads the queue too: the client reconnects as the leader dies."""
    caplog.set_level(logging.INFO, logger="amqp_rpc")
    with client_on_the_leader(cluster, queue, start_servers) as (client, node, name):
        assert client.call(30) == 832040
        killer = threading.Timer(1, node.kill)
        killer.start()
        calls, after_kill, worst, end = 0, 0, 0.0, time.monotonic() + 30
        try:
            while after_kill < 50 and time.monotonic() < end:  # calls before, across, after
                n = calls % len(ANSWERS)
                started = time.monotonic()
                assert client.call(n) == ANSWERS[n]
                worst = max(worst, time.monotonic() - started)
                calls += 1
                after_kill += node.pid() is None  # the node is gone
        finally:
            killer.join()
        now_on = node_of(cluster, name)
    how = "mid-call" if "connection lost during a call" in caplog.text else "between calls"
    print(f"\nclient node killed ({how}): {calls} calls, 0 errors, worst call {worst:.2f} s")
    assert after_kill == 50
    assert now_on is not node


def test_call_many_across_the_loss_of_the_client_node(
    cluster: list[Node], queue: str, start_servers, caplog: pytest.LogCaptureFixture
) -> None:
    """The client's node leads the queue too, as in the test above."""
    ns = [i % len(ANSWERS) for i in range(4000)]
    with client_on_the_leader(cluster, queue, start_servers) as (client, node, _):
        assert client.call(0) == 0
        killer = threading.Timer(0.5, node.kill)
        killer.start()
        started = time.monotonic()
        try:
            results = client.call_many(ns, window=50)
        finally:
            killer.join()
        took = time.monotonic() - started
    print(f"\ncall_many across a node loss: {len(ns)} calls in {took:.1f} s, 0 errors")
    assert results == [ANSWERS[n] for n in ns]
    # The kill came mid-batch: the batch lost its connection and sent its calls again.
    assert "connection lost during a call" in caplog.text


@pytest.fixture
def alarm_node() -> Iterator[Node]:
    """A single node of its own, so that its alarm disturbs no other test."""
    need_rabbitmq_server()
    node = Node("alarm1", ALARM_PORT)
    try:
        node.start()
        node.wait()
        yield node
    finally:
        node.remove()


@pytest.mark.parametrize(
    ("alarm", "cleared", "reason"),
    [
        (
            ["set_vm_memory_high_watermark", "0.00001"],
            ["set_vm_memory_high_watermark", "0.4"],
            "memory",
        ),
        (["set_disk_free_limit", "1000000GB"], ["set_disk_free_limit", "50MB"], "disk"),
    ],
    ids=["memory", "disk"],
)
def test_an_alarm_ends_a_call_naming_it_and_the_server_lives_through_it(
    alarm_node: Node, alarm: list[str], cleared: list[str], reason: str
) -> None:
    queue = f"rpc_alarm_{uuid.uuid4().hex}"
    env = {**os.environ, "AMQP_URL": alarm_node.url, "PYTHONUNBUFFERED": "1"}
    server = Server(["--queue", queue], env)
    try:
        server.wait_for(READY)
        args = ("--url", alarm_node.url, "--queue", queue)
        assert run_script("rpc_client.py", *args, "30").stdout.endswith(" [.] Got 832040\n")
        try:
            alarm_node.ctl(*alarm)
            wait_until(
                lambda: json.loads(alarm_node.ctl("status", "--formatter", "json"))["alarms"],
                30,
                f"a {reason} alarm",
            )
            done = run_script("rpc_client.py", *args, "--timeout", "2", "30", timeout=30)
        finally:
            alarm_node.ctl(*cleared)
        print(f"\nduring the alarm the client said: {done.stderr.strip()}")
        assert done.returncode == 1
        assert len(done.stderr.splitlines()) == 1
        assert f"the broker blocks this connection: low on {reason}" in done.stderr
        assert server.process.poll() is None
        wait_until(
            lambda: not json.loads(alarm_node.ctl("status", "--formatter", "json"))["alarms"],
            30,
            "the alarm cleared",
        )
        after = run_script("rpc_client.py", *args, "30", timeout=30)
        assert after.stdout.endswith(" [.] Got 832040\n"), after.stderr
        assert server.process.poll() is None
    finally:
        server.kill()
    print("the server logged:", *server.stderr, *server.stdout, sep="\n  ")


def test_queue_deleted_under_a_running_server_it_declares_and_consumes_again(
    cluster: list[Node], queue: str, start_servers
) -> None:
    """The broker cancels the consumer; or, as a 3.10 cluster sometimes does, sends no
    cancel at all, which the server finds out by looking for its queue every 5 s."""
    (server,) = start_servers(1)
    with rpc_client.FibonacciRpcClient(cluster_url(cluster), timeout=10, queue=queue) as client:
        assert client.call(30) == 832040
        cluster[0].ctl("delete_queue", queue)
        # At once, on the broker's cancel (it says so), or the check every 5 s finds NOT_FOUND.
        said = "our consumer was cancelled (the broker cancelled it)"
        if rabbitmq_major() == 3:  # 3.10 sometimes sends no cancel
            said = "our consumer was cancelled ("
        wait_until(lambda: any(said in line for line in server.stderr), 10, said)
        server.wait_for(READY, timeout=10)  # declared again and consuming again
        assert sorted(queue_info(cluster, queue)["members"]) == sorted(n.name for n in cluster)
        assert client.call(30) == 832040


def test_queue_deleted_again_and_again_the_server_never_exits(
    cluster: list[Node], queue: str, start_servers
) -> None:
    """A 4.3 cluster may answer the server's consume with NOT_FOUND right after its own
    declare (deleted again meanwhile): a race to retry, not a verdict. It may also close
    the connection (541 INTERNAL_ERROR): the server reconnects."""
    (server,) = start_servers(1)
    connection = pika.BlockingConnection(pika.URLParameters(cluster[0].url))
    for i in range(40):  # at times as the server declares it again, at times after
        connection.channel().queue_delete(queue=queue)
        time.sleep(0.05 * (i % 8))

    def consumed() -> bool:
        with (
            contextlib.suppress(pika.exceptions.ChannelClosedByBroker),
            connection.channel() as look,
        ):
            return look.queue_declare(queue=queue, passive=True).method.consumer_count == 1
        return False

    wait_until(consumed, 20, "the server declaring and consuming again")  # its backoff: 5 s
    connection.close()
    assert server.process.poll() is None, server.stderr[-1]
    with rpc_client.FibonacciRpcClient(cluster_url(cluster), timeout=10, queue=queue) as client:
        assert client.call(30) == 832040


@pytest.mark.rabbitmq4
def test_a_request_held_on_a_dead_node_is_answered_by_another_server_within_5_s(
    cluster: list[Node], queue: str
) -> None:
    """RabbitMQ 4 keeps what a consumer on a lost node holds for consumer_disconnected_timeout
    (60 s by default), in case the node is only cut off: tests/nodes.py sets 1 s, as the
    README advises."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    holder = Server(["--queue", queue, "--url", cluster[1].url], env)
    other = None
    try:
        holder.wait_for(READY)
        holder.process.send_signal(signal.SIGSTOP)  # it takes the request and never answers
        connection = pika.BlockingConnection(pika.URLParameters(cluster[0].url))
        channel = connection.channel()
        replies = channel.queue_declare(queue="", exclusive=True).method.queue
        held = pika.BasicProperties(reply_to=replies, correlation_id="held")
        channel.basic_publish(exchange="", routing_key=queue, properties=held, body=b"30")
        wait_until(lambda: unacked(cluster[0], queue) == 1, 10, "the request held")
        other = Server(["--queue", queue, "--url", cluster[0].url], env)
        other.wait_for(READY)  # a second server, come after the request was taken
        killed = time.monotonic()
        cluster[1].kill()  # and kept down: restored by the queue fixture afterwards
        wait = 5 - (time.monotonic() - killed)
        for method, props, body in channel.consume(replies, auto_ack=True, inactivity_timeout=wait):
            assert method is not None, "not answered within 5 s of the node's death"
            assert (props.correlation_id, body) == ("held", b"832040")
            break
        print(f"\nanswered {time.monotonic() - killed:.1f} s after its holder's node died")
        connection.close()
    finally:
        for server in (holder, other):
            if server is not None:
                server.kill()


# --- the helpers and fixtures of the tests above ------------------------------------------


def cluster_url(nodes: list[Node], name: str | None = None) -> str:
    """One URL per node, comma-separated: what every process of these tests is given."""
    return ",".join(node.url if name is None else named(node.url, name) for node in nodes)


def up(nodes: list[Node]) -> list[Node]:
    return [node for node in nodes if node.pid() is not None]


def queue_info(nodes: list[Node], queue: str) -> dict:
    """The queue's name, leader, members and online members, as a node that is up lists them."""
    listed = json.loads(
        up(nodes)[0].ctl(
            "list_queues", "name", "leader", "members", "online", "--formatter", "json"
        )
    )
    return next((info for info in listed if info["name"] == queue), {})


def unacked(node: Node, queue: str) -> int:
    listed = json.loads(
        node.ctl("list_queues", "name", "messages_unacknowledged", "--formatter", "json")
    )
    return next((info["messages_unacknowledged"] for info in listed if info["name"] == queue), 0)


def raft_states(node: Node, queue: str) -> dict[str, str]:
    """Each member of the quorum queue and its Raft state (leader, follower...)."""
    done = subprocess.run(
        ["rabbitmq-queues", "-q", "-n", node.name, "quorum_status", queue, "--formatter", "json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if done.returncode != 0:
        return {}
    return {member["Node Name"]: member["Raft State"] for member in json.loads(done.stdout)}


def all_members_in_step(nodes: list[Node], queue: str) -> bool:
    states = raft_states(up(nodes)[0], queue)
    return sorted(states) == sorted(node.name for node in nodes) and sorted(states.values()) == [
        "follower",
        "follower",
        "leader",
    ]


def restore(nodes: list[Node], queue: str) -> None:
    """Start every killed node again with its data; wait until the queue has its 3 members."""
    down = [node for node in nodes if node.pid() is None]
    for node in down:
        node.start(fresh=False)
    for node in down:
        node.wait()
    if down and queue_info(nodes, queue):
        wait_until(lambda: all_members_in_step(nodes, queue), 60, f"{queue}: 3 members in step")


def node_of(nodes: list[Node], connection_name: str) -> Node:
    """The node that a connection of this name is connected to."""
    listed = json.loads(
        up(nodes)[0].ctl("list_connections", "client_properties", "port", "--formatter", "json")
    )
    ports = [
        connection["port"]
        for connection in listed
        if ["connection_name", "longstr", connection_name] in connection["client_properties"]
    ]
    assert len(ports) == 1, f"{connection_name!r} connected to {ports}"
    return next(node for node in nodes if node.port == ports[0])


def need_rabbitmq_server() -> None:
    """Skip without a local rabbitmq-server, or fail loudly in CI, which must have one."""
    if shutil.which("rabbitmq-server") is None:
        fail_or_skip(
            "rabbitmq-server is not installed: these tests start RabbitMQ nodes of their own"
        )


@pytest.fixture(scope="module")
def cluster() -> Iterator[list[Node]]:
    """c1, c2 and c3, clustered; removed at the end of the module."""
    need_rabbitmq_server()
    try:
        yield start_cluster()
    finally:
        for i, node_port in enumerate(CLUSTER_PORTS, 1):
            Node(f"c{i}", node_port).remove()  # by name: start_cluster may have failed half-way


def declare(nodes: list[Node], queue: str, on: Node) -> None:
    """Declare the queue as the server does, through a connection to on, which leads it.

    Waits until the queue has a member in step on each node. Declared anew if it exists
    with its leader elsewhere (RabbitMQ puts a quorum queue's leader on the declarer's node).
    """
    connection = pika.BlockingConnection(pika.URLParameters(on.url))
    channel = connection.channel()
    if queue_info(nodes, queue).get("leader", on.name) != on.name:
        channel.queue_delete(queue=queue)
    channel.queue_declare(queue=queue, durable=True, arguments=amqp_rpc.QUEUE_ARGUMENTS)
    connection.close()
    wait_until(lambda: all_members_in_step(nodes, queue), 30, f"{queue}: three members")
    assert queue_info(nodes, queue)["leader"] == on.name


@pytest.fixture
def queue(cluster: list[Node]) -> Iterator[str]:
    """A quorum queue of the test's own, with a member on each node; its leader on c1."""
    name = f"rpc_cluster_{uuid.uuid4().hex}"
    declare(cluster, name, on=cluster[0])
    yield name
    restore(cluster, name)  # a test that failed half-way may have left a node down
    connection = pika.BlockingConnection(pika.URLParameters(cluster[0].url))
    connection.channel().queue_delete(queue=name)
    connection.close()


@pytest.fixture
def start_servers(cluster: list[Node], queue: str) -> Iterator[Callable[..., list[Server]]]:
    """Start rpc_server.py processes on the test's queue, given all three URLs; wait until ready."""
    servers: list[Server] = []

    def start(count: int) -> list[Server]:
        env = {**os.environ, "AMQP_URL": cluster_url(cluster), "PYTHONUNBUFFERED": "1"}
        started = [Server(["--queue", queue, "--quiet"], env) for _ in range(count)]
        servers.extend(started)
        for server in started:
            server.wait_for(READY)
        return started

    yield start
    for server in servers:
        server.kill()


def run_loads(
    url: str, queue: str, count: int, disturb: Callable[[Callable[[], None]], None]
) -> list[dict]:
    """Run count load processes while disturb(going_on) runs; return their summaries.
    going_on() waits until every load has answered more calls (50) since it last did."""
    loads: list[Load] = []

    def going_on() -> None:
        for load in loads:
            load.going_on()

    try:
        loads = [Load(url, queue) for _ in range(count)]
        going_on()  # in full swing
        disturb(going_on)
        going_on()  # and going on after
        return [load.finish() for load in loads]
    finally:
        for load in loads:
            load.kill()


def check(what: str, summaries: list[dict], servers: list[Server]) -> None:
    """Report the figures, then assert every call was answered, correctly."""
    calls = sum(summary["calls"] for summary in summaries)
    errors = sum(sum(summary["errors"].values()) for summary in summaries)
    worst = max(summary["worst"] for summary in summaries)
    lost = sum(summary["lost"] for summary in summaries)
    refused = sum(summary["refused"] for summary in summaries)
    moved = sum("connection lost" in line for server in servers for line in server.stderr)
    print(
        f"\n{what}: {calls} calls, {errors} errors, worst call {worst:.2f} s; "
        f"sent again: {lost} after a lost connection, {refused} after a refusal; "
        f"servers reconnected {moved} times"
    )
    for summary in summaries:
        assert summary["errors"] == {}, summary["first_errors"]
        assert summary["wrong"] == []
        assert summary["answered"] == summary["calls"] > 0
        assert summary["stopped"], "the load ended before the disturbance did"
