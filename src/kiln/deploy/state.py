"""The agent's memory: revisions, instances, events and locks in one SQLite file.

Every public method is one transaction (``BEGIN IMMEDIATE`` … ``COMMIT``), so a
crash at any point leaves either the old or the new state, never a mix. WAL
mode lets the CLI read while the agent writes; ``synchronous=FULL`` because a
lost commit here would mean a forgotten instance, and the write rate is low.

The planner and the reconciler never see this class: they get a
:class:`StateSnapshot`, an immutable view taken in one read transaction.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, cast, get_args

from kiln.errors import KilnError
from kiln.image.digest import canonical_json, sha256_hex
from kiln.paths import open_private, private_dirs
from kiln.process import pid_alive

__all__ = [
    "DEAD_STATES",
    "LIVE_STATES",
    "SCHEMA_VERSION",
    "Alarm",
    "Event",
    "InstanceRecord",
    "InstanceState",
    "LockHolder",
    "Recovery",
    "Revision",
    "RevisionStatus",
    "RolloutRecord",
    "StateSnapshot",
    "StateStore",
    "new_instance_id",
]

RevisionStatus = Literal["pending", "active", "superseded", "failed", "rolled_back"]
InstanceState = Literal[
    "pending",
    "starting",
    "ready",
    "unhealthy",
    "draining",
    "stopping",
    "stopped",
    "failed",
    "lost",
]
REVISION_STATUSES: frozenset[str] = frozenset(get_args(RevisionStatus))
INSTANCE_STATES: frozenset[str] = frozenset(get_args(InstanceState))
LIVE_STATES: frozenset[str] = frozenset(
    {"pending", "starting", "ready", "unhealthy", "draining", "stopping"}
)
"""States in which a process may still run (the runtime owns something), or is about to."""
DEAD_STATES: frozenset[str] = frozenset({"failed", "lost"})
"""States of instances that died instead of being retired; they want a replacement."""


def new_instance_id(service: str) -> str:
    """``web-7f3a9c2e``: short enough to read, random enough to never repeat."""
    return f"{service}-{secrets.token_hex(4)}"


@dataclass(frozen=True)
class Revision:
    service: str
    number: int
    created: float
    image_digest: str
    config: dict[str, Any]
    config_hash: str
    spec_text: str
    spec_path: str
    git_commit: str | None
    environment: str | None
    status: RevisionStatus
    reason: str | None = None
    activated: int | None = None
    """Order in which revisions became active (higher = later); None if never active."""

    @property
    def label(self) -> str:
        return f"r{self.number}"

    def to_json(self) -> dict[str, Any]:
        return {
            "service": self.service,
            "number": self.number,
            "created": self.created,
            "image_digest": self.image_digest,
            "config": self.config,
            "config_hash": self.config_hash,
            "spec_path": self.spec_path,
            "git_commit": self.git_commit,
            "environment": self.environment,
            "status": self.status,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class InstanceRecord:
    id: str
    service: str
    revision: int
    state: InstanceState
    port: int | None
    handle: dict[str, Any] | None
    created: float
    ready_at: float | None = None
    stopped_at: float | None = None
    exit_code: int | None = None
    reason: str | None = None
    replaced_by: str | None = None
    """Set when the agent has started (or decided against) a replacement for a dead one."""
    deployment: str | None = None
    """The deployment whose rollout started it (None for the reconciler's)."""
    replaces: str | None = None
    """The dead or unhealthy instance this one replaces (retired once this one is ready)."""
    noticed: float | None = None
    """When the agent noticed that this instance died or turned unhealthy."""
    touched: float | None = None
    """When a human first ran a command in it (``kiln exec``): it may have drifted."""
    quarantined_until: float | None = None
    """Frozen in quarantine until then; an agent restarted before keeps the window."""

    @property
    def live(self) -> bool:
        return self.state in LIVE_STATES

    @property
    def dead(self) -> bool:
        return self.state in DEAD_STATES

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "service": self.service,
            "revision": self.revision,
            "state": self.state,
            "port": self.port,
            "handle": self.handle,
            "created": self.created,
            "ready_at": self.ready_at,
            "stopped_at": self.stopped_at,
            "exit_code": self.exit_code,
            "reason": self.reason,
            "replaced_by": self.replaced_by,
            "deployment": self.deployment,
            "replaces": self.replaces,
            "noticed": self.noticed,
            "touched": self.touched,
            "quarantined_until": self.quarantined_until,
        }


@dataclass(frozen=True)
class RolloutRecord:
    """A rollout in flight, as the agent resumes it after a restart."""

    service: str
    deployment: str | None
    target: int
    kind: str
    undoing: int | None
    started: float
    step: int = 0
    named: frozenset[str] | None = None
    """The instances the applied plan replaces or destroys (None: by revision, as a
    rollback does); the rollout retires exactly these."""
    destroyed: frozenset[str] = frozenset()
    """Those of ``named`` the plan destroys without a replacement (a scale-down)."""


