"""The callback hot path and its hand-overs, on both event loops, through a real proxy."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import importlib.util
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from traffic_harness import HTTPBackend, ProxyProcess, free_port, route, wait_for

from kiln.traffic import Backend

LOOPS = [
    pytest.param(
        "uvloop",
        marks=pytest.mark.skipif(
            importlib.util.find_spec("uvloop") is None, reason="uvloop is not installed"
        ),
    ),
    "asyncio",
]


@pytest.fixture(params=LOOPS)
def loop_proxy(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[ProxyProcess]:
    monkeypatch.setenv("KILN_HOME", str(tmp_path / "home"))
    p = ProxyProcess(
        tmp_path / "proxy.sock",
        tmp_path / "proxy-state.json",
        tmp_path / "proxy.log",
        loop=request.param,
    ).start()
    yield p
    p.stop()


class RawBackend:
    """A socket server whose handler gets each accepted connection, for shapes
    the stdlib server will not produce."""

    def __init__(self, handle: Callable[[socket.socket], None]) -> None:
        self.handle = handle
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            self.handle(conn)

    def spec(self, name: str) -> Backend:
        return Backend(name, f"127.0.0.1:{self.port}")

    def close(self) -> None:
        self.sock.close()


def read_head(conn: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        piece = conn.recv(65536)
        if not piece:
            return b""
        data += piece
    return data


def recv_all(s: socket.socket) -> bytes:
    out = bytearray()
    while piece := s.recv(65536):
        out += piece
    return bytes(out)


def test_pipelined_requests_are_answered_in_order(
    loop_proxy: ProxyProcess, backends: list[HTTPBackend]
) -> None:
    a, b, _ = backends
    port = free_port()
    with loop_proxy.client() as c:
        c.put_service(route("web", port, [a.spec(), b.spec()]))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(
            b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /two HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /three HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        out = recv_all(s)
    assert out.count(b"HTTP/1.1 200") == 3
    backend_ids = [line.split(b": ")[1] for line in out.split(b"\r\n") if b"X-Kiln-Backend" in line]
    assert backend_ids == [b"b0", b"b1", b"b0"], "smooth round robin, one response per request"
    assert a.paths["/one"] == 1 and b.paths["/two"] == 1 and a.paths["/three"] == 1


def test_body_arriving_after_the_head_and_expect_continue(
    loop_proxy: ProxyProcess, backends: list[HTTPBackend]
) -> None:
    a = backends[0]
    port = free_port()
    with loop_proxy.client() as c:
        c.put_service(route("web", port, [a.spec()]))
    body = b"0123456789" * 300
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body))
        time.sleep(0.1)
        for i in range(0, len(body), 1000):
            s.sendall(body[i : i + 1000])
            time.sleep(0.02)
        resp = http.client.HTTPResponse(s)
        resp.begin()
        assert resp.read().decode() == f"{len(body)} {hashlib.sha256(body).hexdigest()}"
        s.sendall(
            b"POST /echo HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
        )
        interim = s.recv(4096)
        assert interim.startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        s.sendall(body)
        rest = interim[len(b"HTTP/1.1 100 Continue\r\n\r\n") :] + recv_all(s)
    assert rest.startswith(b"HTTP/1.1 200")
    assert rest.endswith(f"{len(body)} {hashlib.sha256(body).hexdigest()}".encode())


def _answer_once_then_close(conn: socket.socket) -> None:
    """Keep-alive in words, but the next request on the connection gets a close:
    the pooled-connection race, every time."""
    if read_head(conn):
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nonce")
        read_head(conn)


def test_pooled_connection_closed_by_the_backend_is_retried_on_a_fresh_one(
    loop_proxy: ProxyProcess,
) -> None:
    backend = RawBackend(_answer_once_then_close)
    try:
        port = free_port()
        with loop_proxy.client() as c:
            c.put_service(route("web", port, [backend.spec("flaky")]))
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            for _ in range(15):
                conn.request("GET", "/")
                resp = conn.getresponse()
                assert (resp.status, resp.read()) == (200, b"once")
            conn.request("POST", "/", body=b"not idempotent, still safe to retry")
            resp = conn.getresponse()
            assert (resp.status, resp.read()) == (200, b"once")
            conn.close()
            stats = c.stats()["web"]["backends"]["flaky"]
        assert stats["responses"]["2xx"] == 16
        assert stats["errors"]["reset"] == 15, "each pooled attempt was cut, then retried"
        assert backend.accepted == 16
    finally:
        backend.close()


def _until_close(conn: socket.socket) -> None:
    if read_head(conn):
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n")
        for part in (b"no ", b"length ", b"given"):
            conn.sendall(part)
            time.sleep(0.02)


def test_response_until_close_is_relayed_and_closes_the_client(loop_proxy: ProxyProcess) -> None:
    backend = RawBackend(_until_close)
    try:
        port = free_port()
        with loop_proxy.client() as c:
            c.put_service(route("web", port, [backend.spec("old")]))
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                out = recv_all(s)
            head, _, body = out.partition(b"\r\n\r\n")
            assert b"Connection: close" in head and b"X-Kiln-Backend: old" in head
            assert body == b"no length given"
            wait_for(lambda: c.stats()["web"]["backends"]["old"]["active"] == 0)
    finally:
        backend.close()


@pytest.mark.parametrize("stall", [0.0, 0.5])
def test_client_gone_mid_response_is_counted_and_the_proxy_keeps_serving(
    loop_proxy: ProxyProcess, backends: list[HTTPBackend], stall: float
) -> None:
    a = backends[0]
    port = free_port()
    with loop_proxy.client() as c:
        c.put_service(route("web", port, [a.spec()]))
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # pools a connection
            first = b""
            while not first.endswith(b"\r\n\r\nb0"):
                first += s.recv(65536)
            s.sendall(b"GET /big?n=%d HTTP/1.1\r\nHost: x\r\n\r\n" % (64 * 1024 * 1024))
            assert s.recv(65536).startswith(b"HTTP/1.1 200")
            time.sleep(stall)  # long enough for the proxy to pause the backend behind us
        wait_for(lambda: c.stats()["web"]["backends"]["b0"]["active"] == 0, timeout=10)
        stats = c.stats()["web"]["backends"]["b0"]
        assert stats["errors"]["reset"] == 1 and stats["responses"]["2xx"] == 2
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/")
    assert conn.getresponse().read() == b"b0"
    conn.close()


def test_slow_reader_gets_every_byte(loop_proxy: ProxyProcess, backends: list[HTTPBackend]) -> None:
    a = backends[0]
    port = free_port()
    with loop_proxy.client() as c:
        c.put_service(route("web", port, [a.spec()]))
    size = 6 * 1024 * 1024
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        s.sendall(b"GET /big?n=%d HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % size)
        time.sleep(0.5)  # the proxy must hold back, not fail, while nobody reads
        out = recv_all(s)
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and len(body) == size
    assert body[:512] == bytes(range(256)) * 2
