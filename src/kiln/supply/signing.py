"""Keys, signatures and offline verification of images, as DSSE envelopes in the store.

``kiln sign`` attaches two things to an image: a signature over its manifest digest (a
small JSON payload in cosign's simple-signing spirit, so the signature names the very
image it signs) and a signed copy of the bake's provenance. ``kiln verify`` checks both
with public keys the user names, plus the image's blobs and the SBOM's presence; nothing
talks to a network, so verification works on an air-gapped host.

Key ids are the sha256 of the public key's SubjectPublicKeyInfo DER, the same for the
private key's half, so a signature says which key made it without trusting the envelope.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.errors import KilnError
from kiln.image.digest import Descriptor
from kiln.image.store import ImageStore
from kiln.supply.provenance import (
    DSSE_MEDIA_TYPE,
    IN_TOTO_PAYLOAD_TYPE,
    PROVENANCE_ARTIFACT_TYPE,
    SLSA_PROVENANCE_V1,
    STATEMENT_TYPE,
)

if TYPE_CHECKING:
    from securesystemslib.dsse import Envelope
    from securesystemslib.signer import CryptoSigner, SSlibKey  # type: ignore[attr-defined]

SIGNATURE_ARTIFACT_TYPE = "application/vnd.dev.kiln.signature.v1+json"
SIGNATURE_PAYLOAD_TYPE = SIGNATURE_ARTIFACT_TYPE
SIGNATURE_KIND = "kiln signature"
KEY_TYPES = ("ecdsa-p256", "ed25519")
_MAX_KEY_BYTES = 64 << 10
_MAX_ENVELOPE_BYTES = 4 << 20


@dataclass(frozen=True)
class Verification:
    """What :func:`verify_image` found; the policy gate reads it."""

    digest: str
    """The image manifest digest verified."""
    signed: bool
    """A valid signature by one of the given keys."""
    signers: tuple[str, ...]
    """Key ids (sha256 of the public key's DER, hex) that signed."""
    provenance: dict[str, Any] | None
    """The verified in-toto statement (or None)."""
    errors: tuple[str, ...]
    """One line each: what failed, naming the referrer/blob."""

    @property
    def ok(self) -> bool:
        return self.signed and self.provenance is not None and not self.errors


@dataclass(frozen=True)
class SignResult:
    digest: str
    key_id: str
    signature: Descriptor | None
    """The new image-signature referrer (None: this key had already signed)."""
    provenance: Descriptor | None
    """The new signed-provenance referrer (None: this key had already signed it)."""


# -- keys ---------------------------------------------------------------------


def key_id(public_pem: bytes) -> str:
    """sha256 (hex) of a public key's SubjectPublicKeyInfo DER."""
    from cryptography.hazmat.primitives import serialization

    try:
        key = serialization.load_pem_public_key(public_pem)
    except (ValueError, TypeError) as e:
        raise KilnError(f"not a PEM public key: {e}") from e
    return _der_id(key)


def _der_id(public_key: Any) -> str:
    from cryptography.hazmat.primitives import serialization

    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def generate_key(name: Path, key_type: str = "ecdsa-p256") -> tuple[Path, Path]:
    """Write ``NAME.key`` (PKCS8 PEM, 0600) and ``NAME.pub`` (SubjectPublicKeyInfo PEM);
    refuses to overwrite either, so a key in use is never lost to a typo."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    if key_type == "ecdsa-p256":
        private: Any = ec.generate_private_key(ec.SECP256R1())
    elif key_type == "ed25519":
        private = ed25519.Ed25519PrivateKey.generate()
    else:
        raise KilnError(f"--type: {key_type!r} is not one of {', '.join(KEY_TYPES)}")
    key_path = name.with_name(name.name + ".key")
    pub_path = name.with_name(name.name + ".pub")
    for path in (key_path, pub_path):
        if path.exists() or path.is_symlink():
            raise KilnError(f"{path} already exists; not overwriting a key")
    private_pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    _write_new(key_path, private_pem, 0o600)
    try:
        _write_new(pub_path, public_pem, 0o644)
    except KilnError:
        key_path.unlink(missing_ok=True)
        raise
    return key_path, pub_path


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` exclusively (never through a symlink) with ``mode`` from the start."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    except FileExistsError:
        raise KilnError(f"{path} already exists; not overwriting a key") from None
    except OSError as e:
        raise KilnError(f"cannot write {path}: {e}") from e
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)  # the umask does not get a say
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        path.unlink(missing_ok=True)
        raise KilnError(f"cannot write {path}: {e}") from e


def _read_key_file(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_KEY_BYTES + 1)
    except OSError as e:
        raise KilnError(f"cannot read key {path}: {e.strerror or e}") from e
    if len(data) > _MAX_KEY_BYTES:
        raise KilnError(f"key {path} is larger than {_MAX_KEY_BYTES} bytes: not a key")
    return data


def load_signer(path: Path) -> CryptoSigner:
    """A securesystemslib signer for a PKCS8 PEM private key (ECDSA P-256 or Ed25519)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519
    from securesystemslib.signer import CryptoSigner  # type: ignore[attr-defined]

    data = _read_key_file(path)
    try:
        private = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise KilnError(f"key {path} is encrypted; Kiln reads unencrypted PKCS8 keys") from None
    except ValueError:
        raise KilnError(
            f"key {path} is not a PEM private key (a .pub file? sign with NAME.key)"
        ) from None
    if isinstance(private, ec.EllipticCurvePrivateKey):
        if not isinstance(private.curve, ec.SECP256R1):
            raise KilnError(f"key {path}: curve {private.curve.name} is not P-256")
    elif not isinstance(private, ed25519.Ed25519PrivateKey):
        raise KilnError(f"key {path}: {type(private).__name__} is not ECDSA P-256 or Ed25519")
    return CryptoSigner(private, _sslib_key(private.public_key()))


def _sslib_key(public_key: Any) -> SSlibKey:
    from securesystemslib.signer import SSlibKey  # type: ignore[attr-defined]

    return SSlibKey.from_crypto(public_key, keyid=_der_id(public_key))


def load_public_key(path: Path) -> SSlibKey:
    """A trusted public key (SubjectPublicKeyInfo PEM) as securesystemslib verifies with."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    data = _read_key_file(path)
    try:
        public = serialization.load_pem_public_key(data)
    except ValueError:
        raise KilnError(
            f"key {path} is not a PEM public key (verify with NAME.pub, not NAME.key)"
        ) from None
    if not isinstance(public, (ec.EllipticCurvePublicKey, ed25519.Ed25519PublicKey)):
        raise KilnError(f"key {path}: {type(public).__name__} is not ECDSA or Ed25519")
    try:
        return _sslib_key(public)
    except ValueError as e:
        raise KilnError(f"key {path}: {e}") from e


# -- signing ------------------------------------------------------------------


def signature_payload(digest: str) -> bytes:
    """What an image signature signs: the manifest digest, in cosign's simple-signing shape."""
    document = {"critical": {"image": {"docker-manifest-digest": digest}, "type": SIGNATURE_KIND}}
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


def _envelope(data: bytes) -> Envelope:
    from securesystemslib.dsse import Envelope

    try:
        document = json.loads(data)
        if not isinstance(document, dict) or not isinstance(document.get("signatures"), list):
            raise ValueError("no signatures list")
        return Envelope.from_dict(document)
    except Exception as e:  # securesystemslib raises several kinds on a malformed envelope
        raise KilnError(f"not a DSSE envelope: {e}") from e


def _envelope_json(envelope: Envelope) -> bytes:
    return json.dumps(envelope.to_dict(), sort_keys=True).encode()


def _valid_signers(envelope: Envelope, trusted: dict[str, SSlibKey]) -> tuple[list[str], list[str]]:
    """(key ids of trusted keys whose signature verifies, key ids of every other signature)."""
    from securesystemslib.exceptions import UnverifiedSignatureError

    good: list[str] = []
    other: list[str] = []
    pae = envelope.pae()
    for keyid, signature in envelope.signatures.items():
        key = trusted.get(keyid)
        if key is None:
            other.append(keyid)
            continue
        try:
            key.verify_signature(signature, pae)
        except UnverifiedSignatureError:
            other.append(keyid)
            continue
        good.append(keyid)
    return good, other


def sign_image(store: ImageStore, ref: str, key: Path) -> SignResult:
    """Sign ``ref``'s manifest digest and its provenance with ``key``; what this key has
    already signed is left as it is (signing twice adds nothing)."""
    signer = load_signer(key)
    keyid = signer.public_key.keyid
    trusted = {keyid: signer.public_key}
    digest = store.resolve(ref).digest
    provenance = _latest_provenance(store, digest)
    if provenance is None:
        raise KilnError(
            f"{ref} ({digest}) has no provenance referrer: re-bake it with this Kiln first"
        )
    signature: Descriptor | None = None
    if not any(
        _valid_signers(envelope, trusted)[0]
        for envelope in _envelopes(store, digest, SIGNATURE_ARTIFACT_TYPE)
        if _signed_digest(envelope) == digest
    ):
        from securesystemslib.dsse import Envelope

        envelope = Envelope(signature_payload(digest), SIGNATURE_PAYLOAD_TYPE, {})
        envelope.sign(signer)
        signature = store.put_referrer(
            digest, SIGNATURE_ARTIFACT_TYPE, _envelope_json(envelope), DSSE_MEDIA_TYPE
        )
    signed_provenance: Descriptor | None = None
    if not _valid_signers(provenance, trusted)[0]:
        provenance.sign(signer)
        signed_provenance = store.put_referrer(
            digest, PROVENANCE_ARTIFACT_TYPE, _envelope_json(provenance), DSSE_MEDIA_TYPE
        )
    return SignResult(digest, keyid, signature, signed_provenance)


def _envelopes(store: ImageStore, digest: str, artifact_type: str) -> list[Envelope]:
    """The readable envelopes of one type (unreadable ones are :func:`verify_image`'s to
    report)."""
    out: list[Envelope] = []
    for entry in store.referrers(digest, artifact_type):
        try:
            _, payload = store.read_referrer(entry.digest)
            out.append(_envelope(payload))
        except KilnError:
            continue
    return out


def _latest_provenance(store: ImageStore, digest: str) -> Envelope | None:
    """The newest provenance envelope: it carries every signature added so far."""
    envelopes = _envelopes(store, digest, PROVENANCE_ARTIFACT_TYPE)
    return envelopes[-1] if envelopes else None


def _signed_digest(envelope: Envelope) -> str | None:
    try:
        document = json.loads(envelope.payload)
        value = document["critical"]["image"]["docker-manifest-digest"]
        kind = document["critical"]["type"]
    except (ValueError, KeyError, TypeError):
        return None
    return value if isinstance(value, str) and kind == SIGNATURE_KIND else None


# -- verification -------------------------------------------------------------


def verify_image(store: ImageStore, ref: str, keys: Sequence[Path]) -> Verification:
    """Check, offline, that ``ref`` is signed by one of ``keys``, that its provenance is
    signed by one of them and names this very image, that its SBOM is attached, and that
    every blob of it still hashes to its name. Never raises for what it finds: each
    problem is one line of ``errors``."""
    from kiln.supply.sbom import SBOM_ARTIFACT_TYPE

    digest = store.resolve(ref).digest
    errors: list[str] = []
    trusted: dict[str, SSlibKey] = {}
    for path in keys:
        try:
            key = load_public_key(path)
        except KilnError as e:
            errors.append(str(e))
            continue
        trusted[key.keyid] = key
    if not keys:
        errors.append("no public key given: pass --key NAME.pub")
    errors.extend(store.verify(digest))

    _check_sbom(store, digest, SBOM_ARTIFACT_TYPE, errors)
    signers = _check_signatures(store, digest, trusted, errors)
    provenance = _check_provenance(store, digest, trusted, errors)
    return Verification(digest, bool(signers), tuple(sorted(signers)), provenance, tuple(errors))


def _read_referrer(store: ImageStore, entry: Descriptor, what: str) -> bytes:
    """A referrer's payload, its manifest and payload blobs both re-hashed."""
    where = f"{what} referrer {entry.digest}"
    try:
        manifest = store.read_bytes(entry.digest)
    except KilnError:
        raise KilnError(f"{where}: manifest blob is missing") from None
    actual = "sha256:" + hashlib.sha256(manifest).hexdigest()
    if actual != entry.digest:
        raise KilnError(f"{where}: manifest blob {entry.digest} hashes to {actual}")
    try:
        _, payload = store.read_referrer(entry.digest)
    except KilnError as e:
        raise KilnError(f"{where}: {e}") from e
    return payload


def _check_sbom(store: ImageStore, digest: str, artifact_type: str, errors: list[str]) -> None:
    listed = store.referrers(digest, artifact_type)
    if not listed:
        errors.append(f"SBOM referrer ({artifact_type}) is missing")
    for entry in listed:
        try:
            _read_referrer(store, entry, "SBOM")
        except KilnError as e:
            errors.append(str(e))


def _read_envelope(store: ImageStore, entry: Descriptor, what: str) -> Envelope:
    payload = _read_referrer(store, entry, what)
    if len(payload) > _MAX_ENVELOPE_BYTES:
        raise KilnError(f"{what} referrer {entry.digest}: envelope larger than 4 MiB")
    try:
        return _envelope(payload)
    except KilnError as e:
        raise KilnError(f"{what} referrer {entry.digest}: {e}") from e


def _check_signatures(
    store: ImageStore, digest: str, trusted: dict[str, SSlibKey], errors: list[str]
) -> set[str]:
    """Key ids of trusted keys that validly signed this digest. A referrer that is broken
    or signs another image is always an error; signatures by other keys only matter when
    no given key signed."""
    signers: set[str] = set()
    listed = store.referrers(digest, SIGNATURE_ARTIFACT_TYPE)
    if not listed:
        errors.append(f"signature referrer ({SIGNATURE_ARTIFACT_TYPE}) is missing")
        return signers
    untrusted: list[str] = []
    for entry in listed:
        where = f"signature referrer {entry.digest}"
        try:
            envelope = _read_envelope(store, entry, "signature")
        except KilnError as e:
            errors.append(str(e))
            continue
        if envelope.payload_type != SIGNATURE_PAYLOAD_TYPE:
            errors.append(f"{where}: payload type {envelope.payload_type!r} is not a signature")
            continue
        good, other = _valid_signers(envelope, trusted)
        signed = _signed_digest(envelope)
        if signed != digest:
            errors.append(f"{where}: signs {signed or 'no digest'}, not this image ({digest})")
            continue
        signers.update(good)
        untrusted.extend(
            f"{where}: signed by key {keyid}, which is not a given key "
            "(or its signature does not verify)"
            for keyid in other
        )
    if not signers:
        errors.extend(untrusted)
        if not untrusted:
            errors.append(f"no signature on {digest} verifies with a given key")
    return signers


def _check_provenance(
    store: ImageStore, digest: str, trusted: dict[str, SSlibKey], errors: list[str]
) -> dict[str, Any] | None:
    """The newest statement signed by a trusted key that names this image. A broken
    referrer, or a trusted-signed statement about another image, is always an error."""
    listed = store.referrers(digest, PROVENANCE_ARTIFACT_TYPE)
    if not listed:
        errors.append(f"provenance referrer ({PROVENANCE_ARTIFACT_TYPE}) is missing")
        return None
    verified: dict[str, Any] | None = None
    for entry in reversed(listed):
        try:
            envelope = _read_envelope(store, entry, "provenance")
        except KilnError as e:
            errors.append(str(e))
            continue
        if not _valid_signers(envelope, trusted)[0]:
            continue
        try:
            document = _statement(envelope, f"provenance referrer {entry.digest}", digest)
        except KilnError as e:
            errors.append(str(e))
            continue
        if verified is None:
            verified = document
    if verified is None:
        errors.append(
            f"provenance of {digest} is not signed by a given key "
            f"(newest referrer {listed[-1].digest}; kiln sign REF --key NAME.key)"
        )
    return verified


def _statement(envelope: Envelope, where: str, digest: str) -> dict[str, Any]:
    """The in-toto statement in ``envelope``, if it is SLSA v1 provenance about ``digest``."""
    if envelope.payload_type != IN_TOTO_PAYLOAD_TYPE:
        raise KilnError(f"{where}: payload type {envelope.payload_type!r} is not in-toto")
    try:
        document = json.loads(envelope.payload)
    except ValueError as e:
        raise KilnError(f"{where}: statement is not JSON: {e}") from None
    if not isinstance(document, dict) or document.get("_type") != STATEMENT_TYPE:
        raise KilnError(f"{where}: not an in-toto Statement v1")
    if document.get("predicateType") != SLSA_PROVENANCE_V1:
        raise KilnError(f"{where}: predicate {document.get('predicateType')!r} is not SLSA v1")
    subjects = document.get("subject")
    hexes: list[str] = []
    if isinstance(subjects, list):
        for subject in subjects:
            named = subject.get("digest") if isinstance(subject, dict) else None
            if isinstance(named, dict) and isinstance(named.get("sha256"), str):
                hexes.append(named["sha256"])
    if digest.removeprefix("sha256:") not in hexes:
        listed = ", ".join(f"sha256:{h}" for h in hexes) or "nothing"
        raise KilnError(f"{where}: statement subject is {listed}, not this image ({digest})")
    return document
