"""Attacks on Kiln's registry client and the edge's agent credentials, as a stranger
would make them: a registry that sends the upload (or a blob) to another host, credential
and CA paths that are a FIFO, /dev/zero or a huge file, a manifest of endless layers, and
an edge token file swapped for something that is not a token.

Real HTTP servers on loopback; nothing of the client is mocked.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kiln.errors import KilnError
from kiln.image.digest import MEDIA_TYPE_CONFIG, MEDIA_TYPE_MANIFEST, canonical_json
from kiln.image.registry import MAX_LAYERS, RegistryClient, RegistryOptions, pull, push
from kiln.image.store import ImageStore
from kiln.traffic.edge import AgentError, read_token

USER, PASSWORD = "kiln", "s3cret-" + os.urandom(4).hex()
BASIC = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
Handler = Callable[[http.server.BaseHTTPRequestHandler, str], None]


class Server:
    """A loopback HTTP server that records every request's method, path and
    Authorization header, and answers with ``handle``."""

    def __init__(self, handle: Handler) -> None:
        self.seen: list[tuple[str, str, str | None]] = []
        outer = self

        class Request(http.server.BaseHTTPRequestHandler):
            def log_message(self, *_: Any) -> None:
                return

            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                outer.seen.append((self.command, self.path, self.headers.get("Authorization")))
                handle(self, self.command)

            do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = _any

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Request)
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def answer(
    h: http.server.BaseHTTPRequestHandler,
    status: int,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
) -> None:
    h.send_response(status)
    for key, value in (headers or {}).items():
        h.send_header(key, value)
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    if h.command != "HEAD":
        h.wfile.write(body)


def needs_basic(h: http.server.BaseHTTPRequestHandler) -> bool:
    """Answer 401 unless the request carries the right Basic credentials."""
    if h.headers.get("Authorization") == BASIC:
        return False
    answer(h, 401, b"{}", {"WWW-Authenticate": 'Basic realm="hostile"'})
    return True


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    started: list[Server] = []
    yield started
    for server in started:
        server.close()


@pytest.fixture
def auth_file(tmp_path: Path) -> Path:
    path = tmp_path / "auth"
    path.write_text(f"{USER}:{PASSWORD}\n")
    path.chmod(0o600)
    return path


def small_image(store: ImageStore, layers: list[bytes]) -> str:
    """An image whose layers are the given blobs (the client never unpacks them)."""
    descs = [store.put_bytes(data, "application/vnd.oci.image.layer.v1.tar") for data in layers]
    config = {
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {
            "type": "layers",
            "diff_ids": ["sha256:" + hashlib.sha256(d).hexdigest() for d in layers],
        },
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_MANIFEST,
        "config": store.put_bytes(canonical_json(config), MEDIA_TYPE_CONFIG).to_json(),
        "layers": [d.to_json() for d in descs],
    }
    desc = store.put_bytes(canonical_json(manifest), MEDIA_TYPE_MANIFEST)
    store.tag("app:1", desc)
    return desc.digest


def test_upload_location_on_another_host_gets_no_credentials(
    servers: list[Server], auth_file: Path, tmp_path: Path
) -> None:
    """A registry answering the upload's POST with a Location on another host (an attacker's)
    must not make Kiln send its registry password there: before the fix every PATCH and
    PUT of the upload carried ``Authorization: Basic``."""
    thief = Server(
        lambda h, method: (
            answer(h, 202, headers={"Location": h.path}) if method == "PATCH" else answer(h, 201)
        )
    )
    servers.append(thief)

    def registry(h: http.server.BaseHTTPRequestHandler, method: str) -> None:
        if needs_basic(h):
            return
        if method == "HEAD":
            return answer(h, 404)
        if method == "POST":
            return answer(h, 202, headers={"Location": f"http://{thief.host}/steal?u=1"})
        return answer(h, 201)

    hostile = Server(registry)
    servers.append(hostile)
    store = ImageStore(tmp_path / "store")
    small_image(store, [os.urandom(2000)])
    options = RegistryOptions(plain_http=True, auth_file=auth_file)
    push(store, "app:1", f"{hostile.host}/team/app:1", options)
    assert any(m == "PATCH" for m, _, _ in thief.seen), "the upload went to the Location"
    assert all(auth is None for _, _, auth in thief.seen), thief.seen
    assert any(auth == BASIC for _, _, auth in hostile.seen)


def test_blob_redirect_to_another_host_gets_no_credentials(
    servers: list[Server], auth_file: Path, tmp_path: Path
) -> None:
    """A blob answered with a redirect (as registries do to object storage) is fetched
    there without the registry's credentials, and still verified by digest."""
    source = ImageStore(tmp_path / "source")
    digest = small_image(source, [os.urandom(3000)])
    manifest = source.read_bytes(digest)
    blobs = {
        d["digest"]: source.read_bytes(d["digest"])
        for d in [json.loads(manifest)["config"], *json.loads(manifest)["layers"]]
    }

    def storage(h: http.server.BaseHTTPRequestHandler, method: str) -> None:
        answer(h, 200, blobs[h.path.rsplit("/", 1)[-1]])

    bucket = Server(storage)
    servers.append(bucket)

    def registry(h: http.server.BaseHTTPRequestHandler, method: str) -> None:
        if needs_basic(h):
            return
        if "/manifests/" in h.path:
            return answer(h, 200, manifest, {"Content-Type": MEDIA_TYPE_MANIFEST})
        name = h.path.rsplit("/", 1)[-1]
        return answer(h, 307, headers={"Location": f"http://{bucket.host}/b/{name}"})

    hostile = Server(registry)
    servers.append(hostile)
    target = ImageStore(tmp_path / "target")
    options = RegistryOptions(plain_http=True, auth_file=auth_file)
    result = pull(target, f"{hostile.host}/team/app:1", options)
    assert result.digest == digest and len(bucket.seen) == 2
    assert all(auth is None for _, _, auth in bucket.seen), bucket.seen


