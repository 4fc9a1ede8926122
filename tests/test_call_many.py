"""call_many against a real RabbitMQ: many calls in flight, each with call()'s guarantees."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pika
import pytest
from pika.adapters.blocking_connection import BlockingChannel

import rpc_client
import rpc_server
from tests.conftest import stray_reply, wait_until

SLOW_N = 1_000_000  # about 25 ms of a server's work; small n take microseconds


def fib(n: int) -> int:
    # NOTE: through the decimal string: int() of a Decimal this large takes seconds.
    return rpc_client.to_int(str(rpc_server.fib(n)).encode())


class RecordingClient(rpc_client.FibonacciRpcClient):
    """The client, noting the requests it sends and the replies it receives, in order."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        self.sent: list[str] = []  # correlation_ids
        self.received: list[str | None] = []
        self.pending_at_send: list[int] = []  # requests awaiting a reply as each was sent
        super().__init__(*args, **kwargs)

    def send(self, n: int, deadline: float) -> str:
        self.pending_at_send.append(sum(reply is None for reply in self.responses.values()))
        corr_id = super().send(n, deadline)
        self.sent.append(corr_id)
        return corr_id

    def on_response(
        self, ch: BlockingChannel, method: object, props: pika.BasicProperties, body: bytes
    ) -> None:
        self.received.append(props.correlation_id)
        super().on_response(ch, method, props, body)


@pytest.fixture
def recording_client(amqp_url: str, rpc_queue: str) -> Iterator[RecordingClient]:
    with RecordingClient(amqp_url, timeout=10, queue=rpc_queue) as fibonacci_rpc:
        yield fibonacci_rpc


def test_results_come_in_the_order_of_ns(start_server, client) -> None:
    start_server("--quiet")
    ns = [(n * 37) % 90 for n in range(200)]
    assert client.call_many(ns, window=10) == [fib(n) for n in ns]
    assert client.responses == {}


def test_replies_out_of_order_from_two_servers_come_back_in_order(
    start_server, recording_client
) -> None:
    start_server("--quiet")
    start_server("--quiet")
    # The slow call goes to one server while the other answers the small ones.
    ns = [SLOW_N, *range(30), SLOW_N, *range(30, 60)]
    assert recording_client.call_many(ns, window=50) == [fib(n) for n in ns]
    assert sorted(recording_client.received) == sorted(recording_client.sent)
    assert recording_client.received != recording_client.sent, "the replies came in order"
    assert recording_client.responses == {}


def test_large_and_small_results_on_one_server(start_server, client) -> None:
    # A large n runs on the server's worker thread, small ones are answered at once.
    start_server("--quiet", "--prefetch", "10")
    ns = [100_000, 5, 200_000, 0, 1, 100_000]
    assert client.call_many(ns) == [fib(n) for n in ns]


def test_window_1_sends_each_request_after_the_last_reply(start_server, recording_client) -> None:
    start_server("--quiet")
    ns = list(range(25))
    assert recording_client.call_many(ns, window=1) == [fib(n) for n in ns]
    assert max(recording_client.pending_at_send) == 0  # one request in flight at a time
    assert recording_client.received == recording_client.sent  # each reply before the next send


def test_window_bounds_the_requests_in_flight(start_server, recording_client) -> None:
    start_server("--quiet")
    ns = list(range(40))
    assert recording_client.call_many(ns, window=4) == [fib(n) for n in ns]
    assert max(recording_client.pending_at_send) == 3  # the fourth is sent with three awaited


def test_empty_ns_gives_an_empty_list(start_server, client) -> None:
    start_server("--quiet")
    assert client.call_many([]) == []


def test_timeout_raises_and_the_late_reply_is_dropped(
    start_server, client, caplog: pytest.LogCaptureFixture
) -> None:
    n = 20_000_000  # half a second of the server's work, or more
    start_server("--quiet", "--max-n", str(n))
    caplog.set_level(logging.DEBUG, logger="rpc_client")
    with pytest.raises(rpc_client.RpcTimeoutError, match="no reply within the timeout") as raised:
        client.call_many([n, 10], window=2, timeout=0.2)
    assert isinstance(raised.value, TimeoutError)
    assert client.responses == {}  # nothing awaited any more
    # The server goes on and answers: that reply is a stray one now, and is dropped.
    wait_until(
        lambda: (
            client.connection.process_data_events(time_limit=0.1)
            or "dropped a reply" in caplog.text
        ),
        60,
        "the late reply came and was dropped",
    )
    assert client.call_many([10, 20, 30]) == [55, 6765, 832040]
    assert client.call(10) == 55
    assert client.responses == {}


