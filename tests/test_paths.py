"""KILN_HOME is owner-only: made so by every entry point, checked after real flows."""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kiln.agent.client import AgentClient, start_background
from kiln.paths import HOME_DIRS, ensure_home, open_private, private_dirs, write_private

KILN = str(Path(sys.executable).parent / "kiln")
IMAGE_CONTENT = ("rootfs", "snapshots")
"""Unpacked images: their modes are the image's; only the top directory must be 0700."""


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def loose_entries(home: Path, exempt: tuple[str, ...] = IMAGE_CONTENT) -> list[str]:
    """Every file or directory under ``home`` that its group or others could use.

    For a name in ``exempt`` only a top-level directory's own mode is checked.
    """
    found = [] if mode(home) == 0o700 else [f"{mode(home):o} {home}"]
    for dirpath, dirnames, filenames in os.walk(home):
        rel = Path(dirpath).relative_to(home)
        if rel.parts and rel.parts[0] in exempt:
            dirnames[:] = []
            continue
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = os.lstat(path)
            skipped = not rel.parts and name in exempt and not stat.S_ISDIR(st.st_mode)
            if not skipped and not stat.S_ISLNK(st.st_mode) and st.st_mode & 0o077:
                found.append(f"{stat.S_IMODE(st.st_mode):o} {path.relative_to(home)}")
    return found


# -- the helpers ----------------------------------------------------------------


def test_ensure_home_creates_a_private_home(tmp_path: Path) -> None:
    home = ensure_home(tmp_path / "a" / "home")
    assert mode(home) == 0o700 and mode(home.parent) == 0o700
    assert {p.name for p in home.iterdir()} == set(HOME_DIRS)
    assert loose_entries(home) == []


def test_ensure_home_tightens_an_older_home(tmp_path: Path) -> None:
    """What an older Kiln left at the top level is tightened; symlinks are not followed."""
    home = tmp_path / "home"
    home.mkdir(mode=0o755)
    home.chmod(0o755)
    (home / "state.db").write_text("")
    (home / "state.db").chmod(0o644)
    (home / "logs").mkdir(mode=0o755)
    (home / "logs").chmod(0o755)
    outside = tmp_path / "outside"
    outside.write_text("")
    outside.chmod(0o644)
    (home / "link").symlink_to(outside)
    ensure_home(home)
    assert (mode(home), mode(home / "state.db"), mode(home / "logs")) == (0o700, 0o600, 0o700)
    assert mode(outside) == 0o644
    assert loose_entries(home) == []


def test_ensure_home_refuses_a_file_with_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "home").write_text("")
    with pytest.raises(Exception, match="cannot make KILN_HOME private"):
        ensure_home(tmp_path / "home")


def test_private_files_and_dirs_ignore_a_loose_umask(tmp_path: Path) -> None:
    """Created owner-only whatever the umask; an existing parent is left as it is."""
    tmp_path.chmod(0o755)
    old = os.umask(0)
    try:
        private_dirs(tmp_path / "a" / "b")
        os.close(open_private(tmp_path / "a" / "b" / "f", os.O_WRONLY))
        write_private(tmp_path / "a" / "g", b"data")
    finally:
        os.umask(old)
    modes = {p.name: mode(p) for p in (tmp_path / "a").rglob("*")}
    assert modes == {"b": 0o700, "f": 0o600, "g": 0o600}
    assert (mode(tmp_path / "a"), mode(tmp_path)) == (0o700, 0o755)
    assert (tmp_path / "a" / "g").read_bytes() == b"data"


# -- real flows -------------------------------------------------------------------

RECIPE = """\
[project]
name = "tiny"

[images.web]
from = "scratch"
steps = [{ copy = "www/", to = "/www" }]
cmd = ["/bin/httpd"]
"""


def bake(project: Path, home: Path, umask: int = 0o022) -> str:
    """``kiln bake`` in a child with ``umask``; returns the printed digest."""
    out = subprocess.run(
        [KILN, "bake", str(project)],
        env=dict(os.environ, KILN_HOME=str(home)),
        capture_output=True,
        text=True,
        check=True,
        preexec_fn=lambda: os.umask(umask),
    )
    return out.stdout.strip()


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    (root / "www").mkdir(parents=True)
    (root / "www" / "index.html").write_text("hello\n")
    (root / "kiln.toml").write_text(RECIPE)
    return root


def test_kiln_bake_leaves_a_private_home_and_the_same_digest(project: Path, tmp_path: Path) -> None:
    """An existing world-readable home is made 0700 by the CLI; image content is not
    touched by any of it: two bakes under different umasks give one digest."""
    home = tmp_path / "home"
    home.mkdir(mode=0o755)
    home.chmod(0o755)
    digest = bake(project, home)
    assert digest.startswith("web@sha256:")
    assert loose_entries(home, IMAGE_CONTENT) == []
    assert mode(home / "images") == mode(home / "cache") == 0o700
    assert bake(project, tmp_path / "other", umask=0o077) == digest


def test_image_store_and_caches_are_owner_only(project: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    bake(project, home)
    assert loose_entries(home) == []


def test_kiln_schema_creates_no_home(tmp_path: Path) -> None:
    home = tmp_path / "home"
    subprocess.run(
        [KILN, "schema"], env=dict(os.environ, KILN_HOME=str(home)), capture_output=True, check=True
    )
    assert not home.exists()


@contextlib.contextmanager
def running_agent(home: Path) -> Iterator[AgentClient]:
    start_background(home)
    client = AgentClient(home)
    try:
        yield client
    finally:
        with contextlib.suppress(Exception):
            client.down()
        client.close()
        with contextlib.suppress(OSError, ValueError):
            os.kill(int((home / "agent.pid").read_text()), signal.SIGKILL)
        from kiln.traffic.haproxy import HAProxyRouter

        with contextlib.suppress(Exception):
            HAProxyRouter(home).stop()


def test_an_agent_keeps_its_home_private(tmp_path: Path) -> None:
    """State database with its WAL, sockets, pid files and logs of the agent and HAProxy."""
    home = tmp_path / "home"
    home.mkdir(mode=0o755)
    home.chmod(0o755)
    (home / "agent.log").write_text("from an older kiln\n")
    (home / "agent.log").chmod(0o644)
    with running_agent(home) as client:
        assert client.events()
        names = {p.name for p in home.iterdir()}
        assert {"state.db", "state.db-wal", "agent.sock", "agent.log", "haproxy"} <= names
        assert {"router.json", "haproxy.log"} <= {p.name for p in (home / "haproxy").iterdir()}
        assert loose_entries(home) == []
    assert loose_entries(home) == []
