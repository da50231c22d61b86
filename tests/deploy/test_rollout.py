from __future__ import annotations

from dataclasses import dataclass

import pytest

from kiln.deploy.rollout import (
    STRATEGIES,
    Rolling,
    RolloutInstance,
    RolloutStep,
    RolloutView,
)
from kiln.spec.models import Update

NOW = 1000.0


def ready(id: str, since: float = 0.0) -> RolloutInstance:
    return RolloutInstance(id, "ready", created=since, ready_since=since)


def starting(id: str, created: float = NOW - 1) -> RolloutInstance:
    return RolloutInstance(id, "starting", created=created)


def view(
    old: list[RolloutInstance],
    new: list[RolloutInstance],
    desired: int = 3,
    started: float = NOW - 10,
    **knobs: float,
) -> RolloutView:
    return RolloutView(
        target_revision=2,
        desired=desired,
        old=old,
        new=new,
        now=NOW,
        update=Update(**knobs),  # type: ignore[arg-type]
        started=started,
    )


OLD3 = [ready("o1"), ready("o2"), ready("o3")]


@pytest.mark.parametrize(
    ("v", "expected"),
    [
        # surge 1, unavailable 0: start one, retire nothing.
        (view(OLD3, []), RolloutStep(start=1)),
        # the new one is still starting: wait.
        (view(OLD3, [starting("n1")]), RolloutStep()),
        # ready but not for min_healthy_time (2 s): wait.
        (view(OLD3, [ready("n1", NOW - 1)]), RolloutStep()),
        # healthy: retire the oldest old one and start the next.
        (view(OLD3, [ready("n1", NOW - 5)]), RolloutStep(start=1, retire=("o1",), healthy=1)),
        # surge 0, unavailable 1: retire first, then start in the room made.
        (
            view(OLD3, [], max_surge=0, max_unavailable=1),
            RolloutStep(start=1, retire=("o1",)),
        ),
        # surge 2: two at once.
        (view(OLD3, [], max_surge=2), RolloutStep(start=2)),
        # first deployment: no old instances, start them all.
        (view([], []), RolloutStep(start=3)),
        # scale up on the same revision.
        (view([], [ready("n1"), ready("n2")], desired=4), RolloutStep(start=2, healthy=2)),
        # scale down on the same revision: least useful first.
        (
            view([], [ready("n1", 1), ready("n2", 2), starting("n3")], desired=1),
            RolloutStep(retire=("n3", "n2"), healthy=1),
        ),
        # scale to zero.
        (view(OLD3, [], desired=0), RolloutStep(retire=("o1", "o2", "o3"))),
        (view([], [], desired=0), RolloutStep(done=True)),
        # old instances that are not ready are retired freely, which makes room to surge.
        (
            view([ready("o1"), starting("o2"), ready("o3")], []),
            RolloutStep(start=2, retire=("o2",)),
        ),
        # everything healthy, old gone: done.
        (
            view([], [ready("n1", NOW - 5), ready("n2", NOW - 5), ready("n3", NOW - 5)]),
            RolloutStep(done=True, healthy=3),
        ),
        # last old one goes once all new are healthy.
        (
            view([ready("o3")], [ready("n1", NOW - 5), ready("n2", NOW - 5), ready("n3", NOW - 5)]),
            RolloutStep(retire=("o3",), healthy=3),
        ),
    ],
)
def test_rolling_steps(v: RolloutView, expected: RolloutStep) -> None:
    assert Rolling.next_step(v) == expected


def test_healthy_deadline_fails() -> None:
    v = view(OLD3, [starting("n1", created=NOW - 61)])
    step = Rolling.next_step(v)
    assert step.failed == "n1 not healthy within healthy_deadline 60s"
    assert step.culprits == ("n1",)


def test_dead_new_instance_fails() -> None:
    step = Rolling.next_step(view(OLD3, [RolloutInstance("n1", "failed", created=NOW - 2)]))
    assert step.failed == "new instance n1 died before the rollout finished"


def test_progress_deadline_fails_and_progress_resets_it() -> None:
    v = view(
        OLD3,
        [starting("n1", created=NOW - 5)],
        started=NOW - 400,
        healthy_deadline=1000,
        progress_deadline=300,
    )
    step = Rolling.next_step(v)
    assert step.failed is not None and "progress_deadline 300s" in step.failed
    recent = RolloutView(**{**v.__dict__, "last_progress": NOW - 100})
    assert Rolling.next_step(recent).failed is None


def test_strategy_table() -> None:
    assert STRATEGIES["rolling"] is Rolling
    assert STRATEGIES["rolling"].next_step(view([], [])) == RolloutStep(start=3)


@dataclass
class _Sim:
    id: str
    new: bool
    created: float
    ready_since: float | None = None


@pytest.mark.parametrize(
    ("desired", "old", "surge", "unavailable"),
    [(3, 3, 1, 0), (3, 3, 0, 1), (5, 5, 2, 1), (4, 2, 1, 0), (2, 5, 1, 0), (1, 1, 1, 0)],
)
def test_simulated_rollout_keeps_the_floor_and_the_ceiling(
    desired: int, old: int, surge: int, unavailable: int
) -> None:
    """Drive a whole rollout: instances get ready 1 s after start; check every tick."""
    update = Update(max_surge=surge, max_unavailable=unavailable, min_healthy_time=2)
    now = 0.0
    fleet = [_Sim(f"o{i}", False, -100.0, -100.0) for i in range(old)]
    floor = min(old, desired - unavailable)
    counter = 0
    for _ in range(200):
        for inst in fleet:
            if inst.ready_since is None and now - inst.created >= 1:
                inst.ready_since = now
        as_view = [
            RolloutInstance(
                i.id,
                "ready" if i.ready_since is not None else "starting",
                i.created,
                i.ready_since,
            )
            for i in fleet
        ]
        step = Rolling.next_step(
            RolloutView(
                target_revision=2,
                desired=desired,
                old=[v for v, i in zip(as_view, fleet, strict=True) if not i.new],
                new=[v for v, i in zip(as_view, fleet, strict=True) if i.new],
                now=now,
                update=update,
                started=0.0,
            )
        )
        assert step.failed is None
        if step.done:
            break
        fleet = [i for i in fleet if i.id not in step.retire]
        for _ in range(step.start):
            counter += 1
            fleet.append(_Sim(f"n{counter}", True, now))
        available = sum(
            1
            for i in fleet
            if i.ready_since is not None and (not i.new or now - i.ready_since >= 2)
        )
        assert available >= floor, (now, fleet)
        assert len(fleet) <= max(desired, old) + surge
        now += 0.5
    else:
        pytest.fail("rollout never finished")
    assert all(i.new for i in fleet) and len(fleet) == desired
    assert counter == desired
