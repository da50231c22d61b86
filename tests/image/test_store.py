import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kiln.errors import KilnError
from kiln.image.digest import (
    MEDIA_TYPE_CONFIG,
    MEDIA_TYPE_LAYER_GZIP,
    MEDIA_TYPE_MANIFEST,
    Descriptor,
    canonical_json,
    sha256_hex,
)
from kiln.image.store import GcResult, ImageStore


def _config(n: int) -> tuple[bytes, Descriptor]:
    data = canonical_json({"n": n})
    return data, Descriptor(MEDIA_TYPE_CONFIG, "sha256:" + sha256_hex(data), len(data))


def _manifest_bytes(n: int) -> bytes:
    return canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": MEDIA_TYPE_MANIFEST,
            "config": _config(n)[1].to_json(),
            "layers": [],
            "annotations": {"n": str(n)},
        }
    )


def _put_manifest(store: ImageStore, n: int) -> Descriptor:
    store.put_bytes(_config(n)[0], MEDIA_TYPE_CONFIG)
    return store.put_bytes(_manifest_bytes(n), MEDIA_TYPE_MANIFEST)


def test_creates_an_oci_layout(store: ImageStore, kiln_home: Path) -> None:
    root = kiln_home / "images"
    assert json.loads((root / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads((root / "index.json").read_text())
    assert index["schemaVersion"] == 2 and index["manifests"] == []
    assert (root / "blobs" / "sha256").is_dir()
    assert ImageStore.default().root == root
    ImageStore(root)  # re-opening keeps what is there
    assert json.loads((root / "index.json").read_text()) == index


def test_put_bytes_and_file_are_content_addressed(store: ImageStore, tmp_path: Path) -> None:
    desc = store.put_bytes(b"hello", MEDIA_TYPE_CONFIG)
    assert desc == Descriptor(MEDIA_TYPE_CONFIG, "sha256:" + sha256_hex(b"hello"), 5)
    assert store.has(desc.digest) and store.read_bytes(desc.digest) == b"hello"
    assert store.blob_path(desc.digest).name == sha256_hex(b"hello")
    assert store.put_bytes(b"hello", MEDIA_TYPE_CONFIG) == desc
    src = tmp_path / "big"
    src.write_bytes(os.urandom(3 << 20))
    from_file = store.put_file(src, MEDIA_TYPE_LAYER_GZIP)
    assert src.exists()
    assert from_file.digest == "sha256:" + sha256_hex(src.read_bytes())
    with store.open_blob(from_file.digest) as f:
        assert f.read() == src.read_bytes()
    out, tmp = store.temp_file()
    with out:
        out.write(b"moved")
    moved = store.put_file(tmp, MEDIA_TYPE_CONFIG, move=True)
    assert not tmp.exists() and store.read_bytes(moved.digest) == b"moved"
    assert list(store.tmp_dir.iterdir()) == []


def test_blob_names_are_checked(store: ImageStore) -> None:
    with pytest.raises(KilnError, match="not a sha256 digest"):
        store.blob_path("sha256:../../../etc/passwd")
    assert not store.has("sha256:nothex")
    with pytest.raises(KilnError, match="missing"):
        store.read_bytes("sha256:" + "0" * 64)


_INTERRUPTED_WRITER = """
import sys
from pathlib import Path
from kiln.image.store import GcResult, ImageStore
ImageStore(Path(sys.argv[1])).put_file(Path(sys.argv[2]), "application/octet-stream")
"""


def test_an_interrupted_write_never_shows_up_as_a_blob(store: ImageStore, tmp_path: Path) -> None:
    fifo = tmp_path / "source"
    os.mkfifo(fifo)
    proc = subprocess.Popen([sys.executable, "-c", _INTERRUPTED_WRITER, str(store.root), str(fifo)])
    try:
        with open(fifo, "wb") as w:
            w.write(b"x" * (4 << 20))
            w.flush()
            deadline = time.monotonic() + 10
            while not any(p.stat().st_size for p in store.tmp_dir.iterdir()):
                assert time.monotonic() < deadline, "writer never started"
                time.sleep(0.05)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
    except BrokenPipeError:
        pass
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert list(store.blobs.iterdir()) == []
    stray = list(store.tmp_dir.iterdir())
    assert stray, "the killed writer should have left its temp file"
    assert not store.has("sha256:" + sha256_hex(b"x" * (4 << 20)))
    stray_bytes = sum(p.stat().st_size for p in stray)
    assert stray_bytes > 0
    old = time.time() - 7200
    for path in stray:
        os.utime(path, (old, old))
    fresh = store.tmp_dir / "blob-inflight"
    fresh.write_bytes(b"being written right now")
    result = store.gc()
    assert result == GcResult(0, stray_bytes)
    assert list(store.tmp_dir.iterdir()) == [fresh]


def test_tags_are_immutable(store: ImageStore) -> None:
    first, second = _put_manifest(store, 1), _put_manifest(store, 2)
    store.tag("web:1.0", first)
    before = (store.root / "index.json").read_bytes()
    store.tag("web:1.0", first)
    assert (store.root / "index.json").read_bytes() == before
    with pytest.raises(KilnError) as err:
        store.tag("web:1.0", second)
    assert str(err.value) == (f"tag web:1.0 already points at {first.digest}; tags are immutable")
    assert store.resolve("web:1.0").digest == first.digest
    for bad in ("web", "Web:1", "web:", "web:a/b", "../x:1"):
        with pytest.raises(KilnError, match="bad image tag"):
            store.tag(bad, first)
    with pytest.raises(KilnError, match="is not in"):
        store.tag("web:2", Descriptor(MEDIA_TYPE_MANIFEST, "sha256:" + "1" * 64, 3))


def test_resolve_every_ref_form(store: ImageStore) -> None:
    old, new, other = _put_manifest(store, 1), _put_manifest(store, 2), _put_manifest(store, 3)
    store.tag("web:old", old)
    store.tag("api:1", other)
    store.tag("web:new", new)
    assert store.resolve("web").digest == new.digest
    assert store.resolve("web:old").digest == old.digest
    assert store.resolve(f"web@{old.digest}").digest == old.digest
    assert store.resolve(old.digest).digest == old.digest
    assert store.resolve(old.digest[:13]).digest == old.digest
    assert store.resolve(old.digest[7:15]).digest == old.digest
    assert store.manifest("web:old")["annotations"] == {"n": "1"}
    assert store.manifest(old.digest)["annotations"] == {"n": "1"}
    assert store.config("api:1") == {"n": 3}
    with pytest.raises(KilnError) as err:
        store.resolve("db")
    assert str(err.value) == f"no image db in {store.root} (kiln images lists what is there)"
    with pytest.raises(KilnError, match="no image web:nope"):
        store.resolve("web:nope")
    with pytest.raises(KilnError, match="no image api@"):
        store.resolve(f"api@{old.digest}")
    with pytest.raises(KilnError, match="at least 6 hex digits"):
        store.resolve(old.digest[:10])


def test_ambiguous_digest_prefix_is_refused(store: ImageStore) -> None:
    seen: dict[str, int] = {}
    pair: tuple[int, int] | None = None
    n = 0
    while pair is None:
        n += 1
        prefix = sha256_hex(_manifest_bytes(n))[:6]
        if prefix in seen:
            pair = (seen[prefix], n)
        seen[prefix] = n
    a, b = (_put_manifest(store, i) for i in pair)
    store.tag("a:1", a)
    store.tag("b:1", b)
    prefix = a.digest[:13]
    with pytest.raises(KilnError, match=f"digest prefix {prefix} is ambiguous"):
        store.resolve(prefix)
    common = next(i for i, (x, y) in enumerate(zip(a.digest, b.digest, strict=True)) if x != y)
    assert store.resolve(a.digest[: common + 1]).digest == a.digest
    assert store.resolve(b.digest[: common + 1]).digest == b.digest


def test_images_lists_sizes_and_creation(store: ImageStore, busybox_image) -> None:
    ref_name, manifest = busybox_image
    [entry] = store.images()
    layers = store.manifest(ref_name)["layers"]
    config = store.manifest(ref_name)["config"]
    assert entry.ref_name == ref_name and entry.name == "web"
    assert entry.digest == manifest.digest
    assert entry.size == manifest.size + config["size"] + sum(x["size"] for x in layers)
    assert entry.created == "2023-11-14T22:13:20Z"


def test_remove_then_gc(store: ImageStore, busybox_image) -> None:
    ref_name, manifest = busybox_image
    store.tag("web:1.0", manifest)
    other = _put_manifest(store, 7)
    store.tag("web:other", other)
    assert store.remove("web:1.0") == ["web:1.0"]
    assert store.resolve(ref_name).digest == manifest.digest
    assert store.remove(manifest.digest[:15]) == [ref_name]
    assert store.has(manifest.digest), "blobs stay until gc"
    with pytest.raises(KilnError, match="no image"):
        store.resolve(ref_name)
    layer_digests = [x["digest"] for x in store.read_json(manifest.digest)["layers"]]
    kept_layer = layer_digests[0]
    result = store.gc(keep=[kept_layer])
    assert result.removed_blobs == 3  # manifest, its config, the unkept layer
    assert result.freed_bytes > 0
    assert store.has(kept_layer) and not store.has(layer_digests[1])
    assert not store.has(manifest.digest)
    assert store.has(other.digest) and store.config("web:other") == {"n": 7}
    kept_size = store.blob_path(kept_layer).stat().st_size
    assert store.gc() == GcResult(1, kept_size)
    assert not store.has(kept_layer)


def test_gc_follows_kept_manifests(store: ImageStore, busybox_image) -> None:
    ref_name, manifest = busybox_image
    store.remove(ref_name)
    assert store.gc(keep=[manifest.digest]).removed_blobs == 0
    assert store.index_entries() == []
    assert store.verify(manifest.digest) == []
    assert store.gc().removed_blobs == 4


def test_verify_names_corrupt_and_missing_blobs(store: ImageStore, busybox_image) -> None:
    ref_name, _ = busybox_image
    assert store.verify(ref_name) == []
    layers = store.manifest(ref_name)["layers"]
    second = store.blob_path(layers[1]["digest"])
    os.chmod(second, 0o644)
    second.write_bytes(b"tampered")
    config = store.manifest(ref_name)["config"]["digest"]
    store.blob_path(config).unlink()
    problems = store.verify("web")
    assert problems == [
        f"blob {config} (config of {ref_name}): missing",
        f"blob {layers[1]['digest']} (layer 2 of {ref_name}): content hashes to "
        f"sha256:{sha256_hex(b'tampered')}",
    ]


_TAGGER = """
import sys
from pathlib import Path
from kiln.image.digest import Descriptor
from kiln.image.store import GcResult, ImageStore
store = ImageStore(Path(sys.argv[1]))
desc = Descriptor("application/vnd.oci.image.manifest.v1+json", sys.argv[2], int(sys.argv[3]))
for i in range(40):
    store.tag(f"{sys.argv[4]}:{i}", desc)
"""


def test_concurrent_taggers_lose_no_entries(store: ImageStore) -> None:
    manifest = _put_manifest(store, 1)
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                _TAGGER,
                str(store.root),
                manifest.digest,
                str(manifest.size),
                name,
            ]
        )
        for name in ("alpha", "beta", "gamma")
    ]
    for proc in procs:
        assert proc.wait(timeout=60) == 0
    names = {e.ref_name for e in store.images()}
    assert names == {f"{n}:{i}" for n in ("alpha", "beta", "gamma") for i in range(40)}
    json.loads((store.root / "index.json").read_text())


