"""Blue/green: a full green set beside blue, one atomic switch, blue kept for a hold.

The rollout goes through phases, each saved as the rollout's step before it acts
(``PHASE_BASE`` + phase, so a resumed rollout can tell its phases from a rolling
update's step counts), so an agent killed at any moment continues from the phase
it saved:

* ``STARTING``: ``replicas`` green instances start; the route keeps them in
  maintenance while blue serves. Each must be ready within ``healthy_deadline``
  and, when ``pre_promotion`` is set, answer its HTTP path.
* ``WAITING``: green is ready, ``auto_promote`` is off: ``kiln promote`` switches.
* ``SWITCHED``: one route push made green ready and blue maintenance; green's
  revision is active. Blue runs, out of rotation, for ``blue_hold``; ``kiln
  rollback`` within it is an instant switch back (``BACKING_OUT``).
* ``RETIRING``: blue is drained and retired.

Green instances are the ones this rollout's deployment started of its target
revision; every other live instance of the service is blue. Which set the route
serves is derived from the saved phase (:func:`shape`), so a route pushed by
anyone at any moment, including an agent that just restarted, serves one set.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import TYPE_CHECKING, Any

from kiln.agent.errors import Conflict, NotFound
from kiln.agent.lifecycle import handle_of
from kiln.deploy.health import probe_http
from kiln.deploy.state import InstanceRecord
from kiln.errors import KilnError
from kiln.runtime import Execer, InstanceHandle
from kiln.spec.models import Update
from kiln.traffic import Backend

if TYPE_CHECKING:
    from kiln.agent.engine import Engine
    from kiln.agent.rollouts import Rollout, Rollouts

__all__ = [
    "BACKING_OUT",
    "PHASE_BASE",
    "RETIRING",
    "STARTING",
    "SWITCHED",
    "WAITING",
    "BlueGreen",
    "is_blue_green",
    "phase_name",
    "shape",
]

PHASE_BASE = 1_000_000
"""Added to every phase saved as a rollout's step: no rolling update counts that far."""
STARTING = 1
WAITING = 2
SWITCHED = 3
RETIRING = 4
BACKING_OUT = 5
_NAMES = {
    STARTING: "starting green",
    WAITING: "waiting for kiln promote",
    SWITCHED: "switched; holding blue",
    RETIRING: "retiring blue",
    BACKING_OUT: "switched back to blue",
}
_LIVE = ("pending", "starting", "ready", "unhealthy")
_TICK = 0.25


def _update(rollout: Rollout) -> Update:
    return Update.model_validate(rollout.target.config.get("update") or {})


def phase(rollout: Rollout) -> int:
    return rollout.step - PHASE_BASE if rollout.step > PHASE_BASE else 0


def phase_name(rollout: Rollout) -> str:
    return _NAMES.get(phase(rollout), "not started")


def is_blue_green(rollout: Rollout, has_blue: bool) -> bool:
    """A deploy of a blue/green revision that replaces running instances (or one that
    already saved a phase). A first deployment or a scale has no blue and rolls."""
    if rollout.kind != "deploy" or _update(rollout).strategy != "blue-green":
        return False
    return phase(rollout) > 0 or has_blue


def is_green(rollout: Rollout, rec: InstanceRecord) -> bool:
    return (
        rollout.deployment is not None
        and rec.deployment == rollout.deployment
        and rec.revision == rollout.target.number
    )


def shape(rollout: Rollout, rec: InstanceRecord, backend: Backend) -> Backend:
    """The backend as the saved phase has it: only one set is ever in rotation."""
    at = phase(rollout)
    if rollout.kind != "deploy" or at == 0 or backend.state != "ready":
        return backend
    serving_green = at in (SWITCHED, RETIRING)
    if is_green(rollout, rec) != serving_green:
        return dataclasses.replace(backend, state="maintenance")
    return backend


class _Failed(Exception):
    """Green did not pass: why, and which green instances caused it."""

    def __init__(self, why: str, culprits: list[str]) -> None:
        super().__init__(why)
        self.why = why
        self.culprits = culprits


