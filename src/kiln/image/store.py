"""The OCI image layout on disk: content-addressed blobs, ``index.json``, immutable tags.

Crash safety rests on two rules. A blob only ever appears under the name of
its own hash: bytes are written to a temp file in ``.tmp`` (same filesystem),
hashed, fsynced and renamed into place, so a crash leaves at worst a stray temp
file that :meth:`ImageStore.gc` sweeps. ``index.json`` is replaced the same
way, under an ``fcntl`` lock on ``.lock``, so two processes tagging at once
both keep their entries and a reader never sees half a file.

Referrers (OCI 1.1 artifacts whose manifest has a ``subject``: SBOMs, provenance,
signatures) are blobs like any other; what lists them is one small image index per
subject, ``referrers/sha256/<subject hex>.json``, shaped as the registry referrers API
answers and replaced under the same lock. Listing an image's evidence reads one file;
``gc`` keeps a referrer exactly as long as its subject is kept.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, BinaryIO

from kiln.errors import KilnError
from kiln.image.digest import (
    ANNOTATION_REF_NAME,
    ANNOTATION_TITLE,
    MEDIA_TYPE_EMPTY,
    MEDIA_TYPE_INDEX,
    MEDIA_TYPE_MANIFEST,
    Descriptor,
    canonical_json,
    check_digest,
    is_digest,
)
from kiln.paths import kiln_home, private_dirs

_CHUNK = 1 << 20
_NAME_RE = re.compile(r"^[a-z0-9]+(?:[._-][a-z0-9]+)*(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*$")
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_HEX_PREFIX_RE = re.compile(r"^[0-9a-f]{6,64}$")
_MIN_PREFIX = 6
_STALE_TEMP_SECONDS = 3600.0
_EMPTY_JSON = b"{}"
_ARTIFACT_TYPE_RE = re.compile(
    r"^[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}$"
)
_MAX_REFERRER_INDEX = 4 << 20
ANNOTATION_STORED = "dev.kiln.stored"
"""On an ``index.json`` entry: when the tag was recorded (RFC 3339, UTC), i.e. when the
image was baked. Kept out of the image, whose config holds the reproducible time."""


@dataclass(frozen=True)
class ImageEntry:
    ref_name: str
    digest: str
    size: int
    created: str | None
    """The config's ``created``: reproducible, so the same for every bake of a recipe."""
    title: str | None
    stored: str | None = None
    """When the tag was recorded in this store (RFC 3339, UTC): when it was baked."""

    @property
    def name(self) -> str:
        return self.ref_name.rsplit(":", 1)[0]

    @property
    def tag(self) -> str:
        return self.ref_name.rsplit(":", 1)[1] if ":" in self.ref_name else ""


@dataclass(frozen=True)
class GcResult:
    removed_blobs: int
    freed_bytes: int


