"""Where a recipe starts: ``scratch``, ``image:NAME``, ``oci:PATH[:REF]``, ``registry:HOST/REPO``
(Debian: debian.py).

A base is reduced to the same two things whatever its source: the layers
(descriptors already in the image store, with their diff_ids) and the
config the recipe inherits (Env, Cmd, WorkingDir, …). Nothing is unpacked
here; the bake executor materialises layers only when a ``run`` step needs
a root filesystem.
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.errors import KilnError
from kiln.image.digest import (
    ANNOTATION_REF_NAME,
    MEDIA_TYPE_INDEX,
    Descriptor,
    check_digest,
)
from kiln.image.store import ImageStore
from kiln.image.unpack import apply_layer

if TYPE_CHECKING:
    from kiln.image.registry import RegistryOptions

_CHUNK = 1 << 20
_OCI_ARCH = {
    "x86_64": "amd64",
    "amd64": "amd64",
    "aarch64": "arm64",
    "arm64": "arm64",
    "armv7l": "arm",
    "i686": "386",
    "i386": "386",
    "ppc64le": "ppc64le",
    "s390x": "s390x",
    "riscv64": "riscv64",
}


def oci_architecture() -> str:
    """The host's architecture in OCI terms (``amd64``, ``arm64``, …)."""
    machine = platform.machine()
    return _OCI_ARCH.get(machine, machine)


@dataclass(frozen=True)
class BaseLayer:
    descriptor: Descriptor
    diff_id: str
    source: str

    @property
    def size(self) -> int:
        return self.descriptor.size


@dataclass(frozen=True)
class BaseImage:
    """A resolved base: its layers in order, the config it hands down and its history."""

    label: str
    layers: tuple[BaseLayer, ...] = ()
    config: dict[str, Any] = field(default_factory=dict)
    history: tuple[dict[str, Any], ...] = ()


def base_kind(source: str) -> str:
    if source == "scratch":
        return "scratch"
    for kind in ("debian", "image", "oci", "registry"):
        if source.startswith(kind + ":"):
            return kind
    return "unknown"


def image_dependency(source: str) -> str | None:
    return source.removeprefix("image:") if base_kind(source) == "image" else None


SCRATCH = BaseImage("scratch")


def _from_manifest(
    store: ImageStore, label: str, manifest: dict[str, Any], config: dict[str, Any]
) -> BaseImage:
    try:
        layers = [Descriptor.from_json(item) for item in manifest.get("layers", [])]
        diff_ids = [str(d) for d in config["rootfs"]["diff_ids"]]
    except (KeyError, TypeError) as e:
        raise KilnError(f"{label}: malformed manifest or config: {e}") from e
    if len(layers) != len(diff_ids):
        raise KilnError(
            f"{label}: manifest has {len(layers)} layers but config lists {len(diff_ids)} diff_ids"
        )
    for diff_id in diff_ids:
        check_digest(diff_id)
    inherited = config.get("config") or {}
    history = config.get("history") or []
    return BaseImage(
        label,
        tuple(
            BaseLayer(layer, diff_id, f"{label}: layer {layer.digest}")
            for layer, diff_id in zip(layers, diff_ids, strict=True)
        ),
        dict(inherited) if isinstance(inherited, dict) else {},
        tuple(h for h in history if isinstance(h, dict)),
    )


def kiln_image_base(store: ImageStore, source: str, manifest_digest: str) -> BaseImage:
    """``image:NAME``: the image this bake (or an earlier one) produced for NAME."""
    manifest = store.read_json(manifest_digest)
    try:
        config_digest = str(manifest["config"]["digest"])
    except (KeyError, TypeError):
        raise KilnError(f"{source}: manifest {manifest_digest} has no config") from None
    return _from_manifest(store, source, manifest, store.read_json(config_digest))


