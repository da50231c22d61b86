"""Layer snapshots: every layer unpacked once, on its own, as one overlayfs lower dir.

Unpacking whole images made every app edit cost a full root filesystem
(seconds, ~150 MB). Instead, as containerd's overlay snapshotter does, each
layer is unpacked once into its own directory and an image's root filesystem
is an overlay of its layers' directories: an edit adds only the snapshots of
the layers it changed, and every image on the same base shares the base's.

A snapshot is named by the OCI chain id of its layer (chainID(L1) =
diffID(L1); chainID(Ln) = sha256(chainID(Ln-1) + " " + diffID(Ln))), not by
the layer alone, because its tree depends on the layers below: a parent
directory that the layer does not name takes their metadata. It holds
exactly that layer's diff, unpacked by the one safe extractor
(:mod:`kiln.image.unpack`): whiteouts become overlayfs whiteouts (a 0/0
character device, the xattr ``trusted.overlay.opaque=y``), owners are
shifted into the home's id range (:mod:`kiln.oci.idmap`) so a user namespace
sees the owners the image names, modes (setuid and setgid included: they
only reach ids of the range, and only from inside the namespace, since the
store is 0700) and mtimes are kept.

On disk (``$KILN_HOME/snapshots``, 0700)::

    <12 hex of the chain id>/   0700; a longer prefix when another chain holds that one
      chain.json                chain id, parent chain id, diff_id, layer digest, bytes
      manifest.json             every file of fs/ as published (kiln.image.file_manifest)
      fs/                       the layer's tree, owners shifted, image modes
    .locks/<chain hex>          flock per chain: exclusive while it is unpacked or removed,
                                shared while a bake has it mounted
    .new-<pid>-<random>/        an unpack in progress, renamed into place when complete
    .drifted-<random>/          a snapshot found changed, set aside for the instances still
                                on it until they are replaced (kiln.agent.drift)

Names stay short because overlayfs takes all lower dirs in one mount option
string of at most a page: 40 layers under ``/root/.kiln`` take ~1.4 KiB.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import stat
import uuid
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.errors import KilnError
from kiln.image.base import BaseLayer, kiln_image_base
from kiln.image.digest import canonical_json, check_digest, is_digest
from kiln.image.store import ImageStore
from kiln.image.unpack import apply_stored_layer
from kiln.oci.idmap import IdRange, id_range
from kiln.process import pid_alive

__all__ = [
    "DRIFTED_PREFIX",
    "SNAPSHOTS_DIR",
    "HeldSnapshots",
    "SnapshotStore",
    "SnapshotUsage",
    "chain_ids",
    "image_chains",
    "image_layers",
    "remove_legacy_trees",
    "shift_tree",
]

SNAPSHOTS_DIR = "snapshots"
_CHAIN_FILE = "chain.json"
_FS = "fs"
_LOCKS = ".locks"
_STAGING_PREFIX = ".new-"
DRIFTED_PREFIX = ".drifted-"
_NAME_LENGTHS = (12, 16, 24, 32, 64)
# What Kiln kept before snapshots: whole unpacked images for instances, merged base
# trees for bakes. Both were caches; they are removed when found.
_LEGACY_TREES = ("rootfs", "cache/trees")


def chain_ids(diff_ids: Sequence[str]) -> list[str]:
    """The OCI chain id of every prefix of ``diff_ids``, bottom first."""
    chains: list[str] = []
    for diff_id in diff_ids:
        check_digest(diff_id)
        if chains:
            text = f"{chains[-1]} {diff_id}".encode()
            chains.append("sha256:" + hashlib.sha256(text).hexdigest())
        else:
            chains.append(diff_id)
    return chains


def image_layers(store: ImageStore, image_digest: str) -> list[BaseLayer]:
    """The layers of a stored image with the diff_ids its config claims, bottom first."""
    label = f"image {image_digest[:19]}…"
    layers = kiln_image_base(store, label, image_digest).layers
    return [
        BaseLayer(
            layer.descriptor,
            layer.diff_id,
            f"layer {number} ({layer.descriptor.digest[:19]}…) of {label}",
        )
        for number, layer in enumerate(layers, start=1)
    ]


def image_chains(store: ImageStore) -> set[str]:
    """Every chain id of every image reachable from the store's ``index.json``."""
    chains: set[str] = set()
    seen: set[str] = set()
    stack = [entry.digest for entry in store.index_entries()]
    while stack:
        digest = stack.pop()
        if digest in seen or not store.has(digest):
            continue
        seen.add(digest)
        try:
            document = store.read_json(digest)
        except KilnError:
            continue
        nested = document.get("manifests")
        if isinstance(nested, list):
            stack.extend(str(m["digest"]) for m in nested if isinstance(m, dict) and "digest" in m)
            continue
        with contextlib.suppress(KilnError):
            chains.update(chain_ids([layer.diff_id for layer in image_layers(store, digest)]))
    return chains


