"""Content addresses and the canonical byte form that makes them reproducible.

A digest is only reproducible when the bytes behind it are: every JSON blob
Kiln writes goes through :func:`canonical_json`, so the same object always
hashes the same way on any machine.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from kiln.errors import KilnError

MEDIA_TYPE_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_TYPE_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_TYPE_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_TYPE_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MEDIA_TYPE_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
MEDIA_TYPE_EMPTY = "application/vnd.oci.empty.v1+json"
"""The ``{}`` config of an OCI 1.1 artifact manifest (a referrer's)."""
DOCKER_MEDIA_TYPE_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MEDIA_TYPE_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"
ANNOTATION_TITLE = "org.opencontainers.image.title"
ANNOTATION_CREATED = "org.opencontainers.image.created"

_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_digest(data: bytes) -> str:
    return "sha256:" + sha256_hex(data)


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode(
        "utf-8"
    )


def is_digest(value: str) -> bool:
    return bool(_DIGEST_RE.match(value))


def check_digest(value: str) -> str:
    """Refuse anything but ``sha256:<64 hex>``: digests become file names."""
    if not is_digest(value):
        raise KilnError(f"not a sha256 digest: {value!r} (expected sha256:<64 hex digits>)")
    return value


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] | None = None
    artifact_type: str | None = None
    """``artifactType`` of an OCI 1.1 artifact (a referrer), as the referrers API lists it."""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
        }
        if self.artifact_type:
            out["artifactType"] = self.artifact_type
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Descriptor:
        try:
            media_type = str(data["mediaType"])
            digest = check_digest(str(data["digest"]))
            size = int(data["size"])
        except (KeyError, TypeError, ValueError) as e:
            raise KilnError(f"malformed OCI descriptor {data!r}: {e}") from e
        raw = data.get("annotations")
        annotations = {str(k): str(v) for k, v in raw.items()} if isinstance(raw, dict) else None
        artifact_type = data.get("artifactType")
        return cls(
            media_type,
            digest,
            size,
            annotations or None,
            str(artifact_type) if isinstance(artifact_type, str) and artifact_type else None,
        )

    def with_annotations(self, extra: dict[str, str]) -> Descriptor:
        merged = dict(self.annotations or {})
        merged.update(extra)
        return Descriptor(self.media_type, self.digest, self.size, merged, self.artifact_type)
