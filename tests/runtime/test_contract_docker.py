"""The shared runtime contract, run against the Docker runtime on a private engine.

The image is the contract's busybox tree with ``/www/index.html``, built into
the home's store with Kiln's own layer code; the runtime loads it into the
engine on the first start.
"""

# ruff: noqa: F811 - the docker_engine fixture is imported by name and used as a parameter
from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from runtime_contract import AppSpec, RuntimeContract

from dockerd import Dockerd, docker_engine, image_from_trees, tear_down  # noqa: F401
from kiln.image.store import ImageStore
from kiln.runtime import InstanceSpec, Runtime
from kiln.runtime.docker import DockerRuntime

pytestmark = pytest.mark.docker

APP_PORT = 8080
"""Every container has its own address: all of them may listen on the same port."""


@pytest.fixture(scope="module")
def contract_home(
    tmp_path_factory: pytest.TempPathFactory, image_tree: Path, docker_engine: Dockerd
) -> Iterator[tuple[Path, str]]:
    """One home for the module: its networks are made once and removed at the end."""
    home = tmp_path_factory.mktemp("docker-contract") / "home"
    home.mkdir(mode=0o700)
    yield home, image_from_trees(ImageStore(home / "images"), [image_tree])
    tear_down(DockerRuntime(home, docker_engine.host))


class TestDockerRuntimeContract(RuntimeContract):
    @pytest.fixture
    def runtime(self, docker_engine: Dockerd, contract_home: tuple[Path, str]) -> Iterator[Runtime]:
        runtime = DockerRuntime(contract_home[0], docker_engine.host)
        assert isinstance(runtime, Runtime)
        yield runtime
        tear_down(runtime, keep_networks=True)

    @pytest.fixture
    def app_spec(self, contract_home: tuple[Path, str]) -> AppSpec:
        counter = itertools.count(1)
        _, digest = contract_home

        def make(command: list[str], **overrides: Any) -> InstanceSpec:
            port = overrides.pop("port", APP_PORT)
            fields: dict[str, Any] = {
                "instance_id": f"web-{os.getpid():x}{next(counter):03d}",
                "service": "web",
                "revision": 1,
                "image_digest": digest,
                "command": command,
                "user": None,
                "workdir": "/",
                "env": {"PATH": "/bin", "PORT": str(port), **overrides.pop("env", {})},
                "port": port,
                "stop_grace": 2.0,
            }
            fields.update(overrides)
            return InstanceSpec(**fields)

        return make
