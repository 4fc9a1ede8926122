"""Tests that need no broker: fib, request parsing, reply building, the CLIs' arguments."""

from __future__ import annotations

import random
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

import rpc_client
import rpc_server


def plain_fib(n: int) -> int:
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


def test_fib_matches_the_plain_loop_up_to_1000() -> None:
    assert [fib for fib in map(rpc_server.fib, range(1001))] == [plain_fib(n) for n in range(1001)]


@pytest.mark.parametrize(
    ("n", "expected"),
    [(0, 0), (1, 1), (2, 1), (10, 55), (30, 832040), (100, 354224848179261915075)],
)
def test_fib_spot_values(n: int, expected: int) -> None:
    assert rpc_server.fib(n) == expected


def test_fib_of_the_largest_n_is_exact_and_prints_whole() -> None:
    text = str(rpc_server.fib(rpc_server.MAX_N))
    assert len(text) == 208988  # digits of fib(1000000)
    assert text.isdigit()
    # fib(n) mod 10**k by the plain loop, for the last digits
    a, b = 0, 1
    for _ in range(rpc_server.MAX_N):
        a, b = b, (a + b) % 10**12
    assert text.endswith(str(a).zfill(12))


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"30", 30),
        (b" 30\n", 30),
        (b"0", 0),
        (b"007", 7),
        (b"1000000", 1000000),
    ],
)
def test_parse_request_accepts(body: bytes, expected: int) -> None:
    assert rpc_server.parse_request(body, 1_000_000) == expected


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"abc", "n must be an integer from 0 to 1000000, got 'abc'"),
        (b"-1", "got '-1'"),
        (b"1.5", "got '1.5'"),
        (b"+5", "got '+5'"),
        (b"1_0", "got '1_0'"),
        (b"", "got ''"),
        (b"   ", "got ''"),
        ("٣".encode(), "got '٣'"),  # an Arabic-Indic digit: int() would take it
        (b"\xff\xfe", "got '\ufffd\ufffd'"),
        (b"1000001", "got '1000001'"),
        (b"9" * 64, "got '99999999999999999999...'"),
        (b"1" * 65, "request body is 65 bytes, the limit is 64"),
    ],
)
def test_parse_request_refuses(body: bytes, message: str) -> None:
    with pytest.raises(ValueError) as raised:
        rpc_server.parse_request(body, 1_000_000)
    assert message in str(raised.value)


def test_answer_is_the_decimal_digits() -> None:
    assert rpc_server.answer(30) == b"832040"
    assert rpc_server.answer(0) == b"0"


@given(length=st.integers(1, 30000), seed=st.integers(0, 2**32))
def test_to_int_reads_any_size(length: int, seed: int) -> None:
    digits = "".join(random.Random(seed).choices("0123456789", k=length))
    if not hasattr(sys, "get_int_max_str_digits"):  # a Python with no such limit
        assert rpc_client.to_int(digits.encode()) == int(digits)
        return
    limit = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(0)  # for the reference int() alone
    try:
        expected = int(digits)
    finally:
        sys.set_int_max_str_digits(limit)
    assert rpc_client.to_int(digits.encode()) == expected


def test_to_int_refuses_what_is_not_a_number() -> None:
    with pytest.raises(ValueError):
        rpc_client.to_int(b"12a4")


@pytest.mark.parametrize("kind", [None, "error"])
def test_result_reads_a_reply(kind: str | None) -> None:
    if kind == "error":
        with pytest.raises(rpc_client.RpcError, match=r"^invalid request: bad$"):
            rpc_client.FibonacciRpcClient.result("error", b"invalid request: bad")
    else:
        assert rpc_client.FibonacciRpcClient.result(None, b"832040") == 832040


def test_result_refuses_a_reply_that_is_not_a_number() -> None:
    with pytest.raises(rpc_client.RpcError, match="reply is not an integer"):
        rpc_client.FibonacciRpcClient.result(None, b"<html>")


def test_errors_subclass_the_builtin_ones() -> None:
    assert issubclass(rpc_client.RpcTimeoutError, TimeoutError)
    assert issubclass(rpc_client.RpcConnectionError, ConnectionError)
    assert issubclass(rpc_client.NoServerError, ConnectionError)


@pytest.mark.parametrize("script", [rpc_server, rpc_client])
def test_help_exits_zero_and_explains(script, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        script.main(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert "--url" in out and "AMQP_URL" in out and "heartbeat" in out


@pytest.mark.parametrize(
    "argv",
    [["--prefetch", "0"], ["--max-n", "-1"], ["--prefetch", "x"], ["--quiet", "--verbose"]],
)
def test_server_refuses_bad_arguments(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        rpc_server.main(argv)
    assert exited.value.code == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["abc"], ["--timeout", "soon"], ["1.5"]])
def test_client_refuses_bad_arguments(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        rpc_client.main(argv)
    assert exited.value.code == 2
    assert "invalid" in capsys.readouterr().err


def test_url_flag_beats_the_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("AMQP_URL", "amqp://guest:guest@127.0.0.1:1/")
    assert rpc_server.parse_args([]).url == "amqp://guest:guest@127.0.0.1:1/"
    assert rpc_server.parse_args(["--url", "amqp://a:b@h:2/v"]).url == "amqp://a:b@h:2/v"
    assert rpc_client.main(["--url", "amqp://guest:guest@127.0.0.1:2/"]) == 1
    assert "127.0.0.1:2" in capsys.readouterr().err


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
    assert "Traceback" not in err


@pytest.mark.parametrize(("script", "status"), [(rpc_server, 2), (rpc_client, 1)])
def test_invalid_url_is_one_line(script, status: int, capsys: pytest.CaptureFixture[str]) -> None:
    assert script.main(["--url", "amqp://guest:guest@localhost:notaport/"]) == status
    err = capsys.readouterr().err
    assert "URL" in err or "url" in err
    assert len(err.strip().splitlines()) == 1


def test_importing_the_scripts_connects_to_nothing() -> None:
    # A fresh interpreter, with no broker reachable: importing must not try one.
    import subprocess

    code = "import rpc_server, rpc_client; print('ok')"
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={
            "AMQP_URL": "amqp://guest:guest@127.0.0.1:1/",
            "PYTHONPATH": str(rpc_client.__file__).rsplit("/", 1)[0],
        },
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout == "ok\n"
