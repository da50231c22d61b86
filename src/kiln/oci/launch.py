"""Linux primitives the sandboxes need, and the launcher of one-shot containers.

``python -m kiln.oci.launch --runc-root R --bundle B --id ID --bind SRC --at DST``
runs one container to completion the way the instance shim runs a long-lived
one: in a private mount namespace (where ``SRC`` is bound at ``DST``, a path
the container's unprivileged root may traverse), as a child subreaper, with
``runc create`` + ``runc start`` so the container inherits this process's
stdout and stderr as they are — one pipe stays one pipe, in order — and exits
with the container's status (128+N when killed by signal N). SIGTERM or
SIGINT kill the container, which ``runc delete`` then removes. With
``--network-home`` the container's own network namespace gets an address on
that home's bridge, masqueraded to the outside (what a networked bake step
gets: the internet, not the host's services).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import FrameType

__all__ = [
    "MS_BIND",
    "MS_REC",
    "become_subreaper",
    "main",
    "mount",
    "private_mount_namespace",
    "umount_detached",
    "wait_for",
]

CLONE_NEWNS = 0x00020000
MS_BIND = 0x1000
MS_REC = 0x4000
MS_SLAVE = 1 << 19
MNT_DETACH = 2
PR_SET_CHILD_SUBREAPER = 36
_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount(source: str, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    _check(
        _libc.mount(
            source.encode(),
            target.encode(),
            fstype.encode() if fstype else None,
            ctypes.c_ulong(flags),
            data.encode() if data else None,
        ),
        f"mount {fstype or source} on {target}",
    )


def umount_detached(target: Path) -> None:
    _check(_libc.umount2(str(target).encode(), MNT_DETACH), f"umount {target}")


def private_mount_namespace() -> None:
    """Our mounts stay ours; the host's still propagate in (rslave, as runc's default)."""
    _check(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    mount("none", "/", None, MS_REC | MS_SLAVE, None)


def become_subreaper() -> None:
    """Orphans below us (a container's init once runc exits) become our children."""
    _check(_libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "prctl(PR_SET_CHILD_SUBREAPER)")


def wait_for(pid: int) -> int:
    """Wait status of ``pid`` (our child, as subreaper); strays are reaped on the way."""
    while True:
        try:
            found, status = os.waitpid(-1, 0)
        except ChildProcessError:
            return 137 << 8
        except InterruptedError:
            continue
        if found == pid:
            return status


def exit_code(status: int) -> int:
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kiln.oci.launch")
    parser.add_argument("--runc", default="runc")
    parser.add_argument("--runc-root", required=True)
    parser.add_argument("--bundle", required=True, type=Path)
    parser.add_argument("--id", required=True)
    parser.add_argument("--bind", required=True)
    parser.add_argument("--at", required=True)
    parser.add_argument("--network-home", type=Path, help="attach to this home's bridge (NAT)")
    args = parser.parse_args(argv)
    runc = [args.runc, "--root", args.runc_root]
    pid: int | None = None

    def stop(signum: int, _frame: FrameType | None) -> None:
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        else:
            raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    private_mount_namespace()
    mount(args.bind, args.at, None, MS_BIND | MS_REC, None)
    become_subreaper()
    pid_file = args.bundle / "pid"
    try:
        created = subprocess.run(
            [*runc, "create", "--bundle", str(args.bundle), "--pid-file", str(pid_file), args.id],
            stdin=subprocess.DEVNULL,
            check=False,
        )
        if created.returncode != 0:
            return 125
        pid = int(pid_file.read_text().strip())
        if args.network_home is not None:
            from kiln.oci.network import BridgeNetwork

            BridgeNetwork(args.network_home).attach(args.id, pid, outbound=True)
        started = subprocess.run([*runc, "start", args.id], stdin=subprocess.DEVNULL, check=False)
        if started.returncode != 0:
            os.kill(pid, signal.SIGKILL)
        return exit_code(wait_for(pid))
    finally:
        subprocess.run([*runc, "delete", "--force", args.id], capture_output=True, check=False)


if __name__ == "__main__":
    sys.exit(main())