@dataclass(frozen=True)
class Event:
    id: int
    ts: float
    kind: str
    service: str | None
    instance: str | None
    revision: int | None
    message: str
    data: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "ts": self.ts,
            "kind": self.kind,
            "service": self.service,
            "instance": self.instance,
            "revision": self.revision,
            "message": self.message,
            "data": self.data,
        }


@dataclass(frozen=True)
class Recovery:
    """How long a dead instance took to be replaced by a ready one (the bench reads these)."""

    service: str
    instance: str
    noticed: float
    ready: float

    @property
    def seconds(self) -> float:
        return self.ready - self.noticed


@dataclass(frozen=True)
class Alarm:
    service: str
    kind: str
    message: str
    raised: float


@dataclass(frozen=True)
class LockHolder:
    name: str
    pid: int
    hostname: str
    purpose: str
    acquired: float
    token: str


@dataclass(frozen=True)
class StateSnapshot:
    """Everything the planner reads, frozen at one instant.

    ``instances`` holds live instances and dead ones nobody has replaced yet;
    ``revisions`` holds every revision those reference plus each service's
    active one, keyed by ``(service, number)``.
    """

    instances: tuple[InstanceRecord, ...] = ()
    revisions: Mapping[tuple[str, int], Revision] = field(default_factory=dict)
    active: Mapping[str, int] = field(default_factory=dict)
    stopped: frozenset[str] = frozenset()
    """Services with no active revision because ``kiln stop`` (or ``kiln down``) stopped it."""

    @property
    def services(self) -> tuple[str, ...]:
        names = {i.service for i in self.instances} | set(self.active)
        return tuple(sorted(names))

    def instances_of(self, service: str) -> tuple[InstanceRecord, ...]:
        return tuple(i for i in self.instances if i.service == service)

    def revision_of(self, instance: InstanceRecord) -> Revision | None:
        return self.revisions.get((instance.service, instance.revision))

    def active_revision(self, service: str) -> Revision | None:
        number = self.active.get(service)
        return None if number is None else self.revisions.get((service, number))

    @property
    def state_hash(self) -> str:
        """What a saved plan was made against: which instances run which config.

        Readiness is left out on purpose (an instance turning ready does not
        change what a plan must do); an instance dying or appearing does.
        """
        items = []
        for inst in sorted(self.instances, key=lambda i: i.id):
            rev = self.revision_of(inst)
            items.append(
                [
                    inst.id,
                    inst.service,
                    inst.revision,
                    rev.config_hash if rev else None,
                    "dead" if inst.dead else "live",
                ]
            )
        active = {s: self.revisions[(s, n)].config_hash for s, n in sorted(self.active.items())}
        return "sha256:" + sha256_hex(canonical_json({"instances": items, "active": active}))


_Migration = Callable[[sqlite3.Connection], None]


def _script(db: sqlite3.Connection, sql: str) -> None:
    """``executescript`` would COMMIT first; a migration must stay in its transaction."""
    for statement in sql.split(";"):
        if statement.strip():
            db.execute(statement)


def _v1(db: sqlite3.Connection) -> None:
    _script(
        db,
        """
        CREATE TABLE revisions (
            service TEXT NOT NULL,
            number INTEGER NOT NULL,
            created REAL NOT NULL,
            image_digest TEXT NOT NULL,
            config TEXT NOT NULL,
            config_hash TEXT NOT NULL,
            spec_text TEXT NOT NULL,
            spec_path TEXT NOT NULL,
            git_commit TEXT,
            environment TEXT,
            status TEXT NOT NULL,
            activated INTEGER,
            PRIMARY KEY (service, number)
        );
        CREATE TABLE instances (
            id TEXT PRIMARY KEY,
            service TEXT NOT NULL,
            revision INTEGER NOT NULL,
            state TEXT NOT NULL,
            port INTEGER,
            handle TEXT,
            created REAL NOT NULL,
            ready_at REAL,
            stopped_at REAL,
            exit_code INTEGER,
            reason TEXT
        );
        CREATE INDEX instances_by_service ON instances (service, state);
        CREATE TABLE events (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            ts REAL NOT NULL,
            kind TEXT NOT NULL,
            service TEXT,
            instance TEXT,
            revision INTEGER,
            message TEXT NOT NULL,
            data TEXT NOT NULL
        );
        CREATE TABLE locks (
            name TEXT PRIMARY KEY,
            pid INTEGER NOT NULL,
            hostname TEXT NOT NULL,
            purpose TEXT NOT NULL,
            acquired REAL NOT NULL,
            token TEXT NOT NULL
        );
        """,
    )


def _v2(db: sqlite3.Connection) -> None:
    _script(
        db,
        """
        ALTER TABLE revisions ADD COLUMN reason TEXT;
        ALTER TABLE instances ADD COLUMN replaced_by TEXT;
        CREATE TABLE recoveries (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            service TEXT NOT NULL,
            instance TEXT NOT NULL,
            noticed REAL NOT NULL,
            ready REAL NOT NULL
        );
        CREATE TABLE alarms (
            service TEXT NOT NULL,
            kind TEXT NOT NULL,
            message TEXT NOT NULL,
            raised REAL NOT NULL,
            PRIMARY KEY (service, kind)
        );
        """,
    )


