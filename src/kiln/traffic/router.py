"""The ``Router`` boundary: the one way the engine programs the data plane.

The rollout, heal and rollback code hands a router the desired ``Route`` of
each service and reads its counters back; which proxy is behind it (HAProxy
today, see :mod:`kiln.traffic.haproxy`) is not its business.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from kiln.traffic.routes import Route

__all__ = ["BackendCounters", "Latency", "Router", "ServiceCounters"]

RESPONSE_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx", "other")


class Latency:
    """A cumulative latency histogram in milliseconds, at two significant digits.

    Cumulative so that a later reader (a canary's analysis) can subtract two
    snapshots and judge just the window between them.
    """

    __slots__ = ("counts", "total")

    def __init__(self, counts: dict[int, int] | None = None) -> None:
        self.counts: dict[int, int] = dict(counts or {})
        self.total = sum(self.counts.values())

    @staticmethod
    def bucket(ms: int) -> int:
        if ms < 100:
            return max(ms, 0)
        scale = 10 ** (len(str(ms)) - 2)
        return int((ms + scale - 1) // scale * scale)

    def add(self, ms: int) -> None:
        key = self.bucket(ms)
        self.counts[key] = self.counts.get(key, 0) + 1
        self.total += 1

    def quantile(self, q: float) -> float | None:
        """The smallest bucket at or above the ``q`` quantile, in seconds."""
        if self.total == 0:
            return None
        keys = sorted(self.counts)
        running = []
        acc = 0
        for k in keys:
            acc += self.counts[k]
            running.append(acc)
        rank = max(1, -(-int(q * 1_000_000) * self.total // 1_000_000))
        return keys[min(bisect.bisect_left(running, rank), len(keys) - 1)] / 1000.0

    def since(self, earlier: Latency) -> Latency:
        return Latency(
            {
                k: v - earlier.counts.get(k, 0)
                for k, v in self.counts.items()
                if v - earlier.counts.get(k, 0) > 0
            }
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "count": self.total,
            "p50": self.quantile(0.50),
            "p95": self.quantile(0.95),
            "p99": self.quantile(0.99),
        }


@dataclass
class BackendCounters:
    """Since the router started: ``active`` is a gauge, the rest only grow."""

    requests: int = 0
    responses: dict[str, int] = field(default_factory=lambda: dict.fromkeys(RESPONSE_CLASSES, 0))
    errors: int = 0
    """Connections to the backend that failed, and responses it broke off."""
    active: int = 0
    latency: Latency = field(default_factory=Latency)

    def to_json(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "responses": dict(self.responses),
            "errors": self.errors,
            "active": self.active,
            "latency": self.latency.to_json(),
        }


@dataclass
class ServiceCounters:
    """A service's backends, and what its listener answered itself (a 503 with no
    ready backend, a 400 for a malformed request)."""

    backends: dict[str, BackendCounters] = field(default_factory=dict)
    requests: int = 0
    responses: dict[str, int] = field(default_factory=lambda: dict.fromkeys(RESPONSE_CLASSES, 0))
    connections: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "responses": dict(self.responses),
            "connections": self.connections,
            "backends": {k: v.to_json() for k, v in sorted(self.backends.items())},
        }


@runtime_checkable
class Router(Protocol):
    """A data plane that serves each service's route.

    Every method may block (it talks to another process) and is called from a
    worker thread; implementations are thread-safe. Failures are ``KilnError``
    (a ``RouteError`` for a route that cannot be served); after one, what was
    served before keeps being served.
    """

    def start(self) -> str:
        """Adopt a data plane that still serves, or start one; "adopted" or "started"."""
        ...

    def apply(self, route: Route) -> bool:
        """Make ``route`` what its service serves; whether anything changed."""
        ...

    def remove(self, service: str) -> None:
        """Stop serving ``service``; its listener closes."""
        ...

    def routes(self) -> dict[str, Route]:
        """What the data plane serves now, read back from it."""
        ...

    def check_listen(self, port: int) -> None:
        """Raise ``RouteError`` if a new listener could not take ``port``."""
        ...

    def drain(self, service: str, backend: str, timeout: float) -> int:
        """Wait until ``backend`` (already draining) has no request in flight, at most
        ``timeout`` seconds, then cut what is left; returns how many were cut."""
        ...

    def counters(self) -> dict[str, ServiceCounters]: ...

    def check(self) -> list[str]:
        """Ask the data plane to answer on every listener and its control channel;
        what did not answer (empty: healthy)."""
        ...

    def info(self) -> dict[str, Any]:
        """What an operator sees of the data plane (its kind, process, generation)."""
        ...

    def exit_fd(self) -> int | None:
        """A file descriptor that becomes readable when the data plane's process exits,
        so a supervisor can wait for it without polling; None if it has none."""
        ...

    def restart(self, reason: str) -> None:
        """Replace a data plane that died or stopped answering, with every route."""
        ...

    def stop(self) -> None:
        """Stop serving everything (``kiln down``)."""
        ...

    def close(self) -> None:
        """Let go of the data plane without stopping it (the agent exits)."""
        ...
