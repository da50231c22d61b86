from __future__ import annotations

import json
import multiprocessing
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from kiln.deploy.state import (
    MIGRATIONS,
    SCHEMA_VERSION,
    StateStore,
    migrate,
)
from kiln.errors import KilnError


@pytest.fixture
def store(tmp_path: Path) -> Any:
    s = StateStore(tmp_path / "state.db")
    yield s
    s.close()


def _rev(store: StateStore, service: str = "web", digest: str = "sha256:aa", **kw: Any) -> Any:
    return store.next_revision(
        service,
        image_digest=digest,
        config={"replicas": 2, "env": {"A": "1"}},
        config_hash="sha256:" + digest[-2:],
        spec_text="[project]\n",
        spec_path="/p/kiln.toml",
        git_commit="abc",
        environment=None,
        **kw,
    )


def test_wal_and_durable_pragmas(store: StateStore) -> None:
    db = sqlite3.connect(store.path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()
    assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert store._db.execute("PRAGMA busy_timeout").fetchone()[0] == 10000
    assert store.schema_version == SCHEMA_VERSION


def test_revisions_numbered_per_service_and_round_trip(store: StateStore) -> None:
    r1 = _rev(store)
    r2 = _rev(store, digest="sha256:bb")
    other = _rev(store, service="db")
    assert (r1.number, r2.number, other.number) == (1, 2, 1)
    assert r2.label == "r2"
    assert store.revision("web", 1) == r1
    assert [r.number for r in store.revisions("web")] == [1, 2]
    assert r1.config == {"replicas": 2, "env": {"A": "1"}}
    assert r1.status == "pending"
    with pytest.raises(KilnError, match="service 'web' has no revision r9"):
        store.revision("web", 9)


def test_activation_supersedes_and_previous_good(store: StateStore) -> None:
    for d in ("sha256:a1", "sha256:a2", "sha256:a3"):
        _rev(store, digest=d)
    assert store.active_revision("web") is None
    assert store.previous_good_revision("web") is None
    store.set_revision_status("web", 1, "active")
    store.set_revision_status("web", 2, "active")
    assert store.revision("web", 1).status == "superseded"
    assert store.active_revision("web").number == 2  # type: ignore[union-attr]
    assert store.previous_good_revision("web").number == 1  # type: ignore[union-attr]
    store.set_revision_status("web", 3, "failed", reason="r3: web-1 not healthy")
    assert store.revision("web", 3).reason == "r3: web-1 not healthy"
    assert store.active_revision("web").number == 2  # type: ignore[union-attr]
    # Roll back r2 → r1 in one commit: r2 becomes rolled_back, not a rollback target.
    store.set_revision_status("web", 1, "active", previous_becomes="rolled_back")
    assert store.revision("web", 2).status == "rolled_back"
    assert store.active_revision("web").number == 1  # type: ignore[union-attr]
    assert store.previous_good_revision("web") is None


def test_unknown_status_is_refused(store: StateStore) -> None:
    _rev(store)
    with pytest.raises(KilnError, match="unknown revision status 'done'"):
        store.set_revision_status("web", 1, "done")  # type: ignore[arg-type]


def test_instances_lifecycle(store: StateStore) -> None:
    _rev(store)
    a = store.add_instance("web", 1, port=41000, handle={"pid": 1})
    b = store.add_instance("web", 1, port=41001, id="web-fixed")
    assert a.id.startswith("web-") and len(a.id) == 12
    assert a.state == "starting" and a.handle == {"pid": 1}
    ready = store.update_instance(a.id, state="ready", ready_at=123.0)
    assert ready.state == "ready" and ready.ready_at == 123.0
    store.update_instance(b.id, state="failed", exit_code=137, stopped_at=5.0, reason="killed")
    assert [i.id for i in store.instances(live_only=True)] == [a.id]
    assert {i.id for i in store.instances("web")} == {a.id, b.id}
    assert store.instances("db") == []
    with pytest.raises(KilnError, match="cannot update service"):
        store.update_instance(a.id, service="db")
    with pytest.raises(KilnError, match="no instance web-nope"):
        store.update_instance("web-nope", state="ready")
    with pytest.raises(KilnError, match="already exists"):
        store.add_instance("web", 1, port=1, id="web-fixed")
    assert store.services() == ["web"]


def test_events_paging(store: StateStore) -> None:
    first = store.emit("deploy", "web r1 started", service="web", revision=1, data={"n": 3})
    store.emit("instance", "web-1 ready", service="web", instance="web-1")
    store.emit("alarm", "db meltdown", service="db")
    assert first.id >= 1 and first.data == {"n": 3}
    all_events = store.events()
    assert [e.kind for e in all_events] == ["deploy", "instance", "alarm"]
    assert [e.kind for e in store.events(after_id=first.id)] == ["instance", "alarm"]
    assert len(store.events(limit=1)) == 1
    assert [e.message for e in store.events(service="db")] == ["db meltdown"]
    assert all_events[0].to_json()["data"] == {"n": 3}


def test_snapshot_and_state_hash(store: StateStore) -> None:
    _rev(store)
    store.set_revision_status("web", 1, "active")
    a = store.add_instance("web", 1, port=1)
    b = store.add_instance("web", 1, port=2)
    gone = store.add_instance("web", 1, port=3)
    store.update_instance(gone.id, state="stopped")
    h1 = store.state_hash()
    snap = store.snapshot()
    assert {i.id for i in snap.instances} == {a.id, b.id}
    assert snap.active == {"web": 1}
    assert snap.revision_of(snap.instances[0]) is not None
    store.update_instance(a.id, state="ready", ready_at=1.0)
    assert store.state_hash() == h1, "readiness does not make a plan stale"
    store.update_instance(b.id, state="failed")
    h2 = store.state_hash()
    assert h2 != h1
    assert b.id in {i.id for i in store.snapshot().instances}, "dead, not yet replaced"
    store.update_instance(b.id, replaced_by="web-new")
    assert b.id not in {i.id for i in store.snapshot().instances}
    with pytest.raises(AttributeError):
        snap.active = {}  # type: ignore[misc]


def test_recoveries_and_alarms(store: StateStore) -> None:
    store.record_recovery("web", "web-1", noticed=10.0, ready=11.5)
    [rec] = store.recoveries("web")
    assert rec.seconds == pytest.approx(1.5)
    first = store.raise_alarm("web", "meltdown", "3 died")
    again = store.raise_alarm("web", "meltdown", "4 died")
    assert again == first
    assert [a.kind for a in store.alarms()] == ["meltdown"]
    assert store.clear_alarm("web") == 1
    assert store.alarms("web") == []


def test_upgrade_from_v1_keeps_data(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    db = sqlite3.connect(path, isolation_level=None)
    migrate(db, target=1)
    db.execute(
        "INSERT INTO revisions (service, number, created, image_digest, config, config_hash, "
        "spec_text, spec_path, git_commit, environment, status, activated) "
        "VALUES ('web', 1, 1.0, 'sha256:aa', '{}', 'h', '', '', NULL, NULL, 'active', 1)"
    )
    db.execute(
        "INSERT INTO instances (id, service, revision, state, port, handle, created) "
        "VALUES ('web-1', 'web', 1, 'ready', 4000, NULL, 2.0)"
    )
    assert db.execute("SELECT version FROM schema_version").fetchone()[0] == 1
    db.close()
    with StateStore(path) as store:
        assert store.schema_version == SCHEMA_VERSION == len(MIGRATIONS)
        assert store.active_revision("web").reason is None  # type: ignore[union-attr]
        [inst] = store.instances()
        assert inst.id == "web-1" and inst.replaced_by is None
        store.record_recovery("web", "web-1", 1.0, 2.0)
        assert len(store.recoveries()) == 1


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "future.db"
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    db.execute("INSERT INTO schema_version VALUES (99)")
    db.close()
    with pytest.raises(KilnError, match="schema version 99, newer"):
        StateStore(path)


def test_killed_writer_leaves_store_consistent(tmp_path: Path) -> None:
    """A process killed mid-stream of commits leaves whole rows and a usable store."""
    path = tmp_path / "state.db"
    StateStore(path).close()
    script = (
        "import sys\nfrom pathlib import Path\nfrom kiln.deploy.state import StateStore\n"
        "s = StateStore(Path(sys.argv[1]))\n"
        "for i in range(100000):\n"
        "    s.next_revision('web', image_digest='sha256:x', config={'i': i}, config_hash='h')\n"
        "    if i == 20: print('go', flush=True)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(path)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "go"
    time.sleep(0.2)
    proc.kill()
    proc.wait()
    with StateStore(path) as store:
        revisions = store.revisions("web")
        assert len(revisions) > 20
        assert [r.number for r in revisions] == list(range(1, len(revisions) + 1))
        assert revisions[-1].config == {"i": len(revisions) - 1}
        assert store._db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert (
            store.next_revision("web", image_digest="sha256:y", config={}, config_hash="h").number
            == len(revisions) + 1
        )


def _hold_lock(path: str, ready: Any, release: Any) -> None:
    with StateStore(Path(path)) as store, store.lock("apply", purpose="kiln apply"):
        ready.set()
        release.wait(10)


def _race(path: str, start: Any, results: Any) -> None:
    store = StateStore(Path(path))
    start.wait(10)
    try:
        with store.lock("apply", purpose=f"racer {os.getpid()}"):
            results.put(("won", os.getpid()))
            time.sleep(0.5)
    except KilnError as e:
        results.put(("lost", str(e)))
    finally:
        store.close()


def test_lock_is_exclusive_between_processes(tmp_path: Path) -> None:
    path = str(tmp_path / "state.db")
    StateStore(Path(path)).close()
    ctx = multiprocessing.get_context("spawn")
    start, results = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(path, start, results)) for _ in range(4)]
    for p in procs:
        p.start()
    time.sleep(1.0)
    start.set()
    outcomes = [results.get(timeout=20) for _ in procs]
    for p in procs:
        p.join(10)
    winners = [o for o in outcomes if o[0] == "won"]
    losers = [o for o in outcomes if o[0] == "lost"]
    assert len(winners) == 1, outcomes
    assert len(losers) == 3
    for _, message in losers:
        assert message.startswith("another kiln apply holds the lock (pid ")
        assert "started 0s ago: racer " in message


def test_lock_message_wait_and_release(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    ctx = multiprocessing.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(str(path), ready, release))
    holder.start()
    try:
        assert ready.wait(20)
        with StateStore(path) as store:
            t0 = time.monotonic()
            with (
                pytest.raises(KilnError) as info,
                store.lock("apply", purpose="kiln apply", wait=0.3),
            ):
                pass
            assert time.monotonic() - t0 >= 0.3
            assert str(info.value) == (
                f"another kiln apply holds the lock (pid {holder.pid}, started 0s ago: kiln apply)"
            )
            release.set()
            with store.lock("apply", purpose="kiln apply", wait=10) as mine:
                assert store.lock_holder("apply") == mine
            assert store.lock_holder("apply") is None
    finally:
        release.set()
        holder.join(10)


def test_lock_of_dead_holder_is_taken_over(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    ctx = multiprocessing.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(str(path), ready, release))
    holder.start()
    assert ready.wait(20)
    holder.kill()
    holder.join(10)
    with StateStore(path) as store:
        stale = store.lock_holder("apply")
        assert stale is not None and stale.pid == holder.pid
        with store.lock("apply", purpose="kiln apply") as mine:
            assert mine.pid == os.getpid()


def test_database_and_its_journal_files_are_owner_only(tmp_path: Path) -> None:
    """Created 0600 whatever the umask; an older, looser database is tightened on open."""
    path = tmp_path / "new" / "state.db"
    old_umask = os.umask(0o022)
    try:
        with StateStore(path) as store:
            store.emit("deploy", "one")
            modes = {p.name: p.stat().st_mode & 0o777 for p in path.parent.iterdir()}
    finally:
        os.umask(old_umask)
    assert modes["state.db"] == 0o600 and modes["state.db-wal"] == 0o600, modes
    assert all(mode == 0o600 for mode in modes.values()), modes
    assert path.parent.stat().st_mode & 0o777 == 0o700
    path.chmod(0o644)
    StateStore(path).close()
    assert path.stat().st_mode & 0o777 == 0o600


def test_last_event_id(store: StateStore) -> None:
    assert store.last_event_id() == 0
    store.emit("deploy", "one")
    last = store.emit("deploy", "two")
    assert store.last_event_id() == last.id


def test_an_instance_transition_is_a_compare_and_set(store: StateStore) -> None:
    """Two owners racing for one instance: only the one that finds the state it
    expects wins, the other learns it lost (a start that lands after a retire)."""
    rec = store.add_instance("web", 1, port=41000)
    assert rec.state == "starting"
    retired = store.cas_instance(rec.id, ("starting", "ready"), state="stopped")
    assert retired is not None and retired.state == "stopped"
    assert store.cas_instance(rec.id, ("starting",), handle={"pid": 7}) is None
    assert store.instance(rec.id).handle is None
    with pytest.raises(KilnError, match="cannot update"):
        store.cas_instance(rec.id, ("stopped",), colour="red")
    with pytest.raises(KilnError, match="instance state"):
        store.cas_instance(rec.id, ("stopped",), state="exploded")


def test_events_are_indexed_and_pruned_by_age_and_count(store: StateStore) -> None:
    """Reading events by kind never scans history, and history does not grow forever;
    the facts the agent reads back at start (``keep``) are never pruned."""
    plan = store._db.execute(
        "EXPLAIN QUERY PLAN SELECT id FROM events WHERE id > 0 AND kind = 'x' ORDER BY id"
    ).fetchall()
    assert any("events_by_kind" in str(row) for row in plan), plan
    for i in range(50):
        store.emit("instance.ready", f"old {i}", "web")
    store.emit("alarm.cleared", "kept however old", "web")
    store._db.execute("UPDATE events SET ts = ts - 86400 * 60")
    for i in range(30):
        store.emit("instance.ready", f"new {i}", "web")
    gone = store.prune_events(30 * 86400, 20, frozenset({"alarm.cleared"}))
    assert gone == 50 + 10
    left = store.events(0, 1000)
    assert [e.message for e in left if e.kind == "instance.ready"] == [
        f"new {i}" for i in range(10, 30)
    ]
    assert [e.kind for e in left if e.kind == "alarm.cleared"] == ["alarm.cleared"]


def test_the_working_set_never_reads_history(store: StateStore) -> None:
    """Issue 8, defect 5: the agent's decisions read the live instances and the recent
    dead ones, found through an index, however many instances were ever created."""
    store.next_revision("web", image_digest="sha256:" + "a" * 64, config={}, config_hash="h")
    now = time.time()
    for n in range(3000):
        rec = store.add_instance("web", 1, port=8080, id=f"web-old{n:05d}")
        store.update_instance(rec.id, state="stopped", stopped_at=now - 86400)
    dead = store.add_instance("web", 1, port=8080, id="web-dead0000")
    store.update_instance(dead.id, state="failed", stopped_at=now - 5)
    replaced = store.add_instance("web", 1, port=8080, id="web-gone0000", replaces=dead.id)
    store.update_instance(replaced.id, state="ready")
    old_dead = store.add_instance("web", 1, port=8080, id="web-dead0001")
    store.update_instance(old_dead.id, state="failed", stopped_at=now - 7200, replaced_by="x")
    found = {r.id for r in store.working_set("web", now - 600)}
    assert found == {"web-dead0000", "web-gone0000"}
    assert store.instance("web-dead0000").replaced_by == "web-gone0000", "linked in one write"
    db = sqlite3.connect(store.path)
    live = ",".join("?" * 6)
    plan = db.execute(
        "EXPLAIN QUERY PLAN SELECT id FROM instances WHERE service = ? AND ("
        f"state IN ({live}) OR (state IN ('failed', 'lost') AND "
        "(replaced_by IS NULL OR stopped_at >= ?)))",
        ("web", "pending", "starting", "ready", "unhealthy", "draining", "stopping", now),
    ).fetchall()
    db.close()
    details = " ".join(str(row[-1]) for row in plan)
    assert "USING INDEX" in details and "SCAN instances" not in details, details


def test_deployments_and_rollouts_survive_a_reopen(store: StateStore, tmp_path: Path) -> None:
    from kiln.deploy.state import RolloutRecord

    record = {
        "id": "d-1234abcd",
        "started": 1.0,
        "finished": None,
        "outcome": "running",
        "summary": "1 to add",
        "services": {"web": {"revision": 2, "outcome": "running"}},
    }
    store.put_deployment(record)
    named, destroyed = frozenset({"a", "b"}), frozenset({"b"})
    store.put_rollout(
        RolloutRecord("web", "d-1234abcd", 2, "deploy", None, 1.0, 0, named, destroyed)
    )
    store.rollout_step("web", 2, 3)
    store.reset_breaker("web", 5.0)
    again = StateStore(store.path)
    try:
        assert again.deployment("d-1234abcd") == record
        assert again.rollouts() == [
            RolloutRecord("web", "d-1234abcd", 2, "deploy", None, 1.0, 3, named, destroyed)
        ]
        assert again.breaker_resets() == {"web": 5.0}
        again.end_rollout("web", 2)
        assert again.rollouts() == []
        assert again.deployment("d-missing") is None
    finally:
        again.close()


def test_an_event_with_nan_or_infinity_is_stored_as_null_and_stays_readable(
    store: StateStore,
) -> None:
    store.emit("x.y", "odd numbers", data={"a": float("inf"), "b": [float("nan"), 1.5]})
    [event] = [e for e in store.events() if e.kind == "x.y"]
    assert event.data == {"a": None, "b": [None, 1.5]}
    json.dumps(event.to_json(), allow_nan=False)
