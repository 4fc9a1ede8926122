"""How scripts/test picks its broker: as root, with Docker, AMQP_URL given, without root.

Each test runs a copy of scripts/test with stand-ins first on PATH for `id`, `docker`
and `rabbitmq-server`, and in its .venv for python and ruff: pip installs nothing,
pytest only notes what it was asked to run (the suite does not run itself), and
scripts/rabbitmq4 builds nothing. The broker probes are real: they run on the broker
these tests use. No broker is started or stopped.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.conftest import server_version
from tests.support import ROOT, free_port

SECOND_LEG = "integration and not disruptive and not local_rabbitmq or rabbitmq3"
NODE_URL = "amqp://guest:guest@localhost:5700/%2F"  # what the stand-in 4.3 node's url says


def test_as_root_it_tests_on_rabbitmq_4_3_then_on_the_machines_broker(sandbox: Sandbox) -> None:
    done = sandbox.run("-m", "not partition", "-k", "fib", uid=0)
    assert done.returncode == 0, done.stderr
    assert "RabbitMQ 4.3: RabbitMQ 4.3.6 (stand-in)\n" in done.stderr
    first, second = done.calls("pytest")
    # Every test on 4.3, as asked; then, on the machine's broker, the integration tests
    # that leave it as it is, narrowed by the -m given.
    assert first == {"args": ["-m", "not partition", "-k", "fib"], "AMQP_URL": NODE_URL}
    assert second["args"] == ["-m", f"(not partition) and ({SECOND_LEG})", "-k", "fib"]
    assert "localhost:5672" in second["AMQP_URL"]
    assert ["down"] in [call["args"] for call in done.calls("rabbitmq4")]


def test_with_docker_every_test_runs_on_the_broker_that_answers(sandbox: Sandbox) -> None:
    done = sandbox.run("-k", "fib", uid=1000, docker=True)
    assert done.returncode == 0, done.stderr
    assert [call["args"] for call in done.calls("pytest")] == [["-k", "fib"]]
    assert [call["args"] for call in done.calls("docker")] == [["info"]]  # nothing composed


def test_amqp_url_given_every_test_runs_on_that_broker_alone(
    sandbox: Sandbox, amqp_url: str
) -> None:
    done = sandbox.run("-k", "fib", uid=1000, url=amqp_url)
    assert done.returncode == 0, done.stderr
    assert done.calls("pytest") == [{"args": ["-k", "fib"], "AMQP_URL": amqp_url}]


def test_without_root_it_names_the_broker_and_what_is_left_out(
    sandbox: Sandbox, amqp_url: str
) -> None:
    done = sandbox.run("-x", uid=1000, tests_status=3)
    assert done.returncode == 3  # the tests' own
    host = urlsplit(amqp_url).hostname
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"RabbitMQ {server_version(amqp_url)} at {host}:")
    assert "but those marked local_rabbitmq" in line
    assert "as root, or with a Docker engine" in line
    assert len(done.calls("pytest")) == 1


@pytest.mark.parametrize(
    ("given", "run"),
    [
        ([], ["-m", "not local_rabbitmq"]),
        (["-k", "fib", "-x"], ["-m", "not local_rabbitmq", "-k", "fib", "-x"]),
        (["-m", "not disruptive", "-q"], ["-m", "(not disruptive) and (not local_rabbitmq)", "-q"]),
        (["-mrabbitmq3"], ["-m", "(rabbitmq3) and (not local_rabbitmq)"]),
        (["-m", "a", "-m", "b"], ["-m", "(b) and (not local_rabbitmq)"]),  # pytest's: the last
        (["-k", "x", "--", "-m"], ["-m", "not local_rabbitmq", "-k", "x", "--", "-m"]),
    ],
)
def test_without_root_the_users_selection_is_kept_less_local_rabbitmq(
    sandbox: Sandbox, given: list[str], run: list[str]
) -> None:
    done = sandbox.run(*given, uid=1000)
    assert done.returncode == 0, done.stderr
    assert [call["args"] for call in done.calls("pytest")] == [run]


def test_without_root_and_no_broker_it_says_how_to_get_one_and_starts_none(
    sandbox: Sandbox,
) -> None:
    done = sandbox.run(uid=1000, probe=f"amqp://guest:guest@127.0.0.1:{free_port()}/%2F")
    assert done.returncode == 1
    assert "No RabbitMQ broker answers on localhost:5672" in done.stderr
    for way in ("docker compose up -d --wait", "apt-get install rabbitmq-server", "AMQP_URL="):
        assert way in done.stderr
    assert done.calls("pytest") == []
    assert done.calls("rabbitmq-server") == []
    assert [call["args"] for call in done.calls("docker")] == [["info"]]


def test_a_given_broker_refusing_the_credentials_is_reported(
    sandbox: Sandbox, amqp_url: str
) -> None:
    done = sandbox.run(uid=1000, url=with_password(amqp_url, "not-the-password"))
    assert_refused_and_nothing_started(done)


def test_without_root_a_broker_refusing_the_credentials_is_reported(
    sandbox: Sandbox, amqp_url: str
) -> None:
    done = sandbox.run(uid=1000, probe=with_password(amqp_url, "not-the-password"))
    assert_refused_and_nothing_started(done)


# --- helpers ------------------------------------------------------------------------------

# Every stand-in is this one program, acting by the name it is called under. Its calls
# go, one JSON line each, to the file CALLS names.
STAND_IN = """#!{python}
import json, os, sys

