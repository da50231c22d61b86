"""Software bill of materials: what is inside a baked image, as CycloneDX 1.6 JSON.

The SBOM is the evidence every later supply-chain check reads (vulnerability scan,
policy gate), so its component list is also offered back as plain
:class:`Component` records that do not depend on the CycloneDX library.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import re
import tarfile
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TypeGuard
from urllib.parse import parse_qs, unquote

from kiln.errors import KilnError
from kiln.image.digest import (
    ANNOTATION_CREATED,
    ANNOTATION_REF_NAME,
    ANNOTATION_TITLE,
    MEDIA_TYPE_MANIFEST,
    Descriptor,
    is_digest,
)
from kiln.image.store import ImageStore
from kiln.paths import kiln_home
from kiln.supply.store_reads import (
    cache_layer_result,
    layer_tar,
    newest_referrer_document,
    read_shared_result,
    shared_cache_dir,
    write_shared_result,
)

Ecosystem = Literal["debian", "pypi", "file"]

PROPERTY_SOURCE_NAME = "dev.kiln:source:name"
PROPERTY_SOURCE_VERSION = "dev.kiln:source:version"
PROPERTY_ECOSYSTEM = "dev.kiln:ecosystem"


@dataclass(frozen=True)
class Component:
    """One thing in an image: a Debian package, a Python distribution or a copied file."""

    ecosystem: Ecosystem
    name: str
    version: str
    source_name: str
    """The Debian source package (the package itself when it has no ``Source:``); for
    PyPI and files the name again, so a matcher can always key on it."""
    source_version: str
    purl: str
    """``pkg:deb/debian/…``, ``pkg:pypi/…``; for a file, ``""`` (files have no purl)."""
    sha256: str = ""
    """A file's content hash (hex), empty for packages."""


def components(sbom_json: dict[str, Any]) -> list[Component]:
    """The components of a CycloneDX SBOM Kiln wrote (or any with deb/pypi purls).

    Unknown or malformed entries are skipped rather than failing: a scan of what can
    be read beats no scan.
    """
    out: list[Component] = []
    raw = sbom_json.get("components")
    if not isinstance(raw, list):
        return out
    for item in raw:
        if isinstance(item, dict):
            component = _component(item)
            if component is not None:
                out.append(component)
    return out


def _component(item: dict[str, Any]) -> Component | None:
    name = item.get("name")
    version = item.get("version")
    if not isinstance(name, str) or not name:
        return None
    version = version if isinstance(version, str) else ""
    properties = _properties(item)
    purl = item.get("purl") if isinstance(item.get("purl"), str) else ""
    assert isinstance(purl, str)
    ecosystem = properties.get(PROPERTY_ECOSYSTEM)
    if purl.startswith("pkg:deb/"):
        ecosystem = "debian"
    elif purl.startswith("pkg:pypi/"):
        ecosystem = "pypi"
    elif ecosystem is None and item.get("type") == "file":
        ecosystem = "file"
    if ecosystem == "debian":
        qualifiers = _purl_qualifiers(purl)
        upstream = qualifiers.get("upstream", "")
        source_name = properties.get(PROPERTY_SOURCE_NAME) or upstream.partition("@")[0] or name
        source_version = (
            properties.get(PROPERTY_SOURCE_VERSION) or upstream.partition("@")[2] or version
        )
        return Component("debian", name, version, source_name, source_version, purl)
    if ecosystem == "pypi":
        return Component("pypi", name, version, name, version, purl)
    if ecosystem == "file":
        return Component("file", name, version, name, version, purl, _sha256(item))
    return None


