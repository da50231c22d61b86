import gzip
import hashlib
import io
import os
import random
import stat
import subprocess
import tarfile
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kiln.errors import KilnError
from kiln.image.layer import (
    LayerResult,
    layer_from_diff,
    layer_from_dir,
    layer_from_tarball,
    settle_tree,
    snapshot,
)
from kiln.image.store import ImageStore
from kiln.image.unpack import apply_layer

EPOCH = 1_700_000_000


def _members(store: ImageStore, layer: LayerResult) -> list[tarfile.TarInfo]:
    with tarfile.open(store.blob_path(layer.descriptor.digest), "r:gz") as tf:
        return tf.getmembers()


def _tree(root: Path) -> dict[str, tuple[str, int, object]]:
    """Type, permission bits and content (or link target) of every path under root."""
    out: dict[str, tuple[str, int, object]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            st_ = path.lstat()
            if stat.S_ISLNK(st_.st_mode):
                out[rel] = ("link", 0, os.readlink(path))
            elif stat.S_ISDIR(st_.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st_.st_mode), None)
            else:
                out[rel] = ("file", stat.S_IMODE(st_.st_mode), path.read_bytes())
    return out


def test_layer_is_sorted_clamped_and_plain(store: ImageStore, tmp_path: Path) -> None:
    root = tmp_path / "t"
    (root / "b").mkdir(parents=True)
    (root / "a-c").write_text("x")
    (root / "b" / "z").write_text("z" * 5000)
    (root / "b" / "a").write_text("a")
    os.link(root / "b" / "z", root / "a-hard")
    os.symlink("/etc/passwd", root / "abs-link")
    os.utime(root / "b" / "a", (100, 100))
    layer = layer_from_dir(root, store, EPOCH)
    members = _members(store, layer)
    names = [m.name for m in members]
    assert names == ["a-c", "a-hard", "abs-link", "b", "b/a", "b/z"]
    assert layer.entries == 6
    by_name = {m.name: m for m in members}
    assert by_name["b/z"].islnk() and by_name["b/z"].linkname == "a-hard"
    assert by_name["a-hard"].isreg() and by_name["a-hard"].size == 5000
    assert by_name["abs-link"].linkname == "/etc/passwd"
    assert by_name["b/a"].mtime == 100
    assert all(m.mtime == EPOCH for n, m in by_name.items() if n != "b/a")
    assert all(m.uname == "" and m.gname == "" and not m.pax_headers for m in members)
    blob = store.read_bytes(layer.descriptor.digest)
    assert blob[:4] == b"\x1f\x8b\x08\x00" and blob[4:8] == b"\0\0\0\0"
    raw = gzip.decompress(blob)
    assert layer.size_uncompressed == len(raw)
    assert layer.diff_id == "sha256:" + __import__("hashlib").sha256(raw).hexdigest()
    assert layer.descriptor.size == len(blob)


def test_prefix_and_single_file(store: ImageStore, tmp_path: Path) -> None:
    root = tmp_path / "app"
    root.mkdir()
    (root / "run").write_text("#!/bin/sh\n")
    os.chmod(root / "run", 0o700)
    os.chmod(root, 0o700)
    layer = layer_from_dir(root, store, EPOCH, normalize_modes=True, prefix="/srv/app/")
    members = {m.name: m for m in _members(store, layer)}
    assert list(members) == ["srv", "srv/app", "srv/app/run"]
    assert members["srv/app"].mode == 0o755 and members["srv/app/run"].mode == 0o755
    assert all(m.uid == 0 and m.gid == 0 for m in members.values())
    single = layer_from_dir(root / "run", store, EPOCH, normalize_modes=True, prefix="usr/bin/run")
    assert [m.name for m in _members(store, single)] == ["usr", "usr/bin", "usr/bin/run"]


_names = st.text(alphabet="abAé-_.x1", min_size=1, max_size=5).filter(
    lambda n: n not in (".", "..") and not n.startswith(".wh.")
)
_specs = st.dictionaries(
    keys=st.lists(_names, min_size=1, max_size=3).map(lambda parts: "/".join(parts)),
    values=st.one_of(
        st.tuples(st.just("file"), st.binary(max_size=300), st.booleans()),
        st.tuples(
            st.just("link"),
            st.sampled_from(["a/../b", "/etc/passwd", "a", "/usr/../x"]),
            st.just(False),
        ),
    ),
    max_size=10,
).map(
    lambda spec: {
        path: v for path, v in spec.items() if not any(o.startswith(path + "/") for o in spec)
    }
)


