"""Attacks through ``[runtime] nodes`` on a real three-node swarm: an entry that points a
node at another node's engine, and a task whose container id leads to a container that
is not the instance's (another home's, or one with this home's labels copied but not
Swarm's). Kiln refuses before it execs, pauses or reads anything, and the container it
was led to is left as it was.
"""

# ruff: noqa: F811 - the swarm_cluster fixture is imported by name and used as a parameter
from __future__ import annotations

import contextlib
import http.server
import json
import os
import socketserver
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
from sandboxes import image_spec_factory
from test_swarm_nodes import open_swarm

from dockerd import image_from_trees
from kiln.errors import KilnError
from kiln.image.store import ImageStore
from kiln.observe.chaos import SwarmInjector
from kiln.runtime import InstanceHandle, RuntimeFailure, swarm_nodes
from kiln.runtime.docker import LABEL_HOME, LABEL_INSTANCE
from kiln.runtime.swarm import SwarmRuntime
from swarm_cluster import SwarmCluster, SwarmNode, swarm_cluster  # noqa: F401

pytestmark = [
    pytest.mark.docker,
    pytest.mark.skipif(os.geteuid() != 0, reason="a swarm of engines needs root"),
]

PORT = 8080


@pytest.fixture(scope="module")
def victim(
    tmp_path_factory: pytest.TempPathFactory, image_tree: Path, swarm_cluster: SwarmCluster
) -> Iterator[tuple[SwarmRuntime, InstanceHandle, SwarmNode]]:
    """One instance of a home whose ``nodes`` lists every node correctly."""
    home = tmp_path_factory.mktemp("swarm-attack-nodes") / "home"
    home.mkdir(mode=0o700)
    digest = image_from_trees(ImageStore(home / "images"), [image_tree])
    runtime = open_swarm(home, swarm_cluster, {n.address: n.host for n in swarm_cluster.nodes})
    make = image_spec_factory(digest, "web", 1, PORT)
    handle = runtime.start(make(["sh", "-c", f"exec httpd -f -p {PORT} -h /"]))
    try:
        node = next(n for n in swarm_cluster.nodes if n.address == handle.host)
        yield runtime, handle, node
    finally:
        runtime.destroy(handle)
        runtime.shutdown()
        runtime.close()


def paused_on(node: SwarmNode, container_id: str) -> bool:
    api = node.api()
    try:
        return bool(api.inspect_container(container_id)["State"]["Paused"])
    finally:
        api.close()


def task_of(runtime: SwarmRuntime, handle: InstanceHandle) -> dict[str, Any]:
    tasks = runtime.api.tasks(filters={"service": handle.data["service_id"]})
    found: dict[str, Any] = next(t for t in tasks if t["ID"] == handle.data["task_id"])
    return found


def test_a_node_entry_pointing_at_another_nodes_engine_is_refused(
    victim: tuple[SwarmRuntime, InstanceHandle, SwarmNode], swarm_cluster: SwarmCluster
) -> None:
    """``nodes`` maps the task's node to the engine of another node (a typo, or an entry
    someone changed): that engine says it is another swarm node, so nothing is done
    there, not even a lookup of the container id the manager gave."""
    runtime, handle, node = victim
    other = next(n for n in swarm_cluster.nodes if n is not node)
    hostile = {n.address: (other.host if n is node else n.host) for n in swarm_cluster.nodes}
    lied_to = open_swarm(runtime.home, swarm_cluster, hostile)
    try:
        for act in (
            lambda: lied_to.exec(handle, ["true"], 5),
            lambda: lied_to.freeze(handle),
            lambda: lied_to.collect_evidence(handle, ["/tmp"], Path("/nonexistent")),
        ):
            with pytest.raises(RuntimeFailure) as refused:
                act()
            message = str(refused.value)
            assert f"gives {other.host} for swarm node" in message, message
            assert "nothing was done" in message and "\n" not in message
    finally:
        lied_to.close()
    injector = SwarmInjector(swarm_cluster.manager.host, runtime.home, hostile)
    with pytest.raises(KilnError, match="nothing was done"):
        injector.pause({"id": handle.instance_id})
    container_id = task_of(runtime, handle)["Status"]["ContainerStatus"]["ContainerID"]
    assert not paused_on(node, container_id)


@pytest.mark.parametrize(
    "forged",
    [
        pytest.param({LABEL_HOME: "another-home", LABEL_INSTANCE: "x"}, id="another-home"),
        pytest.param({}, id="no-labels"),
        pytest.param(None, id="this-homes-labels-copied-without-swarms"),
    ],
)
def test_a_task_container_id_that_leads_to_a_foreign_container_is_refused(
    victim: tuple[SwarmRuntime, InstanceHandle, SwarmNode],
    swarm_cluster: SwarmCluster,
    forged: dict[str, str] | None,
) -> None:
    """The manager (or whoever answers as it) gives, for the instance's task, the id of
    a container on the right node that is not the task's: Kiln's own labels copied onto
    it are not enough, it must carry Swarm's task, service and node ids too."""
    runtime, handle, node = victim
    task = task_of(runtime, handle)
    real_id = task["Status"]["ContainerStatus"]["ContainerID"]
    api = node.api()
    try:
        image = api.inspect_container(real_id)["Image"]
        labels = (
            forged
            if forged is not None
            else {LABEL_HOME: runtime.tag, LABEL_INSTANCE: handle.instance_id}
        )
        foreign = api.create_container(image, ["sleep", "60"], labels=labels)["Id"]
        api.start(foreign)
        try:
            lying_task = {
                **task,
                "Status": {**task["Status"], "ContainerStatus": {"ContainerID": foreign}},
            }
            with pytest.raises(RuntimeFailure) as refused:
                runtime.node_engines.container(handle.instance_id, lying_task, task["ServiceID"])
            assert "is not this home's task of the instance" in str(refused.value)
            assert "nothing was done" in str(refused.value)
            assert not api.inspect_container(foreign)["State"]["Paused"]
            # The real task's container passes the same check.
            found = runtime.node_engines.container(handle.instance_id, task, task["ServiceID"])
            assert found.id == real_id
        finally:
            api.remove_container(foreign, force=True)
    finally:
        api.close()


