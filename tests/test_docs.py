"""Every command and code block of the README and of docs/, run as it stands there.

A block is run by the tests that RUN_BY names for a piece of its text, or says in its text
what it needs that the suite has not got (NOT_RUN). A new block that is neither fails here.
"""

from __future__ import annotations

import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import pytest
import trustme

import amqp_rpc
from tests.partition import CONFIG
from tests.support import ROOT
from tests.test_scripts import Sandbox

DOCS = ["README.md", "docs/production.md", "docs/performance.md", "docs/development.md"]
NOT_RUN = "needs Docker, which the tests have not got"
# A piece of each block's text -> the tests that run it ("file.py::test_name ...").
RUN_BY = {
    "┌─────────────┐": "",  # a picture of the pair: nothing in it to run
    "./scripts/demo   #": "test_repository.py::test_demo_prints_fib_30"
    " test_docs.py::test_the_test_commands_run_as_they_say",
    ".venv/bin/python rpc_server.py": "test_docs.py::test_the_two_terminals",
    "print(fibonacci_rpc.call(30))": "test_docs.py::test_from_python",
    "class WordCountClient(RpcClient)": "test_procedure.py::"
    "test_the_readmes_own_procedure_answers_refuses_bad_input_and_needs_a_server",
    "from wordcount import WordCountClient": "test_procedure.py::"
    "test_the_readmes_own_procedure_answers_refuses_bad_input_and_needs_a_server",
    "?heartbeat=30&connection_attempts=5": "test_docs.py::test_the_urls_are_taken_as_they_stand",
    "./scripts/test -k signal -x           #": "test_docs.py::test_the_test_commands_run_as_they_say",
    "./scripts/test --disruptive": "test_docs.py::test_the_test_commands_run_as_they_say",
    "consumer_disconnected_timeout = 1000": "test_docs.py::"
    "test_the_settings_advised_are_those_the_tests_run_with",
    "%2C%20%27certfile%27": "test_docs.py::test_the_urls_are_taken_as_they_stand",
    "rabbitmqctl set_permissions": "test_security.py::test_least_privilege_accounts_answer"
    " test_security.py::test_each_grant_of_the_minimum_is_needed",
    "rabbitmqctl set_policy rpc-limit": "test_docs.py::test_the_delivery_limit_policy_is_taken",
    "ConsoleSpanExporter": "test_tracing.py::test_the_readmes_tracing_example_prints_the_client_span",
    ".venv/bin/python bench/rpc_bench.py": "test_bench.py::test_quick_run_gives_a_row_for_every_workload",
}


def test_every_block_is_run_by_a_test_or_says_what_it_needs() -> None:
    found: dict[str, int] = dict.fromkeys(RUN_BY, 0)
    for path, block in every_block():
        keys = [key for key in RUN_BY if key in block]
        for key in keys:
            found[key] += 1
        assert keys or NOT_RUN in block, f"{path}: a block no test runs:\n{block}"
    assert found == dict.fromkeys(RUN_BY, 1), "each piece names one block"
    for named in RUN_BY.values():
        for test in named.split():
            file, name = test.split("::")
            assert f"def {name}(" in (ROOT / "tests" / file).read_text(), test


