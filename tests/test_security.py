"""Security: TLS against a real listener, mutual TLS, and least-privilege accounts.

Two RabbitMQ nodes of the tests' own on loopback (tests/nodes.py): tls1, with a TLS
listener beside its plain one, and mtls1, whose TLS listener demands a client
certificate. The CA and certificates are made at test time with trustme. Every
account made here has the marker password PASSWORD, which no output may show.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import subprocess
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pika
import pytest
import trustme

from tests.nodes import Node, port
from tests.support import (
    READY,
    ROOT,
    Server,
    fail_or_skip,
    run_script,
    wait_until,
)

pytestmark = pytest.mark.local_rabbitmq

PASSWORD = "Marker-Pw-7c41e9"  # in every URL here; never in any output
ADMIN = "rpc-admin"  # the nodes' default user (administrator, all permissions)
TLS_QUEUE = "rpc_tls_queue"
QUEUE = "rpc_queue"  # the queue the server's least-privilege permissions name
PLAIN_PORT, TLS_PORT = port(5691), port(5692)  # tls1's listeners (tests/nodes.py: slot 0)
MTLS_PORT = port(5694)  # mtls1's TLS listener (its plain one is on 5693)
HOSTNAME = "localhost"  # the only name in the nodes' certificates

# The least permissions each script needs, (configure, write, read), found by experiment
# (test_each_grant_of_the_minimum_is_needed takes each one away), as docs/production.md
# gives them to operators, read from its rabbitmqctl set_permissions lines:
# the server configures nothing (its queue is declared by an admin; a passive declare
# needs no permission), reads rpc_queue (basic.consume) and writes to the default
# exchange (its replies). The client configures and reads its server-named reply queue
# (queue.declare, basic.consume) and writes to the default exchange (its requests).
LEAST_PRIVILEGE = {
    shlex.split(line)[4]: tuple(shlex.split(line)[5:])
    for line in (ROOT / "docs" / "production.md").read_text().splitlines()
    if line.startswith("rabbitmqctl set_permissions -p / ")
}
NARROWED = "rpc-narrowed"  # an account given the minimum less one grant, test by test


SCRIPTS = ["rpc_server.py", "rpc_client.py"]


def test_tls_with_the_ca_in_ssl_cert_file(tls_node, pki, clean_env) -> None:
    clean_env.setenv("SSL_CERT_FILE", str(pki.ca_file))
    address = url(ADMIN, TLS_PORT)
    with serving(address, TLS_QUEUE):
        assert_answered(call(address, TLS_QUEUE))


def test_tls_with_the_ca_in_the_url(tls_node, pki, clean_env) -> None:
    address = url(ADMIN, TLS_PORT, ca_certs=str(pki.ca_file))
    with serving(address, TLS_QUEUE):
        assert_answered(call(address, TLS_QUEUE))


@pytest.mark.parametrize("script", SCRIPTS)
def test_an_untrusted_certificate_is_refused(tls_node, clean_env, script: str) -> None:
    done = run(script, url(ADMIN, TLS_PORT), TLS_QUEUE)
    assert_refused(done, script, "CERTIFICATE_VERIFY_FAILED")


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_certificate_for_another_name_is_refused(tls_node, pki, clean_env, script) -> None:
    clean_env.setenv("SSL_CERT_FILE", str(pki.ca_file))
    done = run(script, url(ADMIN, TLS_PORT, host="127.0.0.1"), TLS_QUEUE)  # not localhost
    assert_refused(done, script, "mismatch, certificate is not valid for '127.0.0.1'")


def test_a_wrong_password_is_refused_and_not_shown(tls_node, pki, clean_env) -> None:
    address = url(ADMIN, TLS_PORT, ca_certs=str(pki.ca_file))
    done = run("rpc_client.py", address.replace(PASSWORD, PASSWORD + "-wrong"), TLS_QUEUE)
    assert_refused(done, "rpc_client.py", "ACCESS_REFUSED")


def test_debug_logs_do_not_show_the_password(tls_node, pki, clean_env) -> None:
    address = url(ADMIN, TLS_PORT, ca_certs=str(pki.ca_file))
    with serving(address, TLS_QUEUE, "--verbose") as server:  # pika's frames and parameters too
        done = run("rpc_client.py", address, TLS_QUEUE, "--verbose")
    assert done.returncode == 0, done.stderr
    # Both logged at debug level, pika included (serving() and run() look for the password).
    for logged in (done.stderr, "\n".join(server.stderr)):
        assert " DEBUG pika." in logged


def test_mutual_tls_with_a_client_certificate(mtls_node, pki, clean_env) -> None:
    address = url(
        ADMIN,
        MTLS_PORT,
        ca_certs=str(pki.ca_file),
        certfile=str(pki.client_cert),
        keyfile=str(pki.client_key),
    )
    with serving(address, TLS_QUEUE):
        assert_answered(call(address, TLS_QUEUE))


@pytest.mark.parametrize("script", SCRIPTS)
def test_mutual_tls_without_a_client_certificate_is_refused(
    mtls_node, pki, clean_env, script: str
) -> None:
    done = run(script, url(ADMIN, MTLS_PORT, ca_certs=str(pki.ca_file)), TLS_QUEUE)
    assert_refused(done, script, f"cannot connect to the broker at localhost:{MTLS_PORT}")
    # NOTE: in TLS 1.3 the broker refuses after the handshake, when the client has sent
    # its first bytes; its alert can be lost to the reset that closes the socket.
    assert "certificate required" in done.stderr or "EOF occurred" in done.stderr


def test_least_privilege_accounts_answer(declared_queue: str) -> None:
    with serving(url("rpc-server", PLAIN_PORT), declared_queue) as server:
        assert_answered(call(url("rpc-client", PLAIN_PORT), declared_queue))
    said = "this account may not declare 'rpc_queue'; using it as declared"
    assert len([line for line in server.stderr if said in line]) == 1, server.stderr


def test_least_privilege_server_without_its_queue_exits(accounts: Node) -> None:
    with admin() as channel:
        channel.queue_delete(QUEUE)
    done = run("rpc_server.py", url("rpc-server", PLAIN_PORT), QUEUE)
    reason = "no queue 'rpc_queue' in vhost '/', and this account may not declare it"
    assert_refused(done, "rpc_server.py", reason)


@pytest.mark.parametrize(
    ("account", "grant", "refusal"),
    [
        ("rpc-server", 1, "access to exchange 'amq.default'"),  # its reply
        ("rpc-server", 2, "access to queue 'rpc_queue'"),
        ("rpc-client", 0, "access to queue 'amq.gen-"),
        ("rpc-client", 1, "access to exchange 'amq.default'"),  # its request
        ("rpc-client", 2, "access to queue 'amq.gen-"),
    ],
    ids=["server-write", "server-read", "client-configure", "client-write", "client-read"],
)
def test_each_grant_of_the_minimum_is_needed(
    accounts: Node, declared_queue: str, account: str, grant: int, refusal: str
) -> None:
    narrowed = ["^$" if i == grant else p for i, p in enumerate(LEAST_PRIVILEGE[account])]
    accounts.ctl("set_permissions", "-p", "/", NARROWED, *narrowed)
    users = {name: NARROWED if name == account else name for name in LEAST_PRIVILEGE}
    with serving(url(users["rpc-server"], PLAIN_PORT), declared_queue, ready=False) as server:
        done = call(url(users["rpc-client"], PLAIN_PORT), declared_queue)
        status = server.wait() if account == "rpc-server" else None
    if account == "rpc-client":
        assert_refused(done, "rpc_client.py", refusal)
    else:  # the server exits at the refusal, saying it; the client has no answer
        said = [line for line in server.stderr if line.startswith("rpc_server: ")]
        assert status == 1 and len(said) == 1 and refusal in said[0], server.stderr
        assert done.returncode == 1, done.stderr


# --- the helpers and fixtures of the tests above ------------------------------------------


@dataclass
class Pki:
    ca: trustme.CA
    ca_file: Path
    client_cert: Path
    client_key: Path


def url(user: str, port: int, host: str = HOSTNAME, **ssl_options: str) -> str:
    """amqps:// to a TLS port, amqp:// to a plain one; ssl_options URL-encoded as pika reads them."""
    scheme = "amqps" if port in (TLS_PORT, MTLS_PORT) else "amqp"
    query = f"?ssl_options={urllib.parse.quote(repr(ssl_options), safe='')}" if ssl_options else ""
    return f"{scheme}://{user}:{PASSWORD}@{host}:{port}/%2F{query}"


