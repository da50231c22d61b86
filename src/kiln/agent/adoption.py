"""An agent's start: take back what still runs, finish what was under way, remove the rest.

Instances outlive the agent (and so do the router and the rollouts' rows), so
a new agent never replaces a healthy instance: it asks the runtime which of
the recorded instances still run, watches and checks those, resumes every
retirement and rollout from its saved step, and stops whatever the runtime
runs under this home's label that the state does not know.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import TYPE_CHECKING

from kiln.agent.lifecycle import handle_of
from kiln.agent.rollouts import Rollout
from kiln.errors import KilnError
from kiln.runtime import Releaser

if TYPE_CHECKING:
    from kiln.agent.engine import Engine

__all__ = ["adopt"]

log = logging.getLogger("kiln.agent")


async def adopt(e: Engine) -> None:
    runtime = e.runtime
    listed = {h.instance_id: h for h in await e.io(runtime.list)}
    live = await e.db(e.state.instances, None, True)
    for rec in live:
        rev = await e.revision(rec.service, rec.revision)
        if rec.state == "pending":
            e.lifecycle.launch(rec, rev)  # nothing was asked of the runtime yet
            continue
        handle = handle_of(rec)
        if handle is None and rec.id in listed:
            handle = listed[rec.id]
            found = await e.db(e.state.update_instance, rec.id, handle=handle.to_json())
            rec = found
        if handle is None:
            # The agent stopped while the runtime made it, and the runtime has nothing:
            # not a death, and the rollout or the reconciler starts another.
            await e.lifecycle.move(
                rec.id,
                "stopped",
                reason="the agent stopped while it started",
                stopped_at=time.time(),
            )
            continue
        alive = await e.io(runtime.recover, handle)
        if rec.state == "draining" and rec.quarantined_until is not None and alive:
            await e.quarantine.resume(rec)
            continue
        if rec.state in ("draining", "stopping"):
            e.spawn(e.lifecycle.retire(rec.id, "retirement resumed after agent restart"),
                    f"retire {rec.id}")  # fmt: skip
            continue
        if not alive:
            now = time.time()
            lost = await e.lifecycle.move(
                rec.id, "lost", reason="gone while the agent was down", stopped_at=now, noticed=now
            )
            if lost is not None:
                e.emit("instance.lost", f"{rec.id} did not survive the agent restart",
                       rec.service, rec.id, rec.revision)  # fmt: skip
                with contextlib.suppress(KilnError):
                    await e.io(runtime.destroy, handle)
            continue
        e.lifecycle.watch(rec, handle)
        e.health.track(rec, adopted=True)
        e.emit(
            "instance.adopted",
            f"adopted {rec.id} ({handle.address})",
            rec.service,
            rec.id,
            rec.revision,
        )
    await _retire_replaced(e)
    if isinstance(runtime, Releaser):
        for leftover in await e.io(runtime.leftovers):
            with contextlib.suppress(KilnError):
                await e.io(runtime.release, leftover)
    known = {r.id for r in live}
    for iid, handle in listed.items():
        if iid in known:
            continue
        with contextlib.suppress(KilnError):
            await e.io(runtime.stop, handle, 5.0)
            await e.io(runtime.destroy, handle)
        e.emit("instance.orphan", f"stopped orphan {iid} unknown to the state", instance=iid)
    for row in await e.db(e.state.rollouts):
        target = await e.revision(row.service, row.target)
        if row.deployment is not None:
            await e.deployments.resume(row.deployment)
        await e.rollouts.begin(
            Rollout(
                row.service,
                target,
                row.deployment,
                row.kind,
                started=row.started,
                step=row.step,
                named=row.named,
                destroyed=row.destroyed,
                undoing=row.undoing,
            )
        )


async def _retire_replaced(e: Engine) -> None:
    """An unhealthy instance whose replacement became ready before the agent stopped
    goes now (the replacement's readiness was its signal, and it was missed)."""
    for rec in await e.db(e.state.instances, None, True):
        if rec.state != "unhealthy" or not rec.replaced_by:
            continue
        with contextlib.suppress(KilnError):
            replacement = await e.db(e.state.instance, rec.replaced_by)
            if replacement.state == "ready":
                e.spawn(e.lifecycle.retire(rec.id, f"unhealthy; replaced by {replacement.id}"),
                        f"retire {rec.id}")  # fmt: skip
