"""Where a recipe's ``run`` steps execute: runc, as root of a user namespace.

The namespace is mapped onto the home's id range and the staged rootfs (an
overlay of the layer snapshots) holds owners shifted into it, so the step
sees the image's own owners and what it creates comes out shifted too
(:func:`kiln.oci.step.run_step`). The rootfs is bound read-write as ``/`` so
the step's changes land on disk, where the bake turns them into a layer.

There is no weaker fallback: a machine that cannot give a step this sandbox
(no root, no runc) fails the step with the reason (:func:`step_blocker`)
instead of running it with less isolation.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from kiln.errors import KilnError
from kiln.oci.idmap import IdRange
from kiln.oci.runc import runc_binary
from kiln.oci.step import mount_points, run_step, stream_command, terminal_line

__all__ = [
    "DEFAULT_PATH",
    "STEPS_NEED",
    "SandboxResult",
    "run_in_sandbox",
    "sandbox_env",
    "step_blocker",
    "step_command",
    "stream_command",
    "terminal_line",
]

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
STEP_UMASK = 0o022
STEPS_NEED = (
    "run steps execute in runc inside a user namespace, "
    "which needs root and runc (apt-get install runc)"
)


@dataclass(frozen=True)
class SandboxResult:
    exit_code: int
    tail: tuple[str, ...]


def step_blocker() -> str | None:
    """Why ``run`` steps cannot execute on this machine (what they need, what is
    missing), or None when they can."""
    uid = os.geteuid()
    if uid != 0:
        return f"{STEPS_NEED}; running as uid {uid}"
    try:
        runc_binary()
    except KilnError:
        return f"{STEPS_NEED}; runc is not installed"
    return None


def step_command(run: str | Sequence[str]) -> list[str]:
    """A string runs through ``/bin/sh -c`` (Dockerfile's shell form), a list is exec'd."""
    if isinstance(run, str):
        return ["/bin/sh", "-c", run]
    return list(run)


def sandbox_env(image_env: Mapping[str, str]) -> dict[str, str]:
    env = {"PATH": DEFAULT_PATH, "HOME": "/root"}
    env.update(image_env)
    return env


def _missing_mount_points(rootfs: Path, wanted: Sequence[str]) -> list[Path]:
    return [rootfs / p.lstrip("/") for p in wanted if not os.path.lexists(rootfs / p.lstrip("/"))]


def _remove_mount_points(created: list[Path]) -> None:
    """Undo the empty mount points runc made, so they are not the step's changes."""
    for path in reversed(created):
        try:
            if path.is_dir() and not path.is_symlink():
                path.rmdir()
            elif path.is_file() and path.stat().st_size == 0:
                path.unlink()
        except OSError:
            continue


def run_in_sandbox(
    rootfs: Path,
    command: Sequence[str],
    env: Mapping[str, str],
    workdir: str,
    network: bool,
    on_line: Callable[[str], None],
    *,
    ids: IdRange | None,
) -> SandboxResult:
    """Run ``command`` over ``rootfs``, whose owners are shifted into ``ids``.

    Every output line (stdout and stderr merged, in order) goes to
    ``on_line``; returns the exit code and the last lines for the error
    message of a failing step. ``ids`` None (what :func:`kiln.image.bake.step_ids`
    gives where steps cannot run) raises the reason.
    """
    if ids is None:
        raise KilnError(step_blocker() or f"{STEPS_NEED}; no id range to map the step onto")
    if network and (rootfs / "etc").is_symlink():
        raise KilnError(f"{rootfs}: /etc is a symlink; refusing to bind resolv.conf through it")
    created = _missing_mount_points(
        rootfs, [*(("/etc",) if network else ()), *mount_points(network)]
    )
    try:
        code, tail = run_step(
            rootfs, command, env, workdir, network, on_line, ids=ids, umask=STEP_UMASK
        )
    except OSError as e:
        raise KilnError(f"cannot start the step's sandbox: {e}") from e
    finally:
        _remove_mount_points(created)
    return SandboxResult(code, tail)
