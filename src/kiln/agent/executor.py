"""What an instance is made of: the launch command from the image config and the InstanceSpec.

The pure parts (launch command from the image config, the InstanceSpec) are
plain functions so tests can assert them; the blocking parts run in the
agent's thread pool.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from kiln.errors import KilnError
from kiln.runtime import InstanceSpec, VolumeMount

__all__ = [
    "ImageConfigs",
    "ImageLaunch",
    "build_instance_spec",
    "image_launch",
]


_PORT_VARIABLE = re.compile(r"\$\{PORT\}|\$PORT(?![A-Za-z0-9_])")


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
    launch: ImageLaunch,
    service_env: dict[str, str],
    port: int,
    writable: list[str],
    volumes: list[dict[str, Any]],
    memory: int | None,
    cpu: float | None,
    stop_grace: float,
    pids: int = 1024,
    cap_add: tuple[str, ...] = (),
    seccomp: bool = True,
    outbound: bool = False,
    secrets: dict[str, bytes] | None = None,
    project: str | None = None,
) -> InstanceSpec:
    """Image env, then service env, then PORT: the service wins over the image, Kiln over both.

    ``$PORT`` and ``${PORT}`` in the command's arguments become the port, as Nomad
    interpolates its variables in args: ``["redis-server", "--port", "${PORT}"]`` works
    without a shell (with one, the shell would have expanded it the same way)."""
    env = {**launch.env, **service_env, "PORT": str(port)}
    mounts = tuple(
        VolumeMount(
            name=str(v["name"]),
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
        command=[_PORT_VARIABLE.sub(str(port), arg) for arg in launch.command],
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
        project=project,
    )


class ImageConfigs:
    """Image configs from the home's store; the runtime delivers the image itself."""

    def __init__(self, home: Path) -> None:
        self.home = home

    def image_config(self, digest: str) -> dict[str, Any]:
        from kiln.image.store import ImageStore

        return ImageStore(self.home / "images").config(digest)
