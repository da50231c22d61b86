"""Canary rollouts: a new revision's set beside the stable one, traffic moved step by step,
each step judged from the router's own counters.

The whole canary set (``replicas`` instances of the target revision) starts at weight 0
beside the stable instances. Each step of ``update.steps`` then gives the canary set
``weight`` % of new requests (per-backend weights in the route) for ``pause``; during
the pause the canary's backends are compared with the stable ones over the step's
window (the router's counters minus a baseline taken when the step began): error rate
and p95 latency, absolutely and relative to the stable set, once the canary answered
``analysis.min_requests``. A failing analysis aborts at once (weight 0, canary retired,
revision failed, ``canary.aborted`` with the numbers); the last passing step promotes
(canary 100 %, the stable set retired as at a rolling update's end).

Durable: the step is the rollout row's ``step`` (0: the set is starting, ``k``: step
``k`` of the spec, ``len(steps) + 1``: promoting) and the pause's start and baseline are
in the deployment record, so an agent killed during a pause continues that pause.

On a runtime of several nodes (an :class:`~kiln.runtime.EdgeHost`, Swarm) users come in
through every node's edge proxy: while the canary runs the routes ask the edges for
their counters (:mod:`kiln.agent.edge_counters`), and the analysis reads the router's
counters plus the edges' totals (:func:`counters_of`). Those totals live in the agent's
memory, so a canary resumed after an agent restart takes a new baseline for its pause.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kiln.agent.edge_counters import with_edges
from kiln.agent.errors import Conflict, NotFound
from kiln.runtime import EdgeHost
from kiln.spec.models import CanaryAnalysis, Update
from kiln.traffic.router import BackendCounters, Latency, ServiceCounters

if TYPE_CHECKING:
    from kiln.agent.engine import Engine
    from kiln.agent.rollouts import Rollout, Rollouts

__all__ = [
    "CANARY_TICK",
    "ERROR_RATE_FLOOR",
    "P95_FLOOR_MS",
    "Canaries",
    "Window",
    "counters_of",
    "judge",
    "run_canary",
    "split_weights",
]

CANARY_TICK = 0.25
"""How often a step reads the router's counters: a failing canary is judged within it."""
ERROR_RATE_FLOOR = 0.01
"""The stable error rate a ratio is taken against at least: a stable set with no error
would make any single canary error an infinite ratio."""
P95_FLOOR_MS = 10.0
"""Likewise for p95 latency: a 1 ms stable p95 must not make 3 ms a failure."""
MAX_BACKEND_WEIGHT = 256


@dataclass(frozen=True)
class Window:
    """What a set of backends answered since a step began."""

    requests: int = 0
    errors: int = 0
    latency: Latency = field(default_factory=Latency)

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @property
    def p95_ms(self) -> float | None:
        p95 = self.latency.quantile(0.95)
        return None if p95 is None else p95 * 1000.0

    def to_json(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "errors": self.errors,
            "error_rate": round(self.error_rate, 4),
            "p95_ms": self.p95_ms,
        }


def judge(analysis: CanaryAnalysis, canary: Window, stable: Window) -> str | None:
    """Why the canary fails this window, or None (passing, or not enough requests yet)."""
    if canary.requests < analysis.min_requests:
        return None
    a = analysis
    rate = canary.error_rate
    if rate > a.max_error_rate:
        return f"error rate {rate:.1%} > max_error_rate {a.max_error_rate:.1%}"
    judged_stable = stable.requests >= a.min_requests
    if a.max_error_rate_ratio is not None and judged_stable:
        limit = a.max_error_rate_ratio * max(stable.error_rate, ERROR_RATE_FLOOR)
        if rate > limit:
            return (
                f"error rate {rate:.1%} > {a.max_error_rate_ratio:g} × stable "
                f"{stable.error_rate:.1%} (floor {ERROR_RATE_FLOOR:.0%})"
            )
    p95 = canary.p95_ms
    if p95 is None:
        return None
    if a.max_p95_ms is not None and p95 > a.max_p95_ms:
        return f"p95 {p95:g} ms > max_p95_ms {a.max_p95_ms:g} ms"
    stable_p95 = stable.p95_ms
    ratio = a.max_p95_ratio
    if (
        ratio is not None
        and judged_stable
        and stable_p95 is not None
        and p95 > ratio * max(stable_p95, P95_FLOOR_MS)
    ):
        return f"p95 {p95:g} ms > {ratio:g} × stable {stable_p95:g} ms (floor {P95_FLOOR_MS:g} ms)"
    return None


