"""The script pair against a real RabbitMQ: servers as processes, clients as the class and the CLI."""

from __future__ import annotations

import signal
import threading

import pika
import pytest

import rpc_client
import rpc_server
from tests.conftest import connect, request, run_script, stray_reply, wait_until


def test_fib_30_end_to_end(start_server, client) -> None:
    start_server()
    assert client.call(30) == 832040


def test_cli_prints_the_tutorial_lines(start_server, amqp_url: str, rpc_queue: str) -> None:
    start_server()
    done = run_script("rpc_client.py", "--url", amqp_url, "--queue", rpc_queue)
    assert done.returncode == 0, done.stderr
    assert done.stdout == " [x] Requesting fib(30)\n [.] Got 832040\n"
    done = run_script("rpc_client.py", "--url", amqp_url, "--queue", rpc_queue, "10", "20", "30")
    assert done.stdout.splitlines()[1::2] == [" [.] Got 55", " [.] Got 6765", " [.] Got 832040"]


def test_cli_reports_an_error_reply_in_one_line(
    start_server, amqp_url: str, rpc_queue: str
) -> None:
    start_server("--max-n", "100")
    done = run_script("rpc_client.py", "--url", amqp_url, "--queue", rpc_queue, "5", "101", "6")
    assert done.returncode == 1
    assert done.stdout == " [x] Requesting fib(5)\n [.] Got 5\n [x] Requesting fib(101)\n"
    assert (
        done.stderr
        == "rpc_client: invalid request: n must be an integer from 0 to 100, got '101'\n"
    )


def test_many_sequential_calls(start_server, client) -> None:
    start_server("--quiet")
    ns = [n % 97 for n in range(300)]
    assert [client.call(n) for n in ns] == [int(rpc_server.fib(n)) for n in ns]


def test_large_results_arrive_whole(start_server, client) -> None:
    start_server()
    assert client.call(100_000) == int(rpc_server.fib(100_000))  # 20899 digits


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"abc", "invalid request: n must be an integer from 0 to 1000000, got 'abc'"),
        (b"-1", "invalid request: n must be an integer from 0 to 1000000, got '-1'"),
        (b"2.5", "invalid request: n must be an integer from 0 to 1000000, got '2.5'"),
        (b"", "invalid request: n must be an integer from 0 to 1000000, got ''"),
        (
            b"\xff\xfe\xfd",
            "invalid request: n must be an integer from 0 to 1000000, got '\ufffd\ufffd\ufffd'",
        ),
        (b"1000001", "invalid request: n must be an integer from 0 to 1000000, got '1000001'"),
        (b"7" * 100_000, "invalid request: request body is 100000 bytes, the limit is 64"),
    ],
    ids=["letters", "negative", "float", "empty", "not-utf8", "over-max-n", "oversized"],
)
def test_bad_input_gets_an_error_reply_and_the_server_goes_on(
    start_server,
    broker,
    rpc_queue: str,
    body: bytes,
    message: str,
) -> None:
    server = start_server()
    properties, reply = request(broker, rpc_queue, body)
    assert properties.type == "error"
    assert reply.decode() == message
    properties, reply = request(broker, rpc_queue, b"30")
    assert (properties.type, reply) == (None, b"832040")
    assert server.process.poll() is None


def test_error_reply_raises_rpc_error(start_server, client) -> None:
    start_server("--max-n", "50")
    with pytest.raises(
        rpc_client.RpcError, match=r"^invalid request: n must be an integer from 0 to 50, got '51'$"
    ):
        client.call(51)
    assert client.call(50) == 12586269025


def test_request_without_reply_to_is_acked_and_dropped(
    start_server, broker, rpc_queue: str
) -> None:
    server = start_server()
    broker.basic_publish(exchange="", routing_key=rpc_queue, body=b"30")
    _, reply = request(broker, rpc_queue, b"10")  # answered after it, so it was handled
    assert reply == b"55"
    declared = broker.queue_declare(queue=rpc_queue, passive=True)
    assert declared.method.message_count == 0  # acked, not requeued
    wait_until(
        lambda: any("no reply_to" in line for line in server.stderr), 10, "no log line about it"
    )


