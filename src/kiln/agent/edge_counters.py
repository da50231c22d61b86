"""What the Swarm edges counted, kept by the agent while a canary is judged.

On swarm, users come in through the edge proxy of every node, whose HAProxy counts the
requests the agent's own router never sees. While a service's canary runs, each edge
posts its per-backend counters every :data:`REPORT_EVERY` seconds
(``POST /v1/edge/counters``); this keeps, per service and edge, the last report and a
running total that only grows, so the canary's baseline-and-window arithmetic works on
``router counters + edge totals`` as it does on the router's alone.

* An edge's first report for a service is its baseline only: what it counted before
  the analysis began is not the canary's.
* A report lower than the last one of the same edge generation (its HAProxy restarted),
  or the first of a new generation of an edge already seen (the edge process
  restarted), is a reset: it counts from zero, never subtracts. Each generation keeps
  its own last report and total, so two processes that report under one name (an edge
  being replaced while the old one still posts) never count each other's numbers.
* An edge that stops reporting keeps its total (what it counted happened) and is named
  as stale in the canary's analysis, unless a newer generation of it reports.
* A service's counts are kept only while it is watched (its canary runs), so the agent
  holds nothing per backend when no canary runs, and only for the backends of its route
  (and those an edge already counted): names an edge token makes up are dropped, so a
  report's thousands of invented backends cost nothing kept (measured before: 6.7 MiB
  held per edge generation of one 1 MiB report, 1.7 GiB over ``MAX_EDGES``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

from kiln.traffic.edge import REPORT_EVERY
from kiln.traffic.router import RESPONSE_CLASSES, BackendCounters, Latency, ServiceCounters

__all__ = [
    "MAX_EDGES",
    "REPORT_EVERY",
    "STALE_AFTER",
    "EdgeCounters",
    "with_edges",
]

STALE_AFTER = 5 * REPORT_EVERY
"""An edge silent for this long while its service is watched is named as stale."""
MAX_EDGES = 256
"""Edge generations counted per service: one per node, with room for restarted ones; a
report from one more is ignored (a token holder must not grow the agent's memory)."""


@dataclass
class _EdgeSide:
    """One edge process's counts of one service's backends."""

    last: dict[str, BackendCounters]
    reported: float
    totals: dict[str, BackendCounters] = field(default_factory=dict)


class EdgeCounters:
    """Per watched service, per edge generation: the last report and a monotonic total."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._services: dict[str, dict[tuple[str, str], _EdgeSide]] = {}
        self._backends: dict[str, Callable[[], Collection[str]]] = {}

    def watch(self, service: str, backends: Callable[[], Collection[str]] | None = None) -> None:
        """Count ``service`` from the edges' next reports on (its canary began);
        ``backends`` names the ones its route has now (the only ones kept), None: any."""
        self._services.setdefault(service, {})
        if backends is not None:
            self._backends[service] = backends

    def forget(self, service: str) -> None:
        """``service`` is no longer judged: its counts go."""
        self._services.pop(service, None)
        self._backends.pop(service, None)

    def watched(self) -> set[str]:
        return set(self._services)

    def record(
        self, edge: str, generation: str, services: dict[str, dict[str, BackendCounters]]
    ) -> dict[str, list[str]]:
        """One edge's report: which services were counted and which ignored (not
        watched, or one edge too many)."""
        now = self._clock()
        counted: list[str] = []
        ignored: list[str] = []
        key = (edge, generation)
        for service in sorted(services):
            sides = self._services.get(service)
            if sides is None or (key not in sides and len(sides) >= MAX_EDGES):
                ignored.append(service)
                continue
            counted.append(service)
            backends = services[service]
            side = sides.get(key)
            routed = self._backends.get(service)
            if routed is not None:
                known = set(routed()) | (set(side.last) | set(side.totals) if side else set())
                backends = {bid: c for bid, c in backends.items() if bid in known}
            if side is None:
                restarted = any(name == edge for name, _ in sides)
                side = sides[key] = _EdgeSide({}, now)
                if not restarted:  # the edge's history before the analysis: a baseline
                    side.last = dict(backends)
                    continue
            for bid, counters in backends.items():
                grown = _since(counters, side.last.get(bid))
                _add(side.totals.setdefault(bid, BackendCounters()), grown)
                side.totals[bid].active = counters.active
            side.last = dict(backends)
            side.reported = now
        return {"counted": counted, "ignored": ignored}

    def totals(self, service: str) -> dict[str, BackendCounters]:
        """Every edge's total per backend of ``service``, summed."""
        summed: dict[str, BackendCounters] = {}
        for side in self._services.get(service, {}).values():
            for bid, counters in side.totals.items():
                into = summed.setdefault(bid, BackendCounters())
                _add(into, counters)
                into.active += counters.active
        return summed

    def describe(self, service: str) -> dict[str, Any]:
        """For ``kiln status``: how many edges report and which went silent."""
        now = self._clock()
        sides = self._services.get(service, {})
        fresh = {name for (name, _), s in sides.items() if now - s.reported <= STALE_AFTER}
        stale = sorted({name for name, _ in sides} - fresh)
        return {"reporting": len(fresh), "stale": stale}


def with_edges(
    counters: ServiceCounters | None, edges: dict[str, BackendCounters]
) -> ServiceCounters | None:
    """The router's counters of a service plus the edges' totals, per backend."""
    if not edges:
        return counters
    combined = ServiceCounters()
    for source in ((counters.backends if counters is not None else {}), edges):
        for bid, b in source.items():
            into = combined.backends.setdefault(bid, BackendCounters())
            _add(into, b)
            into.active += b.active
    if counters is not None:
        combined.requests = counters.requests
        combined.responses = dict(counters.responses)
        combined.connections = counters.connections
    return combined


def _since(now: BackendCounters, before: BackendCounters | None) -> BackendCounters:
    """What ``now`` counted after ``before``; all of ``now`` when any count went down
    (the proxy restarted, so its counts began again from zero)."""
    if before is None or not _grew(before, now):
        return now
    return BackendCounters(
        requests=now.requests - before.requests,
        responses={
            k: now.responses.get(k, 0) - before.responses.get(k, 0) for k in RESPONSE_CLASSES
        },
        errors=now.errors - before.errors,
        latency=now.latency.since(before.latency),
    )


def _grew(before: BackendCounters, now: BackendCounters) -> bool:
    if now.requests < before.requests or now.errors < before.errors:
        return False
    if any(now.responses.get(k, 0) < v for k, v in before.responses.items()):
        return False
    return all(now.latency.counts.get(k, 0) >= v for k, v in before.latency.counts.items())


def _add(into: BackendCounters, grown: BackendCounters) -> None:
    """Add the growing counts (not the ``active`` gauge, which the caller sets)."""
    into.requests += grown.requests
    into.errors += grown.errors
    for k in RESPONSE_CLASSES:
        into.responses[k] = into.responses.get(k, 0) + grown.responses.get(k, 0)
    counts = dict(into.latency.counts)
    for bucket, n in grown.latency.counts.items():
        counts[bucket] = counts.get(bucket, 0) + n
    into.latency = Latency(counts)
