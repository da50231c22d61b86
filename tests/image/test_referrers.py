"""Referrers in the store: OCI 1.1 artifacts whose ``subject`` is an image manifest.

Real store on disk, real blobs; ``gc`` and ``export`` are the same code ``kiln image gc``
and ``kiln image export`` run. The index is hostile input too (a corrupt one is refused,
never silently emptied).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from kiln.errors import KilnError
from kiln.image.digest import MEDIA_TYPE_EMPTY, MEDIA_TYPE_MANIFEST, Descriptor
from kiln.image.export import ANNOTATION_SUBJECT, export_image
from kiln.image.store import ImageStore

SBOM_TYPE = "application/vnd.cyclonedx+json"
SIG_TYPE = "application/vnd.dev.kiln.signature.v1+json"


def _blob_files(store: ImageStore) -> set[str]:
    return {"sha256:" + p.name for p in store.blobs.iterdir()}


def test_put_referrer_writes_an_oci_artifact_manifest_with_subject(
    store: ImageStore, busybox_image: tuple[str, Descriptor]
) -> None:
    ref_name, image = busybox_image
    payload = b'{"bomFormat":"CycloneDX"}'
    entry = store.put_referrer(ref_name, SBOM_TYPE, payload, SBOM_TYPE, {"k": "v"})
    assert entry.artifact_type == SBOM_TYPE
    assert entry.annotations == {"k": "v"}
    assert entry.media_type == MEDIA_TYPE_MANIFEST
    manifest, read_back = store.read_referrer(entry.digest)
    assert read_back == payload
    assert manifest["artifactType"] == SBOM_TYPE
    assert manifest["config"] == {
        "mediaType": MEDIA_TYPE_EMPTY,
        "digest": "sha256:" + hashlib.sha256(b"{}").hexdigest(),
        "size": 2,
    }
    assert manifest["layers"] == [
        {
            "mediaType": SBOM_TYPE,
            "digest": "sha256:" + hashlib.sha256(payload).hexdigest(),
            "size": len(payload),
        }
    ]
    assert manifest["subject"] == {
        "mediaType": MEDIA_TYPE_MANIFEST,
        "digest": image.digest,
        "size": image.size,
    }
    # the same artifact again is recorded once; by digest or by name it is the same list
    again = store.put_referrer(image.digest, SBOM_TYPE, payload, SBOM_TYPE, {"k": "v"})
    assert again == entry
    assert store.referrers("web") == store.referrers(image.digest) == [entry]
    # the index is what the registry referrers API answers: an image index of descriptors
    index = json.loads(store._referrer_index(image.digest).read_text())
    assert index["mediaType"] == "application/vnd.oci.image.index.v1+json"
    assert index["manifests"][0]["artifactType"] == SBOM_TYPE
    # referrers never show up as images
    assert [e.ref_name for e in store.images()] == [ref_name]


def test_referrers_filter_by_type_and_nest(
    store: ImageStore, busybox_image: tuple[str, Descriptor]
) -> None:
    ref_name, image = busybox_image
    sbom = store.put_referrer(ref_name, SBOM_TYPE, b"{}", SBOM_TYPE)
    other = store.put_referrer(ref_name, "application/vnd.in-toto+json", b"[]", "text/plain")
    signature = store.put_referrer(sbom.digest, SIG_TYPE, b"sig", "application/octet-stream")
    assert store.referrers(ref_name) == [sbom, other]
    assert store.referrers(ref_name, SBOM_TYPE) == [sbom]
    assert store.referrers(ref_name, "application/x-none") == []
    assert store.referrers(sbom.digest) == [signature]
    assert store.referrer_closure([image.digest]) == [sbom, other, signature]
    assert store.remove_referrer(ref_name, other.digest)
    assert not store.remove_referrer(ref_name, other.digest)
    assert store.referrers(ref_name) == [sbom]


def test_bad_subjects_and_types_are_refused(
    store: ImageStore, busybox_image: tuple[str, Descriptor]
) -> None:
    ref_name, _ = busybox_image
    with pytest.raises(KilnError, match="no image nothere:1"):
        store.put_referrer("nothere:1", SBOM_TYPE, b"{}", SBOM_TYPE)
    with pytest.raises(KilnError, match="bad artifact type"):
        store.put_referrer(ref_name, "../../etc/passwd", b"{}", SBOM_TYPE)
    with pytest.raises(KilnError, match="bad payload media type"):
        store.put_referrer(ref_name, SBOM_TYPE, b"{}", "x y\nz")
    with pytest.raises(KilnError, match="not a sha256 digest"):
        store.read_referrer("../index.json")
    assert store.referrers(ref_name) == []


def test_corrupt_index_and_payload_are_named_not_ignored(
    store: ImageStore, busybox_image: tuple[str, Descriptor]
) -> None:
    ref_name, image = busybox_image
    entry = store.put_referrer(ref_name, SBOM_TYPE, b'{"a":1}', SBOM_TYPE)
    manifest, _ = store.read_referrer(entry.digest)
    store.blob_path(manifest["layers"][0]["digest"]).write_bytes(b'{"a":2}')
    with pytest.raises(KilnError, match=r"payload blob sha256:[0-9a-f]{64} is corrupt"):
        store.read_referrer(entry.digest)
    store._referrer_index(image.digest).write_text("{not json")
    with pytest.raises(KilnError, match="is not a referrer index"):
        store.referrers(ref_name)
    with pytest.raises(KilnError, match="is not a referrer index"):
        store.gc()  # never sweeps evidence it cannot read


def test_gc_keeps_referrers_with_their_subject_and_drops_them_with_it(
    store: ImageStore, busybox_image: tuple[str, Descriptor]
) -> None:
    ref_name, image = busybox_image
    sbom = store.put_referrer(ref_name, SBOM_TYPE, b'{"sbom":1}', SBOM_TYPE)
    signature = store.put_referrer(sbom.digest, SIG_TYPE, b"sig", "application/octet-stream")
    artifact_blobs = store.reachable([sbom.digest, signature.digest])
    assert store.gc().removed_blobs == 0
    assert artifact_blobs <= _blob_files(store)
    assert store.referrers(ref_name) == [sbom]
    assert store.referrers(sbom.digest) == [signature]

    store.remove(ref_name)
    store.gc()
    assert not (artifact_blobs - {"sha256:" + hashlib.sha256(b"{}").hexdigest()}) & _blob_files(
        store
    )
    assert image.digest.removeprefix("sha256:") not in {p.name for p in store.blobs.iterdir()}
    assert store.referrer_subjects() == []


def test_oci_export_carries_referrers(
    store: ImageStore, busybox_image: tuple[str, Descriptor], tmp_path: Path
) -> None:
    ref_name, image = busybox_image
    sbom = store.put_referrer(ref_name, SBOM_TYPE, b'{"sbom":1}', SBOM_TYPE, {"x": "y"})
    signature = store.put_referrer(sbom.digest, SIG_TYPE, b"sig", "application/octet-stream")
    out = tmp_path / "web.tar"
    export_image(store, ref_name, "oci", out)
    with tarfile.open(out) as tf:
        names = set(tf.getnames())
        index = json.load(tf.extractfile("index.json"))  # type: ignore[arg-type]
        tf.extractall(tmp_path / "layout", filter="data")
    entries = index["manifests"]
    assert [e["digest"] for e in entries] == [image.digest, sbom.digest, signature.digest]
    assert entries[1]["artifactType"] == SBOM_TYPE
    assert entries[1]["annotations"] == {"x": "y", ANNOTATION_SUBJECT: image.digest}
    assert entries[2]["annotations"] == {ANNOTATION_SUBJECT: sbom.digest}
    for digest in store.reachable([image.digest, sbom.digest, signature.digest]):
        assert f"blobs/sha256/{digest.removeprefix('sha256:')}" in names
    # the exported referrer still names its subject, and its payload is intact
    layout = tmp_path / "layout" / "blobs" / "sha256"
    exported = json.loads((layout / sbom.digest.removeprefix("sha256:")).read_text())
    assert exported["subject"]["digest"] == image.digest
    payload = exported["layers"][0]["digest"].removeprefix("sha256:")
    assert (layout / payload).read_bytes() == b'{"sbom":1}'
    if shutil.which("skopeo"):
        inspect = subprocess.run(
            ["skopeo", "inspect", f"oci:{tmp_path / 'layout'}:{ref_name}"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert inspect.returncode == 0, inspect.stderr
        assert json.loads(inspect.stdout)["Digest"] == image.digest
    # the docker format has no place for referrers and carries none
    export_image(store, ref_name, "docker", tmp_path / "docker.tar")
    with tarfile.open(tmp_path / "docker.tar") as tf:
        assert f"blobs/sha256/{sbom.digest.removeprefix('sha256:')}" not in tf.getnames()


def test_cli_lists_referrers(
    store: ImageStore, busybox_image: tuple[str, Descriptor], capsys: pytest.CaptureFixture[str]
) -> None:
    import kiln.cli.sbom_cmd  # noqa: F401  (registers the commands, as run() will)
    from kiln.cli.app import run

    ref_name, _ = busybox_image
    assert run(["image", "referrers", ref_name]) == 0
    assert capsys.readouterr().out.strip() == f"{ref_name}: no referrers"
    sbom = store.put_referrer(ref_name, SBOM_TYPE, b"{}", SBOM_TYPE)
    assert run(["image", "referrers", ref_name, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == [sbom.to_json()]
    assert run(["image", "referrers", "nothere:1"]) == 1
    assert "no image nothere:1" in capsys.readouterr().err
