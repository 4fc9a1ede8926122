"""OpenTelemetry: one trace per call, across a client here and a real rpc_server.py process.

The client's spans go to an in-memory exporter, set once for this process (OpenTelemetry's
global TracerProvider can be set only once); the server's, one JSON line per span, to a
file of the test's own, which the test reads.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import amqp_rpc
import rpc_client
from tests.support import ROOT, request, wait_until
from tests.test_integration import lose_publishes

SERVERS = {"inline": [], "threaded": ["--max-n", "20001"]}  # rpc_server.py: threaded past 20000


@pytest.mark.parametrize("server", SERVERS)
def test_a_call_is_one_trace_the_server_span_a_child_of_the_client_span(
    traced_server, client, client_spans, rpc_queue: str, server: str
) -> None:
    server_spans = traced_server(*SERVERS[server])
    assert client.call(10) == 55
    (sent,) = client_spans()
    (served,) = server_spans(1)
    assert (sent["name"], sent["kind"]) == (f"send {rpc_queue}", "SpanKind.CLIENT")
    assert (served["name"], served["kind"]) == (f"process {rpc_queue}", "SpanKind.SERVER")
    assert served["context"]["trace_id"] == sent["context"]["trace_id"]
    assert served["parent_id"] == sent["context"]["span_id"]
    for span in (sent, served):
        assert span["status"]["status_code"] == "UNSET"
        attributes = span["attributes"]
        assert attributes["messaging.system"] == "rabbitmq"
        assert attributes["messaging.destination.name"] == rpc_queue
        assert attributes["messaging.message.body.size"] == len(b"55")  # the reply's
    conversation = "messaging.message.conversation_id"
    assert sent["attributes"][conversation] == served["attributes"][conversation]


@pytest.mark.parametrize("server", SERVERS)
def test_an_error_reply_marks_both_spans(traced_server, client, client_spans, server: str) -> None:
    server_spans = traced_server(*SERVERS[server])
    with pytest.raises(rpc_client.RpcError, match="invalid request"):
        client.call(30_000)
    (sent,) = client_spans()
    (served,) = server_spans(1)
    assert marked(sent) == "amqp_rpc.RpcError"
    assert marked(served) == "ValueError"  # the handler's


@pytest.mark.parametrize(
    ("declared", "raised"),
    [(True, rpc_client.RpcTimeoutError), (False, rpc_client.NoServerError)],
)
def test_a_timeout_and_no_server_end_the_client_span_with_error(
    client, client_spans, broker, rpc_queue: str, declared: bool, raised: type
) -> None:
    if declared:  # but none consumes it: the timeout comes long before NoServerError would
        broker.queue_declare(queue=rpc_queue, durable=True, arguments=amqp_rpc.QUEUE_ARGUMENTS)
    with pytest.raises(raised):
        client.call(10, timeout=0.3)
    (sent,) = client_spans()
    assert marked(sent) == f"amqp_rpc.{raised.__name__}"


def test_a_request_sent_again_after_a_lost_connection_stays_in_its_one_span(
    traced_server, client, client_spans, rpc_queue: str, monkeypatch
) -> None:
    server_spans = traced_server()
    lose_publishes(monkeypatch, rpc_queue, 1)  # the first raises, as in a lost connection
    assert client.call(10) == 55
    (sent,) = client_spans()
    (served,) = server_spans(1)
    assert sent["status"]["status_code"] == "UNSET"
    assert served["parent_id"] == sent["context"]["span_id"]


def test_a_lost_connection_ends_the_client_span_with_error(
    client_spans, amqp_url: str, rpc_queue: str, monkeypatch
) -> None:
    lose_publishes(monkeypatch, rpc_queue, 1)
    lost = pytest.raises(rpc_client.RpcConnectionError)
    with rpc_client.FibonacciRpcClient(amqp_url, queue=rpc_queue, retries=0) as client, lost:
        client.call(10)
    (sent,) = client_spans()
    assert marked(sent) == "amqp_rpc.RpcConnectionError"


def test_the_tutorials_client_gets_its_answer_and_a_trace_of_its_own(
    traced_server, broker, client_spans, rpc_queue: str
) -> None:
    server_spans = traced_server()
    _, body = request(broker, rpc_queue, b"10")  # plain pika: no traceparent
    assert body == b"55"
    (served,) = server_spans(1)
    assert served["parent_id"] is None
    assert client_spans() == []


def test_a_header_the_propagator_cannot_read_starts_a_trace_of_its_own(
    traced_server, broker, rpc_queue: str
) -> None:
    server_spans = traced_server()
    _, body = request(broker, rpc_queue, b"10", headers={"traceparent": 5})
    assert body == b"55"
    (served,) = server_spans(1)
    assert served["parent_id"] is None


def test_call_many_makes_a_span_per_request_under_the_callers_span(
    traced_server, client, client_spans
) -> None:
    server_spans = traced_server()
    with trace.get_tracer("test").start_as_current_span("caller") as caller:
        assert client.call_many([1, 2, 3], window=2) == [1, 1, 2]
    sent = [span for span in client_spans() if span["name"] != "caller"]
    assert len(sent) == 3
    caller_id = f"0x{trace.format_span_id(caller.get_span_context().span_id)}"
    assert {span["parent_id"] for span in sent} == {caller_id}
    conversation = "messaging.message.conversation_id"
    by_conversation = {span["attributes"][conversation]: span for span in sent}
    assert len(by_conversation) == 3
    for served in server_spans(3):  # each a child of its own request's span
        parent = by_conversation[served["attributes"][conversation]]
        assert served["parent_id"] == parent["context"]["span_id"]


def test_without_opentelemetry_the_pair_still_works(
    start_server, amqp_url: str, rpc_queue: str
) -> None:
    server = f"{WITHOUT_OPENTELEMETRY}import rpc_server\nsys.exit(rpc_server.main(sys.argv[1:]))"
    start_server(code=server)
    client = (
        f"{WITHOUT_OPENTELEMETRY}import amqp_tracing, rpc_client\n"
        "with rpc_client.FibonacciRpcClient(sys.argv[1], queue=sys.argv[2]) as fibonacci_rpc:\n"
        "    print(amqp_tracing.TRACER, fibonacci_rpc.call(10))\n"
    )
    done = run_python(client, amqp_url, rpc_queue)
    assert (done.stdout, done.stderr) == ("None 55\n", "")


def test_with_the_api_and_no_sdk_configured_a_request_carries_no_headers(
    broker, amqp_url: str, rpc_queue: str
) -> None:
    # NOTE: a classic queue, as a quorum queue adds a header of its own (x-delivery-count).
    broker.queue_declare(queue=rpc_queue, durable=True)
    done = run_python(NO_SERVER_CALL, amqp_url, rpc_queue)
    assert (done.stdout, done.stderr) == ("ProxyTracer\n", "")  # the API's, with no SDK
    method, props, _ = broker.basic_get(rpc_queue, auto_ack=True)
    assert method is not None, "the request is not in the queue"
    assert props.headers is None


def test_the_readmes_tracing_example_prints_the_client_span(start_server, amqp_url: str) -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("\n## Tracing\n") : readme.index("\n## Configuration\n")]
    (example,) = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
    # The real rpc_queue, as the example names it (another server on it may answer too).
    start_server("--queue", "rpc_queue")
    done = subprocess.run(
        [sys.executable, "-c", example],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, "AMQP_URL": amqp_url},
    )
    assert done.returncode == 0, done.stderr
    span = json.loads(done.stdout)
    assert (span["name"], span["kind"]) == ("send rpc_queue", "SpanKind.CLIENT")
    assert span["attributes"]["messaging.message.body.size"] == len(b"832040")


# --- helpers and fixtures ---------------------------------------------------------------


def run_python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    """code in a fresh interpreter, from the project's directory, with args as sys.argv[1:]."""
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60, cwd=ROOT
    )


