"""The agent's work: carry out plans, rollouts and reconciler decisions on the runtime and router.

The decisions themselves are pure and live in :mod:`kiln.deploy` (the
planner, the rolling strategy, the reconciler); this module only builds their
views from the state store, carries out what they return and records it.
Every blocking call (runtime, unpack, router) goes to the thread pool; the router is
programmed only through the :class:`kiln.traffic.Router` boundary.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from kiln.agent.errors import Conflict, NotFound
from kiln.agent.executor import ImageSnapshots, PortPool, build_instance_spec, image_launch
from kiln.deploy.health import ExecRunner, HealthState, HealthTracker, probe
from kiln.deploy.plan import Plan, plan_answer
from kiln.deploy.reconcile import ReconcilePolicy, ReconcileView, reconcile
from kiln.deploy.rollout import STRATEGIES, RolloutInstance, RolloutView
from kiln.deploy.secrets import SecretStore
from kiln.deploy.state import (
    InstanceRecord,
    Revision,
    RevisionStatus,
    StateStore,
    new_instance_id,
)
from kiln.errors import KilnError
from kiln.paths import private_dirs, write_private
from kiln.runtime import Execer, HostResources, InstanceHandle, InstanceStatus, Runtime
from kiln.spec.models import Health, Update
from kiln.traffic import Backend, BackendState, Route, Router

__all__ = ["Engine"]

log = logging.getLogger("kiln.agent")
T = TypeVar("T")

RECONCILE_INTERVAL = 0.5
ROUTER_CHECK_INTERVAL = 2.0
"""How often the router is asked to answer on every listener; its death is seen at once."""
ROUTER_CHECK_FAILURES = 3
EVENTS_MAX_AGE = 30 * 86400.0
EVENTS_MAX_COUNT = 200_000
EVENTS_KEPT = frozenset({"revision.created", "alarm.cleared"})
"""Events the agent reads back at start (a deployment's revisions, a breaker reset)."""
ROLLOUT_TICK = 0.1
ROUTED = ("ready",)
IN_SERVICE = ("starting", "ready", "unhealthy")


async def _thread(fn: Callable[..., T], *args: Any) -> T:
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


class Engine:
    def __init__(
        self,
        home: Path,
        state: StateStore,
        runtime: Runtime,
        router: Router,
        on_event: Callable[[], None] = lambda: None,
    ) -> None:
        self.home = home
        self.state = state
        self.runtime = runtime
        self.router = router
        self.snapshots = ImageSnapshots(home)
        self.ports = PortPool()
        self._on_event = on_event
        self.trackers: dict[str, HealthTracker] = {}
        self.health_tasks: dict[str, asyncio.Task[None]] = {}
        self.retiring: dict[str, asyncio.Task[None]] = {}
        self.rollouts: dict[str, asyncio.Task[str]] = {}
        self.rollout_info: dict[str, dict[str, Any]] = {}
        self.deployments: dict[str, dict[str, Any]] = {}
        self.recovering: dict[str, tuple[str, float]] = {}
        """replacement id → (dead instance id, when its death was noticed)."""
        self._pushed: dict[str, Route] = {}
        self._published: set[int] | None = None
        self._route_lock = asyncio.Lock()
        self._apply_lock = asyncio.Lock()
        self._loops: list[asyncio.Task[None]] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._noticed: dict[str, float] = {}
        """dead instance id → when the reconciler noticed its death."""
        self.breaker_reset: dict[str, float] = {}
        self._stopping = False

    # events

    def emit(
        self,
        kind: str,
        message: str,
        service: str | None = None,
        instance: str | None = None,
        revision: int | None = None,
        data: dict[str, Any] | None = None,
    ) -> None:
        self.state.emit(kind, message, service, instance, revision, data)
        log.info(
            "%s %s service=%s instance=%s revision=%s", kind, message, service, instance, revision
        )
        self._on_event()

    def _spawn(self, coro: Awaitable[T]) -> asyncio.Task[T]:
        task: asyncio.Task[T] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed", exc_info=task.exception())

    # lifecycle

    async def start(self) -> None:
        how = await _thread(self.router.start)
        info = self.router.info()
        self.emit(f"proxy.{how}", f"router {how} ({_describe(info)})", data=info)
        # What the router serves now is read back from it, so an agent restart changes
        # only what differs from the state instead of resetting every route.
        self._pushed = await _thread(self.router.routes)
        self._restore_breaker_resets()
        await self.adopt()
        await self.push_routes()
        self._loops = [
            asyncio.create_task(self._reconcile_loop()),
            asyncio.create_task(self._router_watch_loop()),
            asyncio.create_task(self._log_retention_loop()),
        ]

    async def stop(self) -> None:
        """Stop the agent's own work only: instances and the proxy keep running."""
        self._stopping = True
        tasks = [*self._loops, *self.health_tasks.values(), *self.rollouts.values(), *self._tasks]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        await _thread(self.router.close)

    async def down(self) -> dict[str, Any]:
        """Drain and stop every instance, then the proxy; the agent exits afterwards."""
        for task in [*self._loops, *self.rollouts.values()]:
            task.cancel()
        # A start already in the runtime cannot be called back: let it land, then retire it
        # with the rest, or it would outlive the down.
        pending = [t for t in self._tasks if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=60)
        live = self.state.instances(live_only=True)
        await asyncio.gather(
            *(self.retire(i.id, "kiln down") for i in live), return_exceptions=True
        )
        for handle in await _thread(self.runtime.list):
            with contextlib.suppress(KilnError):
                await _thread(self.runtime.destroy, handle)
        await _thread(self.router.stop)
        if isinstance(self.runtime, HostResources):
            with contextlib.suppress(KilnError):
                await _thread(self.runtime.shutdown)
        self.emit("agent.down", f"down: stopped {len(live)} instance(s) and the proxy")
        return {"stopped": sorted(i.id for i in live), "proxy": "stopped"}

    async def down_homeless(self) -> dict[str, Any]:
        """``down`` for an agent whose home was deleted: no route can be written and no
        instance directory read, so it goes straight to the processes: HAProxy (found by
        its command line) and each instance's sandbox (by the pids in its handle)."""
        for task in [*self._loops, *self.rollouts.values()]:
            task.cancel()
        try:
            await _thread(self.router.stop)
        except Exception as e:
            log.error("stopping the router: %s", e)
        stopped = []
        for rec in self.state.instances(live_only=True):
            handle = _handle(rec)
            if handle is None:
                continue
            try:
                await _thread(self.runtime.stop, handle, 1.0)
                stopped.append(rec.id)
            except Exception as e:
                log.error("stopping %s: %s", rec.id, e)
            with contextlib.suppress(Exception):
                await _thread(self.runtime.destroy, handle)
        if isinstance(self.runtime, HostResources):
            with contextlib.suppress(Exception):
                await _thread(self.runtime.shutdown)
        return {"stopped": sorted(stopped), "proxy": "stopped"}

    def _restore_breaker_resets(self) -> None:
        """The apply that cleared a meltdown outlives this agent: without its moment, the
        deaths before it (still in the meltdown window) would trip the breaker again."""
        for event in self.state.events(0, 1_000_000, kind="alarm.cleared"):
            if event.service is not None:
                self.breaker_reset[event.service] = float(
                    event.data.get("breaker_reset_at", event.ts)
                )

    # adoption

    async def adopt(self) -> None:
        """Keep what still runs, mark lost what does not, destroy what the state never knew."""
        known: set[str] = set()
        for rec in self.state.instances(live_only=True):
            known.add(rec.id)
            handle = _handle(rec)
            alive = handle is not None and await _thread(self.runtime.recover, handle)
            if not alive or handle is None:
                self.state.update_instance(
                    rec.id, state="lost", reason="gone while the agent was down"
                )
                self.emit(
                    "instance.lost",
                    f"{rec.id} did not survive the agent restart",
                    rec.service,
                    rec.id,
                    rec.revision,
                )
                continue
            if rec.port is not None:
                self.ports.hold(rec.port)
            if rec.state in ("draining", "stopping"):
                self._spawn(self.retire(rec.id, "retirement resumed after agent restart"))
            else:
                self._track(rec, adopted=True)
            self.emit(
                "instance.adopted",
                f"adopted {rec.id} (pid {_pid_of(handle)})",
                rec.service,
                rec.id,
                rec.revision,
            )
        if isinstance(self.runtime, HostResources):
            for leftover in await _thread(self.runtime.leftovers):
                with contextlib.suppress(KilnError):
                    await _thread(self.runtime.release, leftover)
        all_known = {i.id for i in self.state.instances()}
        for handle in await _thread(self.runtime.list):
            if handle.instance_id in all_known and handle.instance_id in known:
                continue
            await _thread(self.runtime.stop, handle, 5.0)
            await _thread(self.runtime.destroy, handle)
            self.emit(
                "instance.orphan",
                f"stopped orphan {handle.instance_id} unknown to the state",
                instance=handle.instance_id,
            )
        for service in self.state.services():
            pending = [r for r in self.state.revisions(service) if r.status == "pending"]
            if not pending:
                continue
            target = pending[-1]
            deployment = self._deployment_of(service, target.number)
            self.emit(
                "rollout.resumed",
                f"{service}: resuming the rollout to r{target.number} "
                "interrupted by an agent restart",
                service,
                revision=target.number,
            )
            self.start_rollout(service, target, deployment, kind="deploy")

    def _deployment_of(self, service: str, revision: int) -> str | None:
        for event in self.state.events(0, 100000, service=service, kind="revision.created"):
            if event.revision == revision:
                found = event.data.get("deployment")
                if isinstance(found, str):
                    with contextlib.suppress(KilnError, OSError, ValueError):
                        record = self.deployment(found)
                        record["outcome"] = "running"
                        entry = record["services"].setdefault(service, {"revision": revision})
                        entry["outcome"] = "running"
                        self.deployments[found] = record
                        return found
        return None

    # instances

    async def start_instance(self, service: str, rev: Revision, rec: InstanceRecord) -> None:
        cfg = rev.config
        try:
            pinned = dict(cfg.get("secrets_versions") or {})
            values = await _thread(SecretStore(self.home / "secrets").values_for, pinned)
            layers = await _thread(self.snapshots.layers, rev.image_digest)
            image_cfg: dict[str, Any] = dict(cfg.get("image_config") or {}) or await _thread(
                self.snapshots.image_config, rev.image_digest
            )
            launch = image_launch(image_cfg, f"{service} r{rev.number} ({rev.image_digest[:19]})")
            res = cfg.get("resources") or {}
            assert rec.port is not None
            spec = build_instance_spec(
                instance_id=rec.id,
                service=service,
                revision=rev.number,
                image_digest=rev.image_digest,
                layers=layers,
                launch=launch,
                service_env={str(k): str(v) for k, v in (cfg.get("env") or {}).items()},
                port=rec.port,
                writable=list(cfg.get("writable") or []),
                volumes=list(cfg.get("volumes") or []),
                volume_root=self.home / "volumes",
                memory=res.get("memory"),
                cpu=res.get("cpu"),
                stop_grace=float(cfg.get("stop_grace", 10.0)),
                secrets=values,
                pids=int(res.get("pids") or 1024),
                cap_add=tuple(str(c) for c in cfg.get("cap_add") or ()),
                seccomp=cfg.get("seccomp", "default") != "unconfined",
                outbound=cfg.get("network") == "outbound",
            )
            handle = await _thread(self.runtime.start, spec)
        except Exception as e:
            # Any failure, not only a KilnError: an instance left `starting` with no
            # sandbox would count as a replica that nothing checks or replaces.
            if not isinstance(e, KilnError):
                log.error("starting %s failed", rec.id, exc_info=e)
            why = str(e) if isinstance(e, KilnError) else f"{type(e).__name__}: {e}"
            self.state.cas_instance(
                rec.id, ("starting",), state="failed", reason=why, stopped_at=time.time()
            )
            self.ports.release(rec.port or 0)
            self.emit(
                "instance.failed", f"{rec.id} could not start: {why}", service, rec.id, rev.number
            )
            return
        started = self.state.cas_instance(rec.id, ("starting",), handle=handle.to_json())
        if started is None:
            # Retired while its sandbox was being made: the starter owns what it made.
            self.emit(
                "instance.stopped",
                f"{rec.id} was retired while it started; its sandbox is stopped",
                service,
                rec.id,
                rev.number,
            )
            with contextlib.suppress(KilnError):
                await _thread(self.runtime.stop, handle, float(cfg.get("stop_grace", 10.0)))
                await _thread(self.runtime.destroy, handle)
            return
        rec = started
        self.emit(
            "instance.started",
            f"{rec.id} started (pid {_pid_of(handle)}, port {rec.port})",
            service,
            rec.id,
            rev.number,
            {"port": rec.port, "pid": _pid_of(handle)},
        )
        self._track(rec)

    def new_instance(self, service: str, rev: Revision) -> InstanceRecord:
        """Recorded before it starts, so every view taken meanwhile counts it.

        An instance with a network of its own listens on the service's port, as a
        container does (a stock image that listens on 80 runs unchanged); only on the
        host's network does each instance need a port of its own."""
        if self.runtime.capabilities.host_network:
            port = self.ports.allocate()
        else:
            port = int(rev.config.get("port") or 8080)
        return self.state.add_instance(service, rev.number, port=port, id=new_instance_id(service))

    def _track(self, rec: InstanceRecord, adopted: bool = False) -> None:
        rev = self.state.revision(rec.service, rec.revision)
        health = Health.model_validate(rev.config.get("health") or {})
        tracker = HealthTracker(health, rec.created)
        if adopted and rec.state == "ready":
            tracker.observe(True, time.time())
            tracker.ready_since = rec.ready_at or time.time()
        self.trackers[rec.id] = tracker
        old = self.health_tasks.pop(rec.id, None)
        if old is not None:
            old.cancel()
        self.health_tasks[rec.id] = asyncio.create_task(self._supervised_health(rec.id, health))

    async def _supervised_health(self, iid: str, health: Health) -> None:
        """An exception must not end an instance's health checks in silence: it is
        recorded and the loop starts again."""
        while True:
            try:
                await self._health_loop(iid, health)
                return
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.error("health checks of %s failed", iid, exc_info=e)
                with contextlib.suppress(Exception):
                    rec = self.state.instance(iid)
                    self.emit(
                        "instance.health_error",
                        f"{iid}: health checking failed ({type(e).__name__}: {e}); restarted",
                        rec.service,
                        iid,
                        rec.revision,
                    )
                await asyncio.sleep(health.interval)

    async def _health_loop(self, iid: str, health: Health) -> None:
        """Probe at ``interval``, except that a starting instance that has not passed
        yet is probed on a quick ramp (50 ms, doubling up to ``interval``): readiness
        is seen as soon as the app answers, which is what rollouts and recovery wait on.
        Failures while starting never count against an instance, so the ramp is free.
        """
        tracker = self.trackers[iid]
        ramp = STARTING_PROBE_DELAY
        while True:
            rec = self.state.instance(iid)
            if rec.state not in IN_SERVICE or rec.port is None:
                return
            result = await probe(health, _address(rec), rec.port, self._exec_runner(rec))
            before = tracker.state
            now = time.time()
            after = tracker.observe(result, now)
            if after is not before:
                await self._health_changed(iid, after.value, result.detail, now)
            elif (
                rec.state == "starting"
                and rec.service not in self.rollouts
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
        handle = _handle(rec)
        runtime = self.runtime
        if handle is None or not isinstance(runtime, Execer) or not runtime_can_exec(runtime):
            return None

        async def run(argv: Sequence[str], timeout: float) -> int:
            try:
                code, _ = await _thread(runtime.exec, handle, list(argv), timeout)
            except KilnError as e:
                raise OSError(str(e)) from e
            return code

        return run

    async def _missed_deadline(self, rec: InstanceRecord, detail: str, now: float) -> bool:
        """Outside a rollout nobody else bounds a start: a replacement that never gets
        healthy within ``healthy_deadline`` is failed, so the reconciler backs off."""
        update = Update.model_validate(self._config(rec).get("update") or {})
        if now - rec.created <= update.healthy_deadline:
            return False
        why = f"not healthy within healthy_deadline {update.healthy_deadline:g}s ({detail})"
        self.state.update_instance(rec.id, state="failed", reason=why, stopped_at=now)
        self.trackers.pop(rec.id, None)
        self.health_tasks.pop(rec.id, None)
        self.emit("instance.failed", f"{rec.id} {why}", rec.service, rec.id, rec.revision)
        handle = _handle(rec)
        if handle is not None:
            with contextlib.suppress(KilnError):
                await _thread(
                    self.runtime.stop, handle, float(self._config(rec).get("stop_grace", 10.0))
                )
                await _thread(self.runtime.destroy, handle)
        if rec.port is not None:
            self.ports.release(rec.port)
        return True

    async def _health_changed(self, iid: str, health: str, detail: str, now: float) -> None:
        rec = self.state.instance(iid)
        if rec.state not in IN_SERVICE:
            return
        if health == "ready":
            rec = self.state.update_instance(iid, state="ready", ready_at=now)
            self.emit(
                "instance.ready", f"{iid} is ready ({detail})", rec.service, iid, rec.revision
            )
            recovery = self.recovering.pop(iid, None)
            if recovery is not None:
                dead, noticed = recovery
                seconds = now - noticed
                if self.state.instance(dead).state in IN_SERVICE:
                    self._spawn(self.retire(dead, f"unhealthy; replaced by {iid}"))
                self.state.record_recovery(rec.service, dead, noticed, now)
                self.emit(
                    "instance.recovered",
                    f"{dead} replaced by {iid}: time to recovery {seconds:.2f}s",
                    rec.service,
                    dead,
                    rec.revision,
                    {"replacement": iid, "time_to_recovery": seconds},
                )
        elif health == "unhealthy":
            rec = self.state.update_instance(iid, state="unhealthy", reason=detail)
            self._noticed[iid] = now
            self.emit(
                "instance.unhealthy",
                f"{iid} is unhealthy ({detail})",
                rec.service,
                iid,
                rec.revision,
            )
        await self.push_routes(rec.service)

    async def retire(self, iid: str, reason: str) -> None:
        """Out of the route, drain in-flight requests, SIGTERM, SIGKILL after grace, destroy."""
        running = self.retiring.get(iid)
        if running is not None and running is not asyncio.current_task():
            await running
            return
        task = asyncio.current_task()
        if task is not None:
            self.retiring[iid] = task
        try:
            await self._retire(iid, reason)
        finally:
            self.retiring.pop(iid, None)

    async def _retire(self, iid: str, reason: str) -> None:
        rec = self.state.instance(iid)
        health_task = self.health_tasks.pop(iid, None)
        if health_task is not None:
            health_task.cancel()
        self.trackers.pop(iid, None)
        cfg = self._config(rec)
        was_routed = rec.state == "ready"
        if rec.state not in ("draining", "stopping"):
            rec = self.state.update_instance(iid, state="draining", reason=reason)
        await self.push_routes(rec.service)
        if was_routed:
            timeout = float(cfg.get("drain_timeout", 10.0))
            try:
                cut = await _thread(self.router.drain, rec.service, iid, timeout)
            except KilnError as e:
                log.warning("drain of %s: %s", iid, e)
                cut = 0
            if cut:
                self.emit(
                    "instance.drain_timeout",
                    f"{iid}: {cut} request(s) still in flight after {timeout:g}s were cut",
                    rec.service,
                    iid,
                    rec.revision,
                    {"cut": cut},
                )
        self.state.update_instance(iid, state="stopping")
        await self.push_routes(rec.service)
        handle = _handle(rec)
        exit_code = None
        if handle is not None:
            try:
                final = await _thread(self.runtime.stop, handle, float(cfg.get("stop_grace", 10.0)))
                exit_code = final.exit_code
                await _thread(self.runtime.destroy, handle)
            except KilnError as e:
                log.warning("retire %s: %s", iid, e)
        self.state.update_instance(
            iid, state="stopped", stopped_at=time.time(), exit_code=exit_code
        )
        if rec.port is not None:
            self.ports.release(rec.port)
        self.emit("instance.stopped", f"{iid} retired ({reason})", rec.service, iid, rec.revision)

    def _config(self, rec: InstanceRecord) -> dict[str, Any]:
        try:
            return self.state.revision(rec.service, rec.revision).config
        except KilnError:
            return {}

    # router

    def _route_for(self, service: str) -> Route | None:
        """Ready instances take requests, draining ones finish theirs, starting and
        unhealthy ones are known to the router but get nothing."""
        rev = self.state.active_revision(service)
        pending = [r for r in self.state.revisions(service) if r.status == "pending"]
        source = pending[-1] if pending else rev
        cfg = source.config if source is not None else None
        if not cfg or not cfg.get("listen"):
            return None
        backends = []
        for i in self.state.instances(service, live_only=True):
            if i.port is None or i.state in ("stopping", "stopped"):
                continue
            state: BackendState = (
                "ready"
                if i.state == "ready"
                else "draining"
                if i.state == "draining"
                else "maintenance"
            )
            backends.append(Backend(id=i.id, address=f"{_address(i)}:{i.port}", state=state))
        return Route(
            name=service,
            listen=int(cfg["listen"]),
            protocol=str(cfg.get("protocol", "http")),
            drain_timeout=float(cfg.get("drain_timeout", 10.0)),
            backends=tuple(backends),
        )

    async def push_routes(self, service: str | None = None, force: bool = False) -> None:
        """Act only on a difference: a route identical to the last one pushed is not re-sent."""
        async with self._route_lock:
            names = [service] if service else sorted({*self.state.services(), *self._pushed})
            for name in names:
                try:
                    route = self._route_for(name)
                except KilnError as e:
                    log.warning("route for %s: %s", name, e)
                    continue
                if route is None:
                    if name in self._pushed:
                        try:
                            await _thread(self.router.remove, name)
                            self._pushed.pop(name, None)
                        except KilnError as e:
                            log.warning("removing the route of %s failed: %s", name, e)
                    continue
                if not force and self._pushed.get(name) == route:
                    continue
                try:
                    await _thread(self.router.apply, route)
                except KilnError as e:
                    self._pushed.pop(name, None)
                    log.warning("route push for %s failed: %s", name, e)
                    continue
                self._pushed[name] = route
            await self._publish_ports()

    async def _publish_ports(self) -> None:
        """Instances may reach the host only on the proxy's listen ports."""
        if not isinstance(self.runtime, HostResources):
            return
        ports = {r.listen for r in self._pushed.values()}
        if ports != self._published:
            try:
                await _thread(self.runtime.publish_ports, ports)
                self._published = ports
            except KilnError as e:
                log.warning("publishing listen ports to the runtime failed: %s", e)

    async def _router_watch_loop(self) -> None:
        """The router's death wakes this at once (its exit fd); every interval it must also
        answer on each listener, and one that stops answering is restarted."""
        failures = 0
        while True:
            exited = await _readable(self.router.exit_fd(), ROUTER_CHECK_INTERVAL)
            problems = await _thread(self.router.check)
            if not problems:
                failures = 0
                continue
            failures += 1
            if not exited and failures < ROUTER_CHECK_FAILURES:
                log.warning("router check %d/%d: %s", failures, ROUTER_CHECK_FAILURES, problems)
                continue
            failures = 0
            reason = "; ".join(problems)
            old = self.router.info()
            try:
                await _thread(self.router.restart, reason)
            except KilnError as e:
                log.error("router restart failed: %s", e)
                continue
            new = self.router.info()
            self.emit(
                "proxy.restarted",
                f"router restarted ({reason}; was {_describe(old)}, now {_describe(new)})",
                data={"reason": reason, "old": old, "new": new},
            )
            await self.push_routes(force=True)

    # plan / apply / rollback

    def plan(self, body: dict[str, Any]) -> dict[str, Any]:
        return plan_answer(body, self.state.snapshot())

    async def apply(self, raw: dict[str, Any]) -> dict[str, Any]:
        plan = Plan.from_json(raw)
        source = raw.get("source") or {}
        if self._apply_lock.locked():
            raise Conflict("another kiln apply is being started; try again")
        async with self._apply_lock:
            with self.state.lock("apply", "kiln apply"):
                if plan.base != self.state.state_hash():
                    raise Conflict(
                        "the state changed since this plan was made; run kiln plan again"
                    )
                busy = [
                    s.service for s in plan.services if not s.empty and s.service in self.rollouts
                ]
                if busy:
                    info = self.rollout_info.get(busy[0]) or {}
                    age = time.time() - float(info.get("started") or time.time())
                    raise Conflict(
                        f"service {busy[0]} has a rollout in progress (deployment "
                        f"{info.get('deployment', '?')}, {info.get('kind', 'deploy')} to "
                        f"r{info.get('target', '?')}, started {age:.0f}s ago); wait for it "
                        "or follow it with kiln events --follow"
                    )
                await self._check_listeners(plan)
                deployment = "d-" + secrets.token_hex(4)
                record: dict[str, Any] = {
                    "id": deployment,
                    "started": time.time(),
                    "finished": None,
                    "outcome": "running",
                    "services": {},
                    "summary": plan.summary,
                }
                self.deployments[deployment] = record
                for sp in plan.services:
                    if sp.empty:
                        continue
                    if sp.removed:
                        record["services"][sp.service] = {"revision": None, "outcome": "running"}
                        self._spawn(self._remove_service(sp.service, deployment))
                        continue
                    want = plan.desired[sp.service]
                    if self.state.clear_alarm(sp.service):
                        reset = time.time()
                        self.breaker_reset[sp.service] = reset
                        self.emit(
                            "alarm.cleared",
                            f"{sp.service}: alarm cleared by kiln apply; "
                            "deaths before now no longer count",
                            sp.service,
                            data={"breaker_reset_at": reset},
                        )
                    image_cfg = await _thread(self.snapshots.image_config, want.image_digest)
                    rev = self.state.next_revision(
                        sp.service,
                        image_digest=want.image_digest,
                        config={
                            **want.revision_config(image_cfg),
                            "project": source.get("project"),
                        },
                        config_hash=want.config_hash,
                        spec_text=str(source.get("spec_text") or ""),
                        spec_path=str(source.get("spec_path") or ""),
                        git_commit=source.get("git_commit"),
                        environment=source.get("environment"),
                        status="pending",
                    )
                    record["services"][sp.service] = {"revision": rev.number, "outcome": "running"}
                    self.emit(
                        "revision.created",
                        f"{sp.service} r{rev.number} recorded",
                        sp.service,
                        revision=rev.number,
                        data={"deployment": deployment},
                    )
                    self.start_rollout(sp.service, rev, deployment, kind="deploy")
                self._finish_if_done(deployment)
        return {"deployment": deployment, "services": record["services"]}

    async def _check_listeners(self, plan: Plan) -> None:
        """A listen port another program holds fails the apply before anything changes."""
        for sp in plan.services:
            want = plan.desired.get(sp.service)
            if sp.removed or want is None or not want.service_config.get("listen"):
                continue
            listen = int(want.service_config["listen"])
            current = self._pushed.get(sp.service)
            if current is not None and current.listen == listen:
                continue
            holder = next(
                (n for n, r in self._pushed.items() if n != sp.service and r.listen == listen),
                None,
            )
            if holder is not None:
                raise KilnError(
                    f"service {sp.service}: port {listen} is served by service {holder} now; "
                    "move one service per apply; nothing was changed"
                )
            try:
                await _thread(self.router.check_listen, listen)
            except KilnError as e:
                raise KilnError(
                    f"service {sp.service}: cannot listen on port {listen} ({e}); "
                    "nothing was changed"
                ) from e

    async def rollback(self, service: str, revision: int | None) -> dict[str, Any]:
        if service not in self.state.services():
            raise NotFound(f"no service {service!r}")
        current = self.state.active_revision(service)
        if revision is None:
            target = self.state.previous_good_revision(service)
            if target is None:
                raise KilnError(f"{service}: no previous revision to roll back to")
        else:
            target = self.state.revision(service, revision)
        if current is not None and target.number == current.number and service not in self.rollouts:
            raise KilnError(f"{service}: r{target.number} is already the active revision")
        running = self.rollouts.get(service)
        if running is not None:
            running.cancel()
            with contextlib.suppress(BaseException):
                await running
        deployment = "d-" + secrets.token_hex(4)
        self.deployments[deployment] = {
            "id": deployment,
            "started": time.time(),
            "finished": None,
            "outcome": "running",
            "services": {service: {"revision": target.number, "outcome": "running"}},
            "summary": f"rollback {service} to r{target.number}",
        }
        self.emit(
            "rollback.started",
            f"{service}: rolling back to r{target.number}",
            service,
            revision=target.number,
            data={"deployment": deployment},
        )
        self.start_rollout(service, target, deployment, kind="rollback")
        return {
            "deployment": deployment,
            "service": service,
            "revision": target.number,
            "started": self.deployments[deployment]["started"],
        }

    def start_rollout(
        self, service: str, target: Revision, deployment: str | None, kind: str
    ) -> None:
        task = asyncio.create_task(self._rollout(service, target, deployment, kind))
        self.rollouts[service] = task

        def done(t: asyncio.Task[str]) -> None:
            if self.rollouts.get(service) is t:
                self.rollouts.pop(service, None)
                self.rollout_info.pop(service, None)
            if t.cancelled():
                if deployment is not None and not self._stopping:
                    entry = self.deployments[deployment]["services"].get(service)
                    if entry is not None and entry["outcome"] == "running":
                        entry["outcome"] = "cancelled"
                    self._finish_if_done(deployment)
                return
            exc = t.exception()
            outcome = "failed" if exc is not None else t.result()
            if exc is not None:
                log.error("rollout of %s crashed", service, exc_info=exc)
                self.emit("rollout.failed", f"{service}: rollout crashed: {exc}", service)
            if deployment is not None and outcome != "superseded":
                entry = self.deployments[deployment]["services"].get(service)
                if entry is not None:
                    entry["outcome"] = outcome
                self._finish_if_done(deployment)

        task.add_done_callback(done)

    def _save(self, deployment: str) -> None:
        """Deployments outlive the agent so a CLI following one survives a restart."""
        directory = self.home / "deployments"
        private_dirs(directory)
        data = json.dumps(self.deployments[deployment], sort_keys=True).encode()
        write_private(directory / f"{deployment}.json", data)

    def deployment(self, deployment: str) -> dict[str, Any]:
        record = self.deployments.get(deployment)
        if record is not None:
            return record
        path = self.home / "deployments" / f"{deployment}.json"
        if "/" in deployment or not path.is_file():
            raise NotFound(f"no deployment {deployment!r}")
        loaded: dict[str, Any] = json.loads(path.read_text())
        return loaded

    def _finish_if_done(self, deployment: str) -> None:
        record = self.deployments[deployment]
        outcomes = [s["outcome"] for s in record["services"].values()]
        if "running" in outcomes:
            self._save(deployment)
            return
        record["finished"] = time.time()
        if all(o == "succeeded" for o in outcomes):
            record["outcome"] = "succeeded"
        elif "rolled_back" in outcomes:
            record["outcome"] = "rolled_back"
        else:
            record["outcome"] = "failed"
        self._save(deployment)
        self.emit(
            "deployment.finished",
            f"deployment {deployment}: {record['outcome']}",
            data={"deployment": deployment, "services": record["services"]},
        )

    def _view(
        self, service: str, target: Revision, started: float, mine: set[str], undoing: int | None
    ) -> RolloutView:
        desired = int(target.config.get("replicas", 1))
        old: list[RolloutInstance] = []
        new: list[RolloutInstance] = []
        hashes: dict[int, str] = {}
        for rec in self.state.instances(service):
            if rec.id in self.retiring or rec.state in ("draining", "stopping", "stopped"):
                continue
            if rec.state in ("failed", "lost") and rec.id not in mine:
                continue
            if rec.revision not in hashes:
                hashes[rec.revision] = self.state.revision(service, rec.revision).config_hash
            tracker = self.trackers.get(rec.id)
            ready_since = tracker.ready_since if tracker is not None else rec.ready_at
            inst = RolloutInstance(rec.id, rec.state, rec.created, ready_since)
            same = hashes[rec.revision] == target.config_hash and rec.revision != undoing
            (new if same else old).append(inst)
        update = Update.model_validate(target.config.get("update") or {})
        return RolloutView(
            target_revision=target.number,
            desired=desired,
            old=old,
            new=new,
            now=time.time(),
            update=update,
            started=started,
        )

    async def _rollout(
        self,
        service: str,
        target: Revision,
        deployment: str | None,
        kind: str,
        undoing: int | None = None,
    ) -> str:
        started = time.time()
        update = Update.model_validate(target.config.get("update") or {})
        strategy = STRATEGIES[update.strategy]
        mine: set[str] = set()
        self.rollout_info[service] = {
            "target": target.number,
            "kind": kind,
            "started": started,
            "deployment": deployment,
        }
        self.emit(
            "rollout.started",
            f"{service}: {kind} to r{target.number}",
            service,
            revision=target.number,
            data={"deployment": deployment, "kind": kind},
        )
        while True:
            view = self._view(service, target, started, mine, undoing)
            step = strategy.next_step(view)
            self.rollout_info[service].update(
                healthy=step.healthy, desired=view.desired, new=len(view.new), old=len(view.old)
            )
            if step.done:
                await self._retirements_of(service)
                status_before = self.state.revision(service, target.number).status
                previous_becomes: RevisionStatus = (
                    "rolled_back" if kind in ("rollback", "auto-rollback") else "superseded"
                )
                if status_before != "active":
                    self.state.set_revision_status(
                        service, target.number, "active", previous_becomes=previous_becomes
                    )
                await self._settle_dead(service)
                await self.push_routes(service)
                self.emit(
                    "rollout.succeeded",
                    f"{service}: r{target.number} is live ({view.desired} healthy)",
                    service,
                    revision=target.number,
                    data={"deployment": deployment, "kind": kind},
                )
                return "succeeded" if kind != "auto-rollback" else "rolled_back"
            if step.failed:
                return await self._rollout_failed(
                    service, target, deployment, kind, step.failed, step.culprits
                )
            for iid in step.retire:
                self._spawn(self.retire(iid, f"replaced by r{target.number}"))
            for _ in range(step.start):
                rec = self.new_instance(service, target)
                mine.add(rec.id)
                self._spawn(self.start_instance(service, target, rec))
            await asyncio.sleep(ROLLOUT_TICK)

    async def _retirements_of(self, service: str) -> None:
        """A rollout is over when the instances it retires are gone, not merely out of the route."""
        while True:
            retiring = [
                task
                for rec in self.state.instances(service, live_only=True)
                if rec.state in ("draining", "stopping") and (task := self.retiring.get(rec.id))
            ]
            if not retiring:
                return
            await asyncio.gather(*retiring, return_exceptions=True)

    async def _rollout_failed(
        self,
        service: str,
        target: Revision,
        deployment: str | None,
        kind: str,
        why: str,
        culprits: tuple[str, ...],
    ) -> str:
        update = Update.model_validate(target.config.get("update") or {})
        active = self.state.active_revision(service)
        self.emit(
            "rollout.failed",
            f"{service}: rollout to r{target.number} failed: {why}",
            service,
            revision=target.number,
            data={"culprits": list(culprits)},
        )
        if kind == "deploy":
            self.state.set_revision_status(service, target.number, "failed", reason=why)
        for iid in culprits:
            rec = self.state.instance(iid)
            if rec.state in ("failed", "lost"):
                self.state.update_instance(iid, replaced_by="rollout-failed")
        if kind == "deploy" and update.auto_rollback and active is not None:
            self.emit(
                "rollback.auto",
                f"{service}: auto-rollback to r{active.number} because "
                f"r{target.number} failed: {why}",
                service,
                revision=active.number,
                data={"failed_revision": target.number, "reason": why},
            )
            outcome = await self._rollout(
                service, active, deployment, "auto-rollback", undoing=target.number
            )
            return "rolled_back" if outcome in ("succeeded", "rolled_back") else "failed"
        if kind == "deploy" and active is None:
            for rec in self.state.instances(service, live_only=True):
                if rec.revision == target.number:
                    self._spawn(self.retire(rec.id, f"r{target.number} failed"))
        return "failed"

    async def _settle_dead(self, service: str) -> None:
        """Dead instances a rollout made redundant need no replacement."""
        for rec in self.state.instances(service):
            if rec.state in ("failed", "lost") and rec.replaced_by is None:
                self.state.update_instance(rec.id, replaced_by="rollout")

    async def _remove_service(self, service: str, deployment: str) -> None:
        live = self.state.instances(service, live_only=True)
        await asyncio.gather(*(self.retire(i.id, "service removed from kiln.toml") for i in live))
        active = self.state.active_revision(service)
        if active is not None:
            self.state.set_revision_status(
                service, active.number, "superseded", reason="service removed"
            )
        await self._settle_dead(service)
        await self.push_routes(service)
        self.emit("service.removed", f"{service}: removed", service)
        self.deployments[deployment]["services"][service]["outcome"] = "succeeded"
        self._finish_if_done(deployment)

    # log retention

    async def _log_retention_loop(self) -> None:
        """Logs and events outlive instances, not forever: oldest first."""
        from kiln.observe.logs import LogStore

        store = LogStore(self.home / "logs")
        max_bytes, max_age = log_retention()
        while True:
            try:
                live = {r.id for r in self.state.instances(live_only=True)}
                removed = await _thread(store.prune, max_bytes, max_age, live)
                if removed:
                    self.emit("logs.pruned", f"removed the logs of {removed} gone instances")
                await _thread(
                    self.state.prune_events, EVENTS_MAX_AGE, EVENTS_MAX_COUNT, EVENTS_KEPT
                )
            except Exception:
                log.exception("log retention pass failed")
            await asyncio.sleep(LOG_RETENTION_INTERVAL)

    # reconciler

    async def _reconcile_loop(self) -> None:
        while True:
            try:
                await self.reconcile_once()
            except Exception:
                log.exception("reconcile pass failed")
            await asyncio.sleep(RECONCILE_INTERVAL)

    async def reconcile_once(self) -> None:
        now = time.time()
        live = [r for r in self.state.instances(live_only=True) if r.state in IN_SERVICE]
        handles = [(r, _handle(r)) for r in live if r.id not in self.retiring]
        states = await asyncio.gather(
            *(_thread(self.runtime.inspect, h) for _, h in handles if h is not None)
        )
        changed: set[str] = set()
        for (rec, _), st in zip([p for p in handles if p[1] is not None], states, strict=True):
            if st.status is InstanceStatus.RUNNING:
                continue
            state = "failed" if st.status is InstanceStatus.EXITED else "lost"
            why = f"exited with code {st.exit_code}" if st.exit_code is not None else "gone"
            if st.oom_killed:
                why = f"OOM-killed at its memory limit ({why})"
            self.state.update_instance(
                rec.id, state=state, reason=why, stopped_at=now, exit_code=st.exit_code
            )
            task = self.health_tasks.pop(rec.id, None)
            if task is not None:
                task.cancel()
            self.trackers.pop(rec.id, None)
            self._noticed[rec.id] = now
            self.emit(
                "instance.died",
                f"{rec.id} {why}",
                rec.service,
                rec.id,
                rec.revision,
                {"exit_code": st.exit_code, "noticed": now, "oom_killed": st.oom_killed},
            )
            changed.add(rec.service)
            self._spawn(self._release_dead(rec))
        for service in changed:
            await self.push_routes(service)
        await self._heal(now)

    async def _release_dead(self, rec: InstanceRecord) -> None:
        """A dead instance's logs are already safe (the shim wrote them): free the rest."""
        handle = _handle(rec)
        if handle is not None:
            try:
                await _thread(self.runtime.destroy, handle)
            except KilnError as e:
                log.warning("destroying dead instance %s failed: %s", rec.id, e)

    async def _heal(self, now: float) -> None:
        for service in self.state.services():
            if service in self.rollouts:
                continue
            active = self.state.active_revision(service)
            if active is None:
                continue
            view = ReconcileView.from_records(
                service,
                active.number,
                int(active.config.get("replicas", 1)),
                self.state.instances(service),
                now,
                breaker_open=any(a.kind == "meltdown" for a in self.state.alarms(service)),
                breaker_reset_at=self.breaker_reset.get(service, 0.0),
                policy=ReconcilePolicy.from_heal(active.config.get("heal")),
            )
            decision = reconcile(view, now)
            if decision.noop:
                continue
            for draft in decision.events:
                self.emit(**draft.kwargs())
            if decision.trip_breaker:
                message = decision.events[0].message if decision.events else "meltdown"
                self.state.raise_alarm(service, "meltdown", message)
                continue
            for item in decision.replace:
                rev = self.state.revision(service, item.revision)
                rec = self.new_instance(service, rev)
                self.state.update_instance(item.instance, replaced_by=rec.id)
                noticed = self._noticed.pop(item.instance, now)
                self.recovering[rec.id] = (item.instance, noticed)
                self.emit(
                    "reconcile.replace",
                    f"replacing {item.instance} ({item.reason}) with {rec.id}",
                    service,
                    item.instance,
                    rev.number,
                    {"replacement": rec.id, "reason": item.reason},
                )
                self._spawn(self.start_instance(service, rev, rec))
            for _ in range(decision.create):
                rec = self.new_instance(service, active)
                self.emit(
                    "reconcile.create",
                    f"starting {rec.id} to reach {view.desired} replicas",
                    service,
                    rec.id,
                    active.number,
                )
                self._spawn(self.start_instance(service, active, rec))

    # reads

    def status(self) -> dict[str, Any]:
        services: dict[str, Any] = {}
        now = time.time()
        for name in self.state.services():
            active = self.state.active_revision(name)
            instances = []
            for rec in self.state.instances(name, live_only=True):
                handle = rec.handle or {}
                tracker = self.trackers.get(rec.id)
                rev = self.state.revision(name, rec.revision)
                instances.append(
                    {
                        "id": rec.id,
                        "revision": rec.revision,
                        "state": rec.state,
                        "health": tracker.state.value if tracker else rec.state,
                        "age": now - rec.created,
                        "digest": rev.image_digest,
                        "port": rec.port,
                        "pid": (handle.get("data") or {}).get("sandbox_pid") or handle.get("pid"),
                    }
                )
            if active is None and not instances and name not in self.rollouts:
                continue
            services[name] = {
                "active_revision": active.number if active else None,
                "desired_replicas": int(active.config.get("replicas", 1)) if active else 0,
                "listen": active.config.get("listen") if active else None,
                "instances": instances,
                "rollout": self.rollout_info.get(name),
                "alarms": [a.message for a in self.state.alarms(name)],
            }
        return {"services": services, "proxy": self.router.info()}

    def history(self, service: str) -> dict[str, Any]:
        revisions = self.state.revisions(service)
        if not revisions:
            raise NotFound(f"no service {service!r}")
        return {
            "service": service,
            "revisions": [r.to_json() for r in reversed(revisions)],
        }


LOG_RETENTION_INTERVAL = 60.0
STARTING_PROBE_DELAY = 0.05


def log_retention() -> tuple[int, float]:
    """Per service: ``KILN_LOG_MAX_BYTES`` (default 256MiB), ``KILN_LOG_MAX_AGE`` (7d)."""
    from kiln.spec.models import parse_duration, parse_size

    try:
        max_bytes = parse_size(os.environ.get("KILN_LOG_MAX_BYTES", "256MiB"))
        max_age = parse_duration(os.environ.get("KILN_LOG_MAX_AGE", "168h"))
    except ValueError as e:
        raise KilnError(f"log retention: {e}") from e
    return max_bytes, max_age


def _handle(rec: InstanceRecord) -> InstanceHandle | None:
    if not rec.handle:
        return None
    try:
        return InstanceHandle.from_json(rec.handle)
    except KilnError:
        return None


def _address(rec: InstanceRecord) -> str:
    """Where the instance listens: its own address when the runtime gave it one."""
    handle = rec.handle or {}
    host = (handle.get("data") or {}).get("host")
    return str(host) if host else "127.0.0.1"


def _pid_of(handle: InstanceHandle) -> int:
    return int(handle.data.get("sandbox_pid") or handle.pid)


def runtime_can_exec(runtime: Runtime) -> bool:
    return bool(getattr(runtime.capabilities, "exec", False))


async def _readable(fd: int | None, timeout: float) -> bool:
    """Wait until ``fd`` is readable (True) or ``timeout`` passes (False), on the loop.

    The fd is duplicated so that its owner may close it meanwhile."""
    if fd is None:
        await asyncio.sleep(timeout)
        return False
    own = os.dup(fd)
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(own, wake)
    try:
        await asyncio.wait_for(ready, timeout)
        return True
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(own)
        os.close(own)


def _describe(info: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in info.items() if v is not None) or "no process"