def test_no_queue_fails_fast_with_no_server_error(client) -> None:
    # timeout=60: without the check, this would wait for a minute and raise a timeout
    with pytest.raises(rpc_client.NoServerError, match="no RPC server is consuming 'rpc_test_"):
        client.call(30, timeout=60)
    # the 404 closed the client's channel: the next call reconnects and says the same
    with pytest.raises(rpc_client.NoServerError):
        client.call(30, timeout=60)


def test_queue_without_consumer_fails_fast_and_the_request_is_dropped(
    client,
    broker,
    rpc_queue: str,
) -> None:
    broker.queue_declare(queue=rpc_queue, durable=True, arguments=rpc_server.QUEUE_ARGUMENTS)
    with pytest.raises(
        rpc_client.NoServerError, match=f"no RPC server is consuming '{rpc_queue}'$"
    ):
        client.call(30, timeout=1)
    # the request expires with its timeout, so a server started later does not compute it
    wait_until(
        lambda: broker.queue_declare(queue=rpc_queue, passive=True).method.message_count == 0,
        30,
        "the expired request left the queue",
    )


def test_cli_without_server_says_so(amqp_url: str, rpc_queue: str) -> None:
    done = run_script("rpc_client.py", "--url", amqp_url, "--queue", rpc_queue, "--timeout", "60")
    assert done.returncode == 1
    assert done.stderr.startswith(f"rpc_client: no RPC server is consuming '{rpc_queue}'")
    assert "Traceback" not in done.stderr


class SilentServer:
    """A consumer on the queue that takes requests and never answers them."""

    def __enter__(self) -> SilentServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.connection.close()

    def __init__(self, amqp_url: str, queue: str) -> None:
        self.connection = connect(amqp_url, f"silent server on {queue}")
        self.channel = self.connection.channel()
        self.channel.queue_declare(queue=queue, durable=True, arguments=rpc_server.QUEUE_ARGUMENTS)
        self.channel.basic_qos(prefetch_count=1)
        self.requests: list[pika.BasicProperties] = []
        self.channel.basic_consume(
            queue=queue, on_message_callback=lambda ch, m, p, b: self.requests.append(p)
        )

    def poll(self) -> int:
        """Take the requests the broker has for us; return how many were taken in all."""
        self.connection.process_data_events(time_limit=0.1)
        return len(self.requests)


def test_timeout_raises_and_the_request_carries_expiration(
    client, amqp_url: str, rpc_queue: str
) -> None:
    with SilentServer(amqp_url, rpc_queue) as silent:
        with pytest.raises(rpc_client.RpcTimeoutError, match="no reply within the timeout"):
            client.call(30, timeout=0.5)
        wait_until(lambda: silent.poll() == 1, 10, "the silent server got the request")
        assert 0 < int(silent.requests[0].expiration) <= 500
        # A second request waits in the queue behind the unacked first, and expires there.
        with pytest.raises(TimeoutError):
            client.call(31, timeout=0.3)
        wait_until(
            lambda: (
                silent.channel.queue_declare(queue=rpc_queue, passive=True).method.message_count
                == 0
            ),
            30,
            "the expired request left the queue",
        )


def test_cli_timeout_is_one_line(amqp_url: str, rpc_queue: str) -> None:
    with SilentServer(amqp_url, rpc_queue):
        done = run_script(
            "rpc_client.py", "--url", amqp_url, "--queue", rpc_queue, "--timeout", "0.5"
        )
    assert done.returncode == 1
    assert done.stderr == f"rpc_client: no reply within the timeout from '{rpc_queue}'\n"


