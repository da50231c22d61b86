"""Live state of one service in the proxy: its backends, their connections, counters.

A ``ServiceState`` outlives listener changes: a PUT that moves the port swaps
the listener but keeps the backends, their pools and their counters. Backends
are matched by id *and* address; a backend whose address changed is a new
backend, and the old one drains.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
from typing import Any

from kiln.traffic._conn import HIGH_WATER, BufferedConn
from kiln.traffic._routes import Backend, Route

log = logging.getLogger("kiln.traffic.proxy")

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
MAX_IDLE_PER_BACKEND = 128


class UpstreamListener:
    """What an exchange on callbacks hears from the upstream connection it is using."""

    def upstream_data(self) -> None:
        raise NotImplementedError

    def upstream_closed(self) -> None:
        raise NotImplementedError


class Upstream(BufferedConn):
    """One connection to a backend, pooled between requests when keep-alive allows.

    While an exchange drives it on callbacks, ``listener`` hears every byte and
    the end of the connection; otherwise bytes wait in ``buf`` for a coroutine.
    A pooled connection that receives anything is discarded: a backend has
    nothing to say between requests except that it is closing.
    """

    def __init__(self, backend: BackendState) -> None:
        super().__init__()
        self.backend = backend
        self.listener: UpstreamListener | None = None
        self.pooled = False

    def data_received(self, data: bytes) -> None:
        listener = self.listener
        if listener is None:
            super().data_received(data)
            if self.pooled:
                self.backend.discard(self)
            return
        buf = self.buf
        buf += data
        if len(buf) > HIGH_WATER and not self.read_paused:
            self.read_paused = True
            self.transport.pause_reading()
        listener.upstream_data()

    def eof_received(self) -> bool | None:
        super().eof_received()
        self._ended()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._ended()
        self.backend.conns.discard(self)

    def _ended(self) -> None:
        listener = self.listener
        if listener is not None:
            self.listener = None
            listener.upstream_closed()
        elif self.pooled:
            self.backend.discard(self)


class BackendStats:
    __slots__ = (
        "buckets",
        "bytes_in",
        "bytes_out",
        "connections",
        "errors_connect",
        "errors_reset",
        "latency_count",
        "latency_sum",
        "requests",
        "responses",
    )

    def __init__(self) -> None:
        self.requests = 0
        self.connections = 0
        self.responses = [0, 0, 0, 0, 0, 0]  # index = status // 100
        self.errors_connect = 0
        self.errors_reset = 0
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0
        self.latency_count = 0
        self.bytes_in = 0
        self.bytes_out = 0

    def observe(self, status: int, seconds: float) -> None:
        self.responses[min(status // 100, 5)] += 1
        self.buckets[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.latency_sum += seconds
        self.latency_count += 1

    def to_json(self, protocol: str) -> dict[str, Any]:
        cumulative: dict[str, int] = {}
        running = 0
        for bound, n in zip((*LATENCY_BUCKETS, float("inf")), self.buckets, strict=True):
            running += n
            cumulative["+Inf" if bound == float("inf") else repr(bound)] = running
        out: dict[str, Any] = {
            "errors": {"connect": self.errors_connect, "reset": self.errors_reset},
        }
        if protocol == "http":
            out["requests"] = self.requests
            out["responses"] = {f"{i}xx": self.responses[i] for i in range(1, 6)}
            out["latency"] = {
                "buckets": cumulative,
                "sum": self.latency_sum,
                "count": self.latency_count,
            }
        else:
            out["connections"] = self.connections
            out["bytes_in"] = self.bytes_in
            out["bytes_out"] = self.bytes_out
        return out


class BackendState:
    __slots__ = (
        "active",
        "conns",
        "current",
        "drain_timer",
        "draining",
        "host",
        "host_header",
        "id_header",
        "idle",
        "port",
        "service",
        "spec",
        "stats",
        "weight",
    )

    def __init__(self, spec: Backend, service: ServiceState) -> None:
        self.spec = spec
        self.service = service
        self.host = spec.host
        self.port = spec.port
        self.weight = spec.weight
        self.current = 0
        self.active = 0
        self.draining = False
        self.drain_timer: asyncio.TimerHandle | None = None
        self.idle: list[Upstream] = []
        self.conns: set[Upstream] = set()
        self.stats = BackendStats()
        self.id_header = b"X-Kiln-Backend: " + spec.id.encode() + b"\r\n"
        self.host_header = b"Host: " + spec.address.encode() + b"\r\n"

    @property
    def id(self) -> str:
        return self.spec.id

    def take_idle(self) -> Upstream | None:
        idle = self.idle
        while idle:
            up = idle.pop()
            up.pooled = False
            if not up.eof and not up.buf and not up.transport.is_closing():
                return up
            self.discard(up)
        return None

    async def connect(self, timeout: float) -> Upstream:
        loop = asyncio.get_running_loop()
        _, up = await asyncio.wait_for(
            loop.create_connection(self._new_upstream, self.host, self.port), timeout
        )
        if up.closed:
            raise ConnectionResetError(f"backend {self.spec.id} closed the connection at once")
        self.conns.add(up)
        return up

    def _new_upstream(self) -> Upstream:
        return Upstream(self)

    def release(self, up: Upstream, reusable: bool) -> None:
        """Hands a connection back after a complete exchange."""
        up.listener = None
        if (
            reusable
            and not self.draining
            and len(self.idle) < MAX_IDLE_PER_BACKEND
            and not up.eof
            and not up.buf
        ):
            up.pooled = True
            self.idle.append(up)
        else:
            self.discard(up)

    def discard(self, up: Upstream) -> None:
        """Closes ``up`` for good; a listener still attached hears about it."""
        self.conns.discard(up)
        if up.pooled:
            up.pooled = False
            self.idle.remove(up)
        up.abort()

    def finished(self) -> None:
        """One request (http) or connection (tcp) on this backend is over."""
        self.active -= 1
        if self.draining and self.active <= 0:
            self.service.drained(self)

    def close_idle(self) -> None:
        while self.idle:
            self.discard(self.idle[-1])

    def force_close(self) -> None:
        self.close_idle()
        for up in list(self.conns):
            self.discard(up)

    def to_json(self) -> dict[str, Any]:
        return {
            **self.spec.to_json(),
            "state": "draining" if self.draining else "ready",
            "active": self.active,
        }


class ServiceState:
    """Backends of one service, the smooth weighted round robin, and drain bookkeeping."""

    def __init__(self, route: Route) -> None:
        self.route = route
        self.name = route.name
        self.server: asyncio.Server | None = None
        self.ready: list[BackendState] = []
        self.draining: list[BackendState] = []
        self.waiters: list[asyncio.Future[None]] = []
        self.clients: set[BufferedConn] = set()
        self.closing = False
        self.unrouted = 0
        self.set_backends(route.backends, route.drain_timeout)

    def set_backends(self, specs: tuple[Backend, ...], drain_timeout: float) -> None:
        current = {(b.id, b.spec.address): b for b in self.ready}
        current_draining = {(b.id, b.spec.address): b for b in self.draining}
        new_ready: list[BackendState] = []
        for spec in specs:
            key = (spec.id, spec.address)
            state = current.pop(key, None)
            if state is None:
                state = current_draining.pop(key, None)
                if state is not None:
                    self.undrain(state)
            if state is None:
                state = BackendState(spec, self)
            state.spec = spec
            state.weight = spec.weight
            new_ready.append(state)
        self.ready = new_ready
        for gone in current.values():
            self.drain(gone, drain_timeout)
        for b in self.ready:
            b.current = 0
        self.notify()

    def drain(self, backend: BackendState, timeout: float) -> None:
        backend.draining = True
        backend.close_idle()
        self.draining.append(backend)
        log.info(
            "backend draining service=%s backend=%s active=%d",
            self.name,
            backend.id,
            backend.active,
        )
        if backend.active <= 0 and not backend.conns:
            self.drained(backend)
            return
        loop = asyncio.get_running_loop()
        backend.drain_timer = loop.call_later(timeout, self._drain_expired, backend)

    def undrain(self, backend: BackendState) -> None:
        backend.draining = False
        if backend.drain_timer is not None:
            backend.drain_timer.cancel()
            backend.drain_timer = None
        if backend in self.draining:
            self.draining.remove(backend)

    def _drain_expired(self, backend: BackendState) -> None:
        backend.drain_timer = None
        if backend in self.draining:
            log.warning(
                "drain timeout, closing service=%s backend=%s active=%d",
                self.name,
                backend.id,
                backend.active,
            )
            backend.force_close()
            self.draining.remove(backend)

    def drained(self, backend: BackendState) -> None:
        if backend.drain_timer is not None:
            backend.drain_timer.cancel()
            backend.drain_timer = None
        if backend in self.draining:
            backend.force_close()
            self.draining.remove(backend)
            log.info("backend drained service=%s backend=%s", self.name, backend.id)

    def pick(self, exclude: set[str] | None) -> BackendState | None:
        """Smooth weighted round robin (nginx's): even spread, exact ratios over time."""
        best: BackendState | None = None
        total = 0
        for b in self.ready:
            w = b.weight
            if w <= 0 or (exclude and b.spec.id in exclude):
                continue
            b.current += w
            total += w
            if best is None or b.current > best.current:
                best = b
        if best is not None:
            best.current -= total
        return best

    def has_candidates(self) -> bool:
        return any(b.weight > 0 for b in self.ready)

    async def wait_change(self, timeout: float) -> None:
        """Waits until the backends change (a PUT) or ``timeout`` passes."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters.append(fut)
        try:
            await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            pass
        finally:
            if fut in self.waiters:
                self.waiters.remove(fut)

    def notify(self) -> None:
        waiters, self.waiters = self.waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    def begin_close(self) -> None:
        """Stops accepting and drains every backend (DELETE, SIGTERM)."""
        self.closing = True
        if self.server is not None:
            self.server.close()
        for conn in list(self.clients):
            if conn.waiting_for_request():
                conn.abort()
        ready, self.ready = self.ready, []
        for b in ready:
            self.drain(b, self.route.drain_timeout)
        self.notify()

    def busy(self) -> bool:
        return bool(self.draining) or any(not c.waiting_for_request() for c in self.clients)

    def to_json(self) -> dict[str, Any]:
        body = self.route.to_json()
        body["backends"] = [b.to_json() for b in self.ready] + [b.to_json() for b in self.draining]
        return body

    def stats_json(self) -> dict[str, Any]:
        proto = self.route.protocol
        return {
            "protocol": proto,
            "listen": self.route.listen,
            "unrouted": self.unrouted,
            "backends": {
                b.id: {
                    **b.stats.to_json(proto),
                    "active": b.active,
                    "state": "draining" if b.draining else "ready",
                }
                for b in (*self.ready, *self.draining)
            },
        }
