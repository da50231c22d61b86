"""The docker drift check read as an attacker would feed it: the container's writable
layer (overlay2's upper dir) is read on the host, and whoever writes into that layer
chooses its content. Symlinks (static or swapped in while the check runs), FIFOs,
device nodes, sparse files, floods of entries, very deep trees and hostile names must
neither lead the reader out of the layer nor hang it nor hide a planted file, and the
``kiln drift`` text must stay safe to print."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agent_harness import ImageFactory
from starlette.responses import JSONResponse

import kiln.runtime.docker as docker_runtime
from dockerd import Dockerd, docker_engine, tear_down
from kiln.agent.drift import InstanceDrift
from kiln.cli.drift_cmd import _print
from kiln.runtime import DriftExpectation, DriftFinding, InstanceHandle, InstanceSpec
from kiln.runtime.docker import DockerRuntime

__all__ = ["docker_engine"]

pytestmark = [
    pytest.mark.docker,
    pytest.mark.skipif(os.geteuid() != 0, reason="the private engine needs root"),
]

V1 = {"healthz": "ok\n", "index.html": "v1\n"}

FLIPPER = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD, RENAME_EXCHANGE = -100, 2
a, b = sys.argv[1].encode(), sys.argv[2].encode()
while True:
    libc.renameat2(AT_FDCWD, a, AT_FDCWD, b, RENAME_EXCHANGE)
"""
"""Swaps a directory and a symlink to a host directory, atomically, as fast as it can:
what a writer of the layer would do to turn the check's listing into a host read."""


class Started:
    """One container started by the runtime, with what its check expects."""

    def __init__(self, runtime: DockerRuntime, handle: InstanceHandle, digest: str):
        self.runtime = runtime
        self.handle = handle
        self.expected = DriftExpectation(digest, 1, {}, ())

    def check(self) -> DriftFinding | None:
        return self.runtime.check_drift(self.handle, self.expected)

    def layer(self) -> Path:
        api = self.runtime.api
        attrs = api.inspect_container(self.handle.data["container_id"])
        return Path(attrs["GraphDriver"]["Data"]["UpperDir"])


@pytest.fixture
def started(
    kiln_home: Path, busybox_image: ImageFactory, docker_engine: Dockerd
) -> Iterator[Started]:
    digest = busybox_image("web:v1", V1)
    runtime = DockerRuntime(kiln_home, docker_engine.host)
    try:
        spec = InstanceSpec(
            "web-attack", "web", 1, digest, ["httpd", "-f", "-p", "8080", "-h", "/www"], None,
            "/www", {}, 8080,
        )  # fmt: skip
        handle = runtime.start(spec)
        found = Started(runtime, handle, digest)
        assert found.check() is None
        yield found
    finally:
        tear_down(runtime)


def _paths(found: DriftFinding | None) -> list[str]:
    assert found is not None and found.what == "files", found
    return [f.path for f in found.files]


def test_a_directory_swapped_for_a_symlink_mid_check_is_never_followed_out_of_the_layer(
    started: Started, tmp_path: Path
) -> None:
    """Between the listing that saw a directory and the read of it, the entry becomes a
    symlink to a host directory: the check opens each directory from its parent with
    O_NOFOLLOW, so no name from the host ever shows in the report, and a directory gone
    mid-read no longer makes the whole layer read as clean."""
    host = tmp_path / "host-only"
    host.mkdir()
    for n in range(50):
        (host / f"host-secret-{n}").write_text("s")
    layer = started.layer()
    (layer / "planted").write_text("x")
    (layer / "swap").mkdir()
    (layer / "swap" / "inside").write_text("y")
    (layer / "swap-link").symlink_to(host)
    flipper = subprocess.Popen(
        [sys.executable, "-c", FLIPPER, str(layer / "swap"), str(layer / "swap-link")]
    )
    try:
        leaked: list[str] = []
        missed = 0
        for _ in range(200):
            found = started.check()
            paths = [f.path for f in found.files] if found is not None else []
            missed += "/planted" not in paths
            leaked += [p for p in paths if "host-secret" in p]
        assert (missed, leaked[:3]) == (0, [])
    finally:
        flipper.kill()
        flipper.wait()


def test_symlinks_fifos_devices_and_sparse_files_are_listed_never_opened(
    started: Started, tmp_path: Path
) -> None:
    """A FIFO with no writer, a device node, a 1 TiB sparse file, symlinks to /etc/shadow,
    /proc and to themselves: each is one entry in the report, read with lstat only; the
    check neither hangs nor reads them."""
    layer = started.layer()
    os.mkfifo(layer / "fifo")
    os.mknod(layer / "zero", 0o600 | 0o020000, os.makedev(1, 5))
    with open(layer / "sparse", "wb") as f:
        f.truncate(1 << 40)
    (layer / "shadow").symlink_to("/etc/shadow")
    (layer / "proc").symlink_to("/proc")
    (layer / "loop").symlink_to("loop")
    began = time.monotonic()
    found = started.check()
    took = time.monotonic() - began
    assert found is not None
    details = {f.path: (f.change, f.detail) for f in found.files}
    assert details["/sparse"] == ("added", f"file, {1 << 40} bytes")
    assert details["/fifo"] == ("added", "entry, 0 bytes")
    assert set(details) == {"/fifo", "/zero", "/sparse", "/shadow", "/proc", "/loop"}
    assert took < 5, took


