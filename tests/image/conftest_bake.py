"""Helpers for the bake tests: busybox projects, a progress recorder, the store's state.

Imported by test_bake.py and friends (tests/image/conftest.py belongs to the
image-core tests and already points KILN_HOME at a temp dir for every test).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from kiln.image.bake import BakeResult
from kiln.image.store import ImageStore
from kiln.paths import kiln_home
from kiln.spec import load_spec
from kiln.spec.models import Spec

BUSYBOX = Path("/bin/busybox")
DEB_CACHE = Path("/var/cache/kiln-test")

needs_busybox = pytest.mark.skipif(not BUSYBOX.exists(), reason="busybox-static not installed")


def make_project(root: Path, recipes: str, *, files: dict[str, str] | None = None) -> Path:
    """A project with ``rootfs/bin/busybox`` and ``sh`` → busybox, plus ``files``."""
    root.mkdir(parents=True, exist_ok=True)
    bin_dir = root / "rootfs" / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(BUSYBOX, bin_dir / "busybox")
    os.chmod(bin_dir / "busybox", 0o755)
    if not (bin_dir / "sh").is_symlink():
        (bin_dir / "sh").symlink_to("busybox")
    for rel, text in (files or {}).items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (root / "kiln.toml").write_text('[project]\nname = "test"\n\n' + recipes)
    return root


BUSYBOX_RECIPE = """
[images.bb]
from = "scratch"
steps = [
  { copy = "rootfs/", to = "/" },
  { copy = "app/", to = "/srv/app" },
  { run = "mkdir -p /etc; echo baked > /etc/marker; ls /srv/app > /srv/listing; echo listed" },
  { env = { GREETING = "hi" } },
  { workdir = "/srv/app" },
  { run = ["/bin/sh", "-c", "echo $GREETING > greeting.txt"] },
]
env = { APP = "demo" }
cmd = ["/bin/sh", "-c", "cat greeting.txt"]
expose = [8080]
labels = { team = "core" }
"""

APP_FILES = {"app/main.sh": "echo main\n", "app/data/notes.txt": "notes\n"}


def load(root: Path) -> Spec:
    return load_spec(root / "kiln.toml")


def default_store() -> ImageStore:
    return ImageStore(kiln_home() / "images")


def index_refs(store: ImageStore) -> list[tuple[str, str]]:
    data = json.loads((store.root / "index.json").read_text())
    return [
        (m.get("annotations", {}).get("org.opencontainers.image.ref.name", ""), m["digest"])
        for m in data["manifests"]
    ]


def staging_dirs() -> list[Path]:
    tmp = kiln_home() / "tmp"
    return sorted(tmp.iterdir()) if tmp.is_dir() else []


@dataclass
class RecordingProgress:
    """Keeps every progress event, for asserting what a bake did step by step."""

    events: list[tuple[Any, ...]] = field(default_factory=list)

    def image_started(self, image: str, steps: int) -> None:
        self.events.append(("image_started", image, steps))

    def step_started(self, image: str, index: int, label: str) -> None:
        self.events.append(("step_started", image, index, label))

    def step_output(self, image: str, index: int, line: str) -> None:
        self.events.append(("output", image, index, line))

    def step_status(self, image: str, index: int, text: str) -> None:
        self.events.append(("status", image, index, text))

    def step_finished(
        self, image: str, index: int, label: str, cached: bool, seconds: float, size: int | None
    ) -> None:
        self.events.append(("step_finished", image, index, label, cached, size))

    def image_finished(self, image: str, digest: str, seconds: float) -> None:
        self.events.append(("image_finished", image, digest))

    def image_failed(self, image: str, message: str) -> None:
        self.events.append(("image_failed", image, message))

    def finished(self, image: str) -> list[tuple[Any, ...]]:
        return [e for e in self.events if e[0] == "step_finished" and e[1] == image]

    def output(self, image: str) -> list[str]:
        return [str(e[3]) for e in self.events if e[0] == "output" and e[1] == image]

    def statuses(self, image: str) -> list[str]:
        return [str(e[3]) for e in self.events if e[0] == "status" and e[1] == image]


@contextlib.contextmanager
def environment(**values: str) -> Iterator[None]:
    """Set environment variables for a block (session fixtures cannot monkeypatch)."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@dataclass(frozen=True)
class DebianBake:
    """The session's cold Debian bake: its project (with the kiln.lock it wrote), home,
    shared base cache, result, progress events and time."""

    project: Path
    home: Path
    bases: Path
    result: BakeResult
    progress: RecordingProgress
    seconds: float

    def warm(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Bake with this session's (warm) shared bases and the fixed download cache."""
        monkeypatch.setenv("KILN_BASE_CACHE", str(self.bases))
        monkeypatch.setenv("KILN_CACHE", os.environ.get("KILN_CACHE", str(DEB_CACHE)))
