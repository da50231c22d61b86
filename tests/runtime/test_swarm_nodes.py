"""``[runtime] nodes`` on a real three-node swarm (tests/swarm_cluster.py): through the
engine of the node that runs a task, the swarm runtime execs into it, freezes it (its
app stops answering), collects its writable paths as evidence, thaws it, and finds a
file written outside its writable paths as drift; chaos pause and drift act there too.
Without ``nodes``, or for a node it does not list, each of these is one clear refusal.
"""

# ruff: noqa: F811 - the swarm_cluster fixture is imported by name and used as a parameter
from __future__ import annotations

import os
import subprocess
import tarfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sandboxes import image_spec_factory

from dockerd import image_from_trees
from kiln.image.registry import RegistryOptions
from kiln.image.store import ImageStore
from kiln.observe.chaos import DRIFT_PREFIX, SwarmInjector
from kiln.runtime import (
    DriftExpectation,
    Execer,
    InstanceHandle,
    InstanceSpec,
    NotSupported,
    RuntimeFailure,
)
from kiln.runtime.swarm import SwarmRuntime
from swarm_cluster import SwarmCluster, SwarmNode, swarm_cluster  # noqa: F401

pytestmark = [
    pytest.mark.docker,
    pytest.mark.skipif(os.geteuid() != 0, reason="a swarm of engines needs root"),
]

PORT = 8080
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))
Spec = Callable[..., InstanceSpec]


def answers(address: str, timeout: float = 1.0) -> bool:
    try:
        with _DIRECT.open(f"http://{address}/etc/hostname", timeout=timeout) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"{what}: not within {timeout}s")


def every_node(cluster: SwarmCluster) -> dict[str, str]:
    """``[runtime] nodes`` keyed by each node's address (the test nodes share one
    hostname: they are engines of one machine)."""
    return {node.address: node.host for node in cluster.nodes}


def open_swarm(home: Path, cluster: SwarmCluster, nodes: dict[str, str] | None) -> SwarmRuntime:
    return SwarmRuntime(
        home,
        cluster.manager.host,
        f"{cluster.registry}/kiln",
        RegistryOptions(ca_file=cluster.registry_ca),
        nodes=nodes,
    )


@pytest.fixture(scope="module")
def placed(
    tmp_path_factory: pytest.TempPathFactory, image_tree: Path, swarm_cluster: SwarmCluster
) -> Iterator[tuple[SwarmRuntime, InstanceHandle, SwarmNode]]:
    """One serving instance on a worker node (not the manager), which writes a note into
    its writable path ``/data``; started once for the module."""
    home = tmp_path_factory.mktemp("swarm-nodes") / "home"
    home.mkdir(mode=0o700)
    digest = image_from_trees(ImageStore(home / "images"), [image_tree])
    runtime = open_swarm(home, swarm_cluster, every_node(swarm_cluster))
    make = image_spec_factory(digest, "web", 1, PORT)
    script = f"echo note-$HOSTNAME > /data/note; exec httpd -f -p {PORT} -h /"
    handles: list[InstanceHandle] = []
    try:
        for _ in range(3):
            handles.append(runtime.start(make(["sh", "-c", script], writable=("/data",))))
            on_worker = [h for h in handles if h.host != swarm_cluster.manager.address]
            if on_worker:
                break
        if not on_worker:
            pytest.skip("Swarm placed every instance on the manager")
        handle = on_worker[0]
        node = next(n for n in swarm_cluster.nodes if n.address == handle.host)
        until(lambda: answers(handle.address), 15, "the instance answers")
        yield runtime, handle, node
    finally:
        for started in handles:
            runtime.destroy(started)
        runtime.shutdown()
        runtime.close()


def test_exec_runs_inside_a_task_on_a_worker_node(
    placed: tuple[SwarmRuntime, InstanceHandle, SwarmNode],
) -> None:
    runtime, handle, _ = placed
    assert isinstance(runtime, Execer) and runtime.capabilities.exec
    code, output = runtime.exec(handle, ["sh", "-c", "cat /data/note; exit 3"], 10.0)
    assert code == 3
    assert output.startswith("note-"), output
    code, output = runtime.exec(handle, ["cat", "/etc/hostname"], 10.0)
    assert code == 0 and output.strip() == handle.instance_id


def test_freeze_stops_the_task_evidence_holds_its_writes_and_thaw_resumes(
    placed: tuple[SwarmRuntime, InstanceHandle, SwarmNode], tmp_path: Path
) -> None:
    runtime, handle, node = placed
    runtime.freeze(handle)
    try:
        api = node.api()
        try:
            container = api.containers(
                filters={"label": f"dev.kiln.instance={handle.instance_id}"}
            )[0]
            assert api.inspect_container(container["Id"])["State"]["Paused"] is True
        finally:
            api.close()
        assert not answers(handle.address, timeout=1.5), "a frozen task still answers"
        runtime.freeze(handle)  # once frozen, again is nothing
        facts = runtime.collect_evidence(handle, ["/data", "/no/such"], tmp_path)
    finally:
        runtime.thaw(handle)
    with tarfile.open(tmp_path / "writable.tar") as kept:
        note = kept.extractfile("data/note")
        assert note is not None and note.read().startswith(b"note-")
    assert facts["writable"]["refused"] == ["/no/such"]
    assert facts["writable"]["bytes"] > 0
    assert any("httpd" in str(p) for p in facts["processes"]), facts["processes"]
    assert facts["network"]["address"] == handle.address
    assert node.address in facts["network"]["node"]
    until(lambda: answers(handle.address), 10, "the thawed task answers again")


