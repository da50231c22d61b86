"""Provenance and signatures: a real bake attaches SLSA v1 provenance in a DSSE envelope;
``kiln sign`` / ``kiln verify`` round-trip with ECDSA P-256 and Ed25519 keys, offline; and
every way evidence can be wrong (a tampered blob, an untrusted key, a statement or
signature about another image, a missing referrer) fails verification with a line that
names it."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kiln.errors import KilnError
from kiln.image.bake import bake
from kiln.image.store import ImageStore
from kiln.spec import load_spec
from kiln.supply.provenance import (
    BUILD_TYPE,
    BUILDER_ID,
    DSSE_MEDIA_TYPE,
    PROVENANCE_ARTIFACT_TYPE,
    SLSA_PROVENANCE_V1,
    STATEMENT_TYPE,
)
from kiln.supply.sbom import SBOM_ARTIFACT_TYPE
from kiln.supply.signing import (
    SIGNATURE_ARTIFACT_TYPE,
    generate_key,
    key_id,
    load_signer,
    sign_image,
    verify_image,
)

RECIPES = """[project]
name = "signtest"

[images.base]
from = "scratch"
steps = [{ copy = "files/", to = "/data" }]

[images.app]
from = "image:base"
steps = [{ copy = "app/", to = "/srv/app" }]
labels = { role = "web" }
"""
FILES = {"files/hello.txt": "hello\n", "app/main.sh": "echo main\n"}
WHO = b"t <t@t>"
CLI = "import sys, kiln.cli.sign_cmd; from kiln.cli.main import main; sys.exit(main(sys.argv[1:]))"


@dataclass(frozen=True)
class Baked:
    project: Path
    home: Path
    store: ImageStore
    app: str
    base: str
    commit: str


def _bake(project: Path) -> dict[str, str]:
    results = bake(load_spec(project / "kiln.toml"))
    return {name: result.digest for name, result in results.items()}


@pytest.fixture
def baked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Baked:
    """Two images (``app`` on ``image:base``) baked from a clean git checkout."""
    from dulwich import porcelain

    home = tmp_path / "home"
    monkeypatch.setenv("KILN_HOME", str(home))
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    project = tmp_path / "project"
    for rel, text in FILES.items():
        (project / rel).parent.mkdir(parents=True, exist_ok=True)
        (project / rel).write_text(text)
    (project / "kiln.toml").write_text(RECIPES)
    (project / "kiln.lock").write_text("# pinned inputs\n")
    repo = porcelain.init(str(project))
    porcelain.add(repo, paths=[str(p) for p in project.rglob("*") if ".git" not in p.parts])
    commit = porcelain.commit(
        repo, message=b"init", author=WHO, committer=WHO, commit_timestamp=1_600_000_000
    )
    repo.close()
    digests = _bake(project)
    return Baked(
        project,
        home,
        ImageStore(home / "images"),
        digests["app"],
        digests["base"],
        commit.decode(),
    )


def _provenance_envelope(store: ImageStore, digest: str) -> dict[str, Any]:
    [entry] = store.referrers(digest, PROVENANCE_ARTIFACT_TYPE)
    manifest, payload = store.read_referrer(entry.digest)
    assert manifest["layers"][0]["mediaType"] == DSSE_MEDIA_TYPE
    envelope = json.loads(payload)
    assert isinstance(envelope, dict)
    return envelope


def _statement(envelope: dict[str, Any]) -> dict[str, Any]:
    payload = envelope["payload"]
    assert isinstance(payload, str)
    document = json.loads(base64.b64decode(payload))
    assert isinstance(document, dict)
    return document


# -- provenance ---------------------------------------------------------------


def test_a_bake_attaches_unsigned_slsa_provenance_about_the_image(baked: Baked) -> None:
    before = time.time()
    envelope = _provenance_envelope(baked.store, baked.app)
    assert envelope["payloadType"] == "application/vnd.in-toto+json"
    assert envelope["signatures"] == []
    statement = _statement(envelope)
    assert statement["_type"] == STATEMENT_TYPE
    assert statement["subject"] == [
        {"name": "app", "digest": {"sha256": baked.app.removeprefix("sha256:")}}
    ]
    assert statement["predicateType"] == SLSA_PROVENANCE_V1
    predicate = statement["predicate"]
    assert isinstance(predicate, dict)
    definition = predicate["buildDefinition"]
    assert definition["buildType"] == BUILD_TYPE
    assert definition["externalParameters"] == {
        "image": "app",
        "recipe": {
            "from": "image:base",
            "packages": [],
            "steps": [{"copy": "app/", "to": "/srv/app"}],
            "env": {},
            "expose": [],
            "labels": {"role": "web"},
            "secrets_allow": [],
        },
    }
    assert definition["internalParameters"] == {"sourceDateEpoch": 1_600_000_000}
    deps = {d["name"]: d for d in definition["resolvedDependencies"]}
    assert deps["image:base"]["digest"] == {"sha256": baked.base.removeprefix("sha256:")}
    [base_layer] = baked.store.manifest(baked.base)["layers"]
    assert deps["image:base layer 1"]["digest"] == {
        "sha256": base_layer["digest"].removeprefix("sha256:")
    }
    lock_hex = hashlib.sha256((baked.project / "kiln.lock").read_bytes())
    assert deps["kiln.lock"]["digest"] == {"sha256": lock_hex.hexdigest()}
    assert deps["source"]["digest"] == {"gitCommit": baked.commit}
    run = predicate["runDetails"]
    assert run["builder"] == {"id": BUILDER_ID, "version": {"kiln": "0.1.0"}}
    started = run["metadata"]["startedOn"]
    finished = run["metadata"]["finishedOn"]
    assert started <= finished <= time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(before + 1))
    assert time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(before - 120)) <= started
    # the base, from scratch: no base dependency, but kiln.lock and the commit all the same
    base_deps = _statement(_provenance_envelope(baked.store, baked.base))["predicate"]
    names = [d["name"] for d in base_deps["buildDefinition"]["resolvedDependencies"]]
    assert names == ["kiln.lock", "source"]


def test_a_dirty_checkout_records_no_commit(baked: Baked) -> None:
    (baked.project / "files" / "hello.txt").write_text("changed\n")
    digest = _bake(baked.project)["base"]
    assert digest != baked.base
    statement = _statement(_provenance_envelope(baked.store, digest))
    deps = statement["predicate"]["buildDefinition"]["resolvedDependencies"]
    assert [d["name"] for d in deps] == ["kiln.lock"]


def test_a_cached_rebake_writes_no_new_provenance(baked: Baked) -> None:
    referrers = {d: baked.store.referrers(d) for d in (baked.app, baked.base)}
    blobs = sorted(p.name for p in baked.store.blobs.iterdir())
    time.sleep(1.1)  # a new provenance would carry a new finishedOn, so a new blob
    assert _bake(baked.project) == {"app": baked.app, "base": baked.base}
    assert {d: baked.store.referrers(d) for d in (baked.app, baked.base)} == referrers
    assert sorted(p.name for p in baked.store.blobs.iterdir()) == blobs


# -- keys ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key_type", "oid_name"), [("ecdsa-p256", "prime256v1"), ("ed25519", "ED25519")]
)
def test_key_generate_writes_standard_pem_with_safe_modes(
    tmp_path: Path, key_type: str, oid_name: str
) -> None:
    private, public = generate_key(tmp_path / "release", key_type)
    assert (private.name, public.name) == ("release.key", "release.pub")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert stat.S_IMODE(public.stat().st_mode) == 0o644
    assert private.read_text().startswith("-----BEGIN PRIVATE KEY-----\n")
    assert public.read_text().startswith("-----BEGIN PUBLIC KEY-----\n")
    if shutil.which("openssl"):
        text = subprocess.run(
            ["openssl", "pkey", "-in", str(private), "-noout", "-text"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert oid_name in text
        der = subprocess.run(
            ["openssl", "pkey", "-pubin", "-in", str(public), "-outform", "DER"],
            capture_output=True,
            check=True,
        ).stdout
        assert key_id(public.read_bytes()) == hashlib.sha256(der).hexdigest()
    # the key id of the private half is the public key's
    assert load_signer(private).public_key.keyid == key_id(public.read_bytes())


def test_key_generate_never_overwrites(tmp_path: Path) -> None:
    private, public = generate_key(tmp_path / "k")
    old = private.read_bytes()
    with pytest.raises(KilnError, match=r"k\.key already exists; not overwriting a key$"):
        generate_key(tmp_path / "k", "ed25519")
    assert private.read_bytes() == old
    public.unlink()
    (tmp_path / "other.pub").write_text("x")
    with pytest.raises(KilnError, match=r"other\.pub already exists"):
        generate_key(tmp_path / "other")
    assert not (tmp_path / "other.key").exists()  # nothing half-written
    # a dangling symlink where the key would go is not followed
    (tmp_path / "link.key").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(KilnError, match="already exists"):
        generate_key(tmp_path / "link")
    assert not (tmp_path / "elsewhere").exists()
    with pytest.raises(KilnError, match="--type: 'rsa' is not one of ecdsa-p256, ed25519"):
        generate_key(tmp_path / "r", "rsa")


def test_bad_key_files_are_refused_with_one_line(baked: Baked, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    private, public = generate_key(tmp_path / "k")
    with pytest.raises(KilnError, match=r"is not a PEM private key \(a \.pub file\?"):
        sign_image(baked.store, "app", public)
    secp384 = ec.generate_private_key(ec.SECP384R1())
    p256 = ec.generate_private_key(ec.SECP256R1())
    other = tmp_path / "p384.key"
    other.write_bytes(
        secp384.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(KilnError, match="curve secp384r1 is not P-256"):
        sign_image(baked.store, "app", other)
    locked = tmp_path / "locked.key"
    locked.write_bytes(
        p256.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"pw"),
        )
    )
    with pytest.raises(KilnError, match="is encrypted"):
        sign_image(baked.store, "app", locked)
    with pytest.raises(KilnError, match=r"cannot read key .*missing\.key"):
        sign_image(baked.store, "app", tmp_path / "missing.key")
    sign_image(baked.store, "app", private)
    result = verify_image(baked.store, "app", [private])
    assert not result.signed
    assert any("is not a PEM public key (verify with NAME.pub" in e for e in result.errors)


# -- sign and verify ----------------------------------------------------------


@pytest.mark.parametrize("key_type", ["ecdsa-p256", "ed25519"])
def test_sign_then_verify_round_trip(baked: Baked, tmp_path: Path, key_type: str) -> None:
    private, public = generate_key(tmp_path / "release", key_type)
    unsigned = verify_image(baked.store, "app", [public])
    assert not unsigned.signed and unsigned.provenance is None
    assert any(SIGNATURE_ARTIFACT_TYPE in e and "missing" in e for e in unsigned.errors)

    result = sign_image(baked.store, "app", private)
    assert result.signature is not None and result.provenance is not None
    verified = verify_image(baked.store, "app", [public])
    assert verified.errors == ()
    assert verified.ok and verified.signed and verified.digest == baked.app
    assert verified.signers == (key_id(public.read_bytes()),)
    assert verified.provenance is not None
    assert verified.provenance["subject"][0]["digest"]["sha256"] == baked.app[7:]
    # the signed provenance is a new referrer carrying the signature; the unsigned stays
    listed = baked.store.referrers(baked.app, PROVENANCE_ARTIFACT_TYPE)
    assert len(listed) == 2
    signed_envelope = json.loads(baked.store.read_referrer(listed[-1].digest)[1])
    [signature] = signed_envelope["signatures"]
    assert signature["keyid"] == verified.signers[0]
    # signing again with the same key adds nothing
    before = baked.store.referrers(baked.app)
    again = sign_image(baked.store, "app", private)
    assert again.signature is None and again.provenance is None
    assert baked.store.referrers(baked.app) == before
    # the other image was not signed by any of this
    assert not verify_image(baked.store, "base", [public]).signed


def test_a_second_signer_adds_to_the_provenance(baked: Baked, tmp_path: Path) -> None:
    first_key, first_pub = generate_key(tmp_path / "one")
    second_key, second_pub = generate_key(tmp_path / "two", "ed25519")
    sign_image(baked.store, "app", first_key)
    sign_image(baked.store, "app", second_key)
    both = verify_image(baked.store, "app", [first_pub, second_pub])
    assert both.ok
    assert set(both.signers) == {key_id(first_pub.read_bytes()), key_id(second_pub.read_bytes())}
    newest = baked.store.referrers(baked.app, PROVENANCE_ARTIFACT_TYPE)[-1]
    envelope = json.loads(baked.store.read_referrer(newest.digest)[1])
    assert len(envelope["signatures"]) == 2
    assert verify_image(baked.store, "app", [second_pub]).ok


def test_a_tampered_layer_blob_fails_naming_it(baked: Baked, tmp_path: Path) -> None:
    private, public = generate_key(tmp_path / "k")
    sign_image(baked.store, "app", private)
    layer = baked.store.manifest(baked.app)["layers"][-1]["digest"]
    path = baked.store.blob_path(layer)
    os.chmod(path, 0o600)
    path.write_bytes(path.read_bytes() + b"\0")
    result = verify_image(baked.store, "app", [public])
    assert result.signed  # the signature is fine; the image is not
    assert not result.ok
    [error] = result.errors
    assert error.startswith(f"blob {layer} (layer 2 of app:{baked.app[7:19]}): content hashes to ")


def test_a_signature_by_an_untrusted_key_fails(baked: Baked, tmp_path: Path) -> None:
    mallory, _ = generate_key(tmp_path / "mallory")
    _, trusted_pub = generate_key(tmp_path / "trusted")
    sign_image(baked.store, "app", mallory)
    result = verify_image(baked.store, "app", [trusted_pub])
    assert not result.signed and result.signers == () and result.provenance is None
    mallory_id = load_signer(mallory).public_key.keyid
    [sig_error] = [e for e in result.errors if e.startswith("signature referrer")]
    assert f"signed by key {mallory_id}, which is not a given key" in sig_error
    assert any(e.startswith(f"provenance of {baked.app} is not signed") for e in result.errors)


def test_a_forged_signature_under_a_trusted_key_id_fails(baked: Baked, tmp_path: Path) -> None:
    """An envelope that claims the trusted key's id but was signed by another key."""
    from securesystemslib.dsse import Envelope

    from kiln.supply.signing import signature_payload

    mallory, _ = generate_key(tmp_path / "mallory")
    _, trusted_pub = generate_key(tmp_path / "trusted")
    signer = load_signer(mallory)
    envelope = Envelope(signature_payload(baked.app), SIGNATURE_ARTIFACT_TYPE, {})
    signature = envelope.sign(signer)
    forged = envelope.to_dict()
    forged["signatures"][0]["keyid"] = key_id(trusted_pub.read_bytes())
    assert signature.keyid != forged["signatures"][0]["keyid"]
    baked.store.put_referrer(
        baked.app, SIGNATURE_ARTIFACT_TYPE, json.dumps(forged).encode(), DSSE_MEDIA_TYPE
    )
    result = verify_image(baked.store, "app", [trusted_pub])
    assert not result.signed
    assert any("does not verify" in e for e in result.errors)