def _v3(db: sqlite3.Connection) -> None:
    """Reads of events by kind, service or age use an index, not a scan of history."""
    _script(
        db,
        """
        CREATE INDEX events_by_kind ON events (kind, id);
        CREATE INDEX events_by_service ON events (service, id);
        CREATE INDEX events_by_ts ON events (ts);
        """,
    )


def _v4(db: sqlite3.Connection) -> None:
    """Facts the agent used to keep in memory or in side files, so a restart at any
    moment continues exactly: deployments, in-flight rollouts and their step, which
    instance replaces which, the breaker's reset."""
    _script(
        db,
        """
        ALTER TABLE instances ADD COLUMN deployment TEXT;
        ALTER TABLE instances ADD COLUMN replaces TEXT;
        ALTER TABLE instances ADD COLUMN noticed REAL;
        CREATE INDEX instances_by_state ON instances (state, service);
        CREATE INDEX instances_by_age ON instances (service, state, stopped_at);
        CREATE TABLE deployments (
            id TEXT PRIMARY KEY,
            started REAL NOT NULL,
            finished REAL,
            outcome TEXT NOT NULL,
            summary TEXT NOT NULL,
            services TEXT NOT NULL
        );
        CREATE INDEX deployments_by_start ON deployments (started);
        CREATE TABLE rollouts (
            service TEXT PRIMARY KEY,
            deployment TEXT,
            target INTEGER NOT NULL,
            kind TEXT NOT NULL,
            undoing INTEGER,
            started REAL NOT NULL,
            step INTEGER NOT NULL,
            updated REAL NOT NULL,
            named TEXT
        );
        CREATE TABLE breakers (
            service TEXT PRIMARY KEY,
            reset_at REAL NOT NULL
        );
        """,
    )


def _v5(db: sqlite3.Connection) -> None:
    """``kiln exec`` marks the instance it ran in: a human shell in an immutable
    instance is drift, shown in status and replaced first by ``kiln restart``."""
    _script(db, "ALTER TABLE instances ADD COLUMN touched REAL;")


def _v6(db: sqlite3.Connection) -> None:
    """A quarantine window is kept across an agent restart: the frozen instance stays
    until its deadline instead of being retired by the next agent."""
    _script(db, "ALTER TABLE instances ADD COLUMN quarantined_until REAL;")


MIGRATIONS: tuple[_Migration, ...] = (_v1, _v2, _v3, _v4, _v5, _v6)
"""Append only: migration ``i`` takes the schema from version ``i`` to ``i + 1``."""
SCHEMA_VERSION = len(MIGRATIONS)

_INSTANCE_FIELDS = frozenset(
    {
        "state",
        "port",
        "handle",
        "ready_at",
        "stopped_at",
        "exit_code",
        "reason",
        "replaced_by",
        "deployment",
        "replaces",
        "noticed",
        "touched",
        "quarantined_until",
    }
)
_REVISION_COLS = (
    "service, number, created, image_digest, config, config_hash, spec_text, spec_path, "
    "git_commit, environment, status, reason, activated"
)
_INSTANCE_COLS = (
    "id, service, revision, state, port, handle, created, ready_at, stopped_at, exit_code, "
    "reason, replaced_by, deployment, replaces, noticed, touched, quarantined_until"
)


