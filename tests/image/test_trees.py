"""The tree cache: re-bakes over a cached, read-only base tree through overlayfs.

Real mounts, real bwrap, real store. The digests must not depend on whether a
step ran over an overlay or over a plain unpacked tree.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest_bake import DEB_CACHE, default_store, load, make_project, needs_busybox, staging_dirs

from kiln.image import trees
from kiln.image.bake import bake, collect_garbage, tree_root
from kiln.image.unpack import unpack_image
from kiln.paths import kiln_home

pytestmark = [
    needs_busybox,
    pytest.mark.skipif(os.geteuid() != 0, reason="overlay mounts need root"),
]

# The base is its own image, so the app image has a base chain to keep as a tree.
# Its run step links /etc/linked to /etc/data: a base with a hard link.
BASE_RUN = "; ".join(
    [
        "mkdir -p /usr/share/doc/pkg /var/lib/pkg /srv",
        "echo doc > /usr/share/doc/pkg/README",
        "echo data > /etc/data",
        "ln /etc/data /etc/linked",
        "echo lock > /var/lib/pkg/lock",
        "echo same > /etc/same",
    ]
)
# Every way a step can touch the base: write in place (through a hard link), open
# for writing without writing (apt's locks), remove a directory, add under a base
# directory, chmod, replace by rename.
APP_RUN = "; ".join(
    [
        "cat /srv/app/main.sh > /srv/app/compiled",
        "exec 3<>/var/lib/pkg/lock",
        "echo more >> /etc/data",
        "rm -r /usr/share/doc/pkg",
        "mkdir -p /usr/share/new",
        "echo n > /usr/share/new/file",
        "chmod 600 /etc/message",
        "cat /etc/linked > /srv/linked",
        "cat /etc/same > /etc/same.tmp",
        "mv /etc/same.tmp /etc/moved",
    ]
)
LISTING = (
    "ls -la /etc /srv /usr/share /var/lib/pkg | busybox awk '{print $1, $5, $9}' > /tmp/ls; "
    "cat /tmp/ls > /srv/ls"
)
RECIPES = f"""
[images.base]
from = "scratch"
steps = [{{ copy = "rootfs/", to = "/" }}, {{ run = "{BASE_RUN}" }}]

[images.app]
from = "image:base"
steps = [
  {{ copy = "app/", to = "/srv/app" }},
  {{ run = "{APP_RUN}" }},
  {{ run = "{LISTING}" }},
]
"""

FILES = {"app/main.sh": "echo v1\n", "rootfs/etc/message": "hello\n"}


def _project(root: Path) -> Path:
    return make_project(root, RECIPES, files=FILES)


def _bake_app(project: Path, *, no_cache: bool = False) -> str:
    return bake(load(project), ["app"], no_cache=no_cache)["app"].digest


def _fingerprint(root: Path) -> dict[str, tuple[object, ...]]:
    """Everything about a tree a write could change, ctime and inode included."""
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            content = b""
            if os.path.isfile(path) and not os.path.islink(path):
                content = hashlib.sha256(Path(path).read_bytes()).digest()
            out[os.path.relpath(path, root)] = (
                st.st_mode,
                st.st_uid,
                st.st_size,
                st.st_mtime_ns,
                st.st_ctime_ns,
                st.st_ino,
                st.st_nlink,
                content,
            )
    return out


def _mounts_in_home() -> list[str]:
    home = str(kiln_home())
    return [line for line in Path("/proc/self/mounts").read_text().splitlines() if home in line]


def _no_overlay(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trees, "overlay_usable", lambda scratch: False)


def test_mount_commands_are_data() -> None:
    argv = trees.overlay_mount_argv(
        Path("/t/rootfs"), Path("/s/upper"), Path("/s/work"), Path("/s/m")
    )
    assert argv == [
        "mount",
        "-t",
        "overlay",
        "overlay",
        "-o",
        "lowerdir=/t/rootfs,upperdir=/s/upper,workdir=/s/work,index=on,redirect_dir=on",
        "/s/m",
    ]
    assert trees.umount_argv(Path("/s/m")) == ["umount", "/s/m"]
    assert trees.umount_argv(Path("/s/m"), lazy=True) == ["umount", "--lazy", "/s/m"]
    assert trees.options_safe(Path("/a/b")) and not trees.options_safe(Path("/a,b"))


def test_rebake_over_the_tree_gives_the_plain_digest_and_leaves_the_tree_untouched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = _project(tmp_path / "p")
    first = _bake_app(project)
    assert trees.overlay_usable(kiln_home() / "tmp"), "overlayfs is expected on this machine"
    [tree] = [p for p in tree_root().iterdir() if not p.name.startswith(".")]
    before = _fingerprint(tree)

    (project / "app" / "main.sh").write_text("echo v2\n")
    started = time.monotonic()
    overlay = _bake_app(project)
    seconds = time.monotonic() - started
    print(f"re-bake over the tree: {seconds:.2f}s")
    assert overlay != first
    assert _fingerprint(tree) == before, "a run step wrote into the shared tree"
    assert _no_mounts_left()

    no_cache = _bake_app(project, no_cache=True)
    assert _fingerprint(tree) == before

    monkeypatch.setenv("KILN_HOME", str(tmp_path / "plain-home"))
    _no_overlay(monkeypatch)
    plain = _bake_app(project)
    assert not tree_root().exists()
    assert overlay == no_cache == plain

    dest = tmp_path / "out"
    unpack_image(default_store(), f"app@{plain}", dest)
    assert (dest / "srv" / "linked").read_text() == "data\nmore\n"  # the hard link held
    assert (dest / "etc" / "data").read_text() == "data\nmore\n"
    assert not (dest / "usr" / "share" / "doc" / "pkg").exists()
    assert (dest / "var" / "lib" / "pkg" / "lock").read_text() == "lock\n"


def test_a_file_opened_for_writing_but_not_written_is_not_in_the_layer(tmp_path: Path) -> None:
    """The copy-up that opening a base file for writing causes is not a change."""
    import gzip
    import tarfile

    project = _project(tmp_path / "p")
    digest = _bake_app(project)
    store = default_store()
    layers = store.manifest(f"app@{digest}")["layers"]
    with (
        store.open_blob(layers[-2]["digest"]) as blob,
        gzip.open(blob) as raw,
        tarfile.open(fileobj=raw) as tf,
    ):
        names = tf.getnames()
    assert "var/lib/pkg/lock" not in names
    assert "usr" not in names and "usr/share" in names  # only the directories that changed
    assert {"etc/data", "etc/linked", "etc/message", "usr/share/doc/.wh.pkg"} <= set(names)


def _no_mounts_left() -> bool:
    return _mounts_in_home() == []


_KILLABLE = """
import sys
from pathlib import Path
from kiln.image.bake import bake
from kiln.spec import load_spec
bake(load_spec(Path(sys.argv[1])), ["slow"])
"""


def test_a_killed_bake_leaves_a_mount_that_the_next_bake_removes(tmp_path: Path) -> None:
    project = make_project(
        tmp_path / "p",
        RECIPES
        + """
