"""A compromised app plants traps in its writable path before it is quarantined; the
evidence of its frozen container, read through ``/proc/PID/root`` on a local engine,
must hold nothing of the host, follow no link, never block on a fifo, and stay bounded
(content and tar headers alike) however many, however deep, its files are.
"""

# ruff: noqa: F811 - the docker_engine fixture is imported by name and used as a parameter
from __future__ import annotations

import os
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sandboxes import image_spec_factory

from dockerd import Dockerd, docker_engine, image_from_trees, tear_down  # noqa: F401
from kiln.image.store import ImageStore
from kiln.runtime import InstanceSpec, procfacts
from kiln.runtime.docker import DockerRuntime

pytestmark = [
    pytest.mark.docker,
    pytest.mark.skipif(os.geteuid() != 0, reason="the private engine needs root"),
]

Spec = Callable[..., InstanceSpec]
DEPTH = 1100
"""Deeper than Python's recursion limit, shallower than PATH_MAX through /proc."""
EMPTY_FILES = 20_000
LIMIT = 1024**2

TRAPS = f"""
set -e
cd /data
echo the-apps-note > note
ln note hard
ln -s /etc/shadow abs
ln -s ../../../../../etc/hostname rel
ln -s / root
ln -s /proc/1/root init-root
mkfifo fifo
printf x > 'new
line'
mkdir a-sub
ln -s .. a-sub/up
mkdir many
cd many
seq 1 {EMPTY_FILES} | xargs touch
cd /data
i=0
while [ $i -lt {DEPTH} ]; do mkdir d; cd d; i=$((i + 1)); done
echo bottom > deep
touch /data/ready
exec sleep 60
"""


@pytest.fixture(scope="module")
def runtime(
    tmp_path_factory: pytest.TempPathFactory, image_tree: Path, docker_engine: Dockerd
) -> Iterator[tuple[DockerRuntime, str]]:
    home = tmp_path_factory.mktemp("evidence-attack") / "home"
    home.mkdir(mode=0o700)
    digest = image_from_trees(ImageStore(home / "images"), [image_tree])
    runtime = DockerRuntime(home, docker_engine.host)
    yield runtime, digest
    tear_down(runtime)


def test_planted_links_fifos_floods_and_depth_leave_the_evidence_bounded_and_inside(
    runtime: tuple[DockerRuntime, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Measured before the fix: the walk raised RecursionError at 1,100 nested
    directories (no evidence at all), and 20,000 empty files wrote a tar of ~10 MiB
    while the bound counted 0 bytes (a million would fill the agent's disk)."""
    docker, digest = runtime
    make: Spec = image_spec_factory(digest, "trap", 1, 8080)
    monkeypatch.setattr(procfacts, "WRITABLE_TAR_MAX", LIMIT)
    handle = docker.start(make(["sh", "-c", TRAPS], writable=("/data",)))
    try:
        deadline = time.monotonic() + 60
        while "ready" not in docker.exec(handle, ["ls", "/data"], 10)[1]:
            assert time.monotonic() < deadline, "the app did not plant its traps"
            time.sleep(0.2)
        docker.freeze(handle)
        began = time.monotonic()
        try:
            facts = docker.collect_evidence(handle, ["/data"], tmp_path)
        finally:
            docker.thaw(handle)
        took = time.monotonic() - began
    finally:
        docker.destroy(handle)
    assert took < 30, f"evidence took {took:.1f}s"
    size = (tmp_path / "writable.tar").stat().st_size
    assert size <= LIMIT + 20 * 1024, f"the tar is {size} bytes, the bound {LIMIT}"
    kept = facts["writable"]
    assert kept["cut"], kept  # what did not fit is named
    with tarfile.open(tmp_path / "writable.tar") as tar:
        members = {m.name: m for m in tar.getmembers()}
        note = tar.extractfile("data/note")
        assert note is not None and note.read() == b"the-apps-note\n"
        links = {n: m.linkname for n, m in members.items() if m.issym()}
        assert links["data/abs"] == "/etc/shadow" and links["data/root"] == "/"
        assert links["data/rel"] == "../../../../../etc/hostname"
        assert links["data/init-root"] == "/proc/1/root"
        assert links["data/a-sub/up"] == ".."
        assert members["data/fifo"].isfifo() and members["data/fifo"].size == 0
        assert members["data/new\nline"].isfile()
        deepest = max(name.count("/") for name in members)
        assert deepest <= procfacts.WRITABLE_DEPTH_MAX + 2, deepest
        for name, member in members.items():
            assert name.startswith("data/") or name == "data", name
            assert ".." not in name.split("/"), name
            if member.isfile():
                content = tar.extractfile(member)
                assert content is not None
                assert b"root:" not in content.read(), f"{name} holds a host file"