def split_weights(percent: int, canaries: int, stables: int) -> tuple[int, int]:
    """Per-backend weights (canary, stable) so that ``canaries`` backends together get
    ``percent`` % of requests and ``stables`` the rest, within the proxy's 0-256."""
    if percent <= 0 or canaries == 0:
        return 0, 100
    if percent >= 100 or stables == 0:
        return 100, 0
    each_canary, each_stable = percent * stables, (100 - percent) * canaries
    common = math.gcd(each_canary, each_stable)
    each_canary, each_stable = each_canary // common, each_stable // common
    top = max(each_canary, each_stable)
    if top > MAX_BACKEND_WEIGHT:
        scale = MAX_BACKEND_WEIGHT / top
        each_canary = max(1, round(each_canary * scale))
        each_stable = max(1, round(each_stable * scale))
    return each_canary, each_stable


def _snapshot(counters: ServiceCounters | None) -> dict[str, dict[str, Any]]:
    """Each backend's cumulative counters, as JSON (kept as a step's baseline)."""
    if counters is None:
        return {}
    return {
        bid: {
            "requests": b.requests,
            "errors": _errors(b),
            "latency": {str(k): v for k, v in b.latency.counts.items()},
        }
        for bid, b in counters.backends.items()
    }


def _errors(b: BackendCounters) -> int:
    return int(b.responses.get("5xx", 0)) + b.errors


def window(
    counters: ServiceCounters | None, baseline: dict[str, dict[str, Any]], ids: set[str]
) -> Window:
    """What ``ids`` answered since ``baseline``. A router restart resets its counters:
    a backend below its baseline counts from zero."""
    if counters is None:
        return Window()
    requests = errors = 0
    latency = Latency()
    for bid in ids:
        now = counters.backends.get(bid)
        if now is None:
            continue
        base = baseline.get(bid) or {}
        base_requests = int(base.get("requests", 0))
        reset = now.requests < base_requests
        requests += now.requests - (0 if reset else base_requests)
        errors += max(0, _errors(now) - (0 if reset else int(base.get("errors", 0))))
        earlier = Latency(
            {} if reset else {int(k): int(v) for k, v in (base.get("latency") or {}).items()}
        )
        for bucket, count in now.latency.since(earlier).counts.items():
            latency.counts[bucket] = latency.counts.get(bucket, 0) + count
            latency.total += count
    return Window(requests, errors, latency)


@dataclass
class CanaryRun:
    """A canary in flight: what the route weights and ``kiln status`` read."""

    service: str
    steps: int
    weight: int = 0
    canary: set[str] = field(default_factory=set)
    stable: set[str] = field(default_factory=set)
    ready_canary: int = 0
    ready_stable: int = 0
    asked: str | None = None
    """``promote`` or ``abort``, from the CLI, seen at the next tick."""
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    analysis: dict[str, Any] = field(default_factory=dict)

    def weight_of(self, instance: str) -> int:
        each_canary, each_stable = split_weights(self.weight, self.ready_canary, self.ready_stable)
        return each_canary if instance in self.canary else each_stable


