"""Reads of the home's store that the SBOM and the secret scan share: a layer's tar
stream, hashed as it goes; a per-layer result cache; the newest referrer's JSON."""

from __future__ import annotations

import contextlib
import json
import os
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

__all__ = ["cache_layer_result", "layer_tar", "newest_referrer_document"]


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