def test_a_file_outside_the_writable_paths_is_drift_inside_is_not(
    placed: tuple[SwarmRuntime, InstanceHandle, SwarmNode], swarm_cluster: SwarmCluster
) -> None:
    runtime, handle, _ = placed
    labels = runtime.api.inspect_service(handle.data["service_id"])["Spec"]["Labels"]
    expected = DriftExpectation(labels["dev.kiln.image"], 1, {"PORT": str(PORT)}, ("/data",))
    code, _ = runtime.exec(handle, ["sh", "-c", "echo x > /data/more; echo y > /tmp/t"], 10)
    assert code == 0
    assert runtime.check_drift(handle, expected) is None
    injector = SwarmInjector(swarm_cluster.manager.host, runtime.home, every_node(swarm_cluster))
    detail, undo = injector.drift({"id": handle.instance_id})
    try:
        found = runtime.check_drift(handle, expected)
        assert found is not None and found.what == "files", found
        paths = [f.path for f in found.files]
        assert len(paths) == 1 and paths[0].startswith("/" + DRIFT_PREFIX), paths
        assert paths[0] in detail
    finally:
        undo()
    assert runtime.check_drift(handle, expected) is None


def test_chaos_pause_freezes_the_task_on_its_node_and_undo_resumes_it(
    placed: tuple[SwarmRuntime, InstanceHandle, SwarmNode], swarm_cluster: SwarmCluster
) -> None:
    runtime, handle, node = placed
    injector = SwarmInjector(swarm_cluster.manager.host, runtime.home, every_node(swarm_cluster))
    detail, undo = injector.pause({"id": handle.instance_id})
    try:
        assert detail.startswith("docker pause ") and node.address in detail, detail
        assert not answers(handle.address, timeout=1.5)
    finally:
        undo()
    until(lambda: answers(handle.address), 10, "the task answers after the pause")


def test_chaos_latency_slows_the_task_in_its_network_namespace_until_undone(
    placed: tuple[SwarmRuntime, InstanceHandle, SwarmNode], swarm_cluster: SwarmCluster
) -> None:
    runtime, handle, node = placed
    api = node.api()
    try:
        [container] = api.containers(filters={"label": f"dev.kiln.instance={handle.instance_id}"})
        key = api.inspect_container(container["Id"])["NetworkSettings"]["SandboxKey"]
    finally:
        api.close()

    def qdiscs() -> str:
        shown = ["nsenter", f"--net={key}", "tc", "qdisc", "show"]
        return subprocess.run(shown, capture_output=True, text=True, check=True).stdout

    injector = SwarmInjector(swarm_cluster.manager.host, runtime.home, every_node(swarm_cluster))
    detail, undo = injector.latency({"id": handle.instance_id}, 0.2)
    try:
        assert "netem" in qdiscs() or "tbf" in qdiscs(), qdiscs()
        assert "eth" in detail, detail
    finally:
        undo()
    assert "netem" not in qdiscs() and "tbf" not in qdiscs()
    assert answers(handle.address)


def test_without_nodes_or_for_a_node_not_listed_each_ability_is_one_clear_refusal(
    placed: tuple[SwarmRuntime, InstanceHandle, SwarmNode], swarm_cluster: SwarmCluster
) -> None:
    runtime, handle, node = placed
    bare = open_swarm(runtime.home, swarm_cluster, None)
    try:
        assert not bare.capabilities.exec
        with pytest.raises(NotSupported, match="cannot exec into a task without"):
            bare.exec(handle, ["true"], 5)
        with pytest.raises(NotSupported, match="Swarm has no pause"):
            bare.freeze(handle)
        with pytest.raises(NotSupported, match="cannot read a task's files"):
            bare.collect_evidence(handle, ["/data"], Path("/nonexistent"))
    finally:
        bare.close()
    others = {n.address: n.host for n in swarm_cluster.nodes if n is not node}
    partial = open_swarm(runtime.home, swarm_cluster, others)
    try:
        assert partial.capabilities.exec
        with pytest.raises(NotSupported) as refused:
            partial.exec(handle, ["true"], 5)
        message = str(refused.value)
        assert "its task runs on swarm node" in message and node.address in message
        assert "[runtime] nodes does not list" in message and "\n" not in message
        with pytest.raises(NotSupported, match="does not list"):
            partial.freeze(handle)
    finally:
        partial.close()
    gone = {**every_node(swarm_cluster), node.address: "unix:///nonexistent/docker.sock"}
    unreachable = open_swarm(runtime.home, swarm_cluster, gone)
    try:
        with pytest.raises(RuntimeFailure) as failed:
            unreachable.freeze(handle)
        message = str(failed.value)
        assert "is unreachable" in message and node.address in message, message
        assert "[runtime] nodes" in message and "\n" not in message
    finally:
        unreachable.close()
    assert answers(handle.address), "a refusal froze the task"
