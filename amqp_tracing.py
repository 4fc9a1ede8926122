"""OpenTelemetry for amqp_rpc, when it is installed: one trace per call.

The client makes a CLIENT span for each request, from its send to its answer or exception,
and carries the span's context to the server in the request's headers (W3C traceparent, by
OpenTelemetry's propagator). The server makes a SERVER span for each request, the child of
that context (or a new trace's root), current while the handler works, ended once the reply
is published. Names and attributes are OpenTelemetry's messaging conventions.

Without opentelemetry-api every function here returns at once, and nothing is sent: pika
alone runs the pair. With the API and no SDK configured, the spans are the API's no-ops.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

try:
    from opentelemetry import propagate, trace
    from opentelemetry.semconv._incubating.attributes import messaging_attributes as messaging

    TRACER: trace.Tracer | None = trace.get_tracer("amqp_rpc")
except ImportError:
    # NOTE: the API without the semantic conventions is a process without OpenTelemetry's SDK
    # (which requires them), where every span would be a no-op: tracing nothing loses nothing.
    TRACER = None

if TYPE_CHECKING:
    import pika
    from opentelemetry.trace import Span


def start_call(queue: str) -> Span | None:
    """A CLIENT span for one request to queue, a child of the caller's current span."""
    if TRACER is None:
        return None
    # NOTE: named for the queue, never for the reply queue, which is new for every client.
    send = messaging.MessagingOperationTypeValues.SEND.value
    span = TRACER.start_span(
        f"{send} {queue}", kind=trace.SpanKind.CLIENT, attributes=attributes(queue, send)
    )
    # NOTE: an invalid span is the API's no-op when no SDK is configured and no trace is to be
    # passed on: nothing to carry or record, so None spares the other functions here its cost.
    return span if span.get_span_context().is_valid else None


def request_headers(span: Span | None, corr_id: str) -> dict[str, str] | None:
    """The headers that carry span's context to the server. span takes corr_id, its request's
    latest: a request sent again after a lost connection has a new one, in the same span."""
    if span is None:
        return None
    span.set_attribute(messaging.MESSAGING_MESSAGE_CONVERSATION_ID, corr_id)
    headers: dict[str, str] = {}
    propagate.inject(headers, context=trace.set_span_in_context(span))
    return headers


def start_request(queue: str, props: pika.BasicProperties) -> Span | None:
    """A SERVER span for a request, the child of the context its headers carry, if any."""
    if TRACER is None:
        return None
    # NOTE: text headers only: another client's table may hold numbers or bytes under these
    # names, which the propagator cannot read; such a request starts a trace of its own.
    headers = props.headers or {}
    carrier = {key: value for key, value in headers.items() if isinstance(value, str)}
    process = messaging.MessagingOperationTypeValues.PROCESS.value
    named = attributes(queue, process)
    corr_id = props.correlation_id or props.message_id  # as the server replies with it
    if isinstance(corr_id, str):
        named[messaging.MESSAGING_MESSAGE_CONVERSATION_ID] = corr_id
    span = TRACER.start_span(
        f"{process} {queue}",
        context=propagate.extract(carrier),
        kind=trace.SpanKind.SERVER,
        attributes=named,
    )
    return span if span.get_span_context().is_valid else None  # as in start_call


def current(span: Span | None, marks: bool = True) -> contextlib.AbstractContextManager:
    """span as the current span, in this thread: spans made meanwhile (the handler's, a
    publish's by another instrumentation) are its children. With marks, an exception raised
    meanwhile marks it (status ERROR, the exception recorded)."""
    if span is None:
        return contextlib.nullcontext()
    return trace.use_span(
        span, end_on_exit=False, record_exception=marks, set_status_on_exception=marks
    )


def end(span: Span | None, reply: bytes | None) -> None:
    """End span: its request answered with reply, or (None) not answered here."""
    if span is None:
        return
    if reply is not None:
        span.set_attribute(messaging.MESSAGING_MESSAGE_BODY_SIZE, len(reply))
    span.end()


def failed(span: Span | None, error: BaseException) -> None:
    """End a client's span with the exception its call raised."""
    if span is None:
        return
    span.record_exception(error)
    span.set_status(trace.StatusCode.ERROR, f"{type(error).__name__}: {error}")
    span.end()


def attributes(queue: str, operation: str) -> dict[str, str]:
    """The messaging convention's names for a span: "{operation} {queue}" is its name."""
    return {
        messaging.MESSAGING_SYSTEM: messaging.MessagingSystemValues.RABBITMQ.value,
        messaging.MESSAGING_DESTINATION_NAME: queue,
        messaging.MESSAGING_OPERATION_NAME: operation,
        messaging.MESSAGING_OPERATION_TYPE: operation,
    }
