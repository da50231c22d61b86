"""Reproducible layers: the same tree gives the same bytes, on any machine, at any time.

The rules (docs/images.md has the long form): entries sorted by path bytes, so
parents precede children; PAX headers carrying only what the tree says
(numeric owners, empty user/group names, integer mtimes clamped to the
``SOURCE_DATE_EPOCH`` ``epoch``, no atime/ctime, no xattrs); hardlinks point
at the first path of their group in sort order; gzip with no file name, mtime
0 and level 6, deflated in fixed 1 MiB blocks (see ``_GzipTarSink``).
``diff_id`` hashes the tar, the descriptor digest the gzip.

Layers stream to a temp file in the store while both hashes are computed, so
a 100 MB Debian base never sits in memory. Device nodes and sockets are left
out: the runtime provides ``/dev``, and :mod:`kiln.image.unpack` refuses
devices anyway.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import stat
import struct
import tarfile
import threading
import zlib
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, BinaryIO

from zlib_ng import zlib_ng

from kiln.errors import KilnError
from kiln.image.command import Interrupted
from kiln.image.digest import MEDIA_TYPE_LAYER_GZIP, Descriptor
from kiln.image.store import ImageStore
from kiln.oci.idmap import IdRange

GZIP_LEVEL = 6
GZIP_IMPLEMENTATION = f"zlib-ng {zlib_ng.ZLIBNG_VERSION} level {GZIP_LEVEL}"
"""What compresses every layer: zlib-ng from the ``zlib-ng`` wheel at an exact version
(pyproject.toml), not whatever zlib the host's Python links, whose builds compress the
same bytes differently, so the same recipe gives the same digests on any host. It is
part of every layer-cache and shared-base key: a cached blob made by another
compressor is never reused as if it were this one's."""
_BLOCK = tarfile.BLOCKSIZE
_RECORD = tarfile.RECORDSIZE
_CHUNK = 1 << 20
_GZIP_BLOCK = 1 << 20
_GZIP_DICT = 32 << 10
_WHITEOUT = ".wh."
# Fixed gzip header: magic, deflate, no flags (no file name), mtime 0, no extra flags, OS unknown.
_GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"


@dataclass(frozen=True)
class LayerResult:
    descriptor: Descriptor
    diff_id: str
    size_uncompressed: int
    entries: int


@dataclass(frozen=True)
class PathState:
    """What a snapshot remembers of one path: enough to notice any change without hashing."""

    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int
    dev: int
    nlink: int
    link: str | None

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)


@dataclass(frozen=True)
class Snapshot:
    root: Path
    paths: dict[str, PathState] = field(default_factory=dict)


def snapshot(root: Path, ids: IdRange | None = None) -> Snapshot:
    """Every path under ``root`` as it is now.

    With ``ids`` the tree's owners are shifted host ids (a rootfs over layer
    snapshots, written by steps in a user namespace): they are recorded as
    the container ids the step saw, so the layer carries what it would
    without the shift.
    """
    root = Path(root)
    paths: dict[str, PathState] = {}
    for rel, st in _walk(root):
        link = os.readlink(root / rel) if stat.S_ISLNK(st.st_mode) else None
        paths[rel] = _state(st, link, ids)
    return Snapshot(root, paths)


def _state(st: os.stat_result, link: str | None = None, ids: IdRange | None = None) -> PathState:
    uid, gid = st.st_uid, st.st_gid
    if ids is not None:
        uid, gid = ids.to_container(uid), ids.to_container(gid)
    return PathState(
        st.st_mode,
        uid,
        gid,
        st.st_size,
        st.st_mtime_ns,
        st.st_ctime_ns,
        st.st_ino,
        st.st_dev,
        st.st_nlink,
        link,
    )