# NOTE: None in sys.modules makes any import of opentelemetry raise ImportError.
WITHOUT_OPENTELEMETRY = 'import sys\nsys.modules["opentelemetry"] = None\n'

# A call, in a process with OpenTelemetry's API and no SDK configured, to a queue no server
# consumes: its request stays there for the test to read.
NO_SERVER_CALL = """import sys
import amqp_tracing, rpc_client

with rpc_client.FibonacciRpcClient(sys.argv[1], queue=sys.argv[2]) as fibonacci_rpc:
    try:
        fibonacci_rpc.call(10)
    except rpc_client.NoServerError:
        print(type(amqp_tracing.TRACER).__name__)
"""

# rpc_server.main with OpenTelemetry's SDK exporting each span, as it ends, to $SPANS_FILE.
TRACED_SERVER = """import os, sys
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor
import rpc_server

out = open(os.environ["SPANS_FILE"], "a")
line = lambda span: span.to_json(indent=None) + "\\n"
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter(out=out, formatter=line)))
trace.set_tracer_provider(provider)
sys.exit(rpc_server.main(sys.argv[1:]))
"""


def marked(span: dict) -> str:
    """The type of the exception recorded on a span with status ERROR."""
    assert span["status"]["status_code"] == "ERROR"
    (event,) = span["events"]
    assert event["name"] == "exception"
    return event["attributes"]["exception.type"]


class SpanFile:
    """The spans a traced server wrote, one JSON line each."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self, count: int) -> list[dict]:
        """Wait until the server has exported count spans; return them."""
        wait_until(lambda: len(self.lines()) >= count, 10, f"{count} spans from the server")
        spans = [json.loads(line) for line in self.lines()]
        assert len(spans) == count
        return spans

    def lines(self) -> list[str]:
        if not self.path.exists():
            return []
        return self.path.read_text().splitlines()


class TracedServers:
    """Starts rpc_server.py processes (arguments appended) that export their spans."""

    def __init__(self, start_server: Callable[..., object], directory: Path) -> None:
        self.start_server = start_server
        self.directory = directory
        self.started = 0

    def __call__(self, *args: str) -> SpanFile:
        self.started += 1
        path = self.directory / f"server_spans_{self.started}.jsonl"
        self.start_server(*args, code=TRACED_SERVER, env={"SPANS_FILE": str(path)})
        return SpanFile(path)


class MemorySpans:
    """The spans this process ended since the test began, as JSON like the server's."""

    def __init__(self, exporter: InMemorySpanExporter) -> None:
        self.exporter = exporter

    def __call__(self) -> list[dict]:
        return [json.loads(span.to_json()) for span in self.exporter.get_finished_spans()]


@pytest.fixture
def traced_server(start_server, tmp_path: Path) -> TracedServers:
    return TracedServers(start_server, tmp_path)


@pytest.fixture(scope="session")
def client_exporter() -> InMemorySpanExporter:
    """The SDK for this process, once: every span it ends goes to memory."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    assert trace.get_tracer_provider() is provider, "another TracerProvider was set first"
    return exporter


@pytest.fixture
def client_spans(client_exporter: InMemorySpanExporter) -> Iterator[MemorySpans]:
    client_exporter.clear()
    yield MemorySpans(client_exporter)
    client_exporter.clear()