def test_a_flood_of_entries_is_bounded_and_cannot_hide_a_planted_file(
    started: Started, monkeypatch: pytest.MonkeyPatch
) -> None:
    """More entries than the check reads (here with the bound lowered to 500, the default
    is 100 000) make the layer drift at ``/``, which no ``drift_ignore`` glob like
    ``/www/cache/**`` hides; the changes kept are bounded too."""
    monkeypatch.setattr(docker_runtime, "MAX_LAYER_ENTRIES", 500)
    monkeypatch.setattr(docker_runtime, "MAX_LAYER_FINDINGS", 100)
    layer = started.layer()
    flood = layer / "www" / "cache"
    flood.mkdir(parents=True)
    for n in range(2000):
        (flood / f"f{n}").touch()
    (layer / "zzz-planted").write_text("x")
    found = started.check()
    assert found is not None and found.what == "files"
    assert found.files[0].path == "/" and "not read to the end" in found.files[0].detail
    assert len(found.files) <= 101


def test_the_default_bound_reads_a_huge_layer_in_bounded_time(started: Started) -> None:
    """150 000 empty files in the layer: the check stops at its bound, reports it, and
    takes about a second, not minutes (the figure is printed)."""
    layer = started.layer()
    flood = layer / "flood"
    flood.mkdir()
    for n in range(150_000):
        os.close(os.open(flood / f"{n}", os.O_CREAT | os.O_WRONLY, 0o600))
    began = time.monotonic()
    found = started.check()
    took = time.monotonic() - began
    print(f"\nFIGURE docker drift check over a 150 000-entry layer: {took:.2f} s")
    assert found is not None and found.files[0].path == "/"
    assert len(found.files) <= docker_runtime.MAX_LAYER_FINDINGS + 1
    assert took < 10, took


def test_a_tree_deeper_than_path_max_is_reported_not_a_way_around_the_layer_read(
    started: Started,
) -> None:
    """A tree whose paths pass PATH_MAX made the host read fail (ENAMETOOLONG) and fall
    back to the engine's diff; read by descriptor with a depth bound, it is reported
    with the file planted beside it."""
    layer = started.layer()
    (layer / "planted").write_text("x")
    fd = os.open(layer, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(100):
            os.mkdir("d" * 200, dir_fd=fd)
            child = os.open("d" * 200, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
        os.close(os.open("bottom", os.O_CREAT | os.O_WRONLY, 0o600, dir_fd=fd))
    finally:
        os.close(fd)
    found = started.check()
    paths = _paths(found)
    assert "/planted" in paths
    assert found is not None
    deep = [f for f in found.files if "deeper than" in f.detail]
    assert len(deep) == 1 and deep[0].path.count("/") == docker_runtime.MAX_LAYER_DEPTH + 1


def test_hostile_names_reach_the_report_but_print_as_escapes(
    started: Started, capsys: pytest.CaptureFixture[str]
) -> None:
    """A name carrying a terminal escape (set the window title, clear the screen), a
    newline that forges a second report line, a right-to-left override and bytes that
    are not UTF-8: the agent's JSON answer carries them (a lone surrogate made it fail
    to encode) and ``kiln drift`` prints each as escapes on the file's one line."""
    layer = started.layer()
    hostile = "\x1b]0;owned\x07\x1b[2J\nweb-x: files: all clean [none]\u202e"
    (layer / hostile).write_text("x")
    os.close(os.open(bytes(layer) + b"/bad-\xff\xfe", os.O_CREAT | os.O_WRONLY, 0o600))
    found = started.check()
    assert found is not None
    drift = InstanceDrift("web", "web-attack", 1, found.what, found.detail, list(found.files))
    report: dict[str, Any] = {"full": True, "instances_checked": 1, "drift": [drift.to_json()]}
    answer = JSONResponse(report)  # as the agent answers kiln drift (and kiln events)
    report = json.loads(answer.body)
    _print(report)
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out
    lines = out.splitlines()
    assert len(lines) == 4, lines
    assert "\\x1b]0;owned\\x07\\x1b[2J\\x0aweb-x: files: all clean [none]\\u202e" in out
    assert "/bad-\\\\xff\\\\xfe" in out


def test_the_reader_never_follows_a_static_symlink_to_a_host_directory(
    started: Started, tmp_path: Path
) -> None:
    """A symlink to a host directory (and one to ``/``) stays one entry: nothing below
    its target is listed."""
    host = tmp_path / "host-only"
    host.mkdir()
    (host / "host-secret").write_text("s")
    layer = started.layer()
    (layer / "etc").mkdir()
    (layer / "etc" / "link").symlink_to(host)
    (layer / "root").symlink_to("/")
    assert sorted(_paths(started.check())) == ["/etc/link", "/root"]