NODE_ID = "n" * 25


class _HostileEngine(http.server.BaseHTTPRequestHandler):
    """An Engine API on a unix socket that answers as a manager would (its version, a
    node's description) and trickles ``/info`` one space every 0.2 s for 20 s: each
    read comes well within a client's per-read timeout, the answer never ends."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the test reads what Kiln does, not the server's log."""

    def _json(self, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        path = self.path.split("?")[0]
        if path.endswith("/version"):
            self._json({"ApiVersion": "1.41", "MinAPIVersion": "1.12", "Version": "20.10"})
        elif path.endswith(f"/nodes/{NODE_ID}"):
            self._json(
                {"ID": NODE_ID, "Description": {"Hostname": "n1"}, "Status": {"Addr": "10.9.9.9"}}
            )
        elif path.endswith("/info"):
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            with contextlib.suppress(OSError):
                for _ in range(100):
                    self.wfile.write(b"1\r\n \r\n")
                    self.wfile.flush()
                    time.sleep(0.2)
        elif path.endswith("/top"):
            # 8 MiB of an answer, its length not declared.
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            chunk = b" " * 65536
            with contextlib.suppress(OSError):
                for _ in range(128):
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.wfile.write(b"0\r\n\r\n")
        elif path.endswith("/json"):
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(10**10))
            self.end_headers()
        elif path.endswith("/archive"):
            # A tar of a gigabyte, declared whole, sent a byte every 0.2 s.
            self.send_response(200)
            self.send_header("Content-Type", "application/x-tar")
            self.send_header("Content-Length", str(10**9))
            self.end_headers()
            with contextlib.suppress(OSError):
                for _ in range(100):
                    self.wfile.write(b"\0")
                    self.wfile.flush()
                    time.sleep(0.2)
        else:
            self.send_error(404)


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


def test_a_node_engine_that_trickles_its_answers_is_given_up_within_the_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An address in ``nodes`` (or whoever took it over) answers every read at once but
    never ends its answer: the client's per-read timeout never trips, so before the fix
    asking it which node it is took the whole 20 s of trickle (forever, for a patient
    engine), and the drift pass, the exec or the quarantine waiting on it with it; an
    archive of a writable path read the same way is refused past ``archive_timeout``."""
    monkeypatch.setattr(swarm_nodes, "NODE_TIMEOUT", 1.0)
    monkeypatch.setattr(swarm_nodes.NodeEngine, "archive_timeout", 1.5)
    sock = tmp_path / "engine.sock"
    server = _UnixServer(str(sock), _HostileEngine)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    manager = docker.APIClient(base_url=f"unix://{sock}", version="1.41", timeout=5)
    engines = swarm_nodes.NodeEngines(manager, {"n1": f"unix://{sock}"}, "tag")
    try:
        began = time.monotonic()
        with pytest.raises(RuntimeFailure, match=r"did not answer within 1(\.0)?s") as given_up:
            engines.engine("instance web-1", NODE_ID)
        took = time.monotonic() - began
        assert took < 5, f"waited {took:.1f}s for a trickling engine"
        assert "\n" not in str(given_up.value)
        # The same engine's archive of a writable path: refused once its time is up.
        node = swarm_nodes.NodeEngine("tag", "n1", f"unix://{sock}")
        began = time.monotonic()
        kept = node._archive_writable("web-1", "c" * 64, ["/data"], tmp_path)
        took = time.monotonic() - began
        node.close()
        assert kept == {"bytes": 0, "cut": [], "refused": ["/data"]}
        assert took < 5, f"waited {took:.1f}s for a trickling archive"
    finally:
        engines.close()
        manager.close()
        server.shutdown()
        server.server_close()


def test_a_node_engine_answer_too_large_to_hold_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hostile engine answers ``docker top`` with more than the agent will hold (before
    the fix it read all of it, whatever its size, then failed to parse it), or declares
    ten gigabytes for an inspect: each is refused, naming the bound."""
    monkeypatch.setattr(swarm_nodes, "NODE_ANSWER_MAX", 1024**2)
    sock = tmp_path / "engine.sock"
    server = _UnixServer(str(sock), _HostileEngine)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    node = swarm_nodes.NodeEngine("tag", "n1", f"unix://{sock}")
    try:
        for doing, call in (
            ("list its processes", lambda: node.api.top("c" * 64)),
            ("inspect it", lambda: node.api.inspect_container("c" * 64)),
        ):
            with (
                pytest.raises(RuntimeFailure, match=r"larger than 1048576 bytes"),
                node._engine("web-1", doing),
            ):
                call()
    finally:
        node.close()
        server.shutdown()
        server.server_close()
