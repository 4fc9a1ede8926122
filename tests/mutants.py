"""Hand-written mutants: each removes the code that keeps one promise, and a test must fail.

    ./scripts/test --mutants             # every mutant, on RabbitMQ 4.3 as the suite runs
    ./scripts/test --mutants -k lock     # those whose promise or test names contain "lock"
    python -m tests.mutants --list       # the table, without running anything

First the tests named for the chosen mutants must pass on the code as it is (else a
broker or node they need is missing, and every mutant would look killed). Then each
mutant is made in a copy of the project, never in the working tree, and runs only the
tests named for it (with CI=true, so that disruptive tests run and none is skipped).
A mutant survives when those tests pass: then the promise has no test that proves it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
M, S, T_ = "amqp_rpc.py", "rpc_server.py", "amqp_tracing.py"

# (promise, file, code that keeps it, the code without it, the tests that must fail)
MUTANTS = [
    # --- the client's side (amqp_rpc.RpcClient)
    (
        "a request no queue takes comes back at once (mandatory)",
        M,
        "properties, mandatory=True)",
        "properties)",
        "test_integration.py::test_no_queue_is_no_server_error_at_once",
    ),
    (
        "a request expires with its call's timeout",
        M,
        "message_id=corr_id, expiration=ttl",
        "message_id=corr_id",
        "test_integration.py::test_timeout_raises_one_line_and_the_request_carries_expiration",
    ),
    (
        "a responder that answers by message_id serves our client",
        M,
        "correlation_id=corr_id, message_id=corr_id,",
        "correlation_id=corr_id,",
        "test_integration.py::test_a_responder_that_answers_by_message_id_serves_our_client",
    ),
    (
        "a queue with no consumer is NoServerError before the timeout",
        M,
        "if self.no_server_since is not None and now - self.no_server_since >= NO_SERVER_AFTER:",
        "if False:",
        "test_integration.py::test_queue_without_consumer_is_no_server_error_before_the_timeout_and_the_request_expires",
    ),
    (
        "an error reply raises RpcError with the server's message",
        M,
        "if reply.error:",
        "if False:",
        "test_integration.py::test_error_reply_raises_rpc_error_and_the_cli_says_it_in_one_line",
    ),
    (
        "stray replies are ignored; the first reply wins over a duplicate",
        M,
        "if props.correlation_id in self.responses and self.responses[props.correlation_id] is None:",
        "if True:",
        "test_integration.py::test_stray_and_duplicate_replies_are_ignored"
        " test_integration.py::test_the_first_reply_wins_over_a_duplicate",
    ),
    (
        "no reply stays unacknowledged on the broker",
        M,
        "self.on_response, auto_ack=True)",
        "self.on_response, auto_ack=False)",
        "test_procedure.py::test_no_reply_stays_unacknowledged_and_a_finished_call_leaves_nothing_in_the_client",
    ),
    (
        "a finished call leaves nothing in the client; its late reply is a stray",
        M,
        "self.responses.clear()  # replies still to come are strays now",
        "pass",
        "test_procedure.py::test_no_reply_stays_unacknowledged_and_a_finished_call_leaves_nothing_in_the_client",
    ),
    (
        "threads sharing a client take turns (the lock)",
        M,
        "with self.lock:",
        "with contextlib.nullcontext():",
        "test_integration.py::test_a_client_shared_by_threads_gives_each_its_own_answer",
    ),
    (
        "a request leaves the to-do list only once it is in flight",
        M,
        "batch.in_flight.append(Request(batch.todo.popleft(), deadline, span=span))\n"
        "                self.send(batch.in_flight[-1])",
        "request = Request(batch.todo.popleft(), deadline, span=span)\n"
        "                self.send(request)\n"
        "                batch.in_flight.append(request)",
        "test_integration.py::test_call_many_sends_a_lost_publish_again_and_answers_each_n_in_order",
    ),
    (
        "call_many answers one per request, in order, or raises",
        M,
        "if [request.body for request, _ in batch.done] != bodies:",
        "if False:",
        "test_integration.py::test_call_many_raises_rather_than_answer_another_n",
    ),
    (
        "a publish that raised may have reached the broker: retries=0 sends it no more",
        M,
        "request.corr_id = corr_id  # before the publish: one that raises may have been sent\n"
        "        # tracing: no mark if it raises, as the request may be sent again, in the same span\n"
        "        with amqp_tracing.current(request.span, marks=False):\n"
        '            self.channel.basic_publish("", self.queue, request.body, properties, mandatory=True)',
        "# tracing: no mark if it raises, as the request may be sent again, in the same span\n"
        "        with amqp_tracing.current(request.span, marks=False):\n"
        '            self.channel.basic_publish("", self.queue, request.body, properties, mandatory=True)\n'
        "        request.corr_id = corr_id",
        "test_integration.py::test_with_retries_0_a_publish_that_may_have_been_sent_is_not_sent_again",
    ),
    (
        "a request never sent costs no retry",
        M,
        "if not self.channel.is_open:  # closed by",
        "if False:  # closed by",
        "test_integration.py::test_a_request_certainly_not_sent_costs_no_retry",
    ),
    (
        "a refused request is sent again at no cost to retries",
        M,
        "if not self.retries and len(batch.in_flight) > 1:",
        "if not self.retries:",
        "test_integration.py::test_a_refused_request_is_sent_again_at_no_cost_and_the_timeout_names_the_refusal",
    ),
    (
        "with retries=0, a refusal in a call_many sends nothing again",
        M,
        "if not self.retries and len(batch.in_flight) > 1:",
        "if False:",
        "test_integration.py::test_with_retries_0_a_refusal_sends_nothing_again_that_may_have_been_taken",
    ),
    (
        "the client reads AMQP_URL",
        M,
        'broker_parameters(url or default_url(), "rpc_client"',
        'broker_parameters(url or DEFAULT_URL, "rpc_client"',
        "test_integration.py::test_client_defaults_to_amqp_url_and_rpc_queue",
    ),
    (
        "a timeout a request cannot expire by is refused",
        M,
        "if not 0 < timeout <= MAX_TIMEOUT:",
        "if not 0 < timeout:",
        "test_integration.py::test_a_call_refuses_a_timeout_its_request_cannot_expire_by",
    ),
    (
        "an idle client whose connection was closed reconnects at no cost",
        M,
        "self.connection.process_data_events(0)  # learns of a close, or a cancel",
        "pass",
        "test_faults.py::test_an_idle_client_whose_connection_the_broker_closed_reconnects_at_no_cost",
    ),
    (
        "a deleted callback queue is a lost connection",
        M,
        'self.broken = ConnectionLost("the broker cancelled the consumer of our callback queue")',
        "pass",
        "test_faults.py::test_a_deleted_callback_queue_is_a_lost_connection_and_the_next_call_reconnects",
    ),
    (
        "a call over a network gone silent ends at its timeout",
        M,
        "underneath(self.channel).queue_declare(\n"
        "            self.queue, passive=True, callback=self.on_consumer_count\n"
        "        )",
        "self.on_consumer_count(self.channel.queue_declare(self.queue, passive=True))",
        "test_faults.py::test_a_call_over_a_network_gone_silent_ends_at_its_timeout",
    ),
    (
        "a lost connection during a call sends it again",
        M,
        "batch.again = True\n        what = ",
        "raise error\n        what = ",
        "test_faults.py::test_client_loses_its_connection_during_a_call",
    ),
    (
        "a blocked connection has a bound",
        M,
        "node.blocked_connection_timeout = blocked",
        "pass",
        "test_unit.py::test_nodes_are_given_a_bound_on_a_blocked_connection",
    ),
    (
        "a fleet spreads over the nodes (shuffled)",
        M,
        "random.shuffle(nodes)",
        "pass",
        "test_unit.py::test_several_urls_make_a_shuffled_list_of_nodes",
    ),
    (
        "the timeout names a resource alarm",
        M,
        'why += f"; the broker blocks this connection: {self.blocked}"',
        'why += ""',
        "test_cluster.py::test_an_alarm_ends_a_call_naming_it_and_the_server_lives_through_it",
    ),
    (
        "a refused publish is reported with the broker's reason",
        M,
        "self.broken = reason  # NOT_FOUND",
        "self.broken = ConnectionLost()  # NOT_FOUND",
        "test_security.py::test_each_grant_of_the_minimum_is_needed",
    ),
    (
        "an AMQP 1.0 responder serves our client (our request carries a message_id)",
        M,
        "correlation_id=corr_id, message_id=corr_id,",
        "correlation_id=corr_id,",
        "test_amqp10.py::test_an_amqp10_responder_serves_our_client",
    ),
    (
        "a client that sees no server through a node tries the next before NoServerError",
        M,
        "if not lost and (batch.losses > self.retries or len(self.nodes) < 2):",
        "if not lost:",
        "test_partition.py::test_a_20_s_cut_of_one_node_no_wrong_answer_no_raw_exception",
    ),
    (
        "a failure while setting up a connection (541 on a cut-off node) moves to the next node",
        M,
        "self.connection = open_connection(self.nodes, self.open_channel)",
        "self.connection = open_connection(self.nodes)\n        self.open_channel(self.connection)",
        "test_partition.py::test_a_new_client_whose_first_node_is_cut_off_connects_through_another",
    ),
    (
        "a close that a cut-off node holds is not waited for",
        M,
        "closer.join(2.0)",
        "closer.join()",
        "test_partition.py::test_a_20_s_cut_of_one_node_no_wrong_answer_no_raw_exception",
    ),
    (
        "--verbose logs pika's debug detail (and never the password)",
        M,
        "level=logging.DEBUG if verbose else level",
        "level=level",
        "test_security.py::test_debug_logs_do_not_show_the_password",
    ),
    # --- the server's side (amqp_rpc.RpcServer, rpc_server.py)
    (
        "bad input gets an error reply and the server goes on",
        S,
        "n = parse_request(body, max_n)",
        "n = int(body)",
        "test_integration.py::test_bad_input_gets_an_error_reply_and_the_server_goes_on",
    ),
    (
        "a handler's ValueError is an invalid request, the message its own",
        M,
        "except ValueError as error:  # the request's fault",
        "except LookupError as error:  # the request's fault",
        "test_unit.py::test_a_value_error_from_the_handler_is_an_invalid_request"
        " test_procedure.py::test_the_readmes_own_procedure_answers_refuses_bad_input_and_needs_a_server",
    ),
    (
        "a failed computation is an error reply",
        M,
        "except Exception as error:  # one request's failure",
        "except ArithmeticError as error:  # one request's failure",
        "test_unit.py::test_a_failed_computation_is_an_error_reply"
        " test_integration.py::test_a_failed_computation_raises_rpc_error_and_the_server_goes_on",
    ),
    (
        "a request without reply_to is acked and dropped",
        M,
        "ch.basic_ack(delivery_tag=method.delivery_tag)\n            return",
        "return",
        "test_integration.py::test_request_without_reply_to_is_acked_and_dropped",
    ),
    (
        "the queue is declared as the official tutorials declare it",
        M,
        'QUEUE_ARGUMENTS = {"x-queue-type": "quorum"}',
        "QUEUE_ARGUMENTS = {}",
        "test_integration.py::test_official_tutorials_declare_the_queue_as_we_do",
    ),
    (
        "AMQP 1.0 requesters get a reply by their message_id",
        M,
        "corr_id = props.correlation_id or props.message_id",
        "corr_id = props.correlation_id",
        "test_integration.py::test_other_requesters_get_their_reply",
    ),
    (
        "an AMQP 1.0 requester gets its reply by direct reply-to, by its message_id",
        M,
        "corr_id = props.correlation_id or props.message_id",
        "corr_id = props.correlation_id",
        "test_amqp10.py::test_direct_reply_to",
    ),
    (
        "a reply_to that is no /queues/ address is the reply queue's name, as it stands",
        M,
        "return unquote(match.group(1))\n    return reply_to",
        'return unquote(match.group(1))\n    return ""',
        "test_amqp10.py::test_a_reply_queue_given_by_its_bare_name",
    ),
    (
        "SIGTERM finishes the request in hand",
        M,
        "        while self.in_hand and self.channel.is_open:\n"
        "            self.connection.process_data_events(time_limit=1)\n",
        "",
        "test_integration.py::test_a_signal_in_the_first_second_finishes_the_request_in_hand",
    ),
    (
        "a request is acked only once the broker confirms its reply",
        M,
        "        self.unconfirmed[self.published] = (delivery.tag, corr_id)\n",
        "        self.unconfirmed[self.published] = (delivery.tag, corr_id)\n"
        "        channel.basic_ack(delivery.tag)\n",
        "test_faults.py::test_a_request_is_acked_only_once_the_broker_confirms_its_reply",
    ),
    (
        "a reply does not wait for the confirm of the one before",
        M,
        "        self.unconfirmed[self.published] = (delivery.tag, corr_id)\n",
        "        self.unconfirmed[self.published] = (delivery.tag, corr_id)\n"
        "        while self.unconfirmed:\n"
        "            self.connection.process_data_events(time_limit=1)\n",
        "test_faults.py::test_a_request_is_acked_only_once_the_broker_confirms_its_reply",
    ),
    (
        "a refused reply drops its request, never sends it round again",
        M,
        "basic_nack(delivery_tag, requeue=False)",
        "basic_nack(delivery_tag, requeue=True)",
        "test_integration.py::test_a_refused_reply_drops_its_request",
    ),
    (
        "a confirm of several replies at once (multiple) acks all their requests",
        M,
        "if confirm.multiple:  # all up to this one",
        "if False:  # all up to this one",
        "test_integration.py::test_replies_confirmed_several_at_once_ack_all_their_requests",
    ),
    (
        "the handler runs in a worker thread, so heartbeats flow however long it takes",
        M,
        "self.workers.submit(self.work, delivery, body)",
        "self.work(delivery, body)",
        "test_faults.py::test_a_long_computation_does_not_cost_the_server_its_connection"
        " test_procedure.py::test_a_handler_slower_than_three_heartbeats_keeps_its_connection",
    ),
    (
        "the server backs off with jitter, capped",
        M,
        "delay = min(BACKOFF_CAP, 0.1 * 2 ** (failures - 1)) * random.uniform(0.5, 1)",
        "delay = 0.0",
        "test_faults.py::test_server_backs_off_with_jitter_up_to_a_cap_when_every_node_fails",
    ),
    (
        "an account that may not declare the queue uses it as declared",
        M,
        "if error.reply_code != 403:  # ACCESS_REFUSED",
        "if True:  # ACCESS_REFUSED",
        "test_security.py::test_least_privilege_accounts_answer",
    ),
    (
        "a cancelled consumer declares the queue again",
        M,
        "self.channel.add_on_cancel_callback(self.on_cancel)  # queue deleted",
        "pass  # queue deleted",
        "test_cluster.py::test_queue_deleted_under_a_running_server_it_declares_and_consumes_again",
    ),
    (
        "an AMQP 1.0 reply-to address (/queues/NAME) is that queue",
        M,
        "reply_queue(props.reply_to), body",
        "props.reply_to, body",
        "test_integration.py::test_a_reply_to_given_as_an_amqp_1_0_address_gets_the_reply",
    ),
    (
        "a reply the account may not publish stops the server: exit 1, the reason in one line",
        M,
        'if getattr(self.closed, "reply_code", None) != 404:',
        "if False:",
        "test_security.py::test_each_grant_of_the_minimum_is_needed",
    ),
    (
        "NOT_FOUND as the server declares and consumes: declared again, never an exit",
        M,
        'getattr(self.closed, "reply_code", None) != 404',
        "True",
        "test_cluster.py::test_queue_deleted_again_and_again_the_server_never_exits",
    ),
    (
        "a server whose node is cut off (its queue counts no consumer) moves",
        M,
        "if not look.queue_declare(queue=self.queue, passive=True).method.consumer_count:",
        "if not look.queue_declare(queue=self.queue, passive=True):",
        "test_partition.py::test_a_20_s_cut_of_one_node_no_wrong_answer_no_raw_exception",
    ),
    # --- tracing (amqp_tracing, used by amqp_rpc when OpenTelemetry is installed)
    (
        "a call is one trace: the request carries its span's context",
        M,
        "properties.headers = amqp_tracing.request_headers(request.span, corr_id)",
        "properties.headers = None",
        "test_tracing.py::test_a_call_is_one_trace_the_server_span_a_child_of_the_client_span",
    ),
    (
        "each request carries its own span's context, not the caller's",
        T_,
        "propagate.inject(headers, context=trace.set_span_in_context(span))",
        "propagate.inject(headers)",
        "test_tracing.py::test_call_many_makes_a_span_per_request_under_the_callers_span",
    ),
    (
        "the server's span is the child of the context the request carries",
        T_,
        "context=propagate.extract(carrier),",
        "context=None,",
        "test_tracing.py::test_a_call_is_one_trace_the_server_span_a_child_of_the_client_span",
    ),
    (
        "the client's span ends with the answer",
        M,
        "amqp_tracing.end(batch.in_flight[0].span, reply)",
        "pass",
        "test_tracing.py::test_a_call_is_one_trace_the_server_span_a_child_of_the_client_span",
    ),
    (
        "the server's span ends once the reply is published",
        M,
        "amqp_tracing.end(delivery.span, body)",
        "pass",
        "test_tracing.py::test_a_call_is_one_trace_the_server_span_a_child_of_the_client_span",
    ),
    (
        "spans carry the correlation id",
        T_,
        "span.set_attribute(messaging.MESSAGING_MESSAGE_CONVERSATION_ID, corr_id)",
        "pass",
        "test_tracing.py::test_a_call_is_one_trace_the_server_span_a_child_of_the_client_span",
    ),
    (
        "spans carry the reply's size",
        T_,
        "span.set_attribute(messaging.MESSAGING_MESSAGE_BODY_SIZE, len(reply))",
        "pass",
        "test_tracing.py::test_a_call_is_one_trace_the_server_span_a_child_of_the_client_span",
    ),
    (
        "an error reply, a timeout, NoServerError or a lost connection ends the client's span"
        " with status ERROR",
        M,
        "amqp_tracing.failed(request.span, error)",
        "amqp_tracing.end(request.span, None)",
        "test_tracing.py::test_an_error_reply_marks_both_spans"
        " test_tracing.py::test_a_timeout_and_no_server_end_the_client_span_with_error"
        " test_tracing.py::test_a_lost_connection_ends_the_client_span_with_error",
    ),
    (
        "a request sent again after a lost connection stays in its one span, unmarked",
        M,
        "with amqp_tracing.current(request.span, marks=False):",
        "with amqp_tracing.current(request.span):",
        "test_tracing.py::test_a_request_sent_again_after_a_lost_connection_stays_in_its_one_span",
    ),
    (
        "a handler's exception marks the server's span",
        M,
        "with amqp_tracing.current(span):  # tracing: the handler's work is the request's",
        "with contextlib.nullcontext():  # tracing: the handler's work is the request's",
        "test_tracing.py::test_an_error_reply_marks_both_spans",
    ),
    (
        "a handler in a worker thread works in its request's span",
        M,
        "reply, failed = self.answer(body, delivery.span)",
        "reply, failed = self.answer(body)",
        "test_tracing.py::test_an_error_reply_marks_both_spans",
    ),
    (
        "a handler in the connection's thread works in its request's span",
        M,
        "self.reply(delivery, *self.answer(body, span))",
        "self.reply(delivery, *self.answer(body))",
        "test_tracing.py::test_an_error_reply_marks_both_spans",
    ),
    (
        "a request with no headers (the tutorial's client) is answered",
        T_,
        "headers = props.headers or {}",
        "headers = props.headers",
        "test_tracing.py::test_the_tutorials_client_gets_its_answer_and_a_trace_of_its_own",
    ),
    (
        "a traceparent header that is not text does not stop the server",
        T_,
        "carrier = {key: value for key, value in headers.items() if isinstance(value, str)}",
        "carrier = headers",
        "test_tracing.py::test_a_header_the_propagator_cannot_read_starts_a_trace_of_its_own",
    ),
    (
        "with the API and no SDK configured, nothing is sent (no headers)",
        T_,
        "    return span if span.get_span_context().is_valid else None\n\n\ndef request_headers",
        "    return span\n\n\ndef request_headers",
        "test_tracing.py::test_with_the_api_and_no_sdk_configured_a_request_carries_no_headers",
    ),
    (
        "without OpenTelemetry the pair works",
        T_,
        "except ImportError:",
        "except SyntaxError:",
        "test_tracing.py::test_without_opentelemetry_the_pair_still_works",
    ),
    # --- the tests' own harness
    (
        "two test runs at the same time have node names, ports and a subnet of their own",
        "tests/nodes.py",
        "fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)",
        "pass",
        "test_repository.py::test_a_second_run_at_the_same_time_takes_nodes_ports_and_a_subnet_of_its_own",
    ),
]


def pytest(directory: Path | str, tests: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider"]
        + [f"tests/{test}" for test in tests],
        cwd=directory,
        env={**os.environ, "CI": "true"},
        capture_output=True,
        text=True,
    )


def run(promise: str, file: str, keeps: str, mutated: str, tests: str) -> bool:
    """Make the mutant in a copy of the project; return True if its tests fail (killed)."""
    source = (ROOT / file).read_text()
    assert source.count(keeps) == 1, f"{file}: the code that keeps {promise!r} is not found once"
    with tempfile.TemporaryDirectory(prefix="rpc-mutant-") as copy:
        ignore = shutil.ignore_patterns(".venv", ".git", "__pycache__", ".*_cache")
        shutil.copytree(ROOT, copy, dirs_exist_ok=True, ignore=ignore)
        (Path(copy) / file).write_text(source.replace(keeps, mutated))
        done = pytest(copy, tests.split())
    return done.returncode == 1  # 1: tests failed; 0: passed; others: could not run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", default="", help="only mutants whose promise or tests contain this")
    parser.add_argument("--list", action="store_true", help="print the table; run nothing")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTANTS if args.k in m[0] or args.k in m[4]]
    if not args.list:
        baseline = pytest(ROOT, sorted({test for m in chosen for test in m[4].split()}))
        if baseline.returncode != 0:
            print(baseline.stdout[-3000:], "\nThe tests fail with no mutant: nothing to prove.")
            return 2
    survived = 0
    print("| promise | file | the test that kills it | killed |\n| --- | --- | --- | --- |")
    for promise, file, keeps, mutated, tests in chosen:
        killed = "" if args.list else ("yes" if run(promise, file, keeps, mutated, tests) else "NO")
        survived += killed == "NO"
        print(f"| {promise} | {file} | `{tests.split('::')[-1]}` | {killed} |", flush=True)
    return 1 if survived else 0


if __name__ == "__main__":
    raise SystemExit(main())