@dataclass(frozen=True)
class SnapshotUsage:
    snapshots: int
    bytes: int


class HeldSnapshots:
    """Layer dirs each held with a shared lock, so gc leaves them alone until :meth:`release`."""

    def __init__(self, paths: tuple[Path, ...], fds: list[int]) -> None:
        self.paths = paths
        self._fds = fds

    def release(self) -> None:
        while self._fds:
            os.close(self._fds.pop())

    def detach(self) -> list[int]:
        """The locked descriptors, now the caller's to pass on (to a shim) and close."""
        fds, self._fds = self._fds, []
        return fds


class SnapshotStore:
    """``$KILN_HOME/snapshots``: one read-only unpacked tree per layer chain.

    Snapshots are written once (unpacked into a temp dir, then renamed) and
    never written again; instances and bakes only ever mount them as
    overlayfs lower dirs. Unpacking needs root (whiteouts are device nodes,
    owners are shifted).
    """

    def __init__(self, home: Path, ids: IdRange | None = None) -> None:
        self.home = Path(home)
        self.root = self.home / SNAPSHOTS_DIR
        self._ids = ids

    @property
    def ids(self) -> IdRange:
        if self._ids is None:
            self._ids = id_range(self.home)
        return self._ids

    # -- lookups -----------------------------------------------------------

    def find(self, chain_id: str) -> Path | None:
        """The published snapshot dir of ``chain_id`` (holding ``fs``), or None."""
        for path in self._candidates(chain_id):
            if _chain_of(path) == chain_id:
                return path
        return None

    def snapshots(self) -> dict[Path, str | None]:
        """Every published snapshot dir and its chain id (None when its record is unreadable)."""
        if not self.root.is_dir():
            return {}
        return {
            path: _chain_of(path)
            for path in sorted(self.root.iterdir())
            if not path.name.startswith(".")
        }

    def usage(self) -> SnapshotUsage:
        published = [path for path, chain in self.snapshots().items() if chain is not None]
        return SnapshotUsage(len(published), sum(_recorded_bytes(path) for path in published))

    # -- making ------------------------------------------------------------

    def layers_for(self, image_store: ImageStore, image_digest: str) -> tuple[Path, ...]:
        """The ``fs`` dirs of an image's layers, bottom first; missing ones are unpacked."""
        return self.ensure(image_store, image_layers(image_store, image_digest))

    def ensure(self, image_store: ImageStore, layers: Sequence[BaseLayer]) -> tuple[Path, ...]:
        """The ``fs`` dirs of ``layers`` (a whole chain, bottom first), unpacking the missing."""
        paths: list[Path] = []
        chains = chain_ids([layer.diff_id for layer in layers])
        for index, (chain, layer) in enumerate(zip(chains, layers, strict=True)):
            found = self.find(chain)
            if found is None:
                fd, found = self._ready(image_store, chains, index, layer, paths)
                os.close(fd)
            paths.append(found / _FS)
        return tuple(paths)

    def hold(self, image_store: ImageStore, layers: Sequence[BaseLayer]) -> HeldSnapshots:
        """As :meth:`ensure`, with every snapshot held until the result is released."""
        paths: list[Path] = []
        fds: list[int] = []
        chains = chain_ids([layer.diff_id for layer in layers])
        try:
            for index, layer in enumerate(layers):
                fd, found = self._ready(image_store, chains, index, layer, paths)
                fds.append(fd)
                paths.append(found / _FS)
        except BaseException:
            HeldSnapshots((), fds).release()
            raise
        return HeldSnapshots(tuple(paths), fds)

    def hold_dirs(self, layers: Sequence[Path]) -> HeldSnapshots:
        """Hold the snapshots of ``layers`` (``fs`` dirs from :meth:`layers_for`, e.g. an
        ``InstanceSpec.layers``) for as long as they are mounted, so gc leaves them alone
        even if their image is removed; KilnError if one is already gone."""
        fds: list[int] = []
        try:
            for fs in layers:
                chain = _chain_of(Path(fs).parent)
                if chain is None:
                    raise KilnError(f"{fs} is not a layer snapshot of {self.root}")
                fd = self._lock(chain, fcntl.LOCK_SH)
                fds.append(fd)
                if self.find(chain) != Path(fs).parent:
                    raise KilnError(f"layer snapshot {fs} was removed")
        except BaseException:
            HeldSnapshots((), fds).release()
            raise
        return HeldSnapshots(tuple(Path(fs) for fs in layers), fds)

    def adopt(self, tree: Path, layer: BaseLayer) -> Path | None:
        """Move ``tree``, a bottom layer already unpacked with real owners (mmdebstrap's),
        in as that layer's snapshot, shifting its owners; returns the ``fs`` dir.

        None when ``tree`` lies on another filesystem: then it stays where it
        is and the snapshot is unpacked from the layer when it is needed. The
        owners are shifted only once the tree is inside the 0700 store, so no
        setuid file of the range is ever reachable from outside.
        """
        chain = layer.diff_id
        fd = self._lock(chain, fcntl.LOCK_EX)
        try:
            found = self.find(chain)
            if found is not None:
                return found / _FS
            staging = self._staging()
            try:
                os.rename(tree, staging / _FS)
            except OSError:
                shutil.rmtree(staging, ignore_errors=True)
                return None
            try:
                size = shift_tree(staging / _FS, self.ids, f"{layer.source} (unpacked tree)")
                return self._publish(staging, chain, None, layer, size) / _FS
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
        finally:
            os.close(fd)

    def _ready(
        self,
        image_store: ImageStore,
        chains: Sequence[str],
        index: int,
        layer: BaseLayer,
        below: Sequence[Path],
    ) -> tuple[int, Path]:
        """A shared lock on ``chains[index]`` and its snapshot dir, unpacked first if missing.

        The lock is taken before looking, so a snapshot found is one gc cannot
        remove while it is held; an unpack holds it exclusively.
        """
        chain = chains[index]
        while True:
            fd = self._lock(chain, fcntl.LOCK_SH)
            found = self.find(chain)
            if found is not None:
                return fd, found
            os.close(fd)
            fd = self._lock(chain, fcntl.LOCK_EX)
            try:
                if self.find(chain) is None:
                    self._unpack(image_store, chains, index, layer, below)
            finally:
                os.close(fd)

    def _unpack(
        self,
        image_store: ImageStore,
        chains: Sequence[str],
        index: int,
        layer: BaseLayer,
        below: Sequence[Path],
        *,
        from_blob: bool = False,
    ) -> Path:
        staging = self._staging()
        try:
            fs = staging / _FS
            size = self._copy_shared_base(layer, fs) if index == 0 and not from_blob else None
            if size is None:
                fs.mkdir(mode=0o755)
                size = apply_stored_layer(
                    image_store,
                    layer.descriptor,
                    fs,
                    source=layer.source,
                    diff_id=layer.diff_id,
                    ids=self.ids,
                    whiteouts="overlay",
                    lowers=tuple(reversed(below)),
                )
            parent = chains[index - 1] if index else None
            return self._publish(staging, chains[index], parent, layer, size)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def _copy_shared_base(self, layer: BaseLayer, fs: Path) -> int | None:
        """A bottom layer that is a shared Debian base (:mod:`kiln.image.basecache`):
        its tree copied (``cp -a``, a fraction of unpacking the layer) into the 0700
        staging dir, then its owners shifted. None when there is no such tree (or it
        cannot be used): then the layer is unpacked."""
        from kiln.image.basecache import base_cache, copy_tree

        cache = base_cache() if os.geteuid() == 0 else None
        key = cache.base_with_layer(layer.diff_id) if cache is not None else None
        if cache is None or key is None:
            return None
        try:
            with cache.lock(f"base-{key[:32]}", exclusive=False):
                found = cache.base(key)
                if found is None or found.layer.diff_id != layer.diff_id:
                    return None
                copy_tree(found.fs, fs)
            return shift_tree(fs, self.ids, f"{layer.source} (shared base {found.path})")
        except (KilnError, OSError):
            if os.path.lexists(fs):
                shutil.rmtree(fs, ignore_errors=True)
            return None

    def _staging(self) -> Path:
        _private_dir(self.root)
        path = self.root / f"{_STAGING_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        _private_dir(path)
        return path

    def _publish(
        self, staging: Path, chain: str, parent: str | None, layer: BaseLayer, size: int
    ) -> Path:
        record = {
            "chain_id": chain,
            "parent": parent,
            "diff_id": layer.diff_id,
            "digest": layer.descriptor.digest,
            "bytes": size,
        }
        from kiln.image.file_manifest import record_manifest, write_manifest

        write_manifest(staging, record_manifest(staging / _FS))
        (staging / _CHAIN_FILE).write_bytes(canonical_json(record))
        for candidate in self._candidates(chain):
            if os.path.lexists(candidate):
                continue  # another chain's snapshot under the same prefix
            try:
                os.rename(staging, candidate)
            except OSError:
                if os.path.lexists(candidate):
                    continue
                raise
            return candidate
        raise KilnError(f"no free snapshot name for {chain} in {self.root}")

    # -- drift -------------------------------------------------------------

    def rebuild(self, image_store: ImageStore, chain: str) -> tuple[Path, Path | None]:
        """Discard the snapshot of ``chain`` (found changed) for a new one unpacked from
        its blob, which is re-hashed against its digest first; returns the new snapshot
        dir and where the old one was set aside (None if there was none).

        The old tree is renamed, not removed: the instances mounted on it keep running
        until they are replaced, and :meth:`remove_drifted` removes it after. The new
        tree is made in staging and swapped in with two renames, so a start meanwhile
        finds one or the other. No chain lock is taken: the shims of the instances on
        the old tree hold it shared until they stop.
        """
        layers = self._layers_of(image_store, chain)
        chains = chain_ids([layer.diff_id for layer in layers])
        below: list[Path] = []
        for index, parent_chain in enumerate(chains[:-1]):
            found = self.find(parent_chain)
            if found is None:
                found = self._unpack(image_store, chains, index, layers[index], below)
            below.append(found / _FS)
        layer = layers[-1]
        _verify_blob(image_store, layer)
        staging_parent = self._staging()
        try:
            new = self._unpack(image_store, chains, len(layers) - 1, layer, below, from_blob=True)
            os.rename(new, staging_parent / "new")
            old = self.find(chain)
            aside: Path | None = None
            if old is not None:
                aside = self.root / f"{DRIFTED_PREFIX}{uuid.uuid4().hex[:12]}"
                os.rename(old, aside)
            placed = self._publish_existing(staging_parent / "new", chain)
        finally:
            shutil.rmtree(staging_parent, ignore_errors=True)
        return placed, aside

    def drifted(self) -> list[Path]:
        """Snapshots set aside by :meth:`rebuild`, not yet removed."""
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if p.name.startswith(DRIFTED_PREFIX))

    def remove_drifted(self, keep: Collection[Path]) -> int:
        """Remove every set-aside snapshot but those in ``keep`` (an instance still runs on
        them); returns how many."""
        removed = 0
        for path in self.drifted():
            if path in keep:
                continue
            shutil.rmtree(path, ignore_errors=True)
            removed += 1
        return removed

    def _publish_existing(self, made: Path, chain: str) -> Path:
        for candidate in self._candidates(chain):
            if os.path.lexists(candidate):
                if _chain_of(candidate) == chain:
                    shutil.rmtree(made, ignore_errors=True)
                    return candidate  # a start unpacked it meanwhile
                continue
            os.rename(made, candidate)
            return candidate
        raise KilnError(f"no free snapshot name for {chain} in {self.root}")

    def _layers_of(self, image_store: ImageStore, chain: str) -> list[BaseLayer]:
        """The layers, bottom first, of an image in the store whose chain ends at ``chain``."""
        check_digest(chain)
        for entry in image_store.index_entries():
            stack = [entry.digest]
            while stack:
                digest = stack.pop()
                if not image_store.has(digest):
                    continue
                try:
                    document = image_store.read_json(digest)
                    nested = document.get("manifests")
                    if isinstance(nested, list):
                        stack.extend(str(m.get("digest")) for m in nested if isinstance(m, dict))
                        continue
                    layers = image_layers(image_store, digest)
                except KilnError:
                    continue
                chains = chain_ids([layer.diff_id for layer in layers])
                if chain in chains:
                    return layers[: chains.index(chain) + 1]
        raise KilnError(f"no stored image has layer chain {chain}: cannot rebuild its snapshot")

    # -- removing ----------------------------------------------------------

    def remove_unreferenced(self, keep_chains: Collection[str]) -> int:
        """Remove every snapshot whose chain is not in ``keep_chains`` and that nobody holds.

        Also sweeps unpacks of dead processes and stale lock files. Returns
        the bytes freed.
        """
        freed = 0
        for path, chain in self.snapshots().items():
            if chain is None:
                freed += _tree_bytes(path)
                shutil.rmtree(path, ignore_errors=True)
                continue
            if chain in keep_chains:
                continue
            fd = self._try_lock(chain)
            if fd is None:
                continue  # mounted by a bake, or being unpacked
            try:
                if _chain_of(path) == chain:
                    freed += _recorded_bytes(path)
                    shutil.rmtree(path, ignore_errors=True)
                    self._unlink_lock(chain, fd)
            finally:
                os.close(fd)
        return freed + self.sweep_staging() + self._sweep_locks()

    def sweep_staging(self) -> int:
        """Remove the unpacks of processes that died; returns the bytes freed."""
        freed = 0
        if not self.root.is_dir():
            return freed
        for path in self.root.iterdir():
            if not path.name.startswith(_STAGING_PREFIX):
                continue
            try:
                pid = int(path.name[len(_STAGING_PREFIX) :].split("-")[0])
            except ValueError:
                continue
            if not pid_alive(pid):
                freed += _tree_bytes(path)
                shutil.rmtree(path, ignore_errors=True)
        return freed

    def _sweep_locks(self) -> int:
        """Remove the lock files of chains that have no snapshot and that nobody holds."""
        locks = self.root / _LOCKS
        if not locks.is_dir():
            return 0
        for lock in locks.iterdir():
            chain = "sha256:" + lock.name
            if not is_digest(chain) or self.find(chain) is not None:
                continue
            fd = self._try_lock(chain)
            if fd is not None:
                try:
                    if self.find(chain) is None:
                        self._unlink_lock(chain, fd)
                finally:
                    os.close(fd)
        return 0

    # -- locks -------------------------------------------------------------

    def _lock_path(self, chain: str) -> Path:
        return self.root / _LOCKS / check_digest(chain).removeprefix("sha256:")

    def _open_lock(self, chain: str) -> int:
        path = self._lock_path(chain)
        _private_dir(self.root)
        _private_dir(path.parent)
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def _lock(self, chain: str, operation: int) -> int:
        """An fd holding ``operation`` on the chain's lock file.

        gc unlinks a lock file while holding it, so a lock taken on a file
        that is no longer the one at the path is dropped and taken again.
        """
        while True:
            fd = self._open_lock(chain)
            fcntl.flock(fd, operation)
            if self._still_linked(chain, fd):
                return fd
            os.close(fd)

    def _try_lock(self, chain: str) -> int | None:
        fd = self._open_lock(chain)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return None
        if not self._still_linked(chain, fd):
            os.close(fd)
            return None
        return fd

    def _still_linked(self, chain: str, fd: int) -> bool:
        try:
            return os.stat(self._lock_path(chain)).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def _unlink_lock(self, chain: str, fd: int) -> None:
        if self._still_linked(chain, fd):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._lock_path(chain))

    def _candidates(self, chain: str) -> Iterator[Path]:
        hex_part = check_digest(chain).removeprefix("sha256:")
        for length in _NAME_LENGTHS:
            yield self.root / hex_part[:length]


