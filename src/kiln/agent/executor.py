"""What the agent does to the outside world for one instance: rootfs, port, spec, start, retire.

The pure parts (launch command from the image config, the InstanceSpec) are
plain functions so tests can assert them; the blocking parts run in the
agent's thread pool.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
from pathlib import Path
from typing import Any

from kiln.errors import KilnError
from kiln.runtime import InstanceSpec, VolumeMount

__all__ = [
    "ImageLaunch",
    "PortPool",
    "RootfsCache",
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
    rootfs: Path,
    launch: ImageLaunch,
    service_env: dict[str, str],
    port: int,
    writable: list[str],
    volumes: list[dict[str, Any]],
    volume_root: Path,
    memory: int | None,
    cpu: float | None,
    stop_grace: float,
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
        rootfs=rootfs,
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
        stop_grace=stop_grace,
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


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


class RootfsCache:
    """``KILN_HOME/rootfs/<digest>``: unpacked once per image, shared read-only by instances.

    A thread lock per digest serialises unpacks inside the agent; an flock
    guards against another process (a second tool) unpacking the same image.
    """

    def __init__(self, home: Path) -> None:
        self.root = home / "rootfs"
        self.images_root = home / "images"
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def path(self, digest: str) -> Path:
        return self.root / digest.replace(":", "-")

    def ensure(self, digest: str) -> Path:
        final = self.path(digest)
        if final.is_dir():
            return final
        with self._guard:
            lock = self._locks.setdefault(digest, threading.Lock())
        with lock:
            if final.is_dir():
                return final
            self.root.mkdir(parents=True, exist_ok=True)
            with open(self.root / f".{final.name}.lock", "w") as lf:
                fcntl.flock(lf, fcntl.LOCK_EX)
                if final.is_dir():
                    return final
                try:
                    self._unpack(digest, final)
                except OSError as e:
                    raise KilnError(f"cannot unpack image {digest} into {final}: {e}") from e
        return final

    def _unpack(self, digest: str, final: Path) -> None:
        """Seed from the unpacked image sharing the most bottom layers: a new app
        layer over the same Debian base unpacks in a second, not a minute."""
        from kiln.image.store import ImageStore
        from kiln.image.unpack import image_layers, unpack_image

        store = ImageStore(self.images_root)
        layers = image_layers(store, digest)
        seed: Path | None = None
        shared = 0
        for sidecar in self.root.glob("*.layers.json"):
            tree = sidecar.with_name(sidecar.name.removesuffix(".layers.json"))
            try:
                other = json.loads(sidecar.read_text())
            except (OSError, ValueError):
                continue
            common = 0
            for mine, theirs in zip(layers, other, strict=False):
                if mine != theirs:
                    break
                common += 1
            if common > shared and common == len(other) and tree.is_dir():
                seed, shared = tree, common
        unpack_image(store, digest, final, seed=seed, seed_layers=shared)
        _write_json(self.root / f"{final.name}.layers.json", layers)

    def image_config(self, digest: str) -> dict[str, Any]:
        from kiln.image.store import ImageStore

        return ImageStore(self.images_root).config(digest)
