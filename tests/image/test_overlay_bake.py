"""Bakes over the layer snapshots: run steps over an overlay of the image's snapshots.

Real mounts, real runc steps in a user namespace, real store. The digests
must depend neither on whether a step ran over an overlay of the snapshots or
over a tree unpacked into staging (where overlayfs is unusable), nor on the
home whose id range the owners on disk are shifted into.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from conftest_bake import (
    DebianBake,
    default_store,
    load,
    make_project,
    needs_busybox,
    staging_dirs,
)

from kiln.image import overlay
from kiln.image.bake import bake, collect_garbage
from kiln.image.snapshots import SnapshotStore, image_layers
from kiln.image.unpack import unpack_image
from kiln.oci.idmap import id_range
from kiln.paths import kiln_home

pytestmark = [
    needs_busybox,
    pytest.mark.skipif(os.geteuid() != 0, reason="overlay mounts and user namespaces need root"),
    pytest.mark.skipif(shutil.which("runc") is None, reason="runc not installed"),
]

# The base is its own image, so the app image has base layers below its own.
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


def _snapshot_dirs() -> list[Path]:
    root = kiln_home() / "snapshots"
    return sorted(p for p in root.iterdir() if not p.name.startswith(".")) if root.is_dir() else []


def _mounts_in_home() -> list[str]:
    home = str(kiln_home())
    return [line for line in Path("/proc/self/mounts").read_text().splitlines() if home in line]


def _no_mounts_left() -> bool:
    return _mounts_in_home() == []


def _without_overlays(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bake as where overlayfs is unusable: the layers unpacked into a plain staging tree."""
    monkeypatch.setattr(overlay, "overlay_usable", lambda scratch: False)


def test_mount_commands_are_data() -> None:
    lowers = [Path("/s/1/fs"), Path("/s/2/fs")]
    argv = overlay.overlay_mount_argv(lowers, Path("/b/upper"), Path("/b/work"), Path("/b/m"))
    assert argv == [
        "mount",
        "-t",
        "overlay",
        "overlay",
        "-o",
        "lowerdir=/s/2/fs:/s/1/fs,upperdir=/b/upper,workdir=/b/work,index=on,redirect_dir=on",
        "/b/m",
    ]
    assert overlay.umount_argv(Path("/b/m")) == ["umount", "/b/m"]
    assert overlay.umount_argv(Path("/b/m"), lazy=True) == ["umount", "--lazy", "/b/m"]
    assert overlay.options_safe(Path("/a/b")) and not overlay.options_safe(Path("/a,b"))
    many = [Path(f"/root/.kiln/snapshots/{n:012x}/fs") for n in range(40)]
    assert overlay.options_fit(many, Path("/b/upper"), Path("/b/work"))
    assert not overlay.options_fit(many * 4, Path("/b/upper"), Path("/b/work"))
    assert not overlay.options_fit([Path("/a:b")], Path("/b/upper"), Path("/b/work"))


def test_rebake_over_the_snapshots_gives_the_digest_of_a_plain_bake_and_touches_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = _project(tmp_path / "p")
    first = _bake_app(project)
    assert overlay.overlay_usable(kiln_home() / "tmp"), "overlayfs is expected on this machine"
    snapshots = _snapshot_dirs()
    before = {path: _fingerprint(path) for path in snapshots}
    assert before and all(path.name for path in snapshots)

    (project / "app" / "main.sh").write_text("echo v2\n")
    started = time.monotonic()
    over_snapshots = _bake_app(project)
    seconds = time.monotonic() - started
    print(f"re-bake over the snapshots: {seconds:.2f}s")
    assert over_snapshots != first
    assert {path: _fingerprint(path) for path in snapshots} == before, "a step wrote a snapshot"
    assert _no_mounts_left() and staging_dirs() == []
    # The edit added the snapshot of the changed copy layer only (its run step needed it).
    assert len(_snapshot_dirs()) == len(snapshots) + 1

    no_cache = _bake_app(project, no_cache=True)
    assert {path: _fingerprint(path) for path in snapshots} == before

    first_ids = id_range(kiln_home())
    monkeypatch.setenv("KILN_HOME", str(tmp_path / "plain-home"))
    _without_overlays(monkeypatch)
    plain = _bake_app(project)
    assert id_range(kiln_home()).base != first_ids.base
    assert not (kiln_home() / "snapshots").exists()
    assert over_snapshots == no_cache == plain

    dest = tmp_path / "out"
    unpack_image(default_store(), f"app@{plain}", dest)
    assert (dest / "srv" / "linked").read_text() == "data\nmore\n"  # the hard link held
    assert (dest / "etc" / "data").read_text() == "data\nmore\n"
    assert not (dest / "usr" / "share" / "doc" / "pkg").exists()
    assert (dest / "var" / "lib" / "pkg" / "lock").read_text() == "lock\n"


OWNERS = """
[images.owners]
from = "scratch"
steps = [
  { copy = "rootfs/", to = "/" },
  { run = "mkdir -p /srv/data; chown 42:43 /srv/data; stat -c '%u:%g %a %n' / > /srv/seen" },
  { run = "stat -c '%u:%g %a %n' /srv/data /bin/busybox > /srv/stat; chmod 4755 /srv/stat" },
]
"""


