"""The layer cache: which layer a step produced, keyed by everything the layer depends on.

A key is the sha256 of the canonical JSON of the parent layers' diff_ids,
the step in canonical form (including the env and workdir a ``run`` step
sees, and the epoch its timestamps are clamped to) and, for a ``copy`` step,
every source file's relative path, normalised mode and content hash. Two
bakes that agree on all of that would write the same layer, so the second
one skips the step without touching the filesystem.

An entry only points at blobs in the image store; if ``gc`` removed one,
the entry is a miss, never an error.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.errors import KilnError
from kiln.image.digest import Descriptor, canonical_json, sha256_hex
from kiln.image.store import ImageStore
from kiln.paths import private_dirs

_CHUNK = 1 << 20


@dataclass(frozen=True)
class CachedLayer:
    """The outcome of a step: a layer, or ``None`` when the step changed nothing."""

    descriptor: Descriptor | None
    diff_id: str | None
    size_uncompressed: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "layer": self.descriptor.to_json() if self.descriptor else None,
            "diff_id": self.diff_id,
            "size_uncompressed": self.size_uncompressed,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CachedLayer:
        layer = data.get("layer")
        descriptor = Descriptor.from_json(layer) if isinstance(layer, dict) else None
        diff_id = data.get("diff_id")
        return cls(
            descriptor,
            str(diff_id) if descriptor and diff_id else None,
            int(data.get("size_uncompressed", 0)),
        )


def step_key(parent_diff_ids: Sequence[str], step: Mapping[str, Any]) -> str:
    from kiln.image.layer import GZIP_IMPLEMENTATION

    return sha256_hex(
        canonical_json(
            {"parents": list(parent_diff_ids), "step": dict(step), "gzip": GZIP_IMPLEMENTATION}
        )
    )


def _write_atomic(path: Path, data: bytes) -> None:
    private_dirs(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


class LayerCache:
    """``$KILN_HOME/cache/layers``: one small JSON file per key."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str, store: ImageStore) -> CachedLayer | None:
        try:
            entry = CachedLayer.from_json(json.loads(self._path(key).read_bytes()))
        except (OSError, ValueError, TypeError, KeyError, KilnError):
            return None
        if entry.descriptor is not None and not store.has(entry.descriptor.digest):
            return None
        return entry

    def put(self, key: str, entry: CachedLayer) -> None:
        _write_atomic(self._path(key), canonical_json(entry.to_json()))

    def digests(self) -> set[str]:
        """Every blob the cache points at, for ``ImageStore.gc(keep=…)``."""
        out: set[str] = set()
        for path in self.root.glob("*/*.json"):
            with contextlib.suppress(OSError, ValueError, TypeError, KeyError, KilnError):
                entry = CachedLayer.from_json(json.loads(path.read_bytes()))
                if entry.descriptor is not None:
                    out.add(entry.descriptor.digest)
        return out


class FileHashCache:
    """sha256 of files, remembered by (size, mtime_ns, inode) so unchanged trees hash nothing.

    One JSON file per project directory under ``$KILN_HOME/cache/files``;
    loaded on first use, written back by :meth:`save` only when it changed.
    """

    def __init__(self, root: Path, project: Path) -> None:
        self.path = Path(root) / f"{sha256_hex(str(project).encode())[:32]}.json"
        self._lock = threading.Lock()
        self._entries: dict[str, list[Any]] | None = None
        self._dirty = False
        self.hashed = 0

    def _load(self) -> dict[str, list[Any]]:
        if self._entries is None:
            try:
                data = json.loads(self.path.read_bytes())
                self._entries = data if isinstance(data, dict) else {}
            except (OSError, ValueError):
                self._entries = {}
        return self._entries

    def sha256(self, path: Path, st: os.stat_result) -> str:
        fingerprint = [st.st_size, st.st_mtime_ns, st.st_ino]
        name = str(path)
        with self._lock:
            known = self._load().get(name)
            if known is not None and known[:3] == fingerprint:
                return str(known[3])
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        digest = h.hexdigest()
        with self._lock:
            self._load()[name] = [*fingerprint, digest]
            self._dirty = True
            self.hashed += 1
        return digest

    def save(self) -> None:
        with self._lock:
            if self._dirty and self._entries is not None:
                _write_atomic(self.path, canonical_json(self._entries))
                self._dirty = False


def normalized_mode(st: os.stat_result) -> int:
    """The mode a copied entry gets in the image: umask and checkout state play no part."""
    if stat.S_ISDIR(st.st_mode) or st.st_mode & 0o100:
        return 0o755
    return 0o644
