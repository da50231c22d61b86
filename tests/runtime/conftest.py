"""Real sandboxes for the runtime tests: busybox layer trees, a runtime per home,
and, after every test, proof that each home left nothing on the machine."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sandboxes import build_image_tree, tear_down

import busybox_tree
from kiln.runtime import InstanceSpec
from kiln.runtime.local import LocalRuntime
from leftovers import assert_nothing_left


@pytest.fixture(scope="session")
def image_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shared by every test and owned by host root: nobody/nogroup inside, and it still runs."""
    return build_image_tree(tmp_path_factory.mktemp("image") / "rootfs")


free_port = busybox_tree.free_port


@dataclass
class Tracked:
    """The homes a test used and the secret values it handed out, checked after it."""

    homes: list[Path] = field(default_factory=list)
    secrets: list[bytes] = field(default_factory=list)


@pytest.fixture(autouse=True)
def nothing_left() -> Iterator[Tracked]:
    """Torn down last (autouse fixtures are set up first): by then every runtime is shut down."""
    tracked = Tracked()
    yield tracked
    for home in tracked.homes:
        assert_nothing_left(home, tracked.secrets)


SpecFactory = Callable[..., InstanceSpec]


@pytest.fixture
def make_spec(image_tree: Path, nothing_left: Tracked) -> SpecFactory:
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
            "layers": (image_tree,),
            "command": command,
            "user": None,
            "workdir": "/",
            "env": env,
            "port": port,
            "stop_grace": 2.0,
        }
        fields.update(overrides)
        spec = InstanceSpec(**fields)
        nothing_left.secrets.extend(spec.secrets.values())
        return spec

    return make


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, nothing_left: Tracked) -> Path:
    """Owner-only, as a real KILN_HOME: runc must never need to traverse it."""
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    monkeypatch.setenv("KILN_HOME", str(home))
    nothing_left.homes.append(home)
    return home


@pytest.fixture
def local_runtime(home: Path) -> Iterator[LocalRuntime]:
    runtime = LocalRuntime(home)
    yield runtime
    tear_down(runtime)
