"""The machine's shared Debian bases: each minimal tree built once, kept as a pulled image is.

mmdebstrap takes 15–35 s to build a suite's minimal base, and every new
``KILN_HOME`` and every new package list used to pay it. Here the minimal
base of a suite (no recipe packages) is kept once per machine, keyed by its
suite, architecture, variant and exact package versions, together with its
layer; so is every packages layer installed over one, keyed by that base and
the exact packages. A bake in any home takes both from here, copies the
layer blobs into its own store and gives the same digests as a bake that
built everything itself.

On disk (``$KILN_BASE_CACHE``, default ``/var/cache/kiln/bases``; 0700, root's)::

    base-<32 hex of the key>/   0700, one minimal base
      record.json               suite, architecture, variant, merged /usr, epoch, packages
                                (name → version), its layer, and a digest of the tree's listing
      layer.tar.gz              its layer blob, as an image store holds it
      fs/                       the tree, real owners: mmdebstrap's, settled as its layer unpacks
    layer-<32 hex of the key>/  0700, a packages layer over one base
      record.json, layer.tar.gz
    current-<suite>-<arch>-<epoch>  the key of the base a new lock starts from (a pulled tag)
    .locks/<name>               flock: exclusive while a base is made or removed, shared while used
    .new-<pid>-<random>/        something being made: renamed into place whole, removed when
                                its bake died, so the cache never shows a partial tree

Trees keep their real owners: a bake reads one only as root (the packages
install runs over it in a chroot, as mmdebstrap's own install does), and a
home's sandboxes never see it: the home's snapshot of the base layer is a
copy with its owners shifted into that home's id range
(:meth:`kiln.image.snapshots.SnapshotStore.ensure`), so homes with different
id ranges share one tree. Everything is checked before use (record, listing
digest, dpkg's status against the record, blob size; the blob's hash when a
home's store copies it); an entry that fails is treated as absent and made
again. Removing the whole directory is always safe while no bake runs.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import stat
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.errors import KilnError
from kiln.image.command import Interrupted
from kiln.image.digest import MEDIA_TYPE_LAYER_GZIP, Descriptor, canonical_json, sha256_hex
from kiln.image.layer import GZIP_IMPLEMENTATION
from kiln.process import pid_alive

__all__ = [
    "BASE_CACHE_ENV",
    "DEFAULT_BASE_CACHE",
    "BaseCache",
    "SharedBase",
    "SharedLayer",
    "base_cache",
    "tree_listing_digest",
]

BASE_CACHE_ENV = "KILN_BASE_CACHE"
DEFAULT_BASE_CACHE = Path("/var/cache/kiln/bases")
DISABLED = frozenset({"", "off", "none", "no", "0"})
FORMAT = 1
_RECORD = "record.json"
_BLOB = "layer.tar.gz"
_FS = "fs"
_LOCKS = ".locks"
_NEW = ".new-"
_POLL = 0.05


def base_cache() -> BaseCache | None:
    """The machine's shared bases (``$KILN_BASE_CACHE``, default
    ``/var/cache/kiln/bases``), or None when switched off (set to ``off`` or empty)."""
    value = os.environ.get(BASE_CACHE_ENV)
    if value is None:
        return BaseCache(DEFAULT_BASE_CACHE)
    if value.strip().lower() in DISABLED:
        return None
    return BaseCache(Path(value).absolute())


@dataclass(frozen=True)
class SharedLayer:
    """A layer blob kept in the cache, with what an image's manifest and config need."""

    digest: str
    diff_id: str
    size: int
    size_uncompressed: int
    blob: Path

    @property
    def descriptor(self) -> Descriptor:
        return Descriptor(MEDIA_TYPE_LAYER_GZIP, self.digest, self.size)

    def to_json(self) -> dict[str, Any]:
        return {
            "digest": self.digest,
            "diff_id": self.diff_id,
            "size": self.size,
            "size_uncompressed": self.size_uncompressed,
        }


@dataclass(frozen=True)
class SharedBase:
    key: str
    path: Path
    packages: dict[str, str]
    layer: SharedLayer
    record: dict[str, Any]

    @property
    def fs(self) -> Path:
        return self.path / _FS


def tree_listing_digest(root: Path) -> str:
    """A digest of every path under ``root`` with its type, mode, owners, size (files),
    mtime and link target: a tree changed, cut short or half removed no longer matches."""
    h = hashlib.sha256()
    entries: list[tuple[bytes, bytes]] = []
    stack = [Path(root)]
    while stack:
        current = stack.pop()
        with os.scandir(current) as listing:
            for entry in listing:
                st = entry.stat(follow_symlinks=False)
                name = os.path.relpath(entry.path, root).encode("utf-8", "surrogateescape")
                size = st.st_size if stat.S_ISREG(st.st_mode) else 0
                link = os.readlink(entry.path) if stat.S_ISLNK(st.st_mode) else ""
                line = f"{st.st_mode:o} {st.st_uid} {st.st_gid} {size} {st.st_mtime_ns} {link}"
                entries.append((name, line.encode("utf-8", "surrogateescape")))
                if stat.S_ISDIR(st.st_mode):
                    stack.append(Path(entry.path))
    for path_bytes, line_bytes in sorted(entries):
        h.update(path_bytes + b"\0" + line_bytes + b"\n")
    return "sha256:" + h.hexdigest()


