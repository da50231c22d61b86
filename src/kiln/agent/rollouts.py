"""Rollouts: carry out a plan's changes for one service, in the order a strategy gives.

The planner decided which instances change (``named``: the ones the plan
replaces or destroys); the strategy (:mod:`kiln.deploy.rollout`) only orders
and batches that work: when to start a new instance, which named one to
retire next, when it is done or failed. A rollback has no plan and goes by
revision instead.

Every rollout is a row in state.db (target, kind, start time, step, the named
instances), and every instance it starts carries its deployment, so an agent
killed at any step continues the same rollout from where it stood.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kiln.agent.lifecycle import handle_of
from kiln.deploy.rollout import STRATEGIES, RolloutInstance, RolloutView
from kiln.deploy.state import Revision, RevisionStatus, RolloutRecord
from kiln.spec.models import Update

if TYPE_CHECKING:
    from kiln.agent.engine import Engine

__all__ = ["REMOVALS", "ROLLOUT_TICK", "Rollout", "Rollouts"]

log = logging.getLogger("kiln.agent")

REMOVALS = frozenset({"remove", "stop"})
"""Rollout kinds that retire every instance of a service and route nothing to it."""
ROLLOUT_TICK = 0.25
"""The longest a rollout sleeps without a change; time-based steps (min_healthy_time,
deadlines) are seen within it."""


@dataclass
class Rollout:
    service: str
    target: Revision
    deployment: str | None
    kind: str
    started: float
    step: int = 0
    named: frozenset[str] | None = None
    undoing: int | None = None
    destroyed: frozenset[str] = frozenset()
    progress: dict[str, Any] = field(default_factory=dict)
    task: asyncio.Task[str] | None = None

    def record(self) -> RolloutRecord:
        return RolloutRecord(
            self.service,
            self.deployment,
            self.target.number,
            self.kind,
            self.undoing,
            self.started,
            self.step,
            self.named,
            self.destroyed,
        )

    def info(self) -> dict[str, object]:
        update = Update.model_validate(self.target.config.get("update") or {})
        return {
            "healthy_deadline": update.healthy_deadline,
            "min_healthy_time": update.min_healthy_time,
            "target": self.target.number,
            "kind": self.kind,
            "started": self.started,
            "deployment": self.deployment,
            "step": self.step,
            **self.progress,
        }


class Rollouts:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.running: dict[str, Rollout] = {}

    async def begin(self, rollout: Rollout) -> None:
        """Saved before it does anything, then run as a supervised task; a rollout of the
        same service still running is cancelled first (one rollout per service)."""
        e = self.engine
        await self.cancel(rollout.service)
        await e.db(e.state.put_rollout, rollout.record())
        self.running[rollout.service] = rollout
        task: asyncio.Task[str] = asyncio.ensure_future(self._run(rollout))
        rollout.task = task
        e.tasks.add(task)
        task.add_done_callback(lambda t: self._ended(rollout, t))

    async def cancel(self, service: str) -> None:
        rollout = self.running.get(service)
        if rollout is None or rollout.task is None:
            return
        rollout.task.cancel()
        with contextlib.suppress(BaseException):
            await rollout.task

    def _ended(self, rollout: Rollout, task: asyncio.Task[str]) -> None:
        e = self.engine
        e.tasks.discard(task)
        current = self.running.get(rollout.service)
        if current is not None and current.task is task:
            self.running.pop(rollout.service, None)
            rollout = current  # an auto-rollback runs in the task of the rollout it undoes
        e.changed(rollout.service)
        if task.cancelled():
            if not e.stopping:
                e.spawn(self._cancelled(rollout), f"cancel {rollout.service}")
            return
        exc = task.exception()
        if exc is not None:
            log.error("rollout of %s crashed", rollout.service, exc_info=exc)
            e.emit(
                "rollout.failed",
                f"{rollout.service}: rollout crashed: {type(exc).__name__}: {exc}",
                rollout.service,
                revision=rollout.target.number,
                data={"deployment": rollout.deployment, "reason": str(exc)},
            )
            e.spawn(self._close(rollout, "failed", str(exc)), f"close {rollout.service}")

    async def _cancelled(self, rollout: Rollout) -> None:
        """Superseded (a rollback, a down): its row goes unless a newer rollout took it."""
        await self._close(rollout, "cancelled", None, end_row=rollout.service not in self.running)

    async def _close(
        self,
        rollout: Rollout,
        outcome: str,
        reason: str | None,
        culprits: list[str] | None = None,
        end_row: bool = True,
    ) -> None:
        e = self.engine
        if end_row:
            await e.db(e.state.end_rollout, rollout.service, rollout.target.number)
        await e.deployments.service_done(
            rollout.deployment, rollout.service, outcome, reason, culprits
        )

    async def _view(self, rollout: Rollout) -> RolloutView:
        e = self.engine
        target = rollout.target
        desired = int(target.config.get("replicas", 1))
        old: list[RolloutInstance] = []
        new: list[RolloutInstance] = []
        hashes: dict[int, str] = {}
        for rec in await e.db(e.state.working_set, rollout.service, rollout.started):
            if rec.id in e.lifecycle.retiring or rec.state in ("draining", "stopping", "stopped"):
                continue
            mine = (
                rollout.deployment is not None
                and rec.deployment == rollout.deployment
                and rec.revision == target.number
            )
            if rec.state in ("failed", "lost") and not (mine and rec.created >= rollout.started):
                continue
            if rec.revision not in hashes:
                hashes[rec.revision] = (await e.revision(rollout.service, rec.revision)).config_hash
            # What the plan did not name is what it keeps, which has the target's config;
            # anything else here appeared since and is not the plan's to keep.
            same = hashes[rec.revision] == target.config_hash and (
                rec.id not in rollout.named
                if rollout.named is not None
                else rec.revision != rollout.undoing
            )
            inst = RolloutInstance(
                rec.id, rec.state, rec.created, e.health.ready_since(rec), rec.touched is not None
            )
            (new if same else old).append(inst)
        return RolloutView(
            target_revision=target.number,
            desired=desired,
            old=old,
            new=new,
            now=time.time(),
            update=Update.model_validate(target.config.get("update") or {}),
            started=rollout.started,
        )

    async def _run(self, rollout: Rollout) -> str:
        if rollout.kind in REMOVALS:
            return await self._remove(rollout)
        from kiln.agent.canary import is_canary, run_canary

        if is_canary(rollout) and (outcome := await run_canary(self, rollout)) is not None:
            return outcome
        e = self.engine
        from kiln.agent.bluegreen import is_blue_green

        if is_blue_green(rollout, await e.bluegreen.has_blue(self, rollout)):
            return await e.bluegreen.run(self, rollout)
        service, target = rollout.service, rollout.target
        # Any other strategy's rollback, restart or start is immediate: a rolling one.
        name = Update.model_validate(target.config.get("update") or {}).strategy
        strategy = STRATEGIES.get(name, STRATEGIES["rolling"])
        verb = "resumed" if rollout.step else "started"
        e.emit(
            f"rollout.{verb}",
            f"{service}: {rollout.kind} to r{target.number}"
            + (f" (from step {rollout.step})" if rollout.step else ""),
            service,
            revision=target.number,
            data={"deployment": rollout.deployment, "kind": rollout.kind, "step": rollout.step},
        )
        while True:
            view = await self._view(rollout)
            step = strategy.next_step(view)
            rollout.progress = {
                "healthy": step.healthy,
                "desired": view.desired,
                "new": len(view.new),
                "old": len(view.old),
            }
            if step.done:
                return await self._succeeded(rollout, view.desired)
            if step.failed:
                return await self._failed(rollout, step.failed, step.culprits)
            if not step.idle:
                rollout.step += 1
                await e.db(e.state.rollout_step, service, target.number, rollout.step)
                e.emit(
                    "rollout.step",
                    f"{service}: step {rollout.step}: start {step.start}, retire "
                    f"{', '.join(step.retire) or 'none'}",
                    service,
                    revision=target.number,
                    data={
                        "deployment": rollout.deployment,
                        "step": rollout.step,
                        "start": step.start,
                        "retire": list(step.retire),
                    },
                )
            for iid in step.retire:
                why = (
                    f"scaled down to {view.desired} by r{target.number}"
                    if iid in rollout.destroyed
                    else "restarted by kiln restart"
                    if rollout.kind == "restart"
                    else f"replaced by r{target.number}"
                )
                e.spawn(e.lifecycle.retire(iid, why), f"retire {iid}")
            for _ in range(step.start):
                rec = await e.lifecycle.new(service, target, deployment=rollout.deployment)
                e.lifecycle.launch(rec, target)
            await e.wait_changed(service, ROLLOUT_TICK)

    async def _succeeded(self, rollout: Rollout, desired: int) -> str:
        e = self.engine
        service, target = rollout.service, rollout.target
        await self._retirements_of(service)
        current = await e.revision(service, target.number)
        becomes: RevisionStatus = (
            "rolled_back" if rollout.kind in ("rollback", "auto-rollback") else "superseded"
        )
        if current.status != "active":
            await e.db(
                e.state.set_revision_status,
                service,
                target.number,
                "active",
                previous_becomes=becomes,
            )
        outcome = "succeeded" if rollout.kind != "auto-rollback" else "rolled_back"
        return await self.finish_live(rollout, f"{desired} healthy", outcome)

    async def finish_live(self, rollout: Rollout, how: str, outcome: str = "succeeded") -> str:
        """The target is live: the dead settled, the route pushed, the event, the row
        closed. Shared by every strategy's last step."""
        e = self.engine
        service, target = rollout.service, rollout.target
        await self._settle_dead(service)
        await e.routing.push(service)
        e.emit(
            "rollout.succeeded",
            f"{service}: r{target.number} is live ({how})",
            service,
            revision=target.number,
            data={"deployment": rollout.deployment, "kind": rollout.kind},
        )
        await self._close(rollout, outcome, None)
        return outcome

    async def _retirements_of(self, service: str) -> None:
        """A rollout is over when the instances it retires are gone, not merely out of the route."""
        e = self.engine
        while True:
            retiring = [
                task
                for rec in await e.db(e.state.instances, service, True)
                if rec.state in ("draining", "stopping")
                and (task := e.lifecycle.retiring.get(rec.id))
            ]
            if not retiring:
                return
            await asyncio.wait(retiring)

    async def _failed(self, rollout: Rollout, why: str, culprits: tuple[str, ...]) -> str:
        e = self.engine
        service, target = rollout.service, rollout.target
        update = Update.model_validate(target.config.get("update") or {})
        active = await e.db(e.state.active_revision, service)
        e.emit(
            "rollout.failed",
            f"{service}: rollout to r{target.number} failed: {why}",
            service,
            revision=target.number,
            data={"culprits": list(culprits), "deployment": rollout.deployment, "reason": why},
        )
        if rollout.kind == "deploy":
            await e.db(e.state.set_revision_status, service, target.number, "failed", reason=why)
        probes: dict[str, str] = {}
        for iid in culprits:
            rec = await e.db(e.state.instance, iid)
            seen, handle = e.health.last_probe(iid), handle_of(rec)
            if seen is not None:
                probes[iid] = seen + (f" on {handle.address}" if handle is not None else "")
            if rec.state in ("failed", "lost"):
                await e.db(e.state.update_instance, iid, replaced_by="rollout-failed")
        await e.deployments.probed(rollout.deployment, service, probes)
        if rollout.kind == "deploy" and update.auto_rollback and active is not None:
            e.emit(
                "rollback.auto",
                f"{service}: auto-rollback to r{active.number} because "
                f"r{target.number} failed: {why}",
                service,
                revision=active.number,
                data={"failed_revision": target.number, "reason": why},
            )
            back = Rollout(
                service,
                active,
                rollout.deployment,
                "auto-rollback",
                started=time.time(),
                undoing=target.number,
            )
            await e.deployments.note(rollout.deployment, service, why, list(culprits))
            await e.db(e.state.end_rollout, service, target.number)
            await e.db(e.state.put_rollout, back.record())
            self.running[service] = back
            back.task = rollout.task
            return await self._run(back)
        if rollout.kind in ("deploy", "start") and active is None:
            for rec in await e.db(e.state.instances, service, True):
                if rec.revision == target.number:
                    e.spawn(e.lifecycle.retire(rec.id, f"r{target.number} failed"),
                            f"retire {rec.id}")  # fmt: skip
        await self._close(rollout, "failed", why, list(culprits))
        return "failed"

    async def _remove(self, rollout: Rollout) -> str:
        """Every instance of the service goes (its revision is no longer active, so
        nothing replaces them); resumed as a whole after an agent restart."""
        e = self.engine
        service = rollout.service
        stop = rollout.kind == "stop"
        e.emit(f"rollout.{'resumed' if rollout.step else 'started'}",
               f"{service}: {'stop' if stop else 'removal'}",
               service, data={"deployment": rollout.deployment, "kind": rollout.kind})  # fmt: skip
        why = "stopped by kiln stop" if stop else "service removed from kiln.toml"
        rollout.step = 1
        await e.db(e.state.rollout_step, service, rollout.target.number, 1)
        for _ in range(5):  # a start that lands meanwhile is retired on the next round
            live = await e.db(e.state.instances, service, True)
            if not live:
                break
            await asyncio.gather(*(e.lifecycle.retire(i.id, why) for i in live))
        await self._settle_dead(service)
        await e.routing.push(service)
        if stop:
            e.emit("service.stopped", f"{service}: stopped; kiln start {service} runs it again",
                   service, revision=rollout.target.number)  # fmt: skip
        else:
            e.emit("service.removed", f"{service}: removed", service)
        await self._close(rollout, "succeeded", None)
        return "succeeded"

    async def _settle_dead(self, service: str) -> None:
        """Dead instances a rollout made redundant need no replacement."""
        e = self.engine
        for rec in await e.db(e.state.working_set, service, time.time()):
            if rec.state in ("failed", "lost") and rec.replaced_by is None:
                await e.db(e.state.update_instance, rec.id, replaced_by="rollout")