def migrate(db: sqlite3.Connection, target: int = SCHEMA_VERSION) -> int:
    """Bring the schema to ``target``, one migration per transaction; returns the old version."""
    db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    row = db.execute("SELECT version FROM schema_version").fetchone()
    start = 0 if row is None else int(row[0])
    if start > SCHEMA_VERSION:
        raise KilnError(
            f"state.db has schema version {start}, newer than this kiln knows "
            f"({SCHEMA_VERSION}); upgrade kiln"
        )
    for version in range(start, target):
        db.execute("BEGIN IMMEDIATE")
        try:
            current = db.execute("SELECT version FROM schema_version").fetchone()
            if (0 if current is None else int(current[0])) == version:
                MIGRATIONS[version](db)
                db.execute("DELETE FROM schema_version")
                db.execute("INSERT INTO schema_version (version) VALUES (?)", (version + 1,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
    return start


def _create_private(path: Path) -> None:
    """The database and its ``-wal``/``-shm`` files are 0600: SQLite gives the journal
    files the database's own mode, so creating the database 0600 first is enough
    (and tightens those of a home made by an older Kiln)."""
    private_dirs(path.parent)
    os.close(open_private(path, os.O_RDWR))
    for suffix in ("-wal", "-shm", "-journal"):
        journal = path.with_name(path.name + suffix)
        if journal.exists():
            os.close(open_private(journal, os.O_RDONLY))


class StateStore:
    """One SQLite database (``KILN_HOME/state.db``); safe to share between threads."""

    def __init__(self, path: Path, *, busy_timeout: float = 10.0) -> None:
        self.path = Path(path)
        self._mutex = threading.RLock()
        try:
            _create_private(self.path)
            self._db = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=busy_timeout
            )
            self._db.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = FULL")
            self._db.execute("PRAGMA foreign_keys = ON")
            with self._mutex:
                migrate(self._db)
        except (sqlite3.DatabaseError, OSError) as e:
            raise KilnError(f"{self.path}: cannot open the state database: {e}") from e

    def close(self) -> None:
        with self._mutex:
            self._db.close()

    def __enter__(self) -> StateStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def schema_version(self) -> int:
        row = self._db.execute("SELECT version FROM schema_version").fetchone()
        return int(row[0])

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._mutex:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._mutex:
            self._db.execute("BEGIN")
            try:
                yield self._db
            finally:
                self._db.execute("COMMIT")

    # revisions

    def next_revision(
        self,
        service: str,
        *,
        image_digest: str,
        config: dict[str, Any],
        config_hash: str,
        spec_text: str = "",
        spec_path: str = "",
        git_commit: str | None = None,
        environment: str | None = None,
        status: RevisionStatus = "pending",
        reason: str | None = None,
    ) -> Revision:
        _check(status, REVISION_STATUSES, "revision status")
        with self._write() as db:
            row = db.execute(
                "SELECT COALESCE(MAX(number), 0) FROM revisions WHERE service = ?", (service,)
            ).fetchone()
            number = int(row[0]) + 1
            activated = _next_activation(db) if status == "active" else None
            if status == "active":
                _supersede_active(db, service)
            db.execute(
                f"INSERT INTO revisions ({_REVISION_COLS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    service,
                    number,
                    time.time(),
                    image_digest,
                    json.dumps(config, sort_keys=True),
                    config_hash,
                    spec_text,
                    spec_path,
                    git_commit,
                    environment,
                    status,
                    reason,
                    activated,
                ),
            )
            return _revision_row(
                db.execute(
                    f"SELECT {_REVISION_COLS} FROM revisions WHERE service = ? AND number = ?",
                    (service, number),
                ).fetchone()
            )

    def revisions(self, service: str) -> list[Revision]:
        with self._read() as db:
            rows = db.execute(
                f"SELECT {_REVISION_COLS} FROM revisions WHERE service = ? ORDER BY number",
                (service,),
            ).fetchall()
        return [_revision_row(r) for r in rows]

    def revision(self, service: str, number: int) -> Revision:
        with self._read() as db:
            row = db.execute(
                f"SELECT {_REVISION_COLS} FROM revisions WHERE service = ? AND number = ?",
                (service, number),
            ).fetchone()
        if row is None:
            raise KilnError(f"service {service!r} has no revision r{number}")
        return _revision_row(row)

    def set_revision_status(
        self,
        service: str,
        number: int,
        status: RevisionStatus,
        reason: str | None = None,
        *,
        previous_becomes: RevisionStatus = "superseded",
    ) -> Revision:
        """Making one revision ``active`` moves the previous active one to ``previous_becomes``.

        A rollback passes ``previous_becomes="rolled_back"`` so both changes are one commit.
        """
        _check(status, REVISION_STATUSES, "revision status")
        _check(previous_becomes, REVISION_STATUSES, "revision status")
        with self._write() as db:
            if not db.execute(
                "SELECT 1 FROM revisions WHERE service = ? AND number = ?", (service, number)
            ).fetchone():
                raise KilnError(f"service {service!r} has no revision r{number}")
            if status == "active":
                _supersede_active(db, service, keep=number, becomes=previous_becomes)
                db.execute(
                    "UPDATE revisions SET status = 'active', reason = ?, activated = ? "
                    "WHERE service = ? AND number = ? AND status != 'active'",
                    (reason, _next_activation(db), service, number),
                )
            else:
                db.execute(
                    "UPDATE revisions SET status = ?, reason = ? WHERE service = ? AND number = ?",
                    (status, reason, service, number),
                )
            row = db.execute(
                f"SELECT {_REVISION_COLS} FROM revisions WHERE service = ? AND number = ?",
                (service, number),
            ).fetchone()
        return _revision_row(row)

    def active_revision(self, service: str) -> Revision | None:
        with self._read() as db:
            row = db.execute(
                f"SELECT {_REVISION_COLS} FROM revisions WHERE service = ? AND status = 'active'",
                (service,),
            ).fetchone()
        return None if row is None else _revision_row(row)

    def previous_good_revision(self, service: str) -> Revision | None:
        """The revision that was active just before the current one, and left it cleanly.

        Revisions that were rolled back from or failed are skipped, so two
        rollbacks in a row do not bounce back to the revision just undone.
        """
        with self._read() as db:
            row = db.execute(
                f"SELECT {_REVISION_COLS} FROM revisions WHERE service = ? "
                "AND status = 'superseded' AND activated IS NOT NULL "
                "ORDER BY activated DESC LIMIT 1",
                (service,),
            ).fetchone()
        return None if row is None else _revision_row(row)

    # instances

    def add_instance(
        self,
        service: str,
        revision: int,
        *,
        port: int | None,
        id: str | None = None,
        handle: dict[str, Any] | None = None,
        state: InstanceState = "starting",
        created: float | None = None,
        deployment: str | None = None,
        replaces: str | None = None,
    ) -> InstanceRecord:
        """With ``replaces``, the replaced instance's ``replaced_by`` is set in the same
        transaction: a crash can never leave a replacement without its link."""
        _check(state, INSTANCE_STATES, "instance state")
        instance_id = id or new_instance_id(service)
        with self._write() as db:
            try:
                db.execute(
                    "INSERT INTO instances (id, service, revision, state, port, handle, created, "
                    "deployment, replaces) VALUES (?,?,?,?,?,?,?,?,?)",
                    (
                        instance_id,
                        service,
                        revision,
                        state,
                        port,
                        None if handle is None else json.dumps(handle, sort_keys=True),
                        time.time() if created is None else created,
                        deployment,
                        replaces,
                    ),
                )
                if replaces is not None:
                    db.execute(
                        "UPDATE instances SET replaced_by = ? WHERE id = ?",
                        (instance_id, replaces),
                    )
            except sqlite3.IntegrityError as e:
                raise KilnError(f"instance {instance_id} already exists in {self.path}") from e
            return _instance_row(
                db.execute(
                    f"SELECT {_INSTANCE_COLS} FROM instances WHERE id = ?", (instance_id,)
                ).fetchone()
            )

    def update_instance(self, id: str, **fields: Any) -> InstanceRecord:
        unknown = set(fields) - _INSTANCE_FIELDS
        if unknown:
            raise KilnError(f"instance {id}: cannot update {', '.join(sorted(unknown))}")
        if "state" in fields:
            _check(fields["state"], INSTANCE_STATES, "instance state")
        values = {
            k: (json.dumps(v, sort_keys=True) if k == "handle" and v is not None else v)
            for k, v in fields.items()
        }
        with self._write() as db:
            if values:
                assignments = ", ".join(f"{k} = ?" for k in values)
                db.execute(
                    f"UPDATE instances SET {assignments} WHERE id = ?", (*values.values(), id)
                )
            row = db.execute(
                f"SELECT {_INSTANCE_COLS} FROM instances WHERE id = ?", (id,)
            ).fetchone()
            if row is None:
                raise KilnError(f"no instance {id} in {self.path}")
            return _instance_row(row)

    def cas_instance(
        self, id: str, expect: tuple[str, ...], **fields: Any
    ) -> InstanceRecord | None:
        """``update_instance`` only while the instance is in one of ``expect`` states: a
        compare-and-set, so two owners can never both win a transition. None if it was
        not (someone else moved it first)."""
        unknown = set(fields) - _INSTANCE_FIELDS
        if unknown or not fields:
            raise KilnError(f"instance {id}: cannot update {', '.join(sorted(unknown)) or '()'}")
        if "state" in fields:
            _check(fields["state"], INSTANCE_STATES, "instance state")
        values = {
            k: (json.dumps(v, sort_keys=True) if k == "handle" and v is not None else v)
            for k, v in fields.items()
        }
        marks = ", ".join("?" for _ in expect)
        with self._write() as db:
            assignments = ", ".join(f"{k} = ?" for k in values)
            cursor = db.execute(
                f"UPDATE instances SET {assignments} WHERE id = ? AND state IN ({marks})",
                (*values.values(), id, *expect),
            )
            if cursor.rowcount == 0:
                return None
            row = db.execute(
                f"SELECT {_INSTANCE_COLS} FROM instances WHERE id = ?", (id,)
            ).fetchone()
            return _instance_row(row)

    def instance(self, id: str) -> InstanceRecord:
        with self._read() as db:
            row = db.execute(
                f"SELECT {_INSTANCE_COLS} FROM instances WHERE id = ?", (id,)
            ).fetchone()
        if row is None:
            raise KilnError(f"no instance {id} in {self.path}")
        return _instance_row(row)

    def working_set(self, service: str, since: float) -> list[InstanceRecord]:
        """What the agent's decisions read, never all of history: the live instances,
        and the dead ones not yet replaced or that died after ``since`` (the breaker's
        window). Served by the (service, state, stopped_at) index."""
        live = sorted(LIVE_STATES)
        query = (
            f"SELECT {_INSTANCE_COLS} FROM instances WHERE service = ? AND ("
            f"state IN ({','.join('?' * len(live))}) OR (state IN ('failed', 'lost') AND "
            "(replaced_by IS NULL OR stopped_at >= ?))) ORDER BY created, id"
        )
        with self._read() as db:
            rows = db.execute(query, (service, *live, since)).fetchall()
        return [_instance_row(r) for r in rows]

    def instances(
        self, service: str | None = None, live_only: bool = False
    ) -> list[InstanceRecord]:
        query = f"SELECT {_INSTANCE_COLS} FROM instances WHERE 1=1"
        args: list[Any] = []
        if service is not None:
            query += " AND service = ?"
            args.append(service)
        if live_only:
            query += f" AND state IN ({','.join('?' * len(LIVE_STATES))})"
            args.extend(sorted(LIVE_STATES))
        with self._read() as db:
            rows = db.execute(query + " ORDER BY created, id", args).fetchall()
        return [_instance_row(r) for r in rows]

    # events

    def emit(
        self,
        kind: str,
        message: str,
        service: str | None = None,
        instance: str | None = None,
        revision: int | None = None,
        data: dict[str, Any] | None = None,
    ) -> Event:
        ts = time.time()
        payload = _finite(data or {})
        with self._write() as db:
            cur = db.execute(
                "INSERT INTO events (ts, kind, service, instance, revision, message, data) "
                "VALUES (?,?,?,?,?,?,?)",
                (
                    ts,
                    kind,
                    service,
                    instance,
                    revision,
                    message,
                    json.dumps(payload, sort_keys=True),
                ),
            )
            event_id = int(cast(int, cur.lastrowid))
        return Event(event_id, ts, kind, service, instance, revision, message, payload)

    def events(
        self,
        after_id: int = 0,
        limit: int = 1000,
        service: str | None = None,
        kind: str | None = None,
    ) -> list[Event]:
        query = "SELECT id, ts, kind, service, instance, revision, message, data FROM events "
        query += "WHERE id > ?"
        args: list[Any] = [after_id]
        if service is not None:
            query += " AND service = ?"
            args.append(service)
        if kind is not None:
            query += " AND kind = ?"
            args.append(kind)
        with self._read() as db:
            rows = db.execute(query + " ORDER BY id LIMIT ?", (*args, limit)).fetchall()
        return [
            Event(int(r[0]), float(r[1]), r[2], r[3], r[4], r[5], r[6], json.loads(r[7]))
            for r in rows
        ]

    def prune_events(self, max_age: float, max_count: int, keep: frozenset[str]) -> int:
        """Drop events older than ``max_age`` seconds, then the oldest beyond ``max_count``;
        the ``keep`` kinds (facts the agent reads back at start) are never dropped.
        Returns how many went."""
        marks = ", ".join("?" for _ in keep) or "''"
        with self._write() as db:
            gone = db.execute(
                f"DELETE FROM events WHERE ts < ? AND kind NOT IN ({marks})",
                (time.time() - max_age, *keep),
            ).rowcount
            row = db.execute(
                f"SELECT id FROM events WHERE kind NOT IN ({marks}) "
                "ORDER BY id DESC LIMIT 1 OFFSET ?",
                (*keep, max(max_count, 0)),
            ).fetchone()
            if row is not None:
                gone += db.execute(
                    f"DELETE FROM events WHERE id <= ? AND kind NOT IN ({marks})",
                    (row[0], *keep),
                ).rowcount
        return int(gone)

    def last_event_id(self) -> int:
        """The newest event's id (0 when there is none): where a follower starts."""
        with self._read() as db:
            row = db.execute("SELECT max(id) FROM events").fetchone()
        return int(row[0] or 0)

    # whole-state views

    def services(self) -> list[str]:
        with self._read() as db:
            rows = db.execute(
                "SELECT service FROM revisions UNION SELECT service FROM instances ORDER BY 1"
            ).fetchall()
        return [r[0] for r in rows]

    def snapshot(self) -> StateSnapshot:
        with self._read() as db:
            rows = db.execute(
                f"SELECT {_INSTANCE_COLS} FROM instances WHERE state IN "
                f"({','.join('?' * len(LIVE_STATES))}) "
                f"OR (state IN ('failed', 'lost') AND replaced_by IS NULL) ORDER BY created, id",
                sorted(LIVE_STATES),
            ).fetchall()
            instances = tuple(_instance_row(r) for r in rows)
            revision_rows = db.execute(
                f"SELECT {_REVISION_COLS} FROM revisions WHERE status = 'active' OR "
                "(service, number) IN (SELECT service, revision FROM instances WHERE "
                f"state IN ({','.join('?' * len(LIVE_STATES))}) "
                "OR (state IN ('failed', 'lost') AND replaced_by IS NULL))",
                sorted(LIVE_STATES),
            ).fetchall()
            # As kiln start chooses: the newest revision, or the one active last, stopped.
            stopped_rows = db.execute(
                "SELECT DISTINCT r.service FROM revisions r WHERE r.status = 'superseded' "
                "AND r.reason IN ('kiln stop', 'kiln down') AND ("
                "r.number = (SELECT MAX(number) FROM revisions WHERE service = r.service) OR "
                "r.activated = (SELECT MAX(activated) FROM revisions WHERE service = r.service))"
            ).fetchall()
        revisions = {(r.service, r.number): r for r in map(_revision_row, revision_rows)}
        active = {r.service: r.number for r in revisions.values() if r.status == "active"}
        stopped = frozenset(row[0] for row in stopped_rows) - set(active)
        return StateSnapshot(
            instances=instances, revisions=revisions, active=active, stopped=stopped
        )

    def state_hash(self) -> str:
        return self.snapshot().state_hash

    # recoveries and alarms

    def record_recovery(self, service: str, instance: str, noticed: float, ready: float) -> None:
        with self._write() as db:
            db.execute(
                "INSERT INTO recoveries (service, instance, noticed, ready) VALUES (?,?,?,?)",
                (service, instance, noticed, ready),
            )

    def recoveries(self, service: str | None = None) -> list[Recovery]:
        query = "SELECT service, instance, noticed, ready FROM recoveries"
        args: tuple[Any, ...] = ()
        if service is not None:
            query += " WHERE service = ?"
            args = (service,)
        with self._read() as db:
            rows = db.execute(query + " ORDER BY id", args).fetchall()
        return [Recovery(r[0], r[1], float(r[2]), float(r[3])) for r in rows]

    def raise_alarm(self, service: str, kind: str, message: str) -> Alarm:
        """Idempotent: a standing alarm keeps its first time and message."""
        with self._write() as db:
            db.execute(
                "INSERT OR IGNORE INTO alarms (service, kind, message, raised) VALUES (?,?,?,?)",
                (service, kind, message, time.time()),
            )
            row = db.execute(
                "SELECT service, kind, message, raised FROM alarms WHERE service = ? AND kind = ?",
                (service, kind),
            ).fetchone()
        return Alarm(row[0], row[1], row[2], float(row[3]))

    def clear_alarm(self, service: str, kind: str | None = None) -> int:
        with self._write() as db:
            if kind is None:
                cur = db.execute("DELETE FROM alarms WHERE service = ?", (service,))
            else:
                cur = db.execute(
                    "DELETE FROM alarms WHERE service = ? AND kind = ?", (service, kind)
                )
            return int(cur.rowcount)

    def alarms(self, service: str | None = None) -> list[Alarm]:
        query = "SELECT service, kind, message, raised FROM alarms"
        args: tuple[Any, ...] = ()
        if service is not None:
            query += " WHERE service = ?"
            args = (service,)
        with self._read() as db:
            rows = db.execute(query + " ORDER BY raised", args).fetchall()
        return [Alarm(r[0], r[1], r[2], float(r[3])) for r in rows]

    # deployments, rollouts, breakers

    def put_deployment(self, record: Mapping[str, Any]) -> None:
        with self._write() as db:
            db.execute(
                "INSERT INTO deployments (id, started, finished, outcome, summary, services) "
                "VALUES (?,?,?,?,?,?) ON CONFLICT (id) DO UPDATE SET finished = excluded.finished, "
                "outcome = excluded.outcome, summary = excluded.summary, "
                "services = excluded.services",
                (
                    str(record["id"]),
                    float(record["started"]),
                    record.get("finished"),
                    str(record["outcome"]),
                    str(record.get("summary") or ""),
                    json.dumps(record.get("services") or {}, sort_keys=True),
                ),
            )

    def deployment(self, id: str) -> dict[str, Any] | None:
        with self._read() as db:
            row = db.execute(
                "SELECT id, started, finished, outcome, summary, services FROM deployments "
                "WHERE id = ?",
                (id,),
            ).fetchone()
        if row is None:
            return None
        return {
            "id": row[0],
            "started": row[1],
            "finished": row[2],
            "outcome": row[3],
            "summary": row[4],
            "services": json.loads(row[5]),
        }

    def put_rollout(self, rollout: RolloutRecord) -> None:
        """One row per service: a new rollout (a rollback, an auto-rollback) replaces it."""
        with self._write() as db:
            db.execute(
                "INSERT OR REPLACE INTO rollouts (service, deployment, target, kind, undoing, "
                "started, step, updated, named) VALUES (?,?,?,?,?,?,?,?,?)",
                (
                    rollout.service,
                    rollout.deployment,
                    rollout.target,
                    rollout.kind,
                    rollout.undoing,
                    rollout.started,
                    rollout.step,
                    time.time(),
                    _named_json(rollout),
                ),
            )

    def rollout_step(self, service: str, target: int, step: int) -> None:
        with self._write() as db:
            db.execute(
                "UPDATE rollouts SET step = ?, updated = ? WHERE service = ? AND target = ?",
                (step, time.time(), service, target),
            )

    def end_rollout(self, service: str, target: int) -> None:
        with self._write() as db:
            db.execute("DELETE FROM rollouts WHERE service = ? AND target = ?", (service, target))

    def rollouts(self) -> list[RolloutRecord]:
        with self._read() as db:
            rows = db.execute(
                "SELECT service, deployment, target, kind, undoing, started, step, named "
                "FROM rollouts ORDER BY started"
            ).fetchall()
        return [
            RolloutRecord(
                r[0],
                r[1],
                int(r[2]),
                r[3],
                r[4],
                float(r[5]),
                int(r[6]),
                *_named_from_json(r[7]),
            )
            for r in rows
        ]

    def reset_breaker(self, service: str, at: float) -> None:
        with self._write() as db:
            db.execute(
                "INSERT OR REPLACE INTO breakers (service, reset_at) VALUES (?, ?)", (service, at)
            )

    def breaker_resets(self) -> dict[str, float]:
        with self._read() as db:
            rows = db.execute("SELECT service, reset_at FROM breakers").fetchall()
        return {str(r[0]): float(r[1]) for r in rows}

    # locks

    @contextmanager
    def lock(self, name: str, purpose: str = "", wait: float = 0) -> Iterator[LockHolder]:
        """Hold the named lock for the ``with`` block; a dead holder's lock is taken over.

        Raises KilnError naming the holder when it is still held after ``wait`` seconds.
        """
        holder = self._acquire(name, purpose or f"kiln {name}", wait)
        try:
            yield holder
        finally:
            with self._write() as db:
                db.execute("DELETE FROM locks WHERE name = ? AND token = ?", (name, holder.token))

    def lock_holder(self, name: str) -> LockHolder | None:
        with self._read() as db:
            row = db.execute(
                "SELECT name, pid, hostname, purpose, acquired, token FROM locks WHERE name = ?",
                (name,),
            ).fetchone()
        return None if row is None else LockHolder(*row)

    def _acquire(self, name: str, purpose: str, wait: float) -> LockHolder:
        me = LockHolder(
            name, os.getpid(), socket.gethostname(), purpose, time.time(), secrets.token_hex(8)
        )
        deadline = time.monotonic() + wait
        delay = 0.02
        while True:
            with self._write() as db:
                row = db.execute(
                    "SELECT name, pid, hostname, purpose, acquired, token FROM locks "
                    "WHERE name = ?",
                    (name,),
                ).fetchone()
                current = None if row is None else LockHolder(*row)
                if current is None or (
                    current.hostname == me.hostname and not pid_alive(current.pid)
                ):
                    if current is not None:
                        db.execute("DELETE FROM locks WHERE name = ?", (name,))
                    me = replace(me, acquired=time.time())
                    db.execute(
                        "INSERT INTO locks (name, pid, hostname, purpose, acquired, token) "
                        "VALUES (?,?,?,?,?,?)",
                        (name, me.pid, me.hostname, me.purpose, me.acquired, me.token),
                    )
                    return me
            if time.monotonic() >= deadline:
                age = max(0, int(time.time() - current.acquired))
                where = "" if current.hostname == me.hostname else f" on {current.hostname}"
                raise KilnError(
                    f"another kiln {name} holds the lock (pid {current.pid}{where}, "
                    f"started {age}s ago: {current.purpose})"
                )
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 0.5)


