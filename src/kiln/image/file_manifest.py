"""Per-snapshot file manifests: what an unpacked layer held when it was published.

A layer snapshot is shared by every instance on it and every later start, so a file
changed in it changes all of them at once, silently. The manifest recorded at
unpack time (``manifest.json`` beside ``fs/``) is the proof to check it against:
every entry's path, type, mode, owner, size, mtime and, for regular files, the
sha256 of its content (a symlink's target, a device's number).

Two passes, as :func:`compare_tree` takes them: a cheap one (``lstat`` only:
type, mode, owner, size, mtime; no file is read) that runs often, and a full one
that re-hashes every regular file, on a slower schedule, for a change made
with the metadata put back.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.errors import KilnError

__all__ = [
    "MANIFEST_FILE",
    "FileDifference",
    "FileEntry",
    "compare_tree",
    "read_manifest",
    "record_manifest",
    "write_manifest",
]

MANIFEST_FILE = "manifest.json"
MANIFEST_VERSION = 1
MAX_MANIFEST_BYTES = 256 * 1024 * 1024
"""A manifest larger than this is not one Kiln wrote (a million files take ~150 MB)."""
_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class FileEntry:
    """One entry of a tree, as recorded; ``content`` is a file's ``sha256:…``, a
    symlink's target or a device's ``major:minor``, empty for the rest."""

    kind: str
    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    content: str

    def to_json(self) -> list[Any]:
        return [self.kind, self.mode, self.uid, self.gid, self.size, self.mtime_ns, self.content]

    @classmethod
    def from_json(cls, value: Any) -> FileEntry:
        if not isinstance(value, list) or len(value) != 7:
            raise KilnError(f"manifest entry {value!r} is not a 7-item list")
        kind, mode, uid, gid, size, mtime_ns, content = value
        if not isinstance(kind, str) or not isinstance(content, str):
            raise KilnError(f"manifest entry {value!r}: kind and content must be strings")
        numbers = (mode, uid, gid, size, mtime_ns)
        if not all(isinstance(n, int) and not isinstance(n, bool) for n in numbers):
            raise KilnError(f"manifest entry {value!r}: numbers expected")
        return cls(kind, mode, uid, gid, size, mtime_ns, content)


@dataclass(frozen=True)
class FileDifference:
    """One path that differs: ``added``, ``removed`` or ``changed`` (``detail`` says how)."""

    path: str
    change: str
    detail: str

    def to_json(self) -> dict[str, str]:
        return {"path": self.path, "change": self.change, "detail": self.detail}


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISREG, "file"),
        (stat.S_ISDIR, "dir"),
        (stat.S_ISLNK, "symlink"),
        (stat.S_ISCHR, "char"),
        (stat.S_ISBLK, "block"),
        (stat.S_ISFIFO, "fifo"),
        (stat.S_ISSOCK, "socket"),
    ):
        if test(mode):
            return name
    return "unknown"


def file_sha256(path: Path) -> str:
    """The content digest of a regular file, read without following a symlink."""
    digest = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOATIME)
    try:
        while chunk := os.read(fd, _CHUNK):
            digest.update(chunk)
    finally:
        os.close(fd)
    return "sha256:" + digest.hexdigest()


def _entry(path: Path, st: os.stat_result, full: bool) -> FileEntry:
    kind = _kind(st.st_mode)
    content = ""
    if kind == "file" and full:
        content = file_sha256(path)
    elif kind == "symlink":
        content = os.readlink(path)
    elif kind in ("char", "block"):
        content = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    size = st.st_size if kind in ("file", "symlink") else 0
    mtime = st.st_mtime_ns if kind != "dir" else 0
    return FileEntry(kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, size, mtime, content)


def _walk(root: Path) -> Iterator[tuple[str, Path, os.stat_result]]:
    """Everything under ``root`` (not ``root`` itself) as ``/relative`` paths, never
    following a symlink."""
    stack = [root]
    while stack:
        current = stack.pop()
        with os.scandir(current) as entries:
            for item in entries:
                st = item.stat(follow_symlinks=False)
                path = Path(item.path)
                yield "/" + path.relative_to(root).as_posix(), path, st
                if stat.S_ISDIR(st.st_mode):
                    stack.append(path)


def record_manifest(root: Path) -> dict[str, FileEntry]:
    """Every entry under ``root`` with its content digest (a full read of the tree).

    Directory mtimes are not recorded: overlayfs and unpacking set them as the
    tree is made, and a changed directory shows as an added or removed entry."""
    return {rel: _entry(path, st, True) for rel, path, st in _walk(Path(root))}


def write_manifest(snapshot: Path, entries: dict[str, FileEntry]) -> None:
    document = {
        "version": MANIFEST_VERSION,
        "entries": {path: entry.to_json() for path, entry in sorted(entries.items())},
    }
    target = Path(snapshot) / MANIFEST_FILE
    temporary = target.with_name(f".{MANIFEST_FILE}.{os.getpid()}")
    temporary.write_text(json.dumps(document, separators=(",", ":")))
    os.chmod(temporary, 0o600)
    os.replace(temporary, target)


def read_manifest(snapshot: Path) -> dict[str, FileEntry] | None:
    """The manifest beside a snapshot's tree; None when there is none; KilnError when
    it is not one Kiln wrote."""
    path = Path(snapshot) / MANIFEST_FILE
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_MANIFEST_BYTES:
        raise KilnError(f"{path}: not a regular file of at most {MAX_MANIFEST_BYTES} bytes")
    try:
        document = json.loads(path.read_bytes())
    except (OSError, ValueError) as e:
        raise KilnError(f"{path}: unreadable manifest: {e}") from e
    if not isinstance(document, dict) or document.get("version") != MANIFEST_VERSION:
        raise KilnError(f"{path}: not a version {MANIFEST_VERSION} manifest")
    entries = document.get("entries")
    if not isinstance(entries, dict):
        raise KilnError(f"{path}: no entries")
    return {str(p): FileEntry.from_json(v) for p, v in entries.items()}


def _describe(recorded: FileEntry, found: FileEntry, full: bool) -> str:
    parts: list[str] = []
    if recorded.kind != found.kind:
        return f"type {recorded.kind} → {found.kind}"
    if recorded.mode != found.mode:
        parts.append(f"mode {recorded.mode:o} → {found.mode:o}")
    if (recorded.uid, recorded.gid) != (found.uid, found.gid):
        parts.append(f"owner {recorded.uid}:{recorded.gid} → {found.uid}:{found.gid}")
    if recorded.size != found.size:
        parts.append(f"size {recorded.size} → {found.size}")
    if recorded.mtime_ns != found.mtime_ns:
        parts.append("mtime changed")
    if (found.kind != "file" or full) and recorded.content != found.content:
        parts.append("content changed" if found.kind == "file" else "target changed")
    return ", ".join(parts)


def compare_tree(
    root: Path,
    recorded: dict[str, FileEntry],
    *,
    full: bool,
    ignored: Callable[[str], bool] = lambda _path: False,
) -> list[FileDifference]:
    """What differs between the tree at ``root`` and its manifest, path by path, sorted.

    The cheap pass (``full=False``) reads no file: a write that keeps size and puts
    mtime back is left to the full pass, which hashes every regular file."""
    differences: list[FileDifference] = []
    seen: set[str] = set()
    for rel, path, st in _walk(Path(root)):
        if ignored(rel):
            continue
        seen.add(rel)
        expected = recorded.get(rel)
        try:
            found = _entry(path, st, full and expected is not None and stat.S_ISREG(st.st_mode))
        except OSError as e:
            differences.append(FileDifference(rel, "changed", f"unreadable: {e.strerror}"))
            continue
        if expected is None:
            differences.append(FileDifference(rel, "added", f"{found.kind}, {found.size} bytes"))
            continue
        detail = _describe(expected, found, full)
        if detail:
            differences.append(FileDifference(rel, "changed", detail))
    for rel, expected in recorded.items():
        if rel not in seen and not ignored(rel):
            differences.append(FileDifference(rel, "removed", expected.kind))
    return sorted(differences, key=lambda d: d.path)
