"""What ``kiln status`` and ``kiln history`` show, read from the live working set only."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from kiln.agent.control import stopped_revision
from kiln.agent.errors import NotFound
from kiln.agent.lifecycle import handle_of
from kiln.deploy.plan import revision_changes
from kiln.deploy.state import Revision

if TYPE_CHECKING:
    from kiln.agent.engine import Engine

__all__ = ["history", "status"]


async def status(e: Engine) -> dict[str, Any]:
    services: dict[str, Any] = {}
    now = time.time()
    for name in await e.db(e.state.services):
        active = await e.db(e.state.active_revision, name)
        instances = []
        by_number: dict[int, Revision] = {}  # one read per revision, not per instance
        for rec in await e.db(e.state.instances, name, True):
            if rec.revision not in by_number:
                by_number[rec.revision] = await e.revision(name, rec.revision)
            rev = by_number[rec.revision]
            handle = handle_of(rec)
            data = handle.data if handle is not None else {}
            instances.append(
                {
                    "id": rec.id,
                    "revision": rec.revision,
                    "state": rec.state,
                    "health": e.health.state_of(rec.id) or rec.state,
                    "age": now - rec.created,
                    "ready_for": now - rec.ready_at if rec.ready_at is not None else None,
                    "digest": rev.image_digest,
                    "port": rec.port,
                    "address": handle.address if handle is not None else None,
                    "pid": data.get("sandbox_pid") or data.get("shim_pid"),
                    "container": data.get("container_id"),
                    "touched": rec.touched,
                    "probe": e.health.last_probe(rec.id),
                    "reason": rec.reason,
                }
            )
        rollout = e.rollouts.running.get(name)
        failed = stopped = None
        if active is None and rollout is None:
            revisions = await e.db(e.state.revisions, name)
            if revisions and revisions[-1].status == "failed":
                failed = revisions[-1]  # a first rollout that failed stays in view
            stopped = stopped_revision(revisions)
        if active is None and not instances and rollout is None and failed is None:
            if stopped is not None and stopped.reason == "kiln stop":
                services[name] = {"state": "stopped", "stopped_revision": stopped.number,
                                  "instances": [], "alarms": []}  # fmt: skip
            continue
        alarms = [a.message for a in await e.db(e.state.alarms, name)]
        desired = int(active.config.get("replicas", 1)) if active else 0
        ready = sum(1 for i in instances if i["state"] == "ready")
        state = (
            "rolling"
            if rollout is not None
            else "failed"
            if failed is not None
            else "alarm"
            if alarms
            else "degraded"
            if ready < desired
            else "ok"
        )
        services[name] = {
            "state": state,
            "active_revision": active.number if active else None,
            "desired_replicas": desired,
            "listen": active.config.get("listen") if active else None,
            "instances": instances,
            "rollout": rollout.info() if rollout is not None else None,
            "alarms": alarms,
            "failed": {"revision": failed.number, "reason": failed.reason}
            if failed is not None
            else None,
        }
    return {"services": services, "proxy": e.router.info(), "runtime": e.runtime.name}


async def history(e: Engine, service: str) -> dict[str, Any]:
    revisions = await e.db(e.state.revisions, service)
    if not revisions:
        raise NotFound(f"no service {service!r}")
    shown = []
    for index, rev in enumerate(revisions):
        before = revisions[index - 1] if index else None
        shown.append({**rev.to_json(), "changes": revision_changes(before, rev)})
    return {"service": service, "revisions": shown[::-1]}
