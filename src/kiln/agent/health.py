"""Health checking of every instance in service: one supervised probe loop each.

The probes and the pass/fail state machine are :mod:`kiln.deploy.health`; this
module runs them against the address the runtime gave each instance and turns
their verdicts into lifecycle moves (``ready``, ``unhealthy``) and, for an
instance that replaces another, the end of that one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from kiln.agent.lifecycle import IN_SERVICE, handle_of
from kiln.deploy.health import ExecRunner, HealthState, HealthTracker, probe
from kiln.deploy.state import InstanceRecord
from kiln.errors import KilnError
from kiln.runtime import Execer, ExitSuspect
from kiln.spec.models import Health, Update

if TYPE_CHECKING:
    from kiln.agent.engine import Engine

__all__ = ["STARTING_PROBE_DELAY", "HealthChecks"]

log = logging.getLogger("kiln.agent")

STARTING_PROBE_DELAY = 0.05


class HealthChecks:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.trackers: dict[str, HealthTracker] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}

    def track(self, rec: InstanceRecord, adopted: bool = False) -> None:
        e = self.engine
        cfg = e.configs.get((rec.service, rec.revision), {})
        health = Health.model_validate(cfg.get("health") or {})
        tracker = HealthTracker(health, rec.created)
        if adopted and rec.state == "ready":
            tracker.observe(True, time.time())
            tracker.ready_since = rec.ready_at or time.time()
        self.trackers[rec.id] = tracker
        self.forget_task(rec.id)
        self.tasks[rec.id] = e.spawn(self._supervised(rec, health), f"health {rec.id}")

    async def _supervised(self, rec: InstanceRecord, health: Health) -> None:
        """An exception must not end an instance's health checks in silence: it is
        recorded and the checks start again."""
        while True:
            try:
                await self._loop(rec.id, health)
                return
            except asyncio.CancelledError:
                raise
            except Exception as err:
                log.error("health checks of %s failed", rec.id, exc_info=err)
                self.engine.emit(
                    "instance.health_error",
                    f"{rec.id}: health checking failed ({type(err).__name__}: {err}); restarted",
                    rec.service,
                    rec.id,
                    rec.revision,
                )
                await asyncio.sleep(health.interval)

    def forget(self, iid: str) -> None:
        self.trackers.pop(iid, None)
        self.forget_task(iid)

    def forget_task(self, iid: str) -> None:
        task = self.tasks.pop(iid, None)
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    def state_of(self, iid: str) -> str | None:
        tracker = self.trackers.get(iid)
        return tracker.state.value if tracker is not None else None

    def last_probe(self, iid: str) -> str | None:
        """What the last probe saw (``GET /healthz: HTTP 503``), for status and waits."""
        tracker = self.trackers.get(iid)
        last = tracker.last if tracker is not None else None
        return last.detail if last is not None else None

    def ready_since(self, rec: InstanceRecord) -> float | None:
        tracker = self.trackers.get(rec.id)
        return tracker.ready_since if tracker is not None else rec.ready_at

    async def _loop(self, iid: str, health: Health) -> None:
        """Probe at ``interval``, except that a starting instance that has not passed
        yet is probed on a quick ramp (50 ms, doubling up to ``interval``): readiness
        is seen as soon as the app answers, which is what rollouts and recovery wait on.
        Failures while starting never count against an instance, so the ramp is free.
        """
        e = self.engine
        tracker = self.trackers[iid]
        ramp = STARTING_PROBE_DELAY
        rec = await e.db(e.state.instance, iid)
        handle = handle_of(rec)
        if handle is None:
            return
        run = self._exec_runner(rec)
        while True:
            if rec.state not in IN_SERVICE:
                return
            result = await probe(health, handle.host, handle.port, run)
            if not result.ok and rec.state == "ready" and isinstance(e.runtime, ExitSuspect):
                e.runtime.suspect_exit(handle)  # a dead one is replaced sooner than unhealthy
            before = tracker.state
            now = time.time()
            after = tracker.observe(result, now)
            if after is not before:
                moved = await self._changed(rec, after, result.detail, now)
                if moved is None:
                    return
                rec = moved
            elif (
                rec.state == "starting"
                and rec.service not in e.rollouts.running
                and await self._missed_deadline(rec, result.detail, now)
            ):
                return
            if result.ok or tracker.state is not HealthState.STARTING:
                await asyncio.sleep(health.interval)
            else:
                await asyncio.sleep(min(ramp, health.interval))
                ramp *= 2

    def _exec_runner(self, rec: InstanceRecord) -> ExecRunner | None:
        """Exec checks run inside the instance when the runtime can (``Execer``)."""
        e = self.engine
        handle = handle_of(rec)
        runtime = e.runtime
        if handle is None or not isinstance(runtime, Execer) or not runtime.capabilities.exec:
            return None

        async def run(argv: Sequence[str], timeout: float) -> int:
            try:
                code, _ = await e.io(runtime.exec, handle, list(argv), timeout)
            except KilnError as err:
                raise OSError(str(err)) from err
            return code

        return run

    async def _missed_deadline(self, rec: InstanceRecord, detail: str, now: float) -> bool:
        """Outside a rollout nobody else bounds a start: a replacement that never gets
        healthy within ``healthy_deadline`` is failed, so the reconciler backs off."""
        cfg = await self.engine.config_of(rec)
        update = Update.model_validate(cfg.get("update") or {})
        if now - rec.created <= update.healthy_deadline:
            return False
        why = f"not healthy within healthy_deadline {update.healthy_deadline:g}s ({detail})"
        self.trackers.pop(rec.id, None)
        self.tasks.pop(rec.id, None)
        await self.engine.lifecycle.fail(rec, why)
        return True

    async def _changed(
        self, rec: InstanceRecord, health: HealthState, detail: str, now: float
    ) -> InstanceRecord | None:
        e = self.engine
        iid = rec.id
        if health is HealthState.READY:
            moved = await e.lifecycle.move(iid, "ready", ready_at=now)
            if moved is None:
                return None
            e.emit("instance.ready", f"{iid} is ready ({detail})", rec.service, iid, rec.revision)
            if moved.replaces is not None and rec.state == "starting":
                await self._replaced(moved, now)
        elif health is HealthState.UNHEALTHY:
            moved = await e.lifecycle.move(iid, "unhealthy", reason=detail, noticed=now)
            if moved is None:
                return None
            e.emit(
                "instance.unhealthy", f"{iid} is unhealthy ({detail})", rec.service, iid,
                rec.revision,
            )  # fmt: skip
        else:
            return rec
        await e.routing.push(rec.service)
        return moved

    async def _replaced(self, rec: InstanceRecord, now: float) -> None:
        """The instance it replaces goes once this one is ready; the time since its death
        (or unhealth) was noticed is the time to recovery."""
        e = self.engine
        assert rec.replaces is not None
        try:
            dead = await e.db(e.state.instance, rec.replaces)
        except KilnError:
            return
        noticed = dead.noticed or dead.stopped_at or now
        if dead.state in IN_SERVICE:
            e.spawn(e.lifecycle.retire(dead.id, f"unhealthy; replaced by {rec.id}"),
                    f"retire {dead.id}")  # fmt: skip
        await e.db(e.state.record_recovery, rec.service, dead.id, noticed, now)
        seconds = now - noticed
        e.emit(
            "instance.recovered",
            f"{dead.id} replaced by {rec.id}: time to recovery {seconds:.2f}s",
            rec.service,
            dead.id,
            rec.revision,
            {"replacement": rec.id, "time_to_recovery": seconds},
        )
