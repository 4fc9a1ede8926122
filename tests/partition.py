"""Three RabbitMQ 4.3 nodes, each in a network namespace of its own, to cut one off.

    python -m tests.partition up|down     the cluster by hand (up prints an AMQP_URL)

Namespaces rpc0part1..3 hold one node each, part1..3@10.77.0.1..3 (long names on their
addresses: nothing needs a hosts file), listening on PORT of their own address. A bridge
in this namespace, with 10.77.0.254/24 of its own, joins them, so that clients and
servers started here reach every node. (These names and addresses are slot 0's:
tests/nodes.py gives each run going on at the same time a slot of its own.) The subnet
exists on this machine only. Each node runs the chroot of scripts/rabbitmq4 in a mount
namespace of its own, with /proc and the temp directory mounted there: nothing is mounted
where others see it, nothing outlives the node. Each node's epmd starts in its own network
namespace.

A cut is a blackhole route each way between one node and the two others; this namespace
still reaches all three, as a client on either side would. With net_ticktime = 10 the
nodes see each other gone about 11 s after a cut.
NOTE: rabbitmqctl during a cut can block for 5 to 30 s: heal on a timer, never after one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.nodes import CLUSTER_CONFIG_4, SLOT, Node, join, port
from tests.support import fail_or_skip, named

ROOT = Path(__file__).resolve().parent.parent
SUBNET = f"10.77.{SLOT}"  # the run's slot (tests/nodes.py), as are the names below
BRIDGE = f"rpc{SLOT}part0"
PORT = port(5790)
# NOTE: a cut is seen after about net_ticktime (60 s by default: a 42 s cut goes unseen).
CONFIG = (
    "net_ticktime = 10\nloopback_users = none\n" + CLUSTER_CONFIG_4
)  # clients come from the bridge
# A command of the chroot ($0) with /proc and the temp directory ($1) mounted privately,
# and the namespace's address ($2) as host name: a CLI's node is then rabbitmqcli-...@$2,
# which the nodes reach to stream it what list_queues and the like list.
IN_CHROOT = (
    'mount -t proc proc "$0/proc" && mount --bind "$1" "$0$1" && '
    'echo "$2" >/proc/sys/kernel/hostname && shift 2 && '
    'exec chroot "$0" env RABBITMQ_USE_LONGNAME=true PATH=/usr/sbin:/usr/bin:/sbin:/bin "$@"'
)


def chroot() -> Path:
    """The 4.3 chroot (scripts/rabbitmq4 root), built if need be; RuntimeError if it cannot be."""
    done = subprocess.run(
        [str(ROOT / "scripts" / "rabbitmq4"), "root"], capture_output=True, text=True
    )
    if done.returncode != 0:
        raise RuntimeError(f"RabbitMQ 4.3: {done.stderr.strip()}")
    return Path(done.stdout.strip())


def need_tools() -> Path:
    """The 4.3 chroot; without root, iproute2 or the chroot a skip (a failure in CI)."""
    missing = [tool for tool in ("ip", "unshare", "chroot") if shutil.which(tool) is None]
    why = "root" if os.geteuid() != 0 else " and ".join(missing)
    if why:
        fail_or_skip(f"partition tests need {why}: they put RabbitMQ nodes in network namespaces")
    try:
        return chroot()
    except RuntimeError as error:
        fail_or_skip(f"partition tests need {error}")
        raise  # fail_or_skip raises


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


class NamespacedNode(Node):
    """Node i in namespace rpc0part{i}, on address 10.77.0.{i} (in slot 0)."""

    def __init__(self, i: int, chroot: Path) -> None:
        self.ns, self.ip = f"rpc{SLOT}part{i}", f"{SUBNET}.{i}"
        super().__init__(f"part{i}", PORT)
        self.name = f"part{i}@{self.ip}"
        self.config = f"listeners.tcp.1 = {self.ip}:{PORT}\n{CONFIG}"
        tmp = tempfile.gettempdir()
        self.command = ["ip", "netns", "exec", self.ns, "unshare", "--mount", "--uts"]
        self.command += [
            "--propagation",
            "private",
            "sh",
            "-c",
            IN_CHROOT,
            str(chroot),
            tmp,
            self.ip,
        ]

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@{self.ip}:{PORT}/%2F"


class Partition:
    """The three nodes, clustered; cut() one off, heal() it, remove() it all."""

    def __init__(self, chroot: Path) -> None:
        self.nodes = [NamespacedNode(i, chroot) for i in (1, 2, 3)]
        self.cut_off: NamespacedNode | None = None

    def start(self) -> None:
        self.remove()  # what a run killed half-way may have left
        ip("link", "add", BRIDGE, "type", "bridge")
        ip("addr", "add", f"{SUBNET}.254/24", "dev", BRIDGE)
        ip("link", "set", BRIDGE, "up")
        for node in self.nodes:
            ip("netns", "add", node.ns)
            ip("link", "add", f"{node.ns}h", "type", "veth", "peer", "eth0", "netns", node.ns)
            ip("link", "set", f"{node.ns}h", "master", BRIDGE, "up")
            ip("-n", node.ns, "addr", "add", f"{node.ip}/24", "dev", "eth0")
            ip("-n", node.ns, "link", "set", "eth0", "up")
            ip("-n", node.ns, "link", "set", "lo", "up")
        join(self.nodes)

    def url(self, name: str) -> str:
        """All three URLs, each naming its connection name, as every process is given them."""
        return ",".join(named(node.url, name) for node in self.nodes)

    def by_address(self, host: str) -> NamespacedNode:
        return next(node for node in self.nodes if node.ip == host)

    def _routes(self, action: str, node: NamespacedNode) -> None:
        for other in self.nodes:
            if other is not node:
                ip("-n", node.ns, "route", action, "blackhole", f"{other.ip}/32")
                ip("-n", other.ns, "route", action, "blackhole", f"{node.ip}/32")

    def cut(self, node: NamespacedNode) -> None:
        """Cut node off from the two others, both ways; it stays reachable from here."""
        self._routes("add", node)
        self.cut_off = node

    def heal(self) -> None:
        if self.cut_off is not None:
            self._routes("del", self.cut_off)
            self.cut_off = None

    def node_of(self, connection_name: str) -> NamespacedNode:
        """The node a connection of this name is on (asks a node: never during a cut)."""
        listed = json.loads(
            self.nodes[0].ctl(
                "list_connections", "client_properties", "host", "--formatter", "json"
            )
        )
        hosts = [
            ".".join(map(str, connection["host"]))  # listed as [10, 77, 0, 1]
            for connection in listed
            if ["connection_name", "longstr", connection_name] in connection["client_properties"]
        ]
        assert len(hosts) == 1, f"{connection_name!r} connected to {hosts}"
        return self.by_address(hosts[0])

    def queue_info(self, queue: str) -> dict:
        """The queue's leader, members and online members, as the first node lists them."""
        listed = json.loads(
            self.nodes[0].ctl(
                "list_queues", "name", "leader", "members", "online", "--formatter", "json"
            )
        )
        return next((info for info in listed if info["name"] == queue), {})

    def remove(self) -> None:
        """Stop every process in the namespaces; delete them, the links and the node data."""
        for node in self.nodes:
            pids = subprocess.run(["ip", "netns", "pids", node.ns], capture_output=True, text=True)
            for pid in map(int, pids.stdout.split()):  # the node, its epmd and shells: ours
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                while Path(f"/proc/{pid}").exists():
                    time.sleep(0.05)
            subprocess.run(["ip", "netns", "del", node.ns], capture_output=True)
            subprocess.run(["ip", "link", "del", f"{node.ns}h"], capture_output=True)
            shutil.rmtree(node.dir, ignore_errors=True)
        subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True)
        self.cut_off = None


def main(argv: list[str]) -> int:
    partition = Partition(chroot())  # RuntimeError, saying why, if it cannot be built
    if argv == ["up"]:
        partition.start()
        print(",".join(node.url for node in partition.nodes))
    elif argv == ["down"]:
        partition.remove()
    else:
        print("usage: python -m tests.partition up|down", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
