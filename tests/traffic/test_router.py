"""Kiln's data plane as it runs: HAProxy behind ``HAProxyRouter``, real backends on
127.0.0.1, real HTTP. Each test programs the router through its public API only
and judges what clients and backends see."""

from __future__ import annotations

import ast
import hashlib
import http.client
import io
import json
import os
import select
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable

import pytest
from traffic_harness import (
    HTTPBackend,
    Load,
    TCPServer,
    backend_process,
    children,
    free_port,
    get,
    raw_exchange,
    read_chunked,
    refused,
    route,
    wait_for,
)

from kiln.process import pid_alive
from kiln.traffic import Backend, RouteError
from kiln.traffic.haproxy import HAProxyRouter, RouterSettings
from kiln.traffic.haproxy.runtime_api import RuntimeAPI

pytestmark = pytest.mark.timeout(60)


def in_thread(fn: Callable[[], object]) -> tuple[threading.Thread, dict[str, object]]:
    """Run ``fn`` in a thread; its result (or exception) lands in the dict."""
    out: dict[str, object] = {}

    def run() -> None:
        try:
            out["result"] = fn()
        except Exception as e:
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def draining(b: HTTPBackend) -> Backend:
    return Backend(b.name, b.address, 100, "draining")


def wait_exit(router: HAProxyRouter, timeout: float = 5) -> None:
    """What a supervisor does: wait for the master's pidfd to become readable."""
    fd = router.exit_fd()
    assert fd is not None
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    assert poller.poll(int(timeout * 1000)), "the HAProxy master did not exit"


# -- routing -----------------------------------------------------------------


def test_routes_only_to_configured_backends_by_weight(
    router: HAProxyRouter, backends: list[HTTPBackend]
) -> None:
    a, b, unused = backends
    port = free_port()
    assert router.apply(route("web", port, [a.spec(64), b.spec(192)])) is True
    seen: Counter[bytes] = Counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    for _ in range(400):
        conn.request("GET", "/")
        resp = conn.getresponse()
        assert resp.status == 200
        seen[resp.read()] += 1
    conn.close()
    assert set(seen) == {b"b0", b"b1"}
    assert seen[b"b0"] == pytest.approx(100, abs=8)
    assert seen[b"b1"] == pytest.approx(300, abs=8)
    assert (a.requests, b.requests, unused.requests) == (seen[b"b0"], seen[b"b1"], 0)
    web = router.counters()["web"]
    assert web.requests == 400 and web.responses["2xx"] == 400
    assert web.backends["b0"].requests == seen[b"b0"]
    assert web.backends["b1"].responses["2xx"] == seen[b"b1"]


def test_weight_zero_gets_nothing_and_identical_apply_changes_nothing(
    router: HAProxyRouter, backends: list[HTTPBackend]
) -> None:
    a, b, _ = backends
    port = free_port()
    r = route("web", port, [a.spec(0), b.spec(100)])
    assert router.apply(r) is True
    pid = router.pid
    state = (router.home / "haproxy" / "router.json").read_bytes()
    assert router.apply(r) is False
    assert router.apply(route("web", port, [a.spec(0), b.spec(100)])) is False, "equal, not same"
    assert router.pid == pid, "no new generation"
    assert (router.home / "haproxy" / "router.json").read_bytes() == state
    assert router.routes() == {"web": r}
    for _ in range(20):
        assert get(port)[:2] == (200, b"b1")
    assert a.requests == 0 and b.requests == 20


# -- HTTP as it should pass through -----------------------------------------


