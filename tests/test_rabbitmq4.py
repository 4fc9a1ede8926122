"""What RabbitMQ 4 does on its own that the pair relies on (tests/test_faults.py has the rest).

Each test is marked rabbitmq4: on a 3.x broker it is skipped, saying so.
"""

from __future__ import annotations

import pytest

from tests.support import (
    Foreign,
    Requester,
    queued,
)


@pytest.mark.rabbitmq4
def test_a_poison_request_is_dropped_by_the_default_delivery_limit(
    start_server, requester: Requester, rpc_queue: str, broker, foreign_headers: None
) -> None:
    """No policy: RabbitMQ 4 gives every quorum queue a delivery limit of 20."""
    server = start_server("--quiet")
    poisoned = requester.send(b"30", headers={"t": Foreign(b"T" + b"\xff" * 8)})
    after = requester.send(b"10")  # behind it: answered once the broker drops it
    requester.wait([after], timeout=200)
    assert requester.replies[after][0][1] == b"55"
    assert poisoned not in requester.replies  # dropped by the broker, unanswered
    losses = sum("connection lost" in line for line in server.stderr)
    assert losses == 21, server.stderr  # the first delivery and 20 redeliveries
    assert queued(broker, rpc_queue) == 0
