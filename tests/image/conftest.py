"""Shared fixtures for the image tests: a store in a temp KILN_HOME, tiny busybox
images built with the image API itself, and a private dockerd for `docker load`.

The ``dockerd`` fixture is self-contained so other test packages can copy it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kiln.image.digest import (
    MEDIA_TYPE_CONFIG,
    MEDIA_TYPE_MANIFEST,
    Descriptor,
    canonical_json,
)
from kiln.image.layer import LayerResult, layer_from_dir
from kiln.image.store import ImageStore

EPOCH = 1_700_000_000
BUSYBOX = Path("/usr/bin/busybox")


@pytest.fixture(autouse=True)
def kiln_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "kiln-home"
    monkeypatch.setenv("KILN_HOME", str(home))
    return home


@pytest.fixture
def store(kiln_home: Path) -> ImageStore:
    return ImageStore(kiln_home / "images")


def make_busybox_tree(root: Path, message: str = "hello") -> Path:
    """A tiny runnable root filesystem: static busybox, a shell link, a data file."""
    (root / "bin").mkdir(parents=True)
    (root / "etc").mkdir()
    shutil.copy(BUSYBOX, root / "bin" / "busybox")
    os.chmod(root / "bin" / "busybox", 0o755)
    for applet in ("sh", "cat", "ls", "echo"):
        os.symlink("busybox", root / "bin" / applet)
    (root / "etc" / "message").write_text(message + "\n")
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    return root


def build_image(
    store: ImageStore,
    layers: list[LayerResult],
    ref_name: str | None,
    *,
    cmd: list[str] | None = None,
    created: str = "2023-11-14T22:13:20Z",
) -> Descriptor:
    config = {
        "architecture": "amd64",
        "os": "linux",
        "created": created,
        "config": {"Cmd": cmd or ["/bin/cat", "/etc/message"], "Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
        "history": [{"created": created, "created_by": "kiln test"} for _ in layers],
    }
    config_desc = store.put_bytes(canonical_json(config), MEDIA_TYPE_CONFIG)
    manifest = {
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_MANIFEST,
        "config": config_desc.to_json(),
        "layers": [layer.descriptor.to_json() for layer in layers],
    }
    manifest_desc = store.put_bytes(canonical_json(manifest), MEDIA_TYPE_MANIFEST)
    if ref_name is not None:
        store.tag(ref_name, manifest_desc)
    return manifest_desc


@pytest.fixture
def image_builder() -> Callable[..., Descriptor]:
    """``build_image`` as a fixture, since test modules here are not a package."""
    return build_image


@pytest.fixture
def busybox_tree() -> Callable[..., Path]:
    return make_busybox_tree


@pytest.fixture
def busybox_image(store: ImageStore, tmp_path: Path) -> tuple[str, Descriptor]:
    """``web:<12 hex>`` as a bake would tag it: one busybox layer plus one app layer."""
    base = layer_from_dir(make_busybox_tree(tmp_path / "base"), store, EPOCH)
    app = tmp_path / "app"
    app.mkdir()
    (app / "server.sh").write_text("#!/bin/sh\necho serving\n")
    os.chmod(app / "server.sh", 0o755)
    app_layer = layer_from_dir(app, store, EPOCH, normalize_modes=True, prefix="srv/app")
    manifest = build_image(store, [base, app_layer], None)
    ref_name = "web:" + manifest.digest.removeprefix("sha256:")[:12]
    store.tag(ref_name, manifest)
    return ref_name, manifest


def dockerd_command(data_root: Path, exec_root: Path, pidfile: Path, sock: Path) -> list[str]:
    return [
        "dockerd",
        "--iptables=false",
        "--ip6tables=false",
        "--bridge=none",
        "--data-root",
        str(data_root),
        "--exec-root",
        str(exec_root),
        "--pidfile",
        str(pidfile),
        "-H",
        f"unix://{sock}",
    ]


@pytest.fixture(scope="session")
def dockerd() -> Iterator[Path]:
    """A private dockerd for this test session; yields its socket path."""
    if shutil.which("dockerd") is None or shutil.which("docker") is None:
        pytest.skip("dockerd/docker not installed")
    if os.geteuid() != 0:
        pytest.skip("dockerd needs root")
    # exec-root and the socket path must stay short (unix socket path limit).
    base = Path(tempfile.mkdtemp(prefix="kd-", dir="/tmp"))
    sock = base / "docker.sock"
    log = open(base / "dockerd.log", "wb")  # noqa: SIM115 - lives as long as dockerd
    cmd = dockerd_command(base / "data", base / "exec", base / "dockerd.pid", sock)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        ready = False
        while time.monotonic() < deadline and proc.poll() is None:
            if sock.exists():
                probe = subprocess.run(
                    [
                        "docker",
                        "-H",
                        f"unix://{sock}",
                        "version",
                        "--format",
                        "{{.Server.Version}}",
                    ],
                    capture_output=True,
                    timeout=10,
                )
                if probe.returncode == 0:
                    ready = True
                    break
            time.sleep(0.2)
        if not ready:
            tail = (base / "dockerd.log").read_text(errors="replace")[-800:]
            pytest.skip(f"dockerd did not start within 30s: {tail}")
        yield sock
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        log.close()
        subprocess.run(["umount", "-R", str(base / "exec")], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)