def test_manifest_of_endless_layers_is_refused_before_any_blob(
    servers: list[Server], tmp_path: Path
) -> None:
    """A manifest within the 4 MiB bound can still list ~25k layers: each would be one
    request and one stored blob. Refused whole, before a single blob is asked for."""
    count = 20_000
    layers = [
        {
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": "sha256:" + hashlib.sha256(str(i).encode()).hexdigest(),
            "size": 1,
        }
        for i in range(count)
    ]
    config = {"mediaType": MEDIA_TYPE_CONFIG, "digest": layers[0]["digest"], "size": 1}
    manifest = json.dumps(
        {"schemaVersion": 2, "mediaType": MEDIA_TYPE_MANIFEST, "config": config, "layers": layers}
    ).encode()
    assert len(manifest) < 4 << 20

    def registry(h: http.server.BaseHTTPRequestHandler, method: str) -> None:
        if "/manifests/" in h.path:
            return answer(h, 200, manifest, {"Content-Type": MEDIA_TYPE_MANIFEST})
        return answer(h, 200, b"x")

    hostile = Server(registry)
    servers.append(hostile)
    target = ImageStore(tmp_path / "target")
    started = time.monotonic()
    with pytest.raises(KilnError, match=f"has {count} layers; refused \\(limit {MAX_LAYERS}\\)"):
        pull(target, f"{hostile.host}/team/app:1", RegistryOptions(plain_http=True))
    assert time.monotonic() - started < 10
    assert not any("/blobs/" in path for _, path, _ in hostile.seen)
    assert not list(target.tmp_dir.iterdir())


