"""What this machine's kernel says about one instance, read by pid: its cgroup's freezer,
its processes and its listening sockets (from ``/proc``), and its writable paths as a tar
(through ``/proc/PID/root``, the instance's own view of its files and mounts).

Used by the local runtime for quarantine (:class:`kiln.runtime.Freezer`): nothing here
writes into an instance, and nothing it reads is trusted (an instance's processes name
themselves, and its files may be links anywhere).
"""

from __future__ import annotations

import itertools
import os
import posixpath
import stat
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from kiln.runtime import RuntimeFailure

__all__ = [
    "FREEZE_TIMEOUT",
    "WRITABLE_DEPTH_MAX",
    "WRITABLE_ENTRIES_MAX",
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
"""An evidence tar is at most this large, headers included; the rest is listed as cut."""
WRITABLE_ENTRIES_MAX = 100_000
"""Entries an evidence tar holds at most (and names read from one directory)."""
WRITABLE_DEPTH_MAX = 128
"""Directories nested deeper than this under a writable path are listed as cut."""
_HEADER_COST = 3 * tarfile.BLOCKSIZE
"""A member's header, its PAX header and the PAX records' block, at least."""
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


_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_OPEN_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_TAR_TYPES = {
    stat.S_IFDIR: tarfile.DIRTYPE,
    stat.S_IFLNK: tarfile.SYMTYPE,
    stat.S_IFIFO: tarfile.FIFOTYPE,
    stat.S_IFCHR: tarfile.CHRTYPE,
    stat.S_IFBLK: tarfile.BLKTYPE,
}


def _open_inside(root_fd: int, path: str) -> int:
    """``path`` under the root, one component at a time, none of them a link."""
    fd = os.dup(root_fd)
    try:
        for part in path.strip("/").split("/"):
            next_fd = os.open(part, _OPEN_DIR, dir_fd=fd)
            os.close(fd)
            fd = next_fd
    except BaseException:
        os.close(fd)
        raise
    return fd


class _Exactly:
    """A file read as exactly ``size`` bytes: cut if it grew, padded with zeros if it
    shrank (an unfrozen writer), so the tar's header never lies about what follows."""

    def __init__(self, content: BinaryIO, size: int) -> None:
        self.content = content
        self.left = size

    def read(self, n: int = -1, /) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        data = self.content.read(n) if n else b""
        data += bytes(n - len(data))
        self.left -= n
        return data


class _WritableTar:
    """One evidence tar, bounded in entries, depth and bytes written (content and
    headers: a million empty files must not fill the agent's disk)."""

    def __init__(self, tar: tarfile.TarFile, limit: int) -> None:
        self.tar = tar
        self.limit = limit
        self.stored = self.files = 0
        self.cut: list[str] = []
        self.hardlinks: dict[tuple[int, int], str] = {}

    def add(self, dir_fd: int, name: str, arcname: str, st: os.stat_result) -> None:
        """One entry, read relative to its directory's descriptor: a link is stored as
        a link, a fifo or device as a header, a regular file only if the file opened is
        the one stat saw (never through a link, never blocking)."""
        kind = stat.S_IFMT(st.st_mode)
        info = tarfile.TarInfo(arcname)
        info.mode, info.uid, info.gid = stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid
        info.mtime = int(st.st_mtime)
        size = 0
        key = (st.st_dev, st.st_ino)
        if kind == stat.S_IFREG and st.st_nlink > 1 and key in self.hardlinks:
            info.type, info.linkname = tarfile.LNKTYPE, self.hardlinks[key]
        elif kind == stat.S_IFREG:
            size = st.st_size
        elif kind in _TAR_TYPES:
            info.type = _TAR_TYPES[kind]
            if kind == stat.S_IFLNK:
                info.linkname = os.readlink(name, dir_fd=dir_fd)
            elif kind in (stat.S_IFCHR, stat.S_IFBLK):
                info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
        else:
            return  # a socket: nothing a tar holds
        cost = _HEADER_COST + len(arcname.encode(errors="surrogateescape")) * 2
        cost += len(info.linkname) * 2 + -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
        if self.tar.offset + cost > self.limit or self.files >= WRITABLE_ENTRIES_MAX:
            self.cut.append("/" + arcname)
            return
        if size == 0 or info.type != tarfile.REGTYPE:
            self.tar.addfile(info)
        else:
            fd = os.open(name, _OPEN_FILE, dir_fd=dir_fd)
            with os.fdopen(fd, "rb") as content:
                opened = os.fstat(content.fileno())
                if (opened.st_dev, opened.st_ino) != key or not stat.S_ISREG(opened.st_mode):
                    return
                info.size = size
                self.tar.addfile(info, _Exactly(content, size))
            self.stored += size
        if kind == stat.S_IFREG and st.st_nlink > 1:
            self.hardlinks.setdefault(key, arcname)
        self.files += 1

    def walk(self, top_fd: int, top: str) -> None:
        """The tree under ``top_fd`` (already added; closed here), depth first without
        recursion; each directory opened from its parent's descriptor, never through a
        link, so at most one descriptor per level of depth is open."""
        stack = [(top_fd, top, self._directory(top_fd, top, 0))]
        try:
            while stack:
                dir_fd, arcdir, below = stack[-1]
                if not below:
                    os.close(dir_fd)
                    stack.pop()
                    continue
                name = below.pop(0)
                try:
                    child_fd = os.open(name, _OPEN_DIR, dir_fd=dir_fd)
                except OSError:
                    continue
                arcname = f"{arcdir}/{name}"
                stack.append((child_fd, arcname, self._directory(child_fd, arcname, len(stack))))
        finally:
            for dir_fd, _, _ in stack:
                os.close(dir_fd)

    def _directory(self, dir_fd: int, arcdir: str, depth: int) -> list[str]:
        """Add one directory's entries; the subdirectories to walk into."""
        try:
            with os.scandir(dir_fd) as entries:
                names = sorted(e.name for e in itertools.islice(entries, WRITABLE_ENTRIES_MAX + 1))
        except OSError:
            return []
        below: list[str] = []
        for name in names:
            arcname = f"{arcdir}/{name}"
            if self.files >= WRITABLE_ENTRIES_MAX:
                self.cut.append("/" + arcname)
                break
            try:
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISDIR(st.st_mode) and depth >= WRITABLE_DEPTH_MAX:
                self.cut.append("/" + arcname)
                continue
            before = len(self.cut)
            try:
                self.add(dir_fd, name, arcname, st)
            except OSError:
                continue
            if stat.S_ISDIR(st.st_mode) and len(self.cut) == before:
                below.append(name)
        return below


def tar_writable(
    pid: int,
    paths: list[str],
    out: Path,
    limit: int | None = None,
    still_the_instance: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """Each writable path as the instance sees it, into the tar ``out``; links are stored
    as links, never followed. Returns what was stored, what was cut (past ``limit``
    bytes written, :data:`WRITABLE_TAR_MAX` by default, or past the entry and depth
    bounds) and which paths were refused (relative, ``..``, a link, absent).

    The instance's root is opened once: every read is relative to it, so a pid that
    ends and is reused meanwhile cannot turn the walk into another process's files;
    ``still_the_instance``, asked after it is open, says whether the pid was still the
    instance's (else everything is refused)."""
    refused: list[str] = []
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        bounded = _WritableTar(tar, WRITABLE_TAR_MAX if limit is None else limit)
        try:
            root_fd = os.open(f"/proc/{pid}/root", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return {"files": 0, "bytes": 0, "cut": [], "refused": list(paths)}
        try:
            if still_the_instance is not None and not still_the_instance():
                return {"files": 0, "bytes": 0, "cut": [], "refused": list(paths)}
            for path in paths:
                safe = _safe_path(path)
                try:
                    if safe is None:
                        raise FileNotFoundError(path)
                    top_fd = _open_inside(root_fd, safe)
                except OSError:
                    refused.append(path)
                    continue
                try:
                    bounded.add(top_fd, ".", safe.lstrip("/"), os.fstat(top_fd))
                except OSError:
                    os.close(top_fd)
                    refused.append(path)
                    continue
                bounded.walk(top_fd, safe.lstrip("/"))  # closes top_fd
        finally:
            os.close(root_fd)
    return {
        "files": bounded.files,
        "bytes": bounded.stored,
        "cut": bounded.cut[:100],
        "refused": refused,
    }