def test_the_two_terminals(amqp_url: str, tmp_path: Path) -> None:
    (block,) = blocks("README.md", ".venv/bin/python rpc_server.py")
    setup, docker, server_line, client_line, more = block.splitlines()
    assert "needs Docker" in docker  # the one line not run
    for path in [*ROOT.glob("*.py"), ROOT / "requirements.txt"]:  # the pair, as a user has it
        shutil.copy(path, tmp_path)
    made = subprocess.run(setup, shell=True, cwd=tmp_path, capture_output=True, timeout=300)
    assert made.returncode == 0, made.stderr
    env = {"AMQP_URL": amqp_url, "PYTHONUNBUFFERED": "1"}
    server = subprocess.Popen(
        shlex.split(server_line.split("#")[0]),
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        # What each terminal shows stands in the comments, from the column after "terminal N: ".
        shown = server_line.index("terminal 1:") + len("terminal 1: ")
        assert server.stdout.readline().rstrip() == server_line[shown:]
        done = subprocess.run(
            shlex.split(client_line.split("#")[0]),
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.stdout.splitlines() == [client_line[shown:], more[shown:]], done.stderr
        server.send_signal(signal.SIGINT)  # as Ctrl-C would
        assert server.wait(30) == 0
    finally:
        server.kill()
        server.wait()


def test_from_python(start_server, amqp_url: str) -> None:
    start_server("--queue", "rpc_queue")  # the tutorial's queue, which the block uses
    (block,) = blocks("README.md", "print(fibonacci_rpc.call(30))")
    done = run_python(block, amqp_url)
    assert done.stdout.splitlines() == re.findall(r"print\(.*\)  # (.*)", block), done.stderr


def test_the_urls_are_taken_as_they_stand(tmp_path: Path) -> None:
    ca = trustme.CA()
    ca.cert_pem.write_to_path(tmp_path / "ca.pem")
    client = ca.issue_cert("app")
    client.cert_chain_pems[0].write_to_path(tmp_path / "client.pem")
    client.private_key_pem.write_to_path(tmp_path / "client.key")
    urls = [
        line
        for _, block in every_block()
        for line in block.splitlines()
        if line.startswith(("amqp://", "amqps://"))
    ]
    assert len(urls) == 5  # three in the README, two in production.md
    for url in urls:
        here = url.replace("%2Fetc%2Frpc%2F", quote(f"{tmp_path}/", safe=""))
        nodes = amqp_rpc.broker_parameters(here, "docs")  # pika reads the files named
        assert {node.host for node in nodes} <= {"mq.example.com", "mq1", "mq2", "mq3"}
        assert len(nodes) == url.count("://")


@pytest.mark.parametrize(
    ("path", "key"),
    [
        ("README.md", "./scripts/demo   #"),
        ("README.md", "./scripts/test -k signal -x           #"),
        ("docs/development.md", "./scripts/test --disruptive"),
    ],
)
def test_the_test_commands_run_as_they_say(sandbox: Sandbox, path: str, key: str) -> None:
    (block,) = blocks(path, key)
    for line in block.splitlines():
        command = shlex.split(line.split("#")[0])
        if command[0] != "./scripts/test":
            continue
        done = sandbox.run(*command[1:], uid=0)
        assert done.returncode == 0, done.stderr
        if command[1:2] == ["--mutants"]:
            assert done.calls("tests.mutants")[0]["args"] == command[2:]
        else:
            assert done.calls("pytest")[0]["args"] == command[1:]


def test_the_settings_advised_are_those_the_tests_run_with() -> None:
    (block,) = blocks("docs/production.md", "consumer_disconnected_timeout = 1000")
    for line in block.splitlines():
        assert line in (ROOT / "cluster" / "rabbitmq.conf").read_text().splitlines()
        assert line in CONFIG.splitlines()


@pytest.mark.disruptive
@pytest.mark.local_rabbitmq
def test_the_delivery_limit_policy_is_taken(rabbitmqctl) -> None:
    (block,) = blocks("docs/production.md", "rabbitmqctl set_policy rpc-limit")
    command = shlex.split(block.strip())
    rabbitmqctl(*command[1:])
    try:
        listed = rabbitmqctl("-q", "list_policies")
        assert "rpc-limit" in listed and '{"delivery-limit":20}' in listed.replace(" ", "")
    finally:
        rabbitmqctl("clear_policy", command[2])


# --- helpers and fixtures --------------------------------------------------------------


@pytest.fixture
def sandbox(tmp_path: Path, amqp_url: str) -> Sandbox:
    """scripts/test with stand-ins around it (tests/test_scripts.py): pytest only notes."""
    return Sandbox(tmp_path, amqp_url)


def every_block() -> list[tuple[str, str]]:
    """(file, text) of each fenced block of the README and docs/."""
    found = []
    for path in DOCS:
        text = (ROOT / path).read_text()
        found += [
            (path, block)
            for block in re.findall(r"^ *```[a-z]*\n(.*?)^ *```$", text, re.DOTALL | re.MULTILINE)
        ]
    return found


def blocks(path: str, key: str) -> list[str]:
    return [block for file, block in every_block() if file == path and key in block]


def run_python(code: str, amqp_url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        env={"AMQP_URL": amqp_url, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
