"""The machine's shared Debian bases on small real trees, and the build-command runner.

What must hold: an entry appears whole or not at all, anything that fails a
check is absent, a build of a bake that died is swept, waiting for a lock
gives way to Ctrl-C, and a command stopped on Ctrl-C leaves no process.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from kiln.errors import KilnError
from kiln.image.basecache import DEFAULT_BASE_CACHE, BaseCache, base_cache, tree_listing_digest
from kiln.image.command import Interrupted, isolated, run_logged

STATUS = (
    "Package: base-files\nStatus: install ok installed\nVersion: 12.4\n\n"
    "Package: dash\nStatus: install ok installed\nVersion: 0.5.12-2\n"
)
PACKAGES = {"base-files": "12.4", "dash": "0.5.12-2"}


def _tree(root: Path) -> Path:
    (root / "var" / "lib" / "dpkg").mkdir(parents=True)
    (root / "var" / "lib" / "dpkg" / "status").write_text(STATUS)
    (root / "etc").mkdir()
    (root / "etc" / "hostname.sample").write_text("kiln\n")
    (root / "bin").symlink_to("usr/bin")
    return root


def _publish(cache: BaseCache, tmp_path: Path, key: str = "k" * 64) -> Path:
    tree = _tree(tmp_path / "built" / "rootfs")
    blob = tmp_path / "blob.tar.gz"
    blob.write_bytes(b"\x1f\x8b layer bytes")
    layer = {"digest": "sha256:" + "a" * 64, "diff_id": "sha256:" + "b" * 64}
    layer |= {"size": blob.stat().st_size, "size_uncompressed": 100}
    with cache.lock(f"base-{key[:32]}", exclusive=True), cache.staging() as staging:
        cache.publish_base(staging, key, tree, blob, layer, {"suite": "bookworm"}, PACKAGES)
    return cache.root / f"base-{key[:32]}"


def test_a_published_base_is_whole_and_found(tmp_path: Path) -> None:
    cache = BaseCache(tmp_path / "bases")
    path = _publish(cache, tmp_path)
    found = cache.base("k" * 64)
    assert found is not None and found.path == path
    assert (
        found.packages == PACKAGES and found.layer.size == (tmp_path / "blob.tar.gz").stat().st_size
    )
    assert (found.fs / "etc" / "hostname.sample").read_text() == "kiln\n"
    assert (
        oct(path.stat().st_mode & 0o777) == "0o700"
        and oct(cache.root.stat().st_mode & 0o777) == "0o700"
    )
    assert [p.name for p in cache.root.iterdir() if p.name.startswith(".new-")] == []
    assert not (tmp_path / "built" / "rootfs").exists()  # moved, not copied
    assert cache.base("j" * 64) is None


@pytest.mark.parametrize(
    "damage",
    ["a file grew", "a mode changed", "dpkg disagrees", "no record", "blob cut short", "no tree"],
)
def test_a_damaged_base_is_absent(tmp_path: Path, damage: str) -> None:
    cache = BaseCache(tmp_path / "bases")
    path = _publish(cache, tmp_path)
    if damage == "a file grew":
        (path / "fs" / "etc" / "hostname.sample").write_text("kiln!\n")
    elif damage == "a mode changed":
        os.chmod(path / "fs" / "etc", 0o700)
    elif damage == "dpkg disagrees":
        status = path / "fs" / "var" / "lib" / "dpkg" / "status"
        status.write_text(STATUS.replace("0.5.12-2", "0.5.12-3"))
    elif damage == "no record":
        (path / "record.json").unlink()
    elif damage == "blob cut short":
        (path / "layer.tar.gz").write_bytes(b"\x1f")
    else:
        os.rename(path / "fs", tmp_path / "moved-away")
    assert cache.base("k" * 64) is None
    # Made again, it replaces the damaged one.
    assert _publish(cache, tmp_path / "again") == path
    assert cache.base("k" * 64) is not None


def test_what_a_dead_bake_was_making_is_never_seen_and_is_swept(tmp_path: Path) -> None:
    cache = BaseCache(tmp_path / "bases")
    _publish(cache, tmp_path)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    half = cache.root / f".new-{int(dead.stdout)}-deadbeef"
    _tree(half / "fs")
    mine = cache.root / f".new-{os.getpid()}-cafe"
    mine.mkdir()
    assert cache.records().keys() == {"k" * 64}
    cache.sweep()
    assert not half.exists() and mine.exists()


def test_staging_is_removed_when_making_fails(tmp_path: Path) -> None:
    cache = BaseCache(tmp_path / "bases")
    with pytest.raises(RuntimeError), cache.staging() as staging:
        (staging / "fs").mkdir()
        raise RuntimeError("mmdebstrap failed")
    assert [p.name for p in cache.root.iterdir() if p.name != ".locks"] == []


def test_the_listing_digest_sees_every_change_but_a_directorys_size(tmp_path: Path) -> None:
    root = _tree(tmp_path / "t")
    first = tree_listing_digest(root)
    assert tree_listing_digest(root) == first
    etc = (root / "etc").stat()
    for name in range(40):  # grows the directory's blocks
        (root / "etc" / f"f{name}").touch()
    for name in range(40):
        (root / "etc" / f"f{name}").unlink()
    os.utime(root / "etc", ns=(etc.st_atime_ns, etc.st_mtime_ns))
    assert tree_listing_digest(root) == first
    (root / "bin").unlink()
    (root / "bin").symlink_to("usr/sbin")
    assert tree_listing_digest(root) != first


def test_waiting_for_a_base_gives_way_to_ctrl_c(tmp_path: Path) -> None:
    cache = BaseCache(tmp_path / "bases")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time; from pathlib import Path\n"
            "from kiln.image.basecache import BaseCache\n"
            f"c = BaseCache(Path({str(cache.root)!r}))\n"
            "with c.lock('base-x', exclusive=True):\n"
            "    print('held', flush=True); time.sleep(60)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        interrupted = threading.Event()
        threading.Timer(0.3, interrupted.set).start()
        started = time.monotonic()
        with (
            pytest.raises(Interrupted),
            cache.lock("base-x", exclusive=False, cancelled=interrupted),
        ):
            pass
        assert time.monotonic() - started < 2
    finally:
        holder.kill()
        holder.wait()
    with cache.lock("base-x", exclusive=False):  # free once its holder is gone
        pass


def test_the_current_base_and_the_switch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = BaseCache(tmp_path / "bases")
    assert cache.current("bookworm", "amd64", 0) is None
    cache.set_current("bookworm", "amd64", 0, "k" * 64)
    assert cache.current("bookworm", "amd64", 0) == "k" * 64
    assert cache.current("trixie", "amd64", 0) is None
    monkeypatch.delenv("KILN_BASE_CACHE", raising=False)
    default = base_cache()
    assert default is not None and default.root == DEFAULT_BASE_CACHE
    for off in ("off", "", "none"):
        monkeypatch.setenv("KILN_BASE_CACHE", off)
        assert base_cache() is None
    monkeypatch.setenv("KILN_BASE_CACHE", str(tmp_path / "elsewhere"))
    chosen = base_cache()
    assert chosen is not None and chosen.root == tmp_path / "elsewhere"


def test_a_command_logs_its_lines_and_keeps_the_last(tmp_path: Path) -> None:
    log = io.StringIO()
    seen: list[str] = []
    code, tail = run_logged(
        ["sh", "-c", "for i in $(seq 1 30); do echo line $i; done; printf 'a\\rb'; exit 3"],
        log=log,
        on_line=seen.append,
    )
    assert code == 3
    assert tail == (*(f"line {i}" for i in range(12, 31)), "b")
    assert seen[0] == "line 1" and log.getvalue().splitlines()[-1] == "b"
    with pytest.raises(KilnError, match="cannot run kiln-no-such-tool"):
        run_logged(["kiln-no-such-tool"])


@pytest.mark.skipif(os.geteuid() != 0, reason="pid namespaces need root")
def test_a_command_stopped_on_ctrl_c_leaves_no_process(tmp_path: Path) -> None:
    """Its whole pid namespace is gone before run_logged returns."""
    marker = "1000.4242"
    interrupted = threading.Event()
    threading.Timer(0.5, interrupted.set).start()
    started = time.monotonic()
    with pytest.raises(Interrupted):
        run_logged(
            isolated(["sh", "-c", f"setsid sleep {marker} & sleep {marker}; wait"]),
            cancelled=interrupted,
        )
    assert time.monotonic() - started < 3
    survivors = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker.encode() in (entry / "cmdline").read_bytes():
                survivors.append(entry.name)
        except OSError:
            continue
    assert survivors == []
    assert json.dumps(isolated(["x"], network=False)).count("--net") == 1
