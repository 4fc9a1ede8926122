"""AMQP 1.0 requesters (RabbitMQ's own client, rabbitmq-amqp-python-client) and our server.

RabbitMQ 4 hands an AMQP 1.0 request to rpc_server.py over AMQP 0-9-1. Each reply_to
form a requester may use must bring the answer back, correlated by the request's
message_id: such requesters set no correlation_id.
"""

from __future__ import annotations

import pytest

from tests.support import Amqp10Requester

pytestmark = pytest.mark.rabbitmq4


def test_direct_reply_to(start_server, amqp10: Amqp10Requester) -> None:
    start_server("--quiet")
    request_id, reply = amqp10.call(b"30")
    assert bytes(reply.body) == b"832040"
    assert reply.correlation_id == request_id


def test_a_reply_queue_given_as_an_address(
    start_server, amqp10: Amqp10Requester, rpc_queue: str
) -> None:
    """/queues/NAME, percent-encoded (this NAME has a space and a slash)."""
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
