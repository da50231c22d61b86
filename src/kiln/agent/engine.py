"""The agent's work, composed: one object a daemon, a test or a benchmark drives.

Each concern lives in the module named after it:

* :mod:`~kiln.agent.lifecycle`: every instance's states and their owner;
* :mod:`~kiln.agent.health`: probe loops and their verdicts;
* :mod:`~kiln.agent.routing`: the routes pushed to the :class:`kiln.traffic.Router`;
* :mod:`~kiln.agent.rollouts` and :mod:`~kiln.agent.deployments`: applies and rollbacks;
* :mod:`~kiln.agent.reconciler`: self-healing;
* :mod:`~kiln.agent.adoption`: what a new agent takes back;
* :mod:`~kiln.agent.views`: status and history.

The decisions are pure and live in :mod:`kiln.deploy`. Nothing here blocks the
event loop: every state.db call runs on one thread of its own (in order),
runtime and router calls in a pool, and each instance's exit is watched by an
fd on the loop or a waiting thread, never by polling.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from kiln.agent import views
from kiln.agent.adoption import adopt
from kiln.agent.control import ServiceControl
from kiln.agent.deployments import Deployments
from kiln.agent.errors import Conflict, NotFound
from kiln.agent.executor import ImageConfigs
from kiln.agent.health import HealthChecks
from kiln.agent.lifecycle import Lifecycle, handle_of
from kiln.agent.reconciler import Reconciler
from kiln.agent.rollouts import Rollout, Rollouts
from kiln.agent.routing import Routing, describe
from kiln.agent.waiting import wait_set
from kiln.deploy.plan import Action, Plan, plan_answer
from kiln.deploy.state import InstanceRecord, Revision, StateStore
from kiln.errors import KilnError
from kiln.runtime import InstanceHandle, InstanceState, Releaser, Runtime
from kiln.traffic import Router

__all__ = ["Engine", "log_retention", "settle_down"]

log = logging.getLogger("kiln.agent")
T = TypeVar("T")

EVENTS_MAX_AGE = 30 * 86400.0
EVENTS_MAX_COUNT = 200_000
EVENTS_KEPT = frozenset({"revision.created", "alarm.cleared"})
"""Events kept past the count limit: a revision's origin, a breaker's reset."""
LOG_RETENTION_INTERVAL = 60.0
RESTART_DELAY = 1.0
"""Before a crashed background loop runs again."""


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
        self.images = ImageConfigs(home)
        self._on_event = on_event
        self._db_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kiln-state")
        self._watch_pool = ThreadPoolExecutor(max_workers=4096, thread_name_prefix="kiln-watch")
        self.configs: dict[tuple[str, int], dict[str, Any]] = {}
        """(service, revision) → its config, which never changes once recorded."""
        self.tasks: set[asyncio.Task[Any]] = set()
        self.stopping = False
        self._changed: dict[str, asyncio.Event] = {}
        self._loops: list[asyncio.Task[None]] = []
        self._apply_lock = asyncio.Lock()
        self.lifecycle = Lifecycle(self)
        self.health = HealthChecks(self)
        self.routing = Routing(self)
        self.rollouts = Rollouts(self)
        self.deployments = Deployments(self)
        self.reconciler = Reconciler(self)
        self.control = ServiceControl(self)
        from kiln.agent.bluegreen import BlueGreen

        self.bluegreen = BlueGreen(self)
        from kiln.agent.canary import Canaries
        from kiln.agent.edge_counters import EdgeCounters

        self.canary = Canaries(self)
        self.edge_counters = EdgeCounters()
        """What every node's edge counted of a service under analysis (swarm)."""
        from kiln.agent.drift import DriftChecker

        self.drift = DriftChecker(self)
        from kiln.agent.aging import Aging
        from kiln.agent.quarantine import Quarantine

        self.aging = Aging(self)
        self.quarantine = Quarantine(self)

    # plumbing shared by the parts

    async def db(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """A state.db call, on the state thread: in order, and never on the event loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._db_pool, lambda: fn(*args, **kwargs))

    async def io(self, fn: Callable[..., T], *args: Any) -> T:
        """A runtime, router or image call, in the agent's pool."""
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    async def wait_instance(self, handle: InstanceHandle, timeout: float) -> InstanceState:
        """``runtime.wait`` in a thread of its own, for runtimes without an exit fd."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._watch_pool, self.runtime.wait, handle, timeout)

    async def readable(self, fd: int | None, timeout: float | None = None) -> bool:
        """Wait on the loop until ``fd`` is readable (True) or ``timeout`` passes (False).

        The fd is duplicated so that its owner may close it meanwhile."""
        if fd is None:
            await asyncio.sleep(timeout if timeout is not None else 3600.0)
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

    def emit(
        self,
        kind: str,
        message: str,
        service: str | None = None,
        instance: str | None = None,
        revision: int | None = None,
        data: dict[str, Any] | None = None,
    ) -> None:
        """Queued on the state thread, after every write already asked for."""
        log.info(
            "%s %s service=%s instance=%s revision=%s", kind, message, service, instance, revision
        )
        future = self._db_pool.submit(
            self.state.emit, kind, message, service, instance, revision, data
        )
        future.add_done_callback(self._emitted)

    def _emitted(self, future: Any) -> None:
        if future.exception() is not None:
            log.error("recording an event failed", exc_info=future.exception())
            return
        with contextlib.suppress(RuntimeError):
            self._on_event()

    def spawn(
        self,
        coro: Awaitable[T],
        name: str,
        *,
        on_error: Callable[[BaseException], None] | None = None,
        restart: bool = False,
    ) -> asyncio.Task[T]:
        """Every background task is supervised: an exception is logged and recorded as an
        event (``on_error`` says more), never silently gone."""
        task: asyncio.Task[T] = asyncio.ensure_future(coro)
        self.tasks.add(task)

        def done(t: asyncio.Task[T]) -> None:
            self.tasks.discard(t)
            if t.cancelled() or t.exception() is None:
                return
            err = t.exception()
            assert err is not None
            log.error("background task %s failed", name, exc_info=err)
            if on_error is not None:
                on_error(err)
            else:
                self.emit("agent.task_failed", f"{name} failed: {type(err).__name__}: {err}")

        task.add_done_callback(done)
        return task

    def supervise(self, make: Callable[[], Awaitable[None]], name: str) -> asyncio.Task[None]:
        """A loop that must always run: restarted after an exception, with an event."""

        async def forever() -> None:
            while True:
                try:
                    await make()
                    return
                except asyncio.CancelledError:
                    raise
                except Exception as err:
                    log.error("%s failed; restarting it", name, exc_info=err)
                    self.emit(
                        "agent.task_failed",
                        f"{name} failed ({type(err).__name__}: {err}); restarted",
                    )
                    await asyncio.sleep(RESTART_DELAY)

        return asyncio.ensure_future(forever())

    def changed(self, service: str) -> None:
        """An instance of ``service`` changed state: wake its rollout and the reconciler."""
        event = self._changed.get(service)
        if event is not None:
            event.set()
        self.reconciler.poke()
        self.drift.poke(service)
        self.aging.poke()
        self.quarantine.poke()

    async def wait_changed(self, service: str, timeout: float) -> None:
        event = self._changed.setdefault(service, asyncio.Event())
        event.clear()
        await wait_set(event, timeout)

    async def revision(self, service: str, number: int) -> Revision:
        rev = await self.db(self.state.revision, service, number)
        self.configs[(service, number)] = rev.config
        return rev

    async def config_of(self, rec: InstanceRecord) -> dict[str, Any]:
        key = (rec.service, rec.revision)
        if key not in self.configs:
            try:
                await self.revision(rec.service, rec.revision)
            except KilnError:
                return {}
        return self.configs[key]

    # start and stop

    async def start(self) -> None:
        how = await self.io(self.router.start)
        info = self.router.info()
        self.emit(f"proxy.{how}", f"router {how} ({describe(info)})", data=info)
        # What the router serves now is read back from it, so an agent restart changes
        # only what differs from the state instead of resetting every route.
        self.routing.pushed = await self.io(self.router.routes)
        self.reconciler.breaker_reset = await self.db(self.state.breaker_resets)
        await adopt(self)
        await self.routing.push()
        self._loops = [
            self.supervise(self.reconciler.loop, "the reconciler"),
            self.supervise(self.routing.watch_router, "the router watch"),
            self.supervise(self._retention_loop, "log retention"),
            self.supervise(self.drift.loop, "drift detection"),
            self.supervise(self.aging.loop, "max_age"),
            self.supervise(self.quarantine.loop, "quarantine"),
        ]

    async def stop(self) -> None:
        """Stop the agent's own work only: instances and the router keep running."""
        self.stopping = True
        tasks = [*self._loops, *self.tasks]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        self.control.close()
        await self.io(self.router.close)
        await self.io(self.runtime.close)
        await self.db(lambda: None)  # the events queued so far are written
        self._watch_pool.shutdown(wait=False, cancel_futures=True)

    async def down(self) -> dict[str, Any]:
        """Drain and stop every instance, then the router; the agent exits afterwards."""
        self.stopping = True
        for task in self._loops:
            task.cancel()
        for service in list(self.rollouts.running):
            await self.rollouts.cancel(service)
        for deployment in list(self.deployments.open):
            await self.deployments.cancel(deployment, "kiln down")
        # A start already in the runtime cannot be called back: each retire waits for
        # its start to land, then stops what it made.
        live = await self.db(self.state.instances, None, True)
        await asyncio.gather(
            *(self.lifecycle.retire(i.id, "kiln down") for i in live), return_exceptions=True
        )
        for rollout in await self.db(self.state.rollouts):
            await self.db(self.state.end_rollout, rollout.service, rollout.target)
        await self.db(settle_down, self.state)
        for handle in await self.io(self.runtime.list):
            with contextlib.suppress(KilnError):
                await self.io(self.runtime.destroy, handle)
        await self.io(self.router.stop)
        if isinstance(self.runtime, Releaser):
            with contextlib.suppress(KilnError):
                await self.io(self.runtime.shutdown)
        self.emit("agent.down", f"down: stopped {len(live)} instance(s) and the proxy")
        await self.db(lambda: None)  # every event queued so far is written
        return {"stopped": sorted(i.id for i in live), "proxy": "stopped"}

    async def down_homeless(self) -> dict[str, Any]:
        """``down`` for an agent whose home was deleted: no route can be written and no
        instance directory read, so it goes straight to the processes: the router
        (found by its command line) and each instance (by its handle)."""
        self.stopping = True
        for task in [*self._loops, *self.tasks]:
            task.cancel()
        try:
            await self.io(self.router.stop)
        except Exception as err:
            log.error("stopping the router: %s", err)
        stopped = []
        for rec in await self.db(self.state.instances, None, True):
            handle = handle_of(rec)
            if handle is None:
                continue
            try:
                await self.io(self.runtime.stop, handle, 1.0)
                stopped.append(rec.id)
            except Exception as err:
                log.error("stopping %s: %s", rec.id, err)
            with contextlib.suppress(Exception):
                await self.io(self.runtime.destroy, handle)
        if isinstance(self.runtime, Releaser):
            with contextlib.suppress(Exception):
                await self.io(self.runtime.shutdown)
        return {"stopped": sorted(stopped), "proxy": "stopped"}

    # plan, apply, rollback

    async def plan(self, body: dict[str, Any]) -> dict[str, Any]:
        return plan_answer(body, await self.db(self.state.snapshot))

    async def apply(self, raw: dict[str, Any]) -> dict[str, Any]:
        """Carry out exactly the plan: the instances it names are the ones replaced or
        destroyed, and the strategy only orders that work."""
        plan = Plan.from_json(raw)
        source = raw.get("source") or {}
        if self._apply_lock.locked():
            raise Conflict("another kiln apply is being started; try again")
        async with self._apply_lock:
            holder = await self.db(_enter_lock, self.state)
            try:
                return await self._apply(plan, source)
            finally:
                await self.db(holder.__exit__, None, None, None)

    async def _apply(self, plan: Plan, source: dict[str, Any]) -> dict[str, Any]:
        # A running rollout is named first: it is why the state keeps changing under a plan.
        busy = [
            s.service for s in plan.services if not s.empty and s.service in self.rollouts.running
        ]
        if busy:
            rollout = self.rollouts.running[busy[0]]
            age = time.time() - rollout.started
            raise Conflict(
                f"service {busy[0]} has a rollout in progress (deployment "
                f"{rollout.deployment or '?'}, {rollout.kind} to r{rollout.target.number}, "
                f"started {age:.0f}s ago); wait for it or follow it with kiln events --follow"
            )
        if plan.base != await self.db(self.state.state_hash):
            raise Conflict("the state changed since this plan was made; run kiln plan again")
        await self.routing.check_listeners(plan)
        await self._check_projects(plan, source)
        await self._check_policy(plan, source)
        # Every service is in the deployment from the start: one that ends quickly (a
        # removal, a settings-only revision) cannot finish it while the others are added.
        record = await self.deployments.create(
            plan.summary, {sp.service: None for sp in plan.services if not sp.empty}
        )
        deployment = str(record["id"])
        for sp in plan.services:
            if sp.empty:
                continue
            named = frozenset(
                c.instance
                for c in sp.changes
                if c.instance is not None and c.action in (Action.REPLACE, Action.DESTROY)
            )
            if sp.removed:
                await self._remove(sp.service, deployment)
                continue
            want = plan.desired[sp.service]
            if await self.db(self.state.clear_alarm, sp.service):
                reset = time.time()
                self.reconciler.breaker_reset[sp.service] = reset
                await self.db(self.state.reset_breaker, sp.service, reset)
                self.emit(
                    "alarm.cleared",
                    f"{sp.service}: alarm cleared by kiln apply; deaths before now no longer count",
                    sp.service,
                    data={"breaker_reset_at": reset},
                )
            image_cfg = await self.io(self.images.image_config, want.image_digest)
            rev = await self.db(
                self.state.next_revision,
                sp.service,
                image_digest=want.image_digest,
                config={**want.revision_config(image_cfg), "project": source.get("project")},
                config_hash=want.config_hash,
                spec_text=str(source.get("spec_text") or ""),
                spec_path=str(source.get("spec_path") or ""),
                git_commit=source.get("git_commit"),
                environment=source.get("environment"),
                status="pending",
            )
            self.configs[(sp.service, rev.number)] = rev.config
            await self.deployments.add_service(deployment, sp.service, rev.number)
            self.emit(
                "revision.created",
                f"{sp.service} r{rev.number} recorded",
                sp.service,
                revision=rev.number,
                data={"deployment": deployment},
            )
            await self.rollouts.begin(
                Rollout(
                    sp.service,
                    rev,
                    deployment,
                    "deploy",
                    time.time(),
                    named=named,
                    destroyed=frozenset(
                        c.instance
                        for c in sp.changes
                        if c.instance is not None and c.action is Action.DESTROY
                    ),
                )
            )
        await self.deployments.finish_if_done(deployment)
        return {"deployment": deployment, "services": record["services"]}

    async def _remove(self, service: str, deployment: str) -> None:
        """A removal is a rollout of its own kind: saved, resumed after a restart, and its
        service left alone by the reconciler. Its revision stops being active first, so
        nothing replaces the instances it retires."""
        revisions = await self.db(self.state.revisions, service)
        active = await self.db(self.state.active_revision, service)
        target = active or revisions[-1]
        if active is not None:
            await self.db(
                self.state.set_revision_status,
                service,
                active.number,
                "superseded",
                reason="service removed",
            )
        await self.rollouts.begin(Rollout(service, target, deployment, "remove", time.time()))

    async def _check_policy(self, plan: Plan, source: dict[str, Any]) -> None:
        """Issue 11: the policy gate again, here, on evidence re-read from this agent's own
        image store by digest; what the client's gate said is not trusted. Where nodes
        pull from a registry (swarm), each image goes there with its referrers first and
        the gate reads the evidence back from there: what runs is what was checked."""
        from kiln.policy.gate import gate_request
        from kiln.policy.registry_evidence import ImagePublisher

        request = {"desired": {n: d.to_json() for n, d in plan.desired.items()}, "source": source}
        publisher = self.runtime if isinstance(self.runtime, ImagePublisher) else None
        await self.io(lambda: gate_request(request, self.home, publisher=publisher))

    async def _check_projects(self, plan: Plan, source: dict[str, Any]) -> None:
        """A plan (a saved file, a request) touches only its own project's services, as
        the planner does: another project's service is neither removed nor taken over."""
        project = source.get("project")
        if not project:
            return
        for sp in plan.services:
            if sp.empty:
                continue
            active = await self.db(self.state.active_revision, sp.service)
            owner = active.config.get("project") if active is not None else None
            if owner and owner != project:
                raise Conflict(
                    f"service {sp.service} belongs to project {owner!r} in this KILN_HOME, "
                    f"not to {project!r}; nothing was changed"
                )

    async def scale(self, service: str, replicas: int) -> dict[str, Any]:
        """The active revision with another replica count: planned and applied as any
        change is (a new revision in history, the plan's instances created or destroyed),
        touching no other service."""
        from dataclasses import replace

        from kiln.deploy.plan import DesiredService, make_plan
        from kiln.spec.models import MAX_COUNT

        if isinstance(replicas, bool) or not 0 <= replicas <= MAX_COUNT:
            raise KilnError(f"scale {service}: replicas must be 0-{MAX_COUNT}, not {replicas}")
        active = await self.db(self.state.active_revision, service)
        if active is None:
            raise NotFound(f"no service {service!r} is running; kiln up first")
        config = dict(active.config)
        pinned = {str(k): str(v) for k, v in (config.pop("secrets_versions", None) or {}).items()}
        config.pop("image_config", None)
        project = config.pop("project", None)
        config["replicas"] = replicas
        want = DesiredService(service, config, active.image_digest, active.config_hash, pinned)
        plan = make_plan({service: want}, await self.db(self.state.snapshot))
        plan = replace(plan, services=tuple(s for s in plan.services if s.service == service))
        if plan.empty:
            return {"deployment": None, "services": {}}
        source = {
            "project": project,
            "spec_text": active.spec_text,
            "spec_path": active.spec_path,
            "git_commit": active.git_commit,
            "environment": active.environment,
        }
        return await self.apply({**plan.to_json(), "source": source})

    async def rollback(self, service: str, revision: int | None) -> dict[str, Any]:
        """Under the apply lock: a rollback and an apply never race for one service."""
        if self._apply_lock.locked():
            raise Conflict("a kiln apply is being started; try again")
        async with self._apply_lock:
            return await self._rollback(service, revision)

    async def _rollback(self, service: str, revision: int | None) -> dict[str, Any]:
        if service not in await self.db(self.state.services):
            raise NotFound(f"no service {service!r}")
        instant = await self.bluegreen.rollback(service, revision)
        if instant is not None:
            return instant  # blue still runs: switched back, no new instance
        current = await self.db(self.state.active_revision, service)
        if revision is None:
            target = await self.db(self.state.previous_good_revision, service)
            if target is None:
                raise KilnError(f"{service}: no previous revision to roll back to")
        else:
            target = await self.revision(service, revision)
        if (
            current is not None
            and target.number == current.number
            and service not in self.rollouts.running
        ):
            raise KilnError(f"{service}: r{target.number} is already the active revision")
        await self.rollouts.cancel(service)
        record = await self.deployments.create(
            f"rollback {service} to r{target.number}", {service: target.number}
        )
        self.emit(
            "rollback.started",
            f"{service}: rolling back to r{target.number}",
            service,
            revision=target.number,
            data={"deployment": record["id"]},
        )
        await self.rollouts.begin(
            Rollout(service, target, str(record["id"]), "rollback", time.time())
        )
        return {
            "deployment": record["id"],
            "service": service,
            "revision": target.number,
            "started": record["started"],
        }

    async def restart(self, service: str) -> dict[str, Any]:
        return await self._locked(self.control.restart, service)

    async def stop_service(self, service: str) -> dict[str, Any]:
        return await self._locked(self.control.stop, service)

    async def start_service(self, service: str) -> dict[str, Any]:
        return await self._locked(self.control.start, service)

    async def exec(self, instance: str, argv: list[str], timeout: float) -> dict[str, Any]:
        return await self.control.exec(instance, argv, timeout)

    async def burn(self, instance: str, keep_evidence: bool) -> dict[str, Any]:
        return await self.quarantine.burn(instance, keep_evidence)

    async def promote(self, service: str) -> dict[str, Any]:
        """``kiln promote``: the running strategy's next step now (a canary's pause)."""
        running = self.rollouts.running.get(service)
        if running is None or self.bluegreen.owns(running):
            return await self.bluegreen.promote(service)
        return await self.canary.promote(service)

    async def abort(self, service: str) -> dict[str, Any]:
        """``kiln abort``: a canary ends now; its stable set keeps serving."""
        return await self.canary.abort(service)

    async def _locked(self, change: Callable[[str], Awaitable[T]], service: str) -> T:
        """Changes to a service never race an apply or a rollback of it."""
        if self._apply_lock.locked():
            raise Conflict("a kiln apply is being started; try again")
        async with self._apply_lock:
            return await change(service)

    # reads

    async def status(self) -> dict[str, Any]:
        return await views.status(self)

    async def history(self, service: str) -> dict[str, Any]:
        return await views.history(self, service)

    async def deployment(self, deployment: str) -> dict[str, Any]:
        return await self.deployments.get(deployment)

    # retention

    async def _retention_loop(self) -> None:
        """Logs and events outlive instances, not forever: oldest first."""
        from kiln.observe.logs import LogStore

        store = LogStore(self.home / "logs")
        max_bytes, max_age = log_retention()
        while True:
            live = {r.id for r in await self.db(self.state.instances, None, True)}
            removed = await self.io(store.prune, max_bytes, max_age, live)
            if removed:
                self.emit("logs.pruned", f"removed the logs of {removed} gone instances")
            await self.db(self.state.prune_events, EVENTS_MAX_AGE, EVENTS_MAX_COUNT, EVENTS_KEPT)
            await asyncio.sleep(LOG_RETENTION_INTERVAL)


def settle_down(state: StateStore) -> None:
    """After ``kiln down`` no service is meant to run: its active revision is superseded
    (kept in history, the target of a later rollback), so the next agent does not bring
    back what ``down`` stopped and the next ``kiln up`` plans to create it."""
    for service in state.services():
        active = state.active_revision(service)
        if active is not None:
            state.set_revision_status(service, active.number, "superseded", reason="kiln down")


def _enter_lock(state: StateStore) -> Any:
    """The apply lock, shared with CLI processes that write the state (``kiln bake`` …)."""
    holder = state.lock("apply", "kiln apply")
    holder.__enter__()
    return holder


def log_retention() -> tuple[int, float]:
    """Per service: ``KILN_LOG_MAX_BYTES`` (default 256MiB), ``KILN_LOG_MAX_AGE`` (7d)."""
    from kiln.spec.models import parse_duration, parse_size

    try:
        max_bytes = parse_size(os.environ.get("KILN_LOG_MAX_BYTES", "256MiB"))
        max_age = parse_duration(os.environ.get("KILN_LOG_MAX_AGE", "168h"))
    except ValueError as e:
        raise KilnError(f"log retention: {e}") from e
    return max_bytes, max_age
