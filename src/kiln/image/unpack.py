"""The one extraction path in Kiln: layers are hostile input until proven otherwise.

Every entry is checked before it touches the disk. Paths must stay inside
``dest`` (no absolute names, no ``..``); every parent component must be a real
directory inside ``dest`` (checked with ``lstat``, never followed), so nothing
is ever written through a symlink; symlink targets may be absolute (they are
rootfs-relative, as Debian uses them) but may not climb above the root;
hardlinks must point at something already extracted; device nodes are
refused; sizes are bounded. Whiteouts (``.wh.NAME``) and opaque directories
(``.wh..wh..opq``) hide what lower layers put there.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
import subprocess
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO, cast

from kiln.errors import KilnError
from kiln.image.digest import (
    DOCKER_MEDIA_TYPE_LAYER_GZIP,
    MEDIA_TYPE_LAYER_GZIP,
    MEDIA_TYPE_LAYER_TAR,
    Descriptor,
)
from kiln.image.store import ImageStore

MAX_ENTRY_SIZE = 64 << 30
_CHUNK = 1 << 20
_WHITEOUT = ".wh."
_OPAQUE = ".wh..wh..opq"
_LAYER_TYPES = {
    MEDIA_TYPE_LAYER_GZIP,
    MEDIA_TYPE_LAYER_TAR,
    DOCKER_MEDIA_TYPE_LAYER_GZIP,
    "application/vnd.docker.image.rootfs.diff.tar",
}


def image_layers(store: ImageStore, ref: str) -> list[str]:
    """The layer digests of ``ref``, bottom first: what a seed tree must share."""
    manifest = store.read_json(store.resolve(ref).digest)
    return [str(layer["digest"]) for layer in manifest.get("layers", [])]


def clone_command(seed: Path, dest: Path) -> list[str]:
    """Hard-linked copy: files are shared, directories are new."""
    return ["cp", "-a", "--link", "--no-target-directory", str(seed), str(dest)]


def unpack_image(
    store: ImageStore, ref: str, dest: Path, *, seed: Path | None = None, seed_layers: int = 0
) -> None:
    """Extract every layer of ``ref`` into ``dest``, which must not exist yet.

    The tree is built in a temp dir beside ``dest`` and renamed into place,
    so a failure (hostile entry, corrupt blob, full disk) leaves nothing.
    Each layer's bytes are checked against its digest as they stream.

    ``seed`` is an already unpacked tree of the first ``seed_layers`` layers
    (a previous image of the same recipe): it is cloned with hard links and
    only the remaining layers are applied. That is safe because applying a
    layer never writes into an existing file — it removes the path first.
    """
    dest = Path(dest).absolute()
    descriptor = store.resolve(ref)
    manifest = store.read_json(descriptor.digest)
    try:
        layers = [Descriptor.from_json(layer) for layer in manifest.get("layers", [])]
    except (KilnError, TypeError, AttributeError) as e:
        raise KilnError(f"manifest of {ref} has malformed layers: {e}") from e
    if dest.exists() or dest.is_symlink():
        raise KilnError(f"cannot unpack {ref}: {dest} already exists")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.unpack-"))
    try:
        os.chmod(tmp, 0o755)
        if seed is not None and seed_layers > 0:
            os.rmdir(tmp)
            done = subprocess.run(clone_command(seed, tmp), capture_output=True, text=True)
            if done.returncode != 0:
                raise KilnError(f"cannot clone {seed} for {ref}: {done.stderr.strip()}")
        for number, layer in enumerate(layers, start=1):
            if number <= seed_layers and seed is not None:
                continue
            source = f"layer {number} ({layer.digest[:19]}…) of {ref}"
            if layer.media_type not in _LAYER_TYPES:
                raise KilnError(f"{source}: unsupported media type {layer.media_type}")
            with store.open_blob(layer.digest) as blob:
                reader = _DigestReader(blob)
                apply_layer(cast(BinaryIO, reader), tmp, source=source)
                reader.drain()
            if reader.digest() != layer.digest:
                raise KilnError(f"{source}: blob content hashes to {reader.digest()}")
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def apply_layer(fileobj: BinaryIO, dest: Path, *, source: str = "layer") -> None:
    """Apply one layer (gzip or plain tar, by magic) on top of the tree at ``dest``.

    Raises KilnError naming ``source`` and the entry for anything unsafe; the
    caller owns cleanup of ``dest`` (see :func:`unpack_image`).
    """
    dest = Path(dest).absolute()
    if not dest.is_dir() or dest.is_symlink():
        raise KilnError(f"{source}: destination {dest} is not a directory")
    applier = _LayerApplier(dest, source)
    try:
        with tarfile.open(fileobj=fileobj, mode="r|*") as tf:
            for member in tf:
                applier.apply(member, tf)
    except (tarfile.TarError, EOFError, zlib.error) as e:
        raise KilnError(f"{source}: not a valid tar archive: {e}") from e
    except OSError as e:
        raise KilnError(f"{source}: extraction failed: {e}") from e
    applier.finish()


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


class _LayerApplier:
    def __init__(self, dest: Path, source: str) -> None:
        self.dest = dest
        self.source = source
        self.as_root = os.geteuid() == 0
        self.written: set[tuple[str, ...]] = set()
        self.dirs: list[_DirMeta] = []
        self.budget = shutil.disk_usage(dest).free
        self.used = 0

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
        if name == _OPAQUE:
            self._make_opaque(parts[:-1])
            return
        if name.startswith(_WHITEOUT):
            hidden = (*parts[:-1], name[len(_WHITEOUT) :])
            if hidden not in self.written and name != _WHITEOUT:
                _remove(parent / hidden[-1])
            return
        path = parent / name
        if member.isdir():
            existing = _lstat(path)
            if existing is None or not stat.S_ISDIR(existing.st_mode):
                _remove(path)
                os.mkdir(path, 0o700)
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
                os.mkdir(current, 0o755)
            elif stat.S_ISLNK(st.st_mode):
                raise self.fail(
                    member,
                    f"parent {'/'.join(parts[:depth])} is a symlink; refusing to write through it",
                )
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
        target = self._parent(parts[:-1], member, create=False) / parts[-1]
        st = _lstat(target)
        if st is None:
            raise self.fail(member, f"hardlink target {member.linkname!r} does not exist")
        if stat.S_ISDIR(st.st_mode):
            raise self.fail(member, f"hardlink target {member.linkname!r} is a directory")
        return target

    # -- writes --------------------------------------------------------------

    def _write_file(self, path: Path, member: tarfile.TarInfo, tf: tarfile.TarFile) -> None:
        if member.size > MAX_ENTRY_SIZE:
            raise self.fail(member, f"size {member.size} exceeds the {MAX_ENTRY_SIZE} byte limit")
        self.used += member.size
        if self.used > self.budget:
            raise self.fail(
                member, f"layer needs more than the {self.budget} bytes free at {self.dest}"
            )
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
            uid, gid, mode, mtime = self._meta_tuple(member)
            if self.as_root:
                os.fchown(fd, uid, gid)
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

    @staticmethod
    def _meta_tuple(member: tarfile.TarInfo) -> tuple[int, int, int, int]:
        return member.uid, member.gid, member.mode & 0o7777, max(0, int(member.mtime))

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