def test_client_keep_alive_and_forwarded_headers(
    router: HAProxyRouter, backends: list[HTTPBackend]
) -> None:
    a = backends[0]
    port = free_port()
    router.apply(route("web", port, [a.spec()]))
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.connect()
    assert conn.sock is not None
    client_end = conn.sock.getsockname()
    for _ in range(30):
        conn.request("GET", "/")
        resp = conn.getresponse()
        assert resp.read() == b"b0" and not resp.will_close
    # A client cannot pass its own proto; it may pass a chain, and HAProxy adds the peer.
    conn.request(
        "GET", "/headers", headers={"X-Forwarded-For": "10.9.9.9", "X-Forwarded-Proto": "https"}
    )
    echoed = ast.literal_eval(conn.getresponse().read().decode())
    assert conn.sock is not None and conn.sock.getsockname() == client_end, "one connection"
    conn.close()
    headers = [(k.lower(), v) for k, v in echoed]
    assert ("x-forwarded-proto", "http") in headers
    assert ("x-forwarded-proto", "https") not in headers
    xff = [v for k, v in headers if k == "x-forwarded-for"]
    assert xff[-1] == "127.0.0.1" and "10.9.9.9" in xff
    web = router.counters()["web"]
    assert web.connections == 1 and web.requests == 31


def test_chunked_request_and_response(router: HAProxyRouter, backends: list[HTTPBackend]) -> None:
    a = backends[0]
    port = free_port()
    router.apply(route("web", port, [a.spec()]))
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    parts = [b"x" * 1000, b"y" * 70000, b"z"]
    conn.request("POST", "/echo", body=iter(parts), encode_chunked=True)
    resp = conn.getresponse()
    body = b"".join(parts)
    assert resp.read().decode() == f"{len(body)} {hashlib.sha256(body).hexdigest()}"
    sent = {k.lower(): v for k, v in a.last_headers.items()}
    assert sent.get("transfer-encoding", "").lower() == "chunked", "streamed, not buffered"
    conn.request("GET", "/chunked")
    resp = conn.getresponse()
    assert resp.getheader("Transfer-Encoding") == "chunked"
    assert resp.read() == b"alpha-beta-b0"
    conn.close()


def test_large_bodies_both_ways(router: HAProxyRouter, backends: list[HTTPBackend]) -> None:
    a = backends[0]
    port = free_port()
    router.apply(route("web", port, [a.spec()]))
    size = 20 * 1024 * 1024
    payload = os.urandom(size)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", "/upload", body=payload)
    assert conn.getresponse().read().decode() == f"{size} {hashlib.sha256(payload).hexdigest()}"
    conn.request("GET", f"/big?n={size}")
    resp = conn.getresponse()
    digest = hashlib.sha256()
    got = 0
    while piece := resp.read(1 << 20):
        digest.update(piece)
        got += len(piece)
    conn.close()
    block = bytes(range(256)) * 256
    assert got == size
    assert digest.hexdigest() == hashlib.sha256(block * (size // len(block))).hexdigest()


def test_head_204_and_http10_framing(router: HAProxyRouter, backends: list[HTTPBackend]) -> None:
    a = backends[0]
    port = free_port()
    router.apply(route("web", port, [a.spec()]))
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
    # HTTP/1.0 without keep-alive: one response, then the close.
    out = raw_exchange(port, b"GET / HTTP/1.0\r\n\r\nGET /again HTTP/1.0\r\n\r\n")
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.") and b" 200 " in head.split(b"\r\n")[0]
    assert b"content-length: 2" in head.lower() and body == b"b0"
    assert a.paths["/again"] == 0
    # A HEAD over HTTP/1.0 carries no body either.
    out = raw_exchange(port, b"HEAD / HTTP/1.0\r\n\r\n")
    assert out.endswith(b"\r\n\r\n") and b"content-length: 2" in out.lower()
    # HTTP/1.0 keep-alive, when asked for, holds for a sized response.
    keep = b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        for _ in range(2):
            s.sendall(keep)
            answer = b""
            while not answer.endswith(b"\r\n\r\nb0"):
                piece = s.recv(4096)
                assert piece, f"closed after {answer!r}"
                answer += piece
            assert b"keep-alive" in answer.lower()
    # A chunked response to an HTTP/1.0 client ends with the close, its body whole.
    # (HAProxy 2.6 keeps the chunked framing here, which RFC 9112 reserves for 1.1.)
    out = raw_exchange(port, b"GET /chunked HTTP/1.0\r\n\r\n")
    head, _, body = out.partition(b"\r\n\r\n")
    assert b" 200 " in head.split(b"\r\n")[0] and b"connection: close" in head.lower()
    if b"transfer-encoding: chunked" in head.lower():
        body = read_chunked(io.BytesIO(body))
    assert body == b"alpha-beta-b0"


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GARBAGE\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nBad Name: v\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
        b"GET /\x00 HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 70000 + b"\r\n\r\n",
    ],
    ids=["garbage", "two-lengths", "no-colon", "space-in-name", "bad-length", "nul", "huge"],
)
def test_malformed_request_gets_4xx_and_the_router_keeps_serving(
    router: HAProxyRouter, backends: list[HTTPBackend], request_bytes: bytes
) -> None:
    a = backends[0]
    port = free_port()
    router.apply(route("web", port, [a.spec()]))
    out = raw_exchange(port, request_bytes)
    assert out.startswith(b"HTTP/1.1 4"), out[:80]
    assert a.requests == 0
    assert get(port)[:2] == (200, b"b0")
    assert router.counters()["web"].responses["4xx"] == 1