class Canaries:
    """The canaries running, and what ``kiln promote`` and ``kiln abort`` ask of them."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.live: dict[str, CanaryRun] = {}
        self.aborted: dict[str, str] = {}
        """Service → what its last abort said, for a second ``kiln abort``."""

    def running(self, service: str) -> bool:
        return service in self.live

    def ask(self, service: str, what: str) -> dict[str, Any]:
        run = self.live.get(service)
        if run is None:
            if what == "abort" and service in self.aborted:
                raise Conflict(
                    f"{service}: no canary in progress; the last one was already aborted "
                    f"({self.aborted[service]})"
                )
            raise Conflict(f"{service}: no canary in progress; nothing to {what}")
        if run.asked == "abort":
            raise Conflict(f"{service}: the canary is already being aborted")
        run.asked = what
        run.wake.set()
        self.engine.changed(service)
        return {"service": service, "asked": what, "step": run.analysis.get("step")}

    async def promote(self, service: str) -> dict[str, Any]:
        await self._known(service)
        return self.ask(service, "promote")

    async def abort(self, service: str) -> dict[str, Any]:
        await self._known(service)
        return self.ask(service, "abort")

    async def _known(self, service: str) -> None:
        e = self.engine
        if service not in await e.db(e.state.services):
            raise NotFound(f"no service {service!r}")


def is_canary(rollout: Rollout) -> bool:
    """Only a deploy goes through canary steps; a rollback, restart or start is immediate."""
    if rollout.kind != "deploy":
        return False
    return bool(
        Update.model_validate(rollout.target.config.get("update") or {}).strategy == "canary"
    )


def judged_at_edges(e: Engine) -> bool:
    """Whether users come in through edges whose counters the analysis must add."""
    return isinstance(e.runtime, EdgeHost)


async def counters_of(e: Engine, service: str) -> ServiceCounters | None:
    """What the analysis reads: the agent's router, plus every edge's totals where the
    runtime has edges."""
    counters = (await e.io(e.router.counters)).get(service)
    if not judged_at_edges(e):
        return counters
    return with_edges(counters, e.edge_counters.totals(service))


def _route_backends(e: Engine, service: str) -> set[str]:
    """The backends the agent's route of ``service`` names: all an edge can count."""
    route = e.routing.pushed.get(service)
    return {b.id for b in route.backends} if route is not None else set()


async def run_canary(rollouts: Rollouts, rollout: Rollout) -> str | None:
    """The canary, from its saved step; None when there is no stable set to compare
    with (a first deployment), which then rolls as usual."""
    e = rollouts.engine
    service, target = rollout.service, rollout.target
    update = Update.model_validate(target.config.get("update") or {})
    view = await rollouts._view(rollout)
    if rollout.step == 0 and not [i for i in view.old if i.state == "ready"]:
        return None
    run = CanaryRun(service, len(update.steps))
    e.canary.live[service] = run
    e.canary.aborted.pop(service, None)
    e.routing.weighers[service] = run.weight_of
    edges = judged_at_edges(e)
    if edges:
        e.edge_counters.watch(service, lambda: _route_backends(e, service))
        e.routing.report_counters(service, True)
    try:
        return await _steps(rollouts, rollout, run, update)
    finally:
        e.routing.weighers.pop(service, None)
        e.canary.live.pop(service, None)
        if edges:
            e.routing.report_counters(service, False)
            e.edge_counters.forget(service)
        if not e.stopping:
            await e.routing.push(service)


async def _steps(rollouts: Rollouts, rollout: Rollout, run: CanaryRun, update: Update) -> str:
    e = rollouts.engine
    service, target = rollout.service, rollout.target
    saved = await _saved(e, rollout)
    resumed = rollout.step
    verb = "resumed" if rollout.step else "started"
    e.emit(
        f"canary.{verb}",
        f"{service}: canary of r{target.number}"
        + (f" (from step {rollout.step})" if rollout.step else ""),
        service,
        revision=target.number,
        data={"deployment": rollout.deployment, "step": rollout.step},
    )
    if rollout.step == 0:
        why = await _start_set(rollouts, rollout, run, update)
        if why is not None:
            return await _abort(rollouts, rollout, run, why, {})
        rollout.step = 1
        saved = {}
    while rollout.step <= len(update.steps):
        index = rollout.step
        step = update.steps[index - 1]
        run.weight = step.weight
        await _sets(rollouts, rollout, run)
        await e.routing.push(service)
        if saved.get("step") == index and rollout.step == resumed and judged_at_edges(e):
            # The edges' totals went with the agent that counted them: a new baseline.
            saved = {**saved, "baseline": _snapshot(await counters_of(e, service))}
        if saved.get("step") != index:
            counters = await counters_of(e, service)
            saved = {"step": index, "pause_started": time.time(), "baseline": _snapshot(counters)}
            await e.db(e.state.rollout_step, service, target.number, index)
            await e.deployments.canary(rollout.deployment, service, saved)
            e.emit(
                "canary.step",
                f"{service}: canary step {index}/{len(update.steps)}: "
                f"{step.weight}% for {step.pause:g}s",
                service,
                revision=target.number,
                data={"deployment": rollout.deployment, "step": index, "weight": step.weight},
            )
        verdict = await _pause(rollouts, rollout, run, update, saved)
        if verdict is not None:
            return await _abort(rollouts, rollout, run, verdict, run.analysis)
        rollout.step = index + 1
    return await _promote(rollouts, rollout, run, update)