def split_oci_source(source: str, project_root: Path) -> tuple[str, str | None]:
    """``oci:PATH[:REF]`` → (PATH, REF).

    REF may itself hold colons (Kiln writes ``NAME:TAG`` ref names), so the
    split is at the first colon whose left side is an existing directory.
    """
    rest = source.removeprefix("oci:")
    if (project_root / rest).is_dir():
        return rest, None
    start = 0
    while (colon := rest.find(":", start)) != -1:
        path, ref = rest[:colon], rest[colon + 1 :]
        if path and ref and (project_root / path).is_dir():
            return path, ref
        start = colon + 1
    return rest, None


class _Layout:
    def __init__(self, root: Path, label: str) -> None:
        self.root = root
        self.label = label

    def blob(self, digest: str) -> Path:
        try:
            hex_part = check_digest(digest).removeprefix("sha256:")
        except KilnError as e:
            raise KilnError(f"{self.label}: {e}") from None
        return self.root / "blobs" / "sha256" / hex_part

    def verified(self, digest: str) -> Path:
        path = self.blob(digest)
        h = hashlib.sha256()
        try:
            with open(path, "rb") as f:
                while chunk := f.read(_CHUNK):
                    h.update(chunk)
        except FileNotFoundError:
            raise KilnError(f"{self.label}: blob {digest} is missing from the layout") from None
        except OSError as e:
            raise KilnError(f"{self.label}: cannot read blob {digest}: {e}") from e
        if "sha256:" + h.hexdigest() != digest:
            raise KilnError(
                f"{self.label}: blob {digest} hashes to sha256:{h.hexdigest()}; "
                "the layout is corrupt or was tampered with"
            )
        return path

    def json(self, digest: str) -> dict[str, Any]:
        try:
            data = json.loads(self.verified(digest).read_bytes())
        except ValueError as e:
            raise KilnError(f"{self.label}: blob {digest} is not JSON: {e}") from e
        if not isinstance(data, dict):
            raise KilnError(f"{self.label}: blob {digest} is not a JSON object")
        return data


def _pick_manifest(layout: _Layout, ref: str | None) -> Descriptor:
    try:
        index = json.loads((layout.root / "index.json").read_bytes())
        entries = [Descriptor.from_json(m) for m in index.get("manifests", [])]
    except FileNotFoundError:
        raise KilnError(f"{layout.label}: no OCI layout at {layout.root} (no index.json)") from None
    except (OSError, ValueError, AttributeError) as e:
        raise KilnError(f"{layout.label}: cannot read {layout.root}/index.json: {e}") from e
    if ref is None:
        # An export's referrers (SBOM, provenance) are entries too, but not images.
        chosen = [e for e in entries if not e.artifact_type]
    elif ref.startswith("sha256:"):
        chosen = [e for e in entries if e.digest == ref]
    else:
        chosen = [e for e in entries if (e.annotations or {}).get(ANNOTATION_REF_NAME) == ref]
    if not chosen:
        what = f"no manifest {ref}" if ref else "no manifests"
        raise KilnError(f"{layout.label}: {what} in {layout.root}/index.json")
    if len(chosen) > 1:
        names = sorted((e.annotations or {}).get(ANNOTATION_REF_NAME, e.digest) for e in chosen)
        raise KilnError(
            f"{layout.label}: the layout holds {len(chosen)} images ({', '.join(names)}); "
            "name one as oci:PATH:REF"
        )
    entry = chosen[0]
    if entry.media_type == MEDIA_TYPE_INDEX:
        nested = layout.json(entry.digest)
        arch = oci_architecture()
        for item in nested.get("manifests", []):
            plat = item.get("platform") or {}
            if plat.get("os") == "linux" and plat.get("architecture") == arch:
                return Descriptor.from_json(item)
        raise KilnError(f"{layout.label}: no linux/{arch} image in index {entry.digest}")
    return entry


