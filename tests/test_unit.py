"""Tests that need no broker: fib, request parsing, broker URLs, the CLIs' arguments."""

from __future__ import annotations

import subprocess
import sys

import pytest

import amqp_rpc
import rpc_client
import rpc_server
from tests.support import (
    ROOT,
)


@pytest.mark.parametrize(
    ("n", "expected"),
    [(0, 0), (1, 1), (2, 1), (10, 55), (30, 832040), (100, 354224848179261915075)],
)
def test_fib(n: int, expected: int) -> None:
    assert rpc_server.fib(n) == expected


def test_fib_of_the_default_bound_fits_pythons_int_text_limit() -> None:
    # Neither script must lift sys.set_int_max_str_digits for the default bound.
    digits = str(rpc_server.fib(rpc_server.MAX_N))
    assert len(digits) == 4180
    assert rpc_server.fib(rpc_server.MAX_N) == rpc_server.fib(19999) + rpc_server.fib(19998)


def test_a_failed_computation_is_an_error_reply(monkeypatch: pytest.MonkeyPatch) -> None:
    server = amqp_rpc.RpcServer(rpc_server.on_request)  # connects to nothing until run()
    assert server.answer(b"30") == (b"832040", False)

    def out_of_memory(n: int) -> int:
        raise MemoryError

    monkeypatch.setattr(rpc_server, "fib", out_of_memory)
    assert server.answer(b"30") == (b"server error: MemoryError", True)


def test_a_value_error_from_the_handler_is_an_invalid_request() -> None:
    server = amqp_rpc.RpcServer(rpc_server.on_request)
    assert server.answer(b"x") == (
        b"invalid request: n must be an integer from 0 to 20000, got 'x'",
        True,
    )


@pytest.mark.parametrize(
    ("body", "expected"), [(b"30", 30), (b" 30\n", 30), (b"0", 0), (b"007", 7), (b"20000", 20000)]
)
def test_parse_request_accepts(body: bytes, expected: int) -> None:
    assert rpc_server.parse_request(body, 20000) == expected


@pytest.mark.parametrize(
    ("body", "shown"),
    [
        (b"abc", "'abc'"),
        (b"-1", "'-1'"),
        (b"1.5", "'1.5'"),
        (b"+5", "'+5'"),
        (b"1_0", "'1_0'"),
        (b"", "''"),
        (b"   ", "''"),
        ("٣".encode(), "'٣'"),  # an Arabic-Indic digit: int() would take it
        (b"\xff\xfe", "'\ufffd\ufffd'"),
        (b"20001", "'20001'"),
        (b"1" * 10**6, "'11111111111111111111...'"),  # refused by its length, unparsed
    ],
)
def test_parse_request_refuses(body: bytes, shown: str) -> None:
    with pytest.raises(ValueError, match=r"^n must be an integer from 0 to 20000, got ") as raised:
        rpc_server.parse_request(body, 20000)
    assert str(raised.value).endswith(shown)


@pytest.mark.parametrize(
    ("reply", "raised", "message"),
    [
        (
            amqp_rpc.Reply(b"invalid request: bad", True, False),
            rpc_client.RpcError,
            "^invalid request: bad$",
        ),
        (amqp_rpc.Reply(b"30", False, True), rpc_client.NoServerError, "^no queue 'rpc_queue'"),
    ],
    ids=["error-reply", "returned"],
)
def test_a_reply_that_is_not_an_answer_raises(reply, raised, message) -> None:
    client = object.__new__(amqp_rpc.RpcClient)  # no connection: the replies are in
    answer = amqp_rpc.Reply(b"832040", error=False, returned=False)
    client.queue, client.responses = "rpc_queue", {"ok": answer, "no": reply}
    assert client.wait(amqp_rpc.Request(b"30", deadline=0, corr_id="ok")) == b"832040"
    with pytest.raises(raised, match=message):
        client.wait(amqp_rpc.Request(b"30", deadline=0, corr_id="no"))


@pytest.mark.parametrize("body", [b"<html>", b"", b"1" * 5000])
def test_a_reply_that_is_no_number_is_an_rpc_error(body: bytes) -> None:
    with pytest.raises(rpc_client.RpcError, match=r"^cannot read the reply: "):
        rpc_client.read_answer(body)


@pytest.mark.parametrize(
    ("reply_to", "queue"),
    [
        ("amq.gen-Xa2", "amq.gen-Xa2"),
        ("amq.rabbitmq.reply-to.g1h2", "amq.rabbitmq.reply-to.g1h2"),
        ("/queues/replies", "replies"),
        ("/queues/my%20replies%2F1", "my replies/1"),
        ("/queues/a/b", "/queues/a/b"),  # not an address: a queue's name, as sent
        ("/queues/", "/queues/"),
        ("/exchanges/amq.direct/key", "/exchanges/amq.direct/key"),  # not taken: see the NOTE
        (b"/queues/\xff", b"/queues/\xff"),  # not UTF-8: pika gives bytes
    ],
)
def test_a_reply_to_is_a_queue_or_an_amqp_1_0_queue_address(reply_to, queue) -> None:
    assert amqp_rpc.reply_queue(reply_to) == queue


def test_errors_subclass_the_builtin_ones() -> None:
    assert issubclass(rpc_client.RpcTimeoutError, TimeoutError)
    assert issubclass(rpc_client.RpcConnectionError, ConnectionError)
    assert issubclass(rpc_client.NoServerError, rpc_client.RpcConnectionError)


