"""Evidence read back from a registry: what the policy gate checks when the runtime's nodes
pull images from one (``[runtime] kind = "swarm"``).

There the image that runs is the registry's copy, so the gate must not stop at what the
home's store holds: the image is pushed with its referrers, then its manifest, config
and every referrer are fetched back by digest (the OCI referrers API, or the
``sha256-<hex>`` tag where the registry has none, as Debian's ``docker-registry``) into
a scratch store, each verified as ``kiln pull`` verifies it, and the gate reads its
evidence from there with the same code as for the home's store. Evidence the home holds
that did not come back (never pushed, deleted there, refused as tampered) is listed as
missing, with where it was looked for; the shipped ``kiln.evidence`` rule denies on it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from kiln.errors import KilnError

if TYPE_CHECKING:
    from collections.abc import Iterator

    from kiln.image.registry import RegistryClient, RegistryOptions
    from kiln.image.store import ImageStore


@runtime_checkable
class ImagePublisher(Protocol):
    """A runtime whose nodes pull images from a registry: it pushes one image with its
    referrers and says where it put it."""

    registry: str
    """``HOST[:PORT]/PATH``: where the images go."""
    registry_options: RegistryOptions

    def publish_image(self, service: str, digest: str) -> str:
        """Push ``digest`` (and every referrer of it) for ``service``; returns the
        registry reference ``HOST[:PORT]/PATH/REPO@sha256:…`` its instances run."""
        ...


def evidence_kinds() -> dict[str, str]:
    """Artifact type → the name messages give it."""
    from kiln.supply.provenance import PROVENANCE_ARTIFACT_TYPE
    from kiln.supply.sbom import SBOM_ARTIFACT_TYPE
    from kiln.supply.secrets_scan import SECRET_SCAN_ARTIFACT_TYPE
    from kiln.supply.signing import SIGNATURE_ARTIFACT_TYPE

    return {
        SBOM_ARTIFACT_TYPE: "SBOM",
        PROVENANCE_ARTIFACT_TYPE: "provenance",
        SIGNATURE_ARTIFACT_TYPE: "signature",
        SECRET_SCAN_ARTIFACT_TYPE: "secret scan",
    }


@dataclass(frozen=True)
class RegistryEvidence:
    """What came back from the registry for one image."""

    reference: str
    """``HOST/PATH/REPO@sha256:…``: where the runtime's nodes pull it from."""
    looked: str
    """Where its referrers were listed: the referrers API, or the fallback tag."""
    store: ImageStore | None
    """A scratch store holding the registry's copy (None when it could not be read)."""
    missing: tuple[str, ...] = ()
    """Kinds of evidence the home's store holds for this digest that the registry lacks."""
    refused: tuple[str, ...] = ()
    """One line per referrer the registry served that failed verification."""
    error: str = ""
    """Why nothing could be read (the image itself is not there, the registry is down)."""

    def as_input(self) -> dict[str, Any]:
        """``input.evidence`` for the gate (docs/policy.md)."""
        return {
            "source": "registry",
            "where": self.reference,
            "looked": self.looked,
            "missing": list(self.missing),
            "refused": list(self.refused),
            "error": self.error,
        }


def store_input(store: ImageStore) -> dict[str, Any]:
    """``input.evidence`` when the gate reads the home's own store."""
    return {
        "source": "store",
        "where": str(store.root),
        "looked": "",
        "missing": [],
        "refused": [],
        "error": "",
    }


SCRATCH_PREFIX = ".evidence-"
STALE_SCRATCH_SECONDS = 3600.0
"""A scratch directory this old was left by a gate that died (no gate takes an hour)."""


