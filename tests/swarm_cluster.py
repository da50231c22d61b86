"""A real three-node Docker Swarm on this machine, and a registry its nodes pull from.

Each node is a Docker Engine of its own (data-root, exec-root, socket, containerd)
in a network namespace of its own, started with ``nsenter --net=…`` (``ip netns
exec`` remounts /sys and hides the cgroups). The namespaces hang off one bridge
in the root namespace, where the test (and Kiln's agent) runs, so every node's
address is reachable from here and from every other node. Node 1 is the manager.

The registry (Debian's ``docker-registry``) listens on the bridge with TLS from a
CA made here; the engines trust it through ``/etc/docker/certs.d/HOST:PORT/ca.crt``
(removed again at the end).

A node is "lost" by cutting its link (:meth:`SwarmCluster.cut`), which a test can
undo (:meth:`SwarmCluster.restore`) to see what a node that comes back does.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from dockerd import DockerdUnavailable, dockerd_command
from tls_certs import make_ca, make_server_cert

__all__ = ["SwarmCluster", "SwarmNode", "start_cluster", "swarm_cluster"]

REGISTRY_BIN = Path("/usr/bin/docker-registry")
CERTS_D = Path("/etc/docker/certs.d")
START_TIMEOUT = 40.0


def _run(argv: list[str]) -> str:
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


@dataclass
class SwarmNode:
    index: int
    netns: str
    veth: str
    address: str
    base: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> Path:
        return self.base / "docker.sock"

    @property
    def host(self) -> str:
        return f"unix://{self.socket}"

    def api(self, timeout: float = 30.0) -> Any:
        import docker

        return docker.APIClient(base_url=self.host, version="auto", timeout=timeout)

    def docker(self, *argv: str) -> str:
        return _run(["docker", "-H", self.host, *argv])


@dataclass
class SwarmCluster:
    bridge: str
    gateway: str
    nodes: list[SwarmNode]
    registry: str
    registry_ca: Path
    base: Path
    registry_process: subprocess.Popen[bytes] | None = None
    cut_nodes: set[int] = field(default_factory=set)

    @property
    def manager(self) -> SwarmNode:
        return self.nodes[0]

    def node_ids(self) -> dict[str, str]:
        """Swarm node id -> address, as the manager sees it."""
        api = self.manager.api()
        try:
            return {n["ID"]: n["Status"]["Addr"] for n in api.nodes()}
        finally:
            api.close()

    def node_states(self) -> dict[str, str]:
        """Node address -> ``ready`` or ``down``, as the manager sees it."""
        api = self.manager.api()
        try:
            return {n["Status"]["Addr"]: n["Status"]["State"] for n in api.nodes()}
        finally:
            api.close()

    def cut(self, node: SwarmNode) -> None:
        """The node's link goes down: nothing reaches it and it reaches nothing."""
        _run(["ip", "link", "set", node.veth, "down"])
        self.cut_nodes.add(node.index)

    def restore(self, node: SwarmNode) -> None:
        _run(["ip", "link", "set", node.veth, "up"])
        self.cut_nodes.discard(node.index)

    def wait_node_state(self, node: SwarmNode, state: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.node_states().get(node.address) == state:
                return
            time.sleep(0.5)
        raise AssertionError(f"node {node.address} not {state} after {timeout}s")

    def containers(self, node: SwarmNode, label: str) -> list[dict[str, Any]]:
        api = node.api()
        try:
            found: list[dict[str, Any]] = api.containers(all=True, filters={"label": label})
            return found
        finally:
            api.close()

    def clear(self) -> None:
        """Remove every service, secret and non-default network (between tests)."""
        api = self.manager.api()
        try:
            for service in api.services():
                with contextlib.suppress(Exception):
                    api.remove_service(service["ID"])
            for secret in api.secrets():
                with contextlib.suppress(Exception):
                    api.remove_secret(secret["ID"])
            deadline = time.monotonic() + 30
            for network in api.networks(filters={"driver": "overlay"}):
                if network["Name"] == "ingress":
                    continue
                while time.monotonic() < deadline:
                    try:
                        api.remove_network(network["Id"])
                        break
                    except Exception:
                        time.sleep(0.5)
        finally:
            api.close()

    def stop(self) -> None:
        for index in list(self.cut_nodes):
            with contextlib.suppress(Exception):
                self.restore(self.nodes[index - 1])
        with contextlib.suppress(Exception):
            self.clear()
        for node in reversed(self.nodes):
            _stop_engine(node)
        if self.registry_process is not None and self.registry_process.poll() is None:
            self.registry_process.terminate()
            try:
                self.registry_process.wait(10)
            except subprocess.TimeoutExpired:
                self.registry_process.kill()
                self.registry_process.wait()
        shutil.rmtree(CERTS_D / self.registry, ignore_errors=True)
        for node in self.nodes:
            subprocess.run(["ip", "netns", "delete", node.netns], capture_output=True)
            subprocess.run(["ip", "link", "delete", node.veth], capture_output=True)
        subprocess.run(["ip", "link", "delete", self.bridge], capture_output=True)
        shutil.rmtree(self.base, ignore_errors=True)


def _stop_engine(node: SwarmNode) -> None:
    process = node.process
    if process is not None and process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
    # Containers of a killed engine outlive it under their shims: end them too.
    for pid in _pids_in_netns(node.netns):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    subprocess.run(["umount", "-R", str(node.base / "exec")], capture_output=True)
    for mount in sorted(_mounts_under(node.base), reverse=True):
        subprocess.run(["umount", "-l", mount], capture_output=True)


def _pids_in_netns(netns: str) -> list[int]:
    done = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True)
    return [int(p) for p in done.stdout.split() if p.isdigit()]


