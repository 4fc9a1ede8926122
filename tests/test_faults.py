"""Faults, load and hostile input against one real broker: every call answered once, correctly.

Servers run as real `rpc_server.py` processes on a queue of the test's own (conftest's
start_server). A connection is cut with a TCP proxy between one process and the broker
(tests/tcp_proxy.py), never with `rabbitmqctl close_all_connections`, which would cut
every other user of the broker too. Tests that restart the broker or add users to it
are marked disruptive; the cluster's faults are in test_cluster.py.
"""

from __future__ import annotations

import sys
import threading
import time
import uuid
from collections import defaultdict

import pika
import pika.data
import pytest

import amqp_rpc
import rpc_client
import rpc_server
from tests.support import (
    READY,
    Foreign,
    Requester,
    catch,
    connect,
    digits,
    free_port,
    named,
    our_connections,
    queued,
    reconnect_delays,
    run_script,
    through,
    wait_for_broker,
    wait_until,
    with_query,
)
from tests.tcp_proxy import TcpProxy

# --- a server's connection lost -------------------------------------------------------------


def test_a_server_that_loses_its_node_takes_the_next_at_once_and_answers_all(
    start_server, proxies: list[TcpProxy], amqp_url: str, requester: Requester, broker
) -> None:
    urls = ",".join(through(amqp_url, tcp_proxy) for tcp_proxy in proxies)
    server = start_server("--url", urls, "--prefetch", "5", "--max-n", str(10**6))
    time.sleep(amqp_rpc.BACKOFF_CAP)  # a node that served a while: its loss costs no wait
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
    finished = "finished on a lost connection"
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


@pytest.mark.local_rabbitmq
def test_an_idle_client_whose_connection_the_broker_closed_reconnects_at_no_cost(
    start_server, amqp_url: str, rpc_queue: str, rabbitmqctl
) -> None:
    start_server()
    marker = f"idle {rpc_queue}"
    url = with_query(named(amqp_url, marker), "heartbeat=2")  # closed when silent for two
    with rpc_client.FibonacciRpcClient(url, queue=rpc_queue, retries=0) as client:
        assert client.call(10) == 55
        idle = client.connection
        # No I/O at all meanwhile: no heartbeats from us, until the broker has closed it.
        wait_until(lambda: our_connections(rabbitmqctl, marker) == (0, 0), 60, "closed")
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


def test_with_retries_1_a_call_whose_callback_queue_is_deleted_is_sent_again_and_answered(
    start_server, amqp_url: str, rpc_queue: str, rabbitmqctl
) -> None:
    server = start_server("--max-n", "600000", "--prefetch", "2")
    sys.set_int_max_str_digits(0)  # to read the answer's 125,000 digits (conftest restores it)
    with rpc_client.FibonacciRpcClient(amqp_url, timeout=60, queue=rpc_queue, retries=1) as client:
        outcome: list[object] = []
        caller = threading.Thread(target=lambda: outcome.append(catch(client.call, 600000)))
        caller.start()
        server.wait_for(" [.] fib(600000)")
        first = client.callback_queue
        rabbitmqctl("delete_queue", first)
        caller.join(60)
        assert outcome == [rpc_server.fib(600000)]
        assert client.callback_queue != first  # answered on a new connection
        assert server.stdout.count(" [.] fib(600000)") == 2  # sent again, computed again


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