async def _saved(e: Engine, rollout: Rollout) -> dict[str, Any]:
    if rollout.deployment is None:
        return {}
    record = await e.deployments.get(rollout.deployment)
    entry = (record.get("services") or {}).get(rollout.service) or {}
    saved = entry.get("canary") or {}
    return dict(saved) if isinstance(saved, dict) else {}


async def _sets(rollouts: Rollouts, rollout: Rollout, run: CanaryRun) -> None:
    view = await rollouts._view(rollout)
    run.canary = {i.id for i in view.new}
    run.stable = {i.id for i in view.old}
    run.ready_canary = sum(1 for i in view.new if i.state == "ready")
    run.ready_stable = sum(1 for i in view.old if i.state == "ready")


async def _start_set(
    rollouts: Rollouts, rollout: Rollout, run: CanaryRun, update: Update
) -> str | None:
    """The whole canary set, healthy, at weight 0; why not, or None."""
    e = rollouts.engine
    service, target = rollout.service, rollout.target
    while True:
        if run.asked == "abort":
            return "aborted by kiln abort"
        view = await rollouts._view(rollout)
        dead = [i.id for i in view.new if i.state in ("failed", "lost")]
        if dead:
            return f"canary instance {', '.join(dead)} died before the first step"
        live = [i for i in view.new if i.state in ("pending", "starting", "ready", "unhealthy")]
        late = [
            i.id
            for i in live
            if not (i.ready and i.ready_since is not None)
            and view.now - i.created > update.healthy_deadline
        ]
        if late:
            deadline = update.healthy_deadline
            return f"{', '.join(late)} not healthy within healthy_deadline {deadline:g}s"
        healthy = [
            i
            for i in live
            if i.ready
            and i.ready_since is not None
            and view.now - i.ready_since >= update.min_healthy_time
        ]
        rollout.progress = {"healthy": len(healthy), "desired": view.desired,
                            "new": len(view.new), "old": len(view.old)}  # fmt: skip
        if len(healthy) >= view.desired:
            return None
        for _ in range(max(0, view.desired - len(live))):
            rec = await e.lifecycle.new(service, target, deployment=rollout.deployment)
            e.lifecycle.launch(rec, target)
        await _sets(rollouts, rollout, run)
        await e.routing.push(service)
        await e.wait_changed(service, CANARY_TICK)


