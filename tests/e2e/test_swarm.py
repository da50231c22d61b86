"""The main job on a real three-node Docker Swarm through the real CLI: the same
kiln.toml plus a ``[runtime]`` table; instances spread over the nodes, a rolling update
under load with no failed request, a SIGKILLed instance replaced, a lost node's
instances replaced on the others, its old instance removed (not adopted) when it
comes back, a rollback, the logs of an instance that ran on the lost node, and a
down that leaves nothing of the home in the swarm."""

# ruff: noqa: F811 - the swarm_cluster fixture is imported by name and used as a parameter
from __future__ import annotations

import json
import os
import subprocess
import tarfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_story import KILN, fetch, free_port, kiln, make_project, status, wait_for

from kiln.observe.load import LoadGenerator
from kiln.oci.runc import home_tag
from kiln.runtime.docker import LABEL_HOME, LABEL_INSTANCE
from swarm_cluster import SwarmCluster, swarm_cluster  # noqa: F401

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.docker,
    pytest.mark.skipif(os.geteuid() != 0, reason="a swarm of engines needs root"),
]


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    home = tmp_path / "home"
    yield home
    kiln(home, "down")


def swarm_project(root: Path, listen: int, cluster: SwarmCluster) -> Path:
    project = make_project(root, listen, "v1")
    toml = project / "kiln.toml"
    toml.write_text(
        toml.read_text().replace(
            "[images.web]",
            "[runtime]\n"
            'kind = "swarm"\n'
            f'host = "{cluster.manager.host}"\n'
            f'registry = "{cluster.registry}/story"\n\n'
            f'[registries."{cluster.registry}"]\n'
            f'ca = "{cluster.registry_ca}"\n\n'
            "[images.web]",
        )
    )
    return project


def ready(home: Path) -> list[dict]:  # type: ignore[type-arg]
    return [i for i in status(home)["instances"] if i["state"] == "ready"]