def split_ref_name(ref_name: str) -> tuple[str, str]:
    """``web:1.0`` → (``web``, ``1.0``); refuses what OCI tools and Docker would not accept."""
    name, sep, tag = ref_name.rpartition(":")
    if not sep or not _NAME_RE.match(name) or not _TAG_RE.match(tag):
        raise KilnError(
            f"bad image tag {ref_name!r}: expected NAME:TAG "
            "(NAME lowercase [a-z0-9._-/], TAG [A-Za-z0-9_.-], at most 128 chars)"
        )
    return name, tag


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ImageStore:
    """One OCI image layout (``$KILN_HOME/images``) readable by skopeo, umoci and Kiln."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).absolute()
        self.blobs = self.root / "blobs" / "sha256"
        self.tmp_dir = self.root / ".tmp"
        self._lock_path = self.root / ".lock"
        self._index_path = self.root / "index.json"
        self.referrer_dir = self.root / "referrers" / "sha256"
        try:
            private_dirs(self.blobs)
            private_dirs(self.tmp_dir)
            if not (self.root / "oci-layout").exists():
                self._write_atomic(
                    self.root / "oci-layout", canonical_json({"imageLayoutVersion": "1.0.0"})
                )
            if not self._index_path.exists():
                with self._locked():
                    if not self._index_path.exists():
                        self._write_index([])
        except OSError as e:
            raise KilnError(f"cannot create image store at {self.root}: {e}") from e

    @classmethod
    def default(cls) -> ImageStore:
        return cls(kiln_home() / "images")

    # -- blobs -------------------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        return self.blobs / check_digest(digest).removeprefix("sha256:")

    def has(self, digest: str) -> bool:
        return is_digest(digest) and self.blob_path(digest).is_file()

    def temp_file(self, suffix: str = "") -> tuple[IO[bytes], Path]:
        """A writable temp file on the store's filesystem, for callers that stream a blob."""
        fd, name = tempfile.mkstemp(dir=self.tmp_dir, prefix="blob-", suffix=suffix)
        return os.fdopen(fd, "wb"), Path(name)

    def put_bytes(self, data: bytes, media_type: str) -> Descriptor:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if not self.has(digest):
            self._write_atomic(self.blob_path(digest), data)
        return Descriptor(media_type, digest, len(data))

    def put_file(self, src: Path, media_type: str, *, move: bool = False) -> Descriptor:
        """Store a file's bytes under their hash.

        With ``move=True`` and ``src`` on the store's filesystem (e.g. made by
        :meth:`temp_file`) the file is hashed and renamed instead of copied;
        ``src`` is gone afterwards either way.
        """
        src = Path(src)
        if move:
            try:
                digest, size = _hash_file(src)
                self._publish(src, digest)
                return Descriptor(media_type, digest, size)
            except OSError as e:
                if e.errno != errno.EXDEV:
                    raise KilnError(f"cannot store {src} in {self.root}: {e}") from e
        out, tmp = self.temp_file()
        try:
            h = hashlib.sha256()
            size = 0
            with out, open(src, "rb") as f:
                while chunk := f.read(_CHUNK):
                    h.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
                out.flush()
                os.fsync(out.fileno())
            digest = "sha256:" + h.hexdigest()
            self._publish(tmp, digest)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise KilnError(f"cannot store {src} in {self.root}: {e}") from e
        except BaseException:
            tmp.unlink(missing_ok=True)  # Ctrl-C: no half-copied blob stays behind
            raise
        if move:
            src.unlink(missing_ok=True)
        return Descriptor(media_type, digest, size)

    def read_bytes(self, digest: str) -> bytes:
        try:
            return self.blob_path(digest).read_bytes()
        except FileNotFoundError:
            raise KilnError(f"blob {digest} is missing from {self.root}") from None

    def open_blob(self, digest: str) -> BinaryIO:
        try:
            return open(self.blob_path(digest), "rb")
        except FileNotFoundError:
            raise KilnError(f"blob {digest} is missing from {self.root}") from None

    def read_json(self, digest: str) -> dict[str, Any]:
        try:
            data = json.loads(self.read_bytes(digest))
        except (ValueError, UnicodeDecodeError) as e:
            raise KilnError(f"blob {digest} in {self.root} is not JSON: {e}") from e
        if not isinstance(data, dict):
            raise KilnError(f"blob {digest} in {self.root} is not a JSON object")
        return data

    # -- index and refs ----------------------------------------------------

    def index_entries(self) -> list[Descriptor]:
        """``index.json`` manifests in index order (oldest first)."""
        try:
            data = json.loads(self._index_path.read_bytes())
        except (OSError, ValueError) as e:
            raise KilnError(f"cannot read {self._index_path}: {e}") from e
        return [Descriptor.from_json(m) for m in data.get("manifests", [])]

    def tag(self, ref_name: str, manifest: Descriptor) -> None:
        split_ref_name(ref_name)
        check_digest(manifest.digest)
        if not self.has(manifest.digest):
            raise KilnError(
                f"cannot tag {ref_name}: manifest {manifest.digest} is not in {self.root}"
            )
        with self._locked():
            entries = self.index_entries()
            for i, entry in enumerate(entries):
                if _ref_name(entry) == ref_name:
                    if entry.digest == manifest.digest:
                        if i != len(entries) - 1:
                            # a re-bake back to this digest makes it NAME's newest again
                            entries.append(entries.pop(i))
                            self._write_index(entries)
                        return
                    raise KilnError(
                        f"tag {ref_name} already points at {entry.digest}; tags are immutable"
                    )
            stored = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            entries.append(
                manifest.with_annotations(
                    {ANNOTATION_REF_NAME: ref_name, ANNOTATION_STORED: stored}
                )
            )
            self._write_index(entries)

    def resolve(self, ref: str) -> Descriptor:
        """The manifest descriptor a ref names.

        ``NAME`` (newest tag of NAME), ``NAME:TAG``, ``NAME@sha256:…``,
        ``sha256:…`` or a unique hex prefix of at least 6 digits.
        """
        entries = self.index_entries()
        ref = ref.strip()
        if "@" in ref:
            name, _, digest = ref.partition("@")
            for entry in entries:
                if entry.digest == digest and _name_of(entry) == name:
                    return entry
            raise self._missing(ref)
        if ":" in ref and not ref.startswith("sha256:"):
            for entry in entries:
                if _ref_name(entry) == ref:
                    return entry
            raise self._missing(ref)
        named = [e for e in entries if _name_of(e) == ref]
        if named:
            return named[-1]
        prefix = ref.removeprefix("sha256:")
        if _HEX_PREFIX_RE.match(prefix):
            return self._resolve_prefix(ref, prefix, entries)
        if ref.startswith("sha256:"):
            raise KilnError(
                f"bad digest {ref!r}: give sha256: and at least {_MIN_PREFIX} hex digits"
            )
        raise self._missing(ref)

    def manifest(self, ref_or_digest: str) -> dict[str, Any]:
        if is_digest(ref_or_digest) and self.has(ref_or_digest):
            return self.read_json(ref_or_digest)
        return self.read_json(self.resolve(ref_or_digest).digest)

    def config(self, ref: str) -> dict[str, Any]:
        manifest = self.manifest(ref)
        try:
            digest = str(manifest["config"]["digest"])
        except (KeyError, TypeError):
            raise KilnError(f"manifest of {ref} in {self.root} has no config") from None
        return self.read_json(digest)

    def images(self) -> list[ImageEntry]:
        out: list[ImageEntry] = []
        for entry in self.index_entries():
            created: str | None = None
            title = (entry.annotations or {}).get(ANNOTATION_TITLE)
            size = entry.size
            with contextlib.suppress(KilnError):
                manifest = self.read_json(entry.digest)
                title = title or (manifest.get("annotations") or {}).get(ANNOTATION_TITLE)
                config = Descriptor.from_json(manifest["config"])
                size += config.size + sum(
                    Descriptor.from_json(layer).size for layer in manifest.get("layers", [])
                )
                created_value = self.read_json(config.digest).get("created")
                created = str(created_value) if created_value is not None else None
            stored = (entry.annotations or {}).get(ANNOTATION_STORED) or self._written(entry.digest)
            out.append(ImageEntry(_ref_name(entry), entry.digest, size, created, title, stored))
        return out

    def _written(self, digest: str) -> str | None:
        """When a manifest blob was written: the bake time of a tag recorded before
        ``ANNOTATION_STORED`` was."""
        try:
            mtime = self.blob_path(digest).stat().st_mtime
        except (OSError, KilnError):
            return None
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(mtime))

    def remove(self, ref: str) -> list[str]:
        """Drop index entries: NAME:TAG that tag, a digest every tag on it; blobs wait for gc."""
        with self._locked():
            target = self.resolve(ref)
            entries = self.index_entries()
            if ":" in ref and "@" not in ref and not ref.startswith("sha256:"):
                doomed = [e for e in entries if _ref_name(e) == ref]
            elif _HEX_PREFIX_RE.match(ref.removeprefix("sha256:")) and not any(
                _name_of(e) == ref for e in entries
            ):
                doomed = [e for e in entries if e.digest == target.digest]
            else:
                name = ref.partition("@")[0]
                doomed = [e for e in entries if e.digest == target.digest and _name_of(e) == name]
            doomed_ids = {id(e) for e in doomed}
            self._write_index([e for e in entries if id(e) not in doomed_ids])
            return [_ref_name(e) for e in doomed]

    # -- referrers ---------------------------------------------------------

    def put_referrer(
        self,
        subject: str,
        artifact_type: str,
        payload: bytes,
        payload_media_type: str,
        annotations: dict[str, str] | None = None,
    ) -> Descriptor:
        """Attach ``payload`` to the manifest ``subject`` (a ref or digest) as an OCI 1.1
        artifact; returns the artifact manifest's descriptor, as :meth:`referrers` lists it.

        The same payload and annotations give the same manifest, recorded once. Blobs are
        written under the index lock, so a concurrent ``gc`` cannot sweep them before the
        referrer index names them.
        """
        _check_media_type(artifact_type, "artifact type")
        _check_media_type(payload_media_type, "payload media type")
        with self._locked():
            target = self._subject(subject)
            config = self.put_bytes(_EMPTY_JSON, MEDIA_TYPE_EMPTY)
            layer = self.put_bytes(payload, payload_media_type)
            manifest: dict[str, Any] = {
                "schemaVersion": 2,
                "mediaType": MEDIA_TYPE_MANIFEST,
                "artifactType": artifact_type,
                "config": config.to_json(),
                "layers": [layer.to_json()],
                "subject": Descriptor(target.media_type, target.digest, target.size).to_json(),
            }
            if annotations:
                manifest["annotations"] = dict(annotations)
            stored = self.put_bytes(canonical_json(manifest), MEDIA_TYPE_MANIFEST)
            entry = Descriptor(
                MEDIA_TYPE_MANIFEST, stored.digest, stored.size, annotations or None, artifact_type
            )
            listed = self._read_referrers(target.digest)
            if all(d.digest != entry.digest for d in listed):
                self._write_referrers(target.digest, [*listed, entry])
            return entry

    def add_referrer_manifest(self, manifest_bytes: bytes) -> Descriptor:
        """Record an artifact manifest made elsewhere (pulled from a registry) by its exact
        bytes, so a signature over them stays valid; its blobs must already be stored.

        Refused unless it is an OCI image manifest whose ``subject`` is a manifest in this
        store (same digest and size) and whose config and layers are all here.
        """
        try:
            manifest = json.loads(manifest_bytes)
            subject = Descriptor.from_json(manifest["subject"])
            blobs = [Descriptor.from_json(manifest["config"])]
            blobs += [Descriptor.from_json(layer) for layer in manifest["layers"]]
            annotations = manifest.get("annotations") or None
            artifact_type = str(manifest.get("artifactType") or blobs[0].media_type)
        except (ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise KilnError(f"not an artifact manifest: {e}") from None
        digest = "sha256:" + hashlib.sha256(manifest_bytes).hexdigest()
        if manifest.get("mediaType", MEDIA_TYPE_MANIFEST) != MEDIA_TYPE_MANIFEST:
            raise KilnError(f"artifact {digest} is not an OCI image manifest")
        if annotations is not None and not (
            isinstance(annotations, dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in annotations.items())
        ):
            raise KilnError(f"artifact {digest}: annotations are not a string map")
        _check_media_type(artifact_type, f"artifact type of {digest}")
        check_digest(subject.digest)
        with self._locked():
            if not self.has(subject.digest):
                raise KilnError(f"artifact {digest}: its subject {subject.digest} is not here")
            if self.blob_path(subject.digest).stat().st_size != subject.size:
                raise KilnError(f"artifact {digest}: its subject's size is not {subject.size}")
            for blob in blobs:
                if not self.has(blob.digest):
                    raise KilnError(f"artifact {digest}: blob {blob.digest} is not here")
            stored = self.put_bytes(manifest_bytes, MEDIA_TYPE_MANIFEST)
            entry = Descriptor(
                MEDIA_TYPE_MANIFEST, stored.digest, stored.size, annotations, artifact_type
            )
            listed = self._read_referrers(subject.digest)
            if all(d.digest != entry.digest for d in listed):
                self._write_referrers(subject.digest, [*listed, entry])
            return entry

    def referrers(self, subject: str, artifact_type: str | None = None) -> list[Descriptor]:
        """The artifacts attached to ``subject`` (oldest first), optionally of one type."""
        target = self._subject(subject)
        listed = self._read_referrers(target.digest)
        if artifact_type is not None:
            listed = [d for d in listed if d.artifact_type == artifact_type]
        return listed

    def read_referrer(self, referrer: str) -> tuple[dict[str, Any], bytes]:
        """An artifact's manifest and its payload, the payload re-hashed against its digest."""
        manifest = self.read_json(check_digest(referrer))
        try:
            layers = manifest["layers"]
            payload = Descriptor.from_json(layers[0])
        except (KeyError, IndexError, TypeError) as e:
            raise KilnError(f"referrer {referrer} in {self.root} has no payload layer") from e
        data = self.read_bytes(payload.digest)
        if hashlib.sha256(data).hexdigest() != payload.digest.removeprefix("sha256:"):
            raise KilnError(
                f"referrer {referrer} in {self.root}: payload blob {payload.digest} is corrupt"
            )
        return manifest, data

    def remove_referrer(self, subject: str, referrer: str) -> bool:
        """Detach one artifact from ``subject``; its blobs go at the next gc."""
        with self._locked():
            target = self._subject(subject)
            listed = self._read_referrers(target.digest)
            kept = [d for d in listed if d.digest != referrer]
            if len(kept) == len(listed):
                return False
            self._write_referrers(target.digest, kept)
            return True

    def referrer_subjects(self) -> list[str]:
        """Every manifest digest that has a referrer index."""
        if not self.referrer_dir.is_dir():
            return []
        return sorted(
            "sha256:" + p.name.removesuffix(".json")
            for p in self.referrer_dir.iterdir()
            if p.name.endswith(".json") and is_digest("sha256:" + p.name.removesuffix(".json"))
        )

    def referrer_closure(self, subjects: Iterable[str]) -> list[Descriptor]:
        """The referrers of ``subjects``, and theirs in turn (a signature on an SBOM)."""
        out: list[Descriptor] = []
        seen: set[str] = set()
        stack = list(subjects)
        while stack:
            subject = stack.pop(0)
            for entry in self._read_referrers(subject):
                if entry.digest not in seen:
                    seen.add(entry.digest)
                    out.append(entry)
                    stack.append(entry.digest)
        return out

    def _subject(self, subject: str) -> Descriptor:
        if is_digest(subject) and self.has(subject):
            media_type = str(self.read_json(subject).get("mediaType", MEDIA_TYPE_MANIFEST))
            return Descriptor(media_type, subject, self.blob_path(subject).stat().st_size)
        return self.resolve(subject)

    def _referrer_index(self, subject: str) -> Path:
        return self.referrer_dir / (check_digest(subject).removeprefix("sha256:") + ".json")

    def _read_referrers(self, subject: str) -> list[Descriptor]:
        path = self._referrer_index(subject)
        try:
            with open(path, "rb") as f:
                raw = f.read(_MAX_REFERRER_INDEX + 1)
        except FileNotFoundError:
            return []
        except OSError as e:
            raise KilnError(f"cannot read {path}: {e}") from e
        if len(raw) > _MAX_REFERRER_INDEX:
            raise KilnError(f"{path} is larger than {_MAX_REFERRER_INDEX} bytes")
        try:
            data = json.loads(raw)
            return [Descriptor.from_json(m) for m in data["manifests"]]
        except (ValueError, KeyError, TypeError) as e:
            raise KilnError(f"{path} is not a referrer index: {e}") from e

    def _write_referrers(self, subject: str, entries: list[Descriptor]) -> None:
        path = self._referrer_index(subject)
        if not entries:
            path.unlink(missing_ok=True)
            return
        private_dirs(self.referrer_dir)
        index = {
            "schemaVersion": 2,
            "mediaType": MEDIA_TYPE_INDEX,
            "manifests": [e.to_json() for e in entries],
        }
        self._write_atomic(path, json.dumps(index, indent=2).encode() + b"\n")

    # -- maintenance -------------------------------------------------------

    def reachable(self, roots: Iterable[str]) -> set[str]:
        """Every blob digest reachable from ``roots`` (manifests, indexes, configs, layers)."""
        seen: set[str] = set()
        stack = [d for d in roots if is_digest(d)]
        while stack:
            digest = stack.pop()
            if digest in seen:
                continue
            seen.add(digest)
            for child in self._children(digest):
                if child not in seen:
                    stack.append(child)
        return seen

    def gc(self, keep: Iterable[str] = ()) -> GcResult:
        """Delete blobs unreachable from ``index.json`` and from ``keep`` (e.g. layer-cache roots).

        Runs under the index lock, so a concurrent ``tag`` cannot race the mark
        phase; a bake should tag (or keep) what it wrote before calling gc. A referrer
        lives while its subject does; the referrer index of a swept subject goes with it.
        """
        removed = 0
        freed = 0
        with self._locked():
            roots = [e.digest for e in self.index_entries()]
            live = self.reachable([*roots, *keep])
            attached = self.referrer_closure(s for s in self.referrer_subjects() if s in live)
            live |= self.reachable(entry.digest for entry in attached)
            for subject in self.referrer_subjects():
                if subject not in live:
                    self._referrer_index(subject).unlink(missing_ok=True)
            for path in self.blobs.iterdir():
                if "sha256:" + path.name in live:
                    continue
                with contextlib.suppress(FileNotFoundError):
                    size = path.lstat().st_size
                    path.unlink()
                    removed += 1
                    freed += size
            cutoff = time.time() - _STALE_TEMP_SECONDS
            for path in self.tmp_dir.iterdir():
                with contextlib.suppress(FileNotFoundError):
                    if path.lstat().st_mtime < cutoff:
                        size = path.lstat().st_size
                        if path.is_dir() and not path.is_symlink():
                            shutil.rmtree(path, ignore_errors=True)
                        else:
                            path.unlink()
                        freed += size
        return GcResult(removed, freed)

    def verify(self, ref: str) -> list[str]:
        """Re-hash every blob of an image; one message per missing or corrupt blob."""
        entry = self.resolve(ref)
        label = _ref_name(entry) or ref
        problems: list[str] = []
        if not self._check_blob(entry.digest, f"manifest of {label}", problems):
            return problems
        try:
            manifest = self.read_json(entry.digest)
            config = Descriptor.from_json(manifest["config"])
            layers = [Descriptor.from_json(layer) for layer in manifest.get("layers", [])]
        except (KilnError, KeyError, TypeError) as e:
            return [f"manifest {entry.digest} of {label} is malformed: {e}"]
        self._check_blob(config.digest, f"config of {label}", problems, config.size)
        for number, layer in enumerate(layers, start=1):
            self._check_blob(layer.digest, f"layer {number} of {label}", problems, layer.size)
        return problems

    # -- internals ---------------------------------------------------------

    def _check_blob(
        self, digest: str, role: str, problems: list[str], size: int | None = None
    ) -> bool:
        path = self.blob_path(digest)
        try:
            actual, actual_size = _hash_file(path)
        except FileNotFoundError:
            problems.append(f"blob {digest} ({role}): missing")
            return False
        except OSError as e:
            problems.append(f"blob {digest} ({role}): unreadable: {e}")
            return False
        if actual != digest:
            problems.append(f"blob {digest} ({role}): content hashes to {actual}")
            return False
        if size is not None and size != actual_size:
            problems.append(f"blob {digest} ({role}): size {actual_size}, descriptor says {size}")
            return False
        return True

    def _children(self, digest: str) -> list[str]:
        path = self.blob_path(digest)
        try:
            if path.stat().st_size > 4 << 20:
                return []
            data = json.loads(path.read_bytes())
        except (OSError, ValueError, UnicodeDecodeError):
            return []
        if not isinstance(data, dict):
            return []
        children: list[str] = []
        config = data.get("config")
        if isinstance(config, dict) and isinstance(config.get("digest"), str):
            children.append(config["digest"])
        for key in ("layers", "manifests"):
            items = data.get(key)
            if isinstance(items, list):
                children.extend(
                    str(i["digest"]) for i in items if isinstance(i, dict) and "digest" in i
                )
        return [c for c in children if is_digest(c)]

    def _resolve_prefix(self, ref: str, prefix: str, entries: list[Descriptor]) -> Descriptor:
        matches: dict[str, Descriptor] = {}
        for entry in entries:
            if entry.digest.removeprefix("sha256:").startswith(prefix):
                matches.setdefault(entry.digest, entry)
        if len(matches) > 1:
            listed = ", ".join(d[:19] + "…" for d in sorted(matches))
            raise KilnError(
                f"digest prefix {ref} is ambiguous in {self.root}: matches {listed}; "
                "give more digits"
            )
        if matches:
            return next(iter(matches.values()))
        digest = "sha256:" + prefix
        if is_digest(digest) and self.has(digest):
            try:
                media_type = str(self.read_json(digest).get("mediaType", MEDIA_TYPE_MANIFEST))
            except KilnError:
                media_type = MEDIA_TYPE_MANIFEST
            if media_type in (MEDIA_TYPE_MANIFEST, MEDIA_TYPE_INDEX):
                return Descriptor(media_type, digest, self.blob_path(digest).stat().st_size)
        raise self._missing(ref)

    def _missing(self, ref: str) -> KilnError:
        return KilnError(f"no image {ref} in {self.root} (kiln images lists what is there)")

    def _publish(self, tmp: Path, digest: str) -> None:
        final = self.blob_path(digest)
        if final.exists():
            tmp.unlink(missing_ok=True)
            return
        os.chmod(tmp, 0o600)
        os.rename(tmp, final)
        _fsync_dir(self.blobs)

    def _write_atomic(self, final: Path, data: bytes) -> None:
        out, tmp = self.temp_file()
        try:
            with out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.chmod(tmp, 0o600)
            os.rename(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(final.parent)

    def _write_index(self, entries: list[Descriptor]) -> None:
        index = {
            "schemaVersion": 2,
            "mediaType": MEDIA_TYPE_INDEX,
            "manifests": [e.to_json() for e in entries],
        }
        self._write_atomic(self._index_path, json.dumps(index, indent=2).encode() + b"\n")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


def _check_media_type(value: str, what: str) -> None:
    if not _ARTIFACT_TYPE_RE.match(value):
        raise KilnError(f"bad {what} {value!r}: expected TYPE/SUBTYPE (RFC 6838)")


def _ref_name(entry: Descriptor) -> str:
    return (entry.annotations or {}).get(ANNOTATION_REF_NAME, "")


def _name_of(entry: Descriptor) -> str:
    ref_name = _ref_name(entry)
    return ref_name.rpartition(":")[0] if ":" in ref_name else ref_name


def _hash_file(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return "sha256:" + h.hexdigest(), size