def test_manifest_list_of_ten_thousand_foreign_platforms_is_one_clear_line(
    servers: list[Server], tmp_path: Path
) -> None:
    entries = [
        {
            "mediaType": MEDIA_TYPE_MANIFEST,
            "digest": "sha256:" + hashlib.sha256(str(i).encode()).hexdigest(),
            "size": 10,
            "platform": {"os": "plan9", "architecture": f"arch{i}"},
        }
        for i in range(10_000)
    ]
    index = json.dumps({"schemaVersion": 2, "manifests": entries}).encode()

    def registry(h: http.server.BaseHTTPRequestHandler, method: str) -> None:
        answer(h, 200, index, {"Content-Type": "application/vnd.oci.image.index.v1+json"})

    hostile = Server(registry)
    servers.append(hostile)
    with pytest.raises(KilnError, match=r"has no image for linux/") as caught:
        pull(
            ImageStore(tmp_path / "t"),
            f"{hostile.host}/team/app:1",
            RegistryOptions(plain_http=True),
        )
    assert "\n" not in str(caught.value)
    assert len(hostile.seen) == 1


def _within(seconds: float, call: Callable[[], object]) -> BaseException | None:
    """Run ``call`` in a thread; fail the test (not hang it) if it does not return."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            call()
            outcome.append(None)
        except BaseException as e:  # handed back to the test
            outcome.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert outcome, f"still blocked after {seconds}s"
    return outcome[0]


@pytest.fixture
def fifo(tmp_path: Path) -> Path:
    path = tmp_path / "fifo"
    os.mkfifo(path)
    return path


@pytest.fixture
def huge(tmp_path: Path) -> Path:
    """A 2 GiB sparse file: reading it whole would take 2 GiB of memory."""
    path = tmp_path / "huge"
    with path.open("wb") as file:
        file.truncate(2 << 30)
    return path


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "huge", "directory"])
@pytest.mark.parametrize("option", ["auth_file", "ca_file"])
def test_credential_and_ca_paths_that_are_not_small_files_fail_at_once(
    request: pytest.FixtureRequest, tmp_path: Path, kind: str, option: str
) -> None:
    """Before the fix a FIFO blocked the client forever (no writer ever comes) and
    /dev/zero or a 2 GiB file was read whole into memory."""
    path = {
        "fifo": lambda: request.getfixturevalue("fifo"),
        "dev-zero": lambda: Path("/dev/zero"),
        "huge": lambda: request.getfixturevalue("huge"),
        "directory": lambda: tmp_path,
    }[kind]()
    options = RegistryOptions(**{option: path})  # type: ignore[arg-type]
    error = _within(10, lambda: RegistryClient("reg.example:5000", options))
    assert isinstance(error, KilnError), error
    assert str(path) in str(error) and "\n" not in str(error)


def test_a_real_ca_file_and_auth_file_still_load(tmp_path: Path, auth_file: Path) -> None:
    from tls_certs import make_ca

    ca = make_ca(tmp_path, "registry-ca")
    with RegistryClient("reg.example:5000", RegistryOptions(ca_file=ca[0], auth_file=auth_file)):
        pass


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "huge", "shadow-link"])
def test_edge_token_file_that_is_not_a_token_is_refused_at_once(
    request: pytest.FixtureRequest, tmp_path: Path, kind: str
) -> None:
    """The edge re-reads its token before every poll: a FIFO must not hang the watch, a
    huge file must not be read whole, and a symlink to a secret file must not put the
    file's content in the log line."""
    if kind == "shadow-link":
        secret = tmp_path / "shadow"
        secret.write_text("root:$y$j9T$notarealhash:19000:0:99999:7:::\n")
        path = tmp_path / "token"
        path.symlink_to(secret)
    else:
        path = {
            "fifo": lambda: request.getfixturevalue("fifo"),
            "dev-zero": lambda: Path("/dev/zero"),
            "huge": lambda: request.getfixturevalue("huge"),
        }[kind]()
    error = _within(10, lambda: read_token(path))
    assert isinstance(error, AgentError) and error.kind == "token", error
    assert "notarealhash" not in str(error) and "\n" not in str(error)


def test_edge_token_file_with_a_token_still_reads(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("kiln_" + "A" * 43 + "\n")
    assert read_token(path) == "kiln_" + "A" * 43
