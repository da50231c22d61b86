"""Traffic, programmed only through the :class:`kiln.traffic.Router` boundary.

What each service's route should be is derived from the instances' states
(ready takes requests, draining finishes its own, starting and unhealthy are
known but get nothing) and pushed only when it differs from what the router
serves. The router's health is watched here too: its exit wakes the watcher at
once, and a router that stops answering on a listener is restarted.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from kiln.agent.bluegreen import PHASE_BASE, shape
from kiln.agent.lifecycle import handle_of
from kiln.agent.rollouts import REMOVALS
from kiln.agent.waiting import wait_set
from kiln.deploy.plan import Plan
from kiln.errors import KilnError
from kiln.runtime import HostResources
from kiln.traffic import Backend, BackendState, Route

if TYPE_CHECKING:
    from kiln.agent.engine import Engine

__all__ = ["ROUTER_CHECK_FAILURES", "ROUTER_CHECK_INTERVAL", "Routing", "describe"]

log = logging.getLogger("kiln.agent")

ROUTER_CHECK_INTERVAL = 2.0
"""How often the router is asked to answer on every listener; its death is seen at once."""
ROUTER_CHECK_FAILURES = 3

_BACKEND_STATE: dict[str, BackendState] = {"ready": "ready", "draining": "draining"}


class Routing:
    """What the router serves (``pushed``), under a version that data planes elsewhere
    watch: ``epoch`` is new per agent process, ``version`` grows by one per change."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._pushed: dict[str, Route] = {}
        self.epoch = secrets.token_hex(8)
        self.version = 0
        self._changed = asyncio.Event()
        """Set (and replaced) on every change: a watcher waits on the one it saw."""
        self._published: set[int] | None = None
        self._lock = asyncio.Lock()
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._pushers: dict[str, asyncio.Task[None]] = {}
        self.weighers: dict[str, Callable[[str], int]] = {}
        """Service → each backend's weight, while a canary splits its traffic."""
        self._reporting: set[str] = set()

    @property
    def pushed(self) -> dict[str, Route]:
        """The routes served now (read-only for callers: changes go through the setter,
        ``_serve`` and ``_unserve``, so each one moves the version)."""
        return self._pushed

    @pushed.setter
    def pushed(self, routes: dict[str, Route]) -> None:
        if routes != self._pushed:
            self._pushed = dict(routes)
            self._bump()

    def _serve(self, route: Route) -> None:
        if self._pushed.get(route.name) != route:
            self._pushed[route.name] = route
            self._bump()

    def _unserve(self, name: str) -> None:
        if self._pushed.pop(name, None) is not None:
            self._bump()

    def _bump(self) -> None:
        self.version += 1
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def report_counters(self, service: str, on: bool) -> None:
        """Ask the edges for ``service``'s counters (its canary is judged) or stop asking;
        a new version, so every edge learns it at once."""
        if on != (service in self._reporting):
            (self._reporting.add if on else self._reporting.discard)(service)
            self._bump()

    def snapshot(self) -> dict[str, Any]:
        """The watch answer: epoch, version, every served route by name, and the services
        whose counters the edges are to post (``report_counters``)."""
        return {
            "epoch": self.epoch,
            "version": self.version,
            "routes": [self._pushed[name].to_json() for name in sorted(self._pushed)],
            "report_counters": sorted(self._reporting),
        }

    async def wait_for_change(self, epoch: str, version: int, timeout: float) -> None:
        """Return when the served routes are no longer ``epoch:version`` (at once if they
        are not now) or after ``timeout`` seconds; woken by ``_bump``, never by polling."""
        if epoch != self.epoch or version != self.version or timeout <= 0:
            return
        await wait_set(self._changed, timeout)

    async def route_for(self, service: str) -> Route | None:
        e = self.engine
        rollout = e.rollouts.running.get(service)
        if rollout is not None and rollout.kind in REMOVALS:
            return None
        if rollout is not None:
            cfg: dict[str, Any] | None = rollout.target.config
        else:
            active = await e.db(e.state.active_revision, service)
            cfg = active.config if active is not None else None
        if not cfg or not cfg.get("listen"):
            return None
        backends = []
        for i in await e.db(e.state.instances, service, True):
            handle = i.handle or {}
            if i.state in ("pending", "stopping", "stopped") or not handle.get("host"):
                continue
            parsed = handle_of(i)
            if parsed is None:
                continue
            state = _BACKEND_STATE.get(i.state, "maintenance")
            weigh = self.weighers.get(service)
            weight = weigh(i.id) if weigh is not None else 100
            backend = Backend(id=i.id, address=parsed.address, weight=weight, state=state)
            if rollout is not None and rollout.step > PHASE_BASE:
                backend = shape(rollout, i, backend)  # blue/green: one set in rotation
            backends.append(backend)
        return Route(
            name=service,
            listen=int(cfg["listen"]),
            protocol=str(cfg.get("protocol", "http")),
            drain_timeout=float(cfg.get("drain_timeout", 10.0)),
            backends=tuple(backends),
        )

    async def push(self, service: str | None = None, force: bool = False) -> None:
        """Act only on a difference: a route identical to the last one pushed is not re-sent.

        Pushes of one service are coalesced: a caller waits for a push that read the state
        after it asked, and a burst of changes (a thousand instances of a rollout) costs
        one route build per round, not one per change."""
        if service is None or force:
            async with self._lock:
                await self._push_all(service, force)
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(service, []).append(waiter)
        pusher = self._pushers.get(service)
        if pusher is None or pusher.done():
            self._pushers[service] = asyncio.ensure_future(self._drain_waiters(service))
        await asyncio.shield(waiter)

    async def _drain_waiters(self, service: str) -> None:
        while self._waiters.get(service):
            batch = self._waiters.pop(service)
            try:
                async with self._lock:
                    await self._push_one(service, False)
                    await self._publish_ports()
            except BaseException as err:
                for waiter in batch:
                    if not waiter.done():
                        waiter.set_exception(err)
                if isinstance(err, asyncio.CancelledError):
                    raise
                continue
            for waiter in batch:
                if not waiter.done():
                    waiter.set_result(None)

    async def _push_all(self, service: str | None, force: bool) -> None:
        e = self.engine
        names = [service] if service else sorted({*(await e.db(e.state.services)), *self.pushed})
        for name in names:
            await self._push_one(name, force)
        await self._publish_ports()

    async def _push_one(self, name: str, force: bool) -> None:
        e = self.engine
        try:
            route = await self.route_for(name)
        except KilnError as err:
            log.warning("route for %s: %s", name, err)
            return
        if route is None:
            if name in self.pushed:
                try:
                    await e.io(e.router.remove, name)
                    self._unserve(name)
                except KilnError as err:
                    log.warning("removing the route of %s failed: %s", name, err)
            return
        if not force and self.pushed.get(name) == route:
            return
        try:
            await e.io(e.router.apply, route)
        except KilnError as err:
            self._unserve(name)
            log.warning("route push for %s failed: %s", name, err)
            return
        self._serve(route)

    async def _publish_ports(self) -> None:
        """Instances may reach the host only on the proxy's listen ports."""
        runtime = self.engine.runtime
        if not isinstance(runtime, HostResources):
            return
        ports = {r.listen for r in self.pushed.values()}
        if ports != self._published:
            try:
                await self.engine.io(runtime.publish_ports, ports)
                self._published = ports
            except KilnError as err:
                log.warning("publishing listen ports to the runtime failed: %s", err)

    async def watch_router(self) -> None:
        """The router's death wakes this at once (its exit fd); every interval it must also
        answer on each listener, and one that stops answering is restarted."""
        e = self.engine
        failures = 0
        while True:
            exited = await e.readable(e.router.exit_fd(), ROUTER_CHECK_INTERVAL)
            problems = await e.io(e.router.check)
            if not problems:
                failures = 0
                continue
            failures += 1
            if not exited and failures < ROUTER_CHECK_FAILURES:
                log.warning("router check %d/%d: %s", failures, ROUTER_CHECK_FAILURES, problems)
                continue
            failures = 0
            reason = "; ".join(problems)
            old = e.router.info()
            try:
                await e.io(e.router.restart, reason)
            except KilnError as err:
                log.error("router restart failed: %s", err)
                continue
            new = e.router.info()
            e.emit(
                "proxy.restarted",
                f"router restarted ({reason}; was {describe(old)}, now {describe(new)})",
                data={"reason": reason, "old": old, "new": new},
            )
            await self.push(force=True)

    async def check_listeners(self, plan: Plan) -> None:
        """A listen port another program holds fails the apply before anything changes."""
        for sp in plan.services:
            want = plan.desired.get(sp.service)
            if sp.removed or want is None or not want.service_config.get("listen"):
                continue
            await self.check_listen(sp.service, int(want.service_config["listen"]))

    async def check_listen(self, service: str, listen: int) -> None:
        """``listen`` is free for ``service``: not another service's, not another program's."""
        current = self.pushed.get(service)
        if current is not None and current.listen == listen:
            return
        holder = next(
            (n for n, r in self.pushed.items() if n != service and r.listen == listen), None
        )
        if holder is not None:
            raise KilnError(
                f"service {service}: port {listen} is served by service {holder} now; "
                "move one service per apply; nothing was changed"
            )
        try:
            await self.engine.io(self.engine.router.check_listen, listen)
        except KilnError as err:
            raise KilnError(
                f"service {service}: cannot listen on port {listen} ({err}); nothing was changed"
            ) from err


def describe(info: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in info.items() if v is not None) or "no process"
