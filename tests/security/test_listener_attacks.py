"""Attacks on Kiln's listener (HAProxy 2.6 behind ``HAProxyRouter``).

Every attack runs against a real HAProxy on loopback in front of a STRICT backend
(uvicorn + h11, :mod:`strict_backend`) that records each request it parses, or a
HOSTILE raw-socket backend for the response side. Each case asserts what the proxy
actually does: a 4xx/5xx of its own, or a forward in one normalised, unambiguous
framing; that the backend sees exactly the requests the clients sent as separate,
well-framed requests; that a victim's request or answer never reaches the attacker;
that other connections are not stalled and HAProxy's memory stays bounded.

Figures (latencies, RSS) are printed: run with ``-s`` to see them.
"""

from __future__ import annotations

import contextlib
import socket
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from strict_backend import (
    SECRET,
    Client,
    HostileBackend,
    SlowClients,
    StrictBackend,
    canned,
    silent,
)

from kiln.traffic import Backend, Route
from kiln.traffic.haproxy import HAProxyRouter, RouterSettings

HTTP_REQUEST_TIMEOUT = 2.0
SERVER_TIMEOUT = 1.0
FIN_TIMEOUT = 1.0
SETTINGS = RouterSettings(
    bind="127.0.0.1",
    http_request_timeout=HTTP_REQUEST_TIMEOUT,
    server_timeout=SERVER_TIMEOUT,
    fin_timeout=FIN_TIMEOUT,
)
STALL = 0.5
"""The longest another client may wait while an attack runs (100 ms is the goal; this
leaves room for a loaded 2-core machine)."""
SPACES = b" " * 60_000


# -- the listener and its backends -----------------------------------------


@dataclass
class Edge:
    router: HAProxyRouter
    strict: StrictBackend
    hostile: HostileBackend
    strict_port: int
    hostile_port: int

    def reset(self) -> None:
        self.strict.reset()
        self.hostile.reset()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _processes_naming(mark: str) -> list[str]:
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            if mark in (proc / "cmdline").read_bytes().decode(errors="replace"):
                found.append(proc.name)
    return found


@contextlib.contextmanager
def listener(
    home: Path, settings: RouterSettings, strict: StrictBackend, hostile: HostileBackend
) -> Iterator[Edge]:
    """Kiln's router on ``home`` serving ``strict`` and ``hostile`` on two ports; stopped
    after, with no HAProxy left."""
    home.mkdir(mode=0o700)
    router = HAProxyRouter(home, settings)
    router.start()
    try:
        strict_port, hostile_port = _free_port(), _free_port()
        router.apply(Route("strict", strict_port, backends=(Backend("s1", strict.address),)))
        router.apply(Route("hostile", hostile_port, backends=(Backend("h1", hostile.address),)))
        # Each apply() started a generation and soft-stopped the one before; until an old
        # worker has seen its signal it may still accept a connection, which it serves
        # once with "Connection: close" (it is stopping): the keep-alive cases want the
        # current generation alone.
        wait_until(lambda: len(_processes_naming(str(home))) == 2, 10, "old generations gone")
        yield Edge(router, strict, hostile, strict_port, hostile_port)
    finally:
        router.stop()
        assert not _processes_naming(str(home)), "haproxy left behind"


@pytest.fixture(scope="module")
def strict() -> Iterator[StrictBackend]:
    backend = StrictBackend().start()
    yield backend
    backend.stop()


@pytest.fixture(scope="module")
def hostile() -> Iterator[HostileBackend]:
    backend = HostileBackend(scripts=dict(HOSTILE_SCRIPTS)).start()
    yield backend
    backend.stop()


@pytest.fixture(scope="module")
def module_edge(
    tmp_path_factory: pytest.TempPathFactory, strict: StrictBackend, hostile: HostileBackend
) -> Iterator[Edge]:
    with listener(tmp_path_factory.mktemp("edge") / "home", SETTINGS, strict, hostile) as e:
        yield e


@pytest.fixture
def edge(module_edge: Edge) -> Edge:
    module_edge.reset()
    return module_edge


# -- readings --------------------------------------------------------------


def show_info(router: HAProxyRouter) -> dict[str, str]:
    # The Router protocol has no gauge of a frontend's connections: ask HAProxy itself.
    assert router._current is not None
    text = router._current.api.command("show info", timeout=2.0)
    return dict(line.split(": ", 1) for line in text.splitlines() if ": " in line)


def frontend(router: HAProxyRouter, service: str) -> dict[str, str]:
    assert router._current is not None
    rows = router._current.api.stat()
    return next(r for r in rows if r["pxname"] == service and r["svname"] == "FRONTEND")


