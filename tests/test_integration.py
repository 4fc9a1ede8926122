"""The script pair against a real RabbitMQ: one test per promise the README makes.

Servers run as real `python rpc_server.py` processes; clients as the class and the CLI.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from urllib.parse import quote, urlsplit, urlunsplit

import pika
import pytest
from pika.adapters.blocking_connection import BlockingChannel
from pika.exceptions import StreamLostError

import amqp_rpc
import rpc_client
import rpc_server
from tests.support import (
    connect,
    digits,
    request,
    run_script,
    stray_reply,
    wait_until,
)
from tests.tcp_proxy import TcpProxy

LONG_N = 600_000  # about two seconds of a server's work: a request in hand


def test_fib_30_end_to_end(start_server, client) -> None:
    start_server()
    assert client.call(30) == 832040


def test_cli_prints_the_tutorial_lines(start_server, amqp_url: str, rpc_queue: str) -> None:
    start_server()
    done = run_script("rpc_client.py", "--url", amqp_url, "--queue", rpc_queue, "10", "30")
    assert done.returncode == 0, done.stderr
    assert (
        done.stdout
        == " [x] Requesting fib(10)\n [.] Got 55\n [x] Requesting fib(30)\n [.] Got 832040\n"
    )


def test_the_largest_default_n_arrives_whole(start_server, client) -> None:
    start_server()
    assert client.call(rpc_server.MAX_N) == rpc_server.fib(rpc_server.MAX_N)


def test_an_answer_past_4300_digits_is_an_rpc_error_unless_the_caller_lifts_the_limit(
    start_server, client
) -> None:
    # A test that calls rpc_server.main leaves the limit lifted, but for a fixture of conftest.
    start_server("--max-n", "25000")  # fib(25000) has 5225 digits
    with pytest.raises(rpc_client.RpcError, match=r"^cannot read the reply: Exceeds the limit"):
        client.call(25000)


@pytest.mark.parametrize(
    ("body", "shown"),
    [
        (b"abc", "'abc'"),
        (b"-1", "'-1'"),
        (b"", "''"),
        (b"\xff\xfe\xfd", "'\ufffd\ufffd\ufffd'"),
        (b"20001", "'20001'"),
        (b"7" * 100_000, "'77777777777777777777...'"),
    ],
    ids=["letters", "negative", "empty", "not-utf8", "over-max-n", "oversized"],
)
def test_bad_input_gets_an_error_reply_and_the_server_goes_on(
    start_server, broker, rpc_queue: str, body: bytes, shown: str
) -> None:
    server = start_server()
    properties, reply = request(broker, rpc_queue, body)
    assert properties.type == "error"
    assert reply.decode() == f"invalid request: n must be an integer from 0 to 20000, got {shown}"
    assert request(broker, rpc_queue, b"30")[1] == b"832040"
    assert server.process.poll() is None


def test_error_reply_raises_rpc_error_and_the_cli_says_it_in_one_line(
    start_server, client, amqp_url: str, rpc_queue: str
) -> None:
    start_server("--max-n", "50")
    with pytest.raises(rpc_client.RpcError, match=r"^invalid request: .* to 50, got '51'$"):
        client.call(51)
    done = run_script("rpc_client.py", "--url", amqp_url, "--queue", rpc_queue, "5", "51", "6")
    assert (done.returncode, done.stdout) == (
        1,
        " [x] Requesting fib(5)\n [.] Got 5\n [x] Requesting fib(51)\n",
    )
    assert (
        done.stderr == "rpc_client: invalid request: n must be an integer from 0 to 50, got '51'\n"
    )


# A server whose fib fails for n = 13 (ZeroDivisionError), and only for it.
FAILING_FIB = """import sys, rpc_server
fib = rpc_server.fib
rpc_server.fib = lambda n: 1 / (n - 13) and fib(n)
sys.exit(rpc_server.main(sys.argv[1:]))"""


def test_a_failed_computation_raises_rpc_error_and_the_server_goes_on(start_server, client) -> None:
    server = start_server(code=FAILING_FIB)
    with pytest.raises(rpc_client.RpcError, match=r"^server error: ZeroDivisionError$"):
        client.call(13)
    assert client.call(14) == 377
    wait_until(lambda: any("ZeroDivisionError" in line for line in server.stderr), 10, "its log")


def test_request_without_reply_to_is_acked_and_dropped(
    start_server, broker, rpc_queue: str
) -> None:
    server = start_server()
    broker.basic_publish(exchange="", routing_key=rpc_queue, body=b"30")
    assert request(broker, rpc_queue, b"10")[1] == b"55"  # answered after it: it was handled
    assert broker.queue_declare(queue=rpc_queue, passive=True).method.message_count == 0
    wait_until(lambda: any("no reply_to" in line for line in server.stderr), 10, "a log line")


def test_no_queue_is_no_server_error_at_once(
    client, amqp_url: str, rpc_queue: str, monkeypatch
) -> None:
    # The request comes back (mandatory): no check of the queue, nor the timeout, is waited for.
    monkeypatch.setattr(amqp_rpc, "CHECK_EVERY", 3600)
    with pytest.raises(
        rpc_client.NoServerError, match=f"^no queue '{rpc_queue}', so no RPC server"
    ):
        client.call(30, timeout=60)
    done = run_script("rpc_client.py", "--url", amqp_url, "--queue", rpc_queue, "--timeout", "60")
    assert done.returncode == 1
    assert done.stderr == f"rpc_client: no queue '{rpc_queue}', so no RPC server consumes it\n"


def test_queue_without_consumer_is_no_server_error_before_the_timeout_and_the_request_expires(
    client, broker, rpc_queue: str
) -> None:
    broker.queue_declare(queue=rpc_queue, durable=True, arguments=amqp_rpc.QUEUE_ARGUMENTS)
    # The timeout is the bound: NoServerError (after 1.25 s with no consumer) comes first.
    with pytest.raises(
        rpc_client.NoServerError, match=f"^no RPC server is consuming '{rpc_queue}'$"
    ):
        client.call(30, timeout=6)
    # The request expires with its timeout, so a server started later does not compute it.
    wait_until(
        lambda: broker.queue_declare(queue=rpc_queue, passive=True).method.message_count == 0,
        30,
        "the expired request left the queue",
    )


class SilentServer:
    """A consumer on the queue that takes requests and never answers them."""

    def __init__(self, amqp_url: str, queue: str) -> None:
        self.connection = connect(amqp_url, f"silent server on {queue}")
        self.channel = self.connection.channel()
        self.channel.queue_declare(queue=queue, durable=True, arguments=amqp_rpc.QUEUE_ARGUMENTS)
        self.requests: list[pika.BasicProperties] = []
        self.channel.basic_consume(
            queue=queue, on_message_callback=lambda ch, m, p, b: self.requests.append(p)
        )

    def poll(self) -> int:
        self.connection.process_data_events(time_limit=0.1)
        return len(self.requests)


def test_timeout_raises_one_line_and_the_request_carries_expiration(
    client, amqp_url: str, rpc_queue: str
) -> None:
    silent = SilentServer(amqp_url, rpc_queue)
    with pytest.raises(rpc_client.RpcTimeoutError, match=r"^no reply from .* within the timeout$"):
        client.call(30, timeout=0.5)
    wait_until(lambda: silent.poll() == 1, 10, "the silent server got the request")
    assert 0 < int(silent.requests[0].expiration) <= 500
    done = run_script("rpc_client.py", "--url", amqp_url, "--queue", rpc_queue, "--timeout", "0.5")
    assert done.returncode == 1
    assert done.stderr == f"rpc_client: no reply from '{rpc_queue}' within the timeout\n"
    silent.connection.close()


def lose_publishes(monkeypatch: pytest.MonkeyPatch, queue: str, *lost: int) -> list[int]:
    """Count the publishes to queue, in a list of one; make the k-th (from 1, for each k in
    lost) raise StreamLostError and send nothing, as a connection lost in the publish would."""
    publish, count = BlockingChannel.basic_publish, [0]

    def lossy(channel: BlockingChannel, exchange: str, key: str, *args, **kwargs) -> None:
        count[0] += key == queue
        if key == queue and count[0] in lost:
            raise StreamLostError("lost by the test")
        publish(channel, exchange, key, *args, **kwargs)

    monkeypatch.setattr(BlockingChannel, "basic_publish", lossy)
    return count


# What a full queue with overflow reject-publish does: the broker refuses (nacks) each message.
# NOTE: durable, as every queue here that is not exclusive: RabbitMQ 4 deprecates the others.
FULL = {"x-max-length": 0, "x-overflow": "reject-publish"}


def test_a_refused_request_is_sent_again_at_no_cost_and_the_timeout_names_the_refusal(
    amqp_url: str, broker, rpc_queue: str, monkeypatch
) -> None:
    broker.queue_declare(queue=rpc_queue, durable=True, arguments=FULL)
    broker.basic_consume(queue=rpc_queue, on_message_callback=lambda *delivery: None)  # a "server"
    published = lose_publishes(monkeypatch, rpc_queue)
    refused = pytest.raises(rpc_client.RpcTimeoutError, match=r"; the broker refused it \(is the")
    with rpc_client.FibonacciRpcClient(amqp_url, queue=rpc_queue, retries=0) as client, refused:
        client.call(30, timeout=1)
    assert published[0] > 1  # sent again, though retries=0: nothing was taken


def test_with_retries_0_a_refusal_sends_nothing_again_that_may_have_been_taken(
    amqp_url: str, broker, rpc_queue: str, monkeypatch
) -> None:
    broker.queue_declare(queue=rpc_queue, durable=True, arguments={**FULL, "x-max-length": 1})
    broker.basic_qos(prefetch_count=1)  # a "server" that holds the first and takes no more
    broker.basic_consume(queue=rpc_queue, on_message_callback=lambda *delivery: None)
    published = lose_publishes(monkeypatch, rpc_queue)
    refused = pytest.raises(rpc_client.RpcConnectionError, match=r"^the broker refused a request$")
    with rpc_client.FibonacciRpcClient(amqp_url, queue=rpc_queue, retries=0) as client, refused:
        client.call_many([1, 2, 3, 4, 5], window=5)  # the first held, the second queued, ...
    assert published == [5]  # ... and taken: sent again, they would have run twice


def test_a_refused_reply_drops_its_request(start_server, broker, rpc_queue: str) -> None:
    server = start_server()
    full = broker.queue_declare(queue="", exclusive=True, arguments=FULL).method.queue
    asking = pika.BasicProperties(reply_to=full, correlation_id="refused")
    broker.basic_publish(exchange="", routing_key=rpc_queue, properties=asking, body=b"7")
    refusal = "refused the reply to 'refused'"
    wait_until(lambda: any(refusal in line for line in server.stderr), 10, "the log line")
    for _ in range(2):  # a request sent back to the queue would be taken before the second
        assert request(broker, rpc_queue, b"10")[1] == b"55"  # the server went on
    wait_until(lambda: server.stdout.count(" [.] fib(10)") == 2, 10, "the lines for fib(10)")
    assert server.stdout.count(" [.] fib(7)") == 1  # computed once: not sent back to the queue


def test_stray_and_duplicate_replies_are_ignored(start_server, broker, client, monkeypatch) -> None:
    start_server()
    sent: list[str] = []
    send = client.send
    monkeypatch.setattr(
        client, "send", lambda request: send(request) or sent.append(request.corr_id)
    )
    for corr_id in ("foreign", None):  # waiting in the callback queue before the call
        stray_reply(broker, client.callback_queue, corr_id, type="error")
    assert client.call(30) == 832040
    stray_reply(broker, client.callback_queue, sent[-1])  # a late duplicate of its reply
    assert client.call_many([10, 20], window=2) == [55, 6765]


def test_the_first_reply_wins_over_a_duplicate(broker, client, rpc_queue: str, monkeypatch) -> None:
    broker.queue_declare(queue=rpc_queue, durable=True)  # 4.x deprecates transient ones
    send = client.send

    def send_and_answer_twice(request: amqp_rpc.Request) -> None:  # as a faulty server
        send(request)
        for body in (b"55", b"999"):
            stray_reply(broker, client.callback_queue, request.corr_id, body)

    monkeypatch.setattr(client, "send", send_and_answer_twice)
    assert client.call(10) == 55


def test_two_servers_share_one_queue(start_server, client) -> None:
    first, second = start_server(), start_server()
    assert client.call_many(range(40), window=10) == [rpc_server.fib(n) for n in range(40)]
    for server in (first, second):
        assert any(line.startswith(" [.] fib(") for line in server.stdout), "a server got none"


def test_call_many_keeps_the_order_of_ns_and_at_most_window_in_flight(
    start_server, client, monkeypatch
) -> None:
    start_server("--quiet", "--prefetch", "10")
    in_flight: list[int] = []
    send = client.send

    def counting_send(request: amqp_rpc.Request) -> None:
        in_flight.append(sum(reply is None for reply in client.responses.values()))
        send(request)

    monkeypatch.setattr(client, "send", counting_send)
    ns = [(n * 37) % 90 for n in range(200)]
    assert client.call_many(ns, window=7) == [rpc_server.fib(n) for n in ns]
    assert max(in_flight) == 6  # the 7th is sent with 6 awaiting a reply
    assert client.call_many([]) == []


def test_call_many_raises_the_first_failure_in_the_order_of_ns(start_server, client) -> None:
    start_server("--quiet", "--max-n", "50")
    with pytest.raises(rpc_client.RpcError, match=r"got '70'$"):
        client.call_many([1, 70, 5, 60], window=4)
    assert client.call_many([50, 3]) == [12586269025, 2]  # the late replies were dropped


def test_a_publish_lost_on_the_first_request_of_a_call_is_sent_again(
    start_server, client, rpc_queue: str, monkeypatch
) -> None:
    start_server("--quiet")
    lose_publishes(monkeypatch, rpc_queue, 1)
    assert client.call(5) == 5


@pytest.mark.parametrize("lost", [1, 3, 5])  # the first, a middle and the last of the window
def test_call_many_sends_a_lost_publish_again_and_answers_each_n_in_order(
    start_server, client, rpc_queue: str, monkeypatch, lost: int
) -> None:
    start_server("--quiet", "--prefetch", "10")
    lose_publishes(monkeypatch, rpc_queue, lost)
    ns = [1, 2, 3, 4, 5, 6]
    assert client.call_many(ns, window=5) == [rpc_server.fib(n) for n in ns]


def test_a_publish_lost_while_sending_again_is_one_more_retry(
    start_server, amqp_url: str, rpc_queue: str, monkeypatch
) -> None:
    start_server("--quiet", "--prefetch", "10")
    lose_publishes(monkeypatch, rpc_queue, 2, 3)  # the 2nd, then the 1st sent again
    ns = [1, 2, 3, 4, 5, 6]
    with rpc_client.FibonacciRpcClient(amqp_url, queue=rpc_queue, retries=2) as client:
        assert client.call_many(ns, window=5) == [rpc_server.fib(n) for n in ns]
    lose_publishes(monkeypatch, rpc_queue, 2, 3)  # the same losses, with one retry
    lost = pytest.raises(rpc_client.RpcConnectionError, match=r"^connection lost")
    with rpc_client.FibonacciRpcClient(amqp_url, queue=rpc_queue, retries=1) as client, lost:
        client.call_many(ns, window=5)


def test_with_retries_0_a_publish_that_may_have_been_sent_is_not_sent_again(
    start_server, amqp_url: str, rpc_queue: str, monkeypatch
) -> None:
    server = start_server()
    lose_publishes(monkeypatch, rpc_queue, 1)  # it raised: it may have reached the broker
    with rpc_client.FibonacciRpcClient(amqp_url, queue=rpc_queue, retries=0) as client:
        with pytest.raises(rpc_client.RpcConnectionError, match=r"^connection lost"):
            client.call(5)
        assert client.call(6) == 8
    assert " [.] fib(5)" not in server.stdout


def test_a_request_certainly_not_sent_costs_no_retry(
    start_server, amqp_url: str, rpc_queue: str, monkeypatch
) -> None:
    start_server("--quiet")
    with rpc_client.FibonacciRpcClient(amqp_url, queue=rpc_queue, retries=0) as client:
        wait = client.wait

        def wait_then_lose_the_channel(request: amqp_rpc.Request) -> int:
            answer = wait(request)
            client.channel.close()  # as a close the broker sends with the reply would
            return answer

        monkeypatch.setattr(client, "wait", wait_then_lose_the_channel)
        assert client.call_many([1, 2, 3], window=1) == [1, 1, 2]


def test_call_many_raises_rather_than_answer_another_n(start_server, client, monkeypatch) -> None:
    start_server("--quiet")
    send = client.send

    def send_another_n(request: amqp_rpc.Request) -> None:  # a defect, made on purpose
        if request.body == b"3":
            request.body = b"4"
        send(request)

    monkeypatch.setattr(client, "send", send_another_n)
    with pytest.raises(RuntimeError, match="out of order"):
        client.call_many([1, 2, 3, 5])


@pytest.mark.parametrize("timeout", [0, -1, float("nan"), float("inf"), 315_360_001])
def test_a_call_refuses_a_timeout_its_request_cannot_expire_by(
    client, rpc_queue: str, monkeypatch, timeout: float
) -> None:
    published = lose_publishes(monkeypatch, rpc_queue)
    # The broker takes an expiration of ten years at most: past it, it closes the channel.
    with pytest.raises(ValueError, match=r"^timeout must be a positive number of seconds"):
        client.call(30, timeout=timeout)
    assert published == [0]


@pytest.mark.parametrize("window", [0, -1])
def test_call_many_refuses_a_window_below_1(client, window: int) -> None:
    with pytest.raises(ValueError, match="window must be at least 1"):
        client.call_many([1], window=window)


def test_a_client_shared_by_threads_gives_each_its_own_answer(start_server, client) -> None:
    start_server("--quiet", "--prefetch", "4")
    start_server("--quiet", "--prefetch", "4")
    answers: dict[int, list[object]] = {}

    def caller(k: int) -> None:
        try:
            got = [client.call(k * 10 + i) for i in range(25)] + client.call_many(range(k, 60, 3))
        except Exception as error:  # recorded: the test fails on it
            got = [error]
        answers[k] = got

    threads = [threading.Thread(target=caller, args=(k,)) for k in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not any(thread.is_alive() for thread in threads), "a call hung"
    for k in range(6):
        expected = [rpc_server.fib(k * 10 + i) for i in range(25)]
        assert answers[k] == expected + [rpc_server.fib(n) for n in range(k, 60, 3)]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize("to", ["pid", "process group"])
def test_a_signal_in_the_first_second_finishes_the_request_in_hand(
    start_server, broker, rpc_queue: str, sig: int, to: str
) -> None:
    broker.queue_declare(queue=rpc_queue, durable=True, arguments=amqp_rpc.QUEUE_ARGUMENTS)
    replies: list[bytes] = []
    requester = threading.Thread(
        target=lambda: replies.append(request(broker, rpc_queue, str(LONG_N).encode(), 60)[1])
    )
    requester.start()  # queued before the server starts: it gets it at once
    server = start_server("--max-n", str(LONG_N), ready=False)
    server.wait_for(f" [.] fib({LONG_N})")  # about half a second after the start
    send: Callable[[int, int], None] = os.kill if to == "pid" else os.killpg
    send(server.process.pid, sig)  # a terminal's Ctrl-C signals the whole process group
    assert server.wait() == 0
    requester.join()
    assert replies == [digits(LONG_N)]
    assert not any("Traceback" in line for line in server.stderr)


def test_replies_confirmed_several_at_once_ack_all_their_requests(
    start_server, client, broker, rpc_queue: str
) -> None:
    server = start_server("--quiet", "--prefetch", "10")
    # Replies leave in bursts, and the broker confirms a burst at once (multiple) ...
    assert client.call_many([30] * 500, window=100) == [832040] * 500
    # ... so that a request left unacked would keep the server waiting after a signal.
    assert server.stop(timeout=10) == 0
    assert broker.queue_declare(queue=rpc_queue, passive=True).method.message_count == 0


def test_server_exits_when_the_queue_is_declared_otherwise(
    start_server, broker, rpc_queue: str
) -> None:
    broker.queue_declare(queue=rpc_queue, durable=True)  # classic: ours must be quorum
    server = start_server(ready=False)
    assert server.wait() == 1
    assert server.stderr[-1].startswith("rpc_server: the broker refused: ")
    assert "PRECONDITION_FAILED" in server.stderr[-1]
    assert not any("Traceback" in line for line in server.stderr)


def test_official_tutorials_declare_the_queue_as_we_do(
    start_server, broker, client, rpc_queue: str
) -> None:
    broker.queue_declare(queue=rpc_queue, durable=True, arguments={"x-queue-type": "quorum"})
    start_server()
    declared = broker.queue_declare(
        queue=rpc_queue, durable=True, arguments={"x-queue-type": "quorum"}
    )
    assert declared.method.consumer_count == 1
    assert client.call(30) == 832040


@pytest.mark.parametrize(
    ("reply_to", "properties", "expected_id"),
    [
        # NOTE: as the official Node.js client does: consume the pseudo-queue
        # amq.rabbitmq.reply-to (auto_ack), then publish with it as reply_to.
        ("amq.rabbitmq.reply-to", {"correlation_id": "js-1"}, "js-1"),
        # RabbitMQ 4's AMQP 1.0 Requester sets only a message_id.
        (None, {"message_id": "amqp10-1"}, "amqp10-1"),
    ],
    ids=["direct-reply-to", "message-id-only"],
)
def test_other_requesters_get_their_reply(
    start_server, broker, rpc_queue: str, reply_to: str | None, properties: dict, expected_id: str
) -> None:
    start_server()
    reply_to = reply_to or broker.queue_declare(queue="", exclusive=True).method.queue
    got: list[tuple[str, bytes]] = []
    broker.basic_consume(
        queue=reply_to,
        on_message_callback=lambda ch, m, p, b: got.append((p.correlation_id, b)),
        auto_ack=True,
    )
    broker.basic_publish(
        exchange="",
        routing_key=rpc_queue,
        properties=pika.BasicProperties(reply_to=reply_to, **properties),
        body=b"30",
    )
    wait_until(lambda: broker.connection.process_data_events(time_limit=0.1) or got, 20, "a reply")
    assert got == [(expected_id, b"832040")]


def test_a_reply_to_given_as_an_amqp_1_0_address_gets_the_reply(
    start_server, broker, rpc_queue: str
) -> None:
    start_server()
    replies = f"replies/{rpc_queue} x"  # a slash and a space: percent-encoded in the address
    broker.queue_declare(queue=replies, exclusive=True)
    reply_to = f"/queues/{quote(replies, safe='')}"
    asking = pika.BasicProperties(reply_to=reply_to, correlation_id="v2")
    broker.basic_publish(exchange="", routing_key=rpc_queue, properties=asking, body=b"30")
    for method, properties, body in broker.consume(replies, auto_ack=True, inactivity_timeout=20):
        assert method is not None, "no reply"
        assert (properties.correlation_id, body) == ("v2", b"832040")
        break
    broker.cancel()


def test_a_responder_that_answers_by_message_id_serves_our_client(
    client, broker, rpc_queue: str
) -> None:
    # As RabbitMQ 4's AMQP 1.0 Responder does: the reply's correlation id is the
    # request's message_id.
    broker.queue_declare(queue=rpc_queue, durable=True, arguments=amqp_rpc.QUEUE_ARGUMENTS)

    def respond(ch, method, props, body: bytes) -> None:
        answer = str(rpc_server.fib(int(body))).encode()
        reply = pika.BasicProperties(correlation_id=props.message_id)
        ch.basic_publish(exchange="", routing_key=props.reply_to, properties=reply, body=answer)
        ch.basic_ack(delivery_tag=method.delivery_tag)

    broker.basic_consume(queue=rpc_queue, on_message_callback=respond)
    results: list[int] = []
    caller = threading.Thread(target=lambda: results.append(client.call(30)))
    caller.start()
    wait_until(lambda: broker.connection.process_data_events(0.1) or results, 20, "an answer")
    caller.join()
    assert results == [832040]


def test_client_defaults_to_amqp_url_and_rpc_queue(
    start_server, amqp_url: str, monkeypatch
) -> None:
    # The real rpc_queue, as in the tutorial (another server on it may answer too).
    server = start_server("--queue", "rpc_queue")
    parameters = pika.URLParameters(amqp_url)
    proxy = TcpProxy((parameters.host, parameters.port))  # an AMQP_URL unlike the default
    try:
        url = urlsplit(amqp_url)
        proxied = url._replace(netloc=f"{url.username}:{url.password}@127.0.0.1:{proxy.port}")
        monkeypatch.setenv("AMQP_URL", urlunsplit(proxied))
        with rpc_client.FibonacciRpcClient() as fibonacci_rpc:
            assert fibonacci_rpc.call(30) == 832040
        assert proxy.accepted == 1
    finally:
        proxy.close()
    assert server.stop() == 0
