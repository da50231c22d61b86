"""The proxy as a real process, with real backends on 127.0.0.1."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import signal
import socket
import subprocess
import textwrap
import threading
import time

import pytest
from traffic_harness import PYTHON, HTTPBackend, ProxyProcess, free_port, route, wait_for

from kiln.errors import KilnError
from kiln.traffic import Backend


def get(
    port: int, path: str = "/", method: str = "GET", timeout: float = 10
) -> tuple[int, bytes, http.client.HTTPResponse]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        return resp.status, resp.read(), resp
    finally:
        conn.close()


def raw_exchange(port: int, data: bytes, timeout: float = 5) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        out = bytearray()
        while True:
            piece = s.recv(65536)
            if not piece:
                return bytes(out)
            out += piece


def test_routes_only_to_configured_backends_by_weight(
    proxy: ProxyProcess, backends: list[HTTPBackend]
) -> None:
    a, b, unused = backends
    port = free_port()
    with proxy.client() as c:
        c.put_service(route("web", port, [a.spec(1), b.spec(3)]))
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    seen: list[str] = []
    for _ in range(200):
        conn.request("GET", "/")
        resp = conn.getresponse()
        seen.append(resp.read().decode())
        assert resp.getheader("X-Kiln-Backend") == seen[-1]
    conn.close()
    assert unused.requests == 0
    assert seen.count("b0") == pytest.approx(50, abs=5)
    assert seen.count("b1") == pytest.approx(150, abs=5)
    with proxy.client() as c:
        stats = c.stats()["web"]["backends"]
    assert stats["b0"]["requests"] + stats["b1"]["requests"] == 200
    assert stats["b1"]["responses"]["2xx"] == seen.count("b1")
    assert stats["b0"]["latency"]["count"] == seen.count("b0")
    assert stats["b0"]["latency"]["buckets"]["+Inf"] == seen.count("b0")


def test_weight_zero_gets_nothing_and_put_is_idempotent(
    proxy: ProxyProcess, backends: list[HTTPBackend]
) -> None:
    a, b, _ = backends
    port = free_port()
    r = route("web", port, [a.spec(0), b.spec(1)])
    with proxy.client() as c:
        c.put_service(r)
        assert c._call("PUT", "/services/web", r.to_json()) == {"changed": False}
    for _ in range(10):
        assert get(port)[1] == b"b1"
    assert a.requests == 0


def test_keepalive_reuses_upstream_connections_and_adds_forwarded_headers(
    proxy: ProxyProcess, backends: list[HTTPBackend]
) -> None:
    a = backends[0]
    port = free_port()
    with proxy.client() as c:
        c.put_service(route("web", port, [a.spec()]))
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    for _ in range(30):
        conn.request("GET", "/")
        assert conn.getresponse().read() == b"b0"
    conn.request("GET", "/headers", headers={"X-Forwarded-For": "10.9.9.9"})
    echoed = conn.getresponse().read().decode()
    conn.close()
    assert len(a.peers) == 1, "one pooled upstream connection serves a sequential client"
    assert "('X-Forwarded-For', '10.9.9.9, 127.0.0.1')" in echoed
    assert "('X-Forwarded-Proto', 'http')" in echoed


def test_chunked_request_and_response(proxy: ProxyProcess, backends: list[HTTPBackend]) -> None:
    a = backends[0]
    port = free_port()
    with proxy.client() as c:
        c.put_service(route("web", port, [a.spec()]))
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    parts = [b"x" * 1000, b"y" * 70000, b"z"]
    conn.request("POST", "/echo", body=iter(parts), encode_chunked=True)
    resp = conn.getresponse()
    body = b"".join(parts)
    assert resp.read().decode() == f"{len(body)} {hashlib.sha256(body).hexdigest()}"
    conn.request("GET", "/chunked")
    resp = conn.getresponse()
    assert resp.getheader("Transfer-Encoding") == "chunked"
    assert resp.read() == b"alpha-beta-b0"
    conn.close()


def test_large_bodies_stream_both_ways(proxy: ProxyProcess, backends: list[HTTPBackend]) -> None:
    a = backends[0]
    port = free_port()
    with proxy.client() as c:
        c.put_service(route("web", port, [a.spec()]))
    size = 8 * 1024 * 1024
    payload = os.urandom(size)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", "/upload", body=payload)
    assert conn.getresponse().read().decode() == f"{size} {hashlib.sha256(payload).hexdigest()}"
    conn.request("GET", f"/big?n={size}")
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    assert len(data) == size
    assert data[:512] == bytes(range(256)) * 2


def test_head_204_and_http10_keep_framing(proxy: ProxyProcess, backends: list[HTTPBackend]) -> None:
    a = backends[0]
    port = free_port()
    with proxy.client() as c:
        c.put_service(route("web", port, [a.spec()]))
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("HEAD", "/")
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Length") == "2"
    assert resp.read() == b""
    conn.request("GET", "/nocontent")
    resp = conn.getresponse()
    assert resp.status == 204 and resp.read() == b""
    conn.request("GET", "/")
    assert conn.getresponse().read() == b"b0", "the connection is still in sync"
    conn.close()
    # An HTTP/1.0 client without keep-alive gets the body de-chunked and a close.
    out = raw_exchange(port, b"GET /chunked HTTP/1.0\r\n\r\n")
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"Connection: close" in head
    assert b"chunked" not in head.lower()
    assert body == b"alpha-beta-b0"


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GARBAGE\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
        b"GET / HTTP/2.0\r\nHost: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 70000 + b"\r\n\r\n",
    ],
)
def test_malformed_requests_get_4xx_and_the_proxy_keeps_serving(
    proxy: ProxyProcess, backends: list[HTTPBackend], request_bytes: bytes
) -> None:
    a = backends[0]
    port = free_port()
    with proxy.client() as c:
        c.put_service(route("web", port, [a.spec()]))
    out = raw_exchange(port, request_bytes)
    assert out.startswith((b"HTTP/1.1 400", b"HTTP/1.1 431")), out[:80]
    assert a.requests == 0
    assert get(port)[1] == b"b0"


def test_removed_backend_drains_in_flight_and_gets_no_new_requests(
    proxy: ProxyProcess, backends: list[HTTPBackend]
) -> None:
    a, b, _ = backends
    port = free_port()
    with proxy.client() as c:
        c.put_service(route("web", port, [a.spec(), b.spec(0)], drain_timeout=10))
        result: dict[str, object] = {}

        def slow() -> None:
            result["r"] = get(port, "/slow?t=1.5")[:2]

        t = threading.Thread(target=slow)
        t.start()
        wait_for(lambda: a.paths["/slow?t=1.5"] == 1)
        c.put_service(route("web", port, [b.spec(1)], drain_timeout=10))
        state = {x["id"]: x for x in c.services()["web"]["backends"]}
        assert state["b0"]["state"] == "draining" and state["b0"]["active"] == 1
        before = a.requests
        for _ in range(10):
            assert get(port)[1] == b"b1"
        assert a.requests == before
        t.join(10)
        assert result["r"] == (200, b"b0")
        wait_for(lambda: "b0" not in {x["id"] for x in c.services()["web"]["backends"]})


def test_drain_timeout_forcibly_closes(proxy: ProxyProcess, backends: list[HTTPBackend]) -> None:
    a, b, _ = backends
    port = free_port()
    with proxy.client() as c:
        c.put_service(route("web", port, [a.spec()], drain_timeout=0.5))
        outcome: list[object] = []

        def slow() -> None:
            try:
                outcome.append(get(port, "/slow?t=4")[0])
            except (http.client.HTTPException, OSError) as e:
                outcome.append(e)

        t = threading.Thread(target=slow)
        t.start()
        wait_for(lambda: a.paths["/slow?t=4"] == 1)
        started = time.monotonic()
        c.put_service(route("web", port, [b.spec()], drain_timeout=0.5))
        t.join(10)
        assert outcome and outcome[0] != 200, "the in-flight request was cut at drain_timeout"
        assert time.monotonic() - started < 3
        assert "b0" not in {x["id"] for x in c.services()["web"]["backends"]}


def test_no_backend_waits_then_503_and_late_backend_is_used(
    proxy: ProxyProcess, backends: list[HTTPBackend]
) -> None:
    a = backends[0]
    port = free_port()
    with proxy.client() as c:
        c.put_service(route("web", port, [], queue_timeout=0.5))
        started = time.monotonic()
        status, body, _ = get(port)
        assert status == 503 and b"no backend available" in body
        assert 0.4 < time.monotonic() - started < 3
        c.put_service(route("web", port, [], queue_timeout=5))
        result: dict[str, object] = {}
        t = threading.Thread(target=lambda: result.update(r=get(port)[:2]))
        t.start()
        time.sleep(0.5)
        c.put_service(route("web", port, [a.spec()], queue_timeout=5))
        t.join(10)
        assert result["r"] == (200, b"b0")
        assert c.stats()["web"]["unrouted"] == 1


def test_port_clash_is_409_and_old_config_keeps_serving(
    proxy: ProxyProcess, backends: list[HTTPBackend]
) -> None:
    a, b, _ = backends
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        with proxy.client() as c:
            c.put_service(route("web", port, [a.spec()]))
            with pytest.raises(KilnError, match=f"listen port {busy} is in use by another process"):
                c.put_service(route("web", busy, [b.spec()]))
            with pytest.raises(KilnError, match=f"listen port {busy} is in use"):
                c.put_service(route("api", busy, [b.spec()]))
            assert c.services()["web"]["listen"] == port
            assert "api" not in c.services()
    assert get(port)[1] == b"b0"
    with proxy.client() as c, pytest.raises(KilnError, match=r"services\.web\.protocol"):
        c._call("PUT", "/services/web", {"listen": port, "protocol": "udp"})


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


def start_backend_process(name: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    proc = subprocess.Popen([PYTHON, "-c", BACKEND_SCRIPT, str(port), name])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"backend {name} did not start")


def test_killed_backend_is_retried_elsewhere_and_counted(
    proxy: ProxyProcess, backends: list[HTTPBackend]
) -> None:
    survivor = backends[0]
    victim, vport = start_backend_process("victim")
    try:
        port = free_port()
        with proxy.client() as c:
            c.put_service(
                route("web", port, [survivor.spec(), Backend("victim", f"127.0.0.1:{vport}")])
            )
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            for _ in range(10):  # warm both pools
                conn.request("GET", "/")
                warm = conn.getresponse()
                assert warm.status == 200 and warm.read()
            victim.kill()
            victim.wait()
            bodies = []
            for _ in range(20):
                conn.request("GET", "/")
                resp = conn.getresponse()
                assert resp.status == 200
                bodies.append(resp.read())
            conn.close()
            assert set(bodies) == {b"b0"}
            errors = c.stats()["web"]["backends"]["victim"]["errors"]
            assert errors["connect"] + errors["reset"] >= 1
    finally:
        victim.kill()
        victim.wait()


def test_rolling_swap_under_load_fails_no_request(proxy: ProxyProcess) -> None:
    port = free_port()
    generation = [HTTPBackend(name=f"g0-{i}").start() for i in range(2)]
    all_backends = list(generation)
    failures: list[str] = []
    done = 0
    stop = threading.Event()
    lock = threading.Lock()

    def load() -> None:
        nonlocal done
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        while not stop.is_set():
            try:
                conn.request("GET", "/")
                resp = conn.getresponse()
                resp.read()
                if resp.status != 200:
                    failures.append(str(resp.status))
                if resp.will_close:
                    conn.close()
                with lock:
                    done += 1
            except (OSError, http.client.HTTPException) as e:
                failures.append(repr(e))
                conn.close()
        conn.close()

    with proxy.client() as c:
        c.put_service(route("web", port, [b.spec() for b in generation], drain_timeout=5))
        threads = [threading.Thread(target=load) for _ in range(4)]
        for t in threads:
            t.start()
        try:
            current = list(generation)
            for gen in range(1, 4):
                for i in range(2):
                    new = HTTPBackend(name=f"g{gen}-{i}").start()
                    all_backends.append(new)
                    old = current.pop(0)
                    c.put_service(
                        route("web", port, [b.spec() for b in [*current, new]], drain_timeout=5)
                    )
                    current.append(new)
                    wait_for(
                        lambda old=old: (
                            old.name not in {x["id"] for x in c.services()["web"]["backends"]}
                        )
                    )
                    old.stop()
                    time.sleep(0.1)
        finally:
            stop.set()
            for t in threads:
                t.join(10)
            for b in all_backends:
                b.stop()
    assert failures == []
    assert done > 100


def test_sigkill_then_restart_with_state_serves_again(
    proxy: ProxyProcess, backends: list[HTTPBackend]
) -> None:
    a = backends[0]
    port = free_port()
    with proxy.client() as c:
        c.put_service(route("web", port, [a.spec()]))
    saved = json.loads(proxy.state.read_text())
    assert saved["services"]["web"]["listen"] == port
    assert proxy.proc is not None
    proxy.proc.kill()
    proxy.proc.wait()
    proxy.proc = None
    proxy.start()
    assert get(port)[1] == b"b0"
    with proxy.client() as c:
        assert c.services()["web"]["backends"][0]["id"] == "b0"


def test_sigterm_drains_in_flight_then_exits_0(
    proxy: ProxyProcess, backends: list[HTTPBackend]
) -> None:
    a = backends[0]
    port = free_port()
    with proxy.client() as c:
        c.put_service(route("web", port, [a.spec()]))
    result: dict[str, object] = {}
    t = threading.Thread(target=lambda: result.update(r=get(port, "/slow?t=1")[:2]))
    t.start()
    wait_for(lambda: a.paths["/slow?t=1"] == 1)
    assert proxy.proc is not None
    proxy.proc.send_signal(signal.SIGTERM)
    assert proxy.proc.wait(10) == 0
    t.join(5)
    assert result["r"] == (200, b"b0")
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1)
    proxy.proc = None


def test_delete_service_closes_listener(proxy: ProxyProcess, backends: list[HTTPBackend]) -> None:
    port = free_port()
    with proxy.client() as c:
        c.put_service(route("web", port, [backends[0].spec()]))
        assert get(port)[1] == b"b0"
        c.delete_service("web")
        assert c.services() == {}
        with pytest.raises(KilnError, match="'web' is not configured"):
            c.delete_service("web")
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1)


def test_tcp_mode_echo_with_counters(proxy: ProxyProcess) -> None:
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        echo_port = srv.getsockname()[1]

        def echo() -> None:
            conn, _ = srv.accept()
            with conn:
                while data := conn.recv(65536):
                    conn.sendall(data)

        t = threading.Thread(target=echo, daemon=True)
        t.start()
        port = free_port()
        with proxy.client() as c:
            c.put_service(
                route("db", port, [Backend("e1", f"127.0.0.1:{echo_port}")], protocol="tcp")
            )
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(b"ping" * 1000)
                s.shutdown(socket.SHUT_WR)
                got = bytearray()
                while piece := s.recv(65536):
                    got += piece
            assert bytes(got) == b"ping" * 1000
            t.join(5)
            wait_for(lambda: c.stats()["db"]["backends"]["e1"]["active"] == 0)
            st = c.stats()["db"]["backends"]["e1"]
            assert st["connections"] == 1
            assert st["bytes_in"] == 4000 and st["bytes_out"] == 4000
