from __future__ import annotations

from pathlib import Path

import pytest

from kiln.deploy.reconcile import (
    ReconcileDecision,
    ReconcileInstance,
    ReconcilePolicy,
    ReconcileView,
    Replacement,
    backoff_delay,
    meltdown_limit,
    reconcile,
)
from kiln.deploy.state import StateStore

NOW = 10_000.0


def up(id: str, ready_at: float = NOW - 3600) -> ReconcileInstance:
    return ReconcileInstance(id, 1, "ready", created=ready_at - 1, ready_at=ready_at)


def dead(
    id: str, died: float, ready_at: float | None = NOW - 3600, replaced: bool = False
) -> ReconcileInstance:
    return ReconcileInstance(
        id, 1, "failed", created=(ready_at or died) - 1, ready_at=ready_at, died_at=died,
        replaced=replaced,
    )  # fmt: skip


def starting(id: str) -> ReconcileInstance:
    return ReconcileInstance(id, 1, "starting", created=NOW - 1)


def sick(id: str) -> ReconcileInstance:
    return ReconcileInstance(id, 1, "unhealthy", created=NOW - 600, ready_at=NOW - 500)


def view(*instances: ReconcileInstance, desired: int = 3, **kw: object) -> ReconcileView:
    return ReconcileView("web", 1, desired, instances, **kw)  # type: ignore[arg-type]


def decision(**kw: object) -> ReconcileDecision:
    return ReconcileDecision("web", 1, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("v", "expected"),
    [
        # all well: nothing to do.
        (view(up("a"), up("b"), up("c")), decision()),
        # a long-lived instance killed: replaced at once, same revision, no backoff.
        (
            view(up("a"), up("b"), dead("c", NOW - 1)),
            decision(replace=(Replacement("c", 1, "instance dead"),)),
        ),
        # already replaced: its replacement is starting, nothing more.
        (view(up("a"), up("b"), dead("c", NOW - 1, replaced=True), starting("d")), decision()),
        # unhealthy after having been ready: replace.
        (
            view(up("a"), up("b"), sick("c")),
            decision(replace=(Replacement("c", 1, "instance unhealthy"),)),
        ),
        # below the desired count: create.
        (view(up("a"), desired=3), decision(create=2)),
        # above it: not the reconciler's business (the planner destroys).
        (view(up("a"), up("b"), up("c"), up("d")), decision()),
        # parallelism: at most max_parallel starting at once, dead first.
        (
            view(
                dead("a", NOW - 1),
                sick("b"),
                starting("c"),
                desired=8,
                policy=ReconcilePolicy(max_parallel=3, meltdown_fraction=1.0),
            ),
            decision(
                replace=(
                    Replacement("a", 1, "instance dead"),
                    Replacement("b", 1, "instance unhealthy"),
                )
            ),
        ),
        (view(up("a"), desired=10, policy=ReconcilePolicy(max_parallel=4)), decision(create=4)),
        # one crash is not a loop: a first crash (never ready) is replaced at once …
        (
            view(up("a"), up("b"), dead("c", NOW - 0.5, ready_at=None)),
            decision(replace=(Replacement("c", 1, "instance dead"),), crash_streak=1),
        ),
        # … and so is a young instance killed soon after it became ready (issue 8 #11).
        (
            view(up("a"), up("b"), dead("c", NOW - 0.1, ready_at=NOW - 2)),
            decision(replace=(Replacement("c", 1, "instance dead"),), crash_streak=1),
        ),
        # the second crash in a row waits 1 s …
        (
            view(
                up("a"),
                dead("b", NOW - 2, ready_at=None, replaced=True),
                dead("c", NOW - 0.5, ready_at=None),
                desired=10,
            ),
            decision(wait_until=NOW + 0.5, crash_streak=2),
        ),
        # … and once the wait is over it is replaced.
        (
            view(
                up("a"),
                dead("b", NOW - 3, ready_at=None, replaced=True),
                dead("c", NOW - 1.5, ready_at=None),
                desired=10,
            ),
            decision(replace=(Replacement("c", 1, "instance dead"),), create=3, crash_streak=2),
        ),
        # the crashes of a revision that never went live (a failed rollout's) neither
        # back off nor trip the breaker of the live one (issue 8 #7).
        (
            view(
                up("a"),
                up("b"),
                ReconcileInstance("x", 2, "failed", NOW - 9, None, NOW - 5, True),
                ReconcileInstance("y", 2, "failed", NOW - 8, None, NOW - 4, True),
                dead("c", NOW - 0.2),
            ),
            decision(replace=(Replacement("c", 1, "instance dead"),)),
        ),
        # breaker already open: do nothing, even with a dead instance.
        (
            view(up("a"), up("b"), dead("c", NOW - 1), breaker_open=True),
            decision(breaker_open=True),
        ),
    ],
)
def test_reconcile_table(v: ReconcileView, expected: ReconcileDecision) -> None:
    assert reconcile(v, NOW) == expected


