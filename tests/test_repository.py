"""The files around the scripts: the compose file's shape and the quickstart's demo command."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import yaml

from tests import nodes, partition, test_cluster, test_security
from tests.support import (
    ROOT,
)


def compose_services() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]


def node_ports() -> list[int]:
    """The ports of every node the tests start, in this run's slot (mtls1's plain one too)."""
    mtls = test_security.MTLS_PORT
    tls = [test_security.PLAIN_PORT, test_security.TLS_PORT, mtls - 1, mtls]
    return [*nodes.CLUSTER_PORTS, nodes.MAIN_PORT, partition.PORT, test_cluster.ALARM_PORT, *tls]


def test_compose_file_runs_a_current_rabbitmq_with_a_healthcheck() -> None:
    services = compose_services()
    # The one service that `docker compose up` starts: the others are in profiles.
    (service,) = (s for s in services.values() if "profiles" not in s)
    assert service["image"] == "rabbitmq:4.3-management"  # the version the suite proves
    assert {"5672:5672", "15672:15672"} <= set(service["ports"])
    # `docker compose up --wait` waits on this: it must really ping the broker.
    assert service["healthcheck"]["test"] == ["CMD", "rabbitmq-diagnostics", "-q", "ping"]


def test_compose_cluster_profile_runs_three_clustered_nodes() -> None:
    services = compose_services()
    nodes = {
        name: service
        for name, service in services.items()
        if "cluster" in service.get("profiles", ())
    }
    assert sorted(nodes) == ["rabbit1", "rabbit2", "rabbit3"]
    cookies, mounts = set(), set()
    for i, (name, node) in enumerate(sorted(nodes.items()), 1):
        assert node["image"] == "rabbitmq:4.3-management"
        assert node["hostname"] == name  # the node is rabbit@<hostname>
        assert f"568{i}:5672" in node["ports"]
        assert node["healthcheck"]["test"] == ["CMD", "rabbitmq-diagnostics", "-q", "ping"]
        cookies.add(node["environment"]["RABBITMQ_ERLANG_COOKIE"])
        mounts.update(node["volumes"])
    # One cookie for all three, or they cannot talk to each other; one config file.
    (cookie,) = cookies
    assert cookie
    (mount,) = mounts
    source, target = mount.split(":")[:2]
    assert target.startswith("/etc/rabbitmq/conf.d/")  # next to the image's defaults
    # Nodes 2 and 3 start once node 1 is healthy, and join it.
    for name in ("rabbit2", "rabbit3"):
        assert nodes[name]["depends_on"]["rabbit1"]["condition"] == "service_healthy"
    settings = dict(
        line.split(" = ")
        for line in (ROOT / source).read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert settings["cluster_formation.peer_discovery_backend"] == "classic_config"
    listed = {v for k, v in settings.items() if k.startswith("cluster_formation.classic_config.")}
    assert listed == {f"rabbit@{name}" for name in nodes}


def test_a_second_run_at_the_same_time_takes_nodes_ports_and_a_subnet_of_its_own() -> None:
    """This run holds its slot (tests/nodes.py); a second one started now takes another."""
    probe = (
        "import json; from tests import nodes, partition; from tests.test_repository import"
        " node_ports; print(json.dumps("
        "[nodes.SLOT, partition.SUBNET, str(nodes.BASE), node_ports()]))"
    )
    env = {k: v for k, v in os.environ.items() if k != "RPC_TEST_SLOT"}
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True
    )
    slot, subnet, base, theirs = json.loads(done.stdout)
    assert slot != nodes.SLOT and subnet != partition.SUBNET and base != str(nodes.BASE)
    ours = set(node_ports())
    published = {
        int(mapping.split(":")[0]) for s in compose_services().values() for mapping in s["ports"]
    }
    assert not ours & set(theirs) and not (ours | set(theirs)) & published


def test_readme_quickstart_names_the_two_commands_ci_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "./scripts/demo" in readme and "./scripts/test" in readme
    assert "./scripts/test" in (ROOT / ".ci" / "run").read_text()


def test_github_workflow_runs_the_readme_test_command_against_rabbitmq_4_3() -> None:
    # actionlint from PyPI downloads its binary from GitHub at install time, which this
    # CI cannot reach: the workflow's shape is checked here instead.
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "ci.yml").read_text())
    assert set(workflow[True]) == {"push", "pull_request"}  # YAML 1.1 reads "on" as True
    (job,) = workflow["jobs"].values()
    (service,) = job["services"].values()
    assert service["image"] == "rabbitmq:4.3-management"  # the version the suite proves
    development = (ROOT / "docs" / "development.md").read_text()
    assert "rabbitmq:4.3-management" in development
    assert service["ports"] == ["5672:5672"]
    assert '--health-cmd "rabbitmq-diagnostics -q ping"' in service["options"]
    readme = (ROOT / "README.md").read_text()
    versions = job["strategy"]["matrix"]["python-version"]
    assert f"Python {versions[0]} to {versions[-1]}" in readme
    steps = job["steps"]
    assert steps[0]["uses"].startswith("actions/checkout@")
    assert steps[1]["with"]["python-version"] == "${{ matrix.python-version }}"
    # The README's test command, with the tests that need local RabbitMQ tools left out.
    assert steps[-1]["run"] == './scripts/test -m "not local_rabbitmq"'
    assert '`./scripts/test -m "not local_rabbitmq"`' in development


def test_demo_prints_fib_30(amqp_url: str) -> None:
    done = subprocess.run(
        [str(ROOT / "scripts" / "demo")],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "AMQP_URL": amqp_url},
    )
    assert done.returncode == 0, done.stderr
    assert " [x] Requesting fib(30)\n [.] Got 832040\n" in done.stdout
    assert "[server]  [.] fib(30)" in done.stdout
