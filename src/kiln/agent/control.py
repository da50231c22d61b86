"""What an operator does to a running service without a new spec: restart, stop,
start, and exec into an instance.

Each is a rollout or an event like any other change, so it is durable, shown in
``kiln status`` and ``kiln events``, and never repairs in place: ``restart``
replaces every instance with a new one of the same revision (touched ones
first), ``stop`` retires them all and keeps the revision for ``start``, and
``exec`` marks the instance it ran in as touched, because a human command in
an immutable instance is drift.
"""

from __future__ import annotations

import shlex
import time
from typing import TYPE_CHECKING, Any

from kiln.agent.errors import Conflict, NotFound
from kiln.agent.lifecycle import IN_SERVICE, handle_of
from kiln.agent.rollouts import Rollout
from kiln.deploy.state import InstanceRecord, Revision
from kiln.errors import KilnError
from kiln.runtime import EXEC_OUTPUT_MAX, Execer

if TYPE_CHECKING:
    from kiln.agent.engine import Engine

__all__ = ["STOPPED_BY", "ServiceControl", "stopped_revision"]

STOPPED_BY = frozenset({"kiln stop", "kiln down"})
"""Why a revision that ``kiln start`` may bring back stopped being active."""


class ServiceControl:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    async def restart(self, service: str) -> dict[str, Any]:
        """Every instance replaced by a new one of the active revision, rolled out with the
        service's own update settings: the replace-not-repair restart."""
        e = self.engine
        active = await self._active(service)
        if service in e.rollouts.running:
            raise Conflict(
                f"{service}: a rollout is running; wait for it (kiln events --follow) "
                "or roll it back first"
            )
        live = [r for r in await e.db(e.state.instances, service, True) if r.state in IN_SERVICE]
        if not live:
            raise KilnError(f"{service}: no instance to restart (replicas = 0?)")
        touched = sorted(r.id for r in live if r.touched is not None)
        summary = f"restart {service} (r{active.number}, {len(live)} instance(s))"
        record = await e.deployments.create(summary, {service: active.number})
        e.emit(
            "restart.started",
            f"{service}: replacing {len(live)} instance(s) with new ones of r{active.number}"
            + (f"; touched first: {', '.join(touched)}" if touched else ""),
            service,
            revision=active.number,
            data={"deployment": record["id"], "touched": touched},
        )
        await e.rollouts.begin(
            Rollout(
                service,
                active,
                str(record["id"]),
                "restart",
                time.time(),
                named=frozenset(r.id for r in live),
            )
        )
        return {"deployment": record["id"], "service": service, "revision": active.number}

    async def stop(self, service: str) -> dict[str, Any]:
        """Every instance retired and the listener closed; the revision stays the one
        ``kiln start`` brings back. A rollout of the service is cancelled first."""
        e = self.engine
        active = await self._active(service)
        await e.rollouts.cancel(service)
        await e.db(e.state.set_revision_status, service, active.number, "superseded",
                   reason="kiln stop")  # fmt: skip
        record = await e.deployments.create(f"stop {service}", {service: active.number})
        e.emit(
            "service.stopping",
            f"{service}: stopping r{active.number} (kiln start {service} runs it again)",
            service,
            revision=active.number,
            data={"deployment": record["id"]},
        )
        await e.rollouts.begin(Rollout(service, active, str(record["id"]), "stop", time.time()))
        return {"deployment": record["id"], "service": service, "revision": active.number}

    async def start(self, service: str) -> dict[str, Any]:
        """The revision ``kiln stop`` (or ``kiln down``) stopped, with new instances."""
        e = self.engine
        revisions = await e.db(e.state.revisions, service)
        if not revisions:
            raise NotFound(f"no service {service!r} in this KILN_HOME ({e.home})")
        if await e.db(e.state.active_revision, service) is not None:
            raise Conflict(f"{service} is running already; kiln restart {service} replaces it")
        target = stopped_revision(revisions)
        if target is None:
            raise KilnError(
                f"{service} was not stopped by kiln stop or kiln down; deploy it with kiln up"
            )
        record = await e.deployments.create(f"start {service}", {service: target.number})
        await e.rollouts.begin(Rollout(service, target, str(record["id"]), "start", time.time()))
        return {"deployment": record["id"], "service": service, "revision": target.number}

    async def exec(self, name: str, argv: list[str], timeout: float) -> dict[str, Any]:
        """``argv`` inside a live instance through the runtime's exec, recorded as an event;
        the instance is marked touched before the command runs."""
        e = self.engine
        runtime = e.runtime
        if not isinstance(runtime, Execer) or not runtime.capabilities.exec:
            raise KilnError(f"the {runtime.name} runtime cannot run commands in instances")
        rec = await self._instance(name)
        handle = handle_of(rec)
        if handle is None:
            raise Conflict(f"{rec.id} has not started yet; try again")
        if rec.touched is None:
            rec = await e.db(e.state.update_instance, rec.id, touched=time.time())
        command = shlex.join(argv)
        e.emit(
            "instance.exec",
            f"{rec.id}: kiln exec {command} (marked touched; kiln restart {rec.service} "
            "replaces it first)",
            rec.service,
            rec.id,
            rec.revision,
            {"argv": argv},
        )
        started = time.monotonic()
        code, output = await e.io(runtime.exec, handle, argv, timeout)
        e.emit(
            "instance.exec_done",
            f"{rec.id}: {argv[0]} exited {code} after {time.monotonic() - started:.1f}s",
            rec.service,
            rec.id,
            rec.revision,
            {"exit_code": code},
        )
        return {
            "instance": rec.id,
            "exit_code": code,
            "output": output,
            "truncated": len(output.encode()) >= EXEC_OUTPUT_MAX,
        }

    async def _active(self, service: str) -> Revision:
        e = self.engine
        active = await e.db(e.state.active_revision, service)
        if active is not None:
            return active
        if await e.db(e.state.revisions, service):
            raise KilnError(f"{service} is not running (kiln start {service} runs it again)")
        raise NotFound(f"no service {service!r} in this KILN_HOME ({e.home})")

    async def _instance(self, name: str) -> InstanceRecord:
        """An instance by id, by a prefix only one live instance has, or by service name
        (its oldest ready instance, as ``docker compose exec SERVICE`` picks one)."""
        e = self.engine
        live = [r for r in await e.db(e.state.instances, None, True) if r.state in IN_SERVICE]
        exact = [r for r in live if r.id == name]
        if exact:
            return exact[0]
        ready = sorted((r for r in live if r.service == name and r.state == "ready"),
                       key=lambda r: r.created)  # fmt: skip
        if ready:
            return ready[0]
        prefixed = [r for r in live if r.id.startswith(name)]
        if len(prefixed) == 1:
            return prefixed[0]
        if prefixed:
            names = ", ".join(sorted(r.id for r in prefixed))
            raise KilnError(f"{name!r} names more than one instance: {names}")
        raise NotFound(f"no running instance or service {name!r}; kiln status lists them")


def stopped_revision(revisions: list[Revision]) -> Revision | None:
    """The revision active last, if stopping is why it is not active now."""
    activated = [r for r in revisions if r.activated is not None]
    if not activated:
        return None
    last = max(activated, key=lambda r: r.activated or 0)
    return last if last.status == "superseded" and last.reason in STOPPED_BY else None