def test_backoff_doubles_and_caps() -> None:
    pol = ReconcilePolicy()
    assert [backoff_delay(n, pol) for n in range(9)] == [0, 1, 2, 4, 8, 16, 32, 60, 60]


def test_crash_streak_counts_and_resets_after_a_healthy_period() -> None:
    # 20 desired so the breaker (limit 4) stays closed with 3 crashes.
    crashes = [dead(f"c{i}", NOW - 1.5 + i / 2, ready_at=None) for i in range(3)]
    d = reconcile(view(up("a"), *crashes, desired=20), NOW)
    # The third crash in a row waits 2 s (none, 1 s, 2 s, 4 s …).
    assert d.crash_streak == 3 and d.wait_until == NOW - 0.5 + 2
    assert not d.replace and not d.create
    # A replacement that stayed ready for healthy_period (10 s) resets the streak.
    proven = ReconcileInstance("p", 1, "ready", created=NOW - 9, ready_at=NOW - 7.5)
    later = reconcile(view(up("a"), *crashes, proven, desired=20), NOW + 3)
    assert later.crash_streak == 0 and later.wait_until is None
    assert len(later.replace) == 3


@pytest.mark.parametrize(
    ("desired", "limit"), [(0, 1), (1, 1), (3, 1), (5, 1), (6, 2), (10, 2), (11, 3), (100, 20)]
)
def test_meltdown_limit(desired: int, limit: int) -> None:
    assert meltdown_limit(desired) == limit


def test_meltdown_trips_with_an_alarm_event() -> None:
    v = view(up("a"), dead("b", NOW - 300, replaced=True), dead("c", NOW - 5))
    d = reconcile(v, NOW)
    assert d.trip_breaker and d.breaker_open and not d.replace and not d.create
    [event] = d.events
    assert event.kind == "meltdown"
    assert event.message == (
        "web: 2 instances died within 10 min (more than 1 of 3); replacing stopped until kiln apply"
    )
    assert event.kwargs()["data"]["deaths"] == ["b", "c"]


def test_meltdown_window_and_reset() -> None:
    old_death = dead("b", NOW - 700, replaced=True)
    assert not reconcile(view(up("a"), old_death, dead("c", NOW - 5)), NOW).trip_breaker
    recent = view(up("a"), dead("b", NOW - 60, replaced=True), dead("c", NOW - 5))
    assert reconcile(recent, NOW).trip_breaker
    after_apply = ReconcileView(**{**recent.__dict__, "breaker_reset_at": NOW - 30})
    assert reconcile(after_apply, NOW).replace == (Replacement("c", 1, "instance dead"),)


def test_view_from_store_records(tmp_path: Path) -> None:
    with StateStore(tmp_path / "state.db") as store:
        a = store.add_instance("web", 1, port=1, state="ready")
        store.update_instance(a.id, ready_at=NOW - 100)
        b = store.add_instance("web", 1, port=2, created=NOW - 50)
        store.update_instance(b.id, state="failed", ready_at=NOW - 40, stopped_at=NOW - 2)
        old = store.add_instance("web", 1, port=3, created=NOW - 5000)
        store.update_instance(
            old.id, state="lost", stopped_at=NOW - 4000, replaced_by="web-x", ready_at=NOW - 4900
        )
        gone = store.add_instance("web", 1, port=4)
        store.update_instance(gone.id, state="stopped")
        store.add_instance("db", 1, port=5)
        v = ReconcileView.from_records("web", 1, 2, store.instances(), NOW)
    assert {i.id for i in v.instances} == {a.id, b.id}
    d = reconcile(v, NOW)
    assert d.replace == (Replacement(b.id, 1, "instance dead"),)
    assert d.create == 0


def test_policy_comes_from_the_services_heal_table() -> None:
    policy = ReconcilePolicy.from_heal(
        {"max_parallel": 2, "meltdown_fraction": 0.5, "meltdown_window": 60.0, "backoff_cap": 8.0}
    )
    assert (policy.max_parallel, policy.meltdown_fraction) == (2, 0.5)
    assert (policy.meltdown_window, policy.backoff_cap) == (60.0, 8.0)
    assert ReconcilePolicy.from_heal(None) == ReconcilePolicy()