# -- backend states ----------------------------------------------------------


def test_draining_backend_finishes_in_flight_and_gets_nothing_new(
    router: HAProxyRouter, backends: list[HTTPBackend]
) -> None:
    a, b, _ = backends
    port = free_port()
    router.apply(route("web", port, [a.spec()]))
    slow, out = in_thread(lambda: get(port, "/slow?t=1")[:2])
    wait_for(lambda: a.paths["/slow?t=1"] == 1)
    assert router.apply(route("web", port, [draining(a), b.spec()])) is True
    assert router.counters()["web"].backends["b0"].active == 1
    for _ in range(10):
        assert get(port)[:2] == (200, b"b1")
    assert a.requests == 1, "nothing new reached the draining backend"
    started = time.monotonic()
    assert router.drain("web", "b0", 5) == 0
    assert time.monotonic() - started < 2
    slow.join(5)
    assert out == {"result": (200, b"b0")}
    assert router.counters()["web"].backends["b0"].active == 0


def test_drain_timeout_cuts_what_is_left(
    router: HAProxyRouter, backends: list[HTTPBackend]
) -> None:
    """A POST (never replayed elsewhere) still running at the drain timeout is cut."""
    a, b, _ = backends
    port = free_port()
    router.apply(route("web", port, [a.spec()]))
    slow, out = in_thread(lambda: get(port, "/slow?t=5", "POST", body=b"order")[:2])
    wait_for(lambda: a.paths["/slow?t=5"] == 1)
    router.apply(route("web", port, [draining(a), b.spec()]))
    started = time.monotonic()
    assert router.drain("web", "b0", 0.3) == 1
    slow.join(3)
    assert not slow.is_alive(), "the cut request ended with the drain, not with the backend"
    assert time.monotonic() - started < 2
    result = out.get("result")
    assert "error" in out or (isinstance(result, tuple) and result[0] >= 500), out
    assert b.paths["/slow?t=5"] == 0, "a POST is not replayed"
    router.apply(route("web", port, [b.spec()]))
    assert list(router.routes()["web"].backends) == [b.spec()]
    assert get(port)[:2] == (200, b"b1")


def test_remove_readd_and_maintenance(router: HAProxyRouter, backends: list[HTTPBackend]) -> None:
    a, b, _ = backends
    port = free_port()
    router.apply(route("web", port, [a.spec(), b.spec()]))
    assert {get(port)[1] for _ in range(4)} == {b"b0", b"b1"}
    pid = router.pid
    assert router.apply(route("web", port, [b.spec()])) is True
    before = a.requests
    assert {get(port)[1] for _ in range(10)} == {b"b1"}
    assert a.requests == before
    assert router.apply(route("web", port, [a.spec(), b.spec()])) is True
    assert {get(port)[1] for _ in range(4)} == {b"b0", b"b1"}, "re-added"
    router.apply(route("web", port, [Backend("b0", a.address, 100, "maintenance"), b.spec()]))
    before = a.requests
    assert {get(port)[1] for _ in range(10)} == {b"b1"}
    assert a.requests == before
    assert router.pid == pid, "backend changes go through the runtime API, no reload"


