"""Your own procedure on amqp_rpc, and what a long-lived client and a slow handler leave behind.

The README's example (a word count over JSON) runs as it stands there: its server as a real
process, its client in this one.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from pika.adapters.blocking_connection import BlockingChannel

import amqp_rpc
import rpc_client
import rpc_server
from tests.support import READY, ROOT, wait_until, with_query

LONG_N = 600_000  # about two seconds of a server's work


def test_the_readmes_own_procedure_answers_refuses_bad_input_and_needs_a_server(
    readme_example: Path, amqp_url: str, broker: BlockingChannel, monkeypatch
) -> None:
    monkeypatch.setenv("AMQP_URL", amqp_url)
    broker.queue_declare(queue="word_count", durable=True, arguments=amqp_rpc.QUEUE_ARGUMENTS)
    monkeypatch.syspath_prepend(str(readme_example.parent))
    server = subprocess.Popen(
        [sys.executable, str(readme_example)],
        env={"AMQP_URL": amqp_url, "PYTHONPATH": str(ROOT)},
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: consumers(broker) == 1, 20, "the example's server consuming")
        from wordcount import WordCountClient

        run_block(readme_example.parent / "client.py", "4\n")
        with WordCountClient(queue="word_count") as client:
            assert client.count("one two three") == 3
            with pytest.raises(rpc_client.RpcError, match=r'^invalid request: expected \{"text"'):
                client.call(b"not json")
    finally:
        server.terminate()
        assert server.wait(20) == 0, server.stderr.read()
    no_server = pytest.raises(rpc_client.NoServerError, match=r"^no RPC server is consuming")
    with WordCountClient(queue="word_count") as client, no_server:
        client.count("anyone there?")
    broker.queue_delete(queue="word_count")


def test_a_handler_slower_than_three_heartbeats_keeps_its_connection(
    start_server, client, amqp_url: str
) -> None:
    server = start_server(env={"AMQP_URL": with_query(amqp_url, "heartbeat=1")}, code=SLOW)
    assert client.call(30, timeout=60) == 832040
    assert server.stdout.count(READY) == 1  # never reconnected
    assert not any("lost" in line for line in server.stderr), server.stderr


def test_no_reply_stays_unacknowledged_and_a_finished_call_leaves_nothing_in_the_client(
    start_server, client
) -> None:
    start_server("--quiet", "--max-n", str(LONG_N))
    with pytest.raises(rpc_client.RpcTimeoutError):
        client.call(LONG_N, timeout=0.5)
    assert client.responses == {}  # nothing kept for the call that timed out ...
    # ... so that its reply, come late during these calls, is a stray, dropped.
    assert client.call_many(range(60), window=10) == [rpc_server.fib(n) for n in range(60)]
    assert client.call(30) == 832040
    assert client.responses == {}
    # NOTE: a delivery left unacknowledged goes back to its queue when its channel closes.
    client.channel.close()
    with client.connection.channel() as look:
        assert look.queue_declare(client.callback_queue, passive=True).method.message_count == 0


# --- helpers and fixtures --------------------------------------------------------------

# A server of a handler that takes 3 s, three heartbeat intervals of heartbeat=1; its
# arguments: --queue NAME.
SLOW = """import sys, time
from amqp_rpc import RpcServer


def on_request(body):
    time.sleep(3)
    return str(rpc_server.fib(int(body))).encode()


import rpc_server
ready = lambda: print(" [x] Awaiting RPC requests", flush=True)
RpcServer(on_request, queue=sys.argv[2], on_ready=ready).run()"""


@pytest.fixture
def readme_example(tmp_path: Path) -> Iterator[Path]:
    """The README's example procedure, wordcount.py, and its client.py, as they stand there."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Your own procedure") :]
    server, client = re.findall(r"```python\n(.*?)```", section, re.DOTALL)[:2]
    (tmp_path / "wordcount.py").write_text(server)
    (tmp_path / "client.py").write_text(client)
    yield tmp_path / "wordcount.py"
    sys.modules.pop("wordcount", None)


def run_block(path: Path, expected: str) -> None:
    done = subprocess.run(
        [sys.executable, str(path)],
        env={"AMQP_URL": amqp_rpc.default_url(), "PYTHONPATH": f"{path.parent}:{ROOT}"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert (done.returncode, done.stdout) == (0, expected), done.stderr


def consumers(broker: BlockingChannel) -> int:
    return broker.queue_declare(queue="word_count", passive=True).method.consumer_count
