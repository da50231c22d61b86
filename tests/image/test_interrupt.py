"""Ctrl-C on a real ``kiln bake``: in mmdebstrap, in apt's install, in a run step, in packing.

Each test starts ``kiln bake`` as a subprocess, waits until it is inside the
phase, sends SIGINT (to its whole process group, as a terminal's Ctrl-C does,
or to Kiln alone, as ``kill -INT`` does), and then checks that the bake said
``interrupted``, exited 130, and left nothing: no staging dir, no temp blob,
no half-made tag, no mount, runc container or build process, nothing partial
in the shared base cache; and that the next bake succeeds.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest_bake import DEB_CACHE, DebianBake, make_project, needs_busybox

from leftovers import leftovers

KILN = str(Path(sys.executable).parent / "kiln")

pytestmark = [
    needs_busybox,
    pytest.mark.skipif(os.geteuid() != 0, reason="bakes with run steps need root"),
    pytest.mark.skipif(shutil.which("runc") is None, reason="runc not installed"),
    pytest.mark.timeout(600),
]


class Bake:
    """A ``kiln bake`` subprocess whose stderr is read line by line as it comes."""

    def __init__(self, project: Path, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [KILN, "bake", str(project)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, marker: str, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while not any(marker in line for line in self.lines):
            assert self.proc.poll() is None, f"kiln bake ended before {marker!r}:\n{self.text}"
            assert time.monotonic() < deadline, f"no {marker!r} in:\n{self.text}"
            time.sleep(0.05)

    def until(self, check: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            assert self.proc.poll() is None, f"kiln bake ended before {what}:\n{self.text}"
            assert time.monotonic() < deadline, f"never {what}:\n{self.text}"
            time.sleep(0.05)

    def interrupt(self, *, group: bool) -> int:
        if group:
            os.killpg(self.proc.pid, signal.SIGINT)  # a terminal's Ctrl-C
        else:
            self.proc.send_signal(signal.SIGINT)  # kill -INT: Kiln alone
        code = self.proc.wait(timeout=60)
        self._reader.join(timeout=5)
        return code

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


def _env(home: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "KILN_HOME": str(home), **extra}


def _processes_naming(needle: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if needle in cmdline and str(os.getpid()) != entry.name:
            found.append(f"{entry.name}: {cmdline[:160]}")
    return found


def _assert_interrupted_and_clean(bake: Bake, code: int, home: Path) -> None:
    assert code == 130, bake.text
    assert bake.lines[-1] == "interrupted", bake.text
    assert "Traceback" not in bake.text
    assert sorted((home / "tmp").iterdir()) == [], "a staging dir stayed"
    store = home / "images"
    assert sorted((store / ".tmp").iterdir()) == [], "a temp blob stayed"
    for blob in (store / "blobs" / "sha256").iterdir():  # whole blobs only
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name
    assert '"manifests": []' in (store / "index.json").read_text(), "something was tagged"
    assert leftovers(home) == []  # processes, runc containers, mounts, cgroups, run dirs
    pid = bake.proc.pid
    assert not list(Path(tempfile.gettempdir()).glob(f"kiln-debian-{pid}-*"))
    assert _processes_naming(f"kiln-debian-{pid}-") == []


def _rebake(project: Path, env: dict[str, str]) -> str:
    done = subprocess.run(
        [KILN, "bake", str(project)], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.fixture
def warm_project(debian_first_bake: DebianBake, tmp_path: Path) -> Iterator[Path]:
    """The session's Debian project with its kiln.lock, in a place of its own."""
    project = tmp_path / "deb"
    shutil.copytree(debian_first_bake.project, project)
    yield project


