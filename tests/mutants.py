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
C, S = "rpc_client.py", "rpc_server.py"

# (promise, file, code that keeps it, the code without it, the tests that must fail)
MUTANTS = [
    (
        "a request no queue takes comes back at once (mandatory)",
        C,
        "properties, mandatory=True)",
        "properties)",
        "test_integration.py::test_no_queue_is_no_server_error_at_once",
    ),
    (
        "a request expires with its call's timeout",
        C,
        "message_id=corr_id, expiration=ttl",
        "message_id=corr_id",
        "test_integration.py::test_timeout_raises_one_line_and_the_request_carries_expiration",
    ),
    (
        "a responder that answers by message_id serves our client",
        C,
        "correlation_id=corr_id, message_id=corr_id,",
        "correlation_id=corr_id,",
        "test_integration.py::test_a_responder_that_answers_by_message_id_serves_our_client",
    ),
    (
        "a queue with no consumer is NoServerError before the timeout",
        C,
        "if self.no_server_since and now - self.no_server_since >= NO_SERVER_AFTER:",
        "if False:",
        "test_integration.py::test_queue_without_consumer_is_no_server_error_before_the_timeout_and_the_request_expires",
    ),
    (
        "an error reply raises RpcError with the server's message",
        C,
        'if kind == "error":',
        "if False:",
        "test_integration.py::test_error_reply_raises_rpc_error_and_the_cli_says_it_in_one_line",
    ),
    (
        "stray replies are ignored; the first reply wins over a duplicate",
        C,
        "if props.correlation_id in self.responses and self.responses[props.correlation_id] is None:",
        "if True:",
        "test_integration.py::test_stray_and_duplicate_replies_are_ignored"
        " test_integration.py::test_the_first_reply_wins_over_a_duplicate",
    ),
    (
        "threads sharing a client take turns (the lock)",
        C,
        "with self.lock:",
        "with contextlib.nullcontext():",
        "test_integration.py::test_a_client_shared_by_threads_gives_each_its_own_answer",
    ),
    (
        "a request leaves the to-do list only once it is in flight",
        C,
        "in_flight.append(Request(todo.popleft(), time.monotonic() + timeout))\n"
        "                            self.send(in_flight[-1])",
        "request = Request(todo.popleft(), time.monotonic() + timeout)\n"
        "                            self.send(request)\n"
        "                            in_flight.append(request)",
        "test_integration.py::test_call_many_sends_a_lost_publish_again_and_answers_each_n_in_order",
    ),
    (
        "call_many answers one per n, in order, or raises",
        C,
        "if [n for n, _ in done] != list(ns):",
        "if False:",
        "test_integration.py::test_call_many_raises_rather_than_answer_another_n",
    ),
    (
        "a publish that raised may have reached the broker: retries=0 sends it no more",
        C,
        "request.corr_id = corr_id = str(uuid.uuid4())",
        "corr_id = str(uuid.uuid4())",
        "test_integration.py::test_with_retries_0_a_publish_that_may_have_been_sent_is_not_sent_again",
    ),
    (
        "a request never sent costs no retry",
        C,
        "if not self.channel.is_open:  # closed by",
        "if False:  # closed by",
        "test_integration.py::test_a_request_certainly_not_sent_costs_no_retry",
    ),
    (
        "a refused request is sent again at no cost to retries",
        C,
        "if not self.retries and len(in_flight) > 1:",
        "if not self.retries:",
        "test_integration.py::test_a_refused_request_is_sent_again_at_no_cost_and_the_timeout_names_the_refusal",
    ),
    (
        "with retries=0, a refusal in a call_many sends nothing again",
        C,
        "if not self.retries and len(in_flight) > 1:",
        "if False:",
        "test_integration.py::test_with_retries_0_a_refusal_sends_nothing_again_that_may_have_been_taken",
    ),
    (
        "the client reads AMQP_URL",
        C,
        'url = url or os.environ.get("AMQP_URL") or DEFAULT_URL',
        "url = url or DEFAULT_URL",
        "test_integration.py::test_client_defaults_to_amqp_url_and_rpc_queue",
    ),
    (
        "a timeout a request cannot expire by is refused",
        C,
        "if not 0 < timeout <= MAX_TIMEOUT:",
        "if not 0 < timeout:",
        "test_integration.py::test_a_call_refuses_a_timeout_its_request_cannot_expire_by",
    ),
    (
        "an idle client whose connection was closed reconnects at no cost",
        C,
        "self.connection.process_data_events(0)  # learns of a close, or a cancel",
        "pass",
        "test_faults.py::test_an_idle_client_whose_connection_the_broker_closed_reconnects_at_no_cost",
    ),
    (
        "a deleted callback queue is a lost connection",
        C,
        'self.broken = AMQPConnectionError("the broker cancelled the consumer of our callback queue")',
        "pass",
        "test_faults.py::test_a_deleted_callback_queue_is_a_lost_connection_and_the_next_call_reconnects",
    ),
    (
        "a call over a network gone silent ends at its timeout",
        C,
        "self.channel._impl.queue_declare(\n"
        "                    self.queue, passive=True, callback=self.on_consumer_count\n"
        "                )",
        "self.on_consumer_count(self.channel.queue_declare(self.queue, passive=True))",
        "test_faults.py::test_a_call_over_a_network_gone_silent_ends_at_its_timeout",
    ),
    (
        "a lost connection during a call sends it again",
        C,
        "again = True\n",
        "raise\n",
        "test_faults.py::test_client_loses_its_connection_during_a_call",
    ),
    (
        "a blocked connection has a bound",
        C,
        "node.blocked_connection_timeout = node.blocked_connection_timeout or blocked",
        "pass",
        "test_unit.py::test_nodes_are_given_a_bound_on_a_blocked_connection",
    ),
    (
        "a fleet spreads over the nodes (shuffled)",
        C,
        "random.shuffle(nodes)",
        "pass",
        "test_unit.py::test_several_urls_make_a_shuffled_list_of_nodes",
    ),
    (
        "the timeout names a resource alarm",
        C,
        'why = f"; the broker blocks this connection: {self.blocked}" if self.blocked else ""',
        'why = ""',
        "test_cluster.py::test_an_alarm_ends_a_call_naming_it_and_the_server_lives_through_it",
    ),
    (
        "a refused publish is reported with the broker's reason",
        C,
        "self.broken = reason  # NOT_FOUND",
        "self.broken = AMQPConnectionError()  # NOT_FOUND",
        "test_security.py::test_each_grant_of_the_minimum_is_needed",
    ),
    (
        "bad input gets an error reply and the server goes on",
        S,
        "n = parse_request(body, args.max_n)",
        "n = int(body)",
        "test_integration.py::test_bad_input_gets_an_error_reply_and_the_server_goes_on",
    ),
    (
        "a failed computation is an error reply",
        S,
        "except Exception as error:  # one request's failure",
        "except ArithmeticError as error:  # one request's failure",
        "test_unit.py::test_a_failed_computation_is_an_error_reply"
        " test_integration.py::test_a_failed_computation_raises_rpc_error_and_the_server_goes_on",
    ),
    (
        "a request without reply_to is acked and dropped",
        S,
        "ch.basic_ack(delivery_tag=method.delivery_tag)\n            return",
        "return",
        "test_integration.py::test_request_without_reply_to_is_acked_and_dropped",
    ),
    (
        "the queue is declared as the official tutorials declare it",
        S,
        'QUEUE_ARGUMENTS = {"x-queue-type": "quorum"}',
        "QUEUE_ARGUMENTS = {}",
        "test_integration.py::test_official_tutorials_declare_the_queue_as_we_do",
    ),
    (
        "AMQP 1.0 requesters get a reply by their message_id",
        S,
        "corr_id = props.correlation_id or props.message_id",
        "corr_id = props.correlation_id",
        "test_integration.py::test_other_requesters_get_their_reply",
    ),
    (
        "an AMQP 1.0 requester gets its reply by direct reply-to, by its message_id",
        S,
        "corr_id = props.correlation_id or props.message_id",
        "corr_id = props.correlation_id",
        "test_amqp10.py::test_direct_reply_to",
    ),
    (
        "a reply_to that is no /queues/ address is the reply queue's name, as it stands",
        S,
        "return unquote(match.group(1)) if match else reply_to",
        'return unquote(match.group(1)) if match else ""',
        "test_amqp10.py::test_a_reply_queue_given_by_its_bare_name",
    ),
    (
        "an AMQP 1.0 responder serves our client (our request carries a message_id)",
        C,
        "correlation_id=corr_id, message_id=corr_id,",
        "correlation_id=corr_id,",
        "test_amqp10.py::test_an_amqp10_responder_serves_our_client",
    ),
    (
        "SIGTERM finishes the request in hand",
        S,
        "    while in_hand and channel.is_open:  # the replies' confirms too\n"
        "        connection.process_data_events(time_limit=1)\n",
        "",
        "test_integration.py::test_a_signal_in_the_first_second_finishes_the_request_in_hand",
    ),
    (
        "a request is acked only once the broker confirms its reply",
        S,
        "        unconfirmed[next(numbers)] = (delivery_tag, corr_id)\n",
        "        unconfirmed[next(numbers)] = (delivery_tag, corr_id)\n"
        "        pika_channel.basic_ack(delivery_tag)\n",
        "test_faults.py::test_a_request_is_acked_only_once_the_broker_confirms_its_reply",
    ),
    (
        "a reply does not wait for the confirm of the one before",
        S,
        "        unconfirmed[next(numbers)] = (delivery_tag, corr_id)\n",
        "        unconfirmed[next(numbers)] = (delivery_tag, corr_id)\n"
        "        while unconfirmed:\n"
        "            connection.process_data_events(time_limit=1)\n",
        "test_faults.py::test_a_request_is_acked_only_once_the_broker_confirms_its_reply",
    ),
    (
        "a refused reply drops its request, never sends it round again",
        S,
        "pika_channel.basic_nack(delivery_tag, requeue=False)",
        "pika_channel.basic_nack(delivery_tag, requeue=True)",
        "test_integration.py::test_a_refused_reply_drops_its_request",
    ),
    (
        "a confirm of several replies at once (multiple) acks all their requests",
        S,
        "if confirm.multiple else [last]",
        "if False else [last]",
        "test_integration.py::test_replies_confirmed_several_at_once_ack_all_their_requests",
    ),
    (
        "long work runs in a thread, so heartbeats flow",
        S,
        "if n <= MAX_N:  # milliseconds",
        "if True:  # milliseconds",
        "test_faults.py::test_a_long_computation_does_not_cost_the_server_its_connection",
    ),
    (
        "the server backs off with jitter, capped",
        S,
        "delay = failures and min(BACKOFF_CAP, 0.1 * 2 ** (failures - 1)) * random.uniform(0.5, 1)",
        "delay = 0",
        "test_faults.py::test_server_backs_off_with_jitter_up_to_a_cap_when_every_node_fails",
    ),
    (
        "an account that may not declare the queue uses it as declared",
        S,
        "if error.reply_code != 403:  # ACCESS_REFUSED",
        "if True:  # ACCESS_REFUSED",
        "test_security.py::test_least_privilege_accounts_answer",
    ),
    (
        "a cancelled consumer declares the queue again",
        S,
        "channel.add_on_cancel_callback(cancelled.append)",
        "pass",
        "test_cluster.py::test_queue_deleted_under_a_running_server_it_declares_and_consumes_again",
    ),
    (
        "an AMQP 1.0 reply-to address (/queues/NAME) is that queue",
        S,
        "reply_queue(props.reply_to), body",
        "props.reply_to, body",
        "test_integration.py::test_a_reply_to_given_as_an_amqp_1_0_address_gets_the_reply",
    ),
    (
        "a reply the account may not publish stops the server: exit 1, the reason in one line",
        S,
        'if not channel.is_open and getattr(cancelled[-1], "reply_code", None) != 404:',
        "if False:",
        "test_security.py::test_each_grant_of_the_minimum_is_needed",
    ),
    (
        "NOT_FOUND as the server declares and consumes: declared again, never an exit",
        S,
        'getattr(cancelled[-1], "reply_code", None) != 404',
        "True",
        "test_cluster.py::test_queue_deleted_again_and_again_the_server_never_exits",
    ),
    (
        "--verbose logs pika's debug detail (and never the password)",
        C,
        "level=logging.DEBUG if args.verbose else logging.WARNING",
        "level=logging.WARNING",
        "test_security.py::test_debug_logs_do_not_show_the_password",
    ),
    (
        "a client that sees no server through a node tries the next before NoServerError",
        C,
        "if not lost and (attempt > self.retries or len(self.nodes) < 2):",
        "if not lost:",
        "test_partition.py::test_a_20_s_cut_of_one_node_no_wrong_answer_no_raw_exception",
    ),
    (
        "a server whose node is cut off (its queue counts no consumer) moves",
        S,
        "if not look.queue_declare(queue=args.queue, passive=True).method.consumer_count:",
        "if not look.queue_declare(queue=args.queue, passive=True):",
        "test_partition.py::test_a_20_s_cut_of_one_node_no_wrong_answer_no_raw_exception",
    ),
    (
        "a failure while setting up a connection (541 on a cut-off node) moves to the next node",
        C,
        "self.connection = connect(self.nodes, self.open_channel)",
        "self.connection = connect(self.nodes)\n        self.open_channel(self.connection)",
        "test_partition.py::test_a_new_client_whose_first_node_is_cut_off_connects_through_another",
    ),
    (
        "a close that a cut-off node holds is not waited for",
        C,
        "closer.join(2.0)",
        "closer.join()",
        "test_partition.py::test_a_20_s_cut_of_one_node_no_wrong_answer_no_raw_exception",
    ),
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