def test_draining_and_maintenance_survive_a_new_generation(
    router: HAProxyRouter, backends: list[HTTPBackend]
) -> None:
    """A configuration file has no drain state: a new generation (a new service, a
    restart) must not make a draining backend ready again."""
    a, b, c = backends
    port = free_port()
    router.apply(route("web", port, [a.spec(), b.spec(), c.spec()]))
    wanted = route(
        "web", port, [draining(a), b.spec(), Backend("b2", c.address, 100, "maintenance")]
    )
    router.apply(wanted)
    pid = router.pid
    router.apply(route("api", free_port(), [b.spec()]))
    assert router.pid != pid
    assert {get(port)[1] for _ in range(10)} == {b"b1"}
    router.restart("test: a new generation")
    assert {get(port)[1] for _ in range(10)} == {b"b1"}
    assert a.requests == 0 and c.requests == 0
    assert router.routes()["web"] == wanted


def test_no_ready_backend_is_a_503_naming_the_service(
    router: HAProxyRouter, backends: list[HTTPBackend]
) -> None:
    a = backends[0]
    port = free_port()
    router.apply(route("web", port, [], queue_timeout=0.5))
    status, body, _ = get(port)
    assert status == 503 and b"kiln service web " in body
    router.apply(route("web", port, [Backend("b0", a.address, 100, "maintenance")]))
    status, body, _ = get(port)
    assert status == 503 and b"kiln service web " in body
    assert a.requests == 0
    router.apply(route("web", port, [a.spec()]))
    assert get(port)[:2] == (200, b"b0")


# -- ports -------------------------------------------------------------------


def test_port_clash_names_the_port_and_old_routes_keep_serving(
    router: HAProxyRouter, backends: list[HTTPBackend]
) -> None:
    a, b, _ = backends
    port = free_port()
    web = route("web", port, [a.spec()])
    router.apply(web)
    pid = router.pid
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        with pytest.raises(RouteError, match=f"port {busy}"):
            router.apply(route("web", busy, [b.spec()]))
        with pytest.raises(RouteError, match=f"port {busy}"):
            router.apply(route("api", busy, [b.spec()]))
        with pytest.raises(RouteError, match=f"port {busy}"):
            router.check_listen(busy)
        assert router.routes() == {"web": web}
        assert router.pid == pid
        assert get(port)[:2] == (200, b"b0")
    router.check_listen(free_port())
    router.check_listen(port)  # the router's own
    # Nor may a second service take a port the router serves for another.
    with pytest.raises(RouteError, match=f"port {port} is already served for service 'web'"):
        router.apply(route("api", port, [b.spec()]))
    assert router.routes() == {"web": web}
    assert {get(port)[1] for _ in range(6)} == {b"b0"}
    assert router.check() == []


# -- failures of backends ----------------------------------------------------


def test_killed_backend_is_retried_elsewhere_and_counted(
    router: HAProxyRouter, backends: list[HTTPBackend]
) -> None:
    survivor = backends[0]
    port = free_port()
    with backend_process("victim") as (victim, vport):
        router.apply(route("web", port, [survivor.spec(), Backend("victim", f"127.0.0.1:{vport}")]))
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        warm: Counter[bytes] = Counter()
        for _ in range(10):
            conn.request("GET", "/")
            warm[conn.getresponse().read()] += 1
        assert warm == {b"b0": 5, b"victim": 5}
        victim.kill()
        victim.wait(5)
        bodies: Counter[bytes] = Counter()
        for i in range(40):
            if i % 2:  # half on the kept-alive connection, half on new ones
                conn.request("GET", "/")
                resp = conn.getresponse()
                status, body = resp.status, resp.read()
            else:
                status, body = get(port)[:2]
            assert status == 200
            bodies[body] += 1
        conn.close()
    assert bodies == {b"b0": 40}
    assert router.counters()["web"].backends["victim"].errors >= 1