def test_several_urls_make_a_shuffled_list_of_nodes() -> None:
    url = ",".join(f"amqp://u:p@127.0.0.1:{port}/%2F" for port in range(5681, 5691))
    orders = {tuple(node.port for node in amqp_rpc.broker_parameters(url, "t")) for _ in range(20)}
    assert {frozenset(order) for order in orders} == {frozenset(range(5681, 5691))}
    assert len(orders) > 1  # spread: 20 shuffles of 10 nodes alike by chance is 1 in 10**130


def test_a_comma_inside_a_query_does_not_split_a_url() -> None:
    name = "%7B%27connection_name%27%3A+%27a%2Cb%27%7D"  # {'connection_name': 'a,b'}
    url = f"amqp://u:p@h1/%2F?client_properties={name},amqps://u:p@h2:5671/%2F"
    nodes = sorted(amqp_rpc.broker_parameters(url, "t"), key=lambda node: node.host)
    assert [(node.host, node.port) for node in nodes] == [("h1", 5672), ("h2", 5671)]
    assert nodes[0].client_properties["connection_name"] == "a,b"  # the URL's name wins
    assert nodes[1].client_properties["connection_name"] == "t"


def test_nodes_are_given_a_bound_on_a_blocked_connection() -> None:
    (node,) = amqp_rpc.broker_parameters("amqp://u:p@h/%2F", "t")
    assert node.blocked_connection_timeout == amqp_rpc.BLOCKED_TIMEOUT
    (node,) = amqp_rpc.broker_parameters("amqp://u:p@h/%2F?blocked_connection_timeout=5", "t")
    assert node.blocked_connection_timeout == 5


@pytest.mark.parametrize("script", [rpc_server, rpc_client])
def test_help_exits_zero_and_explains(script, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        script.main(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert "--url" in out and "AMQP_URL" in out and "heartbeat" in out and "commas" in out


BAD_URLS = [
    ("not a url", "must start with amqp:// or amqps://"),
    ("localhost", "must start with amqp:// or amqps://"),
    ("amqp://guest:s3cret-pw@a..b/", "invalid broker URL: encoding with 'idna' codec failed"),
    ("amqp://guest:s3cret-pw@localhost:notaport/", "invalid broker URL: Port could not be cast"),
    ("amqp://guest:s3cret-pw@localhost/?heartbeat=soon", "invalid broker URL: Invalid heartbeat"),
    ("amqps://guest:s3cret-pw@localhost/?ssl_options=%7B%7D", "invalid broker URL: cafile"),
    ("amqps://guest:s3cret-pw@localhost/?ssl_options=%7B", "invalid broker URL: '{' was never"),
]
SERVER_BAD_ARGS = [
    (["--prefetch", "0"], "prefetch must be from 1 to 65535"),
    (["--prefetch", "65536"], "prefetch must be from 1 to 65535"),
    (["--max-n", "-1"], "--max-n must be at least 0"),
    (["--queue", "q" * 256], "queue must be at most 255 bytes, got 256"),
    (["--prefetch", "x"], "argument --prefetch: invalid int value"),
    (["--quiet", "--verbose"], "not allowed with argument"),
    *((["--url", url], message) for url, message in BAD_URLS),
]
CLIENT_BAD_ARGS = [
    (["abc"], "argument n: invalid int value"),
    (["1.5"], "argument n: invalid int value"),
    (["--timeout", "soon"], "argument --timeout: invalid float value"),
    (["--queue", "é" * 128], "queue must be at most 255 bytes, got 256"),
    *(
        (["--timeout", t], "timeout must be a positive number")
        for t in ("0", "-1", "nan", "inf", "315360001")
    ),
    *((["--url", url], message) for url, message in BAD_URLS),
]


@pytest.mark.parametrize(
    ("script", "argv", "message"),
    [(rpc_server, *case) for case in SERVER_BAD_ARGS]
    + [(rpc_client, *case) for case in CLIENT_BAD_ARGS],
)
def test_bad_arguments_are_one_error_line_and_exit_2(
    script, argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        script.main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    (error,) = [line for line in err.splitlines() if "error:" in line]  # after argparse's usage
    assert message in error
    assert "s3cret-pw" not in err


def test_url_flag_beats_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AMQP_URL", "amqp://guest:guest@127.0.0.1:1/")
    assert rpc_server.make_parser().parse_args([]).url == "amqp://guest:guest@127.0.0.1:1/"
    assert (
        rpc_server.make_parser().parse_args(["--url", "amqp://a:b@h:2/v"]).url == "amqp://a:b@h:2/v"
    )


@pytest.mark.parametrize("script", [rpc_server, rpc_client])
@pytest.mark.parametrize("host", ["127.0.0.1:1", "no-such-host.invalid:5672"])
def test_unreachable_broker_is_one_line_and_exit_1(
    script, host: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("AMQP_URL", f"amqp://guest:guest@{host}/")
    assert script.main([]) == 1
    err = capsys.readouterr().err
    assert f"cannot connect to the broker at {host}" in err
    assert len(err.strip().splitlines()) == 1


def test_importing_the_scripts_connects_to_nothing() -> None:
    # A fresh interpreter, with no broker reachable: importing must not try one.
    done = subprocess.run(
        [sys.executable, "-c", "import rpc_server, rpc_client; print('ok')"],
        env={"AMQP_URL": "amqp://guest:guest@127.0.0.1:1/", "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout == "ok\n"