def test_a_statement_about_another_image_fails(baked: Baked, tmp_path: Path) -> None:
    private, public = generate_key(tmp_path / "k")
    sign_image(baked.store, "app", private)
    sign_image(baked.store, "base", private)
    # base's signed provenance, re-attached to app: validly signed, but about base
    theirs = baked.store.referrers(baked.base, PROVENANCE_ARTIFACT_TYPE)[-1]
    _, envelope = baked.store.read_referrer(theirs.digest)
    moved = baked.store.put_referrer(baked.app, PROVENANCE_ARTIFACT_TYPE, envelope, DSSE_MEDIA_TYPE)
    result = verify_image(baked.store, "app", [public])
    assert result.errors == (
        f"provenance referrer {moved.digest}: statement subject is {baked.base}, "
        f"not this image ({baked.app})",
    )
    # with app's own provenance gone, nothing verified is left
    for entry in baked.store.referrers(baked.app, PROVENANCE_ARTIFACT_TYPE)[:-1]:
        baked.store.remove_referrer(baked.app, entry.digest)
    alone = verify_image(baked.store, "app", [public])
    assert alone.provenance is None and not alone.ok


def test_a_signature_of_another_image_fails(baked: Baked, tmp_path: Path) -> None:
    private, public = generate_key(tmp_path / "k")
    sign_image(baked.store, "base", private)
    [theirs] = baked.store.referrers(baked.base, SIGNATURE_ARTIFACT_TYPE)
    _, envelope = baked.store.read_referrer(theirs.digest)
    moved = baked.store.put_referrer(baked.app, SIGNATURE_ARTIFACT_TYPE, envelope, DSSE_MEDIA_TYPE)
    result = verify_image(baked.store, "app", [public])
    assert not result.signed
    assert f"signature referrer {moved.digest}: signs {baked.base}, not this image" in "\n".join(
        result.errors
    )