[images.slow]
from = "image:base"
steps = [{ run = "echo started; busybox sleep 30" }]
""",
        files=FILES,
    )
    bake(load(project), ["base"])
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLABLE, str(project / "kiln.toml")], env=dict(os.environ)
    )
    try:
        deadline = time.monotonic() + 30
        while not _mounts_in_home():
            assert time.monotonic() < deadline, "the bake never mounted its rootfs"
            time.sleep(0.05)
        time.sleep(0.3)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    try:
        assert len(_mounts_in_home()) == 1
        bake(load(project), ["app"])
        assert _no_mounts_left()
        assert staging_dirs() == []
    finally:
        for point in trees.mounts_under(kiln_home()):
            trees.unmount(point)


def test_gc_removes_trees_nothing_references(tmp_path: Path) -> None:
    project = _project(tmp_path / "p")
    _bake_app(project)
    store = default_store()
    kept = collect_garbage(store)
    live = [p for p in tree_root().iterdir() if not p.name.startswith(".")]
    assert len(live) == 1

    for ref in ("app", "base"):
        while True:
            try:
                store.remove(ref)
            except Exception:
                break
    shutil.rmtree(kiln_home() / "cache" / "layers")
    result = collect_garbage(store)
    assert list(tree_root().iterdir()) == []
    assert result.freed_bytes > kept.freed_bytes
    assert result.freed_bytes >= (project / "rootfs" / "bin" / "busybox").stat().st_size


def test_gc_keeps_a_tree_that_a_bake_has_mounted(tmp_path: Path) -> None:
    project = _project(tmp_path / "p")
    _bake_app(project)
    [tree] = [p for p in tree_root().iterdir() if not p.name.startswith(".")]
    staging = tmp_path / "staging"
    staging.mkdir()
    rootfs = trees.OverlayRootfs(tree, staging)
    rootfs.mount()
    try:
        assert (rootfs.merged / "etc" / "message").read_text() == "hello\n"
        freed = trees.TreeCache(tree_root()).remove_unreferenced(lambda digests: False)
        assert freed == 0 and tree.is_dir()
    finally:
        assert rootfs.unmount()
    assert trees.TreeCache(tree_root()).remove_unreferenced(lambda digests: False) > 0
    assert not tree.exists()


SHOP = Path(__file__).resolve().parents[2] / "examples" / "shop"


@pytest.mark.e2e
@pytest.mark.timeout(900)
@pytest.mark.skipif(shutil.which("mmdebstrap") is None, reason="mmdebstrap not installed")
def test_shop_rebake_after_an_app_edit_is_fast_and_the_same_as_unpacking(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = tmp_path / "shop"
    shutil.copytree(SHOP, project)
    monkeypatch.setenv("KILN_CACHE", os.environ.get("KILN_CACHE", str(DEB_CACHE)))
    started = time.monotonic()
    bake(load(project), ["web"])
    cold = time.monotonic() - started

    with (project / "app" / "server.py").open("a") as f:
        f.write("# edited\n")
    started = time.monotonic()
    fast = bake(load(project), ["web"])["web"]
    rebake = time.monotonic() - started
    print(f"shop: cold bake {cold:.1f}s, re-bake after an app edit {rebake:.2f}s")
    assert fast.layers_built == 2
    assert rebake < 4.0, f"re-bake over the cached tree took {rebake:.1f}s"
    assert _no_mounts_left()

    # The same bake over the base layer unpacked, as without the tree cache.
    base_layer = default_store().manifest(f"web@{fast.digest}")["layers"][0]["digest"]
    for path in (kiln_home() / "cache" / "layers").glob("*/*.json"):
        if base_layer not in path.read_text():
            path.unlink()
    _no_overlay(monkeypatch)
    started = time.monotonic()
    plain = bake(load(project), ["web"])["web"]
    print(f"shop: the same re-bake unpacking the base: {time.monotonic() - started:.2f}s")
    assert (plain.digest, plain.layers_built) == (fast.digest, 2)