def _mounts_under(base: Path) -> list[str]:
    prefix = str(base) + "/"
    with open("/proc/self/mounts") as f:
        return [line.split()[1] for line in f if line.split()[1].startswith(prefix)]


def _wait_socket(sock: Path, process: subprocess.Popen[bytes], log: Path) -> None:
    import docker

    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline and process.poll() is None:
        if sock.exists():
            with contextlib.suppress(Exception):
                client = docker.APIClient(base_url=f"unix://{sock}", version="auto", timeout=5)
                with contextlib.closing(client):
                    if client.ping():
                        return
        time.sleep(0.1)
    raise DockerdUnavailable(f"dockerd did not start: {log.read_text(errors='replace')[-800:]}")


def _start_registry(cluster: SwarmCluster, port: int) -> None:
    root = cluster.base / "registry"
    root.mkdir()
    ca_file, ca_key, ca_cert = make_ca(root, "kiln-swarm-ca")
    cert, key = make_server_cert(root, ca_key, ca_cert, ips=[cluster.gateway])
    shutil.copy(ca_file, cluster.registry_ca)
    trust = CERTS_D / cluster.registry
    trust.mkdir(parents=True, exist_ok=True)
    shutil.copy(ca_file, trust / "ca.crt")
    config = {
        "version": 0.1,
        "log": {"level": "warn"},
        "storage": {"filesystem": {"rootdirectory": str(root / "data")}},
        "http": {
            "addr": f"{cluster.gateway}:{port}",
            "secret": secrets.token_hex(8),
            "tls": {"certificate": str(cert), "key": str(key)},
        },
    }
    (root / "config.yml").write_text(json.dumps(config))
    with open(root / "registry.log", "wb") as log:
        cluster.registry_process = subprocess.Popen(
            [str(REGISTRY_BIN), "serve", str(root / "config.yml")],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "OTEL_TRACES_EXPORTER": "none"},
        )
    context = ssl.create_default_context(cafile=str(ca_file))
    deadline = time.monotonic() + 20
    while True:
        try:
            with (
                socket.create_connection((cluster.gateway, port), timeout=1) as raw,
                context.wrap_socket(raw, server_hostname=cluster.gateway),
            ):
                return
        except OSError:
            if cluster.registry_process.poll() is not None or time.monotonic() > deadline:
                text = (root / "registry.log").read_text(errors="replace")
                raise RuntimeError(f"registry did not start: {text}") from None
            time.sleep(0.1)


def _free_subnet() -> int:
    """A 192.168.X.0/24 no interface of this machine has an address in (a cluster still
    up, a bench's, another test's), so the registry's address is this cluster's alone."""
    used = subprocess.run(["ip", "-o", "-4", "addr"], capture_output=True, text=True).stdout
    # Two pytest-xdist workers may each start a cluster at the same moment: each draws
    # from its own half of the range, so the look and the take cannot race.
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    span = range(200, 225) if worker == "gw0" else range(225, 250) if worker else range(200, 250)
    free = [x for x in span if f" 192.168.{x}." not in used]
    if not free:
        raise DockerdUnavailable(
            f"no free 192.168.{span.start}-{span.stop - 1}.0/24 subnet for a test swarm"
        )
    return free[secrets.randbelow(len(free))]