name, args = os.path.basename(sys.argv[0]), sys.argv[1:]
if name == "python" and args[0] == "-m":
    name, args = args[1], args[2:]
with open(os.environ["CALLS"], "a") as calls:
    calls.write(json.dumps({{"name": name, "args": args, "AMQP_URL": os.environ.get("AMQP_URL")}}))
    calls.write("\\n")
if name == "id":
    print(os.environ["STAND_IN_UID"])
elif name == "docker":
    sys.exit(0 if os.environ["STAND_IN_DOCKER"] == "yes" else 1)
elif name == "rabbitmq-server":
    sys.exit(1)
elif name == "rabbitmq4":
    if args == ["bin"]:
        print(os.path.dirname(os.environ["CALLS"]))
    if args == ["version"]:
        print("RabbitMQ 4.3.6 (stand-in)")
elif name == "pytest":
    sys.exit(int(os.environ["STAND_IN_STATUS"]))
elif name == "python" and "tests.nodes" in args[1]:
    # scripts/test's node(): Node(...).EXPR, printed unless None.
    expression = args[1].split("MAIN_PORT).")[1].split(";")[0]
    node = {{"name": "rabbit-stand-in", "dir": os.environ["STAND_IN_NODE_DIR"], "url": "{node_url}"}}
    if expression in node:
        print(node[expression])
elif name == "python":
    # The broker probes, for real: on PROBE_URL, the broker the tests say.
    os.environ["AMQP_URL"] = os.environ["PROBE_URL"]
    os.execv(sys.executable, [sys.executable, *args])
"""


@dataclass
class Done:
    """How a run of the copy of scripts/test ended, and what it called."""

    returncode: int
    stderr: str
    log: Path

    def calls(self, name: str) -> list[dict]:
        """The calls of the stand-in for name (pytest: `python -m pytest`), in order."""
        lines = self.log.read_text().splitlines() if self.log.exists() else []
        found = []
        for line in lines:
            call = json.loads(line)
            if call.pop("name") == name:
                found.append(call)
        return found


class Sandbox:
    """A copy of scripts/test and its library, with stand-ins around it."""

    def __init__(self, where: Path, amqp_url: str) -> None:
        self.where = where
        self.amqp_url = amqp_url
        self.repo = where / "repo"
        self.bin = where / "bin"
        self.node_dir = where / "node"
        (self.repo / "scripts").mkdir(parents=True)
        (self.repo / ".venv" / "bin").mkdir(parents=True)
        self.bin.mkdir()
        (self.node_dir / "log").mkdir(parents=True)
        (self.node_dir / "log" / "rabbit-stand-in.log").touch()  # no deprecated features
        for name in ("test", "_lib.sh"):
            shutil.copy2(ROOT / "scripts" / name, self.repo / "scripts" / name)
        program = STAND_IN.format(python=sys.executable, node_url=NODE_URL)
        for path in (
            self.bin / "id",
            self.bin / "docker",
            self.bin / "rabbitmq-server",
            self.repo / "scripts" / "rabbitmq4",
            self.repo / ".venv" / "bin" / "python",
            self.repo / ".venv" / "bin" / "ruff",
        ):
            path.write_text(program)
            path.chmod(0o755)

    def run(
        self,
        *args: str,
        uid: int,
        docker: bool = False,
        url: str | None = None,
        probe: str | None = None,
        tests_status: int = 0,
    ) -> Done:
        """Run scripts/test as user uid; url: AMQP_URL given; probe: where its probes go."""
        log = self.bin / "calls.jsonl"
        log.unlink(missing_ok=True)
        env = {k: v for k, v in os.environ.items() if k != "AMQP_URL"}
        env.update(
            PATH=f"{self.bin}:{env['PATH']}",
            TMPDIR=str(self.where),  # the root branch's slot locks: not those of real runs
            CALLS=str(log),
            PROBE_URL=probe or url or self.amqp_url,
            STAND_IN_UID=str(uid),
            STAND_IN_DOCKER="yes" if docker else "no",
            STAND_IN_STATUS=str(tests_status),
            STAND_IN_NODE_DIR=str(self.node_dir),
        )
        if url is not None:
            env["AMQP_URL"] = url
        done = subprocess.run(
            [str(self.repo / "scripts" / "test"), *args],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        return Done(done.returncode, done.stderr, log)


def assert_refused_and_nothing_started(done: Done) -> None:
    assert done.returncode == 1
    assert "answers but refuses its user name or password" in done.stderr
    assert done.calls("pytest") == []
    assert done.calls("rabbitmq-server") == []
    assert ["compose", "up", "-d", "--wait"] not in [call["args"] for call in done.calls("docker")]


def with_password(url: str, password: str) -> str:
    """url with another password for its user."""
    parts = urlsplit(url)
    netloc = f"{parts.username or 'guest'}:{password}@{parts.hostname}:{parts.port or 5672}"
    return urlunsplit(parts._replace(netloc=netloc))


@pytest.fixture
def sandbox(tmp_path: Path, amqp_url: str) -> Sandbox:
    return Sandbox(tmp_path, amqp_url)
