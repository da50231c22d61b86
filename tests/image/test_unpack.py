import gzip
import hashlib
import io
import os
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from kiln.errors import KilnError
from kiln.image.digest import MEDIA_TYPE_LAYER_GZIP, MEDIA_TYPE_LAYER_TAR, Descriptor
from kiln.image.layer import LayerResult, layer_from_dir
from kiln.image.store import ImageStore
from kiln.image.unpack import apply_layer, unpack_image

EPOCH = 1_700_000_000
Entry = tuple[str, bytes, str | bytes]  # name, tar type, content or link target


def _tar(entries: list[Entry]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, kind, value in entries:
            info = tarfile.TarInfo(name)
            info.type = kind
            info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
            if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
                assert isinstance(value, str)
                info.linkname = value
                tf.addfile(info)
            elif kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
                info.devmajor, info.devminor = 1, 3
                tf.addfile(info)
            elif kind == tarfile.REGTYPE:
                data = value.encode() if isinstance(value, str) else value
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
            else:
                tf.addfile(info)
    return buf.getvalue()


def _layer(store: ImageStore, raw: bytes, *, compress: bool = True) -> LayerResult:
    blob = gzip.compress(raw, mtime=0) if compress else raw
    media = MEDIA_TYPE_LAYER_GZIP if compress else MEDIA_TYPE_LAYER_TAR
    desc = store.put_bytes(blob, media)
    return LayerResult(desc, "sha256:" + hashlib.sha256(raw).hexdigest(), len(raw), 0)


R, D, S, H = tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE

HOSTILE: dict[str, tuple[list[Entry], str, str]] = {
    "dotdot": ([("../escaped", R, "x")], "../escaped", "contains '..'"),
    "nested-dotdot": ([("a/../../escaped", R, "x")], "a/../../escaped", "contains '..'"),
    "absolute": ([("/tmp/kiln-abs-escape", R, "x")], "/tmp/kiln-abs-escape", "absolute path"),
    "symlink-escape": (
        [("up", S, "../../../../../tmp"), ("up/kiln-escape", R, "x")],
        "up",
        "escapes the root",
    ),
    "write-through-symlink": (
        [("etc", S, "/tmp"), ("etc/kiln-through", R, "x")],
        "etc/kiln-through",
        "parent etc is a symlink; refusing to write through it",
    ),
    "write-through-inner-symlink": (
        [("d", D, ""), ("d/l", S, "."), ("d/l/f", R, "x")],
        "d/l/f",
        "parent d/l is a symlink",
    ),
    "hardlink-escape": ([("h", H, "../../etc/passwd")], "h", "contains '..'"),
    "hardlink-absolute": ([("h", H, "/etc/passwd")], "h", "absolute hardlink target"),
    "hardlink-missing": ([("h", H, "nothere")], "h", "does not exist"),
    "hardlink-through-symlink": (
        [("s", S, "/etc"), ("h", H, "s/passwd")],
        "h",
        "parent s is a symlink",
    ),
    "char-device": ([("dev", D, ""), ("dev/null", tarfile.CHRTYPE, "")], "dev/null", "device"),
    "block-device": ([("sda", tarfile.BLKTYPE, "")], "sda", "device"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_layers_are_refused_and_leave_nothing(
    case: str,
    store: ImageStore,
    tmp_path: Path,
    image_builder: Callable[..., Descriptor],
    busybox_tree: Callable[..., Path],
) -> None:
    entries, entry, why = HOSTILE[case]
    good = layer_from_dir(busybox_tree(tmp_path / "base"), store, EPOCH)
    image_builder(store, [good, _layer(store, _tar(entries))], "evil:1")
    dest = tmp_path / "out" / "rootfs"
    with pytest.raises(KilnError) as err:
        unpack_image(store, "evil:1", dest)
    message = str(err.value)
    assert message.startswith("layer 2 (sha256:")
    assert f"of evil:1: entry {entry!r}" in message
    assert why in message
    assert not dest.exists()
    assert list((tmp_path / "out").iterdir()) == []
    for escaped in ("kiln-abs-escape", "kiln-escape", "kiln-through"):
        assert not (Path("/tmp") / escaped).exists()
    assert not (tmp_path / "escaped").exists()


def test_absurd_entry_size_is_refused(tmp_path: Path) -> None:
    info = tarfile.TarInfo("huge")
    info.size = 65 << 30
    raw = info.tobuf(tarfile.PAX_FORMAT) + b"\0" * 1024
    dest = tmp_path / "d"
    dest.mkdir()
    with pytest.raises(KilnError, match="entry 'huge': size 69793218560 exceeds"):
        apply_layer(io.BytesIO(raw), dest, source="big layer")
    assert list(dest.iterdir()) == []


def test_unpacked_image_runs(
    store: ImageStore, tmp_path: Path, busybox_image: tuple[str, Descriptor]
) -> None:
    ref_name, _ = busybox_image
    dest = tmp_path / "rootfs"
    unpack_image(store, "web", dest)
    assert os.readlink(dest / "bin/sh") == "busybox"
    assert (dest / "srv/app/server.sh").stat().st_mode & 0o777 == 0o755
    assert (dest / "etc/message").stat().st_mtime <= EPOCH
    out = subprocess.run(
        ["chroot", str(dest), "/bin/sh", "-c", "cat /etc/message; /srv/app/server.sh"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout == "hello\nserving\n"
    with pytest.raises(KilnError, match="already exists"):
        unpack_image(store, ref_name, dest)


def test_whiteouts_and_opaque_dirs_hide_lower_layers(
    store: ImageStore, tmp_path: Path, image_builder: Callable[..., Descriptor]
) -> None:
    lower = _tar(
        [
            ("a", D, ""),
            ("a/x", R, "x"),
            ("a/sub", D, ""),
            ("a/sub/deep", R, "deep"),
            ("b", D, ""),
            ("b/z", R, "z"),
            ("b/keep", R, "keep"),
            ("c", D, ""),
            ("c/d", R, "d"),
        ]
    )
    upper = _tar(
        [
            ("a", D, ""),
            ("a/-new", R, "new"),
            ("a/.wh..wh..opq", R, ""),
            ("a/sub", D, ""),
            ("a/sub/fresh", R, "fresh"),
            ("b/.wh.z", R, ""),
            ("c", R, "c is a file now"),
        ]
    )
    image_builder(store, [_layer(store, lower), _layer(store, upper, compress=False)], "wh:1")
    dest = tmp_path / "rootfs"
    unpack_image(store, "wh:1", dest)
    listing = sorted(str(p.relative_to(dest)) for p in dest.rglob("*"))
    assert listing == ["a", "a/-new", "a/sub", "a/sub/fresh", "b", "b/keep", "c"]
    assert (dest / "c").read_text() == "c is a file now"
    # b lost z to a layer that does not name b: b keeps its own time, as the merged
    # tree of the layer snapshots shows it (a step reading it must see the same).
    assert (dest / "b").lstat().st_mtime == 0


def test_corrupt_layer_blob_fails_the_unpack(
    store: ImageStore, tmp_path: Path, busybox_image: tuple[str, Descriptor]
) -> None:
    ref_name, _ = busybox_image
    layer = store.manifest(ref_name)["layers"][1]["digest"]
    path = store.blob_path(layer)
    data = bytearray(gzip.decompress(path.read_bytes()))
    data[600:606] = b"EVIL!!"
    path.write_bytes(gzip.compress(bytes(data)))
    dest = tmp_path / "rootfs"
    with pytest.raises(KilnError, match=f"layer 2 .* of {ref_name}: blob content hashes to"):
        unpack_image(store, ref_name, dest)
    assert not dest.exists() and list(tmp_path.glob(".rootfs*")) == []


def test_garbage_is_not_a_layer(tmp_path: Path) -> None:
    with pytest.raises(KilnError, match="base layer: not a valid tar archive"):
        apply_layer(io.BytesIO(b"\x1f\x8b garbage" * 100), tmp_path, source="base layer")
