"""A private Docker Engine for tests, and images for it from a Kiln image store.

The engine has its own data-root, exec-root and socket under ``/tmp/kd-*``;
tests never touch the host's ``/run/docker.sock``. The shared one runs
``--bridge=none --iptables=false`` (it changes nothing on the host's
firewall); :func:`start_dockerd` with ``netns`` starts one with Docker's
firewall rules on, inside a network namespace of its own, so its rules stay
there.

``docker_engine`` is one engine per test session, whichever package asks for
it first: import the fixture into a test module or conftest
(``from dockerd import docker_engine``).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kiln.image.digest import MEDIA_TYPE_CONFIG, MEDIA_TYPE_MANIFEST, canonical_json
from kiln.image.layer import layer_from_dir
from kiln.image.store import ImageStore

__all__ = [
    "Dockerd",
    "DockerdUnavailable",
    "docker_engine",
    "dockerd_command",
    "image_from_trees",
    "start_dockerd",
    "tear_down",
]

START_TIMEOUT = 30.0
EPOCH = 1_700_000_000


class DockerdUnavailable(Exception):
    """No private engine can run here (no dockerd, not root, it did not start)."""


@dataclass
class Dockerd:
    base: Path
    socket: Path
    process: subprocess.Popen[bytes]
    netns: str | None = None

    @property
    def host(self) -> str:
        return f"unix://{self.socket}"

    @property
    def data_root(self) -> Path:
        return self.base / "data"

    def in_netns(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run where the engine's containers are reachable."""
        if self.netns is None:
            return list(argv)
        return ["nsenter", f"--net=/run/netns/{self.netns}", *argv]

    def clear(self) -> None:
        """Remove every container and user-defined network: a network's bridge would
        otherwise outlive the engine on the host."""
        import docker

        with contextlib.closing(docker.APIClient(base_url=self.host, version="auto")) as api:
            for container in api.containers(all=True):
                with contextlib.suppress(docker.errors.APIError):
                    api.remove_container(container["Id"], v=True, force=True)
            for network in api.networks():
                if network["Name"] not in ("bridge", "host", "none"):
                    with contextlib.suppress(docker.errors.APIError):
                        api.remove_network(network["Id"])

    def stop(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(Exception):
                self.clear()
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        subprocess.run(["umount", "-R", str(self.base / "exec")], capture_output=True)
        if self.netns is not None:
            subprocess.run(["ip", "netns", "delete", self.netns], capture_output=True)
        shutil.rmtree(self.base, ignore_errors=True)


def dockerd_command(
    data_root: Path, exec_root: Path, pidfile: Path, sock: Path, *, iptables: bool = False
) -> list[str]:
    firewall = [] if iptables else ["--iptables=false", "--ip6tables=false", "--bridge=none"]
    return [
        "dockerd",
        *firewall,
        "--log-level=warn",
        "--data-root",
        str(data_root),
        "--exec-root",
        str(exec_root),
        "--pidfile",
        str(pidfile),
        "-H",
        f"unix://{sock}",
    ]


def _ping(sock: Path) -> bool:
    import docker

    try:
        client = docker.APIClient(base_url=f"unix://{sock}", version="auto", timeout=5)
    except Exception:
        return False
    with contextlib.closing(client):
        try:
            return bool(client.ping())
        except Exception:
            return False


def start_dockerd(*, netns: bool = False) -> Dockerd:
    """A private engine; ``netns``: with Docker's firewall rules, in its own network
    namespace (reach its containers through :meth:`Dockerd.in_netns`)."""
    if shutil.which("dockerd") is None:
        raise DockerdUnavailable("dockerd is not installed (Debian: docker.io)")
    if os.geteuid() != 0:
        raise DockerdUnavailable("dockerd needs root")
    # exec-root and the socket path must stay short (unix socket path limit).
    base = Path(tempfile.mkdtemp(prefix="kd-", dir="/tmp"))
    sock = base / "docker.sock"
    namespace = None
    prefix: list[str] = []
    if netns:
        namespace = f"kd-{secrets.token_hex(4)}"
        subprocess.run(["ip", "netns", "add", namespace], check=True, capture_output=True)
        subprocess.run(
            ["ip", "-n", namespace, "link", "set", "lo", "up"], check=True, capture_output=True
        )
        # nsenter, not `ip netns exec`: that remounts /sys and hides the cgroups.
        prefix = ["nsenter", f"--net=/run/netns/{namespace}"]
    command = dockerd_command(
        base / "data", base / "exec", base / "dockerd.pid", sock, iptables=netns
    )
    with open(base / "dockerd.log", "wb") as log:
        process = subprocess.Popen(
            [*prefix, *command], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    engine = Dockerd(base, sock, process, namespace)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline and process.poll() is None:
        if sock.exists() and _ping(sock):
            return engine
        time.sleep(0.1)
    tail = (base / "dockerd.log").read_text(errors="replace")[-800:]
    engine.stop()
    raise DockerdUnavailable(f"dockerd did not start within {START_TIMEOUT:.0f}s: {tail}")


_shared: Dockerd | None = None
_unavailable: str | None = None


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[Dockerd]:
    """The session's private engine (``--bridge=none --iptables=false``), started by
    whichever test asks first and stopped when the session ends."""
    global _shared, _unavailable
    if _shared is not None:
        yield _shared
        return
    if _unavailable is not None:
        pytest.skip(_unavailable)
    try:
        engine = start_dockerd()
    except DockerdUnavailable as e:
        _unavailable = str(e)
        pytest.skip(_unavailable)
    _shared = engine
    try:
        yield engine
    finally:
        _shared = None
        engine.stop()


def image_from_trees(
    store: ImageStore,
    trees: Sequence[Path],
    *,
    cmd: Sequence[str] = ("sh",),
    env: Sequence[str] = ("PATH=/bin",),
    user: str | None = None,
    entrypoint: Sequence[str] | None = None,
) -> str:
    """An image in ``store`` with one layer per tree (bottom first), built with Kiln's
    own layer code as a bake would; returns the manifest digest."""
    layers = [layer_from_dir(tree, store, EPOCH) for tree in trees]
    settings: dict[str, Any] = {"Cmd": list(cmd), "Env": list(env)}
    if user is not None:
        settings["User"] = user
    if entrypoint is not None:
        settings["Entrypoint"] = list(entrypoint)
    created = "2023-11-14T22:13:20Z"
    config = {
        "architecture": "amd64",
        "os": "linux",
        "created": created,
        "config": settings,
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
        "history": [{"created": created, "created_by": "kiln test"} for _ in layers],
    }
    config_desc = store.put_bytes(canonical_json(config), MEDIA_TYPE_CONFIG)
    manifest = {
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_MANIFEST,
        "config": config_desc.to_json(),
        "layers": [layer.descriptor.to_json() for layer in layers],
    }
    manifest_desc = store.put_bytes(canonical_json(manifest), MEDIA_TYPE_MANIFEST)
    store.tag("test:" + manifest_desc.digest.removeprefix("sha256:")[:12], manifest_desc)
    return manifest_desc.digest


def tear_down(runtime: Any, *, keep_networks: bool = False) -> None:
    """Stop and remove every instance of a ``DockerRuntime``'s home, then (unless the
    next test of the home will use them) its networks and run directory; close it."""
    for handle in runtime.list():
        runtime.stop(handle, 0.0)
        runtime.destroy(handle)
    for instance_id in runtime.leftovers():
        runtime.release(instance_id)
    if not keep_networks:
        runtime.shutdown()
    runtime.close()