def _properties(item: dict[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    raw = item.get("properties")
    if isinstance(raw, list):
        for prop in raw:
            if isinstance(prop, dict) and isinstance(prop.get("name"), str):
                value = prop.get("value")
                out[prop["name"]] = value if isinstance(value, str) else ""
    return out


def _purl_qualifiers(purl: str) -> dict[str, str]:
    query = purl.partition("?")[2].partition("#")[0]
    return {k: unquote(v[0]) for k, v in parse_qs(query).items() if v}


def _sha256(item: dict[str, Any]) -> str:
    hashes = item.get("hashes")
    if isinstance(hashes, list):
        for entry in hashes:
            if isinstance(entry, dict) and entry.get("alg") == "SHA-256":
                content = entry.get("content")
                if isinstance(content, str):
                    return content
    return ""


# -- reading an image ---------------------------------------------------------

SBOM_ARTIFACT_TYPE = "application/vnd.cyclonedx+json"
SBOM_MEDIA_TYPE = "application/vnd.cyclonedx+json"
MAX_STATUS_BYTES = 64 << 20
"""A dpkg status of every Debian package ever made is ~60 MB; more is hostile."""
MAX_METADATA_BYTES = 64 << 10
"""Name and Version sit at the top of METADATA; the rest (the long description) is not read."""
MAX_OS_RELEASE_BYTES = 64 << 10
MAX_FILE_COMPONENTS = 100_000
MAX_WARNINGS = 20
_STATUS_PATH = "var/lib/dpkg/status"
_OS_RELEASE_PATHS = ("etc/os-release", "usr/lib/os-release")
_METADATA_RE = re.compile(r"^(?:.*/)?[^/]+\.dist-info/METADATA$")
_DEB_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")
_DEB_VERSION_RE = re.compile(r"^[A-Za-z0-9.+~:-]{1,256}$")
_DEB_ARCH_RE = re.compile(r"^[a-z0-9-]{1,32}$")
_PY_NAME_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,198}[A-Za-z0-9])?$")
_PY_VERSION_RE = re.compile(r"^[A-Za-z0-9.!+_-]{1,128}$")
_OS_FIELD_RE = re.compile(r"^[a-z0-9._-]{1,64}$")
_WHITEOUT = ".wh."
_OPAQUE = ".wh..wh..opq"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class DebianPackage:
    name: str
    version: str
    architecture: str
    source_name: str
    source_version: str


@dataclass(frozen=True)
class PythonDistribution:
    name: str
    version: str
    path: str
    """The ``*.dist-info`` directory, rootfs-relative with a leading ``/``."""


@dataclass(frozen=True)
class CopiedFile:
    path: str
    sha256: str
    size: int


@dataclass
class ImageContents:
    """What an image holds, read from its layers without extracting anything."""

    debian: list[DebianPackage] = field(default_factory=list)
    python: list[PythonDistribution] = field(default_factory=list)
    files: list[CopiedFile] = field(default_factory=list)
    os_id: str = ""
    os_version_id: str = ""
    os_codename: str = ""
    warnings: list[str] = field(default_factory=list)

    def warn(self, message: str) -> None:
        if len(self.warnings) < MAX_WARNINGS:
            self.warnings.append(message)
        elif len(self.warnings) == MAX_WARNINGS:
            self.warnings.append("more problems were found; only the first ones are listed")


@dataclass
class _Found:
    """One interesting path in the merged view of the layers read so far."""

    kind: Literal["status", "metadata", "os-release", "link", "file"]
    layer: int
    data: bytes | None = None
    """Content read (bounded); ``None`` when it was too large to read."""
    sha256: str = ""
    size: int = 0
    link: str = ""

    def to_json(self) -> dict[str, Any]:
        data = base64.b64encode(self.data).decode() if self.data is not None else None
        return {
            "kind": self.kind,
            "data": data,
            "sha256": self.sha256,
            "size": self.size,
            "link": self.link,
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any], layer: int) -> _Found | None:
        kind = raw.get("kind")
        if kind not in ("status", "metadata", "os-release", "link", "file"):
            return None
        try:
            data = base64.b64decode(raw["data"]) if raw.get("data") is not None else None
            return cls(
                kind,
                layer,
                data,
                str(raw.get("sha256", "")),
                int(raw.get("size", 0)),
                str(raw.get("link", "")),
            )
        except (ValueError, TypeError):
            return None


