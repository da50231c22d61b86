"""Reads of the home's store that the SBOM and the secret scan share: a layer's tar
stream, hashed as it goes; a per-layer result cache (the home's, and the machine's for
layers every home shares); the newest referrer's JSON."""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tarfile
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, cast

from kiln.errors import KilnError
from kiln.image.digest import Descriptor
from kiln.image.store import ImageStore
from kiln.paths import private_dirs

__all__ = [
    "SHARED_CACHE_DIR",
    "cache_layer_result",
    "layer_tar",
    "newest_referrer_document",
    "read_shared_result",
    "shared_cache_dir",
    "write_shared_result",
]

SHARED_CACHE_DIR = "supply"
"""Under the machine's shared base cache (``/var/cache/kiln/bases/supply``): per-layer
results that every home's bake of the same base would otherwise compute again."""
MAX_SHARED_RESULT_BYTES = 64 << 20


@contextlib.contextmanager
def layer_tar(store: ImageStore, layer: Descriptor, source: str) -> Iterator[tarfile.TarFile]:
    """The layer blob as a streamed tar archive, read to its end and checked against its
    digest once the caller is done (a tampered blob fails); a broken archive is one
    KilnError naming ``source``."""
    from kiln.image.unpack import _DigestReader, _TarStream

    with store.open_blob(layer.digest) as blob:
        packed = _DigestReader(blob)
        plain = _TarStream(cast(BinaryIO, packed), source)
        try:
            with tarfile.open(fileobj=cast(BinaryIO, plain), mode="r|") as tf:
                yield tf
                plain.drain()
                packed.drain()
        except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
            raise KilnError(f"{source}: not a valid tar archive: {e}") from e
    if packed.digest() != layer.digest:
        raise KilnError(f"{source}: blob content hashes to {packed.digest()}")


def cache_layer_result(cache_dir: Path, name: str, result: Any) -> None:
    """Keep ``result`` as ``cache_dir/name``, written whole or not at all; a cache that
    cannot be written only costs a re-read next time."""
    with contextlib.suppress(OSError):
        private_dirs(cache_dir)
        tmp = cache_dir / f".{name}.{uuid.uuid4().hex}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(json.dumps(result, separators=(",", ":")).encode())
        os.replace(tmp, cache_dir / name)


def shared_cache_dir(kind: str) -> Path | None:
    """``<shared base cache>/supply/<kind>``, or None when the shared cache is off."""
    from kiln.image.basecache import base_cache

    cache = base_cache()
    return cache.root / SHARED_CACHE_DIR / kind if cache is not None else None


def _private_to_us(st: os.stat_result, directory: bool) -> bool:
    """Made by this user and writable by no one else: what a trusted entry must be."""
    kind_ok = stat.S_ISDIR(st.st_mode) if directory else stat.S_ISREG(st.st_mode)
    return kind_ok and st.st_uid == os.geteuid() and not st.st_mode & 0o022


def _trusted_chain(cache_dir: Path) -> bool:
    """The directories from the shared cache's root down to ``cache_dir`` are this user's,
    real directories (no symlink), writable by no one else; the missing ones are made
    one level at a time (0700), so none is made through a planted symlink."""
    chain = (cache_dir.parent.parent, cache_dir.parent, cache_dir)
    private_dirs(chain[0])
    for directory in chain:
        with contextlib.suppress(FileExistsError):
            os.mkdir(directory, 0o700)
        if not _private_to_us(os.lstat(directory), directory=True):
            return False
    return True


def write_shared_result(cache_dir: Path, name: str, result: Any) -> None:
    """Keep ``result`` in the machine's shared cache as :func:`cache_layer_result` does,
    only where :func:`read_shared_result` would trust it: a directory someone else made,
    or a symlink planted in its place, is never written through."""
    with contextlib.suppress(OSError):
        if _trusted_chain(cache_dir):
            cache_layer_result(cache_dir, name, result)


def read_shared_result(cache_dir: Path, name: str) -> Any | None:
    """The JSON of ``cache_dir/name`` from the machine's shared cache, or None unless both
    the directory chain below the cache and the file are this user's and writable by no
    one else, and the file is a regular file reached without a symlink: another user (or
    a home's sandbox) cannot plant an entry another home would trust."""
    try:
        for directory in (cache_dir.parent.parent, cache_dir.parent, cache_dir):
            if not _private_to_us(os.lstat(directory), directory=True):
                return None
        fd = os.open(cache_dir / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not _private_to_us(st, directory=False) or st.st_size > MAX_SHARED_RESULT_BYTES:
            return None
        try:
            return json.loads(f.read(MAX_SHARED_RESULT_BYTES + 1))
        except (OSError, ValueError):
            return None


def newest_referrer_document(
    store: ImageStore, ref: str, artifact_type: str, what: str
) -> dict[str, Any] | None:
    """The newest referrer of ``ref`` of ``artifact_type``, its payload as a JSON object,
    or ``None`` when it has none; ``what`` names the kind in errors."""
    listed = store.referrers(ref, artifact_type)
    if not listed:
        return None
    _, payload = store.read_referrer(listed[-1].digest)
    try:
        document = json.loads(payload)
    except ValueError as e:
        raise KilnError(f"{what} referrer {listed[-1].digest} of {ref} is not JSON: {e}") from e
    if not isinstance(document, dict):
        raise KilnError(f"{what} referrer {listed[-1].digest} of {ref} is not a JSON object")
    return document
