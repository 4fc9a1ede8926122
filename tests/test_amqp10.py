"""AMQP 1.0 requesters and responders (RabbitMQ's own client, rabbitmq-amqp-python-client)
with our server and our client.

RabbitMQ 4 hands an AMQP 1.0 request to rpc_server.py over AMQP 0-9-1. Each reply_to
form a requester may use must bring the answer back, correlated by the request's
message_id: such requesters set no correlation_id.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

import rpc_client
from tests.support import Amqp10Requester, Amqp10Responder

pytestmark = pytest.mark.rabbitmq4


def test_direct_reply_to(start_server, amqp10: Amqp10Requester, rabbitmq_version) -> None:
    if rabbitmq_version < (4, 2):
        pytest.skip("direct reply-to over AMQP 1.0 came with RabbitMQ 4.2")
    start_server("--quiet")
    request_id, reply = amqp10.call(b"30")
    assert bytes(reply.body) == b"832040"
    assert reply.correlation_id == request_id


def test_a_reply_queue_given_as_an_address(
    start_server, amqp10: Amqp10Requester, rpc_queue: str
) -> None:
    """/queues/NAME, percent-encoded (this NAME has a space and a slash). RabbitMQ 4.3 hands
    the server NAME; 4.0 hands it the address, which amqp_rpc.reply_queue() maps."""
    start_server("--quiet")
    address = f"/queues/{rpc_queue}%20replies%2F1"
    amqp10.reply_queue(f"{rpc_queue} replies/1")
    request_id, reply = amqp10.call(b"30", reply_to=address)
    assert bytes(reply.body) == b"832040"
    assert reply.correlation_id == request_id


def test_a_reply_queue_given_by_its_bare_name(
    start_server, amqp10: Amqp10Requester, rpc_queue: str
) -> None:
    start_server("--quiet")
    name = amqp10.reply_queue(f"{rpc_queue}_replies")
    request_id, reply = amqp10.call(b"30", reply_to=name)
    assert bytes(reply.body) == b"832040"
    assert reply.correlation_id == request_id


def test_an_amqp10_responder_serves_our_client(amqp_url: str, rpc_queue: str) -> None:
    """Our bare amq.gen-… reply_to reaches it as an address, /queues/amq.gen-…, which it
    can publish to as it stands; it answers with our message_id as the correlation id."""
    responder = Amqp10Responder(amqp_url, rpc_queue)
    try:
        with (
            ThreadPoolExecutor(1) as pool,
            rpc_client.FibonacciRpcClient(amqp_url, timeout=10, queue=rpc_queue) as fibonacci_rpc,
        ):
            answer = pool.submit(fibonacci_rpc.call, 30)  # its connection used there alone
            request = responder.serve_one()
            assert answer.result(timeout=10) == 832040
    finally:
        responder.close()
    assert request.reply_to == f"/queues/{fibonacci_rpc.callback_queue}"
