"""SBOMs: a real Debian bake gets a schema-valid CycloneDX 1.6 SBOM attached as a referrer,
with the packages dpkg itself reports; hostile layers are read bounded, in memory, and
never resolved on the host."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import time
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from packageurl import PackageURL

from kiln.errors import KilnError
from kiln.image.bake import bake
from kiln.image.digest import (
    MEDIA_TYPE_CONFIG,
    MEDIA_TYPE_LAYER_TAR,
    MEDIA_TYPE_MANIFEST,
    Descriptor,
    canonical_json,
)
from kiln.image.store import ImageStore
from kiln.image.unpack import unpack_image
from kiln.spec import load_spec
from kiln.supply.sbom import (
    MAX_STATUS_BYTES,
    SBOM_ARTIFACT_TYPE,
    build_sbom,
    components,
    ensure_sbom,
    image_sbom,
    read_contents,
    stored_sbom,
    validate_cyclonedx,
)

DEB_CACHE = Path(os.environ.get("KILN_CACHE", "/var/cache/kiln-test"))
RECIPE = """[project]
name = "sbomtest"

[images.py]
from = "debian:bookworm"
packages = ["python3-minimal"]
steps = [
  { copy = "app/", to = "/srv/app" },
]
cmd = ["python3", "/srv/app/main.py"]
"""
APP = {
    "app/main.py": "print('hello')\n",
    "app/lib/fake_dist-1.2.3.dist-info/METADATA": (
        "Metadata-Version: 2.1\nName: Fake_Dist\nVersion: 1.2.3\nSummary: a test\n\nlong text\n"
    ),
    "app/lib/fake_dist-1.2.3.dist-info/RECORD": "",
}


@dataclass(frozen=True)
class Baked:
    project: Path
    home: Path
    digest: str
    store: ImageStore


@pytest.fixture(scope="module")
def debian_bake(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Baked]:
    if os.geteuid() != 0 or shutil.which("mmdebstrap") is None:
        pytest.skip("a Debian bake needs root and mmdebstrap")
    root = tmp_path_factory.mktemp("sbom")
    project = root / "project"
    for rel, text in APP.items():
        (project / rel).parent.mkdir(parents=True, exist_ok=True)
        (project / rel).write_text(text)
    (project / "kiln.toml").write_text(RECIPE)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KILN_HOME", str(root / "home"))
        mp.setenv("KILN_CACHE", str(DEB_CACHE))
        store = ImageStore(root / "home" / "images")
        result = bake(load_spec(project / "kiln.toml"), store=store)["py"]
        yield Baked(project, root / "home", result.digest, store)


@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_a_debian_bake_attaches_a_valid_sbom_with_what_dpkg_reports(
    debian_bake: Baked, tmp_path: Path
) -> None:
    store = debian_bake.store
    [referrer] = store.referrers(debian_bake.digest, SBOM_ARTIFACT_TYPE)
    assert referrer.artifact_type == SBOM_ARTIFACT_TYPE
    document = stored_sbom(store, debian_bake.digest)
    assert document is not None
    assert document["specVersion"] == "1.6"
    assert validate_cyclonedx(document) == []
    assert document["metadata"]["component"]["version"] == debian_bake.digest
    # the stored SBOM is the one a fresh read of the image gives, byte for byte
    assert build_sbom(store, debian_bake.digest) == document

    tree = tmp_path / "tree"
    unpack_image(store, debian_bake.digest, tree)
    query = subprocess.run(
        [
            "dpkg-query",
            f"--admindir={tree}/var/lib/dpkg",
            "-W",
            "-f=${Package}\t${Version}\t${Architecture}\t${source:Package}\t${source:Version}\n",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    expected = {tuple(line.split("\t")) for line in query.stdout.splitlines()}
    found = components(document)
    debs = [c for c in found if c.ecosystem == "debian"]
    assert {(c.name, c.version, c.source_name, c.source_version) for c in debs} == {
        (p, v, sp, sv) for p, v, _, sp, sv in expected
    }
    assert "python3-minimal" in {c.name for c in debs}
    assert any(c.source_name != c.name for c in debs)  # e.g. libc6 from glibc
    arches = {p: a for p, _, a, _, _ in expected}
    for c in debs:
        purl = PackageURL.from_string(c.purl)
        assert (purl.type, purl.namespace, purl.name, purl.version) == (
            "deb",
            "debian",
            c.name,
            c.version,
        )
        assert purl.qualifiers == {"arch": arches[c.name], "distro": "bookworm"}

    [dist] = [c for c in found if c.ecosystem == "pypi"]
    assert (dist.name, dist.version, dist.purl) == (
        "Fake_Dist",
        "1.2.3",
        "pkg:pypi/fake-dist@1.2.3",
    )
    files = {c.name: c.sha256 for c in found if c.ecosystem == "file"}
    for rel, text in APP.items():
        path = "/srv/app/" + rel.removeprefix("app/")
        assert files[path] == hashlib.sha256(text.encode()).hexdigest()
    assert len(files) == len(APP)  # the Debian layers' files are packages, not copies


@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_a_cached_rebake_does_not_redo_the_sbom(debian_bake: Baked) -> None:
    store = debian_bake.store
    index = store._referrer_index(debian_bake.digest)
    before = (index.stat().st_mtime_ns, sorted(p.name for p in store.blobs.iterdir()))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KILN_HOME", str(debian_bake.home))
        mp.setenv("KILN_CACHE", str(DEB_CACHE))
        started = time.monotonic()
        result = bake(load_spec(debian_bake.project / "kiln.toml"), store=store)["py"]
        seconds = time.monotonic() - started
    assert result.digest == debian_bake.digest
    assert result.layers_built == 0
    assert (index.stat().st_mtime_ns, sorted(p.name for p in store.blobs.iterdir())) == before
    assert ensure_sbom(store, debian_bake.digest) is None
    assert seconds < 5, seconds


@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_cli_prints_cyclonedx_and_spdx(
    debian_bake: Baked, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kiln.cli.sbom_cmd  # noqa: F401  (registers the commands, as run() will)
    from kiln.cli.app import run

    monkeypatch.setenv("KILN_HOME", str(debian_bake.home))
    out = tmp_path / "sbom.spdx.json"
    assert run(["sbom", "py", "--format", "spdx", "-o", str(out)]) == 0
    spdx = json.loads(out.read_text())
    assert spdx["spdxVersion"] == "SPDX-2.3"
    assert spdx["dataLicense"] == "CC0-1.0"
    ids = {p["SPDXID"] for p in spdx["packages"]}
    assert len(ids) == len(spdx["packages"])
    assert all(
        r["spdxElementId"] in ids | {"SPDXRef-DOCUMENT"} and r["relatedSpdxElement"] in ids
        for r in spdx["relationships"]
    )
    purls = {
        ref["referenceLocator"]
        for p in spdx["packages"]
        for ref in p.get("externalRefs", [])
        if ref["referenceType"] == "purl"
    }
    document = image_sbom(debian_bake.store, "py")
    assert {c.purl for c in components(document) if c.purl} <= purls
    cdx = tmp_path / "sbom.cdx.json"
    assert run(["sbom", "py", "-o", str(cdx)]) == 0
    assert json.loads(cdx.read_text()) == document
    assert run(["sbom", "py", "--format", "xml"]) == 1


# -- hostile images (no Debian needed) -----------------------------------------


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ImageStore:
    monkeypatch.setenv("KILN_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("KILN_BASE_CACHE", str(tmp_path / "bases"))  # not the machine's
    return ImageStore(tmp_path / "home" / "images")


class _Repeat(io.RawIOBase):
    """``size`` bytes of ``chunk`` repeated, without holding them in memory."""

    def __init__(self, chunk: bytes, size: int) -> None:
        self._chunk = chunk * (1 << 20 // len(chunk) + 1)
        self._left = size

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        n = self._left if n < 0 else min(n, self._left)
        out = (self._chunk * (n // len(self._chunk) + 1))[:n]
        self._left -= n
        return out


Entry = tuple[str, bytes | _Repeat | None, int, str]
"""(name, content, size, symlink target) — content None with a target makes a symlink,
None without one a directory."""


def _layer(store: ImageStore, entries: list[Entry]) -> Descriptor:
    out, tmp = store.temp_file()
    with out, tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, content, size, target in entries:
            info = tarfile.TarInfo(name)
            if content is None and target:
                info.type, info.linkname = tarfile.SYMTYPE, target
                tf.addfile(info)
            elif content is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tf.addfile(info)
            else:
                info.size = size
                tf.addfile(info, io.BytesIO(content) if isinstance(content, bytes) else content)
    return store.put_file(tmp, MEDIA_TYPE_LAYER_TAR, move=True)


def _image(store: ImageStore, layers: list[list[Entry]], history: list[str] | None = None) -> str:
    descs = [_layer(store, entries) for entries in layers]
    config = {
        "architecture": "amd64",
        "os": "linux",
        "created": "2024-01-01T00:00:00Z",
        "rootfs": {"type": "layers", "diff_ids": [d.digest for d in descs]},
        "history": [{"created_by": h} for h in (history or ["test"] * len(descs))],
    }
    config_desc = store.put_bytes(canonical_json(config), MEDIA_TYPE_CONFIG)
    manifest = {
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_MANIFEST,
        "config": config_desc.to_json(),
        "layers": [d.to_json() for d in descs],
    }
    stored = store.put_bytes(canonical_json(manifest), MEDIA_TYPE_MANIFEST)
    store.tag("evil:1", stored)
    return "evil:1"


def _file(name: str, data: bytes) -> Entry:
    return (name, data, len(data), "")


STANZA = (
    b"Package: good\nStatus: install ok installed\nArchitecture: amd64\n"
    b"Source: goodsrc (1.0-1)\nVersion: 1.0-1+b1\n\n"
)


def test_a_huge_dpkg_status_is_skipped_bounded(store: ImageStore) -> None:
    size = 100 << 20
    assert size > MAX_STATUS_BYTES
    ref = _image(store, [[("var/lib/dpkg/status", _Repeat(STANZA, size), size, "")]])
    tracemalloc.start()
    try:
        contents = read_contents(store, ref)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert contents.debian == []
    assert any("bytes (more than" in w for w in contents.warnings)
    assert peak < 32 << 20, peak


def test_a_garbage_dpkg_status_keeps_what_is_valid(store: ImageStore) -> None:
    garbage = os.urandom(64 << 10) + b"\n\n" + STANZA
    garbage += b"Package: ../../etc\nStatus: install ok installed\nVersion: 1\nArchitecture: x\n\n"
    garbage += b"Package: bad\nStatus: install ok installed\nVersion: 1 2\nArchitecture: all\n\n"
    garbage += b"Package: gone\nStatus: deinstall ok config-files\nVersion: 1\nArchitecture: all\n"
    ref = _image(store, [[_file("var/lib/dpkg/status", garbage)]])
    contents = read_contents(store, ref)
    assert [(p.name, p.version, p.source_name, p.source_version) for p in contents.debian] == [
        ("good", "1.0-1+b1", "goodsrc", "1.0-1")
    ]
    assert any("malformed package entries skipped" in w for w in contents.warnings)
    document = build_sbom(store, ref)
    assert validate_cyclonedx(document) == []


def test_a_metadata_with_a_huge_header_is_read_bounded(store: ImageStore) -> None:
    size = 10 << 20
    header = _Repeat(b"X-Junk: " + b"a" * 1000 + b"\n", size)
    ref = _image(
        store,
        [
            [
                ("usr/lib/python3/dist-packages/huge-1.dist-info/METADATA", header, size, ""),
                _file(
                    "usr/lib/python3/dist-packages/ok-2.dist-info/METADATA",
                    b"Name: ok\nVersion: 2.0\n",
                ),
            ]
        ],
    )
    tracemalloc.start()
    try:
        contents = read_contents(store, ref)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [(d.name, d.version) for d in contents.python] == [("ok", "2.0")]
    assert any("huge-1.dist-info/METADATA" in w for w in contents.warnings)
    assert peak < 8 << 20, peak


def test_symlinks_and_traversal_never_reach_the_host(store: ImageStore, tmp_path: Path) -> None:
    outside = tmp_path / "outside" / "host-9.dist-info"
    outside.mkdir(parents=True)
    (outside / "METADATA").write_text("Name: hostpkg\nVersion: 9\n")
    (tmp_path / "outside" / "status").write_bytes(STANZA.replace(b"good", b"hostdeb"))
    ref = _image(
        store,
        [
            [
                ("usr/lib/python3/dist-packages/host-9.dist-info", None, 0, str(outside)),
                ("usr/lib/python3/dist-packages/rel-1.dist-info", None, 0, "../../../../../tmp"),
                ("usr/lib/python3/dist-packages/ln-1.dist-info", None, 0, ""),
                (
                    "usr/lib/python3/dist-packages/ln-1.dist-info/METADATA",
                    None,
                    0,
                    str(outside / "METADATA"),
                ),
                ("var/lib/dpkg", None, 0, str(tmp_path / "outside")),
                ("etc/os-release", None, 0, "/etc/os-release"),
                _file("../../escape-1.dist-info/METADATA", b"Name: escape\nVersion: 1\n"),
            ]
        ],
    )
    contents = read_contents(store, ref)
    assert contents.python == [] and contents.debian == []
    assert contents.os_id == ""  # the host's /etc/os-release is never read
    assert any("unsafe path" in w for w in contents.warnings)
    assert validate_cyclonedx(build_sbom(store, ref)) == []


def test_whiteouts_hide_what_lower_layers_had(store: ImageStore) -> None:
    meta = b"Name: gone\nVersion: 1\n"
    ref = _image(
        store,
        [
            [
                _file("usr/lib/python3/gone-1.dist-info/METADATA", meta),
                _file("opt/venv/lib/kept-1.dist-info/METADATA", b"Name: kept\nVersion: 1\n"),
                _file("opt/other/x-1.dist-info/METADATA", b"Name: x\nVersion: 1\n"),
                _file("srv/app/a.txt", b"a"),
            ],
            [
                _file("usr/lib/python3/.wh.gone-1.dist-info", b""),
                _file("opt/other/.wh..wh..opq", b""),
                _file("opt/other/y-2.dist-info/METADATA", b"Name: y\nVersion: 2\n"),
                _file("srv/app/b.txt", b"b"),
            ],
        ],
        history=["kiln: base", "copy app/ → /srv/app"],
    )
    contents = read_contents(store, ref)
    assert sorted((d.name, d.version) for d in contents.python) == [("kept", "1"), ("y", "2")]
    # only the copy step's layer counts as copied files (by the config's history)
    assert [(f.path, f.sha256) for f in contents.files] == [
        ("/opt/other/y-2.dist-info/METADATA", hashlib.sha256(b"Name: y\nVersion: 2\n").hexdigest()),
        ("/srv/app/b.txt", hashlib.sha256(b"b").hexdigest()),
    ]


def test_a_tampered_layer_is_named(store: ImageStore) -> None:
    ref = _image(store, [[_file("srv/a", b"a")]])
    layer = store.manifest(ref)["layers"][0]["digest"]
    path = store.blob_path(layer)
    data = bytearray(path.read_bytes())
    data[600] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(
        KilnError, match=r"layer sha256:[0-9a-f]{12}…: blob content hashes to sha256:"
    ):
        read_contents(store, ref)
