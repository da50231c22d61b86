"""SLSA v1 provenance for every bake: an in-toto Statement v1 in a DSSE envelope.

The envelope is written unsigned at bake time (a bake has no key) and attached to the
image as an OCI referrer; ``kiln sign`` later adds signatures to a copy of it. A cached
re-bake that changes nothing finds the provenance already attached and writes nothing, so
evidence never churns and costs a re-bake only one small file read.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kiln.errors import KilnError
from kiln.image.digest import Descriptor
from kiln.image.store import ImageStore

PROVENANCE_ARTIFACT_TYPE = "application/vnd.in-toto+json"
"""The referrer's ``artifactType`` (what ``kiln image referrers`` shows)."""
IN_TOTO_PAYLOAD_TYPE = "application/vnd.in-toto+json"
DSSE_MEDIA_TYPE = "application/vnd.dsse.envelope.v1+json"
"""The referrer's layer: a DSSE envelope in JSON, as cosign stores attestations."""
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
SLSA_PROVENANCE_V1 = "https://slsa.dev/provenance/v1"
BUILD_TYPE = "https://kiln.dev/buildtypes/bake/v1"
BUILDER_ID = "https://kiln.dev/builders/local/v1"


@dataclass(frozen=True)
class BakeFacts:
    """What one image's bake knows about how it was made (gathered by the bake)."""

    image: str
    recipe: dict[str, Any]
    """The image's table of ``kiln.toml``, overlays applied, as the bake used it."""
    environment: str | None
    """The ``--env`` overlay applied, if any."""
    base: str
    """The recipe's ``from``."""
    base_digest: str | None
    """The base image's manifest digest when it has one (``image:``, ``registry:``)."""
    base_layers: tuple[Descriptor, ...]
    lock_file: Path
    commit: str | None
    clean: bool
    remote: str | None
    epoch: int
    started: float
    """Wall-clock seconds since the epoch."""


def _rfc3339(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _sha256(digest: str) -> dict[str, str]:
    return {"sha256": digest.removeprefix("sha256:")}


def resolved_dependencies(facts: BakeFacts) -> list[dict[str, Any]]:
    """The base (its manifest, else its layers), ``kiln.lock`` by digest, and the git commit
    of a clean checkout: everything the bake's output depends on besides the recipe."""
    deps: list[dict[str, Any]] = []
    if facts.base_digest is not None:
        deps.append({"name": facts.base, "digest": _sha256(facts.base_digest)})
    for number, layer in enumerate(facts.base_layers, start=1):
        deps.append(
            {
                "name": f"{facts.base} layer {number}",
                "digest": _sha256(layer.digest),
                "mediaType": layer.media_type,
            }
        )
    try:
        lock = facts.lock_file.read_bytes()
    except FileNotFoundError:
        lock = None
    except OSError as e:
        raise KilnError(f"cannot read {facts.lock_file}: {e}") from e
    if lock is not None:
        deps.append({"name": facts.lock_file.name, "digest": _sha256(_hex(lock))})
    if facts.commit and facts.clean:
        source: dict[str, Any] = {"name": "source", "digest": {"gitCommit": facts.commit}}
        if facts.remote:
            source["uri"] = f"git+{facts.remote}"
        deps.append(source)
    return deps


def _hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def statement(digest: str, facts: BakeFacts, finished: float) -> dict[str, Any]:
    """The in-toto Statement v1 whose subject is the image manifest ``digest``."""
    from kiln import __version__

    external: dict[str, Any] = {"image": facts.image, "recipe": facts.recipe}
    if facts.environment is not None:
        external["environment"] = facts.environment
    return {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": facts.image, "digest": _sha256(digest)}],
        "predicateType": SLSA_PROVENANCE_V1,
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": external,
                "internalParameters": {"sourceDateEpoch": facts.epoch},
                "resolvedDependencies": resolved_dependencies(facts),
            },
            "runDetails": {
                "builder": {"id": BUILDER_ID, "version": {"kiln": __version__}},
                "metadata": {
                    "startedOn": _rfc3339(facts.started),
                    "finishedOn": _rfc3339(finished),
                },
            },
        },
    }


def envelope_json(payload: bytes, payload_type: str) -> bytes:
    """An unsigned DSSE envelope (securesystemslib's) as JSON bytes."""
    from securesystemslib.dsse import Envelope

    envelope = Envelope(payload, payload_type, {})
    return json.dumps(envelope.to_dict(), sort_keys=True).encode()


def statement_payload(document: Mapping[str, Any]) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


def ensure_provenance(
    store: ImageStore, digest: str, facts: Callable[[], BakeFacts]
) -> Descriptor | None:
    """Attach unsigned provenance to ``digest`` unless some is already attached (a cached
    re-bake: then ``facts`` is not even gathered); returns the new referrer, or None."""
    if store.referrers(digest, PROVENANCE_ARTIFACT_TYPE):
        return None
    finished = time.time()
    document = statement(digest, facts(), finished)
    envelope = envelope_json(statement_payload(document), IN_TOTO_PAYLOAD_TYPE)
    return store.put_referrer(
        digest,
        PROVENANCE_ARTIFACT_TYPE,
        envelope,
        DSSE_MEDIA_TYPE,
        {"org.opencontainers.image.created": _rfc3339(finished)},
    )


def base_layers(base: str, layers: Sequence[tuple[str, Descriptor]]) -> tuple[Descriptor, ...]:
    """The base's own layers among an image's ``(source, descriptor)`` layers: a base labels
    what it put there with its kind (``debian:``, ``image:``, ``oci:``, ``registry:``)."""
    kind = base.split(":", 1)[0]
    if kind == "scratch":
        return ()
    return tuple(d for source, d in layers if source.startswith(f"{kind}:"))
