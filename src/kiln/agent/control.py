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

import asyncio
import shlex
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from kiln.agent.errors import Conflict, NotFound
from kiln.agent.lifecycle import IN_SERVICE, handle_of
from kiln.agent.rollouts import REMOVALS, Rollout
from kiln.deploy.state import InstanceRecord, Revision
from kiln.errors import KilnError
from kiln.runtime import OUTPUT_CUT, Execer

if TYPE_CHECKING:
    from kiln.agent.engine import Engine

__all__ = ["STOPPED_BY", "ServiceControl", "stopped_revision"]

STOPPED_BY = frozenset({"kiln stop", "kiln down"})
"""Why a revision that ``kiln start`` may bring back stopped being active."""


EXECS_MAX = 8
"""``kiln exec`` commands running at once; more are refused, not queued."""
SUMMARY_MAX = 200
"""The most of a command the event log keeps (an argv may be a megabyte)."""


class ServiceControl:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._pool = ThreadPoolExecutor(max_workers=EXECS_MAX, thread_name_prefix="kiln-exec")
        self._running = 0

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
        running = e.rollouts.running.get(service)
        active = await e.db(e.state.active_revision, service)
        if active is None and running is not None and running.kind not in REMOVALS:
            active = running.target  # a start or a first deployment, stopped midway
        if active is None:
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
        if service in e.rollouts.running:
            raise Conflict(
                f"{service}: a rollout is running (a start?); wait for it "
                "(kiln events --follow) or kiln stop it"
            )
        target = stopped_revision(revisions)
        if target is None:
            raise KilnError(
                f"{service} was not stopped by kiln stop or kiln down; deploy it with kiln up"
            )
        if target.config.get("listen"):
            await e.routing.check_listen(service, int(target.config["listen"]))
        record = await e.deployments.create(f"start {service}", {service: target.number})
        await e.rollouts.begin(Rollout(service, target, str(record["id"]), "start", time.time()))
        return {"deployment": record["id"], "service": service, "revision": target.number}

    async def exec(self, name: str, argv: list[str], timeout: float) -> dict[str, Any]:
        """``argv`` inside a live instance through the runtime's exec, recorded as an event;
        the instance is marked touched before the command runs. Execs run in a pool of
        their own, bounded, so long ones never hold the runtime calls the agent's own
        work (starts, health checks, retirements) waits on."""
        e = self.engine
        runtime = e.runtime
        if not isinstance(runtime, Execer) or not runtime.capabilities.exec:
            raise KilnError(f"the {runtime.name} runtime cannot run commands in instances")
        if self._running >= EXECS_MAX:
            raise Conflict(f"{EXECS_MAX} kiln exec commands are running already; try again later")
        self._running += 1
        try:
            return await self._exec(runtime, name, argv, timeout)
        finally:
            self._running -= 1

    async def _exec(
        self, runtime: Execer, name: str, argv: list[str], timeout: float
    ) -> dict[str, Any]:
        e = self.engine
        rec = await self._instance(name)
        handle = handle_of(rec)
        if handle is None:
            raise Conflict(f"{rec.id} has not started yet; try again")
        if rec.touched is None:
            rec = await e.db(e.state.update_instance, rec.id, touched=time.time())
        command = _summary(argv)
        e.emit(
            "instance.exec",
            f"{rec.id}: kiln exec {command} (marked touched; kiln restart {rec.service} "
            "replaces it first)",
            rec.service,
            rec.id,
            rec.revision,
            {"command": command, "arguments": len(argv)},
        )
        started = time.monotonic()
        loop = asyncio.get_running_loop()
        code, output = await loop.run_in_executor(self._pool, runtime.exec, handle, argv, timeout)
        e.emit(
            "instance.exec_done",
            f"{rec.id}: {_summary(argv[:1])} exited {code} after {time.monotonic() - started:.1f}s",
            rec.service,
            rec.id,
            rec.revision,
            {"exit_code": code},
        )
        return {
            "instance": rec.id,
            "exit_code": code,
            "output": output.removeprefix(OUTPUT_CUT),
            "truncated": output.startswith(OUTPUT_CUT),
        }

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

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
        if name in await e.db(e.state.services):
            raise Conflict(f"service {name} has no ready instance to run a command in")
        prefixed = [r for r in live if r.id.startswith(name)]
        if len(prefixed) == 1:
            return prefixed[0]
        if prefixed:
            names = ", ".join(sorted(r.id for r in prefixed))
            raise KilnError(f"{name!r} names more than one instance: {names}")
        raise NotFound(f"no running instance or service {name!r}; kiln status lists them")


def stopped_revision(revisions: list[Revision]) -> Revision | None:
    """The revision to start again: the newest, if stopped while it was being deployed,
    or else the one active last, if stopping is why it is not active now."""
    if not revisions:
        return None

    def stopped(rev: Revision) -> bool:
        return rev.status == "superseded" and rev.reason in STOPPED_BY

    if stopped(revisions[-1]):
        return revisions[-1]
    activated = [r for r in revisions if r.activated is not None]
    if not activated:
        return None
    last = max(activated, key=lambda r: r.activated or 0)
    return last if stopped(last) else None


def _summary(argv: list[str]) -> str:
    """The command as a shell would show it, cut to ``SUMMARY_MAX`` characters."""
    text = shlex.join(argv)
    return text if len(text) <= SUMMARY_MAX else text[: SUMMARY_MAX - 1] + "…"
