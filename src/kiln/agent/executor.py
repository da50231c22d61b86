"""What the agent does to the outside world for one instance: layers, port, spec, start, retire.

The pure parts (launch command from the image config, the InstanceSpec) are
plain functions so tests can assert them; the blocking parts run in the
agent's thread pool.
"""

from __future__ import annotations

import socket
import threading
from pathlib import Path
from typing import Any

from kiln.errors import KilnError
from kiln.runtime import InstanceSpec, VolumeMount

__all__ = [
    "ImageLaunch",
    "ImageSnapshots",
    "PortPool",
    "build_instance_spec",
    "image_launch",
]


class ImageLaunch:
    """How an image wants to be run, read once from its OCI config."""

    def __init__(
        self, command: list[str], user: str | None, workdir: str, env: dict[str, str]
    ) -> None:
        self.command = command
        self.user = user
        self.workdir = workdir
        self.env = env

    def __repr__(self) -> str:
        return (
            f"ImageLaunch(command={self.command!r}, user={self.user!r}, workdir={self.workdir!r})"
        )


def image_launch(config: dict[str, Any], where: str) -> ImageLaunch:
    """Entrypoint + Cmd, user, workdir and env from an OCI image config, as Docker reads them."""
    cfg = config.get("config") or {}
    command = list(cfg.get("Entrypoint") or []) + list(cfg.get("Cmd") or [])
    if not command:
        raise KilnError(f"image {where}: no Entrypoint or Cmd in its config, nothing to run")
    env: dict[str, str] = {}
    for item in cfg.get("Env") or []:
        key, sep, value = str(item).partition("=")
        if sep:
            env[key] = value
    user = cfg.get("User") or None
    return ImageLaunch(
        command=[str(c) for c in command],
        user=str(user) if user else None,
        workdir=str(cfg.get("WorkingDir") or "/"),
        env=env,
    )


def build_instance_spec(
    *,
    instance_id: str,
    service: str,
    revision: int,
    image_digest: str,
    layers: tuple[Path, ...],
    launch: ImageLaunch,
    service_env: dict[str, str],
    port: int,
    writable: list[str],
    volumes: list[dict[str, Any]],
    volume_root: Path,
    memory: int | None,
    cpu: float | None,
    stop_grace: float,
    pids: int = 1024,
    cap_add: tuple[str, ...] = (),
    seccomp: bool = True,
    outbound: bool = False,
    secrets: dict[str, bytes] | None = None,
) -> InstanceSpec:
    """Image env, then service env, then PORT: the service wins over the image, Kiln over both."""
    env = {**launch.env, **service_env, "PORT": str(port)}
    mounts = tuple(
        VolumeMount(
            source=volume_root / str(v["name"]),
            target=str(v["path"]),
            readonly=bool(v.get("readonly", False)),
        )
        for v in volumes
    )
    return InstanceSpec(
        instance_id=instance_id,
        service=service,
        revision=revision,
        image_digest=image_digest,
        layers=layers,
        command=list(launch.command),
        user=launch.user,
        workdir=launch.workdir,
        env=env,
        port=port,
        writable=tuple(writable),
        volumes=mounts,
        secrets=dict(secrets or {}),
        memory=memory,
        cpu=cpu,
        pids=pids,
        stop_grace=stop_grace,
        cap_add=cap_add,
        seccomp=seccomp,
        outbound=outbound,
    )


class PortPool:
    """Free loopback ports for ``$PORT``, never handing out one that an instance still holds."""

    def __init__(self) -> None:
        self._held: set[int] = set()
        self._lock = threading.Lock()

    def hold(self, port: int) -> None:
        with self._lock:
            self._held.add(port)

    def release(self, port: int) -> None:
        with self._lock:
            self._held.discard(port)

    def allocate(self) -> int:
        with self._lock:
            for _ in range(100):
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                    s.bind(("127.0.0.1", 0))
                    port = int(s.getsockname()[1])
                if port not in self._held:
                    self._held.add(port)
                    return port
        raise KilnError("no free port on 127.0.0.1 for a new instance")


class ImageSnapshots:
    """The layer snapshots instances run from (:mod:`kiln.image.snapshots`) and image configs.

    A new image costs the unpacking of the layers no earlier image had (an
    app edit: the app layers only); the snapshots' own flocks serialise two
    starts, in this agent or another process, that need the same layer.
    """

    def __init__(self, home: Path) -> None:
        self.home = home
        self._legacy_checked = False

    def layers(self, digest: str) -> tuple[Path, ...]:
        """The image's layer dirs, bottom first, for ``InstanceSpec.layers``."""
        from kiln.image.snapshots import SnapshotStore, remove_legacy_trees
        from kiln.image.store import ImageStore

        if not self._legacy_checked:
            remove_legacy_trees(self.home, ("rootfs",))  # whole unpacked images, before snapshots
            self._legacy_checked = True
        try:
            return SnapshotStore(self.home).layers_for(ImageStore(self.home / "images"), digest)
        except OSError as e:
            raise KilnError(f"cannot unpack the layers of image {digest}: {e}") from e

    def image_config(self, digest: str) -> dict[str, Any]:
        from kiln.image.store import ImageStore

        return ImageStore(self.home / "images").config(digest)
