"""A data plane in memory, for engine tests and benchmarks where the proxy is not
what is measured.

It serves nothing: it records the route of each service (and so each backend's
address, weight and state) as the engine sets it, refuses what HAProxy would
refuse (two services on one port, a port some other program holds), drains at
once and counts no traffic. Reusing one object across two engines is an agent
restart whose data plane survived: the second ``start`` adopts it, routes and
all.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Any

from kiln.traffic.router import BackendCounters, ServiceCounters
from kiln.traffic.routes import BackendState, Route, RouteError

__all__ = ["MemoryRouter", "RouterCalls"]


@dataclass(frozen=True)
class RouterCalls:
    """How many times the engine changed or read the data plane."""

    applies: int = 0
    changes: int = 0
    """Applies that changed something (an identical route is not a change)."""
    removes: int = 0
    drains: int = 0
    restarts: int = 0


class MemoryRouter:
    """The :class:`kiln.traffic.router.Router` protocol over a dict; thread-safe.

    ``busy_ports`` are ports another program holds: ``check_listen`` refuses
    them, as binding them would fail.
    """

    def __init__(self, busy_ports: Iterable[int] = ()) -> None:
        self.busy_ports = set(busy_ports)
        self._lock = threading.Lock()
        self._routes: dict[str, Route] = {}
        self._running = False
        self._generation = 0
        self._counts = {f.name: 0 for f in fields(RouterCalls)}
        self._drained: list[tuple[str, str]] = []
        self._history: dict[tuple[str, str], list[BackendState | None]] = {}
        self.restart_reasons: list[str] = []

    # what the test reads

    @property
    def calls(self) -> RouterCalls:
        with self._lock:
            return RouterCalls(**self._counts)

    @property
    def running(self) -> bool:
        with self._lock:
            return self._running

    def backend_state(self, service: str, backend: str) -> BackendState | None:
        """The state the route of ``service`` gives ``backend`` now; None if it has none."""
        with self._lock:
            route = self._routes.get(service)
            found = route.backend(backend) if route is not None else None
            return found.state if found is not None else None

    def backend_history(self, service: str, backend: str) -> list[BackendState | None]:
        """Every state the route of ``service`` gave ``backend``, in order; None where
        it left the route. What happened between two looks of a test is kept."""
        with self._lock:
            return list(self._history.get((service, backend), []))

    def drained(self) -> list[tuple[str, str]]:
        """Every (service, backend) drained, in order."""
        with self._lock:
            return list(self._drained)

    # the Router protocol

    def start(self) -> str:
        with self._lock:
            if self._running:
                return "adopted"
            self._running = True
            self._generation += 1
            self._routes = {}
            return "started"

    def apply(self, route: Route) -> bool:
        with self._lock:
            for other in self._routes.values():
                if other.name != route.name and other.listen == route.listen:
                    raise RouteError(
                        f"service {route.name!r}: port {route.listen} is already served "
                        f"for service {other.name!r}"
                    )
            old = self._routes.get(route.name)
            changed = old != route
            if changed:
                self._record(route.name, old, route)
            self._routes[route.name] = route
            self._counts["applies"] += 1
            self._counts["changes"] += int(changed)
            return changed

    def remove(self, service: str) -> None:
        with self._lock:
            self._record(service, self._routes.pop(service, None), None)
            self._counts["removes"] += 1

    def routes(self) -> dict[str, Route]:
        with self._lock:
            return dict(self._routes)

    def check_listen(self, port: int) -> None:
        with self._lock:
            if any(r.listen == port for r in self._routes.values()):
                return
            if port in self.busy_ports:
                raise RouteError(f"port {port} is in use by another program")

    def drain(self, service: str, backend: str, timeout: float) -> int:
        with self._lock:
            self._drained.append((service, backend))
            self._counts["drains"] += 1
        return 0

    def counters(self) -> dict[str, ServiceCounters]:
        with self._lock:
            return {
                name: ServiceCounters(backends={b.id: BackendCounters() for b in route.backends})
                for name, route in self._routes.items()
            }

    def check(self) -> list[str]:
        return []

    def info(self) -> dict[str, Any]:
        with self._lock:
            return {
                "kind": "memory",
                "pid": None,
                "generation": self._generation if self._running else None,
            }

    def exit_fd(self) -> int | None:
        return None

    def restart(self, reason: str) -> None:
        with self._lock:
            self._generation += 1
            self._running = True
            self.restart_reasons.append(reason)
            self._counts["restarts"] += 1

    def stop(self) -> None:
        with self._lock:
            for name, route in self._routes.items():
                self._record(name, route, None)
            self._routes = {}
            self._running = False

    def close(self) -> None:
        """The data plane outlives the agent: nothing to let go of."""

    def _record(self, service: str, old: Route | None, new: Route | None) -> None:
        before = {b.id: b.state for b in old.backends} if old is not None else {}
        after = {b.id: b.state for b in new.backends} if new is not None else {}
        for backend in before.keys() | after.keys():
            if before.get(backend) != after.get(backend):
                self._history.setdefault((service, backend), []).append(after.get(backend))