@contextlib.contextmanager
def scratch_root(home_store: ImageStore) -> Iterator[Path]:
    """A private directory beside the home's store (same filesystem, so layer blobs are
    linked, not copied), removed when the gate is done with it; ones an agent that died
    mid-gate left behind are removed first."""
    parent = home_store.root.parent
    for leftover in parent.glob(f"{SCRATCH_PREFIX}*"):
        with contextlib.suppress(OSError):
            if time.time() - leftover.lstat().st_mtime > STALE_SCRATCH_SECONDS:
                shutil.rmtree(leftover, ignore_errors=True)
    path = Path(tempfile.mkdtemp(prefix=SCRATCH_PREFIX, dir=parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def read_registry_evidence(
    home_store: ImageStore,
    reference: str,
    options: RegistryOptions,
    scratch: Path,
) -> RegistryEvidence:
    """Fetch the manifest, config and referrers of ``reference`` (``…@sha256:…``) into a
    scratch store under ``scratch``, verified, and compare its evidence with what
    ``home_store`` holds for the same digest. Never raises: an unreadable image (or a
    reference not by digest) is ``error``, a lost or refused referrer is ``missing``."""
    from kiln.image.referrer_transfer import fallback_tag
    from kiln.image.registry import RegistryClient, parse_ref, pull
    from kiln.image.store import ImageStore

    try:
        source = parse_ref(reference)
    except KilnError as e:
        return RegistryEvidence(reference, "nowhere", None, error=str(e))
    digest = source.digest
    if not digest:
        error = "not a reference by digest (…@sha256:…); the gate reads evidence by digest"
        return RegistryEvidence(reference, "nowhere", None, error=error)
    looked = f"the referrers tag {source.host}/{source.repository}:{fallback_tag(digest)}"
    refused: tuple[str, ...] = ()
    try:
        store = ImageStore(scratch / "images")
        _link_layers(home_store, store, digest)
        with RegistryClient(source.host, options) as client:
            result = pull(store, reference, options, client=client, referrers=True)
            refused = tuple(result.referrers_refused)
            if _has_referrers_api(client, source.repository, digest):
                looked = (
                    f"the referrers API of {source.host} "
                    f"(/v2/{source.repository}/referrers/{digest})"
                )
    except KilnError as e:
        return RegistryEvidence(reference, looked, None, error=str(e))
    kinds = evidence_kinds()
    missing: list[str] = []
    for artifact_type, name in kinds.items():
        want = {d.digest for d in home_store.referrers(digest, artifact_type)}
        have = {d.digest for d in store.referrers(digest, artifact_type)}
        if want - have:
            missing.append(name)
        if artifact_type in unsigned_kinds():
            refused += _drop_foreign(store, digest, name, have - want)
    return RegistryEvidence(reference, looked, store, tuple(missing), refused)


def unsigned_kinds() -> frozenset[str]:
    """Evidence no signature covers (SBOM, secret scan): anyone who can push to the
    repository can attach a well-formed one for the right subject, so only the copies
    the home's store holds are judged; a signature and provenance are verified by key."""
    from kiln.supply.sbom import SBOM_ARTIFACT_TYPE
    from kiln.supply.secrets_scan import SECRET_SCAN_ARTIFACT_TYPE

    return frozenset({SBOM_ARTIFACT_TYPE, SECRET_SCAN_ARTIFACT_TYPE})


def _drop_foreign(store: ImageStore, digest: str, name: str, foreign: set[str]) -> tuple[str, ...]:
    """Detach from the scratch store the unsigned referrers the home does not hold (the
    gate would read the newest, which the pusher chose); one line each for ``refused``."""
    lines = []
    for referrer in sorted(foreign):
        store.remove_referrer(digest, referrer)
        lines.append(
            f"{name} {referrer[:19]}… is not one this home holds "
            f"(an unsigned {name} is only trusted from the home's store)"
        )
    return tuple(lines)


def _link_layers(home_store: ImageStore, store: ImageStore, digest: str) -> None:
    """The home's layer blobs of ``digest``, hard-linked into the scratch store so the pull
    skips them: a layer is named by its hash, which the gate re-hashes anyway; the
    manifest, the config and the evidence always come from the registry."""
    from kiln.image.digest import Descriptor

    if not home_store.has(digest):
        return
    try:
        manifest = home_store.read_json(digest)
        layers = [Descriptor.from_json(layer) for layer in manifest.get("layers") or []]
    except (KilnError, KeyError, TypeError, ValueError):
        return
    for layer in layers:
        if not home_store.has(layer.digest) or store.has(layer.digest):
            continue
        try:
            os.link(home_store.blob_path(layer.digest), store.blob_path(layer.digest))
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                raise KilnError(f"cannot link layer {layer.digest} for the gate: {e}") from e
            return  # another filesystem: the pull fetches what is not linked


def _has_referrers_api(client: RegistryClient, repository: str, digest: str) -> bool:
    """Whether the registry answers the OCI referrers API for ``digest`` with an index
    (what the pull then listed), rather than leaving it to the fallback tag."""
    from kiln.image.digest import MEDIA_TYPE_INDEX

    try:
        response = client.send(
            "GET",
            f"/v2/{repository}/referrers/{digest}",
            scope=f"repository:{repository}:pull",
            headers={"Accept": MEDIA_TYPE_INDEX},
            stream=True,
        )
    except KilnError:
        return False
    try:
        kind = response.headers.get("Content-Type", "").split(";", 1)[0].strip()
        return response.status_code == 200 and kind == MEDIA_TYPE_INDEX
    finally:
        response.close()
