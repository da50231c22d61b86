"""Rollout strategies: given where a rollout stands, what is the next step?

Pure. The agent builds a :class:`RolloutView` on every tick (after any
instance changes state), asks ``STRATEGIES[update.strategy].next_step(view)``
and carries the step out: start N instances of the target revision, retire
the listed ones (take them out of the proxy, drain, stop), and stop on
``done`` or ``failed``. On ``failed`` with ``update.auto_rollback`` it starts a
new rollout whose target is the previous good revision: the same logic, with
the current new instances as the old ones.

Scaling and first deployments are rollouts too: a scale-up is a rollout to
the current revision with the existing instances passed as ``new``; a first
deployment has no old instances.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

from kiln.spec.models import Update

__all__ = [
    "STRATEGIES",
    "Rolling",
    "RolloutInstance",
    "RolloutStep",
    "RolloutView",
    "Strategy",
]

_LIVE = frozenset({"pending", "starting", "ready", "unhealthy"})


@dataclass(frozen=True)
class RolloutInstance:
    id: str
    state: str
    """An ``InstanceRecord.state``; draining/stopping ones should be left out of the view."""
    created: float
    ready_since: float | None = None
    touched: bool = False
    """A human ran a command in it (``kiln exec``): retired before untouched ones."""

    @property
    def ready(self) -> bool:
        return self.state == "ready"


@dataclass(frozen=True)
class RolloutView:
    target_revision: int
    desired: int
    old: Sequence[RolloutInstance]
    """Instances of any other revision (or, on rollback, of the revision being undone)."""
    new: Sequence[RolloutInstance]
    """Instances of the target revision, including ones started before this rollout."""
    now: float
    update: Update
    started: float
    """When the rollout began."""
    last_progress: float | None = None
    """When an instance last became healthy; derived from ``new`` when None or older."""


@dataclass(frozen=True)
class RolloutStep:
    start: int = 0
    """How many new instances of the target revision to start now."""
    retire: tuple[str, ...] = ()
    """Instances to take out of rotation, drain and stop (old ones, or surplus new ones)."""
    done: bool = False
    failed: str | None = None
    """Why the rollout failed; the agent rolls back when ``update.auto_rollback``."""
    culprits: tuple[str, ...] = field(default=())
    """New instances that caused the failure."""
    healthy: int = 0
    """New instances healthy for ``min_healthy_time`` (for progress display)."""

    @property
    def idle(self) -> bool:
        return not (self.start or self.retire or self.done or self.failed)


class Strategy(ABC):
    @classmethod
    @abstractmethod
    def next_step(cls, view: RolloutView) -> RolloutStep: ...


class Rolling(Strategy):
    """Surge first, never below ``desired - max_unavailable`` healthy instances.

    Healthy means: old and ready, or new, ready and ready for at least
    ``min_healthy_time``. Each new instance must be healthy within
    ``healthy_deadline`` of its start, and some new instance must become
    healthy within ``progress_deadline`` of the last one (or of the start).
    """

    @classmethod
    def next_step(cls, view: RolloutView) -> RolloutStep:
        u = view.update
        now = view.now
        desired = view.desired

        def healthy_at(inst: RolloutInstance) -> float | None:
            if not inst.ready or inst.ready_since is None:
                return None
            return inst.ready_since + u.min_healthy_time

        new_live = [i for i in view.new if i.state in _LIVE]
        old_live = [i for i in view.old if i.state in _LIVE]
        new_healthy = [i for i in new_live if (t := healthy_at(i)) is not None and t <= now]

        dead_new = [i for i in view.new if i.state in ("failed", "lost")]
        if dead_new:
            names = ", ".join(i.id for i in dead_new)
            return RolloutStep(
                failed=f"new instance {names} died before the rollout finished",
                culprits=tuple(i.id for i in dead_new),
                healthy=len(new_healthy),
            )
        late = [
            i for i in new_live if i not in new_healthy and now - i.created > u.healthy_deadline
        ]
        if late:
            names = ", ".join(i.id for i in late)
            return RolloutStep(
                failed=f"{names} not healthy within healthy_deadline {u.healthy_deadline:g}s",
                culprits=tuple(i.id for i in late),
                healthy=len(new_healthy),
            )
        progress = max(
            [view.started, view.last_progress or view.started]
            + [t for i in new_healthy if (t := healthy_at(i)) is not None]
        )
        done = not old_live and len(new_live) == desired and len(new_healthy) == desired
        if done:
            return RolloutStep(done=True, healthy=len(new_healthy))
        if now - progress > u.progress_deadline:
            return RolloutStep(
                failed=f"no instance became healthy within progress_deadline "
                f"{u.progress_deadline:g}s",
                culprits=tuple(i.id for i in new_live if i not in new_healthy),
                healthy=len(new_healthy),
            )

        retire: list[str] = []
        # Surplus new instances (a scale-down): the least useful go first.
        if len(new_live) > desired:
            surplus = sorted(
                new_live,
                key=lambda i: (i in new_healthy, i.ready, -i.created),
            )[: len(new_live) - desired]
            retire.extend(i.id for i in surplus)
            new_live = [i for i in new_live if i.id not in retire]
            new_healthy = [i for i in new_healthy if i.id not in retire]

        # Old instances that serve nothing cost no availability.
        old_unready = [i for i in old_live if not i.ready]
        retire.extend(i.id for i in old_unready)
        old_ready = sorted(
            (i for i in old_live if i.ready), key=lambda i: (not i.touched, i.created)
        )

        # Old instances that healthy new ones already cover go first: availability stays ≥ desired.
        drop = min(len(old_ready), max(0, len(old_ready) + len(new_healthy) - desired))
        remaining = len(old_ready) - drop + len(new_live)
        ceiling = desired + u.max_surge
        wanted = max(0, desired - len(new_live))
        if wanted > ceiling - remaining:
            # No room to surge: spend the max_unavailable allowance, never below the floor.
            floor = max(0, desired - u.max_unavailable)
            can_drop = max(0, len(old_ready) + len(new_healthy) - floor)
            extra = max(0, min(wanted - (ceiling - remaining), can_drop - drop))
            drop = min(len(old_ready), drop + extra)
            remaining = len(old_ready) - drop + len(new_live)
        retire.extend(i.id for i in old_ready[:drop])
        start = max(0, min(wanted, ceiling - remaining))
        return RolloutStep(start=start, retire=tuple(retire), healthy=len(new_healthy))


STRATEGIES: dict[str, type[Strategy]] = {"rolling": Rolling}