def start_cluster(size: int = 3) -> SwarmCluster:
    """Bridge, namespaces, engines, the swarm (node 1 manager, the rest workers), and
    the registry; everything undone by :meth:`SwarmCluster.stop`."""
    if shutil.which("dockerd") is None or not REGISTRY_BIN.exists():
        raise DockerdUnavailable("dockerd and docker-registry are needed (Debian: docker.io)")
    if os.geteuid() != 0:
        raise DockerdUnavailable("a swarm of engines needs root")
    tag = secrets.token_hex(3)
    subnet = _free_subnet()
    gateway = f"192.168.{subnet}.1"
    base = Path(tempfile.mkdtemp(prefix="ksw-", dir="/tmp"))
    registry_port = 5443
    cluster = SwarmCluster(
        bridge=f"ksw{tag}",
        gateway=gateway,
        nodes=[],
        registry=f"{gateway}:{registry_port}",
        registry_ca=base / "registry-ca.crt",
        base=base,
    )
    try:
        _run(["ip", "link", "add", cluster.bridge, "type", "bridge"])
        _run(["ip", "addr", "add", f"{gateway}/24", "dev", cluster.bridge])
        _run(["ip", "link", "set", cluster.bridge, "up"])
        for index in range(1, size + 1):
            node = SwarmNode(
                index=index,
                netns=f"ksw{tag}n{index}",
                veth=f"ksw{tag}v{index}",
                address=f"192.168.{subnet}.{10 + index}",
                base=base / f"n{index}",
            )
            node.base.mkdir()
            cluster.nodes.append(node)
            _run(["ip", "netns", "add", node.netns])
            _run(
                [
                    "ip",
                    "link",
                    "add",
                    node.veth,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    "eth0",
                    "netns",
                    node.netns,
                ]
            )
            _run(["ip", "link", "set", node.veth, "master", cluster.bridge, "up"])
            ns = ["ip", "-n", node.netns]
            _run([*ns, "addr", "add", f"{node.address}/24", "dev", "eth0"])
            _run([*ns, "link", "set", "eth0", "up"])
            _run([*ns, "link", "set", "lo", "up"])
            _run([*ns, "route", "add", "default", "via", gateway])
        _start_registry(cluster, registry_port)
        for node in cluster.nodes:
            command = dockerd_command(
                node.base / "data",
                node.base / "exec",
                node.base / "dockerd.pid",
                node.socket,
                iptables=True,
            )
            log = node.base / "dockerd.log"
            with open(log, "wb") as out:
                node.process = subprocess.Popen(
                    ["nsenter", f"--net=/run/netns/{node.netns}", *command],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
        for node in cluster.nodes:
            assert node.process is not None
            _wait_socket(node.socket, node.process, node.base / "dockerd.log")
        manager = cluster.manager
        manager.docker(
            "swarm",
            "init",
            "--advertise-addr",
            manager.address,
            "--listen-addr",
            f"{manager.address}:2377",
            "--dispatcher-heartbeat",
            "2s",
        )
        token = manager.docker("swarm", "join-token", "-q", "worker").strip()
        for node in cluster.nodes[1:]:
            node.docker(
                "swarm",
                "join",
                "--token",
                token,
                "--advertise-addr",
                node.address,
                "--listen-addr",
                f"{node.address}:2377",
                f"{manager.address}:2377",
            )
        deadline = time.monotonic() + START_TIMEOUT
        while set(cluster.node_states().values()) != {"ready"} or len(cluster.node_states()) != len(
            cluster.nodes
        ):
            if time.monotonic() > deadline:
                raise DockerdUnavailable(f"swarm not ready: {cluster.node_states()}")
            time.sleep(0.3)
    except BaseException:
        cluster.stop()
        raise
    return cluster


_shared: SwarmCluster | None = None
_unavailable: str | None = None


@pytest.fixture(scope="session")
def swarm_cluster() -> Iterator[SwarmCluster]:
    """One three-node swarm for the whole session, started by the first test that asks:
    each module imports this fixture, which pytest would otherwise start once per module."""
    global _shared, _unavailable
    if _shared is not None:
        yield _shared
        return
    if _unavailable is not None:
        pytest.skip(_unavailable)
    try:
        cluster = start_cluster()
    except DockerdUnavailable as e:
        _unavailable = str(e)
        pytest.skip(_unavailable)
    _shared = cluster
    try:
        yield cluster
    finally:
        _shared = None
        cluster.stop()