def oci_layout_base(store: ImageStore, source: str, project_root: Path) -> BaseImage:
    """``oci:PATH[:REF]``: copy a layout's image into the store, every blob re-hashed first."""
    path_text, ref = split_oci_source(source, project_root)
    root = (project_root / path_text).absolute()
    layout = _Layout(root, source)
    if not root.is_dir():
        raise KilnError(f"{source}: no OCI layout at {root}")
    entry = _pick_manifest(layout, ref)
    manifest = layout.json(entry.digest)
    try:
        config_desc = Descriptor.from_json(manifest["config"])
        layer_descs = [Descriptor.from_json(item) for item in manifest.get("layers", [])]
    except (KeyError, TypeError) as e:
        raise KilnError(f"{source}: manifest {entry.digest} is malformed: {e}") from e
    config = layout.json(config_desc.digest)
    _refuse_hostile_layers(store, source, layout, layer_descs)
    for layer in layer_descs:
        if not store.has(layer.digest):
            stored = store.put_file(layout.verified(layer.digest), layer.media_type)
            if stored.digest != layer.digest:
                raise KilnError(f"{source}: layer {layer.digest} changed while it was copied")
    store.put_file(layout.verified(config_desc.digest), config_desc.media_type)
    store.put_file(layout.verified(entry.digest), entry.media_type)
    return _from_manifest(store, source, manifest, config)


def _refuse_hostile_layers(
    store: ImageStore, source: str, layout: _Layout, layers: list[Descriptor]
) -> None:
    """Every foreign layer goes through the one safe extractor before anything is stored,

    so a traversal attempt is refused even when no later step would unpack it.
    """
    scratch = Path(tempfile.mkdtemp(dir=store.tmp_dir, prefix="oci-check-"))
    try:
        for layer in layers:
            with open(layout.verified(layer.digest), "rb") as blob:
                apply_layer(blob, scratch, source=f"{source}: layer {layer.digest}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def registry_pin_key(source: str) -> str | None:
    """The ``kiln.lock`` table that pins a registry base's tag; None when ``from`` is a digest."""
    from kiln.image.registry import parse_ref

    ref = parse_ref(source)
    if ref.digest:
        return None
    return f"registry:{ref.host}/{ref.repository}:{ref.tag or 'latest'}"


def registry_base(
    store: ImageStore, source: str, digest: str, options: RegistryOptions
) -> BaseImage:
    """``registry:HOST/REPO`` at ``digest``: taken from the store when an earlier bake pulled
    it, else pulled with every blob verified and every layer through the safe extractor
    before anything is stored."""
    from kiln.image.registry import parse_ref, pull

    ref = parse_ref(source)
    local = f"{ref.repository}:sha256-{check_digest(digest).removeprefix('sha256:')[:16]}"
    stored = _stored_base(store, source, local)
    if stored is not None:
        return stored
    scratch = Path(tempfile.mkdtemp(dir=store.tmp_dir, prefix="registry-check-"))
    try:

        def check(layer: Descriptor, path: Path) -> None:
            with open(path, "rb") as blob:
                apply_layer(blob, scratch, source=f"{source}: layer {layer.digest}")

        result = pull(
            store,
            f"{ref.host}/{ref.repository}@{digest}",
            options,
            local_name=local,
            check_layer=check,
        )
        manifest = store.read_json(result.digest)
        for item in manifest.get("layers") or []:
            layer = Descriptor.from_json(item)
            if layer.digest in result.present:
                with store.open_blob(layer.digest) as blob:
                    apply_layer(blob, scratch, source=f"{source}: layer {layer.digest}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return _from_manifest(store, source, manifest, store.read_json(manifest["config"]["digest"]))


def _stored_base(store: ImageStore, source: str, local: str) -> BaseImage | None:
    """The base an earlier bake pulled (its tag is written only once all of it was checked)."""
    try:
        entry = store.resolve(local)
        manifest = store.read_json(entry.digest)
        config = store.read_json(str(manifest["config"]["digest"]))
        layers = [Descriptor.from_json(item) for item in manifest.get("layers") or []]
    except (KilnError, KeyError, TypeError):
        return None
    if not all(store.has(layer.digest) for layer in layers):
        return None
    return _from_manifest(store, source, manifest, config)
