"""Push and pull against a real ``docker-registry`` (htpasswd auth, TLS from a CA made here),
read back by skopeo, and pulls from a hostile registry that must leave the store untouched.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import io
import json
import os
import shutil
import ssl
import subprocess
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from busybox_tree import free_port
from kiln.cli.app import run as kiln_run
from kiln.errors import KilnError
from kiln.image.digest import (
    MEDIA_TYPE_CONFIG,
    MEDIA_TYPE_LAYER_TAR,
    MEDIA_TYPE_MANIFEST,
    canonical_json,
)
from kiln.image.layer import layer_from_dir
from kiln.image.registry import (
    RegistryClient,
    RegistryOptions,
    load_credentials,
    parse_ref,
    pull,
    push,
)
from kiln.image.store import ImageStore
from registry_server import REGISTRY_BIN, serve_registry
from tls_certs import make_ca, make_server_cert

USER, PASSWORD = "kiln", "s3cret-pass"
needs_registry = pytest.mark.skipif(
    not REGISTRY_BIN.exists() or not shutil.which("htpasswd"),
    reason="docker-registry and apache2-utils (htpasswd) not installed",
)
CHUNK = 64 << 10


# -- a tiny image --------------------------------------------------------------


def make_image(store: ImageStore, root: Path, name: str, payload_bytes: int = 300_000) -> str:
    """A one-layer image with an incompressible file, so its upload takes several chunks."""
    tree = root / f"tree-{name.replace(':', '-').replace('/', '-')}"
    (tree / "data").mkdir(parents=True)
    (tree / "data" / "random.bin").write_bytes(os.urandom(payload_bytes))
    (tree / "hello.txt").write_text(f"hello from {name}\n")
    layer = layer_from_dir(tree, store, 0)
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["/hello"]},
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id]},
    }
    config_desc = store.put_bytes(canonical_json(config), MEDIA_TYPE_CONFIG)
    manifest = {
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_MANIFEST,
        "config": config_desc.to_json(),
        "layers": [layer.descriptor.to_json()],
    }
    desc = store.put_bytes(canonical_json(manifest), MEDIA_TYPE_MANIFEST)
    store.tag(name, desc)
    return desc.digest


def store_state(store: ImageStore) -> tuple[set[str], bytes, list[str]]:
    blobs = {p.name for p in store.blobs.iterdir()}
    temps = [p.name for p in store.tmp_dir.iterdir()]
    return blobs, (store.root / "index.json").read_bytes(), temps


# -- a real registry -------------------------------------------------------------


@dataclass
class Registry:
    host: str
    ca_file: Path
    cert_dir: Path
    auth_file: Path
    log: Path

    def options(self, **kw: Any) -> RegistryOptions:
        return RegistryOptions(
            ca_file=self.ca_file, auth_file=self.auth_file, chunk_bytes=CHUNK, **kw
        )


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    if not REGISTRY_BIN.exists() or not shutil.which("htpasswd"):
        pytest.skip("docker-registry and apache2-utils (htpasswd) not installed")
    root = tmp_path_factory.mktemp("registry")
    ca_file, ca_key, ca_cert = make_ca(root, "kiln-test-ca")
    cert, key = make_server_cert(root, ca_key, ca_cert)
    cert_dir = root / "certs.d"
    cert_dir.mkdir()
    shutil.copy(ca_file, cert_dir / "ca.crt")
    htpasswd = root / "htpasswd"
    subprocess.run(
        ["htpasswd", "-B", "-b", "-c", str(htpasswd), USER, PASSWORD],
        check=True,
        capture_output=True,
    )
    auth_file = root / "auth"
    auth_file.write_text(f"{USER}:{PASSWORD}\n")
    port = free_port()
    config = {
        "version": 0.1,
        "log": {"level": "info", "accesslog": {"disabled": False}},
        "storage": {"filesystem": {"rootdirectory": str(root / "data")}},
        "http": {
            "addr": f"127.0.0.1:{port}",
            "secret": "kiln-test-secret",
            "tls": {"certificate": str(cert), "key": str(key)},
        },
        "auth": {"htpasswd": {"realm": "kiln-test", "path": str(htpasswd)}},
    }
    with serve_registry(root, config, port, ca_file) as log:
        yield Registry(f"127.0.0.1:{port}", ca_file, cert_dir, auth_file, log)


# -- push and pull against the real registry --------------------------------------


@needs_registry
def test_push_then_pull_into_fresh_store_gives_same_digest(
    registry: Registry, tmp_path: Path
) -> None:
    store = ImageStore(tmp_path / "a")
    digest = make_image(store, tmp_path, "web:1.0")
    with RegistryClient(registry.host, registry.options()) as client:
        result = push(store, "web:1.0", f"{registry.host}/team/web:1.0", client=client)
    assert result.digest == digest
    assert len(result.uploaded) == 2 and not result.skipped
    patches = [p for m, p in client.requests if m == "PATCH"]
    assert len(patches) >= 300_000 // CHUNK, "the layer went up in several chunks"

    fresh = ImageStore(tmp_path / "b")
    pulled = pull(fresh, f"{registry.host}/team/web:1.0", registry.options())
    assert pulled.digest == digest
    assert fresh.resolve("team/web:1.0").digest == digest
    assert fresh.verify("team/web:1.0") == []
    assert fresh.read_bytes(digest) == store.read_bytes(digest)

    by_digest = ImageStore(tmp_path / "c")
    pinned = pull(by_digest, f"{registry.host}/team/web@{digest}", registry.options())
    assert pinned.digest == digest
    assert pinned.local_ref == f"team/web:sha256-{digest[7:23]}"


@needs_registry
def test_second_push_skips_every_blob_and_mount_copies_none(
    registry: Registry, tmp_path: Path
) -> None:
    store = ImageStore(tmp_path / "s")
    make_image(store, tmp_path, "api:1")
    push(store, "api:1", f"{registry.host}/team/api:1", registry.options())
    with RegistryClient(registry.host, registry.options()) as client:
        again = push(store, "api:1", f"{registry.host}/team/api:1", client=client)
    assert len(again.skipped) == 2 and not again.uploaded
    methods = [m for m, _ in client.requests]
    assert "PATCH" not in methods and "POST" not in methods
    heads = {path for m, path in client.requests if m == "HEAD"}
    assert heads == {f"/v2/team/api/blobs/{d}" for d in again.skipped}

    with RegistryClient(registry.host, registry.options()) as client:
        mounted = push(
            store, "api:1", f"{registry.host}/other/api:1", client=client, mount_from="team/api"
        )
    assert len(mounted.mounted) == 2 and not mounted.uploaded
    assert "PATCH" not in [m for m, _ in client.requests]
    fresh = ImageStore(tmp_path / "f")
    assert pull(fresh, f"{registry.host}/other/api:1", registry.options()).digest == again.digest


class BreakingProxy:
    """Plain HTTP on loopback in front of the real registry; cuts chosen PATCHes off.

    ``break_after`` PATCH numbers reach the registry but get no answer (the
    connection closes); ``break_before`` ones never reach it.
    """

    def __init__(
        self,
        registry: Registry,
        break_after: set[int],
        break_before: set[int],
        body_limit: int | None = None,
    ) -> None:
        import httpx

        self.body_limit = body_limit
        self.upstream = httpx.Client(
            base_url=f"https://{registry.host}",
            verify=ssl.create_default_context(cafile=str(registry.ca_file)),
            trust_env=False,
        )
        self.patches = 0
        self.cut = 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_: Any) -> None:
                return

            def do_GET(self) -> None:
                outer.forward(self)

            do_HEAD = do_POST = do_PUT = do_PATCH = do_GET

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        self.break_after, self.break_before = break_after, break_before
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.upstream.close()

    def forward(self, h: http.server.BaseHTTPRequestHandler) -> None:
        body = h.rfile.read(int(h.headers.get("Content-Length") or 0))
        if self.body_limit is not None and len(body) > self.body_limit:
            # What nginx in front of a registry does with client_max_body_size.
            refusal = b'{"errors":[{"code":"SIZE_INVALID","message":"request body too large"}]}'
            h.send_response(413)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(refusal)))
            h.end_headers()
            h.wfile.write(refusal)
            return
        if h.command == "PATCH":
            self.patches += 1
            if self.patches in self.break_before:
                self.cut += 1
                h.close_connection = True
                return
        skip = {"host", "connection", "content-length", "accept-encoding"}
        headers = {k: v for k, v in h.headers.items() if k.lower() not in skip}
        headers.update({"X-Forwarded-Proto": "http", "X-Forwarded-Host": self.host})
        answer = self.upstream.request(h.command, h.path, headers=headers, content=body)
        if h.command == "PATCH" and self.patches in self.break_after:
            self.cut += 1
            h.close_connection = True
            return
        h.send_response(answer.status_code)
        for key, value in answer.headers.items():
            if key.lower() not in {"content-length", "transfer-encoding", "connection"}:
                h.send_header(key, value)
        h.send_header("Content-Length", str(len(answer.content)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(answer.content)


@needs_registry
def test_an_image_too_big_for_the_registry_is_one_clear_error_and_no_manifest(
    registry: Registry, tmp_path: Path
) -> None:
    store = ImageStore(tmp_path / "s")
    make_image(store, tmp_path, "big:1", payload_bytes=3 * CHUNK)
    proxy = BreakingProxy(registry, set(), set(), body_limit=CHUNK // 2)
    try:
        options = RegistryOptions(plain_http=True, auth_file=registry.auth_file, chunk_bytes=CHUNK)
        with (
            RegistryClient(proxy.host, options) as client,
            pytest.raises(KilnError) as refused,
        ):
            push(store, "big:1", f"{proxy.host}/team/big:1", client=client)
    finally:
        proxy.close()
    message = str(refused.value)
    assert "too large (413)" in message and "request body too large" in message, message
    assert "\n" not in message
    with RegistryClient(registry.host, registry.options()) as client:
        answer = client.send("HEAD", "/v2/team/big/manifests/1", scope="repository:team/big:pull")
        assert answer.status_code == 404  # nothing half-pushed is tagged


@needs_registry
def test_chunked_upload_resumes_after_interrupted_patch(registry: Registry, tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "s")
    digest = make_image(store, tmp_path, "resume:1")
    proxy = BreakingProxy(registry, break_after={2}, break_before={4})
    try:
        options = RegistryOptions(plain_http=True, auth_file=registry.auth_file, chunk_bytes=CHUNK)
        with RegistryClient(proxy.host, options) as client:
            result = push(store, "resume:1", f"{proxy.host}/team/resume:1", client=client)
    finally:
        proxy.close()
    assert proxy.cut == 2 and result.digest == digest
    statuses = [p for m, p in client.requests if m == "GET" and "/blobs/uploads/" in p]
    assert len(statuses) == 2, "asked the upload's status once per broken PATCH"
    # PATCH 2 reached the registry unanswered: distribution drops that upload, so it
    # starts again; PATCH 4 never arrived: the upload goes on from the reported offset.
    assert (result.restarted, result.resumed) == (1, 1)
    fresh = ImageStore(tmp_path / "f")
    pulled = pull(fresh, f"{registry.host}/team/resume:1", registry.options())
    assert pulled.digest == digest and fresh.verify("team/resume:1") == []


@needs_registry
def test_skopeo_reads_what_kiln_pushed(registry: Registry, tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "s")
    digest = make_image(store, tmp_path, "sk:1")
    push(store, "sk:1", f"{registry.host}/team/sk:1", registry.options())
    creds = f"{USER}:{PASSWORD}"
    inspect = subprocess.run(
        [
            *("skopeo", "inspect", "--cert-dir", str(registry.cert_dir), "--creds", creds),
            f"docker://{registry.host}/team/sk:1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert inspect.returncode == 0, inspect.stderr
    assert json.loads(inspect.stdout)["Digest"] == digest
    insecure = subprocess.run(
        [
            *("skopeo", "inspect", "--tls-verify=false", "--creds", creds),
            f"docker://{registry.host}/team/sk:1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert insecure.returncode == 0 and json.loads(insecure.stdout)["Digest"] == digest
    out = tmp_path / "oci"
    copy = subprocess.run(
        [
            *("skopeo", "--insecure-policy", "copy", "--src-cert-dir", str(registry.cert_dir)),
            *("--src-creds", creds, f"docker://{registry.host}/team/sk:1", f"oci:{out}:sk"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert copy.returncode == 0, copy.stderr
    index = json.loads((out / "index.json").read_text())
    assert index["manifests"][0]["digest"] == digest


@needs_registry
def test_cli_push_pull_and_wrong_password(
    registry: Registry, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = ImageStore.default()
    digest = make_image(store, tmp_path, "cli:1")
    common = ["--ca", str(registry.ca_file), "--auth-file", str(registry.auth_file)]
    assert kiln_run(["push", "cli:1", f"{registry.host}/team/cli:1", *common]) == 0
    assert f"{digest}: 2 uploaded" in capsys.readouterr().out
    store.remove("cli:1")
    assert kiln_run(["pull", f"{registry.host}/team/cli:1", *common]) == 0
    assert ImageStore.default().resolve("team/cli:1").digest == digest
    capsys.readouterr()

    docker_config = tmp_path / "docker" / "config.json"
    docker_config.parent.mkdir()
    bad = base64.b64encode(f"{USER}:wrong".encode()).decode()
    docker_config.write_text(json.dumps({"auths": {registry.host: {"auth": bad}}}))
    code = kiln_run(
        [
            *("pull", f"{registry.host}/team/cli:1", "--ca", str(registry.ca_file)),
            *("--auth-file", str(docker_config)),
        ]
    )
    err = capsys.readouterr().err
    assert code == 1
    assert err == f"error: unauthorized at {registry.host} (credentials from {docker_config})\n"


@needs_registry
def test_wrong_ca_is_a_clear_tls_error(registry: Registry, tmp_path: Path) -> None:
    other_ca, _, _ = make_ca(tmp_path, "someone-else")
    store = ImageStore(tmp_path / "s")
    options = RegistryOptions(ca_file=other_ca, auth_file=registry.auth_file)
    with pytest.raises(KilnError) as caught:
        pull(store, f"{registry.host}/team/web:1.0", options)
    assert str(caught.value) == (
        f"TLS to {registry.host} failed: certificate not trusted (--ca {other_ca})"
    )
    with pytest.raises(KilnError, match=r"TLS to .* failed: certificate not trusted"):
        pull(store, f"{registry.host}/team/web:1.0", RegistryOptions(auth_file=registry.auth_file))


def test_plain_http_refused_for_non_loopback_host(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "s")
    for host in ("registry.example.com:5000", "10.1.2.3", "[2001:db8::1]:5000"):
        with pytest.raises(KilnError, match="only allowed for a registry on loopback"):
            pull(store, f"{host}/x:1", RegistryOptions(plain_http=True))
    RegistryClient("[::1]:5000", RegistryOptions(plain_http=True)).close()


def test_parse_ref_and_credentials(tmp_path: Path) -> None:
    ref = parse_ref("localhost:5000/team/web:1.0")
    assert (ref.host, ref.repository, ref.tag, ref.reference) == (
        "localhost:5000",
        "team/web",
        "1.0",
        "1.0",
    )
    assert parse_ref("registry:example.com/web").reference == "latest"
    pinned = parse_ref("h.io/a/b@sha256:" + "a" * 64)
    assert pinned.digest == "sha256:" + "a" * 64 and pinned.tag is None
    for bad in ("web:1.0", "h.io/", "h.io/Web", "h.io/web@sha256:12", "h.io/web:bad tag"):
        with pytest.raises(KilnError, match="bad registry reference"):
            parse_ref(bad)
    config = tmp_path / "config.json"
    auth = base64.b64encode(b"u:p:with:colons").decode()
    config.write_text(json.dumps({"auths": {"https://h.io": {"auth": auth}}}))
    creds = load_credentials("h.io", config)
    assert creds is not None and (creds.username, creds.password) == ("u", "p:with:colons")
    with pytest.raises(KilnError, match=r"has no entry for other\.io"):
        load_credentials("other.io", config)
    config.write_text(json.dumps({"auths": {"h.io": {"auth": "%%%"}}}))
    with pytest.raises(KilnError, match="is not base64"):
        load_credentials("h.io", config)


# -- a hostile registry -----------------------------------------------------------


@dataclass
class Served:
    """What the hostile registry serves for one repository."""

    manifest: bytes
    blobs: dict[str, bytes]
    behaviour: str = "honest"


class HostileRegistry:
    """A plain-HTTP registry on loopback that lies in the way ``behaviour`` says."""

    def __init__(self) -> None:
        self.repos: dict[str, Served] = {}
        self.token = "tok-" + os.urandom(8).hex()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *_: Any) -> None:
                return

            def do_GET(self) -> None:
                outer.answer(self)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def answer(self, h: http.server.BaseHTTPRequestHandler) -> None:
        path = h.path.split("?", 1)[0]
        if path == "/token":
            expected = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
            if h.headers.get("Authorization") != expected:
                return self.send(h, 401, b"{}")
            return self.send(h, 200, json.dumps({"token": self.token}).encode())
        repo, kind, ref = self.route(path)
        served = self.repos.get(repo)
        if served is None:
            return self.send(h, 404, b'{"errors":[{"message":"unknown"}]}')
        if served.behaviour == "bearer" and h.headers.get("Authorization") != (
            f"Bearer {self.token}"
        ):
            realm = f"http://{self.host}/token"
            challenge = f'Bearer realm="{realm}",service="hostile",scope="repository:{repo}:pull"'
            return self.send(h, 401, b"{}", {"WWW-Authenticate": challenge})
        if kind == "manifests":
            return self.manifest(h, served)
        if ref not in served.blobs:  # e.g. the referrers API a pull asks for: none here
            return self.send(h, 404, b'{"errors":[{"message":"unknown"}]}')
        data = served.blobs[ref]
        if (
            served.behaviour == "bad-digest"
            and ref != json.loads(served.manifest)["config"]["digest"]
        ):
            data = bytes(b ^ 0xFF for b in data)
        if served.behaviour == "truncated" and len(data) > 1000:
            h.send_response(200)
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            h.wfile.write(data[: len(data) // 2])
            h.wfile.flush()
            h.close_connection = True
            return None
        if served.behaviour == "too-long" and len(data) > 1000:
            data = data + b"\0" * 4096
        return self.send(h, 200, data)

    def manifest(self, h: http.server.BaseHTTPRequestHandler, served: Served) -> None:
        if served.behaviour == "fail":
            return self.send(h, 500, b'{"errors":[{"message":"disk on fire"}]}')
        if served.behaviour == "huge":
            h.send_response(200)
            h.send_header("Content-Type", MEDIA_TYPE_MANIFEST)
            h.send_header("Content-Length", str(100 << 20))
            h.end_headers()
            h.wfile.write(b" " * (1 << 20))
            h.close_connection = True
            return None
        if served.behaviour == "huge-unsized":
            h.send_response(200)
            h.send_header("Content-Type", MEDIA_TYPE_MANIFEST)
            h.end_headers()
            try:
                for _ in range(100):
                    h.wfile.write(b" " * (1 << 20))
            except OSError:
                pass
            h.close_connection = True
            return None
        media = MEDIA_TYPE_MANIFEST
        if served.behaviour == "schema1":
            media = "application/vnd.docker.distribution.manifest.v1+prettyjws"
        return self.send(h, 200, served.manifest, {"Content-Type": media})

    @staticmethod
    def route(path: str) -> tuple[str, str, str]:
        parts = path.removeprefix("/v2/").split("/")
        return "/".join(parts[:-2]), parts[-2], parts[-1]

    @staticmethod
    def send(
        h: http.server.BaseHTTPRequestHandler,
        status: int,
        body: bytes,
        headers: dict[str, str] | None = None,
    ) -> None:
        h.send_response(status)
        for key, value in (headers or {}).items():
            h.send_header(key, value)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def serve_image(self, repo: str, store: ImageStore, ref: str, behaviour: str) -> str:
        digest = store.resolve(ref).digest
        manifest = store.read_bytes(digest)
        parsed = json.loads(manifest)
        blobs = {
            d["digest"]: store.read_bytes(d["digest"])
            for d in [parsed["config"], *parsed["layers"]]
        }
        self.repos[repo] = Served(manifest, blobs, behaviour)
        return digest


@pytest.fixture
def hostile(tmp_path: Path) -> Iterator[tuple[HostileRegistry, ImageStore]]:
    server = HostileRegistry()
    source = ImageStore(tmp_path / "source")
    make_image(source, tmp_path, "victim:1")
    try:
        yield server, source
    finally:
        server.close()


PLAIN = RegistryOptions(plain_http=True)


@pytest.mark.parametrize(
    ("behaviour", "message"),
    [
        ("bad-digest", r"blob sha256:.* hashes to sha256:.*; refused"),
        ("truncated", r"blob sha256:.* truncated"),
        ("too-long", r"registry sends \d+ bytes, descriptor says \d+; refused"),
        ("huge", r"manifest .* is 104857600 bytes; refused \(limit 4194304\)"),
        ("huge-unsized", r"manifest .* is larger than 4194304 bytes; refused"),
        ("fail", r"registry 127\.0\.0\.1:\d+ failed \(500\) on manifest .*: disk on fire"),
        ("schema1", r"schema1 manifest; refused"),
    ],
)
def test_hostile_registry_answers_leave_store_untouched(
    hostile: tuple[HostileRegistry, ImageStore], tmp_path: Path, behaviour: str, message: str
) -> None:
    server, source = hostile
    server.serve_image("evil/app", source, "victim:1", behaviour)
    target = ImageStore(tmp_path / "target")
    before = store_state(target)
    with pytest.raises(KilnError, match=message) as caught:
        pull(target, f"{server.host}/evil/app:1", PLAIN)
    assert "\n" not in str(caught.value)
    assert store_state(target) == before


def test_not_found_and_bearer_token_dance(
    hostile: tuple[HostileRegistry, ImageStore], tmp_path: Path
) -> None:
    server, source = hostile
    digest = server.serve_image("private/app", source, "victim:1", "bearer")
    target = ImageStore(tmp_path / "target")
    with pytest.raises(KilnError, match=r"manifest 127\.0\.0\.1:\d+/nope:1: not found at"):
        pull(target, f"{server.host}/nope:1", PLAIN)
    with pytest.raises(KilnError, match=r"unauthorized at .* \(no credentials found"):
        pull(target, f"{server.host}/private/app:1", PLAIN)
    wrong = tmp_path / "wrong"
    wrong.write_text(f"{USER}:nope\n")
    with pytest.raises(KilnError, match=f"unauthorized at .* \\(credentials from {wrong}\\)"):
        pull(
            target,
            f"{server.host}/private/app:1",
            RegistryOptions(plain_http=True, auth_file=wrong),
        )
    right = tmp_path / "right"
    right.write_text(f"{USER}:{PASSWORD}\n")
    result = pull(
        target, f"{server.host}/private/app:1", RegistryOptions(plain_http=True, auth_file=right)
    )
    assert result.digest == digest and target.verify("private/app:1") == []


def traversal_image(store: ImageStore) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        payload = b"owned\n"
        info = tarfile.TarInfo("../../escaped.txt")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    layer_bytes = buffer.getvalue()
    layer = store.put_bytes(layer_bytes, MEDIA_TYPE_LAYER_TAR)
    diff_id = "sha256:" + hashlib.sha256(layer_bytes).hexdigest()
    config = {
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    }
    config_desc = store.put_bytes(canonical_json(config), MEDIA_TYPE_CONFIG)
    manifest = {
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_MANIFEST,
        "config": config_desc.to_json(),
        "layers": [layer.to_json()],
    }
    store.tag("evil:1", store.put_bytes(canonical_json(manifest), MEDIA_TYPE_MANIFEST))


def test_path_traversal_layer_pulled_then_refused_by_unpack(
    hostile: tuple[HostileRegistry, ImageStore],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    server, _ = hostile
    evil_source = ImageStore(tmp_path / "evil-source")
    traversal_image(evil_source)
    server.serve_image("evil/escape", evil_source, "evil:1", "honest")
    assert kiln_run(["pull", f"{server.host}/evil/escape:1", "--plain-http"]) == 0
    dest = tmp_path / "unpacked" / "root"
    code = kiln_run(["image", "unpack", "evil/escape:1", str(dest)])
    err = capsys.readouterr().err
    assert code == 1
    assert "could escape the root" in err and err.count("\n") == 1
    assert not (tmp_path / "unpacked" / "escaped.txt").exists()
    assert not (tmp_path / "escaped.txt").exists()
