"""Layer snapshots: real layers in a real store, unpacked once each and mounted as overlayfs.

The proof that a snapshot is right: an overlay of an image's snapshots shows
exactly what unpacking the whole image shows, owners shifted by the home's
id range. Hostile layers go through the same extractor and leave nothing.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kiln.errors import KilnError
from kiln.image.bake import collect_garbage
from kiln.image.digest import MEDIA_TYPE_LAYER_GZIP, Descriptor
from kiln.image.layer import LayerResult
from kiln.image.snapshots import (
    SnapshotStore,
    chain_ids,
    image_chains,
    image_layers,
    shift_tree,
)
from kiln.image.store import ImageStore
from kiln.image.unpack import OPAQUE_XATTR, unpack_image
from kiln.oci.idmap import IdRange, id_range

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="snapshots need root")

EPOCH = 1_700_000_000
R, D, S, H = tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE
FIFO, CHR = tarfile.FIFOTYPE, tarfile.CHRTYPE
Builder = Callable[..., Descriptor]


@dataclass(frozen=True)
class E:
    """One tar entry of a test layer."""

    name: str
    kind: bytes = R
    data: str = ""
    mode: int | None = None
    uid: int = 0
    gid: int = 0
    mtime: int = EPOCH
    size: int | None = None


def _tar(entries: list[E]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for e in entries:
            info = tarfile.TarInfo(e.name)
            info.type = e.kind
            info.mode = e.mode if e.mode is not None else (0o755 if e.kind == D else 0o644)
            info.uid, info.gid, info.mtime = e.uid, e.gid, e.mtime
            if e.kind in (S, H):
                info.linkname = e.data
                tf.addfile(info)
            elif e.kind == R and e.size is not None:
                info.size = e.size  # a header that claims more than the archive holds
                buf.write(info.tobuf(tarfile.PAX_FORMAT))
            elif e.kind == R:
                data = e.data.encode()
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
            else:
                if e.kind == CHR:
                    info.devmajor, info.devminor = 1, 3
                tf.addfile(info)
    return buf.getvalue()


def _layer(store: ImageStore, entries: list[E], *, diff_id: str | None = None) -> LayerResult:
    raw = _tar(entries)
    desc = store.put_bytes(gzip.compress(raw, mtime=0), MEDIA_TYPE_LAYER_GZIP)
    real = "sha256:" + hashlib.sha256(raw).hexdigest()
    return LayerResult(desc, diff_id or real, len(raw), len(entries))


def _image(store: ImageStore, build: Builder, layers: list[LayerResult], ref: str) -> str:
    return build(store, layers, ref).digest


@pytest.fixture
def snapshots(kiln_home: Path) -> SnapshotStore:
    return SnapshotStore(kiln_home)


@pytest.fixture
def ids(kiln_home: Path) -> IdRange:
    return id_range(kiln_home)


# -- reading a tree back ------------------------------------------------------


def _fingerprint(root: Path, ids: IdRange | None = None) -> dict[str, tuple[object, ...]]:
    """Type, mode, owner (mapped back), mtime, size, content and visible hard-link partners."""
    out: dict[str, tuple[object, ...]] = {}
    inodes: dict[int, list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            st = path.lstat()
            uid, gid = st.st_uid, st.st_gid
            if ids is not None:
                uid, gid = ids.to_container(uid), ids.to_container(gid)
            content: object = None
            if stat.S_ISREG(st.st_mode):
                content = path.read_bytes()
                if st.st_nlink > 1:
                    inodes.setdefault(st.st_ino, []).append(rel)
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(path)
            size = st.st_size if not stat.S_ISDIR(st.st_mode) else None
            out[rel] = (
                stat.S_IFMT(st.st_mode),
                stat.S_IMODE(st.st_mode),
                uid,
                gid,
                int(st.st_mtime),
                size,
                content,
            )
    for group in inodes.values():
        if len(group) < 2:
            continue  # its other names lie in a lower layer, hidden: not a link one can see
        for rel in group:
            out[rel] = (*out[rel], tuple(sorted(group)))
    return out


@pytest.fixture
def mount_ro(tmp_path: Path) -> Iterator[Callable[[tuple[Path, ...]], Path]]:
    """Mount layer dirs (bottom first) read-only as overlayfs does for an instance."""
    mounted: list[Path] = []

    def mount(layers: tuple[Path, ...]) -> Path:
        lowers = list(layers)
        if len(lowers) == 1:  # overlayfs wants two lower dirs when there is no upper one
            empty = tmp_path / f"empty-{len(mounted)}"
            empty.mkdir()
            lowers.insert(0, empty)
        where = tmp_path / f"merged-{len(mounted)}"
        where.mkdir()
        lowerdir = ":".join(str(p) for p in reversed(lowers))
        subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o", f"ro,lowerdir={lowerdir}", str(where)],
            check=True,
            capture_output=True,
        )
        mounted.append(where)
        return where

    yield mount
    for where in reversed(mounted):
        subprocess.run(["umount", str(where)], check=False, capture_output=True)


# -- the layers of the main equivalence test --------------------------------

BASE = [
    E("bin", D),
    E("bin/busybox", data="#!busybox", mode=0o4755),
    E("bin/sh", S, "busybox"),
    E("etc", D),
    E("etc/passwd", data="root:x:0:0\n"),
    E("etc/linked", H, "etc/passwd"),
    E("etc/shadow", data="root:*:1::\n", mode=0o640, gid=42),
    E("etc/gone", data="gone\n"),
    E("etc/sub", D),
    E("etc/sub/x", data="x\n"),
    E("home", D),
    E("home/user", D, mode=0o700, uid=1000, gid=1000),
    E("home/user/notes", data="n\n", mode=0o600, uid=1000, gid=1000),
    E("opt", D),
    E("opt/tool", D),
    E("opt/tool/old", data="old\n"),
    E("run", D),
    E("run/fifo", FIFO, mode=0o600),
    E("usr", D),
    E("usr/share", D),
    E("usr/share/doc", D),
    E("usr/share/doc/a", data="a\n"),
    E("usr/share/doc/b", data="b\n"),
    E("var", D, mode=0o2775, gid=50),
]
APP = [
    E("etc", D, mtime=EPOCH + 10),
    E("etc/.wh.gone"),
    E("etc/.wh.sub"),
    E("etc/passwd", data="root:x:0:0\napp:x:100:100\n", mtime=EPOCH + 10),
    E("srv", D, mtime=EPOCH + 10),
    E("srv/app", D, uid=100, gid=100, mtime=EPOCH + 10),
    E("srv/app/main.sh", data="echo hi\n", mode=0o755, uid=100, gid=100),
    E("srv/app/same.sh", H, "srv/app/main.sh"),
    E("usr", D),
    E("usr/share", D),
    E("usr/share/doc", D, mtime=EPOCH + 10),
    E("usr/share/doc/.wh..wh..opq"),
    E("usr/share/doc/c", data="c\n"),
]
TOP = [
    E("opt", D, mtime=EPOCH + 20),
    E("opt/.wh.tool"),
    E("opt/tool", D, mtime=EPOCH + 20),
    E("opt/tool/new", data="new\n"),
    E("var", D, mode=0o2775, gid=50, mtime=EPOCH + 20),
    E("var/kept", data="kept\n"),
    E("var/.wh.kept"),  # a whiteout only hides the layers below, never its own layer
]


def _three_layer_image(store: ImageStore, build: Builder) -> tuple[str, list[LayerResult]]:
    layers = [_layer(store, BASE), _layer(store, APP), _layer(store, TOP)]
    return _image(store, build, layers, "app:1"), layers


def test_chain_ids_follow_the_oci_image_spec() -> None:
    a, b, c = ("sha256:" + ch * 64 for ch in "abc")
    ab = "sha256:" + hashlib.sha256(f"{a} {b}".encode()).hexdigest()
    abc = "sha256:" + hashlib.sha256(f"{ab} {c}".encode()).hexdigest()
    assert chain_ids([a, b, c]) == [a, ab, abc]
    assert chain_ids([]) == []
    with pytest.raises(KilnError, match="not a sha256 digest"):
        chain_ids(["md5:00"])


def test_overlay_of_the_snapshots_shows_what_unpacking_the_image_shows(
    store: ImageStore,
    image_builder: Builder,
    snapshots: SnapshotStore,
    ids: IdRange,
    mount_ro: Callable[[tuple[Path, ...]], Path],
    tmp_path: Path,
) -> None:
    digest, _ = _three_layer_image(store, image_builder)
    layers = snapshots.layers_for(store, digest)
    assert len(layers) == 3 and all(p.name == "fs" for p in layers)
    merged = mount_ro(layers)
    plain = tmp_path / "plain"
    unpack_image(store, "app:1", plain)
    shown = _fingerprint(merged, ids)
    assert shown == _fingerprint(plain)
    assert "etc/gone" not in shown and "etc/sub" not in shown
    assert sorted(p for p in shown if p.startswith("usr/share/doc/")) == ["usr/share/doc/c"]
    assert sorted(p for p in shown if p.startswith("opt/tool/")) == ["opt/tool/new"]
    assert (merged / "var" / "kept").read_text() == "kept\n"
    assert (merged / "etc" / "linked").read_text() == "root:x:0:0\n"  # the old inode
    assert shown["srv/app/main.sh"][-1] == ("srv/app/main.sh", "srv/app/same.sh")

    # Owners are shifted on disk, setuid and setgid kept.
    busybox = (merged / "bin" / "busybox").lstat()
    assert (busybox.st_uid, busybox.st_gid) == (ids.to_host(0), ids.to_host(0))
    assert stat.S_IMODE(busybox.st_mode) == 0o4755
    assert (merged / "home" / "user").lstat().st_uid == ids.to_host(1000)
    assert stat.S_IMODE((merged / "var").lstat().st_mode) == 0o2775
    assert (merged / "var").lstat().st_gid == ids.to_host(50)


def test_a_snapshot_holds_only_its_layer_with_overlay_whiteouts(
    store: ImageStore, image_builder: Builder, snapshots: SnapshotStore, ids: IdRange
) -> None:
    digest, layers = _three_layer_image(store, image_builder)
    base, app, top = snapshots.layers_for(store, digest)
    assert (base.parent / "chain.json").is_file()
    assert stat.S_IMODE(base.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(snapshots.root.stat().st_mode) == 0o700

    gone = (app / "etc" / "gone").lstat()
    assert stat.S_ISCHR(gone.st_mode) and gone.st_rdev == os.makedev(0, 0)
    assert stat.S_ISCHR((app / "etc" / "sub").lstat().st_mode)
    assert os.getxattr(app / "usr" / "share" / "doc", OPAQUE_XATTR) == b"y"
    assert sorted(os.listdir(app / "usr" / "share" / "doc")) == ["c"]
    assert not (app / "bin").exists() and not (app / "usr" / "share" / "doc" / "a").exists()
    # A whiteout and a directory of the same name in one layer: the directory is opaque.
    assert os.getxattr(top / "opt" / "tool", OPAQUE_XATTR) == b"y"
    assert (top / "var" / "kept").read_text() == "kept\n"
    # Hard links stay links within the layer; modes and mtimes as the layer says.
    main = (app / "srv" / "app" / "main.sh").lstat()
    assert main.st_ino == (app / "srv" / "app" / "same.sh").lstat().st_ino
    assert (main.st_uid, stat.S_IMODE(main.st_mode), int(main.st_mtime)) == (
        ids.to_host(100),
        0o755,
        EPOCH,
    )
    assert stat.S_ISFIFO((base / "run" / "fifo").lstat().st_mode)
    assert (base / "bin" / "sh").lstat().st_uid == ids.to_host(0)
    assert snapshots.usage().snapshots == 3
    assert image_chains(store) == set(chain_ids([layer.diff_id for layer in layers]))


def test_a_parent_the_layer_does_not_name_takes_the_metadata_below(
    store: ImageStore,
    image_builder: Builder,
    snapshots: SnapshotStore,
    ids: IdRange,
    mount_ro: Callable[[tuple[Path, ...]], Path],
) -> None:
    base = _layer(
        store,
        [
            E("a", D, mode=0o750, uid=7, gid=8, mtime=EPOCH - 5),
            E("a/b", D, mode=0o711, uid=9, gid=9),
            E("a/b/old", data="old\n"),
            E("gone", D, mode=0o700, uid=3),
            E("gone/x", data="x\n"),
        ],
    )
    hide = _layer(store, [E(".wh.gone")])
    add = _layer(store, [E("a/b/new", data="new\n"), E("gone/y/file", data="y\n")])
    digest = _image(store, image_builder, [base, hide, add], "parents:1")
    layers = snapshots.layers_for(store, digest)
    top = layers[-1]
    a, b = (top / "a").lstat(), (top / "a" / "b").lstat()
    assert (stat.S_IMODE(a.st_mode), a.st_uid, a.st_gid) == (0o750, ids.to_host(7), ids.to_host(8))
    assert (stat.S_IMODE(b.st_mode), b.st_uid) == (0o711, ids.to_host(9))
    # Their times too, although their children were made after them: a step over the
    # snapshots sees the mtimes a step over the unpacked tree sees.
    assert (int(a.st_mtime), int(b.st_mtime)) == (EPOCH - 5, EPOCH)
    # Below a whiteout there is nothing to inherit: a new directory, root's, 0755.
    fresh = (top / "gone").lstat()
    assert (stat.S_IMODE(fresh.st_mode), fresh.st_uid) == (0o755, ids.to_host(0))
    merged = mount_ro(layers)
    assert sorted(os.listdir(merged / "a" / "b")) == ["new", "old"]
    assert sorted(os.listdir(merged / "gone")) == ["y"]


def test_an_app_edit_unpacks_only_the_changed_layer(
    store: ImageStore, image_builder: Builder, snapshots: SnapshotStore
) -> None:
    base = _layer(store, BASE)
    first = _image(
        store, image_builder, [base, _layer(store, [E("srv", D), E("srv/v", data="1")])], "w:1"
    )
    before = snapshots.layers_for(store, first)
    base_inode = before[0].stat().st_ino
    second = _image(
        store, image_builder, [base, _layer(store, [E("srv", D), E("srv/v", data="2")])], "w:2"
    )
    after = snapshots.layers_for(store, second)
    assert after[0] == before[0] and after[0].stat().st_ino == base_inode
    assert after[1] != before[1]
    assert snapshots.usage().snapshots == 3


def test_concurrent_unpacks_of_one_chain_publish_one_snapshot(
    store: ImageStore, image_builder: Builder, kiln_home: Path
) -> None:
    digest, _ = _three_layer_image(store, image_builder)
    results: list[tuple[Path, ...]] = []
    errors: list[BaseException] = []

    def unpack() -> None:
        try:
            results.append(SnapshotStore(kiln_home).layers_for(store, digest))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=unpack) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(set(results)) == 1
    store_root = kiln_home / "snapshots"
    assert len([p for p in store_root.iterdir() if not p.name.startswith(".")]) == 3
    assert not [p for p in store_root.iterdir() if p.name.startswith(".new-")]


def test_another_process_unpacking_the_same_chain_waits_for_it(
    store: ImageStore, image_builder: Builder, kiln_home: Path, snapshots: SnapshotStore
) -> None:
    digest, _ = _three_layer_image(store, image_builder)
    script = (
        "import sys; from pathlib import Path; from kiln.image.snapshots import SnapshotStore;"
        "from kiln.image.store import ImageStore; home = Path(sys.argv[1]);"
        "print(SnapshotStore(home).layers_for(ImageStore(home / 'images'), sys.argv[2])[-1])"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(kiln_home), digest],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    outs = {proc.communicate(timeout=60)[0].strip() for proc in procs}
    assert all(proc.returncode == 0 for proc in procs)
    assert outs == {str(snapshots.layers_for(store, digest)[-1])}


# -- hostile layers -------------------------------------------------------------

HOSTILE: dict[str, tuple[list[E], str, str]] = {
    "dotdot": ([E("../escaped", data="x")], "../escaped", "contains '..'"),
    "absolute": ([E("/tmp/kiln-abs-escape", data="x")], "/tmp/kiln-abs-escape", "absolute"),
    "symlink-parent": (
        [E("etc", S, "/tmp"), E("etc/kiln-through", data="x")],
        "etc/kiln-through",
        "parent etc is a symlink; refusing to write through it",
    ),
    "symlink-escape": ([E("up", S, "../../../../tmp")], "up", "escapes the root"),
    "whiteout-of-parent": ([E(".wh...")], ".wh...", "whiteout names no entry"),
    "whiteout-of-self": ([E("etc", D), E("etc/.wh..")], "etc/.wh..", "whiteout names no entry"),
    "nested-whiteout-of-parent": (
        [E("etc", D), E("etc/.wh...")],
        "etc/.wh...",
        "whiteout names no entry",
    ),
    "absurd-size": ([E("huge", size=65 << 30)], "huge", "exceeds the"),
    "uid-outside-the-range": (
        [E("f", data="x", uid=65536)],
        "f",
        "uid 65536 is outside the 65536 ids",
    ),
    "gid-outside-the-range": (
        [E("d", D, gid=1 << 31)],
        "d",
        "gid 2147483648 is outside",
    ),
    "char-device": ([E("dev", D), E("dev/null", CHR)], "dev/null", "device nodes"),
    "hardlink-escape": ([E("h", H, "../../etc/passwd")], "h", "contains '..'"),
    "hardlink-to-a-lower-layer": (
        [E("etc", D), E("etc/again", H, "etc/passwd")],
        "etc/again",
        "is not in this layer",
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_layers_are_refused_and_publish_nothing(
    case: str,
    store: ImageStore,
    image_builder: Builder,
    snapshots: SnapshotStore,
    tmp_path: Path,
) -> None:
    entries, entry, why = HOSTILE[case]
    sentinel = tmp_path / "sentinel"
    sentinel.write_text("still here\n")
    base = _layer(store, BASE)
    digest = _image(store, image_builder, [base, _layer(store, entries)], "evil:1")
    with pytest.raises(KilnError) as err:
        snapshots.layers_for(store, digest)
    message = str(err.value)
    assert message.startswith("layer 2 (sha256:"), message
    assert f"entry {entry!r}" in message and why in message, message
    assert [p.name for p in snapshots.root.iterdir() if not p.name.startswith(".locks")] == [
        p.parent.name
        for p in snapshots.layers_for(store, _image(store, image_builder, [base], "b:1"))
    ]
    assert sentinel.read_text() == "still here\n"
    assert snapshots.root.is_dir() and (snapshots.root / ".locks").is_dir()
    for escaped in ("kiln-abs-escape", "kiln-through", "escaped"):
        assert not (Path("/tmp") / escaped).exists()
        assert not (tmp_path / escaped).exists()


def test_a_whiteout_looking_parent_is_just_a_directory(
    store: ImageStore,
    image_builder: Builder,
    snapshots: SnapshotStore,
    mount_ro: Callable[[tuple[Path, ...]], Path],
    tmp_path: Path,
) -> None:
    """``.wh.../etc`` is a file ``etc`` in a directory named ``.wh...``: nothing is hidden."""
    odd = _layer(store, [E(".wh.../etc", data="odd\n")])
    digest = _image(store, image_builder, [_layer(store, BASE), odd], "odd:1")
    merged = mount_ro(snapshots.layers_for(store, digest))
    assert (merged / ".wh..." / "etc").read_text() == "odd\n"
    assert (merged / "etc" / "passwd").is_file()


def test_a_config_that_lies_about_a_diff_id_poisons_no_snapshot(
    store: ImageStore, image_builder: Builder, snapshots: SnapshotStore
) -> None:
    """Snapshots are named by the diff_ids a config claims: the claim is checked first."""
    honest = _layer(store, BASE)
    evil = _layer(store, [E("bin", D), E("bin/busybox", data="evil")], diff_id=honest.diff_id)
    digest = _image(store, image_builder, [evil], "liar:1")
    with pytest.raises(KilnError, match=r"its tar hashes to sha256:.*image config says"):
        snapshots.layers_for(store, digest)
    assert snapshots.find(honest.diff_id) is None
    good = _image(store, image_builder, [honest], "honest:1")
    [fs] = snapshots.layers_for(store, good)
    assert (fs / "bin" / "busybox").read_text() == "#!busybox"


def test_a_corrupt_blob_is_refused(
    store: ImageStore, image_builder: Builder, snapshots: SnapshotStore
) -> None:
    layer = _layer(store, BASE)
    digest = _image(store, image_builder, [layer], "corrupt:1")
    path = store.blob_path(layer.descriptor.digest)
    os.chmod(path, 0o644)
    path.write_bytes(gzip.compress(_tar([E("etc", D), E("etc/x", data="tampered")]), mtime=0))
    with pytest.raises(KilnError, match="blob content hashes to"):
        snapshots.layers_for(store, digest)
    assert snapshots.usage().snapshots == 0


# -- names, sizes ---------------------------------------------------------------


def test_a_taken_short_name_moves_the_snapshot_to_a_longer_one(
    store: ImageStore, image_builder: Builder, snapshots: SnapshotStore
) -> None:
    layer = _layer(store, BASE)
    squatter = snapshots.root / layer.diff_id.removeprefix("sha256:")[:12]
    (squatter / "fs").mkdir(parents=True)
    (squatter / "chain.json").write_text('{"chain_id": "sha256:' + "0" * 64 + '"}')
    [fs] = snapshots.layers_for(store, _image(store, image_builder, [layer], "n:1"))
    assert fs.parent.name == layer.diff_id.removeprefix("sha256:")[:16]
    assert snapshots.find(layer.diff_id) == fs.parent


def test_forty_layers_fit_in_one_overlay_mount(
    image_builder: Builder, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = Path(tempfile.mkdtemp(prefix="kh", dir="/tmp"))
    where = Path(tempfile.mkdtemp(prefix="km", dir="/tmp"))
    try:
        monkeypatch.setenv("KILN_HOME", str(home))
        store = ImageStore(home / "images")
        layers = [_layer(store, [E(f"layer{n}", data=str(n))]) for n in range(40)]
        digest = _image(store, image_builder, layers, "tall:1")
        dirs = SnapshotStore(home).layers_for(store, digest)
        lowerdir = ":".join(str(p) for p in reversed(dirs))
        options = f"ro,lowerdir={lowerdir}"
        print(f"40 layers under {home}: {len(options)} bytes of mount options")
        assert len(options) < 2048
        subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o", options, str(where)],
            check=True,
            capture_output=True,
        )
        try:
            assert sorted(os.listdir(where)) == sorted(f"layer{n}" for n in range(40))
        finally:
            subprocess.run(["umount", str(where)], check=True)
    finally:
        shutil.rmtree(home, ignore_errors=True)
        where.rmdir()


# -- adopting a tree ------------------------------------------------------------


def test_an_adopted_tree_is_shifted_once_and_keeps_setuid(
    store: ImageStore, snapshots: SnapshotStore, ids: IdRange, tmp_path: Path
) -> None:
    from kiln.image.base import BaseLayer

    tree = tmp_path / "tree"
    (tree / "bin").mkdir(parents=True)
    (tree / "bin" / "su").write_text("su")
    os.chmod(tree / "bin" / "su", 0o4755)
    (tree / "var").mkdir()
    (tree / "var" / "apt").write_text("apt")
    os.chown(tree / "var" / "apt", 42, 65534)
    os.link(tree / "var" / "apt", tree / "var" / "apt-link")
    os.symlink("su", tree / "bin" / "link")
    layer = _layer(store, [E("placeholder")])
    layer_ref = BaseLayer(layer.descriptor, layer.diff_id, "debian base")
    fs = snapshots.adopt(tree, layer_ref)
    assert fs is not None and not tree.exists()
    assert fs == snapshots.find(layer.diff_id) / "fs"  # type: ignore[operator]
    su = (fs / "bin" / "su").lstat()
    assert (su.st_uid, stat.S_IMODE(su.st_mode)) == (ids.to_host(0), 0o4755)
    apt = (fs / "var" / "apt").lstat()
    assert (apt.st_uid, apt.st_gid) == (ids.to_host(42), ids.to_host(65534))
    assert (fs / "bin" / "link").lstat().st_uid == ids.to_host(0)
    assert fs.lstat().st_uid == ids.to_host(0)


def test_shifting_refuses_an_owner_outside_the_range(ids: IdRange, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "odd").write_text("x")
    os.chown(tree / "odd", 70000, 0)
    with pytest.raises(KilnError, match="base: entry 'odd': uid 70000 is outside"):
        shift_tree(tree, ids, "base")


# -- garbage collection ---------------------------------------------------------


def test_image_rm_and_gc_reclaim_the_snapshots_no_image_uses(
    store: ImageStore, image_builder: Builder, snapshots: SnapshotStore, kiln_home: Path
) -> None:
    base = _layer(store, BASE)
    one = _image(store, image_builder, [base, _layer(store, [E("v1", data="1" * 5000)])], "w:1")
    two = _image(store, image_builder, [base, _layer(store, [E("v2", data="2" * 7000)])], "w:2")
    first, second = snapshots.layers_for(store, one), snapshots.layers_for(store, two)
    assert collect_garbage(store).freed_bytes == 0
    assert snapshots.usage().snapshots == 3

    store.remove("w:1")
    freed = collect_garbage(store).freed_bytes
    assert not first[1].exists() and first[0].exists() and second[1].exists()
    assert freed >= 5000
    store.remove("w:2")
    collect_garbage(store)
    assert snapshots.usage().snapshots == 0
    assert os.listdir(snapshots.root / ".locks") == []


def test_gc_keeps_a_held_snapshot(
    store: ImageStore, image_builder: Builder, snapshots: SnapshotStore
) -> None:
    from kiln.image.base import kiln_image_base

    digest = _image(store, image_builder, [_layer(store, BASE)], "h:1")
    held = snapshots.hold(store, kiln_image_base(store, "h:1", digest).layers)
    try:
        assert snapshots.remove_unreferenced(set()) == 0
        assert held.paths[0].is_dir()
    finally:
        held.release()
    assert snapshots.remove_unreferenced(set()) > 0
    assert not held.paths[0].exists()


def test_gc_sweeps_dead_unpacks_and_what_kiln_kept_before_snapshots(
    store: ImageStore, kiln_home: Path
) -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    stale = kiln_home / "snapshots" / f".new-{int(dead.stdout)}-abcd1234" / "fs"
    live = kiln_home / "snapshots" / f".new-{os.getpid()}-abcd1234" / "fs"
    for path in (stale, live):
        path.mkdir(parents=True)
        (path / "data").write_bytes(b"x" * 1000)
    legacy = [
        kiln_home / "rootfs" / "sha256-ab" / "bin",
        kiln_home / "cache" / "trees" / "c" / "rootfs",
    ]
    for path in legacy:
        path.mkdir(parents=True)
        (path / "file").write_bytes(b"y" * 3000)
    result = collect_garbage(store)
    assert result.freed_bytes == 1000 + 2 * 3000
    assert not stale.exists() and live.exists()
    assert not (kiln_home / "rootfs").exists() and not (kiln_home / "cache" / "trees").exists()


def test_the_local_runtime_delivers_an_images_layer_dirs_and_drops_the_old_rootfs_cache(
    store: ImageStore, image_builder: Builder, kiln_home: Path
) -> None:
    from kiln.agent.executor import ImageConfigs
    from kiln.runtime.local import LocalRuntime

    old = kiln_home / "rootfs" / "sha256-00"
    old.mkdir(parents=True)
    digest, layers = _three_layer_image(store, image_builder)
    dirs = LocalRuntime(kiln_home, network=False).image_layers(digest)
    assert [d.parent.name for d in dirs] == [
        c.removeprefix("sha256:")[:12] for c in chain_ids([layer.diff_id for layer in layers])
    ]
    assert not (kiln_home / "rootfs").exists()
    configs = ImageConfigs(kiln_home)
    assert configs.image_config(digest)["rootfs"]["diff_ids"] == [layer.diff_id for layer in layers]
    assert image_layers(store, digest)[0].source.startswith("layer 1 (sha256:")


def test_the_layers_of_a_running_instance_can_be_held_against_gc(
    store: ImageStore, image_builder: Builder, kiln_home: Path
) -> None:
    digest, _ = _three_layer_image(store, image_builder)
    snapshots = SnapshotStore(kiln_home)
    layers = snapshots.layers_for(store, digest)
    held = SnapshotStore(kiln_home).hold_dirs(layers)
    store.remove("app:1")
    try:
        collect_garbage(store)
        assert all(layer.is_dir() for layer in layers)
    finally:
        held.release()
    collect_garbage(store)
    assert not any(layer.exists() for layer in layers)
    with pytest.raises(KilnError, match="is not a layer snapshot"):
        snapshots.hold_dirs(layers)