def read_contents(
    store: ImageStore,
    ref: str,
    cache: Path | None = None,
    shared: Path | Literal[False] | None = None,
) -> ImageContents:
    """The Debian packages, Python distributions and copied files of ``ref``.

    Layers stream through tarfile in memory, bottom to top, with whiteouts and opaque
    directories applied to a view of the few paths that matter; nothing is written to
    disk and no path of the image is ever resolved on the host. Every read is bounded.
    What one layer contributes is kept in ``cache`` (default ``$KILN_HOME/cache/sbom``)
    under the layer's digest, so a re-bake after an app edit reads only the new layers;
    what a large layer that is not a recipe's copy contributes (a Debian base, a packages
    layer) is also kept in ``shared`` (default: beside the machine's shared bases; False:
    none), so a bake in a fresh home does not read the base every home shares again.
    """
    descriptor = store.resolve(ref) if not _stored_digest(store, ref) else None
    digest = descriptor.digest if descriptor is not None else ref
    manifest = store.read_json(digest)
    try:
        layers = [Descriptor.from_json(layer) for layer in manifest.get("layers", [])]
        config = store.read_json(str(manifest["config"]["digest"]))
    except (KeyError, TypeError, AttributeError) as e:
        raise KilnError(f"manifest {digest} of {ref} is malformed: {e}") from e
    copy_layers = _copy_layers(config, len(layers))
    cache_dir = cache if cache is not None else kiln_home() / "cache" / "sbom"
    shared_dir = shared_cache_dir("sbom") if shared is None else shared or None
    contents = ImageContents()
    view: dict[str, _Found] = {}
    for number, layer in enumerate(layers):
        ops = _layer_ops(store, layer, number in copy_layers, cache_dir, shared_dir)
        _replay(ops, view, number, contents)
    _collect(view, contents)
    return contents


_Op = list[Any]
"""One step of a layer's effect on the view: ``["o", dir]`` opaque, ``["w", path]``
whiteout, ``["d", path]`` a directory, ``["x", path]`` any other entry, ``["f", path,
found]`` an entry worth keeping, ``["!", message]`` a warning."""


SHARED_MIN_BYTES = 1 << 20
"""A layer smaller than this reads in milliseconds: its part stays in the home's cache."""
SHARED_FORMAT = 1
"""In the shared part's name: bumped when the ops change, so old parts are not read."""


def _valid_ops(data: object) -> TypeGuard[list[_Op]]:
    return isinstance(data, list) and all(isinstance(op, list) and op for op in data)


def _layer_ops(
    store: ImageStore,
    layer: Descriptor,
    copied: bool,
    cache_dir: Path,
    shared_dir: Path | None,
) -> list[_Op]:
    """A layer's ops: the home's cache, else the machine's (large plain layers), else read
    from the blob. A shared part is only ever written from a read that hashed the blob to
    its digest, and only trusted when this user wrote it (:func:`read_shared_result`), so
    a home holding a forged blob or a planted file cannot change another home's SBOM."""
    name = f"{layer.digest.removeprefix('sha256:')}-{'copy' if copied else 'plain'}.json"
    path = cache_dir / name
    with contextlib.suppress(OSError, ValueError):
        data = json.loads(path.read_bytes())
        if _valid_ops(data):
            return list(data)
    shared_name = f"{layer.digest.removeprefix('sha256:')}-v{SHARED_FORMAT}.json"
    share = shared_dir is not None and not copied and layer.size >= SHARED_MIN_BYTES
    if share and shared_dir is not None:
        found = read_shared_result(shared_dir, shared_name)
        if isinstance(found, dict) and found.get("layer") == layer.digest:
            ops = found.get("ops")
            if _valid_ops(ops):
                return list(ops)
    ops = _scan_layer(store, layer, copied)
    cache_layer_result(cache_dir, name, ops)
    if share and shared_dir is not None:
        write_shared_result(shared_dir, shared_name, {"layer": layer.digest, "ops": ops})
    return ops


