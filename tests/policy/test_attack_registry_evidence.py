"""The evidence gate of a registry-pulling runtime (swarm) attacked from the registry:
anyone who can push to the repository (or a hostile registry) adds referrers of their
own. A well-formed SBOM or secret scan for the right subject carries no signature, so
one the home did not make must not become what the gate judges; referrers of another
subject, floods and the scratch directory are covered by the tests that held."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

from test_registry_evidence import OPTIONS, Publisher, Signed, _settings, _web, registry, signed

from kiln.image.registry import pull, push
from kiln.image.store import ImageStore
from kiln.policy.evidence import service_evidence, sources_for
from kiln.policy.gate import gate_services
from kiln.policy.registry_evidence import SCRATCH_PREFIX, read_registry_evidence, scratch_root
from kiln.supply.sbom import SBOM_ARTIFACT_TYPE, SBOM_MEDIA_TYPE, stored_sbom
from kiln.supply.secrets_scan import SECRET_SCAN_ARTIFACT_TYPE

__all__ = ["registry", "signed"]


def _forge(signed: Signed, reference: str, tmp_path: Path) -> tuple[str, str]:
    """What a pusher to the repository does: pull the image with its referrers, attach an
    SBOM with every component dropped and a secret scan of its own, push them back.
    Returns the forged referrers' digests."""
    attacker = ImageStore(tmp_path / "attacker" / "images")
    pull(attacker, reference, OPTIONS, referrers=True)
    genuine = stored_sbom(signed.store, signed.digest)
    assert genuine is not None and genuine.get("components")
    forged = copy.deepcopy(genuine)
    forged["components"] = []
    sbom = attacker.put_referrer(
        signed.digest,
        SBOM_ARTIFACT_TYPE,
        json.dumps(forged).encode(),
        SBOM_MEDIA_TYPE,
        {"org.opencontainers.image.created": "2099-01-01T00:00:00Z"},
    )
    scan = attacker.put_referrer(
        signed.digest,
        SECRET_SCAN_ARTIFACT_TYPE,
        json.dumps({"findings": 0, "allowed": []}).encode(),
        "application/json",
    )
    push(attacker, signed.digest, reference, OPTIONS, referrers=True)
    return sbom.digest, scan.digest


def test_an_sbom_pushed_by_someone_else_is_not_what_the_gate_judges(
    registry: str, signed: Signed, tmp_path: Path
) -> None:
    publisher = Publisher(signed.store, registry)
    reference = publisher.publish_image("web", signed.digest)
    forged_sbom, forged_scan = _forge(signed, reference, tmp_path)

    found = read_registry_evidence(signed.store, reference, OPTIONS, tmp_path / "scratch")
    assert found.store is not None and found.error == "" and found.missing == ()
    assert stored_sbom(found.store, signed.digest) == stored_sbom(signed.store, signed.digest)
    assert [d.digest for d in found.store.referrers(signed.digest, SBOM_ARTIFACT_TYPE)] == [
        d.digest for d in signed.store.referrers(signed.digest, SBOM_ARTIFACT_TYPE)
    ]
    assert not found.store.referrers(signed.digest, SECRET_SCAN_ARTIFACT_TYPE) or [
        d.digest for d in found.store.referrers(signed.digest, SECRET_SCAN_ARTIFACT_TYPE)
    ] == [d.digest for d in signed.store.referrers(signed.digest, SECRET_SCAN_ARTIFACT_TYPE)]
    assert any(forged_sbom[:19] in line for line in found.refused), found.refused
    assert any(forged_scan[:19] in line for line in found.refused), found.refused

    settings = _settings()
    sources = sources_for(settings, signed.project, tmp_path / "no.db")
    judged = service_evidence(found.store, "web", "app", signed.digest, {}, settings, sources)[
        "sbom"
    ]
    home = service_evidence(signed.store, "web", "app", signed.digest, {}, settings, sources)[
        "sbom"
    ]
    assert judged == home and home["total"] > 0

    result = gate_services(
        signed.store,
        _web(signed.digest),
        settings,
        signed.project,
        tmp_path / "no.db",
        publisher=Publisher(signed.store, registry, push_first=False),
    )
    assert result.denied == []
    assert any(forged_sbom[:19] in v.message for v in result.warnings), result.warnings


def test_a_planted_scratch_symlink_is_neither_followed_nor_emptied(tmp_path: Path) -> None:
    """Old ``.evidence-*`` entries are swept before each gate: one that is a symlink to a
    directory elsewhere (planted, and old) is not followed, and what it points at stays."""
    store = ImageStore(tmp_path / "home" / "images")
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "keep").mkdir(parents=True)
    (elsewhere / "keep" / "file").write_text("precious")
    planted = tmp_path / "home" / f"{SCRATCH_PREFIX}planted"
    planted.symlink_to(elsewhere)
    os.utime(planted, (0, 0), follow_symlinks=False)
    with scratch_root(store) as scratch:
        assert not scratch.is_symlink() and scratch.parent == store.root.parent
    assert (elsewhere / "keep" / "file").read_text() == "precious"


def test_a_referrers_tag_listing_the_image_itself_is_refused_not_judged(
    registry: str, signed: Signed, tmp_path: Path
) -> None:
    """The registry's referrers tag rewritten to list the image itself as its SBOM: the
    read judges nothing it lists (its subject is not the image), and the home's evidence
    is then missing there, which denies."""
    from kiln.image.digest import MEDIA_TYPE_INDEX, MEDIA_TYPE_MANIFEST
    from kiln.image.referrer_transfer import fallback_tag
    from kiln.image.registry import RegistryClient

    publisher = Publisher(signed.store, registry)
    reference = publisher.publish_image("web", signed.digest)
    image = signed.store.read_bytes(signed.digest)
    itself = {
        "mediaType": MEDIA_TYPE_MANIFEST,
        "digest": signed.digest,
        "size": len(image),
        "artifactType": SBOM_ARTIFACT_TYPE,
    }
    index = {"schemaVersion": 2, "mediaType": MEDIA_TYPE_INDEX, "manifests": [itself]}
    with RegistryClient(registry, OPTIONS) as client:
        answer = client.send(
            "PUT",
            f"/v2/kiln/web/manifests/{fallback_tag(signed.digest)}",
            scope="repository:kiln/web:pull,push",
            headers={"Content-Type": MEDIA_TYPE_INDEX},
            content=json.dumps(index).encode(),
        )
        assert answer.status_code == 201, answer.text[:300]
    found = read_registry_evidence(signed.store, reference, OPTIONS, tmp_path / "s")
    assert found.store is not None and found.store.referrers(signed.digest) == []
    assert set(found.missing) == {"SBOM", "provenance", "signature", "secret scan"}
    assert any(signed.digest[:19] in line for line in found.refused), found.refused
