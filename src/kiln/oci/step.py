"""Run one bake ``run`` step in a runc sandbox over a staged root.

The step runs as root inside a user namespace mapped onto the home's id
range, so what it creates on disk is owned by shifted ids (the layer writer
maps them back). It gets Docker's build capabilities (what apt and dpkg
need), Kiln's seccomp profile, a pids limit, masked and read-only /proc
paths, and its own network namespace: empty unless the step asks for the
network, then an address on the home's bridge masqueraded to the outside, as
``docker build``'s default bridge gives — the internet, never the host's own
services.

runc resolves the root as the step's (unprivileged) root, which may not
traverse the owner-only ``KILN_HOME``; so the step runs in a private mount
namespace (:mod:`kiln.oci.launch`) where the staged root is bound at a
traversable path under ``/run/kiln``.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from kiln.oci.config import BUILD_CAPABILITIES, Mount, SandboxConfig, runtime_config
from kiln.oci.idmap import IdRange
from kiln.oci.network import host_resolv_conf
from kiln.oci.runc import RUN_ROOT, Runc, home_tag

__all__ = [
    "RESOLV_CONF",
    "STEP_PIDS",
    "mount_points",
    "run_step",
    "stream_command",
    "terminal_line",
]

TAIL_LINES = 20
STEP_PIDS = 4096
RESOLV_CONF = "/etc/resolv.conf"


def terminal_line(raw: bytes) -> str:
    """What a terminal would show of one output line: progress meters rewrite the
    line with carriage returns, so only the last rewrite counts."""
    return raw.decode("utf-8", "replace").rstrip("\r\n").rsplit("\r", 1)[-1]


def stream_command(
    argv: Sequence[str],
    on_line: Callable[[str], None],
    *,
    env: Mapping[str, str] | None = None,
    umask: int = -1,
) -> tuple[int, tuple[str, ...]]:
    """The executor of runc build steps (mmdebstrap and apt run through
    :func:`kiln.image.command.run_logged`): merged output
    goes line by line to ``on_line``; returns the exit code and the last lines for
    an error message. Raises OSError when the command cannot start; an interrupt
    kills it."""
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    proc = subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=None if env is None else dict(env),
        umask=umask,
    )
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = terminal_line(raw)
            tail.append(line)
            on_line(line)
        code = proc.wait()
    except BaseException:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise
    return code, tuple(tail)


def mount_points(network: bool) -> tuple[str, ...]:
    """Paths runc mounts over inside the root; created there if missing."""
    points = ("/proc", "/dev", "/tmp", "/sys")
    return (*points, RESOLV_CONF) if network else points


def run_step(
    rootfs: Path,
    command: Sequence[str],
    env: Mapping[str, str],
    workdir: str,
    network: bool,
    on_line: Callable[[str], None],
    *,
    ids: IdRange,
    home: Path | None = None,
    umask: int = 0o022,
) -> tuple[int, tuple[str, ...]]:
    """Run ``command`` over ``rootfs`` (bound read-write as ``/``); returns (exit code, tail)."""
    if home is None:
        from kiln.paths import kiln_home

        home = kiln_home()
    runc = Runc(home)
    step_id = f"kiln-{home_tag(home)}-step-{uuid.uuid4().hex[:12]}"
    work = RUN_ROOT / home_tag(home) / "steps" / step_id
    view = work / "rootfs"
    view.mkdir(parents=True, mode=0o711)
    for parent in (RUN_ROOT, RUN_ROOT / home_tag(home), work.parent, work):
        os.chmod(parent, 0o711)
    # A runc root of the step's own: nothing of it outlives the step.
    runc.root = work / "runc"
    bundle = work / "bundle"
    bundle.mkdir(mode=0o700)
    mounts = [Mount("/tmp", "tmpfs", "tmpfs", ("nosuid", "nodev", "mode=1777"))]
    if network:
        resolv = str(host_resolv_conf() or RESOLV_CONF)
        mounts.append(Mount(RESOLV_CONF, "bind", resolv, ("rbind", "ro", "nosuid", "nodev")))
    config = runtime_config(
        SandboxConfig(
            args=tuple(command),
            env=dict(env),
            cwd=workdir or "/",
            rootfs=view,
            ids=ids,
            hostname="kiln",
            cgroups_path=step_id,
            readonly_root=False,
            mounts=tuple(mounts),
            capabilities=BUILD_CAPABILITIES,
            no_new_privileges=True,
            pids=STEP_PIDS,
            network_namespace=True,
        )
    )
    config["process"]["user"]["umask"] = umask
    (bundle / "config.json").write_text(json.dumps(config))
    argv = [
        sys.executable, "-m", "kiln.oci.launch",
        "--runc", runc.binary, "--runc-root", str(runc.root),
        "--bundle", str(bundle), "--id", step_id, "--bind", str(rootfs), "--at", str(view),
        *(("--network-home", str(home)) if network else ()),
    ]  # fmt: skip
    try:
        return stream_command(argv, on_line)
    finally:
        with contextlib.suppress(Exception):
            runc.delete(step_id)
        # Never rmtree: were the bind ever visible here, it would reach into the root.
        for leftover in (bundle / "config.json", bundle / "pid"):
            with contextlib.suppress(OSError):
                leftover.unlink()
        for directory in (runc.root, bundle, view, work, work.parent, work.parent.parent):
            with contextlib.suppress(OSError):
                directory.rmdir()