def _scan_layer(store: ImageStore, layer: Descriptor, copied: bool) -> list[_Op]:
    """A layer's ops, read from its blob (hashed as it streams: a tampered blob fails)."""
    source = f"layer {layer.digest[:19]}…"
    ops: list[_Op] = []
    files = 0
    with layer_tar(store, layer, source) as tf:
        for member in tf:
            path = _member_path(member.name)
            if path is None:
                ops.append(["!", f"{source}: entry {member.name!r} skipped (unsafe path)"])
                continue
            parent, _, base = path.rpartition("/")
            if base == _OPAQUE:
                ops.append(["o", parent])
                continue
            if base.startswith(_WHITEOUT):
                hidden = base.removeprefix(_WHITEOUT)
                ops.append(["w", f"{parent}/{hidden}" if parent else hidden])
                continue
            ops.append(["d" if member.isdir() else "x", path])
            if copied and member.isreg():
                files += 1
                if files <= MAX_FILE_COMPONENTS:
                    head = MAX_METADATA_BYTES if _METADATA_RE.match(path) else 0
                    ops.append(["f", path, _hash_member(tf, member, head)])
                    continue
                if files == MAX_FILE_COMPONENTS + 1:
                    ops.append(
                        [
                            "!",
                            f"{source}: more than {MAX_FILE_COMPONENTS} copied files; "
                            "the rest are not listed",
                        ]
                    )
            found = _interesting(tf, member, path, ops, source)
            if found is not None:
                ops.append(["f", path, found])
    return ops


def _replay(ops: list[_Op], view: dict[str, _Found], layer: int, contents: ImageContents) -> None:
    for op in ops:
        kind, arg = op[0], str(op[1])
        if kind == "o":
            prefix = f"{arg}/" if arg else ""
            for key in [k for k, v in view.items() if k.startswith(prefix) and v.layer < layer]:
                del view[key]
        elif kind == "w":
            _drop(view, arg, layer, below_only=True)
        elif kind == "d":
            view.pop(arg, None)  # a directory over a file; the tree below it stays
        elif kind == "x":
            _drop(view, arg, layer, below_only=False)
        elif kind == "f" and len(op) == 3 and isinstance(op[2], dict):
            found = _Found.from_json(op[2], layer)
            if found is not None:
                view[arg] = found
        elif kind == "!":
            contents.warn(arg)


def _stored_digest(store: ImageStore, ref: str) -> bool:
    return is_digest(ref) and store.has(ref)


def _copy_layers(config: dict[str, Any], layer_count: int) -> set[int]:
    """Indexes of the layers a ``copy`` step made, from the config's history
    (``created_by`` is ``copy SRC → DEST``; empty layers have no blob)."""
    history = config.get("history")
    if not isinstance(history, list):
        return set()
    made = [h for h in history if isinstance(h, dict) and not h.get("empty_layer")]
    if len(made) != layer_count:
        return set()
    return {
        i
        for i, entry in enumerate(made)
        if isinstance(entry.get("created_by"), str) and entry["created_by"].startswith("copy ")
    }


def _member_path(name: str) -> str | None:
    """A member name as a rootfs-relative path (``a/b``), or ``None`` when it climbs out."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        return None
    return "/".join(parts)


def _drop(view: dict[str, _Found], path: str, layer: int, *, below_only: bool) -> None:
    """Forget ``path`` and everything under it (replaced or hidden by a newer entry)."""
    if path in view and (not below_only or view[path].layer < layer):
        del view[path]
    prefix = path + "/"
    for key in [k for k, v in view.items() if k.startswith(prefix)]:
        if not below_only or view[key].layer < layer:
            del view[key]


def _read_bounded(tf: tarfile.TarFile, member: tarfile.TarInfo, limit: int) -> bytes:
    handle = tf.extractfile(member)
    if handle is None:
        return b""
    with handle:
        return handle.read(limit)


def _hash_member(tf: tarfile.TarFile, member: tarfile.TarInfo, head: int) -> dict[str, Any]:
    """A copied file's sha256; with ``head``, its first bytes too (a copied METADATA)."""
    digest = hashlib.sha256()
    kept: bytes | None = None
    handle = tf.extractfile(member)
    if handle is not None:
        with handle:
            if head:
                kept = handle.read(head)
                digest.update(kept)
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
    return _Found("file", 0, kept, sha256=digest.hexdigest(), size=member.size).to_json()


