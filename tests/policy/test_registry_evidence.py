"""The gate of a runtime whose nodes pull from a registry (swarm): each image is pushed
with its referrers, and the gate reads signature, provenance, SBOM and secret scan back
from a real docker-registry 2.8 (no referrers API: the fallback tag carries them), not
from the home's store; evidence that did not arrive there denies, naming what and where."""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from policy_project import project_toml

from busybox_tree import free_port
from kiln.image.bake import bake
from kiln.image.referrer_transfer import fallback_tag
from kiln.image.registry import RegistryClient, RegistryOptions, push
from kiln.image.store import ImageStore
from kiln.policy.gate import GatedService, gate_services
from kiln.policy.registry_evidence import (
    SCRATCH_PREFIX,
    STALE_SCRATCH_SECONDS,
    ImagePublisher,
    read_registry_evidence,
    scratch_root,
)
from kiln.spec import load_spec
from kiln.spec.models import PolicySettings
from kiln.supply.sbom import SBOM_ARTIFACT_TYPE
from kiln.supply.signing import SIGNATURE_ARTIFACT_TYPE, generate_key, sign_image
from registry_server import REGISTRY_BIN, serve_registry

OPTIONS = RegistryOptions(plain_http=True)
ALL_EVIDENCE = ("SBOM", "provenance", "signature", "secret scan")


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A plain-HTTP docker-registry on loopback that allows deletes (a referrer removed
    there is one of the cases)."""
    if not REGISTRY_BIN.exists():
        pytest.skip("docker-registry is not installed")
    root = tmp_path_factory.mktemp("registry")
    port = free_port()
    config = {
        "version": 0.1,
        "log": {"level": "warn"},
        "storage": {
            "filesystem": {"rootdirectory": str(root / "data")},
            "delete": {"enabled": True},
        },
        "http": {"addr": f"127.0.0.1:{port}", "secret": "kiln-test-secret"},
    }
    with serve_registry(root, config, port):
        yield f"127.0.0.1:{port}"


@dataclass
class Signed:
    project: Path
    store: ImageStore
    digest: str


@pytest.fixture
def signed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Signed:
    """A scratch image baked with its SBOM, provenance and secret scan, signed by a key
    the project trusts."""
    home = tmp_path / "home"
    monkeypatch.setenv("KILN_HOME", str(home))
    project = tmp_path / "project"
    (project / "app").mkdir(parents=True)
    (project / "app" / "run").write_text(f"#!/bin/sh\n# {tmp_path.name}\n")
    (project / "kiln.toml").write_text(project_toml("regevidence"))
    digest = bake(load_spec(project / "kiln.toml"))["app"].digest
    store = ImageStore(home / "images")
    generate_key(project / "team")
    sign_image(store, digest, project / "team.key")
    return Signed(project, store, digest)


@dataclass
class Publisher:
    """What the swarm runtime does before the gate, against the real registry: push the
    image (with its referrers, unless told not to) to ``HOST/kiln/SERVICE@digest``."""

    store: ImageStore
    registry: str
    referrers: bool = True
    push_first: bool = True
    registry_options: RegistryOptions = OPTIONS
    pushed: list[str] = field(default_factory=list)

    def publish_image(self, service: str, digest: str) -> str:
        reference = f"{self.registry}/kiln/{service}@{digest}"
        if self.push_first:
            push(self.store, digest, reference, OPTIONS, referrers=self.referrers)
            self.pushed.append(reference)
        return reference


def _web(digest: str) -> dict[str, GatedService]:
    spec = {"image": "app", "health": {"http": "/healthz", "exec": None, "tcp": False}}
    return {"web": GatedService("app", digest, spec)}


def _settings(enforce: bool = True) -> PolicySettings:
    return PolicySettings(enforce=enforce, keys=["team.pub"], sources=["scratch"])


def test_the_gate_passes_on_evidence_read_back_from_the_registry(
    registry: str, signed: Signed, tmp_path: Path
) -> None:
    publisher = Publisher(signed.store, registry)
    assert isinstance(publisher, ImagePublisher)
    result = gate_services(
        signed.store,
        _web(signed.digest),
        _settings(),
        signed.project,
        tmp_path / "no.db",
        publisher=publisher,
    )
    assert publisher.pushed == [f"{registry}/kiln/web@{signed.digest}"]
    assert result.denied == []
    assert [v.message for v in result.warnings] == [
        "no vulnerability database: run kiln scan db import PATH"
    ]

    found = read_registry_evidence(signed.store, publisher.pushed[0], OPTIONS, tmp_path / "scratch")
    assert found.error == "" and found.missing == () and found.refused == ()
    assert found.looked == f"the referrers tag {registry}/kiln/web:{fallback_tag(signed.digest)}"
    assert found.store is not None and found.store.root != signed.store.root
    for artifact_type in (SBOM_ARTIFACT_TYPE, SIGNATURE_ARTIFACT_TYPE):
        assert [d.digest for d in found.store.referrers(signed.digest, artifact_type)] == [
            d.digest for d in signed.store.referrers(signed.digest, artifact_type)
        ]


def test_an_image_pushed_without_its_referrers_is_denied_naming_what_and_where(
    registry: str, signed: Signed, tmp_path: Path
) -> None:
    publisher = Publisher(signed.store, registry, referrers=False)
    services = _web(signed.digest)
    lenient = gate_services(
        signed.store,
        services,
        _settings(enforce=False),
        signed.project,
        tmp_path / "no.db",
        publisher=publisher,
    )
    where = f"{registry}/kiln/web@{signed.digest}"
    tag = f"{registry}/kiln/web:{fallback_tag(signed.digest)}"
    assert [v.message for v in lenient.denied] == [
        f"{kind} missing in the registry: looked for the referrers of {where} in the "
        f"referrers tag {tag} (push them with the image: kiln push without --no-referrers, "
        "or apply again)"
        for kind in sorted(ALL_EVIDENCE)
    ], "lost evidence denies even without [policy] enforce"
    assert lenient.denied[0].origin == "kiln:default/evidence.rego"

    strict = gate_services(
        signed.store,
        services,
        _settings(),
        signed.project,
        tmp_path / "no.db",
        publisher=publisher,
    )
    messages = {v.message for v in strict.denied}
    assert f"image {signed.digest} is not signed by a trusted key" in messages, (
        "the signature the home's store holds does not count: the registry's copy has none"
    )
    assert (
        "image base unknown (no signed provenance) is not an allowed source "
        "([policy] sources)" in messages
    )

    local = gate_services(signed.store, services, _settings(), signed.project, tmp_path / "no.db")
    assert local.denied == [], "the same image passes on the home's own store"


def _delete_manifest(registry: str, digest: str) -> None:
    with RegistryClient(registry, OPTIONS) as client:
        answer = client.send("DELETE", f"/v2/kiln/web/manifests/{digest}", scope="")
        assert answer.status_code == 202, answer.text


def test_a_signature_deleted_in_the_registry_is_missing_there(
    registry: str, signed: Signed, tmp_path: Path
) -> None:
    Publisher(signed.store, registry).publish_image("web", signed.digest)
    (signature,) = signed.store.referrers(signed.digest, SIGNATURE_ARTIFACT_TYPE)
    _delete_manifest(registry, signature.digest)

    pushed_earlier = Publisher(signed.store, registry, push_first=False)
    result = gate_services(
        signed.store,
        _web(signed.digest),
        _settings(),
        signed.project,
        tmp_path / "no.db",
        publisher=pushed_earlier,
    )
    denied = [v.message for v in result.denied]
    lost = [m for m in denied if m.startswith("signature missing in the registry")]
    assert lost == [
        f"signature missing in the registry: looked for the referrers of "
        f"{registry}/kiln/web@{signed.digest} in the referrers tag "
        f"{registry}/kiln/web:{fallback_tag(signed.digest)} (push them with the image: "
        "kiln push without --no-referrers, or apply again)"
    ], denied
    assert f"image {signed.digest} is not signed by a trusted key" in denied
    assert any(
        "failed verification" in v.message and signature.digest[:19] in v.message
        for v in result.warnings
    ), "the tag still lists it; the registry no longer serves it"

    again = gate_services(
        signed.store,
        _web(signed.digest),
        _settings(),
        signed.project,
        tmp_path / "no.db",
        publisher=Publisher(signed.store, registry),
    )
    assert again.denied == [], "a new push puts the signature back"


def test_a_registry_that_cannot_be_reached_denies(signed: Signed, tmp_path: Path) -> None:
    gone = f"127.0.0.1:{free_port()}"
    result = gate_services(
        signed.store,
        _web(signed.digest),
        _settings(enforce=False),
        signed.project,
        tmp_path / "no.db",
        publisher=Publisher(signed.store, gone),
    )
    (denied,) = result.denied
    assert denied.message.startswith(f"cannot read the image's evidence from {gone}: ")
    assert "the push failed" in denied.message


def test_a_reference_by_tag_is_an_error_not_a_read(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "images")
    found = read_registry_evidence(store, "127.0.0.1:1/kiln/web:1", OPTIONS, tmp_path / "s")
    assert found.store is None
    assert found.error.startswith("not a reference by digest")


def test_the_scratch_store_is_removed_and_a_dead_gates_leftovers_too(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "home" / "images")
    stale = tmp_path / "home" / f"{SCRATCH_PREFIX}dead"
    recent = tmp_path / "home" / f"{SCRATCH_PREFIX}busy"
    for leftover in (stale, recent):
        (leftover / "images").mkdir(parents=True)
    old = time.time() - STALE_SCRATCH_SECONDS - 60
    os.utime(stale, (old, old))
    with scratch_root(store) as scratch:
        assert scratch.parent == store.root.parent
        assert stat.S_IMODE(scratch.stat().st_mode) == 0o700
        assert not stale.exists() and recent.exists(), "only what a dead gate left goes"
    assert not scratch.exists()
