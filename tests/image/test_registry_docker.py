"""``docker pull`` reads what ``kiln push`` wrote: a real ``docker-registry`` on loopback
without TLS (Docker treats 127.0.0.0/8 registries as insecure by default, so the test's
private engine needs no flag) and the session's private Docker Engine.
"""

# ruff: noqa: F811 - the docker_engine fixture is imported by name and used as a parameter

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from busybox_tree import free_port
from dockerd import Dockerd, docker_engine  # noqa: F401
from kiln.image.digest import Descriptor
from kiln.image.registry import RegistryOptions, push
from kiln.image.store import ImageStore
from registry_server import REGISTRY_BIN, serve_registry

pytestmark = pytest.mark.docker


@pytest.fixture(scope="module")
def plain_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``HOST:PORT`` of a docker-registry on 127.0.0.1 with neither TLS nor auth."""
    if not REGISTRY_BIN.exists():
        pytest.skip("docker-registry not installed")
    root = tmp_path_factory.mktemp("plain-registry")
    port = free_port()
    config = {
        "version": 0.1,
        "log": {"level": "info"},
        "storage": {"filesystem": {"rootdirectory": str(root / "data")}},
        "http": {"addr": f"127.0.0.1:{port}", "secret": "kiln-test-secret"},
    }
    with serve_registry(root, config, port):
        yield f"127.0.0.1:{port}"


def docker(engine: Dockerd, *args: str) -> str:
    done = subprocess.run(
        ["docker", "-H", engine.host, *args], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_docker_pull_by_digest_reads_what_kiln_pushed(
    docker_engine: Dockerd,
    plain_registry: str,
    store: ImageStore,
    tmp_path: Path,
    busybox_tree: Callable[..., Path],
    image_builder: Callable[..., Descriptor],
) -> None:
    from kiln.image.layer import layer_from_dir

    tree = busybox_tree(tmp_path / "bb", "pushed by kiln")
    extra = tmp_path / "extra"
    (extra / "srv").mkdir(parents=True)
    (extra / "srv" / "data.bin").write_bytes(os.urandom(200_000))
    layers = [layer_from_dir(tree, store, 0), layer_from_dir(extra, store, 0)]
    manifest = image_builder(store, layers, "docker-reads:1", cmd=["/bin/cat", "/etc/message"])
    pushed = push(
        store,
        "docker-reads:1",
        f"{plain_registry}/kiln/docker-reads:1",
        RegistryOptions(plain_http=True),
    )
    assert pushed.digest == manifest.digest
    ref = f"{plain_registry}/kiln/docker-reads@{manifest.digest}"
    docker(docker_engine, "pull", ref)
    try:
        info = json.loads(docker(docker_engine, "image", "inspect", ref))[0]
        config_digest = store.read_json(manifest.digest)["config"]["digest"]
        config = store.read_json(config_digest)
        assert info["Id"] in (config_digest, manifest.digest)
        assert ref in info["RepoDigests"]
        assert info["Config"]["Cmd"] == ["/bin/cat", "/etc/message"]
        assert info["Config"]["Env"] == config["config"]["Env"]
        assert info["RootFS"]["Layers"] == config["rootfs"]["diff_ids"]
        out = docker(docker_engine, "run", "--rm", "--network", "none", ref)
        assert out == "pushed by kiln\n"
    finally:
        subprocess.run(
            ["docker", "-H", docker_engine.host, "image", "rm", "-f", ref],
            capture_output=True,
            timeout=60,
        )
