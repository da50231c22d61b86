"""The Swarm runtime against a real three-node swarm (tests/swarm_cluster.py): images
pushed to a real registry and pulled by the nodes, one-task services with Kiln's
confinement, addresses reachable from here, secrets, logs copied as they come, a
SIGKILL seen within the watcher's period, a lost node, and a manager that is not
there or not a manager.
"""

# ruff: noqa: F811 - the swarm_cluster fixture is imported by name and used as a parameter
from __future__ import annotations

import os
import select
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sandboxes import image_spec_factory

from dockerd import image_from_trees
from kiln.image.registry import RegistryOptions
from kiln.image.store import ImageStore
from kiln.observe.logs import LogStore
from kiln.runtime import Execer, InstanceSpec, InstanceStatus, RuntimeFailure, swarm
from kiln.runtime.docker import LABEL_HOME, LABEL_INSTANCE
from kiln.runtime.swarm import SwarmRuntime
from swarm_cluster import SwarmCluster, swarm_cluster  # noqa: F401

pytestmark = [
    pytest.mark.docker,
    pytest.mark.skipif(os.geteuid() != 0, reason="a swarm of engines needs root"),
]

PORT = 8080
SECRET = b"swarm-secret-" + os.urandom(6).hex().encode()
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))
Spec = Callable[..., InstanceSpec]


def get(url: str, timeout: float = 3.0) -> bytes:
    with _DIRECT.open(url, timeout=timeout) as response:
        body: bytes = response.read()
        return body


def until(check: Callable[[], bool], timeout: float, what: str) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if check():
            return time.monotonic() - start
        time.sleep(0.2)
    raise AssertionError(f"{what}: not within {timeout}s")


@pytest.fixture(scope="module")
def swarm_home(
    tmp_path_factory: pytest.TempPathFactory, image_tree: Path, swarm_cluster: SwarmCluster
) -> Iterator[tuple[Path, str]]:
    home = tmp_path_factory.mktemp("swarm-runtime") / "home"
    home.mkdir(mode=0o700)
    yield home, image_from_trees(ImageStore(home / "images"), [image_tree])
    runtime = open_swarm(home, swarm_cluster)
    for handle in runtime.list():
        runtime.destroy(handle)
    runtime.shutdown()
    runtime.close()


def open_swarm(home: Path, cluster: SwarmCluster) -> SwarmRuntime:
    return SwarmRuntime(
        home,
        cluster.manager.host,
        f"{cluster.registry}/kiln",
        RegistryOptions(ca_file=cluster.registry_ca),
    )


@pytest.fixture
def runtime(swarm_home: tuple[Path, str], swarm_cluster: SwarmCluster) -> Iterator[SwarmRuntime]:
    runtime = open_swarm(swarm_home[0], swarm_cluster)
    yield runtime
    for handle in runtime.list():
        runtime.destroy(handle)
    for instance_id in runtime.leftovers():
        runtime.release(instance_id)
    runtime.close()


@pytest.fixture
def make_spec(swarm_home: tuple[Path, str]) -> Spec:
    return image_spec_factory(swarm_home[1], "web", 1, PORT)


def serving(spec: Spec, **overrides: Any) -> InstanceSpec:
    script = f"echo started $HOSTNAME; exec httpd -f -p {PORT} -h /"
    return spec(["sh", "-c", script], **overrides)


def container_of(cluster: SwarmCluster, instance_id: str) -> tuple[Any, dict[str, Any]]:
    """The node engine's API and the container of an instance, wherever Swarm put it."""
    for node in cluster.nodes:
        if node.index in cluster.cut_nodes:
            continue
        found = cluster.containers(node, f"{LABEL_INSTANCE}={instance_id}")
        if found:
            return node, found[0]
    raise AssertionError(f"no container of {instance_id} on any node")