@contextlib.contextmanager
def admin() -> Iterator[pika.adapters.blocking_connection.BlockingChannel]:
    """A channel on tls1 as the admin, over its plain listener."""
    connection = pika.BlockingConnection(pika.URLParameters(url(ADMIN, PLAIN_PORT)))
    try:
        yield connection.channel()
    finally:
        connection.close()


def run(script: str, address: str, queue: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run a script to its end; nothing it prints may show the password."""
    done = run_script(script, "--url", address, "--queue", queue, *args, timeout=30)
    assert PASSWORD not in done.stdout + done.stderr
    return done


def call(address: str, queue: str) -> subprocess.CompletedProcess[str]:
    return run("rpc_client.py", address, queue, "--timeout", "10", "30")


@contextlib.contextmanager
def serving(address: str, queue: str, *args: str, ready: bool = True) -> Iterator[Server]:
    """rpc_server.py running (ready, or else ready or gone); killed at the end."""
    environment = {k: v for k, v in os.environ.items() if k != "AMQP_URL"}
    server = Server(["--url", address, "--queue", queue, *args], environment)
    try:
        if ready:
            server.wait_for(READY)
        else:
            wait_until(
                lambda: READY in server.stdout or server.process.poll() is not None,
                20,
                "server ready or gone",
            )
        yield server
    finally:
        server.kill()
        server.wait()
    assert PASSWORD not in "\n".join(server.stdout + server.stderr)


def assert_answered(done: subprocess.CompletedProcess[str]) -> None:
    assert (done.returncode, done.stdout) == (0, " [x] Requesting fib(30)\n [.] Got 832040\n"), (
        done.stderr
    )


def assert_refused(done: subprocess.CompletedProcess[str], script: str, reason: str) -> None:
    """Exit status 1 and one line on stderr (besides the server's log records), no traceback."""
    lines = [line for line in done.stderr.splitlines() if " INFO amqp_rpc" not in line]
    assert done.returncode == 1, done.stderr
    assert len(lines) == 1 and lines[0].startswith(f"{script[:-3]}: "), done.stderr
    assert reason in lines[0]


def make_tls_node(name: str, port: int, ca: trustme.CA, config: str = "") -> Node:
    """A node with a TLS listener on port + 1, its certificate for HOSTNAME alone."""
    node = Node(name, port)
    leaf = ca.issue_cert(HOSTNAME)
    ca_file = node.put("ca.pem", ca.cert_pem.bytes())
    cert_file = node.put("server.pem", leaf.cert_chain_pems[0].bytes())
    key_file = node.put("server.key", leaf.private_key_pem.bytes())
    node.config += (
        f"listeners.ssl.default = 127.0.0.1:{port + 1}\n"
        f"ssl_options.cacertfile = {ca_file}\n"
        f"ssl_options.certfile = {cert_file}\n"
        f"ssl_options.keyfile = {key_file}\n"
        # The admin instead of guest: no rabbitmqctl call (a second or two each) to add it.
        f"default_user = {ADMIN}\n"
        f"default_pass = {PASSWORD}\n"
        f"{config}"
    )
    return node


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA made for this run, and a client certificate it signed, in files for the scripts."""
    directory = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    client = ca.issue_cert("rpc-client")
    paths = Pki(ca, directory / "ca.pem", directory / "client.pem", directory / "client.key")
    ca.cert_pem.write_to_path(str(paths.ca_file))
    client.cert_chain_pems[0].write_to_path(str(paths.client_cert))
    client.private_key_pem.write_to_path(str(paths.client_key))
    return paths


@pytest.fixture(scope="session")
def nodes(pki: Pki) -> Iterator[dict[str, Node]]:
    """tls1 (plain 5691, TLS 5692) and mtls1 (plain 5693, TLS 5694, client certificates
    required), started together; stopped and removed at the end of the session."""
    missing = [tool for tool in ("rabbitmq-server", "rabbitmqctl") if shutil.which(tool) is None]
    if missing:
        fail_or_skip(f"{' and '.join(missing)} not found: these tests start RabbitMQ nodes")
    started = {
        "tls": make_tls_node("tls1", PLAIN_PORT, pki.ca),
        "mtls": make_tls_node(
            "mtls1",
            MTLS_PORT - 1,
            pki.ca,
            "ssl_options.verify = verify_peer\nssl_options.fail_if_no_peer_cert = true\n",
        ),
    }
    try:
        for node in started.values():
            node.start()  # both boot at once
        for node in started.values():
            node.wait()
        yield started
    finally:
        for node in started.values():
            node.remove()


@pytest.fixture(scope="session")
def tls_node(nodes: dict[str, Node]) -> Node:
    return nodes["tls"]


@pytest.fixture(scope="session")
def mtls_node(nodes: dict[str, Node]) -> Node:
    return nodes["mtls"]


@pytest.fixture(scope="session")
def accounts(tls_node: Node) -> Node:
    """tls1 with the least-privilege accounts (and NARROWED, its permissions set per test)."""
    for user in (*LEAST_PRIVILEGE, NARROWED):
        tls_node.ctl("add_user", user, PASSWORD)
    for user, permissions in LEAST_PRIVILEGE.items():
        tls_node.ctl("set_permissions", "-p", "/", user, *permissions)
    return tls_node


@pytest.fixture
def declared_queue(accounts: Node) -> Iterator[str]:
    """rpc_queue, declared on tls1 by the admin as the server would declare it."""
    with admin() as channel:
        channel.queue_declare(QUEUE, durable=True, arguments={"x-queue-type": "quorum"})
    yield QUEUE
    with admin() as channel:
        channel.queue_delete(QUEUE)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No CA from the environment unless the test puts one there."""
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    return monkeypatch