def _build(root: Path, spec: dict[str, tuple[str, object, bool]], seed: int, umask: int) -> None:
    rng = random.Random(seed)
    order = list(spec)
    rng.shuffle(order)
    old = os.umask(umask)
    try:
        root.mkdir()
        for rel in order:
            kind, value, executable = spec[rel]
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            if kind == "file":
                assert isinstance(value, bytes)
                path.write_bytes(value)
                if executable:
                    os.chmod(path, 0o777 & ~umask)
            else:
                os.symlink(str(value), path)
    finally:
        os.umask(old)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            when = EPOCH + rng.randrange(1, 10**8)
            os.utime(Path(dirpath) / name, (when, when), follow_symlinks=False)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    spec=_specs,
    seeds=st.tuples(st.integers(0, 2**32), st.integers(0, 2**32)),
    umasks=st.tuples(*[st.sampled_from([0o002, 0o022, 0o027, 0o077])] * 2),
)
def test_same_tree_any_order_umask_and_time_gives_same_digest(
    store: ImageStore,
    spec: dict[str, tuple[str, object, bool]],
    seeds: tuple[int, int],
    umasks: tuple[int, int],
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        results = []
        for i in range(2):
            root = Path(tmp) / f"tree{i}"
            _build(root, spec, seeds[i], umasks[i])
            results.append(layer_from_dir(root, store, EPOCH, normalize_modes=True, prefix="app"))
        assert results[0].descriptor.digest == results[1].descriptor.digest
        assert results[0].diff_id == results[1].diff_id


def test_diff_layer_whiteouts_round_trip(store: ImageStore, tmp_path: Path) -> None:
    root = tmp_path / "root"
    for d in ("etc/conf.d", "var/cache/apt", "opt/was-dir/sub", "usr/bin"):
        (root / d).mkdir(parents=True)
    (root / "etc/conf.d/keep").write_text("keep")
    (root / "etc/conf.d/gone").write_text("gone")
    (root / "var/cache/apt/pkg.deb").write_bytes(b"\0" * 4096)
    (root / "opt/was-dir/sub/f").write_text("f")
    (root / "opt/was-file").write_text("file")
    (root / "usr/bin/tool").write_text("v1")
    os.symlink("tool", root / "usr/bin/alias")
    base = layer_from_dir(root, store, EPOCH)
    before = snapshot(root)
    assert layer_from_diff(root, before, snapshot(root), store, EPOCH) is None

    (root / "etc/conf.d/gone").unlink()
    subprocess.run(["rm", "-rf", str(root / "var/cache/apt")], check=True)
    subprocess.run(["rm", "-rf", str(root / "opt/was-dir")], check=True)
    (root / "opt/was-dir").write_text("now a file")
    (root / "opt/was-file").unlink()
    (root / "opt/was-file").mkdir()
    (root / "opt/was-file/inner").write_text("inner")
    with open(root / "usr/bin/tool", "r+") as f:  # same size, same second: only ctime tells
        f.write("v2")
    os.chmod(root / "etc/conf.d/keep", 0o600)
    (root / "usr/bin/alias").unlink()
    os.symlink("/usr/bin/tool", root / "usr/bin/alias")
    os.link(root / "usr/bin/tool", root / "usr/bin/tool2")
    diff = layer_from_diff(root, before, snapshot(root), store, EPOCH)
    assert diff is not None
    names = {m.name for m in _members(store, diff)}
    assert {"etc/conf.d/.wh.gone", "var/cache/.wh.apt"} <= names
    assert not any(n.startswith("opt/was-dir/") or ".wh.sub" in n for n in names)
    assert "etc/conf.d/keep" in names and "usr/bin/tool" in names
    assert "var/cache/apt/pkg.deb" not in names

    dest = tmp_path / "dest"
    dest.mkdir()
    for layer in (base, diff):
        with store.open_blob(layer.descriptor.digest) as blob:
            apply_layer(blob, dest)
    assert _tree(dest) == _tree(root)
    assert (dest / "usr/bin/tool").stat().st_ino == (dest / "usr/bin/tool2").stat().st_ino


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(before_spec=_specs, after_spec=_specs, seed=st.integers(0, 2**32))
def test_any_diff_applied_to_before_gives_after(
    store: ImageStore,
    before_spec: dict[str, tuple[str, object, bool]],
    after_spec: dict[str, tuple[str, object, bool]],
    seed: int,
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "work"
        _build(work, before_spec, seed, 0o022)
        base = layer_from_dir(work, store, EPOCH)
        before = snapshot(work)
        subprocess.run(["rm", "-rf", str(work)], check=True)
        _build(work, after_spec, seed + 1, 0o022)
        diff = layer_from_diff(work, before, snapshot(work), store, EPOCH)
        dest = Path(tmp) / "dest"
        dest.mkdir()
        for layer in (base, diff):
            if layer is not None:
                with store.open_blob(layer.descriptor.digest) as blob:
                    apply_layer(blob, dest)
        assert _tree(dest) == _tree(work)


def test_tarball_import_matches_the_tree(store: ImageStore, tmp_path: Path) -> None:
    root = tmp_path / "rootfs"
    (root / "usr/bin").mkdir(parents=True)
    (root / "dev").mkdir()
    (root / "usr/bin/perl").write_bytes(b"p" * 3000)
    os.link(root / "usr/bin/perl", root / "usr/bin/perl5.36")
    os.symlink("perl", root / "usr/bin/perl-link")
    os.chown(root / "usr/bin/perl", 0, 50)
    os.chmod(root / "usr/bin/perl", 0o4755)
    os.mknod(root / "dev/null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.utime(root / "usr/bin", (EPOCH - 5, EPOCH - 5))
    tar = tmp_path / "rootfs.tar"
    subprocess.run(["tar", "-C", str(root), "-cf", str(tar), "."], check=True)
    from_tar = layer_from_tarball(tar, store, EPOCH)
    from_dir = layer_from_dir(root, store, EPOCH)
    assert from_tar.descriptor.digest == from_dir.descriptor.digest
    members = {m.name: m for m in _members(store, from_tar)}
    assert "dev/null" not in members and "dev" in members
    assert members["usr/bin/perl"].mode == 0o4755 and members["usr/bin/perl"].gid == 50
    assert members["usr/bin/perl5.36"].islnk()
    assert members["usr/bin"].mtime == EPOCH - 5
    gz = tmp_path / "rootfs.tar.gz"
    gz.write_bytes(gzip.compress(tar.read_bytes()))
    assert layer_from_tarball(gz, store, EPOCH).descriptor == from_tar.descriptor
    assert list(store.tmp_dir.iterdir()) == []


def test_tarball_with_escaping_entry_is_refused(store: ImageStore, tmp_path: Path) -> None:
    tar = tmp_path / "evil.tar"
    with tarfile.open(tar, "w") as tf:
        info = tarfile.TarInfo("../etc/evil")
        info.size = 1
        tf.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(KilnError, match=r"evil.tar: entry '../etc/evil' escapes the root"):
        layer_from_tarball(tar, store, EPOCH)


def test_parallel_gzip_is_valid_and_independent_of_thread_count(
    store: ImageStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "big"
    root.mkdir()
    rng = random.Random(7)
    for i in range(6):
        words = [
            rng.choice([b"kiln", b"layer", b"oci", b"\x00\x01", b"\n"]) for _ in range(200_000)
        ]
        (root / f"f{i}").write_bytes(b"".join(words))
    digests = set()
    for cpus in (1, 2, 4):
        monkeypatch.setattr(os, "cpu_count", lambda n=cpus: n)
        layer = layer_from_dir(root, store, EPOCH)
        digests.add(layer.descriptor.digest)
        assert layer.size_uncompressed > 3 << 20
    [digest] = digests
    blob = store.blob_path(digest)
    subprocess.run(["gzip", "-t", str(blob)], check=True)
    with tarfile.open(blob, "r:gz") as tf:
        assert tf.extractfile("f3").read() == (root / "f3").read_bytes()  # type: ignore[union-attr]


def _full_tree(root: Path) -> dict[str, tuple[object, ...]]:
    """Everything a run step could observe of a path: type, mode, owner, mtime, content, xattrs."""
    out: dict[str, tuple[object, ...]] = {}
    for rel, state in snapshot(root).paths.items():
        path = root / rel
        content: object = state.link
        if stat.S_ISREG(state.mode):
            content = path.read_bytes()
        xattrs = sorted(os.listxattr(path, follow_symlinks=False))
        links = state.nlink if stat.S_ISREG(state.mode) else 0
        out[rel] = (state.mode, state.uid, state.gid, state.mtime_ns, content, xattrs, links)
    return out


@pytest.mark.skipif(os.geteuid() != 0, reason="device nodes and owners need root")
def test_a_settled_tree_is_exactly_what_its_layer_unpacks_to(
    store: ImageStore, tmp_path: Path
) -> None:
    """A Debian base's tree is used as the first run step's rootfs, so it must not differ
    in anything from the same layer unpacked (which a re-bake with a cached base does)."""
    root = tmp_path / "rootfs"
    (root / "usr/bin").mkdir(parents=True)
    (root / "dev").mkdir()
    (root / "run").mkdir()
    (root / "usr/bin/tool").write_bytes(b"t" * 5000)
    os.link(root / "usr/bin/tool", root / "usr/bin/tool2")
    os.symlink("tool", root / "usr/bin/tool-link")
    os.chown(root / "usr/bin/tool", 0, 50)
    os.chmod(root / "usr/bin/tool", 0o4755)
    os.mknod(root / "dev/null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mkfifo(root / "run/fifo", 0o600)
    os.setxattr(root / "usr/bin/tool2", "user.kiln", b"x")
    os.utime(root / "usr/bin/tool", ns=(0, (EPOCH + 99) * 10**9 + 5))
    os.utime(root / "run", ns=(0, (EPOCH - 7) * 10**9 + 123))
    os.utime(root / "usr/bin/tool-link", ns=(0, (EPOCH + 3) * 10**9), follow_symlinks=False)
    settle_tree(root, EPOCH)
    settled = _full_tree(root)
    assert "dev/null" not in settled and "run/fifo" in settled
    assert settled["usr/bin/tool"][3] == EPOCH * 10**9
    assert settled["usr/bin/tool-link"][3] == EPOCH * 10**9
    assert settled["run"][3] == (EPOCH - 7) * 10**9
    assert settled["usr/bin/tool2"][5] == []
    layer = layer_from_dir(root, store, EPOCH)
    unpacked = tmp_path / "unpacked"
    unpacked.mkdir()
    with store.open_blob(layer.descriptor.digest) as blob:
        apply_layer(blob, unpacked)
    assert _full_tree(unpacked) == settled
    settle_tree(root, EPOCH)
    assert layer_from_dir(root, store, EPOCH).descriptor == layer.descriptor


def _known_tree(root: Path) -> Path:
    """A fixed small tree: text that compresses, bytes that do not, a link, a directory."""
    (root / "srv" / "app").mkdir(parents=True)
    (root / "srv" / "app" / "main.py").write_text("print('hello')\n" * 2000)
    noise = random.Random(7)
    (root / "srv" / "app" / "blob.bin").write_bytes(noise.randbytes(300_000))
    (root / "srv" / "app" / "current").symlink_to("main.py")
    for path in (root / "srv", root / "srv" / "app"):
        path.chmod(0o755)
    for path in (root / "srv" / "app" / "main.py", root / "srv" / "app" / "blob.bin"):
        path.chmod(0o644)
    return root


KNOWN_LAYER_DIFF_ID = "sha256:8784dd39d9867954a6d9aa963759e9601e91a710a5dd8d9ff4246c64913a9a1e"
KNOWN_LAYER_DIGEST = "sha256:acc7ef8bdcebb5a42f13356357e3e874b230e6e34f8f2d95beb0730dbc32b08b"


def test_a_fixed_tree_gives_the_digest_written_here_on_any_host(tmp_path: Path) -> None:
    """The known answer: the tar is Kiln's own normalised stream and the gzip is zlib-ng from
    a pinned wheel, so neither depends on the host's zlib build, thread count or clock."""
    layer = layer_from_dir(
        _known_tree(tmp_path / "tree"), ImageStore(tmp_path / "s"), 1_700_000_000
    )
    assert layer.diff_id == KNOWN_LAYER_DIFF_ID
    assert layer.descriptor.digest == KNOWN_LAYER_DIGEST
    # Any gzip reader reads it back: the stdlib's, to the very tar the diff_id names.
    blob = ImageStore(tmp_path / "s").blob_path(layer.descriptor.digest).read_bytes()
    assert "sha256:" + hashlib.sha256(gzip.decompress(blob)).hexdigest() == KNOWN_LAYER_DIFF_ID
