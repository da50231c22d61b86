"""``kiln chaos`` aimed elsewhere: the instance it hits (its id, its container) comes from
the agent's status, a remote agent's with a context, while the fault goes through the
engine this machine reaches. A status naming a container Kiln never made, another
home's, or a ``../`` path to another swarm service must inject nothing."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
from agent_harness import ImageFactory

from dockerd import Dockerd, docker_engine, tear_down
from kiln.errors import KilnError
from kiln.observe.chaos import DockerInjector, SwarmInjector
from kiln.runtime import InstanceSpec
from kiln.runtime.docker import LABEL_HOME, LABEL_INSTANCE, DockerRuntime
from swarm_cluster import SwarmCluster, swarm_cluster

__all__ = ["docker_engine", "swarm_cluster"]

pytestmark = [
    pytest.mark.docker,
    pytest.mark.skipif(os.geteuid() != 0, reason="the private engine needs root"),
]


@pytest.fixture
def api(docker_engine: Dockerd) -> Iterator[Any]:
    client = docker.APIClient(base_url=docker_engine.host, version="auto")
    yield client
    client.close()


def _running(api: Any, container: str) -> bool:
    return bool(api.inspect_container(container)["State"]["Running"])


def test_docker_chaos_hits_only_a_container_labelled_as_this_homes_instance(
    kiln_home: Path, busybox_image: ImageFactory, docker_engine: Dockerd, api: Any
) -> None:
    digest = busybox_image("web:v1", {"healthz": "ok\n"})
    runtime = DockerRuntime(kiln_home, docker_engine.host)
    made: list[str] = []
    try:
        spec = InstanceSpec(
            "web-1", "web", 1, digest, ["httpd", "-f", "-p", "8080", "-h", "/www"], None,
            "/www", {}, 8080,
        )  # fmt: skip
        ours = str(runtime.start(spec).data["container_id"])
        image = runtime.image_name(digest)
        for name, labels in (
            ("chaos-victim", {}),
            ("chaos-other-home", {LABEL_HOME: "0" * 8, LABEL_INSTANCE: "web-1"}),
            ("chaos-other-instance", {LABEL_HOME: runtime.tag, LABEL_INSTANCE: "web-9"}),
        ):
            created = api.create_container(
                image,
                ["sleep", "600"],
                name=name,
                labels=labels,
                host_config=api.create_host_config(network_mode="none"),
            )
            api.start(created["Id"])
            made.append(str(created["Id"]))
        injector = DockerInjector(docker_engine.host, kiln_home)
        hostile = [
            {"id": "web-1", "container": made[0]},
            {"id": "web-1", "container": "chaos-victim"},
            {"id": "web-1", "container": made[0][:12]},
            {"id": "web-1", "container": made[1]},
            {"id": "web-1", "container": made[2]},
            {"id": "web-1/../x", "container": ours},
        ]
        for instance in hostile:
            for fault in (injector.kill, injector.pause, injector.drift):
                with pytest.raises(KilnError, match=r"nothing injected|no container id"):
                    fault(instance)
        assert all(_running(api, c) for c in made)
        assert not api.inspect_container(made[0])["State"]["Paused"]
        assert injector.kill({"id": "web-1", "container": ours}).startswith("docker kill")
        assert not _running(api, ours)
    finally:
        for container in made:
            api.remove_container(container, force=True)
        tear_down(runtime)


def test_swarm_chaos_kill_never_scales_a_service_a_hostile_id_points_at(
    tmp_path: Path, swarm_cluster: SwarmCluster
) -> None:
    """An instance id with ``/../`` reached any service by name through the engine's URL
    (``/services/kiln-<home>-web-1/../victim`` is ``/services/victim``) and scaled it to
    zero; a service named as this home's instance but not labelled so is refused too."""
    api = docker.APIClient(base_url=swarm_cluster.manager.host, version="auto")
    home = tmp_path / "home"
    home.mkdir()
    injector = SwarmInjector(swarm_cluster.manager.host, home)
    made: list[str] = []
    try:
        for name in ("chaos-victim", injector.prefix + "web-2"):
            task = docker.types.TaskTemplate(
                docker.types.ContainerSpec("busybox", ["sleep", "600"])
            )
            made.append(str(api.create_service(task, name=name)["ID"]))
        for iid in ("web-1/../chaos-victim", "web-1/../../services/chaos-victim", "web-2"):
            with pytest.raises(KilnError, match="nothing injected"):
                injector.kill({"id": iid})
        for service in made:
            replicated = api.inspect_service(service)["Spec"]["Mode"]["Replicated"]
            assert replicated["Replicas"] == 1, service
    finally:
        for service in made:
            api.remove_service(service)
        api.close()
