import json
import subprocess
import tarfile
from pathlib import Path

import pytest

from kiln.errors import KilnError
from kiln.image.digest import Descriptor
from kiln.image.export import export_image
from kiln.image.store import ImageStore


def test_oci_export_is_a_deterministic_layout_skopeo_reads(
    store: ImageStore, tmp_path: Path, busybox_image: tuple[str, Descriptor]
) -> None:
    ref_name, manifest = busybox_image
    out = tmp_path / "web.oci.tar"
    export_image(store, "web", "oci", out)
    again = tmp_path / "again.tar"
    export_image(store, manifest.digest, "oci", again)
    assert out.read_bytes() == again.read_bytes()
    with tarfile.open(out) as tf:
        members = tf.getmembers()
        names = [m.name for m in members]
        assert all(m.mtime == 0 and m.uid == 0 and m.uname == "" for m in members)
        index = json.load(tf.extractfile("index.json"))  # type: ignore[arg-type]
        layout = tf.extractfile("oci-layout").read()  # type: ignore[union-attr]
        tf.extractall(tmp_path / "layout", filter="data")
    blobs = {f"blobs/sha256/{d.removeprefix('sha256:')}" for d in _image_digests(store, ref_name)}
    assert set(names) == {"blobs", "blobs/sha256", "index.json", "oci-layout", *blobs}
    assert names[2:] == sorted(names[2:])
    assert json.loads(layout) == {"imageLayoutVersion": "1.0.0"}
    [entry] = index["manifests"]
    assert entry["digest"] == manifest.digest
    assert entry["annotations"] == {"org.opencontainers.image.ref.name": ref_name}
    inspect = subprocess.run(
        ["skopeo", "inspect", f"oci:{tmp_path / 'layout'}:{ref_name}"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(inspect.stdout)["Digest"] == manifest.digest


def _image_digests(store: ImageStore, ref: str) -> list[str]:
    manifest = store.manifest(ref)
    return [
        store.resolve(ref).digest,
        manifest["config"]["digest"],
        *(layer["digest"] for layer in manifest["layers"]),
    ]


def test_docker_export_layout(
    store: ImageStore, tmp_path: Path, busybox_image: tuple[str, Descriptor]
) -> None:
    ref_name, _ = busybox_image
    out = tmp_path / "web.docker.tar"
    export_image(store, ref_name, "docker", out)
    manifest = store.manifest(ref_name)
    with tarfile.open(out) as tf:
        [entry] = json.load(tf.extractfile("manifest.json"))  # type: ignore[arg-type]
        names = set(tf.getnames())
    config_hex = manifest["config"]["digest"].removeprefix("sha256:")
    assert entry == {
        "Config": f"blobs/sha256/{config_hex}",
        "RepoTags": [ref_name],
        "Layers": [
            f"blobs/sha256/{x['digest'].removeprefix('sha256:')}" for x in manifest["layers"]
        ],
    }
    assert set(entry["Layers"]) | {entry["Config"], "manifest.json"} <= names
    with pytest.raises(KilnError, match="unknown export format"):
        export_image(store, ref_name, "zip", tmp_path / "x")  # type: ignore[arg-type]
    with pytest.raises(KilnError, match="no image nope"):
        export_image(store, "nope", "oci", tmp_path / "x")
    assert not (tmp_path / "x").exists()


@pytest.mark.docker
def test_docker_load_accepts_the_export(
    store: ImageStore,
    tmp_path: Path,
    busybox_image: tuple[str, Descriptor],
    dockerd: Path,
) -> None:
    ref_name, _ = busybox_image
    out = tmp_path / "web.docker.tar"
    export_image(store, ref_name, "docker", out)
    docker = ["docker", "-H", f"unix://{dockerd}"]
    try:
        loaded = subprocess.run(
            [*docker, "load", "-i", str(out)], capture_output=True, text=True, check=True
        )
        assert f"Loaded image: {ref_name}" in loaded.stdout
        image_id = subprocess.run(
            [*docker, "image", "inspect", "--format", "{{.Id}}", ref_name],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        assert image_id == store.manifest(ref_name)["config"]["digest"]
        ran = subprocess.run(
            [*docker, "run", "--rm", "--network", "none", ref_name],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert (ran.returncode, ran.stdout) == (0, "hello\n"), ran.stderr
    finally:
        subprocess.run([*docker, "rmi", "-f", ref_name], capture_output=True)