def _named_json(rollout: RolloutRecord) -> str | None:
    if rollout.named is None:
        return None
    return json.dumps({"named": sorted(rollout.named), "destroyed": sorted(rollout.destroyed)})


def _named_from_json(raw: str | None) -> tuple[frozenset[str] | None, frozenset[str]]:
    """A list (before scale-downs were told apart) or ``{"named", "destroyed"}``."""
    if raw is None:
        return None, frozenset()
    data = json.loads(raw)
    if isinstance(data, list):
        return frozenset(data), frozenset()
    return frozenset(data.get("named") or ()), frozenset(data.get("destroyed") or ())


def _check(value: str, allowed: frozenset[str], what: str) -> None:
    if value not in allowed:
        raise KilnError(f"unknown {what} {value!r} (expected one of {', '.join(sorted(allowed))})")


def _next_activation(db: sqlite3.Connection) -> int:
    row = db.execute("SELECT COALESCE(MAX(activated), 0) FROM revisions").fetchone()
    return int(row[0]) + 1


def _supersede_active(
    db: sqlite3.Connection,
    service: str,
    keep: int | None = None,
    becomes: RevisionStatus = "superseded",
) -> None:
    db.execute(
        "UPDATE revisions SET status = ? WHERE service = ? AND status = 'active' AND number != ?",
        (becomes, service, -1 if keep is None else keep),
    )


def _revision_row(row: tuple[Any, ...]) -> Revision:
    return Revision(
        service=row[0],
        number=int(row[1]),
        created=float(row[2]),
        image_digest=row[3],
        config=json.loads(row[4]),
        config_hash=row[5],
        spec_text=row[6],
        spec_path=row[7],
        git_commit=row[8],
        environment=row[9],
        status=row[10],
        reason=row[11],
        activated=row[12],
    )


def _finite(value: Any) -> Any:
    """An event's data with every NaN or infinity as None: JSON has no such numbers, and
    one stored would make every later read of the events fail to encode."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _instance_row(row: tuple[Any, ...]) -> InstanceRecord:
    return InstanceRecord(
        id=row[0],
        service=row[1],
        revision=int(row[2]),
        state=row[3],
        port=row[4],
        handle=None if row[5] is None else json.loads(row[5]),
        created=float(row[6]),
        ready_at=row[7],
        stopped_at=row[8],
        exit_code=row[9],
        reason=row[10],
        replaced_by=row[11],
        deployment=row[12],
        replaces=row[13],
        noticed=row[14],
        touched=row[15],
        quarantined_until=row[16],
    )
