"""The one extraction path in Kiln: layers are hostile input until proven otherwise.

Every entry is checked before it touches the disk. Paths must stay inside
``dest`` (no absolute names, no ``..``); every parent component must be a real
directory inside ``dest`` (checked with ``lstat``, never followed), so nothing
is ever written through a symlink; symlink targets may be absolute (they are
rootfs-relative, as Debian uses them) but may not climb above the root;
hardlinks must point at something already extracted; device nodes are
refused; sizes are bounded; a whiteout must name an entry, never ``.`` or
``..``.

A layer lands in one of two ways. Applied (``whiteouts="apply"``) on top of
the layers below it, whiteouts (``.wh.NAME``) and opaque directories
(``.wh..wh..opq``) remove what lower layers put there. Unpacked alone as one
overlayfs lower dir (``whiteouts="overlay"``, the layer snapshots of
:mod:`kiln.image.snapshots`), they are recorded as overlayfs records them: a
0/0 character device named like the hidden entry, and the xattr
``trusted.overlay.opaque=y``. ``ids`` shifts every owner into a home's id
range, so a user namespace sees the owners the layer names.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
import tarfile
import tempfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO, Literal, cast

from kiln.errors import KilnError
from kiln.image.digest import (
    DOCKER_MEDIA_TYPE_LAYER_GZIP,
    MEDIA_TYPE_LAYER_GZIP,
    MEDIA_TYPE_LAYER_TAR,
    Descriptor,
)
from kiln.image.store import ImageStore
from kiln.oci.idmap import IdRange

MAX_ENTRY_SIZE = 64 << 30
OPAQUE_XATTR = "trusted.overlay.opaque"
WhiteoutMode = Literal["apply", "overlay"]
_CHUNK = 1 << 20
_WHITEOUT = ".wh."
_OPAQUE = ".wh..wh..opq"
_GZIP_MAGIC = b"\x1f\x8b"
_LAYER_TYPES = {
    MEDIA_TYPE_LAYER_GZIP,
    MEDIA_TYPE_LAYER_TAR,
    DOCKER_MEDIA_TYPE_LAYER_GZIP,
    "application/vnd.docker.image.rootfs.diff.tar",
}


def unpack_image(store: ImageStore, ref: str, dest: Path) -> None:
    """Extract every layer of ``ref`` into ``dest``, which must not exist yet.

    The tree is built in a temp dir beside ``dest`` and renamed into place,
    so a failure (hostile entry, corrupt blob, full disk) leaves nothing.
    Each layer's bytes are checked against its digest and its diff_id as
    they stream.
    """
    from kiln.image.base import kiln_image_base

    dest = Path(dest).absolute()
    descriptor = store.resolve(ref)
    layers = kiln_image_base(store, ref, descriptor.digest).layers
    if dest.exists() or dest.is_symlink():
        raise KilnError(f"cannot unpack {ref}: {dest} already exists")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.unpack-"))
    try:
        os.chmod(tmp, 0o755)
        for number, layer in enumerate(layers, start=1):
            source = f"layer {number} ({layer.descriptor.digest[:19]}…) of {ref}"
            apply_stored_layer(store, layer.descriptor, tmp, source=source, diff_id=layer.diff_id)
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def apply_stored_layer(
    store: ImageStore,
    layer: Descriptor,
    dest: Path,
    *,
    source: str,
    diff_id: str | None = None,
    ids: IdRange | None = None,
    whiteouts: WhiteoutMode = "apply",
    lowers: Sequence[Path] = (),
) -> int:
    """Apply the blob ``layer`` from ``store`` to ``dest``; returns the bytes of files written.

    The blob is hashed as it streams and must match its digest; with
    ``diff_id`` the uncompressed tar must match that too — a snapshot is
    named by the diff_ids an image's config claims, so a claim is checked
    before anything is published under it. Options as :func:`apply_layer`.
    """
    if layer.media_type not in _LAYER_TYPES:
        raise KilnError(f"{source}: unsupported media type {layer.media_type}")
    with store.open_blob(layer.digest) as blob:
        packed = _DigestReader(blob)
        plain = _TarStream(cast(BinaryIO, packed), source)
        written = _apply_tar(
            cast(BinaryIO, plain), dest, source, "r|", ids=ids, whiteouts=whiteouts, lowers=lowers
        )
        plain.drain()
        packed.drain()
    if packed.digest() != layer.digest:
        raise KilnError(f"{source}: blob content hashes to {packed.digest()}")
    if diff_id is not None and plain.digest() != diff_id:
        raise KilnError(
            f"{source}: its tar hashes to {plain.digest()}, but the image config says {diff_id}"
        )
    return written


def apply_layer(
    fileobj: BinaryIO,
    dest: Path,
    *,
    source: str = "layer",
    ids: IdRange | None = None,
    whiteouts: WhiteoutMode = "apply",
    lowers: Sequence[Path] = (),
) -> int:
    """Apply one layer (gzip or plain tar, by magic) to the tree at ``dest``.

    ``ids`` shifts every owner into that range (refusing owners outside it);
    ``whiteouts="overlay"`` records whiteouts and opaque directories as
    overlayfs does instead of removing anything, for a layer unpacked alone
    into an empty ``dest``; ``lowers`` are the lower dirs below it, top first:
    a parent directory the layer does not name takes its metadata from them,
    as it would on the merged tree. Both need root. Returns the bytes of
    files written.

    Raises KilnError naming ``source`` and the entry for anything unsafe; the
    caller owns cleanup of ``dest`` (see :func:`unpack_image`).
    """
    return _apply_tar(fileobj, dest, source, "r|*", ids=ids, whiteouts=whiteouts, lowers=lowers)


def _apply_tar(
    fileobj: BinaryIO,
    dest: Path,
    source: str,
    mode: Literal["r|", "r|*"],
    *,
    ids: IdRange | None,
    whiteouts: WhiteoutMode,
    lowers: Sequence[Path],
) -> int:
    dest = Path(dest).absolute()
    if not dest.is_dir() or dest.is_symlink():
        raise KilnError(f"{source}: destination {dest} is not a directory")
    if (ids is not None or whiteouts == "overlay") and os.geteuid() != 0:
        raise KilnError(f"{source}: shifting owners and recording whiteouts need root")
    applier = _LayerApplier(dest, source, ids=ids, overlay=whiteouts == "overlay", lowers=lowers)
    try:
        with tarfile.open(fileobj=fileobj, mode=mode) as tf:
            for member in tf:
                applier.apply(member, tf)
    except (tarfile.TarError, EOFError, zlib.error) as e:
        raise KilnError(f"{source}: not a valid tar archive: {e}") from e
    except OSError as e:
        raise KilnError(f"{source}: extraction failed: {e}") from e
    applier.finish()
    return applier.used


@dataclass(frozen=True)
class _DirMeta:
    parts: tuple[str, ...]
    mode: int
    uid: int
    gid: int
    mtime: int


class _DigestReader:
    """Hashes a blob as tarfile streams it, so a corrupt layer is caught on the way in."""

    def __init__(self, inner: BinaryIO) -> None:
        self._inner = inner
        self._hash = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self._inner.read(size)
        self._hash.update(data)
        return data

    def drain(self) -> None:
        while self.read(_CHUNK):
            pass

    def digest(self) -> str:
        return "sha256:" + self._hash.hexdigest()


class _TarStream:
    """The tar inside a layer blob (gzip or plain, by magic), hashed as it is read: its diff_id.

    Inflates at most a chunk per input read, so a gzip bomb costs time
    bounded by the entry size limits, never memory.
    """

    def __init__(self, inner: BinaryIO, source: str) -> None:
        self._inner = inner
        self._source = source
        self._hash = hashlib.sha256()
        self._buffer = bytearray(inner.read(len(_GZIP_MAGIC)))
        self._inflate: zlib._Decompress | None = None
        if bytes(self._buffer) == _GZIP_MAGIC:
            self._inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
            self._pending = bytes(self._buffer)
            self._buffer = bytearray()
        else:
            self._pending = b""
        self._ended = False

    def read(self, size: int = -1) -> bytes:
        while (size < 0 or len(self._buffer) < size) and not self._ended:
            self._ended = not self._more()
        take = len(self._buffer) if size < 0 else min(size, len(self._buffer))
        data = bytes(self._buffer[:take])
        del self._buffer[:take]
        self._hash.update(data)
        return data

    def _more(self) -> bool:
        """Adds some bytes to the buffer; False at the end of the blob."""
        if self._inflate is None:
            chunk = self._inner.read(_CHUNK)
            self._buffer += chunk
            return bool(chunk)
        if self._inflate.eof:
            data = self._inflate.unused_data or self._inner.read(_CHUNK)
            if not data:
                return False
            self._inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)  # a further gzip member
        else:
            data = self._pending or self._inflate.unconsumed_tail or self._inner.read(_CHUNK)
            self._pending = b""
            if not data:
                raise zlib.error("the gzip stream ends early")
        self._buffer += self._inflate.decompress(data, _CHUNK)
        return True

    def drain(self) -> None:
        try:
            while self.read(_CHUNK):
                pass
        except zlib.error as e:
            raise KilnError(f"{self._source}: not a valid tar archive: {e}") from e

    def digest(self) -> str:
        return "sha256:" + self._hash.hexdigest()


class _LayerApplier:
    def __init__(
        self,
        dest: Path,
        source: str,
        *,
        ids: IdRange | None = None,
        overlay: bool = False,
        lowers: Sequence[Path] = (),
    ) -> None:
        self.dest = dest
        self.source = source
        self.ids = ids
        self.overlay = overlay
        self.lowers = tuple(lowers)
        self.as_root = os.geteuid() == 0
        self.written: set[tuple[str, ...]] = set()
        self.hidden: set[tuple[str, ...]] = set()
        self.dirs: list[_DirMeta] = []
        self.inherited: list[tuple[tuple[str, ...], int, int]] = []
        self.touched: dict[tuple[str, ...], tuple[int, int]] = {}
        self.budget = shutil.disk_usage(dest).free
        self.used = 0
        if overlay:
            self._inherit(dest, ())

    def fail(self, member: tarfile.TarInfo, why: str) -> KilnError:
        return KilnError(f"{self.source}: entry {member.name!r}: {why}")

    def apply(self, member: tarfile.TarInfo, tf: tarfile.TarFile) -> None:
        parts = self._clean(member.name, member, "path")
        if not parts:
            if member.isdir():
                self.dirs.append(_DirMeta((), *self._meta(member)))
            return
        name = parts[-1]
        parent = self._parent(parts[:-1], member, create=True)
        self._touch(tuple(parts[:-1]), parent)
        if name == _OPAQUE:
            if self.overlay:
                _mark_opaque(parent)
            else:
                self._make_opaque(parts[:-1])
            return
        if name.startswith(_WHITEOUT):
            self._whiteout(parent, parts, member)
            return
        path = parent / name
        if member.isdir():
            existing = _lstat(path)
            if existing is None or not stat.S_ISDIR(existing.st_mode):
                _remove(path)
                os.mkdir(path, 0o700)
                if tuple(parts) in self.hidden:
                    _mark_opaque(path)  # it replaces, not merges with, what lies below
            self.dirs.append(_DirMeta(tuple(parts), *self._meta(member)))
        elif member.isreg():
            self._write_file(path, member, tf)
        elif member.issym():
            self._check_symlink(parts, member)
            _remove(path)
            os.symlink(member.linkname, path)
            self._set_meta(path, member, is_link=True)
        elif member.islnk():
            target = self._hardlink_target(member)
            if target != path:
                _remove(path)
                os.link(target, path, follow_symlinks=False)
        elif member.isfifo():
            _remove(path)
            os.mkfifo(path, 0o600)
            self._set_meta(path, member)
        elif member.ischr() or member.isblk():
            raise self.fail(member, "device nodes are not allowed in Kiln images")
        else:
            raise self.fail(member, f"unsupported entry type {member.type!r}")
        self.written.add(tuple(parts))

    def finish(self) -> None:
        # A directory the layer does not name keeps its times although entries were added
        # to or removed from it (applied: the tree's own; unpacked alone: those of the
        # layers below, which it stands for), as the merged tree shows it. The layer's own
        # directory entries, set after these, win.
        for parts, (atime_ns, mtime_ns) in self.touched.items():
            with contextlib.suppress(KilnError, OSError):
                parent = self._walk_existing(parts[:-1]) if parts else None
                path = parent / parts[-1] if parent is not None else self.dest
                os.utime(path, ns=(atime_ns, mtime_ns), follow_symlinks=False)
        for parts, atime_ns, mtime_ns in self.inherited:
            with contextlib.suppress(KilnError, OSError):
                parent = self._walk_existing(parts[:-1]) if parts else None
                path = parent / parts[-1] if parent is not None else self.dest
                os.utime(path, ns=(atime_ns, mtime_ns), follow_symlinks=False)
        for meta in sorted(self.dirs, key=lambda m: len(m.parts), reverse=True):
            with contextlib.suppress(KilnError):
                parent = self._walk_existing(meta.parts[:-1]) if meta.parts else None
                path = parent / meta.parts[-1] if parent is not None else self.dest
                try:
                    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
                except OSError:
                    continue
                try:
                    if self.as_root:
                        os.fchown(fd, meta.uid, meta.gid)
                    os.fchmod(fd, meta.mode)
                    os.utime(fd, ns=(meta.mtime * 1_000_000_000, meta.mtime * 1_000_000_000))
                finally:
                    os.close(fd)

    # -- checks --------------------------------------------------------------

    def _clean(self, name: str, member: tarfile.TarInfo, what: str) -> list[str]:
        if name.startswith("/"):
            raise self.fail(member, f"absolute {what} is not allowed")
        parts = [p for p in name.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise self.fail(member, f"{what} contains '..' and could escape the root")
        if any("\0" in p for p in parts):
            raise self.fail(member, f"{what} contains a NUL byte")
        return parts

    def _parent(self, parts: list[str], member: tarfile.TarInfo, *, create: bool) -> Path:
        """The real directory ``dest/parts``; symlinks and files on the way are refused."""
        current = self.dest
        for depth, part in enumerate(parts, start=1):
            current = current / part
            st = _lstat(current)
            if st is None:
                if not create:
                    raise self.fail(member, f"{'/'.join(parts[:depth])} does not exist")
                self._touch(tuple(parts[: depth - 1]), current.parent)
                os.mkdir(current, 0o755)
                self._inherit(current, tuple(parts[:depth]))
            elif stat.S_ISLNK(st.st_mode):
                raise self.fail(
                    member,
                    f"parent {'/'.join(parts[:depth])} is a symlink; refusing to write through it",
                )
            elif tuple(parts[:depth]) in self.hidden and stat.S_ISCHR(st.st_mode):
                os.unlink(current)  # this layer's own whiteout, now a new directory
                os.mkdir(current, 0o755)
                self._new_dir(current)
                _mark_opaque(current)
            elif not stat.S_ISDIR(st.st_mode):
                raise self.fail(member, f"parent {'/'.join(parts[:depth])} is not a directory")
        return current

    def _walk_existing(self, parts: tuple[str, ...]) -> Path:
        current = self.dest
        for part in parts:
            current = current / part
            st = _lstat(current)
            if st is None or not stat.S_ISDIR(st.st_mode):
                raise KilnError(f"{self.source}: {current} is no longer a directory")
        return current

    def _check_symlink(self, parts: list[str], member: tarfile.TarInfo) -> None:
        target = member.linkname
        if not target or "\0" in target:
            raise self.fail(member, "symlink has an empty or invalid target")
        depth = 0 if target.startswith("/") else len(parts) - 1
        for part in target.split("/"):
            if part in ("", "."):
                continue
            depth = depth - 1 if part == ".." else depth + 1
            if depth < 0:
                raise self.fail(member, f"symlink target {target!r} escapes the root")

    def _hardlink_target(self, member: tarfile.TarInfo) -> Path:
        parts = self._clean(member.linkname, member, "hardlink target")
        if not parts:
            raise self.fail(member, "hardlink target is the root")
        if self.overlay and tuple(parts) not in self.written:
            raise self.fail(
                member,
                f"hardlink target {member.linkname!r} is not in this layer "
                "(a layer snapshot can only link within its own layer)",
            )
        target = self._parent(parts[:-1], member, create=False) / parts[-1]
        st = _lstat(target)
        if st is None:
            raise self.fail(member, f"hardlink target {member.linkname!r} does not exist")
        if stat.S_ISDIR(st.st_mode):
            raise self.fail(member, f"hardlink target {member.linkname!r} is a directory")
        return target

    # -- writes --------------------------------------------------------------

    def _whiteout(self, parent: Path, parts: list[str], member: tarfile.TarInfo) -> None:
        """``.wh.NAME``: hide NAME of the layers below (never one this layer wrote)."""
        name = parts[-1][len(_WHITEOUT) :]
        if name in ("", ".", ".."):
            raise self.fail(member, "whiteout names no entry; it would hide a directory itself")
        hidden = (*parts[:-1], name)
        path = parent / name
        if hidden in self.written:
            existing = _lstat(path)
            if self.overlay and existing is not None and stat.S_ISDIR(existing.st_mode):
                _mark_opaque(path)
            return
        _remove(path)
        if self.overlay:
            os.mknod(path, stat.S_IFCHR, os.makedev(0, 0))
            os.chown(path, *self._root_ids(), follow_symlinks=False)
            self.hidden.add(hidden)

    def _write_file(self, path: Path, member: tarfile.TarInfo, tf: tarfile.TarFile) -> None:
        if member.size > MAX_ENTRY_SIZE:
            raise self.fail(member, f"size {member.size} exceeds the {MAX_ENTRY_SIZE} byte limit")
        self.used += member.size
        if self.used > self.budget:
            raise self.fail(
                member, f"layer needs more than the {self.budget} bytes free at {self.dest}"
            )
        uid, gid, mode, mtime = self._meta_tuple(member)
        _remove(path)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(path, flags, 0o600)
        try:
            reader: IO[bytes] | None = tf.extractfile(member)
            if reader is not None:
                remaining = member.size
                while remaining > 0:
                    chunk = reader.read(min(_CHUNK, remaining))
                    if not chunk:
                        raise self.fail(member, "archive ends inside the file")
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view) :]
                    remaining -= len(chunk)
            if self.as_root:
                os.fchown(fd, uid, gid)  # before the mode: chown clears setuid and setgid
            os.fchmod(fd, mode)
            os.utime(fd, ns=(mtime * 1_000_000_000, mtime * 1_000_000_000))
        finally:
            os.close(fd)

    def _set_meta(self, path: Path, member: tarfile.TarInfo, *, is_link: bool = False) -> None:
        uid, gid, mode, mtime = self._meta_tuple(member)
        if self.as_root:
            os.chown(path, uid, gid, follow_symlinks=False)
        if not is_link:
            os.chmod(path, mode)
        ns = mtime * 1_000_000_000
        os.utime(path, ns=(ns, ns), follow_symlinks=False)

    def _meta(self, member: tarfile.TarInfo) -> tuple[int, int, int, int]:
        uid, gid, mode, mtime = self._meta_tuple(member)
        return mode, uid, gid, mtime

    def _meta_tuple(self, member: tarfile.TarInfo) -> tuple[int, int, int, int]:
        uid, gid = member.uid, member.gid
        if self.ids is not None:
            for what, value in (("uid", uid), ("gid", gid)):
                if not 0 <= value < self.ids.size:
                    raise self.fail(
                        member,
                        f"{what} {value} is outside the {self.ids.size} ids a Kiln sandbox maps "
                        f"(0-{self.ids.size - 1})",
                    )
            uid, gid = self.ids.to_host(uid), self.ids.to_host(gid)
        return uid, gid, member.mode & 0o7777, max(0, int(member.mtime))

    def _touch(self, parts: tuple[str, ...], path: Path) -> None:
        """Remember the times of a directory this layer is about to change (applied only)."""
        if self.overlay or parts in self.touched:
            return
        st = _lstat(path)
        if st is not None and stat.S_ISDIR(st.st_mode):
            self.touched[parts] = (st.st_atime_ns, st.st_mtime_ns)

    def _root_ids(self) -> tuple[int, int]:
        root = self.ids.to_host(0) if self.ids is not None else 0
        return root, root

    def _inherit(self, path: Path, parts: tuple[str, ...]) -> None:
        """Metadata of a directory the layer needs but does not name.

        Applied, it is new: root's, mode 0755. Unpacked alone, it stands for
        the directory of the layers below (whose metadata the merged tree
        would show, as containerd's ``mkparent`` does), else a new one.
        """
        below = _lower_dir(self.lowers, parts) if self.overlay else None
        if below is None:
            self._new_dir(path)
            return
        os.chown(path, below.st_uid, below.st_gid, follow_symlinks=False)
        os.chmod(path, stat.S_IMODE(below.st_mode))
        os.utime(path, ns=(below.st_atime_ns, below.st_mtime_ns), follow_symlinks=False)
        self.inherited.append((parts, below.st_atime_ns, below.st_mtime_ns))

    def _new_dir(self, path: Path) -> None:
        if self.ids is not None:
            os.chown(path, *self._root_ids(), follow_symlinks=False)
        os.chmod(path, 0o755)

    def _make_opaque(self, parts: list[str]) -> None:
        """Hide everything under ``parts`` that this layer did not itself write."""
        stack = [tuple(parts)]
        while stack:
            rel = stack.pop()
            here = self.dest.joinpath(*rel)
            st = _lstat(here)
            if st is None or not stat.S_ISDIR(st.st_mode):
                continue
            for child in os.listdir(here):
                child_rel = (*rel, child)
                if child_rel in self.written:
                    stack.append(child_rel)
                else:
                    _remove(here / child)


def _lower_dir(lowers: Sequence[Path], parts: tuple[str, ...]) -> os.stat_result | None:
    """The directory ``parts`` as overlayfs would merge it from ``lowers`` (top first), or None.

    Looked up one component at a time, as overlayfs does: a whiteout or a
    non-directory ends the search below it, and so does an opaque directory.
    """
    layers = [Path(lower) for lower in lowers]
    for part in parts:
        found: list[Path] = []
        for layer in layers:
            path = layer / part
            st = _lstat(path)
            if st is None:
                continue
            if not stat.S_ISDIR(st.st_mode):
                break  # a whiteout or a file: nothing of this name below it
            found.append(path)
            if _is_opaque(path):
                break
        if not found:
            return None
        layers = found
    return _lstat(layers[0]) if layers else None


def _is_opaque(path: Path) -> bool:
    try:
        return os.getxattr(path, OPAQUE_XATTR, follow_symlinks=False) == b"y"
    except OSError:
        return False


def _mark_opaque(path: Path) -> None:
    os.setxattr(path, OPAQUE_XATTR, b"y", follow_symlinks=False)


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def _remove(path: Path) -> None:
    st = _lstat(path)
    if st is None:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)