def test_build_image_helper_tags(store: ImageStore, image_builder) -> None:
    desc = image_builder(store, [], "empty:1")
    assert store.resolve("empty").digest == desc.digest
    assert store.verify("empty:1") == []


def test_skopeo_and_umoci_read_the_store(
    store: ImageStore, tmp_path: Path, busybox_image: tuple[str, Descriptor]
) -> None:
    ref_name, manifest = busybox_image
    store.tag("web:1.0", manifest)
    inspect = subprocess.run(
        ["skopeo", "inspect", f"oci:{store.root}:{ref_name}"],
        capture_output=True,
        text=True,
        check=True,
    )
    info = json.loads(inspect.stdout)
    assert info["Digest"] == manifest.digest and info["Created"] == "2023-11-14T22:13:20Z"
    listed = subprocess.run(
        ["umoci", "ls", "--layout", str(store.root)], capture_output=True, text=True, check=True
    )
    assert set(listed.stdout.split()) == {ref_name, "web:1.0"}
    bundle = tmp_path / "bundle"
    subprocess.run(
        ["umoci", "unpack", "--image", f"{store.root}:web:1.0", str(bundle)],
        capture_output=True,
        check=True,
    )
    assert (bundle / "rootfs/etc/message").read_text() == "hello\n"
    assert (bundle / "rootfs/srv/app/server.sh").stat().st_mode & 0o777 == 0o755
