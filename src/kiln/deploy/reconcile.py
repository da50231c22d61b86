"""Self-healing decisions: what to replace or create so a service runs its desired count.

Pure. The agent calls :func:`reconcile` for each service that has no rollout
in progress, every health interval or when an instance changes state, and
carries out the decision: start a replacement from the same revision for
each entry of ``replace`` (marking the old record's ``replaced_by``; an
unhealthy one is drained once its replacement is ready), start ``create``
new instances of ``revision``, emit ``events``, and persist the breaker when
``trip_breaker`` (``StateStore.raise_alarm(service, "meltdown", …)``).

Three brakes keep healing from making things worse:

* parallelism: at most ``max_parallel`` instances starting at once;
* crash-loop backoff: an instance of the active revision that dies before it
  has been ready for ``healthy_period`` is a crash. A first crash is replaced
  at once (one crash is not a loop); after the n-th crash in a row (n ≥ 2) the
  next start waits ``min(cap, base * 2**(n-2))`` (1 s, 2 s, 4 s … 60 s). Any instance
  that stays ready for ``healthy_period`` resets the streak, and so does the
  apply that clears a meltdown (``breaker_reset_at``). A long-lived
  instance that is killed is not a crash and is replaced at once;
* meltdown breaker (BOSH): more than ``ceil(20% of desired)`` (at least 1)
  deaths of the active revision within 10 minutes stops all replacing and
  raises an alarm (the deaths of a revision that never went live, such as a
  failed rollout's, do not count against the live one), until
  ``kiln apply`` (or an explicit reset) clears it and sets ``breaker_reset_at``
  so deaths before that moment no longer count.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kiln.deploy.state import InstanceRecord

__all__ = [
    "EventDraft",
    "ReconcileDecision",
    "ReconcileInstance",
    "ReconcilePolicy",
    "ReconcileView",
    "Replacement",
    "reconcile",
]

_LIVE = frozenset({"pending", "starting", "ready", "unhealthy"})
_DEAD = frozenset({"failed", "lost"})


@dataclass(frozen=True)
class ReconcileInstance:
    id: str
    revision: int
    state: str
    created: float
    ready_at: float | None = None
    died_at: float | None = None
    replaced: bool = False
    """A replacement was already started (``InstanceRecord.replaced_by`` is set)."""


@dataclass(frozen=True)
class ReconcilePolicy:
    max_parallel: int = 4
    backoff_base: float = 1.0
    backoff_cap: float = 60.0
    healthy_period: float = 10.0
    meltdown_window: float = 600.0
    meltdown_fraction: float = 0.2

    @classmethod
    def from_heal(cls, heal: Mapping[str, Any] | None) -> ReconcilePolicy:
        """The service's ``heal`` table (stored in its revision) over the defaults."""
        heal = heal or {}
        base = cls()
        return cls(
            max_parallel=int(heal.get("max_parallel", base.max_parallel)),
            backoff_cap=float(heal.get("backoff_cap", base.backoff_cap)),
            meltdown_window=float(heal.get("meltdown_window", base.meltdown_window)),
            meltdown_fraction=float(heal.get("meltdown_fraction", base.meltdown_fraction)),
        )


@dataclass(frozen=True)
class ReconcileView:
    service: str
    revision: int
    """The active revision: what ``create`` starts."""
    desired: int
    instances: Sequence[ReconcileInstance]
    """Live instances, plus dead ones from the meltdown window (replaced or not)."""
    breaker_open: bool = False
    breaker_reset_at: float = 0.0
    policy: ReconcilePolicy = field(default_factory=ReconcilePolicy)

    @classmethod
    def from_records(
        cls,
        service: str,
        revision: int,
        desired: int,
        records: Iterable[InstanceRecord],
        now: float,
        *,
        breaker_open: bool = False,
        breaker_reset_at: float = 0.0,
        policy: ReconcilePolicy | None = None,
    ) -> ReconcileView:
        """Build the view from store records (``StateStore.instances(service)``)."""
        pol = policy or ReconcilePolicy()
        horizon = now - pol.meltdown_window
        chosen: list[ReconcileInstance] = []
        for r in records:
            if r.service != service:
                continue
            died = r.stopped_at if r.stopped_at is not None else (r.ready_at or r.created)
            if r.state in _LIVE or (
                r.state in _DEAD and (r.replaced_by is None or died >= horizon)
            ):
                chosen.append(
                    ReconcileInstance(
                        id=r.id,
                        revision=r.revision,
                        state=r.state,
                        created=r.created,
                        ready_at=r.ready_at,
                        died_at=died if r.state in _DEAD else None,
                        replaced=r.replaced_by is not None,
                    )
                )
        return cls(service, revision, desired, tuple(chosen), breaker_open, breaker_reset_at, pol)


