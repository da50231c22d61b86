"""Attacks on the Swarm runtime's boundaries by a careless operator or a hostile swarm:
environment names that smuggle another variable, registry settings that are not a
registry, service names that are no repository name, and a service that squats an
instance's name in the swarm.

The swarm ones run against the real three-node swarm of tests/swarm_cluster.py.
"""

# ruff: noqa: F811 - the swarm_cluster fixture is imported by name and used as a parameter
from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from dockerd import image_from_trees
from kiln.image.registry import RegistryOptions, parse_ref
from kiln.image.store import ImageStore
from kiln.runtime import InstanceSpec, RuntimeFailure
from kiln.runtime.docker import LABEL_HOME
from kiln.runtime.swarm import SwarmRuntime
from kiln.spec.models import Recipe, Service
from swarm_cluster import SwarmCluster, swarm_cluster  # noqa: F401

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="a swarm of engines needs root")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"PORT=1": "x"}, "variable name 'PORT=1' must be non-empty, without = or NUL"),
        ({"": "x"}, "variable name '' must be non-empty"),
        ({"A\0B": "x"}, "without = or NUL"),
        ({"A": "x\0y"}, "value of A contains a NUL byte"),
    ],
)
def test_env_names_that_would_set_another_variable_are_refused(
    env: dict[str, str], message: str
) -> None:
    """Every runtime writes ``NAME=VALUE``: a name ``PORT=1`` reached the service spec as
    ``PORT=1=x``, which sets PORT, the variable Kiln itself sets (before the fix the spec
    took it, and so did the agent's API, which checks with the same model)."""
    with pytest.raises(ValidationError, match=message):
        Service.model_validate({"image": "app", "env": env})
    with pytest.raises(ValidationError, match=message):
        Recipe.model_validate({"from": "scratch", "env": env})
    assert Service.model_validate({"image": "app", "env": {"A": "b=c"}}).env == {"A": "b=c"}


@pytest.mark.parametrize(
    "registry",
    ["..", "../kiln", "-reg/kiln", "reg..io/kiln", "reg.io:99999/kiln", "reg@io/kiln", "r/K"],
)
def test_registry_that_is_not_host_port_path_is_refused_before_connecting(
    tmp_path: Path, registry: str
) -> None:
    """``..`` and ``a..b`` passed the old pattern (a host of dots), as did port 99999: the
    first push then failed at apply with a transport error instead of at once."""
    with pytest.raises(RuntimeFailure, match="is not HOST\\[:PORT\\]\\[/PATH\\]"):
        SwarmRuntime(tmp_path, "unix:///nonexistent.sock", registry)


@needs_root
@pytest.mark.docker
def test_service_names_kiln_allows_map_to_repository_names(
    tmp_path: Path, swarm_cluster: SwarmCluster
) -> None:
    """``[services."web."]`` and ``"a..b"`` are valid Kiln service names but no valid
    repository name: every start pushed to a reference the client refuses."""
    runtime = SwarmRuntime(tmp_path, swarm_cluster.manager.host, f"{swarm_cluster.registry}/k")
    digest = "sha256:" + "a" * 64
    try:
        for name in ("web.", "a..b", "x_", "db-", "api", "my_app", "Web"):
            reference = runtime.image_reference(name, digest)
            parsed = parse_ref(reference)
            assert parsed.digest == digest and parsed.repository.startswith("k/"), reference
        assert runtime.image_reference("my_app", digest).endswith("/k/my_app@" + digest)
    finally:
        runtime.close()


@needs_root
@pytest.mark.docker
def test_a_service_squatting_an_instance_name_is_neither_adopted_nor_removed(
    tmp_path: Path, swarm_cluster: SwarmCluster
) -> None:
    """Someone made ``kiln-<tag>-<instance>`` in the swarm without Kiln's labels. Kiln's
    start fails with one line naming it; the squatter stays; the secrets Kiln created for
    the instance are not left behind; and the home's listing, leftovers and shutdown do
    not touch (or claim) it."""
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "hostname").write_text("squat\n")
    digest = image_from_trees(ImageStore(home / "images"), [tree])
    runtime = SwarmRuntime(
        home,
        swarm_cluster.manager.host,
        f"{swarm_cluster.registry}/kiln",
        RegistryOptions(ca_file=swarm_cluster.registry_ca),
    )
    api = swarm_cluster.manager.api()
    instance_id = f"web-squat{os.getpid():x}"
    import docker.types

    squatter = api.create_service(
        docker.types.TaskTemplate(docker.types.ContainerSpec("busybox:none", ["true"])),
        name=runtime.service_name(instance_id),
        labels={"owner": "someone-else"},
    )["ID"]
    try:
        spec = InstanceSpec(
            instance_id=instance_id,
            service="web",
            revision=1,
            image_digest=digest,
            command=["sh"],
            user="1000",
            workdir="/",
            env={"PATH": "/bin"},
            port=8080,
            secrets={"db": b"pw-" + os.urandom(4).hex().encode()},
        )
        with pytest.raises(RuntimeFailure, match="already exists in the swarm") as caught:
            runtime.start(spec)
        assert "\n" not in str(caught.value)
        assert api.inspect_service(squatter)["ID"] == squatter
        ours = api.secrets(filters={"label": f"{LABEL_HOME}={runtime.tag}"})
        assert ours == [], ours
        assert runtime.list() == [] and runtime.leftovers() == []
        runtime.release(instance_id)
        runtime.shutdown()
        assert api.inspect_service(squatter)["ID"] == squatter
    finally:
        api.remove_service(squatter)
        runtime.shutdown()
        runtime.close()
        api.close()