@pytest.mark.parametrize(
    ("artifact_type", "message"),
    [
        (SBOM_ARTIFACT_TYPE, f"SBOM referrer ({SBOM_ARTIFACT_TYPE}) is missing"),
        (SIGNATURE_ARTIFACT_TYPE, f"signature referrer ({SIGNATURE_ARTIFACT_TYPE}) is missing"),
        (
            PROVENANCE_ARTIFACT_TYPE,
            f"provenance referrer ({PROVENANCE_ARTIFACT_TYPE}) is missing",
        ),
    ],
)
def test_a_deleted_referrer_fails_saying_which(
    baked: Baked, tmp_path: Path, artifact_type: str, message: str
) -> None:
    private, public = generate_key(tmp_path / "k")
    sign_image(baked.store, "app", private)
    assert verify_image(baked.store, "app", [public]).ok
    for entry in baked.store.referrers(baked.app, artifact_type):
        assert baked.store.remove_referrer(baked.app, entry.digest)
    result = verify_image(baked.store, "app", [public])
    assert message in result.errors
    assert not result.ok


def test_a_tampered_signature_envelope_fails_naming_the_referrer(
    baked: Baked, tmp_path: Path
) -> None:
    private, public = generate_key(tmp_path / "k")
    sign_image(baked.store, "app", private)
    [entry] = baked.store.referrers(baked.app, SIGNATURE_ARTIFACT_TYPE)
    manifest = baked.store.manifest(entry.digest)
    payload = baked.store.blob_path(manifest["layers"][0]["digest"])
    os.chmod(payload, 0o600)
    payload.write_bytes(payload.read_bytes().replace(b'"payload"', b'"payloaD"'))
    result = verify_image(baked.store, "app", [public])
    assert not result.signed
    assert any(
        e.startswith(f"signature referrer {entry.digest}:") and "is corrupt" in e
        for e in result.errors
    )