def layer_from_dir(
    root: Path,
    store: ImageStore,
    epoch: int,
    *,
    normalize_modes: bool = False,
    root_owned: bool = False,
    prefix: str = "",
    cancelled: threading.Event | None = None,
) -> LayerResult:
    """A layer holding the whole tree at ``root``, placed under ``prefix`` in the image.

    ``root`` may also be a single file or symlink (then ``prefix`` names it).
    Missing parents of ``prefix`` become directories 0755, owner 0:0.
    ``normalize_modes`` (copy steps) sets owner 0:0, directories 0755 and
    files 0755 or 0644 by their owner exec bit, so a checkout's umask and
    owner never reach the digest; ``root_owned`` only the owner (a copy step
    with its own ``chmod``: staged by a non-root bake, the files are its user's).
    """
    root = Path(root)
    prefix = _clean_prefix(prefix)
    try:
        top = root.lstat()
    except OSError as e:
        raise KilnError(f"cannot read {root} for a layer: {e}") from e
    entries: list[_Entry] = []
    parts = prefix.split("/") if prefix else []
    for depth in range(1, len(parts)):
        entries.append(_Entry("/".join(parts[:depth]), tarfile.DIRTYPE, 0o755, 0, 0, epoch))
    if stat.S_ISDIR(top.st_mode):
        if prefix:
            entries.extend(
                _entry_from_state(prefix, root, _state(top), epoch, normalize_modes, root_owned)
            )
        for rel, st in _walk(root):
            name = f"{prefix}/{rel}" if prefix else rel
            entries.extend(
                _entry_from_state(name, root / rel, _state(st), epoch, normalize_modes, root_owned)
            )
    else:
        if not prefix:
            raise KilnError(f"layer from single file {root} needs a destination path")
        entries.extend(
            _entry_from_state(prefix, root, _state(top), epoch, normalize_modes, root_owned)
        )
    return _write_layer(entries, store, f"tree {root}", cancelled)