def test_post_to_a_backend_that_hangs_up_is_not_retried(router: HAProxyRouter) -> None:
    port = free_port()
    with TCPServer("hangup") as closer:
        router.apply(route("web", port, [Backend("closer", closer.address)]))
        status, _, _ = get(port, "/upload", "POST", body=b"x" * 1000)
        assert status in (502, 503)
        time.sleep(0.3)  # a retry, if any, would arrive now
        assert closer.requests == [b"POST /upload HTTP/1.1"], "sent once, never replayed"
        # A GET, safe to replay, is retried: once plus the configured retries.
        status, _, _ = get(port, "/idempotent")
        assert status in (502, 503)
        retries = RouterSettings().retries
        wait_for(lambda: len(closer.requests) == 2 + retries)
        assert closer.requests[1:] == [b"GET /idempotent HTTP/1.1"] * (1 + retries)
    assert router.counters()["web"].backends["closer"].errors >= 2


# -- changes under load -------------------------------------------------------


def test_rolling_swap_under_load_fails_no_request(router: HAProxyRouter) -> None:
    port = free_port()
    current = HTTPBackend(name="g0").start()
    started = [current]
    router.apply(route("web", port, [current.spec()], drain_timeout=5))
    pid = router.pid
    try:
        with Load(port, clients=4) as load:
            load.wait_ok(50)
            for gen in range(1, 5):
                new = HTTPBackend(name=f"g{gen}").start()
                started.append(new)
                router.apply(route("web", port, [current.spec(), new.spec()], drain_timeout=5))
                wait_for(lambda new=new: new.requests >= 5)
                router.apply(route("web", port, [draining(current), new.spec()], drain_timeout=5))
                assert router.drain("web", current.name, 5) == 0
                router.apply(route("web", port, [new.spec()], drain_timeout=5))
                gone = current.requests
                load.wait_ok(20)
                assert current.requests == gone, f"{current.name} removed but still used"
                current.stop()
                current = new
    finally:
        for b in started:
            b.stop()
    print(f"rolling swap: {load.ok} requests over {len(started)} backends")
    assert load.failures == [] and load.refused == 0
    assert load.ok > 200
    assert set(load.bodies) == {f"g{i}".encode() for i in range(5)}
    assert router.pid == pid


def test_generation_switch_under_load_fails_no_request(
    router: HAProxyRouter, backends: list[HTTPBackend]
) -> None:
    a, b, c = backends
    port, other = free_port(), free_port()
    router.apply(route("web", port, [a.spec(), b.spec()]))
    pids = [router.pid]
    with Load(port, clients=4, connectors=1) as load:
        load.wait_ok(100)
        router.apply(route("api", other, [c.spec()]))
        pids.append(router.pid)
        load.wait_ok(100)
        router.apply(route("web", port, [a.spec(), b.spec()], queue_timeout=2.0))
        pids.append(router.pid)
        load.wait_ok(100)
    assert len(set(pids)) == 3, "each listener change is a new generation"
    assert get(other)[:2] == (200, b"b2")
    assert load.failures == [] and load.refused == 0
    assert router.routes()["web"].queue_timeout == 2.0


# -- HAProxy dies -------------------------------------------------------------