class BlueGreen:
    """The engine's blue/green part: runs the phases and answers promote and rollback."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._promoted: dict[str, asyncio.Event] = {}

    async def has_blue(self, rollouts: Rollouts, rollout: Rollout) -> bool:
        """Whether instances outside the plan's destroyed ones are being replaced."""
        view = await rollouts._view(rollout)
        return any(i.id not in rollout.destroyed for i in view.old)

    async def _set_phase(self, rollout: Rollout, at: int) -> None:
        e = self.engine
        rollout.step = PHASE_BASE + at
        rollout.progress = {"phase": _NAMES[at]}  # shown by kiln status
        await e.db(e.state.rollout_step, rollout.service, rollout.target.number, rollout.step)
        e.emit(
            "bluegreen.phase",
            f"{rollout.service}: r{rollout.target.number} {_NAMES[at]}",
            rollout.service,
            revision=rollout.target.number,
            data={"deployment": rollout.deployment, "phase": _NAMES[at], "step": rollout.step},
        )

    async def _sets(self, rollout: Rollout) -> tuple[list[InstanceRecord], list[InstanceRecord]]:
        """(green, blue), live ones only; green also holds this rollout's dead ones."""
        e = self.engine
        green: list[InstanceRecord] = []
        blue: list[InstanceRecord] = []
        for rec in await e.db(e.state.working_set, rollout.service, rollout.started):
            if rec.id in e.lifecycle.retiring or rec.state in ("draining", "stopping", "stopped"):
                continue
            if is_green(rollout, rec):
                if rec.state in _LIVE or rec.created >= rollout.started:
                    green.append(rec)
            elif rec.state in _LIVE:
                blue.append(rec)
        return green, blue

    async def run(self, rollouts: Rollouts, rollout: Rollout) -> str:
        e = self.engine
        service, target = rollout.service, rollout.target
        update = _update(rollout)
        e.emit(
            f"rollout.{'resumed' if phase(rollout) else 'started'}",
            f"{service}: blue/green {rollout.kind} to r{target.number}"
            + (f" ({phase_name(rollout)})" if phase(rollout) else ""),
            service,
            revision=target.number,
            data={"deployment": rollout.deployment, "kind": rollout.kind, "step": rollout.step},
        )
        promoted = self._promoted.setdefault(service, asyncio.Event())
        if phase(rollout) == 0:
            promoted.clear()
            await self._set_phase(rollout, STARTING)
        try:
            if phase(rollout) == STARTING:
                await self._start_green(rollout, update)
                _, blue = await self._sets(rollout)
                if phase(rollout) == BACKING_OUT:
                    raise _Failed("switched back by kiln rollback", [])
                if not update.auto_promote and blue:
                    await self._set_phase(rollout, WAITING)
                else:
                    await self._switch(rollout)
            if phase(rollout) == WAITING:
                await self._wait_promotion(rollout, promoted)
                await self._switch(rollout)
        except _Failed as failed:
            if phase(rollout) == BACKING_OUT:
                return await self._back_out(rollouts, rollout)
            return await self._fail(rollouts, rollout, failed)
        if phase(rollout) == SWITCHED:
            await self._hold(rollout, update, promoted)
        if phase(rollout) == BACKING_OUT:
            return await self._back_out(rollouts, rollout)
        if phase(rollout) == SWITCHED:
            await self._set_phase(rollout, RETIRING)
        return await self._retire_blue(rollouts, rollout)

    async def _start_green(self, rollout: Rollout, update: Update) -> None:
        """Start the green instances still missing, then wait until every one is ready
        for ``min_healthy_time`` and passes the pre-promotion check."""
        e = self.engine
        service, target = rollout.service, rollout.target
        desired = int(target.config.get("replicas", 1))
        green, _ = await self._sets(rollout)
        for _ in range(desired - len([g for g in green if g.state in _LIVE])):
            rec = await e.lifecycle.new(service, target, deployment=rollout.deployment)
            e.lifecycle.launch(rec, target)
        while True:
            if phase(rollout) == BACKING_OUT:
                raise _Failed("switched back by kiln rollback", [])
            green, _ = await self._sets(rollout)
            dead = [g.id for g in green if g.state in ("failed", "lost")]
            if dead:
                raise _Failed(f"green instance {', '.join(dead)} died before the switch", dead)
            now = time.time()
            late = [
                g for g in green if g.state != "ready" and now - g.created > update.healthy_deadline
            ]
            if late:
                seen = e.health.last_probe(late[0].id)
                raise _Failed(
                    f"green instance {', '.join(g.id for g in late)} not healthy within "
                    f"{update.healthy_deadline:g}s" + (f" (last probe: {seen})" if seen else ""),
                    [g.id for g in late],
                )
            ready = [
                g
                for g in green
                if g.state == "ready"
                and (since := e.health.ready_since(g)) is not None
                and now - since >= update.min_healthy_time
            ]
            rollout.progress = {
                **rollout.progress,
                "healthy": len(ready),
                "desired": desired,
                "new": len(green),
            }
            if len(ready) >= desired:
                await self._pre_promotion(rollout, update, ready)
                return
            await e.wait_changed(service, _TICK)

    async def _pre_promotion(
        self, rollout: Rollout, update: Update, green: list[InstanceRecord]
    ) -> None:
        check = update.pre_promotion
        if check is None:
            return
        failures: list[str] = []
        culprits: list[str] = []
        for rec in green:
            handle = handle_of(rec)
            if handle is None:
                continue
            if check.exec is not None:
                detail = await self._pre_promotion_exec(handle, check.exec, check.timeout)
            else:
                assert check.http is not None
                result = await probe_http(handle.host, handle.port, check.http, check.timeout)
                detail = None if result.ok else result.detail
            if detail is not None:
                failures.append(f"{rec.id}: {detail}")
                culprits.append(rec.id)
        if failures:
            raise _Failed("pre-promotion check failed: " + "; ".join(failures), culprits)
        what = f"GET {check.http}" if check.http is not None else f"exec {check.exec}"
        self.engine.emit(
            "bluegreen.checked",
            f"{rollout.service}: {what} passed on {len(green)} green instance(s)",
            rollout.service,
            revision=rollout.target.number,
            data={"deployment": rollout.deployment, "path": check.http, "exec": check.exec},
        )

    async def _pre_promotion_exec(
        self, handle: InstanceHandle, argv: list[str], timeout: float
    ) -> str | None:
        """Runs the check inside the green instance, as a health check's ``exec`` does: a
        declared check, so the instance is not marked touched. None when it passed."""
        e = self.engine
        runtime = e.runtime
        if not isinstance(runtime, Execer) or not runtime.capabilities.exec:
            return f"the {runtime.name} runtime cannot run a command in an instance"
        try:
            code, output = await e.io(runtime.exec, handle, list(argv), timeout)
        except KilnError as err:
            return str(err)
        if code == 0:
            return None
        tail = " ".join(output.strip().splitlines()[-3:])[:300]
        return f"exec {argv[0]} exited {code}" + (f": {tail}" if tail else "")

    async def _wait_promotion(self, rollout: Rollout, promoted: asyncio.Event) -> None:
        """Green keeps being watched while it waits: a death fails the rollout."""
        e = self.engine
        e.emit(
            "bluegreen.waiting",
            f"{rollout.service}: green r{rollout.target.number} is ready; "
            f"kiln promote {rollout.service} switches traffic",
            rollout.service,
            revision=rollout.target.number,
            data={"deployment": rollout.deployment},
        )
        while not promoted.is_set():
            if phase(rollout) == BACKING_OUT:
                raise _Failed("switched back by kiln rollback", [])
            green, _ = await self._sets(rollout)
            dead = [g.id for g in green if g.state in ("failed", "lost", "unhealthy")]
            if dead:
                raise _Failed(f"green instance {', '.join(dead)} failed before the switch", dead)
            await e.wait_changed(rollout.service, _TICK)
        promoted.clear()

    async def _switch(self, rollout: Rollout) -> None:
        """One route push: green ready, blue in maintenance. The phase is saved first, so
        a route built at any later moment (a restart's) serves green."""
        e = self.engine
        service, target = rollout.service, rollout.target
        _, blue = await self._sets(rollout)
        if phase(rollout) == BACKING_OUT:
            raise _Failed("switched back by kiln rollback", [])
        await self._set_phase(rollout, SWITCHED)
        await e.routing.push(service)
        current = await e.revision(service, target.number)
        if current.status != "active":
            await e.db(e.state.set_revision_status, service, target.number, "active")
        e.emit(
            "bluegreen.switched",
            f"{service}: traffic switched to green r{target.number}; "
            f"{len(blue)} blue instance(s) held",
            service,
            revision=target.number,
            data={
                "deployment": rollout.deployment,
                "at": time.time(),
                "blue": [b.id for b in blue],
            },
        )

    async def _switched_at(self, rollout: Rollout) -> float:
        """When the switch happened, from its event (so a restart keeps the same hold)."""
        e = self.engine
        events = await e.db(e.state.events, 0, 100_000, rollout.service, "bluegreen.switched")
        for event in reversed(events):
            if event.data.get("deployment") == rollout.deployment:
                return float(event.data.get("at") or event.ts)
        return time.time()

    async def _hold(self, rollout: Rollout, update: Update, promoted: asyncio.Event) -> None:
        e = self.engine
        await e.db(lambda: None)  # the switch event is written
        until = await self._switched_at(rollout) + update.blue_hold
        while phase(rollout) == SWITCHED and not promoted.is_set():
            left = until - time.time()
            if left <= 0:
                return
            _, blue = await self._sets(rollout)
            if not blue:
                return
            rollout.progress = {**rollout.progress, "hold_left": int(left), "blue": len(blue)}
            await e.wait_changed(rollout.service, min(left, 1.0))
        promoted.clear()

    async def _retire_blue(self, rollouts: Rollouts, rollout: Rollout) -> str:
        e = self.engine
        service, target = rollout.service, rollout.target
        _, blue = await self._sets(rollout)
        await asyncio.gather(
            *(e.lifecycle.retire(b.id, f"blue; replaced by green r{target.number}") for b in blue)
        )
        await rollouts._retirements_of(service)
        return await rollouts.finish_live(rollout, f"blue/green, {len(blue)} blue retired")

    async def _fail(self, rollouts: Rollouts, rollout: Rollout, failed: _Failed) -> str:
        """Nothing was switched: blue keeps serving, green goes, the revision failed."""
        e = self.engine
        service, target = rollout.service, rollout.target
        e.emit(
            "rollout.failed",
            f"{service}: blue/green to r{target.number} failed: {failed.why}; "
            "blue keeps serving, nothing was switched",
            service,
            revision=target.number,
            data={
                "culprits": failed.culprits,
                "deployment": rollout.deployment,
                "reason": failed.why,
            },
        )
        await e.db(e.state.set_revision_status, service, target.number, "failed", reason=failed.why)
        probes = {c: p for c in failed.culprits if (p := e.health.last_probe(c)) is not None}
        await e.deployments.probed(rollout.deployment, service, probes)
        await self._retire_green(rollout, f"green r{target.number} failed")
        for iid in failed.culprits:
            rec = await e.db(e.state.instance, iid)
            if rec.state in ("failed", "lost"):
                await e.db(e.state.update_instance, iid, replaced_by="rollout-failed")
        await rollouts._retirements_of(service)
        await e.routing.push(service)
        await rollouts._close(rollout, "failed", failed.why, failed.culprits)
        return "failed"

    async def _retire_green(self, rollout: Rollout, why: str) -> None:
        e = self.engine
        green, _ = await self._sets(rollout)
        await asyncio.gather(
            *(e.lifecycle.retire(g.id, why) for g in green if g.state in _LIVE),
            return_exceptions=True,
        )

    async def _back_out(self, rollouts: Rollouts, rollout: Rollout) -> str:
        """After ``kiln rollback``: blue serves again (already pushed), green goes."""
        e = self.engine
        service, target = rollout.service, rollout.target
        _, blue = await self._sets(rollout)
        back = sorted({b.revision for b in blue})
        current = await e.revision(service, target.number)
        if current.status == "active" and back:
            await e.db(
                e.state.set_revision_status,
                service,
                back[-1],
                "active",
                previous_becomes="rolled_back",
            )
        elif current.status != "active":
            await e.db(
                e.state.set_revision_status,
                service,
                target.number,
                "rolled_back",
                reason="kiln rollback before the switch",
            )
        await e.routing.push(service)
        await self._retire_green(rollout, f"rolled back from r{target.number}")
        await rollouts._retirements_of(service)
        await rollouts._settle_dead(service)
        e.emit(
            "rollout.succeeded",
            f"{service}: switched back to blue"
            + (f" r{back[-1]}" if back else "")
            + f"; green r{target.number} retired",
            service,
            revision=back[-1] if back else None,
            data={"deployment": rollout.deployment, "kind": "rollback"},
        )
        await rollouts._close(rollout, "rolled_back", "kiln rollback")
        return "rolled_back"

    def owns(self, rollout: Rollout) -> bool:
        """Whether ``kiln promote`` of this rollout is blue/green's to answer."""
        return rollout.kind == "deploy" and _update(rollout).strategy == "blue-green"

    def _running(self, service: str) -> Rollout | None:
        rollout = self.engine.rollouts.running.get(service)
        return rollout if rollout is not None and phase(rollout) > 0 else None

    async def promote(self, service: str) -> dict[str, Any]:
        """``kiln promote``: switch a waiting green now, or end blue's hold early."""
        e = self.engine
        if service not in await e.db(e.state.services):
            raise NotFound(f"no service {service!r}")
        rollout = self._running(service)
        at = phase(rollout) if rollout is not None else 0
        if rollout is None or at not in (STARTING, WAITING, SWITCHED):
            raise Conflict(f"{service}: nothing to promote (no blue/green rollout is waiting)")
        if at == STARTING:
            progress = rollout.progress
            raise Conflict(
                f"{service}: green r{rollout.target.number} is not ready yet "
                f"({progress.get('healthy', 0)}/{progress.get('desired', '?')} healthy); "
                "promote again when it is"
            )
        self._promoted.setdefault(service, asyncio.Event()).set()
        e.changed(service)
        what = "switching traffic to green" if at == WAITING else "ending blue's hold now"
        e.emit(
            "bluegreen.promoted",
            f"{service}: promoted by kiln promote: {what}",
            service,
            revision=rollout.target.number,
            data={"deployment": rollout.deployment},
        )
        return {
            "service": service,
            "deployment": rollout.deployment,
            "revision": rollout.target.number,
            "promoted": what,
        }

    async def rollback(self, service: str, revision: int | None) -> dict[str, Any] | None:
        """An instant switch back to blue while blue still runs (before the switch or
        within the hold): one route push, no new instance. None when it does not apply."""
        e = self.engine
        rollout = self._running(service)
        if rollout is None or phase(rollout) not in (STARTING, WAITING, SWITCHED):
            return None
        _, blue = await self._sets(rollout)
        revisions = {b.revision for b in blue}
        if not blue or len(revisions) != 1 or (revision is not None and revision not in revisions):
            return None
        back = revisions.pop()
        rollout.step = PHASE_BASE + BACKING_OUT
        await e.db(e.state.rollout_step, service, rollout.target.number, rollout.step)
        await e.routing.push(service)
        e.emit(
            "rollback.instant",
            f"{service}: switched back to blue r{back} (no new instance); "
            f"green r{rollout.target.number} retiring",
            service,
            revision=back,
            data={"deployment": rollout.deployment, "undone": rollout.target.number},
        )
        e.changed(service)
        return {
            "deployment": rollout.deployment,
            "service": service,
            "revision": back,
            "started": rollout.started,
            "instant": True,
        }
