"""Load, hostile input and a soak against one real broker: every call answered once, correctly.

Servers run as real `rpc_server.py` processes on a queue of the test's own.
"""

from __future__ import annotations

import os
import re
import struct
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import pika
import pika.data
import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

import rpc_client
import rpc_server
from tests.support import (
    READY,
    Foreign,
    Load,
    Requester,
    digits,
    fail_or_skip,
    named,
    our_connections,
    queued,
    rss_kib,
    wait_until,
)

# --- load -----------------------------------------------------------------------------------

LOAD_NS = [0, 1, 2, 10, 30, 93, 500, 1000, 4000, 9999, 15_000, 20_000]


def test_load_eight_clients_two_servers(
    start_server, amqp_url: str, rpc_queue: str, broker, capsys: pytest.CaptureFixture[str]
) -> None:
    clients, calls = 8, 500
    servers = [start_server("--quiet"), start_server("--quiet")]
    ns = ",".join(map(str, LOAD_NS))
    started = time.monotonic()
    loads: list[Load] = []
    try:
        for _ in range(clients):
            options = ("--calls", str(calls), "--pause", "0", "--ns", ns)
            loads.append(Load(amqp_url, rpc_queue, *options))
        summaries = [load.finish(stop=False) for load in loads]
    finally:
        for load in loads:  # bounded: none outlives its --seconds
            load.kill()
    elapsed = time.monotonic() - started
    with capsys.disabled():
        print(f"\n  load: {clients * calls} calls in {elapsed:.1f} s")
    for summary in summaries:
        assert (summary["errors"], summary["wrong"]) == ({}, []), summary["first_errors"]
        assert summary["answered"] == summary["calls"] == calls
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
