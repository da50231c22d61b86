"""Real backends and Kiln's real data plane (HAProxy) for the traffic tests."""

from __future__ import annotations

import hashlib
import http.client
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from kiln.traffic import Backend, Route
from kiln.traffic.haproxy import HAProxyRouter, RouterSettings


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
        url = urlsplit(self.path)
        if url.path == "/slow":
            time.sleep(float(parse_qs(url.query).get("t", ["1"])[0]))
        digest = hashlib.sha256(body).hexdigest()
        self._send(200, f"{len(body)} {digest}".encode())


class TestBackendServer(ThreadingHTTPServer):
    daemon_threads = True
    backend: HTTPBackend

    def handle_error(self, request: object, client_address: object) -> None:
        # A proxy that cuts a connection (a drain, a killed worker) is expected here.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)  # type: ignore[arg-type]


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


@pytest.fixture
def router(tmp_path: Path) -> Iterator[HAProxyRouter]:
    """Kiln's data plane for one test: HAProxy on a private home, stopped after."""
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    r = HAProxyRouter(home, RouterSettings(bind="127.0.0.1"))
    r.start()
    yield r
    r.stop()
    assert not [p for p in Path("/proc").glob("[0-9]*") if _names(p, str(home))], "haproxy left"
    assert not r.run_dir.parent.exists(), f"{r.run_dir.parent} left behind"


def _names(proc: Path, mark: str) -> bool:
    try:
        return mark in (proc / "cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


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


# -- clients -----------------------------------------------------------------


def get(
    port: int,
    path: str = "/",
    method: str = "GET",
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 10,
) -> tuple[int, bytes, http.client.HTTPResponse]:
    """One request on a fresh connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read(), resp
    finally:
        conn.close()


def raw_exchange(port: int, data: bytes, timeout: float = 5) -> bytes:
    """Send ``data`` as is and read until the peer closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        out = bytearray()
        while True:
            try:
                piece = s.recv(65536)
            except ConnectionResetError:
                return bytes(out)
            if not piece:
                return bytes(out)
            out += piece


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


class Load:
    """Traffic for a whole test: ``clients`` keep-alive connections doing GETs back to
    back, and ``connectors`` threads that open a new connection for every request.

    ``refused`` counts connections the kernel refused (ECONNREFUSED); every other
    failure (a reset, an early close, a status other than 200) is in ``failures``.
    """

    def __init__(
        self, port: int, clients: int = 4, connectors: int = 0, path: str = "/", timeout: float = 10
    ) -> None:
        self.port = port
        self.path = path
        self.timeout = timeout
        self.ok = 0
        self.failures: list[str] = []
        self.refused = 0
        self.bodies: Counter[bytes] = Counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._client, name=f"load-client-{i}", daemon=True)
            for i in range(clients)
        ] + [
            threading.Thread(target=self._connector, name=f"load-connector-{i}", daemon=True)
            for i in range(connectors)
        ]

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(self.timeout + 5)
        assert not any(t.is_alive() for t in self._threads), "a load thread is stuck"

    def _done(self, status: int, body: bytes) -> None:
        with self._lock:
            if status == 200:
                self.ok += 1
                self.bodies[body] += 1
            else:
                self.failures.append(f"status {status}: {body[:80]!r}")

    def _failed(self, e: BaseException) -> None:
        with self._lock:
            if isinstance(e, ConnectionRefusedError):
                self.refused += 1
            else:
                self.failures.append(repr(e))

    def _client(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
        while not self._stop.is_set():
            try:
                conn.request("GET", self.path)
                resp = conn.getresponse()
                self._done(resp.status, resp.read())
            except (OSError, http.client.HTTPException) as e:
                self._failed(e)
                conn.close()
                time.sleep(0.001)
        conn.close()

    def _connector(self) -> None:
        request = f"GET {self.path} HTTP/1.1\r\nHost: load\r\nConnection: close\r\n\r\n".encode()
        while not self._stop.is_set():
            try:
                out = raw_exchange(self.port, request, self.timeout)
            except OSError as e:
                self._failed(e)
                time.sleep(0.001)
                continue
            if not out:
                self._failed(ConnectionResetError("closed without a response"))
                continue
            head, _, body = out.partition(b"\r\n\r\n")
            status = int(head.split(b" ")[1]) if head.startswith(b"HTTP/1.1 ") else 0
            self._done(status, body)

    def http_errors(self) -> list[str]:
        """Failures that were answers (a 502, a 503...), not broken connections."""
        with self._lock:
            return [f for f in self.failures if f.startswith("status ")]

    def wait_ok(self, more: int, timeout: float = 10) -> None:
        """Until ``more`` requests have succeeded from now on."""
        target = self.ok + more
        wait_for(lambda: self.ok >= target, timeout)


# -- backends that misbehave -------------------------------------------------


class TCPServer:
    """A tiny threaded TCP server: ``echo`` sends back what it reads; ``hangup`` reads
    one HTTP request head, counts it and closes without answering."""

    def __init__(self, mode: str = "echo") -> None:
        self.mode = mode
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.settimeout(0.1)
        self.port = int(self.sock.getsockname()[1])
        self.connections = 0
        self.requests: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> TCPServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            target = self._echo if self.mode == "echo" else self._hangup
            threading.Thread(target=target, args=(conn,), daemon=True).start()

    def _echo(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        with conn:
            try:
                while data := conn.recv(65536):
                    conn.sendall(data)
            except OSError:
                pass

    def _hangup(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        with conn:
            head = b""
            try:
                while b"\r\n\r\n" not in head:
                    piece = conn.recv(65536)
                    if not piece:
                        break
                    head += piece
            except OSError:
                pass
            if head:
                self.requests.append(head.split(b"\r\n", 1)[0])


BACKEND_SCRIPT = textwrap.dedent(
    """
    import sys
    from http.server import ThreadingHTTPServer, BaseHTTPRequestHandler
    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True
        def do_GET(self):
            body = sys.argv[2].encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        def log_message(self, *a):
            pass
    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
    """
)


@contextmanager
def backend_process(name: str) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """An HTTP backend in its own process, so that a test can SIGKILL it."""
    port = free_port()
    proc = subprocess.Popen([PYTHON, "-c", BACKEND_SCRIPT, str(port), name], env=ENV)
    try:
        wait_for(lambda: proc.poll() is not None or not refused(port), 10)
        assert proc.poll() is None, f"backend {name} exited"
        yield proc, port
    finally:
        proc.kill()
        proc.wait(10)


def children(pid: int) -> list[int]:
    """The pids whose parent is ``pid`` (HAProxy's workers under its master)."""
    out = []
    for p in Path("/proc").glob("[0-9]*"):
        try:
            stat = (p / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(stat[1]) == pid and stat[0] != "Z":
            out.append(int(p.name))
    return out