@pytest.mark.parametrize(
    "hostile",
    [
        b"not json",
        b"[]",
        b'{"payload": "e30=", "payloadType": "x"}',
        b'{"payload": "%%%", "payloadType": "x", "signatures": []}',
        b'{"payload": "e30=", "payloadType": "x", "signatures": [{"keyid": 1, "sig": "!!"}]}',
        b'{"payload": "e30=", "payloadType": "x", "signatures": ["nope"]}',
    ],
)
def test_a_hostile_envelope_is_reported_not_trusted(
    baked: Baked, tmp_path: Path, hostile: bytes
) -> None:
    private, public = generate_key(tmp_path / "k")
    sign_image(baked.store, "app", private)
    for artifact_type in (SIGNATURE_ARTIFACT_TYPE, PROVENANCE_ARTIFACT_TYPE):
        entry = baked.store.put_referrer(baked.app, artifact_type, hostile, DSSE_MEDIA_TYPE)
        result = verify_image(baked.store, "app", [public])
        kind = "signature" if artifact_type == SIGNATURE_ARTIFACT_TYPE else "provenance"
        assert any(e.startswith(f"{kind} referrer {entry.digest}: ") for e in result.errors)
        assert result.signed  # the genuine signature still verifies; the image does not
        assert not result.ok
        baked.store.remove_referrer(baked.app, entry.digest)
    # and sign still works past a hostile provenance envelope
    baked.store.put_referrer(baked.app, PROVENANCE_ARTIFACT_TYPE, hostile, DSSE_MEDIA_TYPE)
    again = sign_image(baked.store, "app", private)
    assert again.provenance is None


