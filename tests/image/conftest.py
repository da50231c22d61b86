"""Shared fixtures for the image tests: a store in a temp KILN_HOME, tiny busybox
images built with the image API itself, a private dockerd for `docker load`
(the session's one, shared with the runtime and security tests: tests/dockerd.py),
and the session's one cold Debian bake, whose shared base cache every later Debian
bake of the session finds warm.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest_bake import DEB_CACHE, DebianBake, RecordingProgress, environment, load

from dockerd import Dockerd, docker_engine  # noqa: F401 - a fixture, used by dockerd below
from kiln.image.bake import bake
from kiln.image.digest import (
    MEDIA_TYPE_CONFIG,
    MEDIA_TYPE_MANIFEST,
    Descriptor,
    canonical_json,
)
from kiln.image.layer import LayerResult, layer_from_dir
from kiln.image.store import ImageStore

EPOCH = 1_700_000_000
BUSYBOX = Path("/usr/bin/busybox")


@pytest.fixture(autouse=True)
def kiln_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "kiln-home"
    monkeypatch.setenv("KILN_HOME", str(home))
    return home


@pytest.fixture
def store(kiln_home: Path) -> ImageStore:
    return ImageStore(kiln_home / "images")


def make_busybox_tree(root: Path, message: str = "hello") -> Path:
    """A tiny runnable root filesystem: static busybox, a shell link, a data file."""
    (root / "bin").mkdir(parents=True)
    (root / "etc").mkdir()
    shutil.copy(BUSYBOX, root / "bin" / "busybox")
    os.chmod(root / "bin" / "busybox", 0o755)
    for applet in ("sh", "cat", "ls", "echo"):
        os.symlink("busybox", root / "bin" / applet)
    (root / "etc" / "message").write_text(message + "\n")
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    return root


def build_image(
    store: ImageStore,
    layers: list[LayerResult],
    ref_name: str | None,
    *,
    cmd: list[str] | None = None,
    created: str = "2023-11-14T22:13:20Z",
) -> Descriptor:
    config = {
        "architecture": "amd64",
        "os": "linux",
        "created": created,
        "config": {"Cmd": cmd or ["/bin/cat", "/etc/message"], "Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
        "history": [{"created": created, "created_by": "kiln test"} for _ in layers],
    }
    config_desc = store.put_bytes(canonical_json(config), MEDIA_TYPE_CONFIG)
    manifest = {
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_MANIFEST,
        "config": config_desc.to_json(),
        "layers": [layer.descriptor.to_json() for layer in layers],
    }
    manifest_desc = store.put_bytes(canonical_json(manifest), MEDIA_TYPE_MANIFEST)
    if ref_name is not None:
        store.tag(ref_name, manifest_desc)
    return manifest_desc


@pytest.fixture
def image_builder() -> Callable[..., Descriptor]:
    """``build_image`` as a fixture, since test modules here are not a package."""
    return build_image


@pytest.fixture
def busybox_tree() -> Callable[..., Path]:
    return make_busybox_tree


@pytest.fixture
def busybox_image(store: ImageStore, tmp_path: Path) -> tuple[str, Descriptor]:
    """``web:<12 hex>`` as a bake would tag it: one busybox layer plus one app layer."""
    base = layer_from_dir(make_busybox_tree(tmp_path / "base"), store, EPOCH)
    app = tmp_path / "app"
    app.mkdir()
    (app / "server.sh").write_text("#!/bin/sh\necho serving\n")
    os.chmod(app / "server.sh", 0o755)
    app_layer = layer_from_dir(app, store, EPOCH, normalize_modes=True, prefix="srv/app")
    manifest = build_image(store, [base, app_layer], None)
    ref_name = "web:" + manifest.digest.removeprefix("sha256:")[:12]
    store.tag(ref_name, manifest)
    return ref_name, manifest


@pytest.fixture(scope="session")
def dockerd(docker_engine: Dockerd) -> Path:  # noqa: F811
    """The session's private dockerd (tests/dockerd.py); its socket path."""
    return docker_engine.socket


# Everything of the base a run step could record, except a directory's st_size (how
# many entries the filesystem's directory blocks once held, which no layer carries).
TREE_LISTING = (
    "find /etc /usr /var -xdev \\\\( -type d -printf '%p d %m %U %G %T@\\\\n' \\\\) "
    "-o -printf '%p %y %m %U %G %T@ %s %l\\\\n' | sort"
)

DEBIAN_RECIPE = """[project]
name = "deb"

[images.py]
from = "debian:bookworm"
packages = ["python3-minimal"]
steps = [
  { run = "python3 -c 'print(6 * 7)' > /answer" },
  { run = "TREE_LISTING > /tree" },
]
cmd = ["python3"]
""".replace("TREE_LISTING", TREE_LISTING)


@pytest.fixture(scope="session")
def debian_first_bake(tmp_path_factory: pytest.TempPathFactory) -> DebianBake:
    """One cold bake per session: the shared base cache starts empty, so mmdebstrap
    builds the minimal base and apt resolves the packages; .debs and apt's lists land
    in a fixed cache, so the next session downloads nothing."""
    if os.geteuid() != 0 or shutil.which("mmdebstrap") is None:
        pytest.skip("a Debian bake needs root and mmdebstrap")
    root = tmp_path_factory.mktemp("debian")
    project = root / "project"
    project.mkdir()
    (project / "kiln.toml").write_text(DEBIAN_RECIPE)
    home, bases = root / "home", root / "bases"
    progress = RecordingProgress()
    with environment(
        KILN_HOME=str(home),
        KILN_CACHE=os.environ.get("KILN_CACHE", str(DEB_CACHE)),
        KILN_BASE_CACHE=str(bases),
    ):
        started = time.monotonic()
        result = bake(load(project), progress=progress)["py"]
        seconds = time.monotonic() - started
    return DebianBake(project, home, bases, result, progress, seconds)