async def _pause(
    rollouts: Rollouts, rollout: Rollout, run: CanaryRun, update: Update, saved: dict[str, Any]
) -> str | None:
    """One step's pause, judged every tick; why it failed, or None when it passed."""
    e = rollouts.engine
    service = rollout.service
    index = int(saved["step"])
    pause = update.steps[index - 1].pause
    started = float(saved["pause_started"])
    baseline: dict[str, dict[str, Any]] = saved.get("baseline") or {}
    while True:
        await _sets(rollouts, rollout, run)
        await e.routing.push(service)
        view_dead = await _dead_canaries(rollouts, rollout)
        counters = await counters_of(e, service)
        canary = window(counters, baseline, run.canary)
        stable = window(counters, baseline, run.stable)
        verdict = judge(update.analysis, canary, stable)
        elapsed = time.time() - started
        run.analysis = {
            "step": index,
            "steps": len(update.steps),
            "weight": run.weight,
            "weights": {i: run.weight_of(i) for i in sorted(run.canary | run.stable)},
            "elapsed": round(elapsed, 1),
            "pause": pause,
            "canary": canary.to_json(),
            "stable": stable.to_json(),
            "verdict": verdict
            or (
                "waiting for requests"
                if canary.requests < update.analysis.min_requests
                else "passing"
            ),
        }
        if judged_at_edges(e):
            run.analysis["edges"] = e.edge_counters.describe(service)
        rollout.progress = {"canary": run.analysis}
        if view_dead:
            return f"canary instance {', '.join(view_dead)} died during step {index}"
        if run.asked == "abort":
            return "aborted by kiln abort"
        if verdict is not None:
            return f"analysis failed at step {index} ({run.weight}%): {verdict}"
        if run.asked == "promote":
            run.asked = None
            e.emit("canary.promoted", f"{service}: step {index} promoted by kiln promote",
                   service, revision=rollout.target.number,
                   data={"deployment": rollout.deployment, "step": index})  # fmt: skip
            return None
        if elapsed >= pause:
            if canary.requests >= update.analysis.min_requests:
                return None
            if elapsed >= pause + update.progress_deadline:
                return (
                    f"step {index}: only {canary.requests} request(s) reached the canary in "
                    f"{elapsed:.0f}s, fewer than min_requests {update.analysis.min_requests}"
                )
        run.wake.clear()
        waits = [asyncio.ensure_future(run.wake.wait()),
                 asyncio.ensure_future(e.wait_changed(service, CANARY_TICK))]  # fmt: skip
        try:
            await asyncio.wait(waits, timeout=CANARY_TICK, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()


async def _dead_canaries(rollouts: Rollouts, rollout: Rollout) -> list[str]:
    view = await rollouts._view(rollout)
    return [i.id for i in view.new if i.state in ("failed", "lost")]


async def _abort(
    rollouts: Rollouts, rollout: Rollout, run: CanaryRun, why: str, numbers: dict[str, Any]
) -> str:
    """Weight back to 0 first (no new request reaches the canary), then the canary set
    goes and the revision is failed; the stable set never changed."""
    e = rollouts.engine
    service, target = rollout.service, rollout.target
    run.weight = 0
    await _sets(rollouts, rollout, run)
    await e.routing.push(service)
    e.emit(
        "canary.aborted",
        f"{service}: canary of r{target.number} aborted: {why}",
        service,
        revision=target.number,
        data={"deployment": rollout.deployment, "reason": why, "analysis": numbers},
    )
    e.canary.aborted[service] = f"r{target.number}: {why}"
    await e.db(e.state.set_revision_status, service, target.number, "failed", reason=why)
    retiring = [
        e.lifecycle.retire(iid, f"canary of r{target.number} aborted") for iid in sorted(run.canary)
    ]
    await asyncio.gather(*retiring, return_exceptions=True)
    await rollouts._settle_dead(service)
    e.emit(
        "rollout.failed",
        f"{service}: rollout to r{target.number} failed: {why}",
        service,
        revision=target.number,
        data={"culprits": sorted(run.canary), "deployment": rollout.deployment, "reason": why},
    )
    await rollouts._close(rollout, "failed", why, sorted(run.canary))
    return "failed"


async def _promote(rollouts: Rollouts, rollout: Rollout, run: CanaryRun, update: Update) -> str:
    """Every step passed: the canary set takes all requests, the stable set is retired."""
    e = rollouts.engine
    service, target = rollout.service, rollout.target
    last = len(update.steps) + 1
    if rollout.step != last:
        rollout.step = last
    await e.db(e.state.rollout_step, service, target.number, last)
    run.weight = 100
    await _sets(rollouts, rollout, run)
    await e.routing.push(service)
    e.emit(
        "canary.promoted",
        f"{service}: canary of r{target.number} takes every request",
        service,
        revision=target.number,
        data={"deployment": rollout.deployment, "step": last, "analysis": run.analysis},
    )
    # Awaited here: the rollout is over when the stable set is gone, not merely drained.
    why = f"replaced by r{target.number} (canary promoted)"
    await asyncio.gather(
        *(e.lifecycle.retire(iid, why) for iid in sorted(run.stable)), return_exceptions=True
    )
    return await rollouts._succeeded(rollout, int(target.config.get("replicas", 1)))
