"""What the policy gate knows about one service: its image's evidence, re-read from an
image store by digest, and the service as the plan has it.

Every fact comes from the store that will run the image (the CLI's, or the agent's own
on apply), never from what a client says about it: the signature is verified against
the configured keys, the provenance counts only when signed, the SBOM and the scan are
read from the image's referrers.
"""

from __future__ import annotations

import datetime
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.errors import KilnError
from kiln.policy.registry_evidence import store_input

if TYPE_CHECKING:
    from kiln.image.store import ImageStore
    from kiln.spec.models import PolicySettings

_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


@dataclass(frozen=True)
class EvidenceSources:
    """Where evidence is read from, beside the image store."""

    keys: tuple[Path, ...] = ()
    scan_db: Path | None = None
    """The OSV database; missing → ``scan.status`` is ``no-database``."""
    suppressions: Path | None = None
    now: datetime.datetime = field(default_factory=lambda: datetime.datetime.now(datetime.UTC))


def sources_for(
    settings: PolicySettings, root: Path, scan_db: Path | None = None
) -> EvidenceSources:
    """``[policy]``'s paths, relative to the project directory ``root``."""
    from kiln.supply.osv import default_db_path

    return EvidenceSources(
        keys=tuple(root / k for k in settings.keys),
        scan_db=scan_db or default_db_path(),
        suppressions=root / settings.suppressions if settings.suppressions else None,
    )


def settings_input(settings: PolicySettings) -> dict[str, Any]:
    """``input.settings``: what the rules compare the evidence with."""
    return {
        "enforce": settings.enforce,
        "keys": list(settings.keys),
        "sources": list(settings.sources),
        "max_image_age": settings.max_image_age,
        "max_image_age_seconds": settings.max_image_age_seconds,
    }


def service_evidence(
    store: ImageStore,
    service: str,
    image_ref: str,
    digest: str,
    service_config: Mapping[str, Any],
    settings: PolicySettings,
    sources: EvidenceSources,
) -> dict[str, Any]:
    """The input document of one service (docs/policy.md lists its fields)."""
    stored = bool(_DIGEST.match(digest)) and store.has(digest)
    out: dict[str, Any] = {
        "service": service,
        "image": _image(store, image_ref, digest, stored),
        "signature": {"signed": False, "signers": [], "errors": []},
        "provenance": {"verified": False},
        "sbom": {"present": False, "packages": {}, "total": 0},
        "scan": {"status": "not-scanned", "findings": [], "suppressed": 0},
        "secrets": {"scanned": False, "found": False},
        "spec": dict(service_config),
        "settings": settings_input(settings),
        "evidence": store_input(store),
    }
    if not stored:
        return out
    if sources.keys:
        out["signature"], out["provenance"] = _verification(store, digest, sources.keys)
    out["image"].update(_base_and_age(out["provenance"], out["image"], sources.now))
    out["sbom"] = _sbom(store, digest)
    out["scan"] = _scan(store, digest, sources)
    out["secrets"] = _secrets(store, digest)
    return out


def _secrets(store: ImageStore, digest: str) -> dict[str, Any]:
    """The bake's secret scan, from its referrer: a bake that found a secret failed and
    tagged nothing, so a referrer means "scanned, none found" (minus the allowed ones);
    no referrer means the image was never scanned (baked before the scan, or pulled)."""
    from kiln.supply.secrets_scan import stored_scan

    try:
        scan = stored_scan(store, digest)
    except KilnError:
        return {"scanned": False, "found": False, "error": "unreadable secret-scan referrer"}
    if scan is None:
        return {"scanned": False, "found": False}
    findings = scan.get("findings")
    allowed = scan.get("allowed")
    return {
        "scanned": True,
        "found": bool(findings) if isinstance(findings, int) else True,
        "allowed": len(allowed) if isinstance(allowed, list) else 0,
    }