def test_steps_see_the_image_owners_and_their_files_keep_them(tmp_path: Path) -> None:
    """What a step chowns keeps its owner: the namespace maps 65536 ids, not root alone."""
    project = make_project(tmp_path / "p", OWNERS)
    shifted = bake(load(project))["owners"].digest
    ids = id_range(kiln_home())
    store = default_store()
    layer = store.manifest(f"owners@{shifted}")["layers"][1]["digest"]
    with store.open_blob(layer) as blob, gzip.open(blob) as raw, tarfile.open(fileobj=raw) as tf:
        owners = {m.name: (m.uid, m.gid) for m in tf.getmembers()}
    assert owners["srv/data"] == (42, 43) and owners["srv/seen"] == (0, 0)
    [_, data_layer, stat_layer] = SnapshotStore(kiln_home()).layers_for(store, shifted)
    on_disk = (data_layer / "srv" / "data").lstat()
    assert (on_disk.st_uid, on_disk.st_gid) == (ids.to_host(42), ids.to_host(43))
    setuid = (stat_layer / "srv" / "stat").lstat()
    assert (setuid.st_uid, stat.S_IMODE(setuid.st_mode)) == (ids.to_host(0), 0o4755)
    dest = tmp_path / "out"
    unpack_image(store, f"owners@{shifted}", dest)
    assert (dest / "srv" / "seen").read_text() == "0:0 755 /\n"
    assert (dest / "srv" / "stat").read_text() == "42:43 755 /srv/data\n0:0 755 /bin/busybox\n"


def test_a_file_opened_for_writing_but_not_written_is_not_in_the_layer(tmp_path: Path) -> None:
    """The copy-up that opening a base file for writing causes is not a change."""
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
        for point in overlay.mounts_under(kiln_home()):
            overlay.unmount(point)


def test_gc_removes_the_snapshots_no_image_uses(tmp_path: Path) -> None:
    project = _project(tmp_path / "p")
    _bake_app(project)
    store = default_store()
    kept = collect_garbage(store)
    snapshots = SnapshotStore(kiln_home())
    assert kept.freed_bytes == 0 and snapshots.usage().snapshots == len(_snapshot_dirs()) > 0

    for ref in ("app", "base"):
        while True:
            try:
                store.remove(ref)
            except Exception:
                break
    result = collect_garbage(store)
    assert _snapshot_dirs() == []
    assert result.freed_bytes >= (project / "rootfs" / "bin" / "busybox").stat().st_size


def test_gc_keeps_the_snapshots_a_bake_has_mounted(tmp_path: Path) -> None:
    project = _project(tmp_path / "p")
    digest = _bake_app(project)
    store = default_store()
    snapshots = SnapshotStore(kiln_home())
    held = snapshots.hold(store, image_layers(store, digest))
    staging = tmp_path / "staging"
    staging.mkdir()
    rootfs = overlay.OverlayRootfs(held.paths, staging)
    rootfs.mount()
    try:
        assert (rootfs.merged / "etc" / "message").read_text() == "hello\n"
        assert snapshots.remove_unreferenced(set()) == 0
        assert all(path.is_dir() for path in held.paths)
    finally:
        assert rootfs.unmount()
        held.release()
    assert snapshots.remove_unreferenced(set()) > 0
    assert not any(path.exists() for path in held.paths)


SHOP = Path(__file__).resolve().parents[2] / "examples" / "shop"


@pytest.mark.e2e
@pytest.mark.timeout(900)
@pytest.mark.skipif(shutil.which("mmdebstrap") is None, reason="mmdebstrap not installed")
def test_shop_rebake_after_an_app_edit_is_fast_and_the_same_as_unpacking(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, debian_first_bake: DebianBake
) -> None:
    project = tmp_path / "shop"
    shutil.copytree(SHOP, project)
    debian_first_bake.warm(monkeypatch)  # the session's shared base: no mmdebstrap here
    started = time.monotonic()
    bake(load(project), ["web"])
    cold = time.monotonic() - started

    with (project / "app" / "server.py").open("a") as f:
        f.write("# edited\n")
    started = time.monotonic()
    fast = bake(load(project), ["web"])["web"]
    rebake = time.monotonic() - started
    print(f"shop: first bake {cold:.1f}s, re-bake after an app edit {rebake:.2f}s")
    assert fast.layers_built == 2
    assert rebake < 4.0, f"re-bake over the snapshots took {rebake:.1f}s"
    assert _no_mounts_left()

    # The same re-bake where overlayfs is unusable: the base layer unpacked into staging.
    base_layer = default_store().manifest(f"web@{fast.digest}")["layers"][0]["digest"]
    for path in (kiln_home() / "cache" / "layers").glob("*/*.json"):
        if base_layer not in path.read_text():
            path.unlink()
    _without_overlays(monkeypatch)
    started = time.monotonic()
    plain = bake(load(project), ["web"])["web"]
    print(f"shop: the same re-bake unpacking the base: {time.monotonic() - started:.2f}s")
    assert (plain.digest, plain.layers_built) == (fast.digest, 2)


def test_a_missing_workdir_is_made_inside_the_rootfs_through_its_symlinks(tmp_path: Path) -> None:
    from kiln.errors import KilnError
    from kiln.image.bake import make_workdir

    ids = id_range(kiln_home())
    rootfs = tmp_path / "rootfs"
    (rootfs / "data").mkdir(parents=True)
    (rootfs / "srv").symlink_to("/data")  # absolute: rootfs-relative, never the host's /data
    (rootfs / "up").symlink_to("../../../..")
    (rootfs / "file").write_text("x")
    make_workdir(rootfs, "/srv/app/deep", ids, "step")
    made = rootfs / "data" / "app" / "deep"
    assert made.is_dir() and not Path("/data/app").exists()
    assert (made.lstat().st_uid, stat.S_IMODE(made.lstat().st_mode)) == (ids.to_host(0), 0o755)
    make_workdir(rootfs, "/up/escaped", None, "step")
    assert (rootfs / "escaped").is_dir() and not (tmp_path / "escaped").exists()
    with pytest.raises(KilnError, match="step: workdir /file/x: /file is not a directory"):
        make_workdir(rootfs, "/file/x", None, "step")
