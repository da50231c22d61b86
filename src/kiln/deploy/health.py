"""Health probes and the per-instance state machine that turns their results into readiness.

The probes do network I/O but decide nothing; :class:`HealthTracker` decides
but does no I/O: the agent probes every ``interval`` and feeds each result,
with its timestamp, to the instance's tracker.

``kind == "none"`` (no check declared) is probed as TCP: an instance is ready
once something accepts connections on its ``$PORT``. Every Kiln service has a
port and the proxy routes to it, so a process that is alive but not listening
is not yet useful; a TCP connect is the cheapest proof that it is both.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum

from kiln.spec.models import Health

__all__ = [
    "ExecRunner",
    "HealthState",
    "HealthTracker",
    "ProbeResult",
    "probe",
    "probe_exec",
    "probe_http",
    "probe_tcp",
]

ExecRunner = Callable[[Sequence[str], float], Awaitable[int]]
"""Runs ``argv`` inside the instance with a timeout (seconds) and returns its exit code.

Runtime-specific (the local runtime enters the sandbox, Docker uses ``exec``);
raising ``TimeoutError`` or ``OSError`` counts as a failed check.
"""


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    detail: str
    duration: float


async def probe_http(host: str, port: int, path: str, timeout: float) -> ProbeResult:
    """GET ``path``; any 2xx or 3xx answer passes (as Kubernetes and Nomad count it)."""
    started = time.monotonic()
    try:
        async with asyncio.timeout(timeout):
            status = await _http_status(host, port, path)
    except TimeoutError:
        return ProbeResult(False, f"GET {path}: no answer within {timeout:g}s", _since(started))
    except (OSError, ValueError) as e:
        return ProbeResult(False, f"GET {path}: {_why(e)}", _since(started))
    ok = 200 <= status < 400
    return ProbeResult(ok, f"GET {path}: HTTP {status}", _since(started))


async def _connected(host: str, port: int) -> socket.socket:
    """A new connection on a bare non-blocking socket: an agent probes every instance
    every interval, and streams and transports cost more CPU than the probe itself."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, (host, port))
    except BaseException:
        sock.close()
        raise
    return sock


async def _http_status(host: str, port: int, path: str) -> int:
    loop = asyncio.get_running_loop()
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    sock = await _connected(host, port)
    try:
        request = (
            f"GET {path} HTTP/1.1\r\nHost: {where}\r\nUser-Agent: kiln-health\r\n"
            "Accept: */*\r\nConnection: close\r\n\r\n"
        )
        await loop.sock_sendall(sock, request.encode("latin-1"))
        head = b""
        while b"\n" not in head and len(head) < 1024:
            chunk = await loop.sock_recv(sock, 1024)
            if not chunk:
                break
            head += chunk
        line = head.split(b"\n", 1)[0]
        parts = line.decode("latin-1").split()
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
            raise ValueError(f"not an HTTP answer: {line[:60]!r}")
        return int(parts[1])
    finally:
        sock.close()


async def probe_tcp(host: str, port: int, timeout: float) -> ProbeResult:
    started = time.monotonic()
    try:
        async with asyncio.timeout(timeout):
            sock = await _connected(host, port)
    except TimeoutError:
        return ProbeResult(False, f"tcp {port}: no connection within {timeout:g}s", _since(started))
    except OSError as e:
        return ProbeResult(False, f"tcp {port}: {_why(e)}", _since(started))
    sock.close()
    return ProbeResult(True, f"tcp {port}: connected", _since(started))


async def probe_exec(run: ExecRunner, argv: Sequence[str], timeout: float) -> ProbeResult:
    started = time.monotonic()
    name = argv[0] if argv else "?"
    try:
        code = await asyncio.wait_for(run(argv, timeout), timeout)
    except TimeoutError:
        return ProbeResult(False, f"exec {name}: still running after {timeout:g}s", _since(started))
    except OSError as e:
        return ProbeResult(False, f"exec {name}: {_why(e)}", _since(started))
    return ProbeResult(code == 0, f"exec {name}: exit {code}", _since(started))


async def probe(health: Health, host: str, port: int, run: ExecRunner | None = None) -> ProbeResult:
    """Run the check ``health`` declares; ``none`` is a TCP connect (see the module doc)."""
    kind = health.kind
    if kind == "http":
        return await probe_http(host, port, health.http or "/", health.timeout)
    if kind == "exec":
        if run is None:
            return ProbeResult(False, "exec checks are not supported by this runtime", 0.0)
        return await probe_exec(run, health.exec or [], health.timeout)
    return await probe_tcp(host, port, health.timeout)


def _since(started: float) -> float:
    return time.monotonic() - started


def _why(e: BaseException) -> str:
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    return getattr(e, "strerror", None) or str(e) or e.__class__.__name__


class HealthState(StrEnum):
    STARTING = "starting"
    READY = "ready"
    UNHEALTHY = "unhealthy"


class HealthTracker:
    """starting → ready after ``healthy_after`` passes in a row; ready → unhealthy after
    ``unhealthy_after`` failures in a row; unhealthy → ready again after ``healthy_after``
    passes (the proxy puts it back while the reconciler's replacement starts).

    A starting instance is never marked unhealthy: it either becomes ready or
    misses the rollout's ``healthy_deadline``. Failures during ``start_period``
    break a streak of passes but never count towards ``unhealthy_after``.
    """

    def __init__(self, health: Health, started: float) -> None:
        self.health = health
        self.started = started
        self.state = HealthState.STARTING
        self.passes = 0
        self.failures = 0
        self.ready_since: float | None = None
        self.changed_at = started
        self.last: ProbeResult | None = None

    def observe(self, result: ProbeResult | bool, now: float) -> HealthState:
        """Feed one probe result taken at ``now``; returns the state afterwards."""
        ok = result if isinstance(result, bool) else result.ok
        if not isinstance(result, bool):
            self.last = result
        if ok:
            self.passes += 1
            self.failures = 0
            if self.state is not HealthState.READY and self.passes >= self.health.healthy_after:
                self._become(HealthState.READY, now)
                self.ready_since = now
        else:
            self.passes = 0
            if now < self.started + self.health.start_period:
                return self.state
            self.failures += 1
            if self.state is HealthState.READY and self.failures >= self.health.unhealthy_after:
                self._become(HealthState.UNHEALTHY, now)
                self.ready_since = None
        return self.state

    def _become(self, state: HealthState, now: float) -> None:
        self.state = state
        self.changed_at = now

    @property
    def ready(self) -> bool:
        return self.state is HealthState.READY