@pytest.mark.e2e
@pytest.mark.skipif(shutil.which("mmdebstrap") is None, reason="mmdebstrap not installed")
def test_ctrl_c_in_mmdebstrap_keeps_nothing_of_the_base(
    debian_first_bake: DebianBake, warm_project: Path, tmp_path: Path
) -> None:
    home, bases = tmp_path / "home", tmp_path / "bases"
    env = _env(
        home,
        KILN_BASE_CACHE=str(bases),
        KILN_CACHE=os.environ.get("KILN_CACHE", str(DEB_CACHE)),
    )
    bake = Bake(warm_project, env)
    bake.wait_for("with mmdebstrap")
    marker = f"kiln-debian-{bake.proc.pid}-"
    bake.until(lambda: any("mmdebstrap" in p for p in _processes_naming(marker)), "mmdebstrap ran")
    time.sleep(1.0)
    code = bake.interrupt(group=True)
    _assert_interrupted_and_clean(bake, code, home)
    assert "py: interrupted" in bake.text
    # The shared cache holds nothing partial: no base, nothing being made.
    assert sorted(p.name for p in bases.iterdir() if p.name != ".locks") == []
    # mmdebstrap's own lines went to the log, not to the screen.
    assert not any(line.startswith(("I: ", "W: ")) for line in bake.lines)
    assert "I: " in (home / "cache" / "bake-logs" / "py.log").read_text()

    warm = _env(home, KILN_BASE_CACHE=str(debian_first_bake.bases), KILN_CACHE=env["KILN_CACHE"])
    assert _rebake(warm_project, warm) == f"py@{debian_first_bake.result.digest}"


@pytest.mark.e2e
@pytest.mark.skipif(shutil.which("mmdebstrap") is None, reason="mmdebstrap not installed")
def test_ctrl_c_in_the_packages_install_leaves_no_mount_and_no_shared_layer(
    debian_first_bake: DebianBake, warm_project: Path, tmp_path: Path
) -> None:
    bases = tmp_path / "bases"
    subprocess.run(["cp", "-a", str(debian_first_bake.bases), str(bases)], check=True)
    for layer in bases.glob("layer-*"):
        shutil.rmtree(layer)
    home = tmp_path / "home"
    env = _env(
        home,
        KILN_BASE_CACHE=str(bases),
        KILN_CACHE=os.environ.get("KILN_CACHE", str(DEB_CACHE)),
    )
    bake = Bake(warm_project, env)
    bake.wait_for("installing python3-minimal")
    bake.until(lambda: bool(_processes_naming(f"{home}/tmp/bake-")), "apt ran in the tree")
    code = bake.interrupt(group=False)
    _assert_interrupted_and_clean(bake, code, home)
    assert not list(bases.glob("layer-*")) and not list(bases.glob(".new-*"))
    assert len(list(bases.glob("base-*"))) == 1  # the base in use is untouched

    assert _rebake(warm_project, env) == f"py@{debian_first_bake.result.digest}"
    assert len(list(bases.glob("layer-*"))) == 1


SLEEPER = """
[images.bb]
from = "scratch"
steps = [
  { copy = "rootfs/", to = "/" },
  { run = "sleep 2; echo slept > /slept" },
]
"""


@pytest.mark.parametrize("group", [True, False], ids=["ctrl-c", "kill-int"])
def test_ctrl_c_in_a_run_step_stops_its_container(tmp_path: Path, group: bool) -> None:
    project = make_project(tmp_path / "p", SLEEPER)
    (project / "rootfs" / "bin" / "sleep").symlink_to("busybox")
    home = tmp_path / "home"
    bake = Bake(project, _env(home))
    bake.wait_for("copy rootfs/")
    bake.until(lambda: leftovers(home) != [], "the step's container ran")
    time.sleep(0.5)
    started = time.monotonic()
    code = bake.interrupt(group=group)
    assert time.monotonic() - started < 2.5, "Kiln waited for the step instead of stopping it"
    _assert_interrupted_and_clean(bake, code, home)
    assert "bb: interrupted" in bake.text
    assert _rebake(project, _env(home)).startswith("bb@sha256:")


def test_ctrl_c_while_a_layer_is_packed_stores_no_part_of_it(tmp_path: Path) -> None:
    project = tmp_path / "big"
    (project / "data").mkdir(parents=True)
    with open(project / "data" / "noise", "wb") as f:
        for _ in range(160):
            f.write(os.urandom(1 << 20))  # incompressible: packing takes seconds
    (project / "kiln.toml").write_text(
        '[project]\nname = "big"\n\n[images.big]\nfrom = "scratch"\n'
        'steps = [{ copy = "data/", to = "/data" }]\n'
    )
    home = tmp_path / "home"
    bake = Bake(project, _env(home))
    bake.wait_for("big: baking")
    time.sleep(1.0)
    code = bake.interrupt(group=False)
    assert not any("copy data/" in line for line in bake.lines), "the layer was done already"
    _assert_interrupted_and_clean(bake, code, home)
    assert list((home / "images" / "blobs" / "sha256").iterdir()) == []
    assert _rebake(project, _env(home)).startswith("big@sha256:")
