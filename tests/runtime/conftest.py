"""Real sandboxes for the runtime tests: a busybox rootfs and a runtime per test."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kiln.runtime import InstanceSpec
from kiln.runtime.local import LocalRuntime

BUSYBOX = Path("/bin/busybox")


def build_busybox_rootfs(dest: Path, mount_points: bool = True) -> Path:
    """A minimal image root: static busybox with every applet linked into /bin."""
    (dest / "bin").mkdir(parents=True)
    shutil.copy2(BUSYBOX, dest / "bin" / "busybox")
    applets = subprocess.run(
        [str(BUSYBOX), "--list"], capture_output=True, text=True, check=True
    ).stdout.split()
    for applet in applets:
        if applet != "busybox":
            (dest / "bin" / applet).symlink_to("busybox")
    (dest / "www").mkdir()
    (dest / "www" / "index.html").write_text("hello from kiln\n")
    (dest / "etc").mkdir()
    (dest / "etc" / "passwd").write_text("root:x:0:0::/:/bin/sh\nnobody:x:65534:65534::/:/bin/sh\n")
    (dest / "etc" / "group").write_text("root:x:0:\nnogroup:x:65534:\n")
    if mount_points:
        for name in ("proc", "dev", "tmp", "run", "data", "cache"):
            (dest / name).mkdir()
    for path in sorted(dest.rglob("*"), reverse=True):
        if not path.is_symlink():
            path.chmod(0o755 if path.is_dir() or path.name == "busybox" else 0o644)
    return dest


@pytest.fixture(scope="session")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("image") / "rootfs"
    return build_busybox_rootfs(root)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