def test_instance_runs_on_a_node_with_its_confinement_secret_and_logs(
    runtime: SwarmRuntime, make_spec: Spec, swarm_cluster: SwarmCluster
) -> None:
    spec = serving(make_spec, secrets={"token": SECRET}, memory=64 << 20, cpu=0.5, pids=64)
    handle = runtime.start(spec)
    assert handle.host in {n.address for n in swarm_cluster.nodes}
    assert runtime.inspect(handle).status is InstanceStatus.RUNNING
    assert [h.instance_id for h in runtime.list()] == [spec.instance_id]
    until(lambda: _answers(handle.address), 10, "instance answers on its node's address")
    assert get(f"http://{handle.address}/run/secrets/token") == SECRET
    node, container = container_of(swarm_cluster, spec.instance_id)
    api = node.api()
    try:
        attrs = api.inspect_container(container["Id"])
    finally:
        api.close()
    host_config = attrs["HostConfig"]
    assert host_config["ReadonlyRootfs"] is True
    assert host_config["CapDrop"] == ["ALL"] or "ALL" in (host_config["CapDrop"] or [])
    assert host_config["Memory"] == 64 << 20
    assert host_config["NanoCpus"] == 500_000_000
    assert host_config["PidsLimit"] == 64
    assert host_config["Init"] is True
    assert attrs["Config"]["Labels"][LABEL_HOME] == runtime.tag
    # The image came from the registry, by digest: the node pulled it.
    assert attrs["Config"]["Image"].startswith(f"{swarm_cluster.registry}/kiln/web@sha256:")
    logs = LogStore(runtime.home / "logs")
    until(
        lambda: any("started" in r.line for r in logs.read("web", instance=spec.instance_id)),
        15,
        "the start line reaches the home's log store",
    )
    runtime.destroy(handle)
    assert runtime.inspect(handle).status is InstanceStatus.GONE
    api = swarm_cluster.manager.api()
    try:
        assert not [
            s for s in api.secrets() if s["Spec"]["Labels"].get(LABEL_INSTANCE) == spec.instance_id
        ]
    finally:
        api.close()
    assert not isinstance(runtime, Execer) or not runtime.capabilities.exec


def _answers(address: str) -> bool:
    try:
        get(f"http://{address}/bin/busybox", timeout=1)
        return True
    except OSError:
        return False


def test_sigkill_is_seen_within_the_watch_period_and_stop_ends_the_task(
    runtime: SwarmRuntime, make_spec: Spec, swarm_cluster: SwarmCluster
) -> None:
    victim = runtime.start(serving(make_spec))
    other = runtime.start(serving(make_spec))
    fd = runtime.exit_fd(victim)
    assert fd is not None
    try:
        node, container = container_of(swarm_cluster, victim.instance_id)
        node.docker("kill", "-s", "KILL", container["Id"])
        killed = time.monotonic()
        ready, _, _ = select.select([fd], [], [], 10)
        assert ready, "the exit fd did not become readable"
        assert time.monotonic() - killed < 3.0
    finally:
        os.close(fd)
    state = runtime.inspect(victim)
    assert state.status is InstanceStatus.EXITED
    assert state.exit_code == 137
    # Swarm does not restart it: restart condition none; Kiln decides.
    time.sleep(2)
    assert victim.instance_id not in {h.instance_id for h in runtime.list()}
    assert victim.instance_id in runtime.leftovers()
    runtime.release(victim.instance_id)
    assert victim.instance_id not in runtime.leftovers()
    stopped = runtime.stop(other, 2.0)
    assert stopped.status is not InstanceStatus.RUNNING
    assert other.instance_id not in {h.instance_id for h in runtime.list()}