def settle_tree(root: Path, epoch: int) -> None:
    """Make the tree at ``root`` exactly what unpacking ``layer_from_dir(root, …, epoch)`` gives.

    A layer carries no device nodes, sockets or xattrs and clamps every mtime
    to whole seconds no later than ``epoch``; this removes and clamps the same
    way in place. A tree that is both written as a layer and kept as a root
    filesystem (a Debian base, then the first ``run`` step over it) must be
    settled first, or the step would see a tree that a re-bake from the cached
    layer does not — and write a different layer.
    """
    root = Path(root)
    entries = list(_walk(root))
    removed = False
    for rel, st in entries:
        fmt = stat.S_IFMT(st.st_mode)
        if fmt in (stat.S_IFCHR, stat.S_IFBLK, stat.S_IFSOCK):
            os.unlink(root / rel)
            removed = True
    if removed:
        entries = list(_walk(root))
    for rel, st in entries:
        path = root / rel
        try:
            names = os.listxattr(path, follow_symlinks=False)
        except OSError:
            names = []
        for name in names:
            os.removexattr(path, name, follow_symlinks=False)
        mtime = max(0, min(st.st_mtime_ns // 1_000_000_000, epoch)) * 1_000_000_000
        if st.st_mtime_ns != mtime:
            os.utime(path, ns=(mtime, mtime), follow_symlinks=False)


def layer_from_diff(
    root: Path,
    before: Snapshot,
    after: Snapshot,
    store: ImageStore,
    epoch: int,
    *,
    normalize_modes: bool = False,
    cancelled: threading.Event | None = None,
) -> LayerResult | None:
    """The layer that turns ``before`` into ``after``, or None when nothing changed.

    Added or changed paths are written whole; removed paths become
    ``.wh.NAME`` whiteouts (a removed directory is one whiteout). A path whose
    type changed is simply written: the applier replaces a directory by a
    non-directory and the other way round.
    """
    root = Path(root)
    entries: list[_Entry] = []
    for rel, state in after.paths.items():
        if before.paths.get(rel) == state:
            continue
        entries.extend(_entry_from_state(rel, root / rel, state, epoch, normalize_modes))
    for rel in before.paths.keys() - after.paths.keys():
        parent = rel.rpartition("/")[0]
        if parent and not (parent in after.paths and after.paths[parent].is_dir):
            continue
        name = rel.rpartition("/")[2]
        whiteout = f"{parent}/{_WHITEOUT}{name}" if parent else f"{_WHITEOUT}{name}"
        entries.append(_Entry(whiteout, tarfile.REGTYPE, 0o644, 0, 0, epoch))
    if not entries:
        return None
    return _write_layer(entries, store, f"changes in {root}", cancelled)


def layer_from_tarball(path: Path, store: ImageStore, epoch: int) -> LayerResult:
    """Re-normalise an existing tarball (plain or gzip), e.g. mmdebstrap's output.

    Entries are re-written, not extracted, so root-owned files and hardlinks
    survive without running as root; device nodes are dropped; any entry that
    would escape the root is refused.
    """
    path = Path(path)
    plain = path
    temp: Path | None = None
    try:
        with open(path, "rb") as f:
            compressed = f.read(2) == b"\x1f\x8b"
        if compressed:
            out, temp = store.temp_file(".tar")
            with out, gzip.open(path, "rb") as src:
                while chunk := src.read(_CHUNK):
                    out.write(chunk)
            plain = temp
        with tarfile.open(plain, "r:") as tf:
            return _write_layer(_entries_from_tar(tf, path, epoch), store, f"tarball {path}")
    except (OSError, tarfile.TarError, EOFError, zlib.error) as e:
        raise KilnError(f"cannot read tarball {path}: {e}") from e
    finally:
        if temp is not None:
            temp.unlink(missing_ok=True)


# -- entries ----------------------------------------------------------------


@dataclass
class _Entry:
    path: str
    type: bytes
    mode: int
    uid: int
    gid: int
    mtime: int
    size: int = 0
    linkname: str = ""
    link_key: object | None = None
    source: Path | Callable[[], IO[bytes]] | None = None

    def sort_key(self) -> bytes:
        return self.path.encode("utf-8", "surrogateescape")


def _walk(root: Path) -> Iterable[tuple[str, os.stat_result]]:
    """Every path under ``root`` (not root itself), relative, without following symlinks."""
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        try:
            it = os.scandir(root / rel_dir if rel_dir else root)
        except OSError as e:
            raise KilnError(f"cannot list {root / rel_dir}: {e}") from e
        with it:
            for dirent in it:
                rel = f"{rel_dir}/{dirent.name}" if rel_dir else dirent.name
                st = dirent.stat(follow_symlinks=False)
                yield rel, st
                if stat.S_ISDIR(st.st_mode):
                    stack.append(rel)


def _entry_from_state(
    name: str, path: Path, st: PathState, epoch: int, normalize: bool, root_owned: bool = False
) -> list[_Entry]:
    fmt = stat.S_IFMT(st.mode)
    perm = stat.S_IMODE(st.mode)
    uid, gid = (0, 0) if normalize or root_owned else (st.uid, st.gid)
    mtime = max(0, min(st.mtime_ns // 1_000_000_000, epoch))
    if fmt == stat.S_IFDIR:
        return [_Entry(name, tarfile.DIRTYPE, 0o755 if normalize else perm, uid, gid, mtime)]
    if fmt == stat.S_IFREG:
        if normalize:
            perm = 0o755 if perm & 0o100 else 0o644
        key = (st.dev, st.inode) if st.nlink > 1 else None
        return [_Entry(name, tarfile.REGTYPE, perm, uid, gid, mtime, st.size, "", key, path)]
    if fmt == stat.S_IFLNK:
        target = st.link if st.link is not None else os.readlink(path)
        return [_Entry(name, tarfile.SYMTYPE, 0o777, uid, gid, mtime, 0, target)]
    if fmt == stat.S_IFIFO:
        return [_Entry(name, tarfile.FIFOTYPE, 0o644 if normalize else perm, uid, gid, mtime)]
    return []


def _clean_prefix(prefix: str) -> str:
    parts = [p for p in prefix.strip("/").split("/") if p not in ("", ".")]
    if ".." in parts:
        raise KilnError(f"layer destination {prefix!r} must not contain '..'")
    return "/".join(parts)


def _normalize_member_name(name: str, tarball: Path) -> str:
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise KilnError(f"tarball {tarball}: entry {name!r} escapes the root")
    return "/".join(parts)


def _entries_from_tar(tf: tarfile.TarFile, tarball: Path, epoch: int) -> list[_Entry]:
    members: dict[str, tarfile.TarInfo] = {}
    for member in tf.getmembers():
        name = _normalize_member_name(member.name, tarball)
        if name:
            members[name] = member
    entries: list[_Entry] = []
    linked: set[str] = set()
    for name, member in members.items():
        if member.islnk():
            target = _normalize_member_name(member.linkname, tarball)
            origin = members.get(target)
            if origin is None or not origin.isreg():
                raise KilnError(
                    f"tarball {tarball}: hardlink {name!r} points at {member.linkname!r}, "
                    "which is not a regular file in the archive"
                )
            linked.add(target)
    for name, member in members.items():
        mode = member.mode & 0o7777
        mtime = max(0, min(int(member.mtime), epoch))
        base = (mode, member.uid, member.gid, mtime)
        if member.isdir():
            entries.append(_Entry(name, tarfile.DIRTYPE, *base))
        elif member.isreg():
            entries.append(
                _Entry(
                    name,
                    tarfile.REGTYPE,
                    *base,
                    size=member.size,
                    link_key=name if name in linked else None,
                    source=_member_reader(tf, member),
                )
            )
        elif member.islnk():
            target = _normalize_member_name(member.linkname, tarball)
            origin = members[target]
            entries.append(
                _Entry(
                    name,
                    tarfile.REGTYPE,
                    origin.mode & 0o7777,
                    origin.uid,
                    origin.gid,
                    max(0, min(int(origin.mtime), epoch)),
                    size=origin.size,
                    link_key=target,
                    source=_member_reader(tf, origin),
                )
            )
        elif member.issym():
            entries.append(
                _Entry(name, tarfile.SYMTYPE, 0o777, *base[1:], linkname=member.linkname)
            )
        elif member.isfifo():
            entries.append(_Entry(name, tarfile.FIFOTYPE, *base))
    return entries


def _member_reader(tf: tarfile.TarFile, member: tarfile.TarInfo) -> Callable[[], IO[bytes]]:
    def open_member() -> IO[bytes]:
        reader = tf.extractfile(member)
        if reader is None:
            raise KilnError(f"tarball entry {member.name!r} has no content")
        return reader

    return open_member


# -- writing ----------------------------------------------------------------


class _GzipTarSink:
    """Receives tar bytes; hashes them (diff_id), gzips them and hashes the gzip (digest).

    Compression is the slow part, so the tar stream is cut into fixed 1 MiB
    blocks that threads deflate independently, each primed with the previous
    block's last 32 KiB and ended with a sync flush (pigz's scheme). The
    block boundaries depend only on the bytes, never on timing or the number
    of threads, so the output is as reproducible as a single-threaded gzip.
    """

    def __init__(self, out: IO[bytes], pool: ThreadPoolExecutor, depth: int) -> None:
        self._out = out
        self._pool = pool
        self._depth = depth
        self._pending: deque[Future[bytes]] = deque()
        self._raw = hashlib.sha256()
        self._packed = hashlib.sha256()
        self._crc = 0
        self._tail = b""
        self.raw_size = 0
        self.packed_size = 0
        self._buf = bytearray()
        self._emit(_GZIP_HEADER)

    def write(self, data: bytes | memoryview) -> None:
        self._buf += data
        while len(self._buf) >= _GZIP_BLOCK:
            block = bytes(self._buf[:_GZIP_BLOCK])
            del self._buf[:_GZIP_BLOCK]
            self._submit(block, final=False)

    def close(self) -> tuple[str, str]:
        self._submit(bytes(self._buf), final=True)
        self._buf = bytearray()
        while self._pending:
            self._emit(self._pending.popleft().result())
        self._emit(struct.pack("<II", self._crc & 0xFFFFFFFF, self.raw_size & 0xFFFFFFFF))
        return "sha256:" + self._raw.hexdigest(), "sha256:" + self._packed.hexdigest()

    def _submit(self, block: bytes, *, final: bool) -> None:
        self._raw.update(block)
        self._crc = zlib.crc32(block, self._crc)
        self.raw_size += len(block)
        self._pending.append(self._pool.submit(_deflate_block, block, self._tail, final))
        self._tail = block[-_GZIP_DICT:]
        while len(self._pending) > self._depth:
            self._emit(self._pending.popleft().result())

    def _emit(self, data: bytes) -> None:
        if data:
            self._packed.update(data)
            self.packed_size += len(data)
            self._out.write(data)


def _deflate_block(block: bytes, primer: bytes, final: bool) -> bytes:
    if primer:
        z = zlib_ng.compressobj(GZIP_LEVEL, zlib_ng.DEFLATED, -zlib_ng.MAX_WBITS, zdict=primer)
    else:
        z = zlib_ng.compressobj(GZIP_LEVEL, zlib_ng.DEFLATED, -zlib_ng.MAX_WBITS)
    return z.compress(block) + z.flush(zlib_ng.Z_FINISH if final else zlib_ng.Z_SYNC_FLUSH)


def _header(entry: _Entry) -> bytes:
    info = tarfile.TarInfo(entry.path)
    info.type = entry.type
    info.mode = entry.mode
    info.uid = entry.uid
    info.gid = entry.gid
    info.uname = ""
    info.gname = ""
    info.mtime = entry.mtime
    info.size = entry.size if entry.type == tarfile.REGTYPE else 0
    info.linkname = entry.linkname
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def _copy_content(
    entry: _Entry, sink: _GzipTarSink, what: str, cancelled: threading.Event | None = None
) -> None:
    source = entry.source
    try:
        reader: IO[bytes] | BinaryIO
        if isinstance(source, Path):
            reader = source.open("rb")
        elif source is not None:
            reader = source()
        else:
            raise KilnError(f"{what}: no content for {entry.path}")
        remaining = entry.size
        with reader:
            while remaining > 0:
                if cancelled is not None and cancelled.is_set():
                    raise Interrupted()
                chunk = reader.read(min(_CHUNK, remaining))
                if not chunk:
                    break
                sink.write(chunk)
                remaining -= len(chunk)
            grew = remaining == 0 and isinstance(source, Path) and reader.read(1)
    except OSError as e:
        raise KilnError(f"{what}: cannot read {entry.path}: {e}") from e
    if remaining or grew:
        raise KilnError(f"{what}: {entry.path} changed size while the layer was written")
    pad = -entry.size % _BLOCK
    if pad:
        sink.write(b"\0" * pad)


def _write_layer(
    entries: list[_Entry],
    store: ImageStore,
    what: str,
    cancelled: threading.Event | None = None,
) -> LayerResult:
    """Stream ``entries`` as a gzipped tar into the store.

    ``cancelled`` (the bake's Ctrl-C) stops it between entries; the temp
    file goes either way, so the store never holds part of a layer.
    """
    unique: dict[str, _Entry] = {}
    for entry in entries:
        unique[entry.path] = entry
    ordered = sorted(unique.values(), key=_Entry.sort_key)
    out, tmp = store.temp_file(".tar.gz")
    workers = max(1, min(4, os.cpu_count() or 1))
    try:
        with out, ThreadPoolExecutor(workers, thread_name_prefix="kiln-gzip") as pool:
            sink = _GzipTarSink(out, pool, 2 * workers)
            first_of: dict[object, str] = {}
            for entry in ordered:
                if cancelled is not None and cancelled.is_set():
                    raise Interrupted()
                if entry.link_key is not None:
                    first = first_of.get(entry.link_key)
                    if first is not None:
                        entry = _Entry(
                            entry.path,
                            tarfile.LNKTYPE,
                            entry.mode,
                            entry.uid,
                            entry.gid,
                            entry.mtime,
                            linkname=first,
                        )
                    else:
                        first_of[entry.link_key] = entry.path
                sink.write(_header(entry))
                if entry.type == tarfile.REGTYPE and entry.size:
                    _copy_content(entry, sink, what, cancelled)
            sink.write(b"\0" * (2 * _BLOCK))
            pad = -sink.raw_size % _RECORD
            if pad:
                sink.write(b"\0" * pad)
            diff_id, digest = sink.close()
            out.flush()
            os.fsync(out.fileno())
        descriptor = store.put_file(tmp, MEDIA_TYPE_LAYER_GZIP, move=True)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if descriptor.digest != digest:
        raise KilnError(f"{what}: layer changed on disk while it was stored ({digest})")
    return LayerResult(descriptor, diff_id, sink.raw_size, len(ordered))
