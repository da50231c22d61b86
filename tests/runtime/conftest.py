"""Real sandboxes for the runtime tests: a busybox rootfs and a runtime per test."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import busybox_tree
from busybox_tree import MOUNT_POINTS
from kiln.runtime import InstanceSpec
from kiln.runtime.local import LocalRuntime


def build_busybox_rootfs(dest: Path, mount_points: bool = True) -> Path:
    """A minimal image root: static busybox with every applet linked into /bin."""
    return busybox_tree.build_busybox_rootfs(
        dest,
        www={"index.html": "hello from kiln\n"},
        mount_points=(*MOUNT_POINTS, "data", "cache") if mount_points else (),
    )


@pytest.fixture(scope="session")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("image") / "rootfs"
    return build_busybox_rootfs(root)


free_port = busybox_tree.free_port


SpecFactory = Callable[..., InstanceSpec]


@pytest.fixture
def make_spec(rootfs: Path) -> SpecFactory:
    counter = iter(range(1, 1000))

    def make(command: list[str], **overrides: Any) -> InstanceSpec:
        port = overrides.pop("port", None) or free_port()
        instance_id = overrides.pop("instance_id", f"web-{os.getpid():x}{next(counter):03d}")
        env = {"PATH": "/bin", "PORT": str(port), **overrides.pop("env", {})}
        fields: dict[str, Any] = {
            "instance_id": instance_id,
            "service": "web",
            "revision": 1,
            "image_digest": "sha256:" + "ab" * 32,
            "rootfs": rootfs,
            "command": command,
            "user": None,
            "workdir": "/",
            "env": env,
            "port": port,
            "stop_grace": 5.0,
        }
        fields.update(overrides)
        return InstanceSpec(**fields)

    return make


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("KILN_HOME", str(home))
    return home


@pytest.fixture
def local_runtime(home: Path) -> Iterator[LocalRuntime]:
    runtime = LocalRuntime(home)
    yield runtime
    if runtime.instances_dir.is_dir():
        for directory in runtime.instances_dir.iterdir():
            handle = runtime.handle_for(directory.name)
            if handle is not None:
                runtime.stop(handle, grace=0)
                runtime.destroy(handle)
