"""An image's evidence (OCI 1.1 referrers: SBOM, provenance, signatures) through a registry.

Push sends every referrer of the image, and the referrers of those, after the image's
manifest: each artifact manifest is PUT by digest, exact bytes, so a signature over it
stays valid. A registry that indexes ``subject`` itself answers the PUT with an
``OCI-Subject`` header; for one that does not (Debian's ``docker-registry`` 2.8) the
client keeps the referrers tag schema: an image index tagged ``sha256-<hex>``, merged
with what the tag already lists (read, add, write), never replaced.

Pull asks the referrers API, and the fallback tag when the API is absent (any answer but
an image index, as go-containerregistry does). The registry is untrusted: every listing,
manifest and blob is bounded and hashed; a referrer whose ``subject`` is not the image,
or one of whose blobs does not match, is refused with one warning and nothing of it is
stored. The image itself is already stored by then: evidence that does not arrive is
what the policy gate refuses to run without.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.errors import KilnError
from kiln.image.digest import MEDIA_TYPE_INDEX, MEDIA_TYPE_MANIFEST, Descriptor

if TYPE_CHECKING:
    from kiln.image.registry import PullResult, PushResult, RegistryClient, RegistryRef
    from kiln.image.store import ImageStore

MAX_REFERRERS = 1000
"""Per pull, referrers of referrers included; a longer listing is a flood, not evidence."""
MAX_REFERRER_BLOB_BYTES = 256 << 20
"""An SBOM of a large image is a few MiB; evidence blobs are never image-sized."""
MAX_REFERRER_BLOBS = 16
_WARNING_CHARS = 300

Warn = Callable[[str], None]


def fallback_tag(subject: str) -> str:
    """The referrers tag schema: ``sha256:<hex>`` → ``sha256-<hex>``."""
    return subject.replace(":", "-", 1)


# -- push --------------------------------------------------------------------


def push_referrers(
    client: RegistryClient,
    store: ImageStore,
    repository: str,
    subject: str,
    scope: str,
    result: PushResult,
) -> None:
    """Push the referrer closure of ``subject`` (already on the registry), subjects first."""
    from kiln.image.registry import _push_blob  # one blob upload, HEAD-skip included

    closure = store.referrer_closure([subject])
    fallback: dict[str, list[Descriptor]] = {}
    for entry in closure:
        manifest_bytes = store.read_bytes(entry.digest)
        try:
            manifest = json.loads(manifest_bytes)
            target = Descriptor.from_json(manifest["subject"])
            blobs = [Descriptor.from_json(manifest["config"])]
            blobs += [Descriptor.from_json(layer) for layer in manifest["layers"]]
        except (ValueError, KeyError, TypeError, KilnError) as e:
            raise KilnError(f"referrer {entry.digest} in {store.root} is malformed: {e}") from None
        for blob in blobs:
            _push_blob(client, store, repository, blob, scope, None, result)
        what = f"referrer {entry.digest[:19]}… of {repository}"
        path = f"/v2/{repository}/manifests/{entry.digest}"
        head = client.send("HEAD", path, scope=scope, headers={"Accept": MEDIA_TYPE_MANIFEST})
        if head.status_code == 200:
            result.referrers_present.append(entry.digest)
        else:
            client.check(head, what, 404)
            response = client.send(
                "PUT",
                path,
                scope=scope,
                headers={"Content-Type": str(manifest.get("mediaType") or MEDIA_TYPE_MANIFEST)},
                content=manifest_bytes,
            )
            client.check(response, f"upload of {what}", 201, 200)
            result.referrers.append(entry.digest)
            if response.headers.get("OCI-Subject") == target.digest:
                continue  # the registry lists it under its subject itself
        fallback.setdefault(target.digest, []).append(entry)
    for target_digest, entries in fallback.items():
        _merge_fallback(client, repository, target_digest, entries, scope, result)


def _merge_fallback(
    client: RegistryClient,
    repository: str,
    subject: str,
    entries: list[Descriptor],
    scope: str,
    result: PushResult,
) -> None:
    """Read the ``sha256-<hex>`` index, add what it lacks, write it back if anything was."""
    from kiln.image.registry import parse_ref

    tag = fallback_tag(subject)
    where = parse_ref(f"{client.host}/{repository}:{tag}")
    listed = _read_index(client, where, tag, scope, missing_ok=True)
    if listed is None:
        listed = []
    have = {str(item.get("digest")) for item in listed if isinstance(item, dict)}
    added = [e.to_json() for e in entries if e.digest not in have]
    if not added:
        return
    index = {"schemaVersion": 2, "mediaType": MEDIA_TYPE_INDEX, "manifests": [*listed, *added]}
    response = client.send(
        "PUT",
        f"/v2/{repository}/manifests/{tag}",
        scope=scope,
        headers={"Content-Type": MEDIA_TYPE_INDEX},
        content=json.dumps(index, indent=2).encode() + b"\n",
    )
    client.check(response, f"referrers tag {where}", 201, 200)
    result.fallback_tags.append(tag)


def _read_index(
    client: RegistryClient, where: RegistryRef, reference: str, scope: str, *, missing_ok: bool
) -> list[Any] | None:
    """The ``manifests`` of the image index at ``reference``; None when there is none (404,
    or something else than an index there, which the push refuses to overwrite)."""
    from kiln.image.registry import _ACCEPT, _fetch_manifest

    probe = client.send(
        "HEAD",
        f"/v2/{where.repository}/manifests/{reference}",
        scope=scope,
        headers={"Accept": _ACCEPT},
    )
    if probe.status_code == 404 and missing_ok:
        return None
    data, _, _ = _fetch_manifest(client, where, reference, scope)
    listed = _index_manifests(data)
    if listed is None:
        raise KilnError(f"{where} is not an image index; refused to overwrite it")
    return listed


def _index_manifests(data: bytes) -> list[Any] | None:
    try:
        index = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(index, dict) or index.get("mediaType", MEDIA_TYPE_INDEX) != MEDIA_TYPE_INDEX:
        return None
    listed = index.get("manifests")
    return listed if isinstance(listed, list) else None


# -- pull --------------------------------------------------------------------


def pull_referrers(
    client: RegistryClient,
    store: ImageStore,
    source: RegistryRef,
    subject: str,
    scope: str,
    result: PullResult,
    warn: Warn,
) -> None:
    """Fetch the referrers of ``subject`` (stored) and theirs, each verified on its own."""
    queue = [subject]
    seen: set[str] = set()
    while queue:
        current = queue.pop(0)
        try:
            listed = _discover(client, source, current, scope)
        except KilnError as e:
            _refuse(result, warn, f"referrers of {current[:19]}… not fetched: {e}")
            continue
        known = {d.digest for d in store.referrers(current)}
        for entry in listed:
            if entry.digest in seen:
                continue
            seen.add(entry.digest)
            if len(seen) > MAX_REFERRERS:
                _refuse(result, warn, f"more than {MAX_REFERRERS} referrers; the rest not fetched")
                return
            if entry.digest in known:
                result.referrers_present.append(entry.digest)
                queue.append(entry.digest)
                continue
            try:
                _fetch_referrer(client, store, source, current, entry, scope)
            except KilnError as e:
                _refuse(result, warn, f"referrer {entry.digest[:19]}… refused: {e}")
                continue
            result.referrers.append(entry.digest)
            queue.append(entry.digest)


def _refuse(result: PullResult, warn: Warn, message: str) -> None:
    line = " ".join(message.split())
    if len(line) > _WARNING_CHARS:
        line = line[: _WARNING_CHARS - 1] + "…"
    result.referrers_refused.append(line)
    warn(f"warning: {line}")


def _discover(
    client: RegistryClient, source: RegistryRef, subject: str, scope: str
) -> list[Descriptor]:
    """The referrers API's listing, else the fallback tag's; nothing when neither has one."""
    import httpx

    from kiln.image.registry import MAX_MANIFEST_BYTES, _bounded

    path = f"/v2/{source.repository}/referrers/{subject}"
    data: bytes | None = None
    what = f"referrers of {subject[:19]}… at {source.host}"
    try:
        response = client.send(
            "GET", path, scope=scope, headers={"Accept": MEDIA_TYPE_INDEX}, stream=True
        )
    except KilnError:
        response = None  # a registry that drops the unknown route: no API
    if response is not None:
        try:
            declared = response.headers.get("Content-Length")
            if response.status_code == 200:
                if declared is not None and int(declared) > MAX_MANIFEST_BYTES:
                    raise KilnError(f"{what} is {int(declared)} bytes (limit {MAX_MANIFEST_BYTES})")
                data = b"".join(_bounded(response, MAX_MANIFEST_BYTES, what))
        except httpx.TransportError:
            data = None
        finally:
            response.close()
    listed = _index_manifests(data) if data is not None else None
    if listed is None:
        listed = _fallback_listing(client, source, subject, scope)
    if len(listed) > MAX_REFERRERS:
        raise KilnError(f"{what} lists {len(listed)}; refused (limit {MAX_REFERRERS})")
    out: list[Descriptor] = []
    for item in listed:
        if not isinstance(item, dict):
            raise KilnError(f"{what}: an entry is not an object")
        entry = Descriptor.from_json(item)
        if entry.media_type != MEDIA_TYPE_MANIFEST:
            continue  # an index of referrers: not an artifact Kiln stores
        out.append(entry)
    return out


def _fallback_listing(
    client: RegistryClient, source: RegistryRef, subject: str, scope: str
) -> list[Any]:
    from kiln.image.registry import _ACCEPT, RegistryRef, _fetch_manifest

    tag = fallback_tag(subject)
    where = RegistryRef(source.host, source.repository, tag)
    probe = client.send(
        "HEAD", f"/v2/{source.repository}/manifests/{tag}", scope=scope, headers={"Accept": _ACCEPT}
    )
    if probe.status_code != 200:
        return []
    data, _, _ = _fetch_manifest(client, where, tag, scope)
    return _index_manifests(data) or []


def _fetch_referrer(
    client: RegistryClient,
    store: ImageStore,
    source: RegistryRef,
    subject: str,
    entry: Descriptor,
    scope: str,
) -> None:
    """One artifact: manifest by digest, its subject checked, every blob verified in a temp
    file; only then blobs, manifest and the referrer index entry are stored."""
    from kiln.image.registry import MAX_MANIFEST_BYTES, _fetch_blob, _fetch_manifest

    if not 0 <= entry.size <= MAX_MANIFEST_BYTES:
        raise KilnError(f"listed size {entry.size} refused")
    manifest_bytes, _, digest = _fetch_manifest(client, source, entry.digest, scope)
    try:
        manifest = json.loads(manifest_bytes)
        named = manifest["subject"]["digest"]
        layers = manifest["layers"]
        if not isinstance(layers, list):
            raise TypeError("layers is not a list")
        if len(layers) > MAX_REFERRER_BLOBS:
            raise KilnError(f"{len(layers)} layers (limit {MAX_REFERRER_BLOBS})")
        blobs = [Descriptor.from_json(manifest["config"])]
        blobs += [Descriptor.from_json(layer) for layer in layers]
    except (ValueError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise KilnError(f"its manifest is malformed: {e}") from None
    if named != subject:
        raise KilnError(f"its subject is {str(named)[:71]}, not {subject}; not stored")
    temps: list[Path] = []
    try:
        verified: list[tuple[Path, Descriptor]] = []
        for blob in blobs:
            if store.has(blob.digest) or any(d.digest == blob.digest for _, d in verified):
                continue
            if blob.size > MAX_REFERRER_BLOB_BYTES:
                raise KilnError(f"blob {blob.digest[:19]}… is {blob.size} bytes; refused")
            out, tmp = store.temp_file(suffix=".pull")
            temps.append(tmp)
            with out:
                _fetch_blob(client, source, blob, out, scope)
            verified.append((tmp, blob))
        for tmp, blob in verified:
            stored = store.put_file(tmp, blob.media_type, move=True)
            if stored.digest != blob.digest:
                raise KilnError(f"blob {blob.digest} changed on disk while it was stored")
        recorded = store.add_referrer_manifest(manifest_bytes)
        if recorded.digest != digest:
            raise KilnError(f"stored as {recorded.digest}, not {digest}")
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)


def count_line(moved: int, refused: int = 0) -> str:
    """``, 2 referrers`` for the push/pull summary line."""
    text = f", {moved} referrer{'s' if moved != 1 else ''}"
    if refused:
        text += f" ({refused} refused)"
    return text
