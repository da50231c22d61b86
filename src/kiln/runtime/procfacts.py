"""What this machine's kernel says about one instance, read by pid: its cgroup's freezer,
its processes and its listening sockets (from ``/proc``), and its writable paths as a tar
(through ``/proc/PID/root``, the instance's own view of its files and mounts).

Used by the local runtime for quarantine (:class:`kiln.runtime.Freezer`): nothing here
writes into an instance, and nothing it reads is trusted (an instance's processes name
themselves, and its files may be links anywhere).
"""

from __future__ import annotations

import os
import posixpath
import stat
import tarfile
import time
from pathlib import Path
from typing import Any

from kiln.runtime import RuntimeFailure

__all__ = [
    "FREEZE_TIMEOUT",
    "WRITABLE_TAR_MAX",
    "cgroup_pids",
    "freeze_cgroup",
    "freezer_dir",
    "listening_sockets",
    "process_facts",
    "tar_writable",
    "thaw_cgroup",
]

CGROUP_ROOT = Path("/sys/fs/cgroup")
FREEZE_TIMEOUT = 5.0
WRITABLE_TAR_MAX = 256 * 1024**2
"""An evidence tar holds at most this much file content; the rest is listed as cut."""
PROCESSES_MAX = 4096
_TCP_LISTEN = "0A"


def freezer_dir(pid: int) -> tuple[str, Path]:
    """``("v1", dir)`` of the freezer hierarchy or ``("v2", dir)`` of the unified one that
    holds ``pid``: v1 where a freezer controller is mounted (runc uses it there)."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError as e:
        raise RuntimeFailure(f"process {pid}: cannot read its cgroup ({e})") from e
    unified = None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        relative = path.lstrip("/")
        if "freezer" in controllers.split(","):
            directory = CGROUP_ROOT / "freezer" / relative
            if (directory / "freezer.state").exists():
                return "v1", directory
        if controllers == "" and relative:
            unified = relative
    if unified is not None:
        for base in (CGROUP_ROOT, CGROUP_ROOT / "unified"):
            if (base / unified / "cgroup.freeze").exists():
                return "v2", base / unified
    raise RuntimeFailure(f"process {pid}: no cgroup freezer of its own to freeze it with")


def _frozen(kind: str, directory: Path) -> bool:
    if kind == "v1":
        return (directory / "freezer.state").read_text().strip() == "FROZEN"
    return "frozen 1" in (directory / "cgroup.events").read_text().splitlines()


def freeze_cgroup(kind: str, directory: Path, timeout: float = FREEZE_TIMEOUT) -> None:
    """Freeze and wait until the kernel says every task is frozen (v1 passes FREEZING)."""
    if kind == "v1":
        (directory / "freezer.state").write_text("FROZEN")
    else:
        (directory / "cgroup.freeze").write_text("1")
    deadline = time.monotonic() + timeout
    while not _frozen(kind, directory):
        if time.monotonic() > deadline:
            raise RuntimeFailure(f"cgroup {directory}: not frozen within {timeout:g}s")
        time.sleep(0.01)


def thaw_cgroup(kind: str, directory: Path) -> None:
    if kind == "v1":
        (directory / "freezer.state").write_text("THAWED")
    else:
        (directory / "cgroup.freeze").write_text("0")


def cgroup_pids(directory: Path) -> list[int]:
    try:
        text = (directory / "cgroup.procs").read_text()
    except OSError:
        return []
    return sorted(int(p) for p in text.split() if p.isdigit())[:PROCESSES_MAX]


def process_facts(pids: list[int]) -> list[dict[str, Any]]:
    """A ``ps``: pid, ppid, state, uid, comm and command line of each (as host pids)."""
    out = []
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text(errors="replace")
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        out.append(
            {
                "pid": pid,
                "ppid": int(fields.get("PPid", "0").strip() or 0),
                "state": fields.get("State", "").strip(),
                "uid": (fields.get("Uid", "").split() or [""])[0],
                "comm": fields.get("Name", "").strip(),
                "cmdline": [a.decode(errors="replace") for a in cmdline.split(b"\0") if a],
            }
        )
    return out


def _address(hex_addr: str) -> str:
    host, port_hex = hex_addr.split(":")
    port = int(port_hex, 16)
    raw = bytes.fromhex(host)
    if len(raw) == 4:
        return f"{'.'.join(str(b) for b in raw[::-1])}:{port}"
    words = [raw[i : i + 4][::-1] for i in range(0, 16, 4)]
    groups = b"".join(words).hex()
    text = ":".join(groups[i : i + 4] for i in range(0, 32, 4))
    return f"[{text}]:{port}"


def listening_sockets(pid: int) -> list[str]:
    """TCP sockets in LISTEN in the network namespace of ``pid`` (its ``/proc/net/tcp*``)."""
    found = []
    for name in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{name}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) > 3 and parts[3] == _TCP_LISTEN:
                found.append(_address(parts[1]))
    return sorted(set(found))


def _safe_path(path: str) -> str | None:
    """An absolute path without ``..``: the only writable paths read through /proc."""
    normal = posixpath.normpath(path)
    if not normal.startswith("/") or normal == "/" or ".." in normal.split("/"):
        return None
    return normal


def tar_writable(
    pid: int, paths: list[str], out: Path, limit: int = WRITABLE_TAR_MAX
) -> dict[str, Any]:
    """Each writable path as the instance sees it, into the tar ``out``; links are stored
    as links, never followed. Returns what was stored, what was cut (past ``limit``
    bytes of content) and which paths were refused (relative, ``..``, a link, absent)."""
    root = f"/proc/{pid}/root"
    stored = files = 0
    cut: list[str] = []
    refused: list[str] = []
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in paths:
            safe = _safe_path(path)
            top = root + safe if safe is not None else ""
            if not top or not os.path.lexists(top) or os.path.islink(top):
                refused.append(path)
                continue
            for directory, dirs, names in os.walk(top, followlinks=False):
                dirs.sort()
                links = [d for d in dirs if os.path.islink(os.path.join(directory, d))]
                for name in [".", *sorted(names), *links]:
                    full = os.path.normpath(os.path.join(directory, name))
                    try:
                        info = os.lstat(full)
                    except OSError:
                        continue
                    size = info.st_size if stat.S_ISREG(info.st_mode) else 0
                    arcname = full[len(root) :].lstrip("/")
                    if stored + size > limit:
                        cut.append("/" + arcname)
                        continue
                    try:
                        tar.add(full, arcname=arcname, recursive=False)
                    except OSError:
                        continue
                    stored += size
                    files += 1
    return {"files": files, "bytes": stored, "cut": cut[:100], "refused": refused}