@dataclass(frozen=True)
class Replacement:
    instance: str
    revision: int
    reason: str


@dataclass(frozen=True)
class EventDraft:
    """An event for ``StateStore.emit(**draft.kwargs())``."""

    kind: str
    message: str
    service: str | None = None
    instance: str | None = None
    revision: int | None = None
    data: dict[str, Any] = field(default_factory=dict)

    def kwargs(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "message": self.message,
            "service": self.service,
            "instance": self.instance,
            "revision": self.revision,
            "data": dict(self.data),
        }


@dataclass(frozen=True)
class ReconcileDecision:
    service: str
    revision: int
    replace: tuple[Replacement, ...] = ()
    create: int = 0
    wait_until: float | None = None
    """Crash-loop backoff: start nothing before this time."""
    trip_breaker: bool = False
    breaker_open: bool = False
    crash_streak: int = 0
    events: tuple[EventDraft, ...] = ()

    @property
    def noop(self) -> bool:
        return not (self.replace or self.create or self.trip_breaker)


def backoff_delay(streak: int, policy: ReconcilePolicy) -> float:
    if streak <= 0:
        return 0.0
    return float(min(policy.backoff_cap, policy.backoff_base * 2 ** (streak - 1)))


def meltdown_limit(desired: int, fraction: float = 0.2) -> int:
    """Deaths tolerated in the window; one more trips the breaker."""
    return max(1, math.ceil(fraction * desired))


def reconcile(view: ReconcileView, now: float) -> ReconcileDecision:
    pol = view.policy
    if view.breaker_open:
        return ReconcileDecision(view.service, view.revision, breaker_open=True)

    dead = [i for i in view.instances if i.state in _DEAD]
    recent = [
        i
        for i in dead
        if i.revision == view.revision
        and i.died_at is not None
        and i.died_at >= now - pol.meltdown_window
        and i.died_at >= view.breaker_reset_at
    ]
    limit = meltdown_limit(view.desired, pol.meltdown_fraction)
    if len(recent) > limit:
        minutes = pol.meltdown_window / 60
        message = (
            f"{view.service}: {len(recent)} instances died within {minutes:g} min "
            f"(more than {limit} of {view.desired}); replacing stopped until kiln apply"
        )
        alarm = EventDraft(
            "meltdown",
            message,
            service=view.service,
            revision=view.revision,
            data={"deaths": sorted(i.id for i in recent), "limit": limit, "desired": view.desired},
        )
        return ReconcileDecision(
            view.service, view.revision, trip_breaker=True, breaker_open=True, events=(alarm,)
        )

    streak, last_crash = _crash_streak(view, now)
    if streak and last_crash is not None:
        resume = last_crash + backoff_delay(streak - 1, pol)
        if now < resume:
            return ReconcileDecision(
                view.service, view.revision, wait_until=resume, crash_streak=streak
            )

    live = [i for i in view.instances if i.state in _LIVE]
    in_flight = sum(1 for i in live if i.state in ("pending", "starting"))
    budget = max(0, pol.max_parallel - in_flight)
    unreplaced_dead = sorted((i for i in dead if not i.replaced), key=lambda i: i.died_at or 0)
    unhealthy = sorted(
        (i for i in live if i.state == "unhealthy" and not i.replaced and i.ready_at is not None),
        key=lambda i: i.created,
    )
    candidates = [Replacement(i.id, i.revision, "instance dead") for i in unreplaced_dead] + [
        Replacement(i.id, i.revision, "instance unhealthy") for i in unhealthy
    ]
    replace = tuple(candidates[:budget])
    budget -= len(replace)
    slots = sum(1 for i in live if not i.replaced) + len(unreplaced_dead)
    create = min(budget, max(0, view.desired - slots))
    return ReconcileDecision(
        view.service, view.revision, replace=replace, create=create, crash_streak=streak
    )


def _crash_streak(view: ReconcileView, now: float) -> tuple[int, float | None]:
    """Crashes since some instance proved healthy for ``healthy_period``, or since the
    apply that reset the breaker: the operator's fix starts a new streak."""
    hp = view.policy.healthy_period
    proven = view.breaker_reset_at
    for i in view.instances:
        if i.ready_at is None:
            continue
        held_now = i.state == "ready" and i.ready_at + hp <= now
        held_then = i.died_at is not None and i.died_at - i.ready_at >= hp
        if held_now or held_then:
            proven = max(proven, i.ready_at + hp)
    crashes = [
        i.died_at
        for i in view.instances
        if i.state in _DEAD
        and i.revision == view.revision
        and i.died_at is not None
        and i.died_at > proven
        and (i.ready_at is None or i.died_at - i.ready_at < hp)
    ]
    return len(crashes), (max(crashes) if crashes else None)
