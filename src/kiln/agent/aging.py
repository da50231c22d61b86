"""Maximum instance age: no instance lives past its service's ``max_age``.

One timer for the agent, set to the next expiry and re-armed whenever an instance
changes state (a start, the end of a rollout), so an idle agent wakes only when an
instance is due. An instance's expiry is ``created + max_age`` brought earlier by a
jitter of 0-10% drawn from its id: instances started together leave at different
times, and none ever outlives ``max_age`` (the ceiling is the promise).

Expired instances are replaced by a rollout of kind ``age`` that names them, as
``kiln restart`` names every instance: new ones of the active revision start within
the service's ``update`` settings (max_surge, max_unavailable, min_healthy_time), the
aged ones are drained and retired once their replacements are healthy, so no request
fails. A service with a rollout running is left to it and looked at when it ends.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from typing import TYPE_CHECKING

from kiln.agent.rollouts import Rollout
from kiln.agent.waiting import wait_set

if TYPE_CHECKING:
    from kiln.agent.engine import Engine
    from kiln.deploy.state import InstanceRecord, Revision

__all__ = ["AGE_JITTER", "Aging", "expiry"]

AGE_JITTER = 0.1
"""The most an instance's expiry is brought forward, as a fraction of max_age."""
IDLE_WAKE = 3600.0
"""With nothing due, the timer still fires this often (a safety pass)."""


def expiry(rec: InstanceRecord, max_age: float) -> float:
    """When ``rec`` is due: between 90% and 100% of max_age after it was created, the
    same for the same id after an agent restart."""
    draw = int.from_bytes(hashlib.sha256(rec.id.encode()).digest()[:4], "big") / 2**32
    return rec.created + max_age * (1.0 - AGE_JITTER * draw)


class Aging:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.wake = asyncio.Event()
        self.passes = 0
        """How many times the timer fired or was poked: what a test of an idle agent reads."""

    def poke(self) -> None:
        self.wake.set()

    async def loop(self) -> None:
        while True:
            self.wake.clear()
            delay = await self.once()
            await wait_set(self.wake, max(0.05, delay))

    async def once(self) -> float:
        """Replace what is due; returns the time until the next instance is."""
        e = self.engine
        self.passes += 1
        now = time.time()
        delay = IDLE_WAKE
        for service in await e.db(e.state.services):
            active = await e.db(e.state.active_revision, service)
            max_age = float((active.config.get("max_age") or 0) if active else 0)
            if active is None or max_age <= 0 or service in e.rollouts.running:
                continue
            ready = [r for r in await e.db(e.state.instances, service, True) if r.state == "ready"]
            due = {r.id: r for r in ready if expiry(r, max_age) <= now}
            later = [expiry(r, max_age) - now for r in ready if r.id not in due]
            if later:
                delay = min(delay, min(later))
            if due:
                await self._replace(service, active, max_age, list(due.values()), now)
        return delay

    async def _replace(
        self, service: str, active: Revision, max_age: float, due: list[InstanceRecord], now: float
    ) -> None:
        e = self.engine
        record = await e.deployments.create(
            f"max_age: replace {len(due)} instance(s) of {service}", {service: active.number}
        )
        for rec in due:
            e.emit(
                "instance.aged",
                f"{rec.id} is {now - rec.created:.1f}s old (max_age {max_age:g}s); replacing it",
                service,
                rec.id,
                rec.revision,
                {"age": now - rec.created, "max_age": max_age, "deployment": record["id"]},
            )
        await e.rollouts.begin(
            Rollout(
                service,
                active,
                str(record["id"]),
                "age",
                time.time(),
                named=frozenset(r.id for r in due),
            )
        )