def test_a_suspected_death_is_seen_before_the_period_and_destroy_keeps_the_last_lines(
    runtime: SwarmRuntime,
    make_spec: Spec,
    swarm_cluster: SwarmCluster,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With the watcher's period out of reach, a health check's suspicion (what the agent
    passes on when a ready instance stops answering) has the death seen at once; and
    destroying an ended task neither waits for the service's log stream (Swarm never ends
    it) nor loses what the task wrote last."""
    monkeypatch.setattr(swarm, "WATCH_PERIOD", 60.0)
    victim = runtime.start(serving(make_spec))
    fd = runtime.exit_fd(victim)
    assert fd is not None
    try:
        node, container = container_of(swarm_cluster, victim.instance_id)
        node.docker("kill", "-s", "KILL", container["Id"])
        killed = time.monotonic()
        runtime.suspect_exit(victim)
        ready, _, _ = select.select([fd], [], [], 10)
        assert ready, "the exit fd did not become readable"
        assert time.monotonic() - killed < 3.0
    finally:
        os.close(fd)
    began = time.monotonic()
    runtime.destroy(victim)
    assert time.monotonic() - began < swarm.LOG_DRAIN_TIMEOUT
    assert runtime.inspect(victim).status is InstanceStatus.GONE

    spec = make_spec(["sh", "-c", "echo started; sleep 2; echo last words; exit 3"])
    ending = runtime.start(spec)
    until(lambda: runtime.inspect(ending).status is InstanceStatus.EXITED, 20, "its own exit")
    began = time.monotonic()
    runtime.destroy(ending)
    assert time.monotonic() - began < swarm.LOG_DRAIN_TIMEOUT
    lines = [
        r.line for r in LogStore(runtime.home / "logs").read("web", instance=ending.instance_id)
    ]
    assert any("last words" in line for line in lines), lines

    # Scaled to zero behind Kiln's back: lost at once, not when its node has stopped it
    # (a task on an overlay network waits 2 s for gossip before its grace).
    condemned = runtime.start(serving(make_spec))
    api = swarm_cluster.manager.api()
    try:
        service = api.inspect_service(condemned.data["service_id"])
        zero = {"Replicated": {"Replicas": 0}}
        version = service["Version"]["Index"]
        api.update_service(service["ID"], version=version, mode=zero, fetch_current_spec=True)
    finally:
        api.close()
    lost = until(lambda: runtime.inspect(condemned).status is InstanceStatus.EXITED, 10, "lost")
    assert lost < 1.5
    runtime.destroy(condemned)


def test_a_manager_that_is_not_there_or_not_a_manager_is_one_clear_error(
    tmp_path: Path, swarm_cluster: SwarmCluster
) -> None:
    with pytest.raises(RuntimeFailure, match="is unreachable"):
        SwarmRuntime(tmp_path, f"unix://{tmp_path}/no.sock", "10.0.0.1:5000/kiln")
    with pytest.raises(RuntimeFailure, match="is a swarm worker"):
        SwarmRuntime(tmp_path, swarm_cluster.nodes[1].host, "10.0.0.1:5000/kiln")
    with pytest.raises(RuntimeFailure, match="registry is required"):
        SwarmRuntime(tmp_path, swarm_cluster.manager.host, None)
    with pytest.raises(RuntimeFailure, match="is not HOST"):
        SwarmRuntime(tmp_path, swarm_cluster.manager.host, "bad registry/Upper Case")


def test_an_image_missing_from_the_store_or_a_volume_creates_nothing(
    runtime: SwarmRuntime, make_spec: Spec, swarm_cluster: SwarmCluster
) -> None:
    from kiln.runtime import VolumeMount

    missing = serving(make_spec, image_digest="sha256:" + "ab" * 32)
    with pytest.raises(RuntimeFailure, match="pushing image"):
        runtime.start(missing)
    with pytest.raises(RuntimeFailure, match="no volumes"):
        runtime.start(serving(make_spec, volumes=(VolumeMount("data", "/data"),)))
    # A missing binary fails in the task: at once (start raises), or just after the task
    # was seen running (tini starts first); either way it ends, and Swarm never restarts it.
    try:
        broken = runtime.start(make_spec(["/no/such/binary"]))
    except RuntimeFailure as e:
        assert "did not start" in str(e)
    else:
        until(lambda: runtime.inspect(broken).status is InstanceStatus.EXITED, 15, "a broken task")
        runtime.destroy(broken)
    assert runtime.list() == []
    assert runtime.leftovers() == []


def test_lost_node_then_back_its_instance_is_removed_not_adopted(
    runtime: SwarmRuntime, make_spec: Spec, swarm_cluster: SwarmCluster
) -> None:
    handles = [runtime.start(serving(make_spec)) for _ in range(3)]
    on_worker = [h for h in handles if h.host != swarm_cluster.manager.address]
    if not on_worker:
        pytest.skip("Swarm placed every instance on the manager")
    victim = on_worker[0]
    node = next(n for n in swarm_cluster.nodes if n.address == victim.host)
    swarm_cluster.cut(node)
    try:
        until(
            lambda: runtime.inspect(victim).status is InstanceStatus.EXITED,
            30,
            "the instance on the lost node counts as exited",
        )
        assert victim.instance_id not in {h.instance_id for h in runtime.list()}
        runtime.destroy(victim)
    finally:
        swarm_cluster.restore(node)
    swarm_cluster.wait_node_state(node, "ready")

    def gone_from_node() -> bool:
        running = [
            c
            for c in swarm_cluster.containers(node, f"{LABEL_INSTANCE}={victim.instance_id}")
            if c["State"] == "running"
        ]
        return not running

    until(gone_from_node, 30, "the node that came back removes the old instance")
    assert victim.instance_id not in {h.instance_id for h in runtime.list()}
    for handle in handles:
        if handle is not victim:
            assert runtime.inspect(handle).status is InstanceStatus.RUNNING


def test_cli_docker_sees_only_labelled_services(swarm_cluster: SwarmCluster) -> None:
    """The runtime never lists a service of another home or a foreign one."""
    swarm_cluster.manager.docker(
        "service",
        "create",
        "-d",
        "--name",
        "foreign",
        "--label",
        f"{LABEL_HOME}=other",
        "--restart-condition",
        "none",
        f"{swarm_cluster.registry}/none:latest",
        "true",
    )
    try:
        home = Path(subprocess.check_output(["mktemp", "-d"], text=True).strip())
        runtime = SwarmRuntime(
            home,
            swarm_cluster.manager.host,
            f"{swarm_cluster.registry}/kiln",
        )
        try:
            assert runtime.list() == []
            assert runtime.leftovers() == []
        finally:
            runtime.close()
    finally:
        swarm_cluster.manager.docker("service", "rm", "foreign")