def test_sign_needs_provenance(baked: Baked, tmp_path: Path) -> None:
    private, _ = generate_key(tmp_path / "k")
    for entry in baked.store.referrers(baked.app, PROVENANCE_ARTIFACT_TYPE):
        baked.store.remove_referrer(baked.app, entry.digest)
    with pytest.raises(KilnError, match="has no provenance referrer: re-bake it"):
        sign_image(baked.store, "app", private)
    assert baked.store.referrers(baked.app, SIGNATURE_ARTIFACT_TYPE) == []


# -- CLI ----------------------------------------------------------------------


def _kiln(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KILN_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-c", CLI, *args], capture_output=True, text=True, env=env, timeout=60
    )


def test_cli_key_sign_verify_exit_codes(baked: Baked, tmp_path: Path) -> None:
    made = _kiln(baked.home, "key", "generate", "-o", str(tmp_path / "ci"), "--type", "ed25519")
    assert made.returncode == 0, made.stderr
    public = tmp_path / "ci.pub"
    assert f"key id {key_id(public.read_bytes())}" in made.stdout
    again = _kiln(baked.home, "key", "generate", "-o", str(tmp_path / "ci"))
    assert again.returncode == 1
    assert again.stderr == f"error: {tmp_path}/ci.key already exists; not overwriting a key\n"

    unsigned = _kiln(baked.home, "verify", "app", "--key", str(public))
    assert unsigned.returncode == 1
    lines = unsigned.stderr.splitlines()
    assert f"error: signature referrer ({SIGNATURE_ARTIFACT_TYPE}) is missing" in lines
    assert all(line.startswith("error: ") for line in lines)

    signed = _kiln(baked.home, "sign", "app", "--key", str(tmp_path / "ci.key"))
    assert signed.returncode == 0, signed.stderr
    assert signed.stdout.startswith(f"signed app ({baked.app}) with key ")
    ok = _kiln(baked.home, "verify", "app", "--key", str(public))
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith(f"verified app ({baked.app}): signed by ")
    as_json = _kiln(baked.home, "verify", "app", "--key", str(public), "--json")
    assert as_json.returncode == 0
    assert json.loads(as_json.stdout)["verified"] is True

    generate_key(tmp_path / "stranger")
    wrong = _kiln(baked.home, "verify", "app", "--key", str(tmp_path / "stranger.pub"))
    assert wrong.returncode == 1
    assert "which is not a given key" in wrong.stderr
    missing = _kiln(baked.home, "sign", "nosuch", "--key", str(tmp_path / "ci.key"))
    assert missing.returncode == 1
    assert missing.stderr.startswith("error: no image nosuch in ")
    assert len(missing.stderr.splitlines()) == 1


def test_the_cli_module_does_not_import_cryptography() -> None:
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, kiln.cli.sign_cmd; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('cryptography', 'securesystemslib')))",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert probe.stdout == "[]\n"
