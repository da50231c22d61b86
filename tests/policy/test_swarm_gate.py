"""On a real Swarm (tests/swarm_cluster.py) the gate's publisher is the Swarm runtime
itself: it pushes the image with its referrers to the cluster's TLS registry, and the
evidence the gate reads is the registry's copy, signature verified."""

# ruff: noqa: F811 - the swarm_cluster fixture is imported by name and used as a parameter
from __future__ import annotations

import os
from pathlib import Path

import pytest
from policy_project import project_toml

from kiln.image.bake import bake
from kiln.image.registry import RegistryOptions
from kiln.image.store import ImageStore
from kiln.policy.gate import GatedService, gate_services
from kiln.policy.registry_evidence import ImagePublisher, read_registry_evidence
from kiln.runtime.swarm import SwarmRuntime
from kiln.spec import load_spec
from kiln.spec.models import PolicySettings
from kiln.supply.signing import SIGNATURE_ARTIFACT_TYPE, generate_key, sign_image
from swarm_cluster import SwarmCluster, swarm_cluster  # noqa: F401

pytestmark = [
    pytest.mark.docker,
    pytest.mark.skipif(os.geteuid() != 0, reason="a swarm of engines needs root"),
]


def test_the_swarm_runtime_publishes_the_evidence_the_gate_reads_back(
    swarm_cluster: SwarmCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("KILN_HOME", str(home))
    project = tmp_path / "project"
    (project / "app").mkdir(parents=True)
    (project / "app" / "run").write_text("#!/bin/sh\n")
    (project / "kiln.toml").write_text(project_toml("swarmgate"))
    digest = bake(load_spec(project / "kiln.toml"))["app"].digest
    store = ImageStore(home / "images")
    generate_key(project / "team")
    sign_image(store, digest, project / "team.key")

    runtime = SwarmRuntime(
        home,
        swarm_cluster.manager.host,
        f"{swarm_cluster.registry}/kiln",
        RegistryOptions(ca_file=swarm_cluster.registry_ca),
    )
    try:
        assert isinstance(runtime, ImagePublisher)
        settings = PolicySettings(enforce=True, keys=["team.pub"], sources=["scratch"])
        spec = {"image": "app", "health": {"http": "/healthz", "exec": None, "tcp": False}}
        services = {"web": GatedService("app", digest, spec)}
        result = gate_services(
            store, services, settings, project, tmp_path / "no.db", publisher=runtime
        )
        assert result.denied == [], [v.line() for v in result.denied]

        reference = runtime.image_reference("web", digest)
        found = read_registry_evidence(
            store, reference, runtime.registry_options, tmp_path / "scratch"
        )
        assert found.missing == () and found.error == ""
        assert found.store is not None
        assert [d.digest for d in found.store.referrers(digest, SIGNATURE_ARTIFACT_TYPE)] == [
            d.digest for d in store.referrers(digest, SIGNATURE_ARTIFACT_TYPE)
        ]
    finally:
        runtime.close()