def start_agent(home: Path, project: Path, address: str) -> subprocess.Popen[bytes]:
    """``kiln agent --listen`` on the bridge, where every node (and its edge) reaches it."""
    home.mkdir(mode=0o700, exist_ok=True)
    log = open(home / "agent-fg.log", "wb")  # noqa: SIM115 - the agent outlives this call
    agent = subprocess.Popen(
        [KILN, "agent", "--listen", address, "--file", str(project)],
        env=dict(os.environ, KILN_HOME=str(home)),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    wait_for(lambda: (home / "agent.sock").exists() or agent.poll() is not None, timeout=30)
    assert agent.poll() is None, (home / "agent-fg.log").read_text()
    return agent


def edge_serves(address: str, port: int, body: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{address}:{port}/", timeout=2) as response:
            return bool(response.read().decode().strip() == body)
    except OSError:
        return False


def apply_v2_under_load(home: Path, project: Path, listen: int, edge: str, what: str) -> str:
    """``index.html`` to v2 and ``kiln apply`` while load runs through the agent's proxy
    and through another node's edge; no request may fail on either. Returns apply's
    stderr (its events)."""
    (project / "rootfs" / "www" / "index.html").write_text("v2\n")
    with (
        LoadGenerator("127.0.0.1", listen, workers=2) as load,
        LoadGenerator(edge, listen, workers=2) as through_edge,
    ):
        time.sleep(0.3)
        applied = kiln(home, "apply", "--file", str(project), "--yes")
        time.sleep(1.0)
    assert applied.returncode == 0, applied.stderr
    print(f"swarm {what}, agent's proxy: {load.report.summary()}")
    print(f"swarm {what}, edge of node 2: {through_edge.report.summary()}")
    for report in (load.report, through_edge.report):
        assert report.sent > 100
        assert report.failed == 0, report.errors
    return applied.stderr


def test_the_main_job_on_a_three_node_swarm(
    home: Path, tmp_path: Path, swarm_cluster: SwarmCluster
) -> None:
    listen = free_port()
    project = swarm_project(tmp_path / "p", listen, swarm_cluster)
    nodes = {n.address: n for n in swarm_cluster.nodes}
    agent = start_agent(home, project, f"{swarm_cluster.gateway}:{free_port()}")
    try:
        up = kiln(home, "up", str(project))
        assert up.returncode == 0, up.stderr
        assert fetch(listen) == "v1"

        # The edges: baked by Kiln, one per node, each serving the routes it watches.
        started = time.monotonic()
        for node in swarm_cluster.nodes:
            wait_for(lambda n=node: edge_serves(n.address, listen, "v1"), timeout=240)
        print(f"swarm: edges serving on every node after {time.monotonic() - started:.1f}s")
        edge = swarm_cluster.nodes[1].address
        first = ready(home)
        assert len(first) == 3
        hosts = {i["address"].rpartition(":")[0] for i in first}
        assert hosts <= set(nodes), hosts
        assert len(hosts) >= 2, f"Swarm spread nothing: {hosts}"

        apply_v2_under_load(home, project, listen, edge, "rollout under load")
        assert fetch(listen) == "v2"
        wait_for(lambda: edge_serves(edge, listen, "v2"), timeout=10)
        assert not {i["id"] for i in first} & {i["id"] for i in ready(home)}

        # A SIGKILLed instance: its task ends, Kiln replaces it with a new instance.
        victim = ready(home)[0]
        node = nodes[victim["address"].rpartition(":")[0]]
        container = swarm_cluster.containers(node, f"{LABEL_INSTANCE}={victim['id']}")[0]
        killed = time.monotonic()
        node.docker("kill", "-s", "KILL", container["Id"])

        def replaced(gone: str) -> bool:
            now = ready(home)
            return len(now) == 3 and gone not in {i["id"] for i in now}

        wait_for(lambda: replaced(victim["id"]), timeout=60)
        print(f"swarm: SIGKILLed instance replaced in {time.monotonic() - killed:.1f}s")

        # A lost node: its instances are replaced on the others, full strength again.
        worker_instances = [
            i
            for i in ready(home)
            if i["address"].rpartition(":")[0] != swarm_cluster.manager.address
        ]
        assert worker_instances, "no instance on a worker"
        lost = nodes[worker_instances[0]["address"].rpartition(":")[0]]
        on_lost = {i["id"] for i in ready(home) if i["address"].rpartition(":")[0] == lost.address}
        with LoadGenerator(swarm_cluster.manager.address, listen, workers=2) as load:
            swarm_cluster.cut(lost)
            cut_at = time.monotonic()

            def recovered() -> bool:
                now = ready(home)
                return len(now) == 3 and not ({i["id"] for i in now} & on_lost)

            wait_for(recovered, timeout=90)
            print(
                f"swarm: node lost, full strength again in {time.monotonic() - cut_at:.1f}s; "
                f"{load.report.summary()}"
            )
        assert all(i["address"].rpartition(":")[0] != lost.address for i in ready(home))

        logs = kiln(home, "logs", "web", "--instance", sorted(on_lost)[0])
        assert logs.returncode == 0, logs.stderr
        assert "started v2" in logs.stdout

        # The node comes back: its old instance is removed, never adopted a second time.
        swarm_cluster.restore(lost)
        swarm_cluster.wait_node_state(lost, "ready")

        def old_removed() -> bool:
            left = swarm_cluster.containers(lost, f"{LABEL_HOME}={home_tag(home)}")
            return not [c for c in left if c["Labels"].get(LABEL_INSTANCE) in on_lost]

        wait_for(old_removed, timeout=60)
        assert len(ready(home)) == 3
        assert not ({i["id"] for i in status(home)["instances"]} & on_lost)

        back = kiln(home, "rollback", "web")
        assert back.returncode == 0, back.stderr
        assert fetch(listen) == "v1"

        down = kiln(home, "down")
        assert down.returncode == 0, down.stderr
        assert agent.wait(timeout=30) == 0
        api = swarm_cluster.manager.api()
        try:
            left = api.services(filters={"label": f"{LABEL_HOME}={home_tag(home)}"})
            assert left == [], [s["Spec"]["Name"] for s in left]
        finally:
            api.close()
    finally:
        for node in swarm_cluster.nodes:
            if node.index in swarm_cluster.cut_nodes:
                swarm_cluster.restore(node)
        kiln(home, "down")
        if agent.poll() is None:
            agent.terminate()
            agent.wait(timeout=30)


def test_an_unreachable_manager_fails_the_plan_and_changes_nothing(
    home: Path, tmp_path: Path, swarm_cluster: SwarmCluster
) -> None:
    listen = free_port()
    project = swarm_project(tmp_path / "p", listen, swarm_cluster)
    toml = project / "kiln.toml"
    toml.write_text(
        toml.read_text().replace(swarm_cluster.manager.host, f"unix://{tmp_path}/gone.sock")
    )
    up = kiln(home, "up", str(project))
    assert up.returncode != 0
    assert "unreachable" in up.stderr, up.stderr
    assert up.stderr.strip().splitlines()[-1].startswith("error: swarm runtime: the swarm manager")
    with pytest.raises(OSError):
        fetch(listen)


BLUE_GREEN = 'update = { strategy = "blue-green", blue_hold = "2s", min_healthy_time = "0.5s" }'
CANARY = (
    'update = {{ strategy = "canary", steps = [{{ weight = 20, pause = "{pause}" }}], '
    "analysis = {{ max_error_rate = 0.05, min_requests = 20 }}, "
    'min_healthy_time = "0.5s", progress_deadline = "30s" }}'
)
APP = "/cgi-bin/app"
GOOD_APP = 'echo -e "Content-Type: text/plain\\r\\n\\r\\n{version}"'
FLAKY_APP = (
    'case $((RANDOM % 4)) in 0) echo -e "Status: 500 Boom\\r\\n\\r\\nboom";; '
    "*) " + GOOD_APP + ";; esac"
)
"""The bad canary answers 500 to a quarter of requests (busybox sh and httpd's CGI)."""


def write_app(project: Path, version: str, body: str = GOOD_APP) -> None:
    cgi = project / "rootfs" / "www" / "cgi-bin"
    cgi.mkdir(mode=0o755, exist_ok=True)
    (cgi / "app").write_text("#!/bin/sh\n" + body.format(version=version) + "\n")
    (cgi / "app").chmod(0o755)


def canary_through_two_edges(
    home: Path, project: Path, listen: int, edges: list[str]
) -> tuple[subprocess.CompletedProcess[str], list[LoadGenerator], float]:
    """``kiln apply`` of a canary while load reaches the service only through the edges
    of two nodes (none through the agent's own proxy): its analysis sees those requests
    only if the edges report them."""
    with (
        LoadGenerator(edges[0], listen, path=APP, workers=2) as first,
        LoadGenerator(edges[1], listen, path=APP, workers=2) as second,
    ):
        time.sleep(0.5)
        began = time.monotonic()
        applied = kiln(home, "apply", "--file", str(project), "--yes")
        seconds = time.monotonic() - began
        time.sleep(0.3)
    return applied, [first, second], seconds


def test_blue_green_canary_burn_and_chaos_on_a_swarm(
    home: Path, tmp_path: Path, swarm_cluster: SwarmCluster
) -> None:
    """Issue 12 on swarm: a blue/green switch through the edges with no failed request;
    a canary answering 500 to a quarter of requests, with load only through the edges of
    two nodes, aborted by analysis of the counters the edges report, then a good canary
    promoted; ``kiln burn --keep-evidence`` (Swarm cannot pause a task: logs kept, the
    event says so); ``kiln chaos kill`` recovering."""
    listen = free_port()
    project = swarm_project(tmp_path / "p", listen, swarm_cluster)
    write_app(project, "v1")
    toml = project / "kiln.toml"
    blue_green = (
        toml.read_text()
        .replace("replicas = 3", "replicas = 2")
        .replace(
            'update = { min_healthy_time = "0.5s" }',
            f'quarantine = "5s"\nheal = {{ meltdown_fraction = 5.0 }}\n{BLUE_GREEN}',
        )
    )
    toml.write_text(blue_green)
    agent = start_agent(home, project, f"{swarm_cluster.gateway}:{free_port()}")
    edge = swarm_cluster.nodes[1].address
    try:
        up = kiln(home, "up", str(project))
        assert up.returncode == 0, up.stderr
        started = time.monotonic()
        wait_for(lambda: edge_serves(edge, listen, "v1"), timeout=240)
        print(f"swarm: the edge of node 2 serves after {time.monotonic() - started:.1f}s")

        events = apply_v2_under_load(home, project, listen, edge, "blue/green")
        assert "bluegreen.switched" in events, events
        assert edge_serves(edge, listen, "v2") and fetch(listen) == "v2"
        assert len(ready(home)) == 2

        # A bad canary, judged from what the edges of nodes 2 and 3 counted.
        edges = [swarm_cluster.nodes[1].address, swarm_cluster.nodes[2].address]
        toml.write_text(blue_green.replace(BLUE_GREEN, CANARY.format(pause="20s")))
        write_app(project, "v3", FLAKY_APP)
        applied, loads, seconds = canary_through_two_edges(home, project, listen, edges)
        assert applied.returncode != 0, applied.stdout
        events = [json.loads(line) for line in kiln(home, "events", "--json").stdout.splitlines()]
        [aborted] = [e for e in events if e["kind"] == "canary.aborted"]
        numbers, reason = aborted["data"]["analysis"], aborted["data"]["reason"]
        assert "max_error_rate" in reason or "× stable" in reason, reason
        assert numbers["canary"]["requests"] >= 20 and numbers["canary"]["error_rate"] > 0.02
        assert numbers["edges"]["reporting"] >= 2, numbers
        failed = sum(load.report.failed for load in loads)
        sent = sum(load.report.sent for load in loads)
        bound = 0.20 * (sent / seconds) * 20.0
        print(
            f"swarm bad canary through two edges: {failed} failed requests before the abort "
            f"(the canary answered {numbers['canary']['requests']}, edges {numbers['edges']}); "
            f"bound weight × rate × pause = {bound:.0f}; aborted {seconds:.1f}s after apply; "
            + "; ".join(load.report.summary() for load in loads)
        )
        assert 0 < failed < bound
        wait_for(lambda: status(home).get("rollout") is None and len(ready(home)) == 2, 60)

        # A good canary: promoted on the same counters, no request failed.
        toml.write_text(blue_green.replace(BLUE_GREEN, CANARY.format(pause="3s")))
        write_app(project, "v4")
        applied, loads, seconds = canary_through_two_edges(home, project, listen, edges)
        assert applied.returncode == 0, applied.stderr
        assert "canary.promoted" in applied.stderr, applied.stderr
        for load in loads:
            print(f"swarm good canary, promoted in {seconds:.1f}s: {load.report.summary()}")
            assert load.report.sent > 50 and load.report.failed == 0, load.report.errors
        toml.write_text(blue_green)

        victim = ready(home)[0]
        burn = kiln(home, "burn", victim["id"], "--keep-evidence")
        assert burn.returncode == 0, burn.stderr
        events = [json.loads(line) for line in kiln(home, "events", "--json").stdout.splitlines()]
        taken = [
            e
            for e in events
            if e["kind"] == "instance.quarantined" and e["instance"] == victim["id"]
        ]
        assert taken and taken[0]["data"]["frozen"] is False, taken
        assert "Swarm has no pause" in taken[0]["data"]["not_frozen"], taken
        bundle = tmp_path / "evidence.tar.gz"
        assert kiln(home, "evidence", victim["id"], "-o", str(bundle)).returncode == 0
        with tarfile.open(bundle) as tar:
            logs = tar.extractfile("logs.jsonl")
            manifest = tar.extractfile("manifest.json")
            assert logs is not None and manifest is not None
            assert "started v2" in logs.read().decode()
            assert "cannot read a task's files" in json.loads(manifest.read())["error"]

        def whole(gone: str) -> bool:
            now = status(home)
            live = [i for i in now["instances"] if i["state"] == "ready"]
            return (
                now.get("rollout") is None
                and len(live) == len(now["instances"]) == 2
                and gone not in {i["id"] for i in live}
            )

        wait_for(lambda: whole(victim["id"]), timeout=60)

        chaos = kiln(home, "chaos", "kill", "--service", "web", "--json", "--timeout", "60s")
        assert chaos.returncode == 0, chaos.stdout + chaos.stderr
        report = json.loads(chaos.stdout)
        assert report["runtime"] == "swarm" and report["held"] is True, report
        fault = report["faults"][0]
        assert fault["recovered"] and fault["replaced"], fault
        print(
            f"swarm chaos kill: recovered in {fault['recovery_seconds']:.2f}s, "
            f"{report['requests']['failed']} of {report['requests']['sent']} requests failed"
        )

        down = kiln(home, "down")
        assert down.returncode == 0, down.stderr
        assert agent.wait(timeout=30) == 0
    finally:
        kiln(home, "down")
        if agent.poll() is None:
            agent.terminate()
            agent.wait(timeout=30)


def test_a_service_updated_in_place_behind_kilns_back_is_drift_and_replaced(
    home: Path, tmp_path: Path, swarm_cluster: SwarmCluster
) -> None:
    """Issue 12 item 3 on swarm: ``docker service update`` on an instance's service (here
    a label, which starts no new task, so only the drift check can see it) is config
    drift, and the instance is replaced."""
    listen = free_port()
    project = swarm_project(tmp_path / "p", listen, swarm_cluster)
    toml = project / "kiln.toml"
    toml.write_text(toml.read_text().replace("replicas = 3", 'replicas = 1\ndrift_interval = "1s"'))
    agent = start_agent(home, project, f"{swarm_cluster.gateway}:{free_port()}")
    api = swarm_cluster.manager.api()
    try:
        up = kiln(home, "up", str(project))
        assert up.returncode == 0, up.stderr
        [victim] = ready(home)
        service = api.inspect_service(f"kiln-{home_tag(home)}-{victim['id']}")
        labels = {**service["Spec"]["Labels"], "edited.by": "hand"}
        api.update_service(
            service["ID"], version=service["Version"]["Index"], labels=labels,
            fetch_current_spec=True,
        )  # fmt: skip
        edited = time.monotonic()

        def replaced() -> bool:
            now = ready(home)
            return len(now) == 1 and now[0]["id"] != victim["id"]

        wait_for(replaced, timeout=60)
        print(f"swarm: service updated in place, replaced in {time.monotonic() - edited:.1f}s")
        events = [json.loads(line) for line in kiln(home, "events", "--json").stdout.splitlines()]
        [drift] = [e for e in events if e["kind"] == "instance.drift"]
        assert drift["instance"] == victim["id"] and drift["data"]["what"] == "config"
        assert "updated in place" in drift["data"]["detail"]
    finally:
        api.close()
        kiln(home, "down")
        if agent.poll() is None:
            agent.terminate()
            agent.wait(timeout=30)
