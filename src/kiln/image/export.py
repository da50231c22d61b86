"""Hand one image to other tools as a single archive: an OCI layout or ``docker save`` format.

Both archives are deterministic (sorted entries, mtime 0, owner 0:0), so
exporting the same image twice gives the same file. Layers stay gzipped in
the docker format: ``docker load`` decompresses them and checks each against
the config's ``diff_ids``.

The OCI archive carries the image's referrers (SBOM, provenance, signatures) too, as
``oras`` and ``regctl`` lay them out: each artifact manifest is an untagged
``index.json`` entry with its ``artifactType``, and its ``subject`` field names the
image. ``ANNOTATION_SUBJECT`` on the entry saves a reader opening every manifest.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import tempfile
from pathlib import Path
from typing import Literal

from kiln.errors import KilnError
from kiln.image.digest import (
    ANNOTATION_REF_NAME,
    MEDIA_TYPE_INDEX,
    Descriptor,
    canonical_json,
)
from kiln.image.store import ImageStore

ExportFormat = Literal["oci", "docker"]
ANNOTATION_SUBJECT = "dev.kiln.referrer.subject"
"""On an exported referrer's ``index.json`` entry: the digest of the manifest it is about."""


def export_image(store: ImageStore, ref: str, fmt: ExportFormat, out: Path) -> None:
    out = Path(out).absolute()
    if fmt not in ("oci", "docker"):
        raise KilnError(f"unknown export format {fmt!r} for {ref}: use oci or docker")
    descriptor = store.resolve(ref)
    manifest = store.read_json(descriptor.digest)
    try:
        config = Descriptor.from_json(manifest["config"])
        layers = [Descriptor.from_json(layer) for layer in manifest.get("layers", [])]
    except (KeyError, TypeError, AttributeError) as e:
        raise KilnError(f"manifest of {ref} is malformed: {e}") from e
    ref_name = (descriptor.annotations or {}).get(ANNOTATION_REF_NAME)
    blobs = sorted({descriptor.digest, config.digest, *(layer.digest for layer in layers)})
    referrers = store.referrer_closure([descriptor.digest]) if fmt == "oci" else []
    referrer_entries: list[Descriptor] = []
    for referrer in referrers:
        try:
            subject = str(store.read_json(referrer.digest)["subject"]["digest"])
        except (KeyError, TypeError) as e:
            raise KilnError(
                f"cannot export {ref}: referrer {referrer.digest} has no subject"
            ) from e
        referrer_entries.append(referrer.with_annotations({ANNOTATION_SUBJECT: subject}))
        blobs = sorted({*blobs, *store.reachable([referrer.digest])})
    for digest in blobs:
        if not store.has(digest):
            raise KilnError(f"cannot export {ref}: blob {digest} is missing from {store.root}")

    files: dict[str, bytes] = {}
    if fmt == "oci":
        files["oci-layout"] = canonical_json({"imageLayoutVersion": "1.0.0"})
        entry = Descriptor(descriptor.media_type, descriptor.digest, descriptor.size)
        if ref_name:
            entry = entry.with_annotations({ANNOTATION_REF_NAME: ref_name})
        manifests = [entry.to_json(), *(e.to_json() for e in referrer_entries)]
        files["index.json"] = canonical_json(
            {"schemaVersion": 2, "mediaType": MEDIA_TYPE_INDEX, "manifests": manifests}
        )
    else:
        blobs = sorted({config.digest, *(layer.digest for layer in layers)})
        files["manifest.json"] = json.dumps(
            [
                {
                    "Config": _blob_name(config.digest),
                    "RepoTags": [ref_name] if ref_name else [],
                    "Layers": [_blob_name(layer.digest) for layer in layers],
                }
            ],
            separators=(",", ":"),
        ).encode()

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as raw:
            with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
                for name in ("blobs", "blobs/sha256"):
                    tf.addfile(_info(name, tarfile.DIRTYPE, 0))
                members: list[tuple[str, str | None]] = [(_blob_name(d), d) for d in blobs]
                members += [(name, None) for name in files]
                for name, member_digest in sorted(members, key=lambda m: m[0]):
                    if member_digest is None:
                        data = files[name]
                        tf.addfile(_info(name, tarfile.REGTYPE, len(data)), io.BytesIO(data))
                        continue
                    with store.open_blob(member_digest) as blob:
                        size = os.fstat(blob.fileno()).st_size
                        tf.addfile(_info(name, tarfile.REGTYPE, size), blob)
            raw.flush()
            os.fsync(raw.fileno())
        os.chmod(tmp, 0o644)
        os.rename(tmp, out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise KilnError(f"cannot export {ref} to {out}: {e}") from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _blob_name(digest: str) -> str:
    return "blobs/sha256/" + digest.removeprefix("sha256:")


def _info(name: str, kind: bytes, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = size
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mtime = 0
    return info
