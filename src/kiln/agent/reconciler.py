"""Self-healing, carried out: replace what died or turned unhealthy, create what is missing.

The decision is :func:`kiln.deploy.reconcile.reconcile` (pure); this module
builds its view from the working set in state.db (never all of history) and
carries it out through the lifecycle. It runs when something changes (a
death, a health verdict, the end of a rollout, an apply), and on a timer only
while it has work waiting (a backoff, a budget of parallel starts); an agent
whose services are all at their desired count does not wake it at all.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from kiln.agent.waiting import wait_set
from kiln.deploy.reconcile import ReconcilePolicy, ReconcileView, reconcile

if TYPE_CHECKING:
    from kiln.agent.engine import Engine

__all__ = ["BUSY_INTERVAL", "IDLE_INTERVAL", "Reconciler"]

log = logging.getLogger("kiln.agent")

BUSY_INTERVAL = 0.5
"""While work waits on something no event announces (a free slot of max_parallel)."""
IDLE_INTERVAL = 60.0
"""A safety pass when nothing happened at all."""


class Reconciler:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.wake = asyncio.Event()
        self.breaker_reset: dict[str, float] = {}
        self.passes = 0
        """How many passes ran: what a test of an idle agent reads."""

    def poke(self) -> None:
        self.wake.set()

    async def loop(self) -> None:
        while True:
            self.wake.clear()
            try:
                delay = await self.once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("reconcile pass failed")
                delay = BUSY_INTERVAL
            await wait_set(self.wake, max(0.05, delay))

    async def once(self) -> float:
        """One pass over every service; returns how long until a pass is needed again
        without any event."""
        e = self.engine
        self.passes += 1
        now = time.time()
        delay = IDLE_INTERVAL
        for service in await e.db(e.state.services):
            if service in e.rollouts.running:
                continue
            active = await e.db(e.state.active_revision, service)
            if active is None:
                continue
            policy = ReconcilePolicy.from_heal(active.config.get("heal"))
            view = ReconcileView.from_records(
                service,
                active.number,
                int(active.config.get("replicas", 1)),
                await e.db(e.state.working_set, service, now - policy.meltdown_window),
                now,
                breaker_open=any(a.kind == "meltdown" for a in await e.db(e.state.alarms, service)),
                breaker_reset_at=self.breaker_reset.get(service, 0.0),
                policy=policy,
            )
            decision = reconcile(view, now)
            if decision.wait_until is not None:
                delay = min(delay, decision.wait_until - now)
            if decision.noop:
                starved = sum(1 for i in view.instances if i.state in ("failed", "lost")
                              and not i.replaced)  # fmt: skip
                if starved and not decision.breaker_open and decision.wait_until is None:
                    delay = min(delay, BUSY_INTERVAL)
                continue
            delay = min(delay, BUSY_INTERVAL)
            for draft in decision.events:
                e.emit(**draft.kwargs())
            if decision.trip_breaker:
                message = decision.events[0].message if decision.events else "meltdown"
                await e.db(e.state.raise_alarm, service, "meltdown", message)
                continue
            for item in decision.replace:
                rev = await e.revision(service, item.revision)
                rec = await e.lifecycle.new(service, rev, replaces=item.instance)
                e.emit(
                    "reconcile.replace",
                    f"replacing {item.instance} ({item.reason}) with {rec.id}",
                    service,
                    item.instance,
                    rev.number,
                    {"replacement": rec.id, "reason": item.reason},
                )
                e.lifecycle.launch(rec, rev)
            for _ in range(decision.create):
                rec = await e.lifecycle.new(service, active)
                e.emit(
                    "reconcile.create",
                    f"starting {rec.id} to reach {view.desired} replicas",
                    service,
                    rec.id,
                    active.number,
                )
                e.lifecycle.launch(rec, active)
        return delay