def test_stray_and_duplicate_replies_are_ignored(start_server, client, broker) -> None:
    start_server()
    # Waiting in the callback queue before the call: replies that are not its own.
    for corr_id in ("foreign", None):
        stray_reply(broker, client.callback_queue, corr_id)
    assert client.call(30) == 832040
    # A duplicate of that reply arrives late: the next call is not fooled by it.
    stray_reply(broker, client.callback_queue, client.corr_id)
    assert client.call(10) == 55
    assert client.responses == {}


def test_two_servers_share_one_queue(start_server, client) -> None:
    first, second = start_server(), start_server()
    assert [client.call(n) for n in range(20)] == [int(rpc_server.fib(n)) for n in range(20)]
    for server in (first, second):
        assert any(line.startswith(" [.] fib(") for line in server.stdout), (
            "a server got no request"
        )


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_finishes_the_request_in_hand_then_exits_0(
    start_server, broker, rpc_queue: str, sig: int
) -> None:
    n = 20_000_000  # long enough to be in hand when the signal comes
    server = start_server("--max-n", str(n))
    replies: list[bytes] = []
    thread = threading.Thread(
        target=lambda: replies.append(request(broker, rpc_queue, str(n).encode(), timeout=60)[1])
    )
    thread.start()
    server.wait_for(f" [.] fib({n})")
    assert server.stop(sig) == 0
    thread.join()
    assert replies == [str(rpc_server.fib(n)).encode()]
    assert not any("Traceback" in line for line in server.stderr)


def test_server_exits_when_the_queue_is_declared_otherwise(
    start_server, broker, rpc_queue: str
) -> None:
    broker.queue_declare(queue=rpc_queue)  # a classic queue: ours must be quorum
    server = start_server(ready=False)
    assert server.wait() == 1
    assert server.stderr[-1].startswith("rpc_server: the broker at ")
    assert "PRECONDITION_FAILED" in server.stderr[-1]
    assert not any("Traceback" in line for line in server.stderr)


def test_official_clients_can_declare_the_queue_as_they_do(
    start_server, broker, rpc_queue: str
) -> None:
    start_server()
    # What the official tutorials' servers and clients declare: no PRECONDITION_FAILED.
    declared = broker.queue_declare(
        queue=rpc_queue, durable=True, arguments={"x-queue-type": "quorum"}
    )
    assert declared.method.consumer_count == 1


def test_our_client_uses_a_queue_an_official_server_declared(
    start_server, broker, client, rpc_queue: str
) -> None:
    broker.queue_declare(queue=rpc_queue, durable=True, arguments={"x-queue-type": "quorum"})
    start_server()
    assert client.call(30) == 832040


def test_direct_reply_to_requesters_get_their_reply(start_server, broker, rpc_queue: str) -> None:
    start_server()
    got: list[tuple[str, bytes]] = []
    # NOTE: as the official Node.js, Java and Go clients do: consume the
    # pseudo-queue amq.rabbitmq.reply-to (auto_ack), then publish with it as reply_to.
    broker.basic_consume(
        queue="amq.rabbitmq.reply-to",
        on_message_callback=lambda ch, m, p, b: got.append((p.correlation_id, b)),
        auto_ack=True,
    )
    broker.basic_publish(
        exchange="",
        routing_key=rpc_queue,
        properties=pika.BasicProperties(reply_to="amq.rabbitmq.reply-to", correlation_id="js-1"),
        body=b"30",
    )
    wait_until(lambda: broker.connection.process_data_events(time_limit=0.1) or got, 20, "a reply")
    assert got == [("js-1", b"832040")]


def test_client_defaults_to_amqp_url_and_rpc_queue(
    start_server, amqp_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The real rpc_queue, as in the tutorial (another server on it may answer too).
    monkeypatch.setenv("AMQP_URL", amqp_url)
    server = start_server("--queue", "rpc_queue")
    with rpc_client.FibonacciRpcClient() as fibonacci_rpc:
        assert fibonacci_rpc.call(30) == 832040
    assert server.stop() == 0
