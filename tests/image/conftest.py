"""Shared fixtures for the image tests: a store in a temp KILN_HOME, tiny busybox
images built with the image API itself, and a private dockerd for `docker load`
(the session's one, shared with the runtime and security tests: tests/dockerd.py).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from dockerd import Dockerd, docker_engine  # noqa: F401 - a fixture, used by dockerd below
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
