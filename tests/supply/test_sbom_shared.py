"""The machine-wide cache of SBOM parts: a large layer every home shares (a Debian base)
is read once per machine, and neither a home holding a forged blob nor a file another
user planted can change what another home's SBOM says."""

from __future__ import annotations

import io
import os
import stat
import tarfile
from pathlib import Path

import pytest

from kiln.errors import KilnError
from kiln.image.digest import (
    MEDIA_TYPE_CONFIG,
    MEDIA_TYPE_LAYER_TAR,
    MEDIA_TYPE_MANIFEST,
    Descriptor,
    canonical_json,
)
from kiln.image.store import ImageStore
from kiln.supply.sbom import SHARED_FORMAT, SHARED_MIN_BYTES, read_contents
from kiln.supply.store_reads import cache_layer_result

STATUS = (
    b"Package: good\nStatus: install ok installed\nArchitecture: amd64\n"
    b"Source: goodsrc (1.0-1)\nVersion: 1.0-1+b1\n\n"
)
FILLER = bytes(range(256)) * (SHARED_MIN_BYTES // 256 + 1024)
"""Makes the layer blob larger than the sharing threshold, the same bytes in every home."""


def _image(store: ImageStore, ref: str) -> tuple[str, Descriptor]:
    """A two-layer image: a large 'base' with a dpkg status, and a small top layer."""
    layers = []
    for entries in (
        [("var/lib/dpkg/status", STATUS), ("usr/share/filler.bin", FILLER)],
        [("srv/app.txt", b"app\n")],
    ):
        out, tmp = store.temp_file()
        with out, tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tf:
            for name, data in entries:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
        layers.append(store.put_file(tmp, MEDIA_TYPE_LAYER_TAR, move=True))
    config = {
        "architecture": "amd64",
        "os": "linux",
        "created": "2024-01-01T00:00:00Z",
        "rootfs": {"type": "layers", "diff_ids": [d.digest for d in layers]},
        "history": [{"created_by": "base"}, {"created_by": "app"}],
    }
    config_desc = store.put_bytes(canonical_json(config), MEDIA_TYPE_CONFIG)
    manifest = {
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_MANIFEST,
        "config": config_desc.to_json(),
        "layers": [d.to_json() for d in layers],
    }
    store.tag(ref, store.put_bytes(canonical_json(manifest), MEDIA_TYPE_MANIFEST))
    assert layers[0].size >= SHARED_MIN_BYTES > layers[1].size
    return ref, layers[0]


def _packages(store: ImageStore, ref: str, home: Path, shared: Path) -> list[str]:
    contents = read_contents(store, ref, home / "cache" / "sbom", shared)
    return [p.name for p in contents.debian]


def _part(shared: Path, layer: Descriptor) -> Path:
    return shared / f"{layer.digest.removeprefix('sha256:')}-v{SHARED_FORMAT}.json"


@pytest.fixture
def shared(tmp_path: Path) -> Path:
    return tmp_path / "bases" / "supply" / "sbom"


def test_a_fresh_home_takes_a_large_layer_from_the_machine_cache(
    tmp_path: Path, shared: Path
) -> None:
    first = ImageStore(tmp_path / "a" / "images")
    ref, base = _image(first, "img:1")
    assert _packages(first, ref, tmp_path / "a", shared) == ["good"]
    part = _part(shared, base)
    assert stat.S_IMODE(part.stat().st_mode) == 0o600
    assert stat.S_IMODE(shared.stat().st_mode) == 0o700
    only_large = sorted(p.name for p in shared.iterdir())
    assert only_large == [part.name], "the small top layer stays in the home's cache"

    second = ImageStore(tmp_path / "b" / "images")
    _image(second, "img:1")
    second.blob_path(base.digest).unlink()  # the part, not the blob, answers
    assert _packages(second, ref, tmp_path / "b", shared) == ["good"]
    with pytest.raises(KilnError):
        read_contents(second, ref, tmp_path / "c" / "cache", False)


def test_a_forged_blob_in_one_home_never_reaches_another(tmp_path: Path, shared: Path) -> None:
    hostile = ImageStore(tmp_path / "hostile" / "images")
    ref, base = _image(hostile, "img:1")
    blob = hostile.blob_path(base.digest)
    forged = blob.read_bytes().replace(b"Package: good", b"Package: evil")
    os.chmod(blob, 0o600)
    blob.write_bytes(forged)
    with pytest.raises(KilnError, match="blob content hashes to"):
        _packages(hostile, ref, tmp_path / "hostile", shared)
    assert not _part(shared, base).exists(), "nothing read from a forged blob is shared"

    honest = ImageStore(tmp_path / "honest" / "images")
    _image(honest, "img:1")
    assert _packages(honest, ref, tmp_path / "honest", shared) == ["good"]


def _plant_lie(shared: Path, layer: Descriptor, named: str | None = None) -> Path:
    """A part that says the base holds ``evil``, written as Kiln writes parts."""
    ops = [["f", "var/lib/dpkg/status", {"kind": "status", "data": ""}]]
    cache_layer_result(
        shared, _part(shared, layer).name, {"layer": named or layer.digest, "ops": ops}
    )
    return _part(shared, layer)


@pytest.mark.parametrize(
    "loosen", ["world-writable file", "another owner", "symlink", "open directory", "other layer"]
)
def test_a_part_someone_else_could_have_written_is_not_trusted(
    tmp_path: Path, shared: Path, loosen: str
) -> None:
    store = ImageStore(tmp_path / "home" / "images")
    ref, base = _image(store, "img:1")
    honest = _packages(store, ref, tmp_path / "honest", shared)
    assert honest == ["good"]
    trusted_lie = _plant_lie(shared, base)
    assert _packages(store, ref, tmp_path / "probe", shared) == [], (
        "a part written by this user is read as it is (the probe shows the lie is readable)"
    )
    part = _plant_lie(shared, base)
    assert part == trusted_lie
    if loosen == "world-writable file":
        os.chmod(part, 0o666)
    elif loosen == "another owner":
        if os.geteuid() != 0:
            pytest.skip("giving a file to another user needs root")
        os.chown(part, 65534, 65534)
    elif loosen == "symlink":
        target = tmp_path / "lie.json"
        os.replace(part, target)
        part.symlink_to(target)
    elif loosen == "open directory":
        os.chmod(shared, 0o777)
    else:
        _plant_lie(shared, base, named="sha256:" + "0" * 64)
    assert _packages(store, ref, tmp_path / f"fresh-{loosen}", shared) == honest