def shift_tree(root: Path, ids: IdRange, source: str) -> int:
    """Shift the owner of ``root`` and of everything under it into ``ids``, in place.

    For trees written by host root with real ids (mmdebstrap's). Modes are
    set again after each ``chown``, which clears setuid and setgid. Returns
    the bytes of regular files (each inode once).
    """
    seen: set[int] = set()
    total = 0
    for path, st in _walk(Path(root)):
        if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
            if st.st_ino in seen:
                continue  # another name of a file already shifted
            seen.add(st.st_ino)
        for what, value in (("uid", st.st_uid), ("gid", st.st_gid)):
            if not 0 <= value < ids.size:
                rel = path.relative_to(root).as_posix()
                raise KilnError(
                    f"{source}: entry {rel!r}: {what} {value} is outside the {ids.size} ids "
                    f"a Kiln sandbox maps (0-{ids.size - 1})"
                )
        os.chown(path, ids.to_host(st.st_uid), ids.to_host(st.st_gid), follow_symlinks=False)
        if not stat.S_ISLNK(st.st_mode):
            os.chmod(path, stat.S_IMODE(st.st_mode))
        if stat.S_ISREG(st.st_mode):
            total += st.st_size
    return total


def remove_legacy_trees(home: Path, names: Sequence[str] = _LEGACY_TREES) -> int:
    """Remove what Kiln kept before snapshots (``rootfs/``, ``cache/trees/``); bytes freed."""
    freed = 0
    for name in names:
        path = Path(home) / name
        if path.is_dir() and not path.is_symlink():
            freed += _tree_bytes(path)
            shutil.rmtree(path, ignore_errors=True)
    return freed