def _interesting(
    tf: tarfile.TarFile, member: tarfile.TarInfo, path: str, ops: list[_Op], source: str
) -> dict[str, Any] | None:
    if path == _STATUS_PATH and member.isreg():
        if member.size > MAX_STATUS_BYTES:
            ops.append(
                [
                    "!",
                    f"{source}: /{path} is {member.size} bytes (more than {MAX_STATUS_BYTES}); "
                    "its Debian packages are not listed",
                ]
            )
            return _Found("status", 0, None).to_json()
        return _Found("status", 0, _read_bounded(tf, member, MAX_STATUS_BYTES)).to_json()
    if path in _OS_RELEASE_PATHS:
        if member.issym():
            return _Found("link", 0, link=member.linkname).to_json()
        if member.isreg():
            data = _read_bounded(tf, member, MAX_OS_RELEASE_BYTES)
            return _Found("os-release", 0, data).to_json()
        return None
    if member.isreg() and _METADATA_RE.match(path):
        return _Found("metadata", 0, _read_bounded(tf, member, MAX_METADATA_BYTES)).to_json()
    return None


def _collect(view: dict[str, _Found], contents: ImageContents) -> None:
    status = view.get(_STATUS_PATH)
    if status is not None and status.data is not None:
        contents.debian = parse_dpkg_status(status.data, contents)
    os_release = _os_release(view)
    if os_release is not None:
        fields = _parse_os_release(os_release)
        contents.os_id = fields.get("ID", "")
        contents.os_version_id = fields.get("VERSION_ID", "")
        contents.os_codename = fields.get("VERSION_CODENAME", "")
    seen: set[tuple[str, str]] = set()
    for path in sorted(view):
        found = view[path]
        if found.kind == "file":
            contents.files.append(CopiedFile("/" + path, found.sha256, found.size))
        if found.kind in ("metadata", "file") and found.data is not None:
            dist = _parse_metadata(found.data, "/" + path.rpartition("/")[0], contents)
            if dist is not None and (dist.name.lower(), dist.version) not in seen:
                seen.add((dist.name.lower(), dist.version))
                contents.python.append(dist)


def _os_release(view: dict[str, _Found]) -> bytes | None:
    """``/etc/os-release``, following its usual symlink to ``/usr/lib/os-release`` inside
    the image's own view (never on the host)."""
    for path in _OS_RELEASE_PATHS:
        found = view.get(path)
        if found is None:
            continue
        if found.kind == "os-release":
            return found.data
        if found.kind == "link":
            target = view.get(_OS_RELEASE_PATHS[1])
            if target is not None and target.kind == "os-release":
                return target.data
    return None


