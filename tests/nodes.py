"""Extra RabbitMQ nodes on loopback, started from the local rabbitmq-server.

Each node has its own name, ports and directories (owned by the rabbitmq user, as the
server runs as that user), so the broker on 5672 is never touched. Used by the cluster
and TLS tests, and by `python -m tests.nodes start|stop` for a cluster by hand.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def claim_slot() -> int:
    """This run's slot, 0 to 3. Its node names, ports, namespaces and directories are the
    slot's own, so that a second run at the same time (in another clone, say) meets none
    of them. The slot is held as long as its lock file is: scripts/test holds one for all
    its processes and passes it on in RPC_TEST_SLOT; a pytest run alone takes its own."""
    if os.environ.get("RPC_TEST_SLOT"):
        return int(os.environ["RPC_TEST_SLOT"])
    for slot in range(4):
        path = Path(tempfile.gettempdir()) / f"rpc-tests-slot-{slot}.lock"
        # NOTE: opened to read, as flock needs no more: a lock file that a run of another
        # user (root's) left behind serves too. Kept open: the lock is held while it is.
        lock = open(os.open(path, os.O_RDONLY | os.O_CREAT, 0o644))  # noqa: SIM115
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            continue
        LOCKS.append(lock)  # held until the process ends
        os.environ["RPC_TEST_SLOT"] = str(slot)  # for the processes it starts
        return slot
    raise RuntimeError("four test runs are going on here already (rpc-tests-slot-0..3.lock)")


def port(base: int) -> int:
    """The slot's port for base (5781 in slot 0, 6781 in slot 1...)."""
    return base + 1000 * SLOT


LOCKS: list = []
SLOT = claim_slot()
BASE = Path(tempfile.gettempdir()) / f"rpc-rabbitmq-nodes-{SLOT}"
CLUSTER_PORTS = (port(5781), port(5782), port(5783))  # not the compose cluster's 5681-5683
MAIN_PORT = port(5700)  # scripts/test's RabbitMQ 4.3 node, which the whole suite runs on
# NOTE: RabbitMQ 4 keeps the requests a consumer on a lost node holds until this
# many ms have passed (60 s by default), in case the node is only cut off; then
# another server gets them. RabbitMQ 3 returns them at once and rejects the key.
CLUSTER_CONFIG_4 = "consumer_disconnected_timeout = 1000\n"


@functools.cache
def rabbitmq_major() -> int:
    """The major version of the local RabbitMQ (rabbitmqctl version needs no node)."""
    done = subprocess.run(["rabbitmqctl", "version"], capture_output=True, text=True, check=True)
    return int(done.stdout.strip().split(".")[0])


class Node:
    """One RabbitMQ node, c1-0@localhost (c1 of slot 0) on port 5781 say, its data under BASE."""

    def __init__(self, name: str, port: int, config: str = "") -> None:
        self.name = f"{name}-{SLOT}@localhost"
        self.port = port
        self.dir = BASE / name
        self.config = f"listeners.tcp.1 = 127.0.0.1:{port}\n{config}"
        self.files: dict[str, bytes] = {}  # written into dir by start(): see put()
        self.command: list[str] = []  # runs the CLI and server elsewhere (tests/partition.py)

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"

    def put(self, filename: str, content: bytes) -> Path:
        """Have start() write a file the node can read (a certificate, say); return its path."""
        self.files[filename] = content
        return self.dir / filename

    def ctl(self, *args: str, timeout: float = 120) -> str:
        """Run rabbitmqctl against this node; return its output, raise if it fails."""
        done = subprocess.run(
            [*self.command, "rabbitmqctl", "-q", "-n", self.name, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            # NOTE: the CLI names itself after RABBITMQ_NODENAME's host, if set (scripts/test
            # sets it for its main node): the node's own, or a node with long names hangs it.
            env={**os.environ, "RABBITMQ_NODENAME": self.name},
        )
        if done.returncode != 0:
            raise RuntimeError(f"rabbitmqctl -n {self.name} {' '.join(args)}: {done.stderr}")
        return done.stdout

    def start(self, fresh: bool = True) -> None:
        """Start the node detached (with empty data unless fresh is False); do not wait."""
        if fresh:
            self.remove()
        for sub in ("mnesia", "log"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        (self.dir / "rabbitmq.conf").write_text(self.config)
        (self.dir / "enabled_plugins").write_text("[].\n")
        for filename, content in self.files.items():
            (self.dir / filename).write_bytes(content)
        subprocess.run(["chown", "-R", "rabbitmq:rabbitmq", str(BASE)], check=True)
        env = {
            **os.environ,
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.port + 20000),
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(self.dir / "pid"),
        }
        subprocess.run(
            [*self.command, "rabbitmq-server", "-detached"],
            env=env,
            check=True,
            cwd=tempfile.gettempdir(),
        )

    def wait(self, timeout: float = 90) -> None:
        """Wait until the node has started (rabbitmqctl await_startup answers)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.ctl("await_startup", timeout=timeout)
                return
            except (RuntimeError, subprocess.TimeoutExpired):
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"{self.name} did not start; see {self.dir / 'log'}"
                    ) from None
                time.sleep(0.5)

    def pid(self) -> int | None:
        try:
            return int((self.dir / "pid").read_text())
        except (OSError, ValueError):
            return None

    def kill(self) -> None:
        """SIGKILL the node: no goodbye to its clients or to the rest of the cluster."""
        pid = self.pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            while Path(f"/proc/{pid}").exists():
                time.sleep(0.05)
        (self.dir / "pid").unlink(missing_ok=True)

    def remove(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def start_cluster(ports: tuple[int, ...] = CLUSTER_PORTS) -> list[Node]:
    """Start one node per port, c1 first, and join the others to it."""
    config = CLUSTER_CONFIG_4 if rabbitmq_major() >= 4 else ""
    nodes = [Node(f"c{i}", port, config) for i, port in enumerate(ports, 1)]
    join(nodes)
    return nodes


def join(nodes: list[Node]) -> None:
    """Start the nodes and join the others to the first."""
    for node in nodes:
        node.start()
    for node in nodes:
        node.wait()
    for node in nodes[1:]:
        node.ctl("stop_app")
        node.ctl("join_cluster", nodes[0].name)
        node.ctl("start_app")
        node.wait()


def main(argv: list[str]) -> int:
    nodes = [Node(f"c{i}", port) for i, port in enumerate(CLUSTER_PORTS, 1)]
    if argv == ["start"]:
        start_cluster()
        print(",".join(node.url for node in nodes))  # an AMQP_URL for the whole cluster
    elif argv == ["stop"]:
        for node in nodes:
            node.remove()
    else:
        print("usage: python -m tests.nodes start|stop", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