class BaseCache:
    """One directory of shared bases and packages layers (see the module docs)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    # -- keys ----------------------------------------------------------------

    @staticmethod
    def base_key(
        suite: str,
        architecture: str,
        variant: str,
        merged_usr_hook: bool,
        epoch: int,
        packages: Mapping[str, str],
    ) -> str:
        return sha256_hex(
            canonical_json(
                {
                    "kind": "debian-base",
                    "format": FORMAT,
                    "gzip": GZIP_IMPLEMENTATION,
                    "suite": suite,
                    "architecture": architecture,
                    "variant": variant,
                    "merged_usr_hook": merged_usr_hook,
                    "epoch": epoch,
                    "packages": dict(sorted(packages.items())),
                }
            )
        )

    @staticmethod
    def layer_key(
        base_diff_id: str, install: Mapping[str, str], requested: tuple[str, ...], epoch: int
    ) -> str:
        return sha256_hex(
            canonical_json(
                {
                    "kind": "debian-packages",
                    "format": FORMAT,
                    "gzip": GZIP_IMPLEMENTATION,
                    "base": base_diff_id,
                    "install": dict(sorted(install.items())),
                    "requested": list(requested),
                    "epoch": epoch,
                }
            )
        )

    # -- bases -----------------------------------------------------------------

    def base(self, key: str) -> SharedBase | None:
        """The base of ``key`` if it is there and whole; None otherwise (never partial)."""
        path = self.root / f"base-{key[:32]}"
        record = _read_record(path)
        if record is None or record.get("key") != key or record.get("kind") != "debian-base":
            return None
        try:
            packages = {str(k): str(v) for k, v in dict(record["packages"]).items()}
            layer = _layer_of(record, path)
            listing = str(record["tree"])
        except (KeyError, TypeError, ValueError):
            return None
        fs = path / _FS
        if not fs.is_dir() or fs.is_symlink():
            return None
        from kiln.image.debian import installed_packages

        if installed_packages(fs) != packages:
            return None
        if tree_listing_digest(fs) != listing:
            return None
        return SharedBase(key, path, packages, layer, record)

    def bases(self) -> list[str]:
        """The keys of every base the cache holds (unverified)."""
        keys: list[str] = []
        if not self.root.is_dir():
            return keys
        for path in sorted(self.root.glob("base-*")):
            record = _read_record(path)
            if record is not None and isinstance(record.get("key"), str):
                keys.append(str(record["key"]))
        return keys

    def records(self) -> dict[str, dict[str, Any]]:
        """Every base's record by key (unverified): for picking candidates."""
        found: dict[str, dict[str, Any]] = {}
        if not self.root.is_dir():
            return found
        for path in sorted(self.root.glob("base-*")):
            record = _read_record(path)
            if record is not None and isinstance(record.get("key"), str):
                found[str(record["key"])] = record
        return found

    def base_with_layer(self, diff_id: str) -> str | None:
        """The key of a base whose layer is ``diff_id`` (unverified), if any."""
        for key, record in self.records().items():
            layer = record.get("layer")
            if isinstance(layer, dict) and layer.get("diff_id") == diff_id:
                return key
        return None

    def publish_base(
        self,
        staging: Path,
        key: str,
        tree: Path,
        blob: Path,
        layer: Mapping[str, Any],
        facts: Mapping[str, Any],
        packages: Mapping[str, str],
    ) -> SharedBase:
        """Move a finished base into place whole; the caller holds ``key``'s exclusive lock.

        ``staging`` comes from :meth:`staging`; ``tree`` (moved, or copied when
        it lies on another filesystem) and ``blob`` (copied) go into it, and the
        directory is renamed into place last. An entry already there is kept
        when it verifies, replaced when it does not.
        """
        existing = self.base(key)
        if existing is not None:
            return existing
        fs = staging / _FS
        _move_tree(tree, fs)
        shutil.copyfile(blob, staging / _BLOB)
        record = {
            **facts,
            "kind": "debian-base",
            "format": FORMAT,
            "key": key,
            "packages": dict(sorted(packages.items())),
            "layer": dict(layer),
            "tree": tree_listing_digest(fs),
        }
        (staging / _RECORD).write_bytes(canonical_json(record))
        final = self.root / f"base-{key[:32]}"
        self._replace(staging, final)
        found = self.base(key)
        if found is None:
            raise KilnError(f"{final}: the shared base did not verify after it was written")
        return found

    # -- packages layers ---------------------------------------------------------

    def layer(self, key: str) -> SharedLayer | None:
        path = self.root / f"layer-{key[:32]}"
        record = _read_record(path)
        if record is None or record.get("key") != key or record.get("kind") != "debian-packages":
            return None
        try:
            return _layer_of(record, path)
        except (KeyError, TypeError, ValueError):
            return None

    def publish_layer(
        self, staging: Path, key: str, blob: Path, layer: Mapping[str, Any]
    ) -> SharedLayer:
        existing = self.layer(key)
        if existing is not None:
            return existing
        shutil.copyfile(blob, staging / _BLOB)
        record = {"kind": "debian-packages", "format": FORMAT, "key": key, "layer": dict(layer)}
        (staging / _RECORD).write_bytes(canonical_json(record))
        final = self.root / f"layer-{key[:32]}"
        self._replace(staging, final)
        found = self.layer(key)
        if found is None:
            raise KilnError(f"{final}: the shared layer did not verify after it was written")
        return found

    def discard(self, kind: str, key: str) -> None:
        """Remove an entry that failed a check (the caller holds its exclusive lock)."""
        path = self.root / f"{kind}-{key[:32]}"
        if os.path.lexists(path):
            trash = self._new_path()
            with contextlib.suppress(OSError):
                os.rename(path, trash)
                shutil.rmtree(trash, ignore_errors=True)

    # -- the base new locks start from ----------------------------------------------

    def current(self, suite: str, architecture: str, epoch: int) -> str | None:
        try:
            data = json.loads(self._current_path(suite, architecture, epoch).read_bytes())
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or data.get("gzip") != GZIP_IMPLEMENTATION:
            # A pointer written before the compressor was part of the keys names a base
            # whose layers another compressor made: a new lock must not start from it.
            return None
        key = data.get("key")
        return key if isinstance(key, str) else None

    def set_current(self, suite: str, architecture: str, epoch: int, key: str) -> None:
        path = self._current_path(suite, architecture, epoch)
        self._ensure_root()
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
        tmp.write_bytes(canonical_json({"key": key, "gzip": GZIP_IMPLEMENTATION}))
        os.replace(tmp, path)

    def _current_path(self, suite: str, architecture: str, epoch: int) -> Path:
        return self.root / f"current-{suite}-{architecture}-{epoch}"

    # -- staging and locks ---------------------------------------------------------

    @contextlib.contextmanager
    def staging(self) -> Iterator[Path]:
        """A private directory to assemble an entry in; removed unless it was published."""
        path = self._new_path()
        path.mkdir(mode=0o700)
        try:
            yield path
        finally:
            if path.exists():
                shutil.rmtree(path, ignore_errors=True)

    @contextlib.contextmanager
    def lock(
        self, name: str, *, exclusive: bool, cancelled: threading.Event | None = None
    ) -> Iterator[None]:
        """Hold ``name``'s lock; waiting for it gives way to Ctrl-C (``cancelled``)."""
        self._ensure_root()
        locks = self.root / _LOCKS
        locks.mkdir(mode=0o700, exist_ok=True)
        fd = os.open(locks / name, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            operation = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
            while True:
                try:
                    fcntl.flock(fd, operation | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if cancelled is not None and cancelled.is_set():
                        raise Interrupted() from None
                    time.sleep(_POLL)
            yield
        finally:
            os.close(fd)

    def sweep(self) -> None:
        """Remove what bakes that died were making."""
        if not self.root.is_dir():
            return
        for path in self.root.iterdir():
            if not path.name.startswith(_NEW):
                continue
            try:
                pid = int(path.name[len(_NEW) :].split("-")[0])
            except ValueError:
                continue
            if pid != os.getpid() and not pid_alive(pid):
                shutil.rmtree(path, ignore_errors=True)

    def _ensure_root(self) -> None:
        if self.root.is_dir():
            return
        self.root.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            os.mkdir(self.root, 0o700)
        os.chmod(self.root, 0o700)

    def _new_path(self) -> Path:
        self._ensure_root()
        return self.root / f"{_NEW}{os.getpid()}-{uuid.uuid4().hex[:8]}"

    def _replace(self, staging: Path, final: Path) -> None:
        if os.path.lexists(final):
            self.discard(final.name.split("-", 1)[0], final.name.split("-", 1)[1])
        os.chmod(staging, 0o700)
        os.rename(staging, final)


def _read_record(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((path / _RECORD).read_bytes())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _layer_of(record: Mapping[str, Any], path: Path) -> SharedLayer:
    layer = record["layer"]
    blob = path / _BLOB
    shared = SharedLayer(
        str(layer["digest"]),
        str(layer["diff_id"]),
        int(layer["size"]),
        int(layer["size_uncompressed"]),
        blob,
    )
    if not blob.is_file() or blob.stat().st_size != shared.size:
        raise ValueError("blob missing or cut short")
    return shared


def _move_tree(tree: Path, dest: Path) -> None:
    """Rename ``tree`` to ``dest``; across filesystems, copy it whole and remove it."""
    try:
        os.rename(tree, dest)
        return
    except OSError:
        pass
    copy_tree(tree, dest)
    shutil.rmtree(tree, ignore_errors=True)


def copy_tree(source: Path, dest: Path) -> None:
    """``cp -a``: owners, modes (setuid too), mtimes and hard links as they are."""
    done = subprocess.run(
        ["cp", "-a", "--no-target-directory", str(source), str(dest)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise KilnError(f"cannot copy {source} to {dest}: {done.stderr.strip()}")