def haproxy_rss_mb(router: HAProxyRouter) -> float:
    """Resident memory of the current HAProxy master and its worker(s), from /proc."""
    assert router.pid is not None
    pids, todo = set(), [router.pid]
    while todo:
        pid = todo.pop()
        pids.add(pid)
        for children in Path(f"/proc/{pid}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                todo += [int(c) for c in children.read_text().split()]
    kb = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    kb += int(line.split()[1])
    return kb / 1024


def wait_until(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout}s")
        time.sleep(0.05)


def get(path: str, *headers: str) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: x", *headers, "", ""]
    return "\r\n".join(lines).encode()


class Prober:
    """Another client: a fresh connection and ``GET /other`` every ``every`` seconds,
    each answer timed, for as long as the ``with`` block runs."""

    def __init__(self, port: int, every: float = 0.02, timeout: float = 5.0) -> None:
        self.port = port
        self.every = every
        self.timeout = timeout
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Prober:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(self.timeout + 5)

    def _run(self) -> None:
        while not self._stop.is_set():
            start = time.monotonic()
            try:
                with Client(self.port, timeout=self.timeout) as c:
                    answer = c.request(get("/other", "Connection: close"))
                assert answer.status == 200 and answer.body == b"ok GET /other", answer
                self.latencies.append(time.monotonic() - start)
            except (OSError, EOFError, AssertionError) as e:
                self.failures.append(repr(e))
            self._stop.wait(self.every)

    def summary(self) -> str:
        lat = sorted(self.latencies)
        if not lat:
            return f"no answer ({len(self.failures)} failures)"
        p50 = statistics.median(lat)
        return (
            f"{len(lat)} answers, p50 {p50 * 1000:.1f} ms, max {lat[-1] * 1000:.1f} ms, "
            f"{len(self.failures)} failures"
        )

    def check(self, limit: float = STALL) -> None:
        assert self.latencies, "the other client got no answer"
        assert not self.failures, self.failures[:3]
        assert max(self.latencies) < limit, self.summary()


def victim(port: int) -> None:
    """A victim on its own connection: a request, then its private one on the same
    (keep-alive) connection, which HAProxy may send on a reused server connection."""
    with Client(port) as c:
        warm = c.request(get("/warm"))
        assert (warm.status, warm.body) == (200, b"ok GET /warm")
        private = c.request(get("/private", "Cookie: session=victim"))
        assert (private.status, private.body) == (200, SECRET.encode()), private
        assert c.rest(0.1) == b""


def assert_no_leak(strict: StrictBackend, expected: list[tuple[str, str]]) -> None:
    """The backend saw exactly ``expected`` (method, target), and no body it stored holds
    any part of the victim's request."""
    seen = strict.seen()
    assert [(s["method"], s["path"]) for s in seen] == expected, seen
    for s in seen:
        assert "victim" not in s["body"] and "/private" not in s["body"], s
        assert "/private" not in s["path"] or s["headers"].count(["cookie", "session=victim"])


# -- 1, 2. request smuggling -----------------------------------------------

SMUGGLED = b"POST /capture HTTP/1.1\r\nHost: x\r\nContent-Length: 400\r\n\r\n"
"""A request head whose body would swallow whatever request follows it on a server
connection: the victim's, cookie included, if the backend ever parsed it as a request."""


def chunked(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data)


def post(headers: bytes, body: bytes, version: bytes = b"HTTP/1.1") -> bytes:
    return b"POST /capture " + version + b"\r\nHost: x\r\n" + headers + b"\r\n" + body


@dataclass(frozen=True)
class Smuggle:
    id: str
    raw: bytes
    status: int
    body: bytes | None = None
    """What the backend must receive as the body of the one request it sees (forwarded
    cases); None: the proxy answers itself and the backend sees nothing."""
    framing: tuple[tuple[str, str], ...] = ()
    """The framing headers the backend must receive (and no other)."""
    keep: bool = True
    """Whether the attacker's connection serves a next request."""
    pipelined: bool = False
    """The rest of the attack is the attacker's own next request (still incomplete)."""


TE = (("transfer-encoding", "chunked"),)
BODY = b"hello"

SMUGGLING_A = [
    # HAProxy does not drop the header a Connection token names: the backend gets
    # Content-Length (and the Connection header itself), so the body stays a body.
    Smuggle(
        "connection-content-length",
        post(b"Connection: content-length\r\nContent-Length: %d\r\n" % len(SMUGGLED), SMUGGLED),
        200,
        SMUGGLED,
        (("content-length", str(len(SMUGGLED))),),
    ),
    Smuggle(
        "connection-transfer-encoding",
        post(b"Connection: transfer-encoding\r\nTransfer-Encoding: chunked\r\n", chunked(SMUGGLED)),
        200,
        SMUGGLED,
        TE,
    ),
]

SMUGGLING_B = [
    # A bare LF ends the trailer section: what follows is the attacker's own next
    # request on its own connection, framed by HAProxy, never the victim's.
    Smuggle(
        "bare-lf-after-last-chunk",
        post(b"Transfer-Encoding: chunked\r\n", b"5\r\nhello\r\n0\r\n\n" + SMUGGLED),
        200,
        BODY,
        TE,
        pipelined=True,
    ),
    Smuggle(
        "chunk-size-0x5", post(b"Transfer-Encoding: chunked\r\n", b"0x5\r\nhello\r\n0\r\n\r\n"), 400
    ),
    # "5 " (BWS without an extension) is read as 5 and re-chunked: unambiguous.
    Smuggle(
        "chunk-size-trailing-space",
        post(b"Transfer-Encoding: chunked\r\n", b"5 \r\nhello\r\n0\r\n\r\n"),
        200,
        BODY,
        TE,
    ),
    Smuggle(
        "chunk-size-minus-1",
        post(b"Transfer-Encoding: chunked\r\n", b"-1\r\nhello\r\n0\r\n\r\n"),
        400,
    ),
    Smuggle(
        "chunk-size-huge-hex",
        post(b"Transfer-Encoding: chunked\r\n", b"1" + b"0" * 20 + b"5\r\nhello\r\n0\r\n\r\n"),
        400,
    ),
    Smuggle(
        "chunk-lines-bare-lf",
        post(b"Transfer-Encoding: chunked\r\n", b"5\nhello\n0\n\n"),
        200,
        BODY,
        TE,
    ),
    Smuggle(
        "chunk-extension",
        post(b"Transfer-Encoding: chunked\r\n", b"5;a=b\r\nhello\r\n0\r\n\r\n"),
        200,
        BODY,
        TE,
    ),
    Smuggle(
        "invalid-trailer",
        post(b"Transfer-Encoding: chunked\r\n", b"5\r\nhello\r\n0\r\nbad trailer\r\n\r\n"),
        400,
        keep=False,
    ),
    # A trailer field is not framing: the body is still the 5 chunked bytes.
    Smuggle(
        "trailer-content-length",
        post(b"Transfer-Encoding: chunked\r\n", b"5\r\nhello\r\n0\r\nContent-Length: 50\r\n\r\n"),
        200,
        BODY,
        TE,
    ),
    # CL+TE: Content-Length is dropped, the body read as chunked, and the client
    # connection closed after the answer (RFC 9112 §6.3).
    Smuggle(
        "content-length-and-chunked",
        post(b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n", chunked(BODY)),
        200,
        BODY,
        TE,
        keep=False,
    ),
    Smuggle(
        "te-chunked-identity",
        post(b"Transfer-Encoding: chunked, identity\r\n", chunked(BODY)),
        400,
        keep=False,
    ),
    # HAProxy refuses a transfer coding it cannot decode ahead of chunked with a 422.
    Smuggle(
        "te-identity-chunked",
        post(b"Transfer-Encoding: identity, chunked\r\n", chunked(BODY)),
        422,
        keep=False,
    ),
    Smuggle(
        "te-xchunked-with-cl",
        post(b"Transfer-Encoding: xchunked\r\nContent-Length: 5\r\n", BODY),
        400,
        keep=False,
    ),
    Smuggle(
        "te-xchunked", post(b"Transfer-Encoding: xchunked\r\n", chunked(BODY)), 400, keep=False
    ),
    Smuggle(
        "te-twice",
        post(b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", chunked(BODY)),
        400,
        keep=False,
    ),
    Smuggle(
        "te-space-before-colon",
        post(b"Transfer-Encoding : chunked\r\nContent-Length: 5\r\n", BODY),
        400,
        keep=False,
    ),
    Smuggle(
        "te-vertical-tab",
        post(b"Transfer-Encoding: \x0bchunked\r\nContent-Length: 5\r\n", BODY),
        400,
        keep=False,
    ),
    Smuggle(
        "te-obs-fold",
        post(b"Transfer-Encoding:\r\n chunked\r\nContent-Length: 5\r\n", BODY),
        400,
        keep=False,
    ),
    # obs-fold of another header is unfolded into that header's value (RFC 9112 §5.2):
    # "Transfer-Encoding: chunked" becomes text inside X-A, Content-Length frames.
    Smuggle(
        "obs-fold-hides-te",
        post(b"X-A: b\r\n Transfer-Encoding: chunked\r\nContent-Length: 5\r\n", BODY),
        200,
        BODY,
        (("content-length", "5"),),
    ),
    # HTTP/1.0 with chunked: HAProxy decodes it and re-chunks it for the backend.
    Smuggle(
        "http10-chunked",
        post(b"Transfer-Encoding: chunked\r\n", chunked(BODY), b"HTTP/1.0"),
        200,
        BODY,
        TE,
        keep=False,
    ),
]


def run_smuggle(edge: Edge, case: Smuggle) -> None:
    with Client(edge.strict_port) as attacker:
        answer = attacker.request(case.raw)
        assert answer.status == case.status, answer
        got = answer.raw
        expected: list[tuple[str, str]] = []
        if case.body is None:
            assert edge.strict.seen() == [], "a request the proxy rejected reached the backend"
        else:
            (seen,) = edge.strict.seen()
            assert (seen["method"], seen["path"]) == ("POST", "/capture")
            assert seen["body"].encode("latin-1") == case.body
            assert answer.body == b"captured %d" % len(case.body)
            framing = [
                (k, v) for k, v in seen["headers"] if k in ("content-length", "transfer-encoding")
            ]
            assert framing == list(case.framing), seen["headers"]
            expected.append(("POST", "/capture"))
        victim(edge.strict_port)
        expected += [("GET", "/warm"), ("GET", "/private")]
        if case.pipelined:
            got += attacker.rest(0.3)
        elif case.keep and case.status < 400:
            after = attacker.request(get("/after"))
            assert (after.status, after.body) == (200, b"ok GET /after")
            got += after.raw + attacker.rest(0.1)
            expected.append(("GET", "/after"))
        else:
            assert attacker.closed(2.0), "the proxy kept the connection of a broken request"
        assert SECRET.encode() not in got
        assert b"victim" not in got
    assert_no_leak(edge.strict, expected)


@pytest.mark.parametrize("case", SMUGGLING_A, ids=lambda c: c.id)
def test_smuggling_through_connection_header(edge: Edge, case: Smuggle) -> None:
    run_smuggle(edge, case)


@pytest.mark.parametrize("case", SMUGGLING_B, ids=lambda c: c.id)
def test_smuggling_through_chunked_framing(edge: Edge, case: Smuggle) -> None:
    run_smuggle(edge, case)


def test_victims_while_the_attackers_answer_is_unread(edge: Edge) -> None:
    """The Connection: content-length attack, then five victims before the attacker reads
    its answer: the smuggled head stays a body (Content-Length frames it), never a
    request that could swallow a victim's."""
    raw = post(b"Connection: content-length\r\nContent-Length: %d\r\n" % len(SMUGGLED), SMUGGLED)
    with Client(edge.strict_port) as attacker:
        attacker.send(raw)
        for _ in range(5):
            victim(edge.strict_port)
        answer = attacker.response()
        assert (answer.status, answer.body) == (200, b"captured %d" % len(SMUGGLED))
        assert attacker.rest(0.2) == b""
    seen = edge.strict.seen()
    assert sorted((s["method"], s["path"]) for s in seen) == sorted(
        [("POST", "/capture")] + [("GET", "/warm"), ("GET", "/private")] * 5
    )
    assert_no_leak(edge.strict, [(s["method"], s["path"]) for s in seen])


# -- 3. quadratic headers --------------------------------------------------


def timed(port: int, raw: bytes) -> tuple[int, float]:
    start = time.monotonic()
    with Client(port) as c:
        c.send(raw)
        status = c.response().status
    return status, time.monotonic() - start


def hammer(
    port: int, raw: bytes, seconds: float = 1.0, workers: int = 8
) -> list[tuple[int, float]]:
    """``raw`` on fresh connections from ``workers`` threads for ``seconds``: each
    answer's status and time."""
    deadline = time.monotonic() + seconds

    def worker() -> list[tuple[int, float]]:
        out = []
        while time.monotonic() < deadline:
            out.append(timed(port, raw))
        return out

    with ThreadPoolExecutor(workers) as pool:
        return [r for f in [pool.submit(worker) for _ in range(workers)] for r in f.result()]


QUADRATIC = {
    "long-header": get("/a", "X: a" + SPACES.decode() + "b"),
    "long-host": b"GET /a HTTP/1.1\r\nHost: a" + SPACES + b"b\r\n\r\n",
}


@pytest.mark.parametrize("shape", sorted(QUADRATIC))
def test_quadratic_request_header(edge: Edge, shape: str) -> None:
    """60,000 spaces inside a header, from 8 connections at a time for a second:
    HAProxy's 16 KB buffer fills and it answers 400 at once; another client sending
    meanwhile is served."""
    with Prober(edge.strict_port) as other:
        results = hammer(edge.strict_port, QUADRATIC[shape])
    slowest = max(t for _, t in results)
    print(
        f"\n{shape}: {len(results)} x 400, slowest {slowest * 1000:.1f} ms; "
        f"other client {other.summary()}"
    )
    assert {s for s, _ in results} == {400}
    assert slowest < 1.0
    other.check()
    assert {s["path"] for s in edge.strict.seen()} == {"/other"}


def test_long_header_that_fits_is_forwarded_unchanged(edge: Edge) -> None:
    value = "a" + " " * 12_000 + "b"
    status, took = timed(edge.strict_port, get("/echo", f"X: {value}"))
    assert status == 200 and took < 1.0
    (seen,) = edge.strict.seen()
    assert ["x", value] in seen["headers"]


def test_quadratic_response_header(edge: Edge) -> None:
    """The same shape in a backend's response: 502 at once, no stall of others; one
    that fits in the buffer is forwarded as it came."""
    with Prober(edge.strict_port) as other:
        results = hammer(edge.hostile_port, get("/quad"))
    slowest = max(t for _, t in results)
    print(
        f"\nresponse header: {len(results)} x 502, slowest {slowest * 1000:.1f} ms; "
        f"other client {other.summary()}"
    )
    assert {s for s, _ in results} == {502}
    assert slowest < 1.0
    other.check()
    with Client(edge.hostile_port) as c:
        fits = c.request(get("/quad-fit"))
        assert (fits.status, fits.body) == (200, b"hello")
        assert fits.header("x") == [b"a" + b" " * 12_000 + b"b"]


# -- 4. slowloris ----------------------------------------------------------


class RssSampler:
    """HAProxy's RSS every 50 ms while the ``with`` block runs; ``peak`` is the largest."""

    def __init__(self, router: HAProxyRouter) -> None:
        self.router = router
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, haproxy_rss_mb(self.router))
            self._stop.wait(0.05)


@pytest.mark.timeout(120)
def test_slowloris_4000(edge: Edge) -> None:
    """4,000 connections trickle a request head (one byte every 0.5 s), twice: other
    clients are served meanwhile; HAProxy closes every one after ``timeout http-request``
    (2 s here) however it trickles, with a 408; its memory is bounded."""
    router = edge.router
    rss_start = haproxy_rss_mb(router)
    pool_start = int(show_info(router)["PoolAlloc_bytes"])
    waves = []
    with Prober(edge.strict_port) as other:
        for _ in range(2):
            slow = SlowClients(edge.strict_port, 4000, interval=0.5)
            try:
                with RssSampler(router) as rss:
                    assert slow.opened() == (4000, 0)
                    wait_until(
                        lambda: int(frontend(router, "strict")["scur"]) >= 4000, 5, "accepted"
                    )
                    pool_peak = int(show_info(router)["PoolAlloc_bytes"])
                    assert router.check() == []
                    closed = slow.closed(HTTP_REQUEST_TIMEOUT + 20)
            finally:
                slow.stop()
            time.sleep(0.3)
            waves.append((rss.peak, pool_peak, closed, haproxy_rss_mb(router)))
    pool_end = int(show_info(router)["PoolAlloc_bytes"])
    print(f"\nslowloris 4000: other client {other.summary()}")
    print(f"  HAProxy RSS start {rss_start:.1f} MB, pools {pool_start / 2**20:.1f} MB")
    for i, (peak, pool_peak, closed, after) in enumerate(waves, 1):
        print(
            f"  wave {i}: RSS peak {peak:.1f} MB (pools {pool_peak / 2**20:.1f} MB), after "
            f"{after:.1f} MB; closed by the proxy {closed[0]} ({closed[1]} with a 408) "
            f"{closed[2]:.2f}-{closed[3]:.2f} s after opening"
        )
    print(f"  pools at the end {pool_end / 2**20:.1f} MB")
    other.check()
    for peak, _, (count, with_408, first, last), _ in waves:
        assert count == 4000
        assert with_408 >= 0.99 * count
        # The trickle never resets the timer: all closed around the timeout.
        assert first > HTTP_REQUEST_TIMEOUT - 0.5 and last < HTTP_REQUEST_TIMEOUT + 3
        assert peak < 600
    # HAProxy gives its buffers back when the connections go: its pools are back near
    # the start. The process RSS is not (glibc keeps the freed heap in its per-thread
    # arenas): it grows less with each wave and levels off (about 88 MB after six waves
    # of 4,000 here), so a second wave must grow it less than the first did.
    assert pool_end < pool_start + 4 * 2**20
    (peak1, _, _, after1), (peak2, _, _, after2) = waves
    assert after1 <= peak1 + 4
    assert max(peak2, after2) - peak1 < (peak1 - rss_start) + 8


# -- 5. 20,000 partial heads ----------------------------------------------


@pytest.mark.timeout(180)
def test_twenty_thousand_partial_heads(
    tmp_path: Path, strict: StrictBackend, hostile: HostileBackend
) -> None:
    """20,000 partial heads from two client addresses (two processes, each with its own
    descriptor limit): each address may hold ``source_maxconn`` (1,000) connections of a
    service and the rest are closed at once, so HAProxy holds 2,000, memory stays
    bounded, clients from other addresses are served at once on this service and any
    other, ``check()`` finds nothing wrong and the control channel answers."""
    settings = RouterSettings(bind="127.0.0.1", http_request_timeout=5.0)
    cap = settings.source_maxconn
    with listener(tmp_path / "home", settings, strict, hostile) as edge:
        router = edge.router
        rss_start = haproxy_rss_mb(router)
        slow = [
            SlowClients(edge.strict_port, 10_000, interval=1.0, source=f"127.0.0.{n}")
            for n in (2, 3)
        ]
        try:
            with RssSampler(router) as sampler, Prober(edge.strict_port) as same:
                opened = [s.opened(60) for s in slow]
                wait_until(lambda: int(frontend(router, "strict")["scur"]) >= 2 * cap, 20, "held")
                time.sleep(0.5)
                held = int(frontend(router, "strict")["scur"])
                start = time.monotonic()
                counters = router.counters()
                counters_s = time.monotonic() - start
                problems = router.check()
                waits: dict[str, float] = {}
                for name, port in (
                    ("same service", edge.strict_port),
                    ("other", edge.hostile_port),
                ):
                    begin = time.monotonic()
                    with Client(port, timeout=10) as c:
                        answer = c.request(get("/other", "Connection: close"))
                    assert answer.status == 200
                    waits[name] = time.monotonic() - begin
                closed = [s.closed(60) for s in slow]
        finally:
            for s in slow:
                s.stop()
        rss_peak = sampler.peak
        print(
            f"\n20,000 partial heads from 2 addresses: held {held}, counters() "
            f"{counters_s * 1000:.1f} ms, check() -> {problems}"
        )
        print(f"  a new client from another address waited {waits}; meanwhile {same.summary()}")
        print(f"  opened {opened}, closed (count, 408s, first s, last s) {closed}")
        print(f"  HAProxy RSS start {rss_start:.1f} MB, peak {rss_peak:.1f} MB")
        # Each address holds its cap; the prober's own request may be in flight too.
        assert 2 * cap <= held <= 2 * cap + 2, held
        assert "strict" in counters and counters_s < 1.0
        assert problems == []
        assert max(waits.values()) < 0.5, waits
        # While 18,000 connections arrive and are refused within a second, the kernel's
        # accept queue (4,096) can overflow: a client's SYN then waits a retransmit (1 s),
        # on two cores now and then two (1 s + 2 s). That is the kernel's SYN queue, not
        # the proxy: the median below shows the prober is served at once otherwise.
        same.check(limit=3.5)
        assert statistics.median(same.latencies) < 0.05, same.summary()
        assert [n + failed for n, failed in opened] == [10_000, 10_000]
        for (held_here, _), (count, with_408, _, _) in zip(opened, closed, strict=True):
            # Refused at once after the handshake, or held and closed by the proxy: every
            # one of them is closed, and at least the capped ones with a 408.
            assert count == held_here and with_408 >= min(held_here, cap) - 10
        assert rss_peak < 600


@pytest.mark.timeout(60)
def test_a_full_listener_is_busy_not_dead(
    tmp_path: Path, strict: StrictBackend, hostile: HostileBackend
) -> None:
    """Connections the per-address cap does not limit (loopback) fill a listener: the
    probe through it times out, but ``check()`` sees a listener at its limit and reports
    nothing, so the agent does not restart HAProxy (which would cut every connection
    and meet the same flood again)."""
    settings = RouterSettings(
        bind="127.0.0.1", maxconn=1000, listener_maxconn=300, http_request_timeout=5.0
    )
    with listener(tmp_path / "home", settings, strict, hostile) as edge:
        router = edge.router
        slow = SlowClients(edge.strict_port, 400, interval=1.0)
        try:
            slow.opened(30)
            wait_until(lambda: int(frontend(router, "strict")["scur"]) >= 300, 10, "full")
            assert router.check() == []
            pid = router.pid
        finally:
            slow.stop()
        assert router.pid == pid


# -- 6. response framing from a hostile backend --------------------------


def _ok(body: bytes, *headers: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n" + body


HOSTILE_SCRIPTS = {
    "/te-cl": canned(
        _ok(b"5\r\nhello\r\n0\r\n\r\n", b"Transfer-Encoding: chunked", b"Content-Length: 50")
    ),
    "/cl-te": canned(
        _ok(b"5\r\nhello\r\n0\r\n\r\n", b"Content-Length: 3", b"Transfer-Encoding: chunked")
    ),
    "/connection-content-length": canned(
        _ok(b"hello", b"Connection: content-length", b"Content-Length: 5")
    ),
    "/connection-transfer-encoding": canned(
        _ok(
            b"5\r\nhello\r\n0\r\n\r\n",
            b"Connection: transfer-encoding",
            b"Transfer-Encoding: chunked",
        )
    ),
    "/bare-cr-status": canned(b"HTTP/1.1 200 O\rK\r\nContent-Length: 5\r\n\r\nhello"),
    "/bare-cr-separator": canned(b"HTTP/1.1 200 OK\rContent-Length: 5\r\n\r\nhello"),
    "/bare-lf": canned(b"HTTP/1.1 200 OK\nContent-Length: 5\n\nhello"),
    "/nul": canned(_ok(b"hello", b"X-A: a\x00b", b"Content-Length: 5")),
    "/control": canned(_ok(b"hello", b"X-A: a\x01b", b"Content-Length: 5")),
    "/two-content-lengths": canned(_ok(b"hello!", b"Content-Length: 5", b"Content-Length: 6")),
    "/same-content-length-twice": canned(_ok(b"hello", b"Content-Length: 5", b"Content-Length: 5")),
    "/content-length-list": canned(_ok(b"hello", b"Content-Length: 5, 5")),
    "/xchunked": canned(_ok(b"hello", b"Transfer-Encoding: xchunked"), keep=False),
    "/obs-fold": canned(_ok(b"hello", b"X-A: b", b" Content-Length: 99", b"Content-Length: 5")),
    "/space-in-name": canned(_ok(b"hello", b"X A: b", b"Content-Length: 5")),
    "/extra-bytes": canned(
        _ok(b"hello" + _ok(b"spoof!", b"Content-Length: 6"), b"Content-Length: 5")
    ),
    "/quad": canned(_ok(b"hello", b"X: a" + SPACES + b"b", b"Content-Length: 5")),
    "/quad-fit": canned(_ok(b"hello", b"X: a" + b" " * 12_000 + b"b", b"Content-Length: 5")),
    "/never": silent,
}

HOSTILE = [
    # (path, status, the one framing header the client gets, body); a 502 is HAProxy's.
    ("/te-cl", 200, (b"transfer-encoding", b"chunked"), b"hello"),
    ("/cl-te", 200, (b"transfer-encoding", b"chunked"), b"hello"),
    # The Connection header is forwarded as it came, but Content-Length is kept: one framing.
    ("/connection-content-length", 200, (b"content-length", b"5"), b"hello"),
    ("/connection-transfer-encoding", 200, (b"transfer-encoding", b"chunked"), b"hello"),
    ("/bare-cr-status", 502, None, None),
    ("/bare-cr-separator", 502, None, None),
    ("/bare-lf", 200, (b"content-length", b"5"), b"hello"),
    # Refused by Kiln's config (kiln_ctl_res): HAProxy 2.6 alone forwards them.
    ("/nul", 502, None, None),
    ("/control", 502, None, None),
    ("/two-content-lengths", 502, None, None),
    ("/same-content-length-twice", 200, (b"content-length", b"5"), b"hello"),
    ("/content-length-list", 200, (b"content-length", b"5"), b"hello"),
    ("/xchunked", 502, None, None),
    ("/obs-fold", 200, (b"content-length", b"5"), b"hello"),
    ("/space-in-name", 502, None, None),
    # Bytes after a Content-Length body are dropped with the server connection.
    ("/extra-bytes", 200, (b"content-length", b"5"), b"hello"),
]


@pytest.mark.parametrize(
    ("path", "status", "framing", "body"), HOSTILE, ids=[h[0] for h in HOSTILE]
)
def test_hostile_response_framing(
    edge: Edge, path: str, status: int, framing: tuple[bytes, bytes] | None, body: bytes | None
) -> None:
    with Client(edge.hostile_port) as c:
        answer = c.request(get(path))  # read strictly: raises on any ambiguous framing
        assert answer.status == status, answer
        if framing is not None:
            framings = [
                (k.encode(), v)
                for k, v in answer.headers
                if k in ("content-length", "transfer-encoding")
            ]
            assert framings == [framing]
            assert answer.body == body
        if path == "/obs-fold":
            assert answer.header("x-a") == [b"b   Content-Length: 99"]
        after = c.request(get("/next"))
        assert (after.status, after.body) == (200, b"fine /next")
        assert c.rest(0.1) == b""
    assert edge.hostile.paths() == [path, "/next"]


def test_backend_that_never_answers_post(edge: Edge) -> None:
    """504 after ``timeout server`` (1 s); a POST is never retried."""
    with Client(edge.hostile_port) as c:
        start = time.monotonic()
        answer = c.request(b"POST /never HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi")
        took = time.monotonic() - start
        assert answer.status == 504
        after = c.request(get("/next"))
        assert (after.status, after.body) == (200, b"fine /next")
    print(f"\nPOST to a silent backend: 504 after {took:.2f} s")
    assert SERVER_TIMEOUT - 0.1 < took < SERVER_TIMEOUT + 1
    assert edge.hostile.paths() == ["/never", "/next"]


def test_backend_that_never_answers_get(edge: Edge) -> None:
    """504 after ``timeout server``, and the GET is not sent again: a backend that timed
    out may have acted on it, and a retry would multiply the load on a slow backend."""
    with Client(edge.hostile_port, timeout=30) as c:
        start = time.monotonic()
        answer = c.request(get("/never"))
        took = time.monotonic() - start
        assert answer.status == 504
        after = c.request(get("/next"))
        assert (after.status, after.body) == (200, b"fine /next")
    print(f"\nGET to a silent backend: 504 after {took:.2f} s")
    assert SERVER_TIMEOUT - 0.1 < took < SERVER_TIMEOUT + 1
    assert edge.hostile.paths() == ["/never", "/next"]


# -- 7. request leniencies ----------------------------------------------


@dataclass(frozen=True)
class Lenient:
    id: str
    raw: bytes
    status: int
    forwarded: dict[str, list[str]] = field(default_factory=dict)
    """Headers the backend must get with exactly these values (forwarded cases)."""
    absent: tuple[str, ...] = ()
    by_backend: bool = False
    """The proxy forwards it and the strict backend itself refuses it."""


LENIENCIES = [
    Lenient("two-hosts", get("/a", "Host: y"), 400),
    # The same Host twice is merged into one.
    Lenient("same-host-twice", get("/a", "Host: x"), 200, {"host": ["x"]}),
    # A Content-Length list of one repeated value is merged (RFC 9110 §8.6).
    Lenient(
        "content-length-3-3",
        b"POST /capture HTTP/1.1\r\nHost: x\r\nContent-Length: 3, 3\r\n\r\nabc",
        200,
        {"content-length": ["3"]},
    ),
    Lenient(
        "content-length-twice",
        b"POST /capture HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
        200,
        {"content-length": ["3"]},
    ),
    Lenient(
        "content-length-3-4",
        b"POST /capture HTTP/1.1\r\nHost: x\r\nContent-Length: 3, 4\r\n\r\nabcd",
        400,
    ),
    Lenient(
        "content-length-plus",
        b"POST /capture HTTP/1.1\r\nHost: x\r\nContent-Length: +3\r\n\r\nabc",
        400,
    ),
    Lenient(
        "content-length-empty",
        b"POST /capture HTTP/1.1\r\nHost: x\r\nContent-Length:\r\n\r\nabc",
        400,
    ),
    # Refused by Kiln's config (kiln_ctl_req): HAProxy 2.6 alone forwards NUL and
    # other controls in header values.
    Lenient("nul-in-header", b"GET /a HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n", 400),
    Lenient("control-in-header", b"GET /a HTTP/1.1\r\nHost: x\r\nX-A: a\x01b\r\n\r\n", 400),
    Lenient("del-in-header", b"GET /a HTTP/1.1\r\nHost: x\r\nX-A: a\x7fb\r\n\r\n", 400),
    Lenient("bare-cr-in-header", b"GET /a HTTP/1.1\r\nHost: x\r\nX-A: a\rb\r\n\r\n", 400),
    Lenient("nul-in-target", b"GET /a\x00b HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    Lenient("nul-in-name", b"GET /a HTTP/1.1\r\nHost: x\r\nX\x00A: b\r\n\r\n", 400),
    # HTAB and UTF-8 in a value are legal field-content.
    Lenient(
        "tab-and-utf8",
        "GET /a HTTP/1.1\r\nHost: x\r\nX-A: a\tb é\r\n\r\n".encode(),
        200,
        {"x-a": ["a\tb Ã©"]},
    ),
    # HAProxy does not act on Connection tokens: Host stays.
    Lenient("connection-host", get("/a", "Connection: host"), 200, {"host": ["x"]}),
    # option http-restrict-req-hdr-names delete: a name with "_" is dropped.
    Lenient(
        "underscore-in-name",
        get("/a", "X_Forwarded_For: 6.6.6.6", "X-Ok: 1"),
        200,
        {"x-ok": ["1"], "x-forwarded-for": ["127.0.0.1"]},
        ("x_forwarded_for",),
    ),
    Lenient("space-in-name", get("/a", "X Foo: 1"), 400),
    Lenient("space-before-colon", get("/a", "X-Foo : 1"), 400),
    Lenient(
        "absolute-form-other-host", b"GET http://other.example/a HTTP/1.1\r\nHost: x\r\n\r\n", 400
    ),
    # An absolute-form target that agrees with Host goes on as it came.
    Lenient(
        "absolute-form-same-host",
        b"GET http://x/a HTTP/1.1\r\nHost: x\r\n\r\n",
        200,
        {"host": ["x"]},
    ),
    # No Host at all: HAProxy 2.6 forwards it and the backend refuses it (400).
    Lenient("no-host", b"GET /a HTTP/1.1\r\n\r\n", 400, by_backend=True),
    # Bare LF line ends are accepted and forwarded as CRLF.
    Lenient("bare-lf-request", b"GET /a HTTP/1.1\nHost: x\n\n", 200, {"host": ["x"]}),
    Lenient("http09", b"GET /\r\n\r\n", 400),
    Lenient("oversized-headers", get("/a", "X-Big: " + "a" * 17_000), 400),
    Lenient("many-headers", get("/a", *[f"X-{i}: {i}" for i in range(200)]), 400),
    Lenient(
        "bad-chunk", post(b"Transfer-Encoding: chunked\r\n", b"5\r\nhelloXX\r\n0\r\n\r\n"), 400
    ),
]


def counted_4xx(router: HAProxyRouter) -> int:
    return router.counters()["strict"].responses["4xx"]


@pytest.mark.parametrize("case", LENIENCIES, ids=lambda c: c.id)
def test_request_leniency(edge: Edge, case: Lenient) -> None:
    before = edge.router.counters()["strict"]
    with Client(edge.strict_port) as c:
        answer = c.request(case.raw)
        assert answer.status == case.status, answer
    seen = edge.strict.seen()
    if case.status < 400:
        (one,) = seen
        for name, values in case.forwarded.items():
            assert [v for k, v in one["headers"] if k == name] == values, one["headers"]
        for name in case.absent:
            assert name not in [k for k, _ in one["headers"]]
        assert answer.body.startswith(b"ok ") or answer.body.startswith(b"captured ")
    elif case.by_backend:
        assert answer.body == b"Invalid HTTP request received."
    else:
        assert seen == [], "a request the proxy refused reached the backend"
        assert b"400 Bad request" in answer.body
    # Whatever it was, the proxy keeps serving, and a refused request is the client's
    # error: the backend is never blamed.
    # (HAProxy counts a stream when it ends, which may be just after the answer.)
    if not case.by_backend and case.status >= 400:
        wait_until(lambda: counted_4xx(edge.router) > before.responses["4xx"], 2, "the 400 counted")
    after = edge.router.counters()["strict"]
    assert after.backends["s1"].errors == before.backends["s1"].errors
    if not case.by_backend and case.status >= 400:
        assert after.responses["4xx"] == before.responses["4xx"] + 1
    with Client(edge.strict_port) as c:
        assert c.request(get("/ok")).status == 200


def test_bad_chunk_mid_stream_is_the_clients_error(edge: Edge) -> None:
    """Head and a first chunk forwarded, then a bad chunk size: 400 to the client,
    counted on the frontend, not as a backend error, and no request completes at the
    backend."""
    before = edge.router.counters()["strict"]
    with Client(edge.strict_port) as c:
        c.send(post(b"Transfer-Encoding: chunked\r\n", b"5\r\nhello\r\n"))
        time.sleep(0.3)
        c.send(b"zz\r\nhello\r\n0\r\n\r\n")
        answer = c.response()
        assert answer.status == 400
        assert c.closed(2.0)
    wait_until(lambda: counted_4xx(edge.router) > before.responses["4xx"], 2, "the 400 counted")
    after = edge.router.counters()["strict"]
    assert after.backends["s1"].errors == before.backends["s1"].errors == 0
    assert after.responses["4xx"] == before.responses["4xx"] + 1
    assert edge.strict.seen() == []


def test_counters_blame_the_hostile_backend_not_clients(edge: Edge) -> None:
    """Bad responses are the backend's errors (the mirror of the bad chunk)."""
    before = edge.router.counters()["hostile"].backends["h1"].errors
    for path in ("/two-content-lengths", "/bare-cr-status"):
        with Client(edge.hostile_port) as c:
            assert c.request(get(path)).status == 502
    wait_until(
        lambda: edge.router.counters()["hostile"].backends["h1"].errors >= before + 2,
        2,
        "the 502s counted",
    )
    assert edge.router.counters()["hostile"].backends["h1"].errors == before + 2