def _verify_blob(image_store: ImageStore, layer: BaseLayer) -> None:
    """The layer's blob hashes to its digest, checked before anything is unpacked from it."""
    digest = hashlib.sha256()
    with image_store.open_blob(layer.descriptor.digest) as blob:
        while chunk := blob.read(1024 * 1024):
            digest.update(chunk)
    found = "sha256:" + digest.hexdigest()
    if found != layer.descriptor.digest:
        raise KilnError(f"{layer.source}: blob content hashes to {found}; the store is damaged")


def _private_dir(path: Path) -> None:
    """``path`` as a 0700 directory (its parent must exist, or is made as ``mkdir -p`` does)."""
    if path.is_dir():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        return
    os.chmod(path, 0o700)  # whatever the umask took


def _walk(root: Path) -> Iterator[tuple[Path, os.stat_result]]:
    """``root`` and everything under it, parents first, never following symlinks."""
    yield root, os.lstat(root)
    stack = [root]
    while stack:
        current = stack.pop()
        with os.scandir(current) as entries:
            for entry in entries:
                st = entry.stat(follow_symlinks=False)
                path = Path(entry.path)
                yield path, st
                if stat.S_ISDIR(st.st_mode):
                    stack.append(path)


def _tree_bytes(root: Path) -> int:
    seen: set[int] = set()
    total = 0
    with contextlib.suppress(OSError):
        for _path, st in _walk(root):
            if stat.S_ISREG(st.st_mode) and st.st_ino not in seen:
                seen.add(st.st_ino)
                total += st.st_size
    return total


def _read_record(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((path / _CHAIN_FILE).read_bytes())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _chain_of(path: Path) -> str | None:
    record = _read_record(path)
    chain = record.get("chain_id") if record is not None else None
    return chain if isinstance(chain, str) and is_digest(chain) else None


def _recorded_bytes(path: Path) -> int:
    record = _read_record(path)
    size = record.get("bytes") if record is not None else None
    return size if isinstance(size, int) else _tree_bytes(path)
