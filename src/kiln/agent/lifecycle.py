"""The one owner of every instance's life: its states, who may move it, and how.

``pending → starting → ready ⇄ unhealthy → draining → stopping → stopped``, or
``failed``/``lost`` when it dies. Each move is a compare-and-set in state.db
(``UPDATE … WHERE state IN (…)``) taken from :data:`TRANSITIONS`, so two
owners (a rollout retiring an instance while its start is still in the
runtime, a watcher seeing it die while it drains) can never both win: the
loser sees ``None`` and leaves the instance to the winner.

A starter that loses against a retire records the handle it got and leaves
the stopping to the retire, which waits for the start to land first: exactly
one party stops every sandbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import TYPE_CHECKING, Any

from kiln.agent.executor import build_instance_spec, image_launch
from kiln.deploy.secrets import SecretStore
from kiln.deploy.state import InstanceRecord, InstanceState, Revision, new_instance_id
from kiln.errors import KilnError
from kiln.runtime import ExitNotifier, InstanceHandle, InstanceStatus
from kiln.runtime import InstanceState as RunState

if TYPE_CHECKING:
    from kiln.agent.engine import Engine

__all__ = ["IN_SERVICE", "TRANSITIONS", "Lifecycle", "handle_of"]

log = logging.getLogger("kiln.agent")

TRANSITIONS: dict[InstanceState, tuple[InstanceState, ...]] = {
    "starting": ("pending",),
    "ready": ("starting", "unhealthy"),
    "unhealthy": ("starting", "ready"),
    "draining": ("pending", "starting", "ready", "unhealthy"),
    "stopping": ("draining",),
    "stopped": ("pending", "starting", "stopping"),
    "failed": ("pending", "starting", "ready", "unhealthy"),
    "lost": ("pending", "starting", "ready", "unhealthy"),
}
"""state → the states it may be entered from. A death during draining or stopping
is not a failure: the retire that is under way finishes the instance. ``starting →
stopped`` is only for a start the agent was killed during, which left nothing."""

IN_SERVICE: tuple[InstanceState, ...] = ("pending", "starting", "ready", "unhealthy")
WATCH_SLICE = 3600.0
"""How long one blocking ``wait`` lasts in a watcher thread before it is renewed."""


def handle_of(rec: InstanceRecord) -> InstanceHandle | None:
    if not rec.handle:
        return None
    try:
        return InstanceHandle.from_json(rec.handle)
    except KilnError:
        return None


class Lifecycle:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.starting: dict[str, asyncio.Task[None]] = {}
        self.retiring: dict[str, asyncio.Task[None]] = {}
        self.watchers: dict[str, asyncio.Task[None]] = {}

    async def move(self, iid: str, to: InstanceState, **fields: Any) -> InstanceRecord | None:
        """The only way an instance changes state: a compare-and-set from the states
        :data:`TRANSITIONS` allows; None when another owner moved it first."""
        e = self.engine
        rec = await e.db(e.state.cas_instance, iid, TRANSITIONS[to], state=to, **fields)
        if rec is not None:
            e.changed(rec.service)
        return rec

    # birth

    async def new(
        self,
        service: str,
        rev: Revision,
        *,
        deployment: str | None = None,
        replaces: str | None = None,
    ) -> InstanceRecord:
        """Recorded ``pending`` before anything is asked of the runtime, so every view
        taken meanwhile counts it and a restart knows it was meant to exist."""
        e = self.engine
        rec = await e.db(
            e.state.add_instance,
            service,
            rev.number,
            port=int(rev.config.get("port") or 8080),
            id=new_instance_id(service),
            state="pending",
            deployment=deployment,
            replaces=replaces,
        )
        e.changed(service)
        return rec

    def launch(self, rec: InstanceRecord, rev: Revision) -> None:
        task = self.engine.spawn(self._start(rec, rev), f"start {rec.id}")
        self.starting[rec.id] = task

        def done(_: asyncio.Task[None]) -> None:
            if self.starting.get(rec.id) is task:
                del self.starting[rec.id]

        task.add_done_callback(done)

    async def _start(self, rec: InstanceRecord, rev: Revision) -> None:
        e = self.engine
        if await self.move(rec.id, "starting") is None:
            return  # retired before it started: nothing was made
        cfg = rev.config
        service = rec.service
        try:
            pinned = dict(cfg.get("secrets_versions") or {})
            values = await e.io(SecretStore(e.home / "secrets").values_for, pinned)
            image_cfg: dict[str, Any] = dict(cfg.get("image_config") or {}) or await e.io(
                e.images.image_config, rev.image_digest
            )
            launch = image_launch(image_cfg, f"{service} r{rev.number} ({rev.image_digest[:19]})")
            res = cfg.get("resources") or {}
            spec = build_instance_spec(
                instance_id=rec.id,
                service=service,
                revision=rev.number,
                image_digest=rev.image_digest,
                launch=launch,
                service_env={str(k): str(v) for k, v in (cfg.get("env") or {}).items()},
                port=int(rec.port or cfg.get("port") or 8080),
                writable=list(cfg.get("writable") or []),
                volumes=list(cfg.get("volumes") or []),
                memory=res.get("memory"),
                cpu=res.get("cpu"),
                stop_grace=float(cfg.get("stop_grace", 10.0)),
                secrets=values,
                pids=int(res.get("pids") or 1024),
                cap_add=tuple(str(c) for c in cfg.get("cap_add") or ()),
                seccomp=cfg.get("seccomp", "default") != "unconfined",
                outbound=cfg.get("network") == "outbound",
                project=cfg.get("project"),
            )
            handle = await e.io(e.runtime.start, spec)
        except Exception as err:
            # Any failure, not only a KilnError: an instance left `starting` with no
            # sandbox would count as a replica that nothing checks or replaces.
            if not isinstance(err, KilnError):
                log.error("starting %s failed", rec.id, exc_info=err)
            why = str(err) if isinstance(err, KilnError) else f"{type(err).__name__}: {err}"
            failed = await self.move(rec.id, "failed", reason=why, stopped_at=time.time())
            if failed is not None:
                e.emit("instance.failed", f"{rec.id} could not start: {why}", service, rec.id,
                       rev.number, {"reason": why})  # fmt: skip
            return
        started = await e.db(e.state.cas_instance, rec.id, ("starting",), handle=handle.to_json())
        if started is None:
            # Retired while its sandbox was being made: record what was made, and the
            # retire (which waits for this start) stops it.
            await e.db(
                e.state.cas_instance, rec.id, ("draining", "stopping"), handle=handle.to_json()
            )
            return
        e.changed(service)
        pid = (await e.io(e.runtime.inspect, handle)).pid
        e.emit(
            "instance.started",
            f"{rec.id} started (pid {pid}, address {handle.address})",
            service,
            rec.id,
            rev.number,
            {"address": handle.address, "pid": pid},
        )
        self.watch(started, handle)
        e.health.track(started)

    # watching

    def watch(self, rec: InstanceRecord, handle: InstanceHandle) -> None:
        """One watcher per instance, woken by its exit: an fd on the event loop where the
        runtime gives one, else a blocking ``wait`` in a thread of its own."""
        old = self.watchers.pop(rec.id, None)
        if old is not None:
            old.cancel()
        self.watchers[rec.id] = self.engine.spawn(
            self._watch(rec.id, handle), f"watch {rec.id}", restart=False
        )

    async def _watch(self, iid: str, handle: InstanceHandle) -> None:
        e = self.engine
        runtime = e.runtime
        while True:
            fd = runtime.exit_fd(handle) if isinstance(runtime, ExitNotifier) else None
            if fd is not None:
                try:
                    await e.readable(fd)
                finally:
                    with contextlib.suppress(OSError):
                        os.close(fd)
                state = await e.io(runtime.inspect, handle)
            else:
                state = await e.wait_instance(handle, WATCH_SLICE)
            if state.status is not InstanceStatus.RUNNING:
                self.watchers.pop(iid, None)
                await self.died(iid, state)
                return

    async def died(self, iid: str, st: RunState) -> None:
        e = self.engine
        now = time.time()
        to: InstanceState = "failed" if st.status is InstanceStatus.EXITED else "lost"
        why = f"exited with code {st.exit_code}" if st.exit_code is not None else "gone"
        if st.oom_killed:
            why = f"OOM-killed at its memory limit ({why})"
        rec = await self.move(
            iid, to, reason=why, stopped_at=now, exit_code=st.exit_code, noticed=now
        )
        if rec is None:
            return  # being retired: its retire finishes it
        e.health.forget(iid)
        e.emit(
            "instance.died",
            f"{iid} {why}",
            rec.service,
            iid,
            rec.revision,
            {"exit_code": st.exit_code, "noticed": now, "oom_killed": st.oom_killed},
        )
        await e.routing.push(rec.service)
        handle = handle_of(rec)
        if handle is not None:
            try:
                await e.io(e.runtime.destroy, handle)
            except KilnError as err:
                log.warning("destroying dead instance %s failed: %s", iid, err)

    async def fail(self, rec: InstanceRecord, why: str) -> None:
        """A start that never became healthy: failed (so the reconciler backs off) and
        its sandbox stopped."""
        e = self.engine
        moved = await self.move(rec.id, "failed", reason=why, stopped_at=time.time())
        if moved is None:
            return
        e.health.forget(rec.id)
        self._unwatch(rec.id)
        e.emit("instance.failed", f"{rec.id} {why}", rec.service, rec.id, rec.revision,
               {"reason": why})  # fmt: skip
        handle = handle_of(moved)
        if handle is not None:
            grace = float((await e.config_of(moved)).get("stop_grace", 10.0))
            with contextlib.suppress(KilnError):
                await e.io(e.runtime.stop, handle, grace)
                await e.io(e.runtime.destroy, handle)

    def _unwatch(self, iid: str) -> None:
        task = self.watchers.pop(iid, None)
        if task is not None:
            task.cancel()

    # retirement

    async def retire(self, iid: str, reason: str) -> None:
        """Out of the route, drain in-flight requests, SIGTERM, SIGKILL after grace,
        destroy. Idempotent: a second retire of the same instance waits for the first."""
        running = self.retiring.get(iid)
        if running is not None and running is not asyncio.current_task():
            await asyncio.shield(running)
            return
        task = asyncio.current_task()
        if task is not None:
            self.retiring[iid] = task
        try:
            await self._retire(iid, reason)
        finally:
            self.retiring.pop(iid, None)

    async def _retire(self, iid: str, reason: str) -> None:
        e = self.engine
        rec = await e.db(e.state.instance, iid)
        if rec.state == "pending":
            stopped = await self.move(iid, "stopped", reason=reason, stopped_at=time.time())
            if stopped is not None:
                e.emit("instance.stopped", f"{iid} retired before it started ({reason})",
                       rec.service, iid, rec.revision)  # fmt: skip
                return
            rec = await e.db(e.state.instance, iid)
        # A draining one (a retire resumed after an agent restart) may still carry requests.
        was_routed = rec.state in ("ready", "draining")
        if rec.state not in ("draining", "stopping"):
            moved = await self.move(iid, "draining", reason=reason)
            if moved is None:
                return  # died or stopped meanwhile: nothing left to retire
            rec = moved
        e.health.forget(iid)
        start = self.starting.get(iid)
        if start is not None:
            # Its sandbox is being made: let the start land, then stop what it made.
            await asyncio.wait([start])
            rec = await e.db(e.state.instance, iid)
        await e.routing.push(rec.service)
        cfg = await e.config_of(rec)
        if was_routed:
            timeout = float(cfg.get("drain_timeout", 10.0))
            try:
                cut = await e.io(e.router.drain, rec.service, iid, timeout)
            except KilnError as err:
                log.warning("drain of %s: %s", iid, err)
                cut = 0
            if cut:
                e.emit(
                    "instance.drain_timeout",
                    f"{iid}: {cut} request(s) still in flight after {timeout:g}s were cut",
                    rec.service,
                    iid,
                    rec.revision,
                    {"cut": cut},
                )
        if rec.state == "draining":
            rec = await self.move(iid, "stopping") or rec
        await e.routing.push(rec.service)
        self._unwatch(iid)
        handle = handle_of(rec)
        exit_code = None
        if handle is not None:
            try:
                final = await e.io(e.runtime.stop, handle, float(cfg.get("stop_grace", 10.0)))
                exit_code = final.exit_code
                await e.io(e.runtime.destroy, handle)
            except KilnError as err:
                log.warning("retire %s: %s", iid, err)
        await self.move(iid, "stopped", stopped_at=time.time(), exit_code=exit_code)
        e.emit("instance.stopped", f"{iid} retired ({reason})", rec.service, iid, rec.revision)