def queued_request(port: int) -> socket.socket:
    """A connection made while no HAProxy runs: it must be queued, not refused."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(b"GET / HTTP/1.1\r\nHost: gap\r\nConnection: close\r\n\r\n")
    return s


def answer(s: socket.socket) -> bytes:
    with s:
        out = b""
        while piece := s.recv(65536):
            out += piece
    return out


@pytest.mark.parametrize("victim", ["worker", "master"])
def test_sigkill_of_haproxy_refuses_no_connection(
    router: HAProxyRouter, backends: list[HTTPBackend], victim: str
) -> None:
    a, b, _ = backends
    port = free_port()
    router.apply(route("web", port, [a.spec(), b.spec()]))
    clients, connectors = 4, 2
    with Load(port, clients=clients, connectors=connectors) as load:
        load.wait_ok(200)
        master = router.pid
        assert master is not None
        workers = children(master)
        assert len(workers) == 1
        killed = time.monotonic()
        os.kill(workers[0] if victim == "worker" else master, signal.SIGKILL)
        wait_exit(router)
        exited = time.monotonic()
        # A worker outlives its killed master by a moment: what it accepted then is
        # in flight on it. Once it is gone, a new connection can only wait.
        wait_for(lambda: not pid_alive(workers[0]), 5)
        in_gap = queued_request(port)
        router.restart(f"test: {victim} killed")
        gap = time.monotonic() - killed
        load.wait_ok(200)
    assert answer(in_gap).startswith(b"HTTP/1.1 200"), "the connection made in the gap waited"
    lost = list(load.failures)
    print(
        f"SIGKILL {victim}: master exit seen after {exited - killed:.3f}s, serving again after "
        f"{gap:.3f}s; {len(lost)} in-flight request(s) lost: {lost}"
    )
    assert load.refused == 0, "a new connection was refused during the gap"
    assert load.http_errors() == [], "only connections broke, no error was answered"
    assert len(lost) <= clients + connectors, "at most the requests in flight at the kill"
    assert router.pid != master
    assert router.check() == []


def test_agent_restart_adopts_haproxy_and_its_sockets(
    router: HAProxyRouter, backends: list[HTTPBackend]
) -> None:
    a, b, c = backends
    port = free_port()
    router.apply(route("web", port, [a.spec(), b.spec(), c.spec()]))
    router.apply(
        route("web", port, [a.spec(), Backend("b1", b.address, 50), draining(c)], drain_timeout=3.0)
    )
    state = json.loads((router.home / "haproxy" / "router.json").read_text())
    stats = router.run_dir / f"stats-{state['generation']}.sock"
    master = router.pid
    assert master is not None
    with Load(port, clients=3, connectors=1) as load:
        load.wait_ok(100)
        router.close()
        # Changed behind the router's back: the new one must read HAProxy, not its file.
        RuntimeAPI(stats).expect("set server web/b0 weight 7")
        load.wait_ok(100)
        adopter = HAProxyRouter(router.home, RouterSettings(bind="127.0.0.1"))
        try:
            assert adopter.start() == "adopted"
            assert adopter.pid == master
            assert adopter.routes() == {
                "web": route(
                    "web",
                    port,
                    [a.spec(7), Backend("b1", b.address, 50), draining(c)],
                    drain_timeout=3.0,
                )
            }
            load.wait_ok(100)
            assert load.failures == [] and load.refused == 0, "serving never stopped"
            assert adopter.check() == []
            worker = children(master)
            os.kill(master, signal.SIGKILL)
            wait_exit(adopter)
            wait_for(lambda: not any(pid_alive(w) for w in worker), 5)
            in_gap = queued_request(port)
            adopter.restart("test: master killed after adoption")
            load.wait_ok(100)
            assert answer(in_gap).startswith(b"HTTP/1.1 200")
            assert adopter.pid != master
            assert adopter.check() == []
        finally:
            load.stop()
            adopter.stop()
    print(f"after adoption, a SIGKILL lost {len(load.failures)} in-flight request(s)")
    assert load.refused == 0, "the adopter held the sockets: nothing refused"
    assert load.http_errors() == [] and len(load.failures) <= 4
    assert c.requests == 0


def test_check_reports_a_stopped_worker(router: HAProxyRouter, backends: list[HTTPBackend]) -> None:
    port = free_port()
    router.apply(route("web", port, [backends[0].spec()]))
    assert router.check() == []
    assert router.pid is not None
    worker = children(router.pid)[0]
    os.kill(worker, signal.SIGSTOP)
    try:
        problems = router.check()
    finally:
        os.kill(worker, signal.SIGCONT)
    assert problems, "a frozen worker must not look healthy"
    assert any("web" in p and str(port) in p for p in problems), problems
    wait_for(lambda: router.check() == [], 10)
    assert backends[0].requests == 0, "the probe is answered by HAProxy itself"


# -- listeners ---------------------------------------------------------------


def test_tcp_mode_echo_and_counters(router: HAProxyRouter) -> None:
    port = free_port()
    with TCPServer("echo") as echo:
        router.apply(route("db", port, [Backend("e1", echo.address)], protocol="tcp"))
        for i in range(3):
            data = os.urandom(100_000) + bytes([i])
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(data)
                s.shutdown(socket.SHUT_WR)
                got = bytearray()
                while piece := s.recv(65536):
                    got += piece
            assert bytes(got) == data
        wait_for(lambda: router.counters()["db"].backends["e1"].active == 0)
        db = router.counters()["db"]
        assert db.connections == 3 and db.backends["e1"].requests == 3
        assert echo.connections == 3
        assert router.check() == []


def test_remove_closes_the_listener(router: HAProxyRouter, backends: list[HTTPBackend]) -> None:
    port, other = free_port(), free_port()
    router.apply(route("web", port, [backends[0].spec()]))
    router.apply(route("api", other, [backends[1].spec()]))
    assert get(port)[:2] == (200, b"b0")
    router.remove("web")
    assert set(router.routes()) == {"api"}
    assert refused(port), "a removed service's port refuses at once"
    router.check_listen(port)
    assert get(other)[:2] == (200, b"b1")
    router.remove("web")  # nothing left to remove: no error
    assert router.check() == []


# -- counters ----------------------------------------------------------------


def test_counters_requests_classes_active_and_latency(
    router: HAProxyRouter, backends: list[HTTPBackend]
) -> None:
    a = backends[0]
    port, empty = free_port(), free_port()
    router.apply(route("web", port, [a.spec()]))
    first = router.pid
    router.apply(route("empty", empty, []))
    # Connections the first generation took before it stopped listening would be
    # counted only while it lives: let it go first, for exact numbers.
    wait_for(lambda: first is not None and not pid_alive(first))
    for _ in range(10):
        assert get(port)[0] == 200
    slow = [in_thread(lambda: get(port, "/slow?t=0.2")[0]) for _ in range(5)]
    for t, _ in slow:
        t.join(5)
    assert [out["result"] for _, out in slow] == [200] * 5
    assert raw_exchange(port, b"GARBAGE\r\n\r\n").startswith(b"HTTP/1.1 400")
    assert get(empty)[0] == 503
    held, out = in_thread(lambda: get(port, "/slow?t=1")[0])
    wait_for(lambda: a.paths["/slow?t=1"] == 1)
    assert router.counters()["web"].backends["b0"].active == 1
    held.join(5)
    assert out == {"result": 200}
    wait_for(lambda: router.counters()["web"].backends["b0"].latency.total == 16)
    counters = router.counters()
    web = counters["web"]
    assert (web.requests, web.connections) == (17, 17)
    assert (web.responses["2xx"], web.responses["4xx"], web.responses["5xx"]) == (16, 1, 0)
    assert counters["empty"].responses["5xx"] == 1
    b0 = web.backends["b0"]
    assert (b0.requests, b0.responses["2xx"], b0.errors, b0.active) == (16, 16, 0, 0)
    p50, p95, p99 = (b0.latency.quantile(q) for q in (0.50, 0.95, 0.99))
    assert p50 is not None and p95 is not None and p99 is not None
    assert p50 < 0.2 <= p95 <= p99
    assert b0.latency.to_json()["count"] == 16


def test_counters_only_grow_across_generations(
    router: HAProxyRouter, backends: list[HTTPBackend]
) -> None:
    a = backends[0]
    port = free_port()
    router.apply(route("web", port, [a.spec()]))
    for _ in range(5):
        assert get(port)[0] == 200
    before = router.pid
    router.apply(route("api", free_port(), [backends[1].spec()]))
    wait_for(lambda: before is not None and not pid_alive(before))
    for _ in range(5):
        assert get(port)[0] == 200
    before = router.pid
    router.restart("test")
    # A HAProxy that still answers is replaced like a configuration change: the old
    # generation is soft-stopped, not killed.
    assert router.pid != before
    wait_for(lambda: before is not None and not pid_alive(before))
    for _ in range(5):
        assert get(port)[0] == 200
    web = router.counters()["web"]
    assert web.requests == 15 and web.backends["b0"].responses["2xx"] == 15
    # A deleted backend keeps what it counted.
    router.apply(route("web", port, [backends[2].spec()]))
    assert get(port)[:2] == (200, b"b2")
    web = router.counters()["web"]
    assert web.requests == 16 and web.backends["b0"].requests == 15


def test_a_retired_generation_is_still_seen_by_drain_and_counters(
    router: HAProxyRouter, backends: list[HTTPBackend]
) -> None:
    """A new generation soft-stops the old one, which closes its stats socket but
    finishes its requests: drain must wait for them, and counters count them."""
    a, b, c = backends
    port = free_port()
    router.apply(route("web", port, [a.spec()]))
    kept = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    kept.request("GET", "/")
    assert kept.getresponse().read() == b"b0"
    slow, out = in_thread(lambda: get(port, "/slow?t=1.5")[:2])
    wait_for(lambda: a.paths["/slow?t=1.5"] == 1)
    old = router.pid
    router.apply(route("api", free_port(), [c.spec()]))
    assert router.pid != old
    # The kept connection belongs to the old generation: it answers, then closes. The
    # master signals the old worker after the new one is up, so a request or two may
    # still find it before the soft-stop; each is answered by the old generation.
    served, closed = 0, False
    deadline = time.monotonic() + 5
    while not closed and time.monotonic() < deadline:
        try:
            kept.request("GET", "/")
            resp = kept.getresponse()
        except (http.client.RemoteDisconnected, ConnectionError):
            closed = True
            break
        assert resp.read() == b"b0"
        served += 1
        closed = resp.will_close
        time.sleep(0.05)
    kept.close()
    assert closed, "the retired generation closes a kept connection"
    web = router.counters()["web"]
    assert web.requests == 2 + served, "what the retired generation served counts"
    assert web.backends["b0"].active == 1
    router.apply(route("web", port, [draining(a), b.spec()]))
    started = time.monotonic()
    assert router.drain("web", "b0", 5) == 0
    assert time.monotonic() - started > 0.5, "drain waited for the old generation's request"
    slow.join(5)
    assert out == {"result": (200, b"b0")}


def test_a_client_cannot_pass_for_the_health_probe(
    router: HAProxyRouter, backends: list[HTTPBackend]
) -> None:
    """The probe's header with any other value is an ordinary request: it reaches a
    backend (or gets the 503), never HAProxy's own answer; the token is in no answer,
    in ``info()`` or in HAProxy's log."""
    from kiln.traffic.haproxy.config import PROBE_ANSWER, PROBE_HEADER

    a = backends[0]
    port = free_port()
    router.apply(route("web", port, [a.spec()]))
    token = json.loads((router.state_file).read_text())["token"]
    for guess in ("", "0" * 32, token[:-1], token.upper(), token + "0"):
        status, body, _ = get(port, headers={PROBE_HEADER: guess})
        assert (status, body) == (200, b"b0"), guess
    assert a.requests == 5
    assert router.check() == []
    assert token not in json.dumps(router.info())
    assert token not in router.log_file.read_text()
    assert PROBE_ANSWER.encode() not in get(port)[1]
