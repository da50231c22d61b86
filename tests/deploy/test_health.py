from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from kiln.deploy.health import (
    HealthState,
    HealthTracker,
    ProbeResult,
    probe,
    probe_exec,
    probe_http,
    probe_tcp,
)
from kiln.spec.models import Health


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        code = {"/healthz": 200, "/moved": 302, "/broken": 500}.get(self.path, 404)
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def http_port() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.fixture
def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return int(port)


@pytest.fixture
def hanging_port() -> Iterator[int]:
    """Accepts connections (backlog) but never answers."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    yield s.getsockname()[1]
    s.close()


@pytest.mark.parametrize(
    ("path", "ok", "detail"),
    [
        ("/healthz", True, "HTTP 200"),
        ("/moved", True, "HTTP 302"),
        ("/broken", False, "HTTP 500"),
        ("/missing", False, "HTTP 404"),
    ],
)
def test_probe_http_status(http_port: int, path: str, ok: bool, detail: str) -> None:
    result = asyncio.run(probe_http("127.0.0.1", http_port, path, 2.0))
    assert result.ok is ok
    assert result.detail == f"GET {path}: {detail}"
    assert 0 <= result.duration < 2.0


def test_probe_http_closed_port(closed_port: int) -> None:
    result = asyncio.run(probe_http("127.0.0.1", closed_port, "/healthz", 1.0))
    assert not result.ok
    assert result.detail == "GET /healthz: connection refused"


def test_probe_http_times_out_on_a_hanging_server(hanging_port: int) -> None:
    result = asyncio.run(probe_http("127.0.0.1", hanging_port, "/healthz", 0.3))
    assert not result.ok
    assert result.detail == "GET /healthz: no answer within 0.3s"
    assert 0.25 <= result.duration < 1.5


def test_probe_tcp(http_port: int, closed_port: int) -> None:
    assert asyncio.run(probe_tcp("127.0.0.1", http_port, 1.0)).ok
    refused = asyncio.run(probe_tcp("127.0.0.1", closed_port, 1.0))
    assert not refused.ok and "connection refused" in refused.detail


def test_probe_exec_uses_the_runner() -> None:
    async def runner(argv: Sequence[str], timeout: float) -> int:
        proc = await asyncio.create_subprocess_exec(*argv)
        return await proc.wait()

    assert asyncio.run(probe_exec(runner, ["true"], 2.0)).ok
    failed = asyncio.run(probe_exec(runner, ["false"], 2.0))
    assert not failed.ok and failed.detail == "exec false: exit 1"

    async def slow(argv: Sequence[str], timeout: float) -> int:
        await asyncio.sleep(5)
        return 0

    late = asyncio.run(probe_exec(slow, ["sleep"], 0.2))
    assert not late.ok and "still running after 0.2s" in late.detail


def test_probe_dispatch(http_port: int, closed_port: int) -> None:
    assert asyncio.run(probe(Health(http="/broken"), "127.0.0.1", http_port)).detail.endswith(
        "HTTP 500"
    )
    none_kind = asyncio.run(probe(Health(), "127.0.0.1", http_port))
    assert none_kind.ok and none_kind.detail.startswith("tcp "), "no check → tcp connect"
    assert not asyncio.run(probe(Health(), "127.0.0.1", closed_port)).ok
    unsupported = asyncio.run(probe(Health(exec=["true"]), "127.0.0.1", http_port))
    assert not unsupported.ok and "not supported" in unsupported.detail


PASS = ProbeResult(True, "ok", 0.0)
FAIL = ProbeResult(False, "no", 0.0)


@pytest.mark.parametrize(
    ("health", "feed", "states"),
    [
        # healthy_after=1: the first pass makes it ready.
        (Health(), [(1, PASS)], ["ready"]),
        # healthy_after=2: passes must be consecutive.
        (
            Health(healthy_after=2),
            [(1, PASS), (2, FAIL), (3, PASS), (4, PASS)],
            ["starting", "starting", "starting", "ready"],
        ),
        # A starting instance never turns unhealthy.
        (Health(unhealthy_after=1), [(1, FAIL), (2, FAIL)], ["starting", "starting"]),
        # unhealthy_after=3 consecutive failures once ready; a pass resets the count.
        (
            Health(unhealthy_after=3),
            [(1, PASS), (2, FAIL), (3, FAIL), (4, PASS), (5, FAIL), (6, FAIL), (7, FAIL)],
            ["ready", "ready", "ready", "ready", "ready", "ready", "unhealthy"],
        ),
        # Failures within start_period (10 s after start at t=0) do not count.
        (
            Health(unhealthy_after=1, start_period=10),
            [(1, PASS), (2, FAIL), (9, FAIL), (11, FAIL)],
            ["ready", "ready", "ready", "unhealthy"],
        ),
        # Unhealthy recovers after healthy_after passes.
        (
            Health(unhealthy_after=1, healthy_after=2),
            [(1, PASS), (2, PASS), (3, FAIL), (4, PASS), (5, PASS)],
            ["starting", "ready", "unhealthy", "unhealthy", "ready"],
        ),
    ],
)
def test_tracker_transitions(
    health: Health, feed: list[tuple[float, ProbeResult]], states: list[str]
) -> None:
    tracker = HealthTracker(health, started=0.0)
    got = [tracker.observe(result, now).value for now, result in feed]
    assert got == states


def test_tracker_records_ready_since_and_changes() -> None:
    tracker = HealthTracker(Health(healthy_after=2, unhealthy_after=2), started=100.0)
    assert tracker.state.value == "starting"
    tracker.observe(True, 101.0)
    tracker.observe(True, 102.0)
    assert tracker.ready and tracker.ready_since == 102.0 and tracker.changed_at == 102.0
    tracker.observe(FAIL, 103.0)
    assert tracker.observe(FAIL, 104.0) is HealthState.UNHEALTHY
    assert tracker.ready_since is None and tracker.changed_at == 104.0
    assert tracker.last == FAIL