def test_a_timeout_with_no_reply_at_all(client, broker, rpc_queue: str) -> None:
    # A consumer that takes the requests and never answers.
    broker.queue_declare(queue=rpc_queue, durable=True, arguments=rpc_server.QUEUE_ARGUMENTS)
    broker.basic_qos(prefetch_count=100)
    broker.basic_consume(queue=rpc_queue, on_message_callback=lambda ch, m, p, b: None)
    with pytest.raises(TimeoutError):
        client.call_many([1, 2, 3], window=3, timeout=0.5)
    assert client.responses == {}


def test_an_error_reply_raises_rpc_error_with_the_servers_message(start_server, client) -> None:
    start_server("--quiet", "--max-n", "50")
    with pytest.raises(
        rpc_client.RpcError, match=r"^invalid request: n must be an integer from 0 to 50, got '51'$"
    ):
        client.call_many([1, 51, 2, 60], window=4)
    assert client.responses == {}
    # The replies still to come for that batch are strays now: the next batch is not fooled.
    assert client.call_many([50, 3, 4]) == [12586269025, 2, 3]
    assert client.responses == {}


def test_the_first_failure_in_the_order_of_ns_raises(start_server, client) -> None:
    start_server("--quiet", "--max-n", "50")
    with pytest.raises(rpc_client.RpcError, match=r"got '70'$"):
        client.call_many([70, 5, 60], window=3)


def test_stray_replies_are_ignored(start_server, broker, recording_client) -> None:
    start_server("--quiet")
    queue = recording_client.callback_queue
    # Waiting in the callback queue before the batch: replies that are not its own.
    stray_reply(broker, queue, "foreign")
    stray_reply(broker, queue, None)
    stray_reply(broker, queue, "foreign-error", type="error")
    assert recording_client.call_many([10, 20], window=2) == [55, 6765]
    # Late duplicates of those replies, and more foreign ones, before the next batch.
    for corr_id in recording_client.sent:
        stray_reply(broker, queue, corr_id)
    stray_reply(broker, queue, "foreign-2", type="error")
    assert recording_client.call_many([30, 1, 2], window=3) == [832040, 1, 1]
    assert recording_client.received.count("foreign") == 1  # it did arrive, and was ignored
    assert recording_client.responses == {}


class StrayingClient(RecordingClient):
    """A client whose every request is followed by a stray reply into its queue."""

    def __init__(self, strays: BlockingChannel, *args: object, **kwargs: object) -> None:
        self.strays = strays
        super().__init__(*args, **kwargs)

    def send(self, n: int, deadline: float) -> str:
        corr_id = super().send(n, deadline)
        # An error reply, which would raise if it were taken for a call's own.
        stray_reply(self.strays, self.callback_queue, f"foreign-{len(self.sent)}", type="error")
        return corr_id


def test_stray_replies_while_the_batch_is_in_flight(
    start_server, broker, amqp_url: str, rpc_queue: str
) -> None:
    start_server("--quiet")
    with StrayingClient(broker, amqp_url, timeout=10, queue=rpc_queue) as fibonacci_rpc:
        ns = list(range(40))
        assert fibonacci_rpc.call_many(ns, window=8) == [fib(n) for n in ns]
        assert sum(corr_id.startswith("foreign-") for corr_id in fibonacci_rpc.received) > 0
        assert fibonacci_rpc.responses == {}


def test_call_many_reconnects_after_a_closed_channel(start_server, client) -> None:
    start_server("--quiet")
    client.close()
    assert client.call_many([7, 8]) == [13, 21]


def test_no_server_fails_fast_with_no_server_error(client) -> None:
    # timeout=60: without the check for a consumer, this would wait for a minute
    with pytest.raises(rpc_client.NoServerError, match="no RPC server is consuming 'rpc_test_"):
        client.call_many([1, 2, 3], timeout=60)
    assert client.responses == {}