def _image(store: ImageStore, ref: str, digest: str, stored: bool) -> dict[str, Any]:
    image: dict[str, Any] = {
        "ref": ref,
        "digest": digest,
        "pinned": stored,
        "stored": stored,
        "base": "",
        "created": None,
        "age_seconds": None,
        "user": "",
        "healthcheck": False,
    }
    if not stored:
        return image
    try:
        manifest = store.read_json(digest)
        config = store.read_json(str(manifest["config"]["digest"]))
    except (KilnError, KeyError, TypeError, ValueError):
        image["pinned"] = False
        return image
    raw = config.get("config")
    inner: dict[str, Any] = raw if isinstance(raw, dict) else {}
    image["user"] = str(inner.get("User") or "")
    health = inner.get("Healthcheck")
    image["healthcheck"] = isinstance(health, dict) and health.get("Test") not in (None, [])
    if isinstance(config.get("created"), str):
        image["created"] = config["created"]
    return image


def _verification(
    store: ImageStore, digest: str, keys: tuple[Path, ...]
) -> tuple[dict[str, Any], dict[str, Any]]:
    from kiln.supply.signing import verify_image

    result = verify_image(store, digest, list(keys))
    signature = {
        "signed": result.signed,
        "signers": list(result.signers),
        "errors": list(result.errors)[:20],
    }
    statement = result.provenance
    if statement is None:
        return signature, {"verified": False}
    predicate = statement.get("predicate") or {}
    definition = predicate.get("buildDefinition") or {}
    run = predicate.get("runDetails") or {}
    external = definition.get("externalParameters") or {}
    raw = external.get("recipe")
    recipe: dict[str, Any] = raw if isinstance(raw, dict) else {}
    return signature, {
        "verified": True,
        "build_type": definition.get("buildType"),
        "builder": (run.get("builder") or {}).get("id"),
        "base": recipe.get("from"),
        "finished": (run.get("metadata") or {}).get("finishedOn"),
        "dependencies": definition.get("resolvedDependencies") or [],
    }


def _parse_time(text: object) -> datetime.datetime | None:
    if not isinstance(text, str):
        return None
    try:
        moment = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=datetime.UTC)


def _base_and_age(
    provenance: dict[str, Any], image: dict[str, Any], now: datetime.datetime
) -> dict[str, Any]:
    """The base and the bake time from signed provenance when there is some: a config's
    ``created`` is the source date (reproducible), not when the image was made."""
    made = _parse_time(provenance.get("finished")) or _parse_time(image.get("created"))
    return {
        "base": str(provenance.get("base") or ""),
        "age_seconds": max(0.0, (now - made).total_seconds()) if made else None,
    }


def _sbom(store: ImageStore, digest: str) -> dict[str, Any]:
    from kiln.supply.sbom import components, stored_sbom

    try:
        document = stored_sbom(store, digest)
    except KilnError as e:
        return {"present": False, "packages": {}, "total": 0, "error": str(e)}
    if document is None:
        return {"present": False, "packages": {}, "total": 0}
    counts = Counter(str(c.ecosystem) for c in components(document))
    return {
        "present": True,
        "packages": dict(sorted(counts.items())),
        "total": sum(counts.values()),
    }


def _scan(store: ImageStore, digest: str, sources: EvidenceSources) -> dict[str, Any]:
    from kiln.supply.scan import scan_image

    if sources.scan_db is None or not sources.scan_db.is_file():
        return {"status": "no-database", "findings": [], "suppressed": 0}
    try:
        report = scan_image(
            digest,
            store=store,
            db_path=sources.scan_db,
            suppressions=sources.suppressions,
            now=sources.now,
        )
    except KilnError as e:
        return {"status": "error", "error": str(e), "findings": [], "suppressed": 0}
    return {
        "status": "ok",
        "findings": [f.as_json() for f in report.findings],
        "suppressed": len(report.suppressed),
        "database_age_seconds": report.database.age_seconds(report.now),
    }
