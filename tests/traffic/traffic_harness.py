"""Real backends and a real proxy process for the traffic tests."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from kiln.traffic import Backend, ProxyClient, Route, proxy_command


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def read_chunked(rfile: object) -> bytes:
    out = bytearray()
    while True:
        size = int(rfile.readline().split(b";")[0], 16)  # type: ignore[attr-defined]
        if size == 0:
            while rfile.readline() not in (b"\r\n", b""):  # type: ignore[attr-defined]
                pass
            return bytes(out)
        out += rfile.read(size)  # type: ignore[attr-defined]
        rfile.readline()  # type: ignore[attr-defined]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server: TestBackendServer

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if status not in (204, 304):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and status not in (204, 304):
            self.wfile.write(body)

    def _record(self) -> None:
        b = self.server.backend
        with b.lock:
            b.requests += 1
            b.paths[self.path] += 1
            b.peers.add(self.client_address)
            b.last_headers = dict(self.headers)

    def do_HEAD(self) -> None:
        self._record()
        self._send(200, self.server.backend.name.encode())

    def do_GET(self) -> None:
        self._record()
        url = urlsplit(self.path)
        q = {k: v[0] for k, v in parse_qs(url.query).items()}
        name = self.server.backend.name
        if url.path == "/slow":
            time.sleep(float(q.get("t", "1")))
            self._send(200, name.encode())
        elif url.path == "/big":
            n = int(q["n"])
            self.send_response(200)
            self.send_header("Content-Length", str(n))
            self.end_headers()
            block = bytes(range(256)) * 256
            left = n
            while left:
                piece = block[: min(left, len(block))]
                self.wfile.write(piece)
                left -= len(piece)
        elif url.path == "/chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for part in (b"alpha-", b"beta-", name.encode()):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\n\r\n")
        elif url.path == "/nocontent":
            self._send(204, b"")
        elif url.path == "/headers":
            self._send(200, repr(sorted(self.headers.items())).encode())
        else:
            self._send(200, name.encode())

    def do_POST(self) -> None:
        self._record()
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = read_chunked(self.rfile)
        else:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        digest = hashlib.sha256(body).hexdigest()
        self._send(200, f"{len(body)} {digest}".encode())


class TestBackendServer(ThreadingHTTPServer):
    daemon_threads = True
    backend: HTTPBackend


@dataclass
class HTTPBackend:
    """A stdlib HTTP/1.1 server in a thread that counts what reaches it."""

    name: str
    port: int = 0
    requests: int = 0
    paths: Counter[str] = field(default_factory=Counter)
    peers: set[tuple[str, int]] = field(default_factory=set)
    last_headers: dict[str, str] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: TestBackendServer | None = None

    def start(self) -> HTTPBackend:
        self.server = TestBackendServer(("127.0.0.1", self.port), _Handler)
        self.server.backend = self
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def spec(self, weight: int = 100) -> Backend:
        return Backend(id=self.name, address=self.address, weight=weight)


@pytest.fixture
def backends() -> Iterator[list[HTTPBackend]]:
    started = [HTTPBackend(name=f"b{i}").start() for i in range(3)]
    yield started
    for b in started:
        b.stop()


@dataclass
class ProxyProcess:
    control: Path
    state: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    # KILN_TEST_PROXY_LOOP=asyncio runs the whole suite on the fallback loop.
    loop: str = os.environ.get("KILN_TEST_PROXY_LOOP", "auto")

    def start(self) -> ProxyProcess:
        cmd = [*proxy_command(self.control, self.state), "--host", "127.0.0.1", "--loop", self.loop]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(cmd, stderr=log, stdout=log)
        with ProxyClient(self.control) as c:
            c.wait_ready(10)
        return self

    def client(self) -> ProxyClient:
        return ProxyClient(self.control)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        rc = self.proc.returncode
        self.proc = None
        return rc


@pytest.fixture
def proxy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ProxyProcess]:
    monkeypatch.setenv("KILN_HOME", str(tmp_path / "home"))
    p = ProxyProcess(
        tmp_path / "proxy.sock", tmp_path / "proxy-state.json", tmp_path / "proxy.log"
    ).start()
    yield p
    p.stop()


def route(name: str, listen: int, specs: list[Backend], **kw: object) -> Route:
    return Route(name=name, listen=listen, backends=tuple(specs), **kw)  # type: ignore[arg-type]


def wait_for(pred: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():  # type: ignore[operator]
            return
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


PYTHON = sys.executable
ENV = dict(os.environ)