def _parse_os_release(data: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in data.decode("utf-8", "replace").splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() in ("ID", "VERSION_ID", "VERSION_CODENAME"):
            value = value.strip().strip("\"'").lower()
            if _OS_FIELD_RE.match(value):
                out[key.strip()] = value
    return out


def parse_dpkg_status(data: bytes, contents: ImageContents | None = None) -> list[DebianPackage]:
    """The installed packages of a dpkg status file; malformed stanzas are skipped."""
    report = contents if contents is not None else ImageContents()
    out: list[DebianPackage] = []
    skipped = 0
    for stanza in re.split(r"\n\s*\n", data.decode("utf-8", "replace")):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if not line or line[0] in " \t":
                continue
            key, sep, value = line.partition(":")
            if sep and key in ("Package", "Version", "Architecture", "Source", "Status"):
                fields[key] = value.strip()
        if not fields:
            continue
        if not fields.get("Status", "").endswith(" installed"):
            continue
        package = _debian_package(fields)
        if package is None:
            skipped += 1
        else:
            out.append(package)
    if skipped:
        report.warn(f"/{_STATUS_PATH}: {skipped} malformed package entries skipped")
    return sorted(set(out), key=lambda p: (p.name, p.architecture, p.version))


def _debian_package(fields: dict[str, str]) -> DebianPackage | None:
    name = fields.get("Package", "")
    version = fields.get("Version", "")
    arch = fields.get("Architecture", "")
    if not (
        _DEB_NAME_RE.match(name) and _DEB_VERSION_RE.match(version) and _DEB_ARCH_RE.match(arch)
    ):
        return None
    source_name, source_version = name, version
    source = fields.get("Source", "")
    if source:
        head, _, rest = source.partition(" ")
        source_name = head
        rest = rest.strip()
        if rest.startswith("(") and rest.endswith(")"):
            source_version = rest[1:-1].strip()
    if not _DEB_NAME_RE.match(source_name) or not _DEB_VERSION_RE.match(source_version):
        return None
    return DebianPackage(name, version, arch, source_name, source_version)


def _parse_metadata(data: bytes, where: str, contents: ImageContents) -> PythonDistribution | None:
    name = version = ""
    for line in data.decode("utf-8", "replace").splitlines():
        if not line.strip():
            break
        key, sep, value = line.partition(":")
        if sep and key == "Name" and not name:
            name = value.strip()
        elif sep and key == "Version" and not version:
            version = value.strip()
        if name and version:
            break
    if not (_PY_NAME_RE.match(name) and _PY_VERSION_RE.match(version)):
        contents.warn(f"{where}/METADATA: no valid Name and Version in its first lines; skipped")
        return None
    return PythonDistribution(name, version, where)


def pypi_name(name: str) -> str:
    """PEP 503 normalisation, as the pypi purl type wants names."""
    return re.sub(r"[-_.]+", "-", name).lower()


# -- documents ----------------------------------------------------------------


def build_sbom(
    store: ImageStore,
    ref: str,
    cache: Path | None = None,
    shared: Path | Literal[False] | None = None,
) -> dict[str, Any]:
    """The CycloneDX 1.6 SBOM of ``ref`` as JSON, the same bytes for the same image
    (``cache`` and ``shared`` as :func:`read_contents` takes them)."""
    subject = _subject(store, ref)
    contents = read_contents(store, subject.digest, cache, shared)
    manifest = store.read_json(subject.digest)
    title = (manifest.get("annotations") or {}).get(ANNOTATION_TITLE) or ""
    name = title or (subject.annotations or {}).get(ANNOTATION_REF_NAME, "").rpartition(":")[0]
    created = str(store.config(subject.digest).get("created") or "")
    return cyclonedx_document(contents, name or "image", subject.digest, created)


def cyclonedx_document(
    contents: ImageContents, image_name: str, image_digest: str, created: str
) -> dict[str, Any]:
    """Serialise ``contents`` with cyclonedx-python-lib; serial number and timestamp come
    from the image, so the document is reproducible."""
    from cyclonedx.model import HashAlgorithm, HashType, Property
    from cyclonedx.model.bom import Bom, BomMetaData
    from cyclonedx.model.component import Component as CdxComponent
    from cyclonedx.model.component import ComponentType
    from cyclonedx.model.tool import ToolRepository
    from cyclonedx.output.json import JsonV1Dot6
    from packageurl import PackageURL

    from kiln import __version__

    distro = contents.os_codename or (
        f"{contents.os_id}-{contents.os_version_id}" if contents.os_version_id else ""
    )
    vendor = contents.os_id if contents.os_id in ("debian", "ubuntu") else "debian"
    items: list[CdxComponent] = []
    for deb in contents.debian:
        qualifiers = {"arch": deb.architecture}
        if distro:
            qualifiers["distro"] = distro
        purl = PackageURL(
            type="deb", namespace=vendor, name=deb.name, version=deb.version, qualifiers=qualifiers
        )
        items.append(
            CdxComponent(
                name=deb.name,
                version=deb.version,
                type=ComponentType.LIBRARY,
                purl=purl,
                bom_ref=purl.to_string(),
                properties=[
                    Property(name=PROPERTY_ECOSYSTEM, value="debian"),
                    Property(name=PROPERTY_SOURCE_NAME, value=deb.source_name),
                    Property(name=PROPERTY_SOURCE_VERSION, value=deb.source_version),
                ],
            )
        )
    for dist in contents.python:
        purl = PackageURL(type="pypi", name=pypi_name(dist.name), version=dist.version)
        items.append(
            CdxComponent(
                name=dist.name,
                version=dist.version,
                type=ComponentType.LIBRARY,
                purl=purl,
                bom_ref=f"{purl.to_string()}#{dist.path}",
                properties=[
                    Property(name=PROPERTY_ECOSYSTEM, value="pypi"),
                    Property(name="dev.kiln:path", value=dist.path),
                ],
            )
        )
    for copied in contents.files:
        items.append(
            CdxComponent(
                name=copied.path,
                type=ComponentType.FILE,
                bom_ref=f"file:{copied.path}",
                hashes=[HashType(alg=HashAlgorithm.SHA_256, content=copied.sha256)],
                properties=[
                    Property(name=PROPERTY_ECOSYSTEM, value="file"),
                    Property(name="dev.kiln:size", value=str(copied.size)),
                ],
            )
        )
    root_purl = PackageURL(type="oci", name=_oci_name(image_name), version=image_digest)
    root = CdxComponent(
        name=image_name,
        version=image_digest,
        type=ComponentType.CONTAINER,
        purl=root_purl,
        bom_ref=image_digest,
    )
    properties = [Property(name="dev.kiln:warning", value=w) for w in contents.warnings]
    if contents.os_id:
        properties.append(Property(name="dev.kiln:os:id", value=contents.os_id))
    if contents.os_version_id:
        properties.append(Property(name="dev.kiln:os:version-id", value=contents.os_version_id))
    if contents.os_codename:
        properties.append(Property(name="dev.kiln:os:codename", value=contents.os_codename))
    kiln_tool = CdxComponent(name="kiln", version=__version__, type=ComponentType.APPLICATION)
    bom = Bom(
        components=items,
        serial_number=uuid.uuid5(uuid.NAMESPACE_URL, f"kiln-sbom:{image_digest}"),
        metadata=BomMetaData(
            component=root,
            timestamp=_timestamp(created),
            tools=ToolRepository(components=[kiln_tool]),
            properties=properties,
        ),
    )
    bom.register_dependency(root, items)
    document: dict[str, Any] = json.loads(JsonV1Dot6(bom).output_as_string())
    return document


def validate_cyclonedx(document: dict[str, Any]) -> list[str]:
    """Every CycloneDX 1.6 schema error of ``document`` (empty when valid), by the
    library's own strict validator."""
    from cyclonedx.schema import SchemaVersion
    from cyclonedx.validation.json import JsonStrictValidator

    errors = JsonStrictValidator(SchemaVersion.V1_6).validate_str(
        json.dumps(document), all_errors=True
    )
    if errors is None:
        return []
    if isinstance(errors, Exception):
        return [str(errors)]
    return [str(e) for e in errors]


def to_spdx(document: dict[str, Any]) -> dict[str, Any]:
    """SPDX 2.3 JSON from the same component list: one package per component (purl as an
    external reference, sha256 as a checksum), all contained in the image's package."""
    metadata = document.get("metadata") if isinstance(document.get("metadata"), dict) else {}
    assert isinstance(metadata, dict)
    root = metadata.get("component") if isinstance(metadata.get("component"), dict) else {}
    assert isinstance(root, dict)
    image_name = str(root.get("name") or "image")
    image_digest = str(root.get("version") or "")
    created = str(metadata.get("timestamp") or "1970-01-01T00:00:00Z")
    created = _timestamp(created).strftime("%Y-%m-%dT%H:%M:%SZ")
    root_id = "SPDXRef-Image"
    packages: list[dict[str, Any]] = [
        {
            "name": image_name,
            "SPDXID": root_id,
            "versionInfo": image_digest,
            "downloadLocation": "NOASSERTION",
            "filesAnalyzed": False,
            "primaryPackagePurpose": "CONTAINER",
        }
    ]
    if isinstance(root.get("purl"), str):
        packages[0]["externalRefs"] = [_spdx_purl(str(root["purl"]))]
    relationships: list[dict[str, str]] = [
        {
            "spdxElementId": "SPDXRef-DOCUMENT",
            "relationshipType": "DESCRIBES",
            "relatedSpdxElement": root_id,
        }
    ]
    for number, component in enumerate(components(document), start=1):
        spdx_id = f"SPDXRef-{component.ecosystem}-{number}"
        package: dict[str, Any] = {
            "name": component.name,
            "SPDXID": spdx_id,
            "downloadLocation": "NOASSERTION",
            "filesAnalyzed": False,
            "primaryPackagePurpose": "FILE" if component.ecosystem == "file" else "LIBRARY",
        }
        if component.version:
            package["versionInfo"] = component.version
        if component.purl:
            package["externalRefs"] = [_spdx_purl(component.purl)]
        if component.sha256:
            package["checksums"] = [{"algorithm": "SHA256", "checksumValue": component.sha256}]
        if component.ecosystem == "debian" and component.source_name != component.name:
            package["sourceInfo"] = (
                f"built from Debian source package {component.source_name} "
                f"{component.source_version}"
            )
        packages.append(package)
        relationships.append(
            {
                "spdxElementId": root_id,
                "relationshipType": "CONTAINS",
                "relatedSpdxElement": spdx_id,
            }
        )
    serial = str(document.get("serialNumber") or uuid.uuid4().urn).removeprefix("urn:uuid:")
    return {
        "spdxVersion": "SPDX-2.3",
        "dataLicense": "CC0-1.0",
        "SPDXID": "SPDXRef-DOCUMENT",
        "name": f"{image_name}@{image_digest}",
        "documentNamespace": f"https://kiln.dev/spdx/{image_name}-{serial}",
        "creationInfo": {"created": created, "creators": ["Tool: kiln"]},
        "packages": packages,
        "relationships": relationships,
    }


def _spdx_purl(purl: str) -> dict[str, str]:
    return {
        "referenceCategory": "PACKAGE-MANAGER",
        "referenceType": "purl",
        "referenceLocator": purl,
    }


def _timestamp(created: str) -> datetime:
    try:
        return datetime.fromisoformat(created.replace("Z", "+00:00")).astimezone(UTC)
    except ValueError:
        return datetime.fromtimestamp(0, UTC)


def _oci_name(name: str) -> str:
    """The last path component, lowercase, as the oci purl type wants it."""
    return name.rpartition("/")[2].lower() or "image"


def _subject(store: ImageStore, ref: str) -> Descriptor:
    if _stored_digest(store, ref):
        return Descriptor(MEDIA_TYPE_MANIFEST, ref, store.blob_path(ref).stat().st_size)
    return store.resolve(ref)


# -- the store ------------------------------------------------------------------


def stored_sbom(store: ImageStore, ref: str) -> dict[str, Any] | None:
    """The newest SBOM referrer of ``ref``, or ``None`` when it has none."""
    return newest_referrer_document(store, ref, SBOM_ARTIFACT_TYPE, "SBOM")


def ensure_sbom(store: ImageStore, ref: str) -> Descriptor | None:
    """Attach the SBOM of ``ref`` unless it already has one (a cached re-bake reads one
    small index file and stops). Returns the new referrer, or ``None`` when none was made."""
    if store.referrers(ref, SBOM_ARTIFACT_TYPE):
        return None
    document = build_sbom(store, ref)
    payload = json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
    return store.put_referrer(
        ref,
        SBOM_ARTIFACT_TYPE,
        payload,
        SBOM_MEDIA_TYPE,
        {ANNOTATION_CREATED: str(document.get("metadata", {}).get("timestamp", ""))},
    )


def image_sbom(store: ImageStore, ref: str, fmt: str = "cyclonedx") -> dict[str, Any]:
    """``kiln sbom``: the stored SBOM (computed when the image has none), in ``fmt``."""
    if fmt not in ("cyclonedx", "spdx"):
        raise KilnError(f"unknown SBOM format {fmt!r}: use cyclonedx or spdx")
    document = stored_sbom(store, ref) or build_sbom(store, ref)
    return to_spdx(document) if fmt == "spdx" else document
