"""OSV advisories in a local SQLite database, so a scan runs offline.

``import_advisories`` reads OSV JSON (one file, a directory of them, or a zip such as
osv.dev's per-ecosystem ``all.zip``) one advisory at a time, within fixed bounds: a
zip member larger than an advisory can be, or one that inflates like a zip bomb,
refuses the whole import before anything is read. The import is one SQLite
transaction, so a failure leaves the previous database exactly as it was. A malformed
advisory is skipped with one warning naming the file and the field; the rest import.

Versions are checked at import with the ordering the scan will use (dpkg's for
Debian, PEP 440 for PyPI), so a scan never meets a version it cannot compare.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import re
import sqlite3
import stat
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from kiln.errors import KilnError
from kiln.paths import kiln_home, private_dirs

__all__ = [
    "AffectedEntry",
    "DatabaseInfo",
    "ImportResult",
    "OsvDatabase",
    "default_db_path",
    "import_advisories",
    "normalize_package",
    "severity_rating",
]

SCHEMA_VERSION = "1"
MAX_ADVISORY_BYTES = 16 * 1024 * 1024
"""The largest advisory accepted; osv.dev's largest are a few hundred KiB."""
MAX_ZIP_BYTES = 16 * 1024**3
"""The most a whole zip may inflate to (osv.dev's biggest ``all.zip`` is ~1 GiB inflated)."""
MAX_ZIP_MEMBERS = 2_000_000
MAX_RATIO = 200
"""Inflation beyond this, for a member over 1 MiB, is a zip bomb, not JSON."""
RATIO_FLOOR = 1024 * 1024
RANGE_TYPES = ("ECOSYSTEM", "SEMVER", "GIT")
EVENT_KINDS = ("introduced", "fixed", "last_affected", "limit")
RATINGS = ("critical", "high", "medium", "low", "none", "unknown")
_CODENAME_RELEASES = {
    "buster": "10",
    "bullseye": "11",
    "bookworm": "12",
    "trixie": "13",
    "forky": "14",
}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS advisory (
    id TEXT PRIMARY KEY,
    modified TEXT NOT NULL,
    withdrawn TEXT,
    aliases TEXT NOT NULL,
    summary TEXT NOT NULL,
    severity TEXT NOT NULL,
    origin TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS affected (
    advisory TEXT NOT NULL,
    ecosystem TEXT NOT NULL,
    release TEXT NOT NULL,
    package TEXT NOT NULL,
    severity TEXT,
    ranges TEXT NOT NULL,
    versions TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS affected_package ON affected (ecosystem, package);
CREATE INDEX IF NOT EXISTS affected_advisory ON affected (advisory);
"""


def default_db_path() -> Path:
    return kiln_home() / "scan" / "osv.db"


def normalize_package(ecosystem: str, name: str) -> str:
    """PyPI names compare after PEP 503 normalization (``Foo_Bar`` is ``foo-bar``)."""
    if ecosystem == "PyPI":
        return re.sub(r"[-_.]+", "-", name).lower()
    return name


def debian_release(text: str) -> str:
    """``"12"``, ``"12.5"``, ``"debian-12"`` or ``"bookworm"`` → ``"12"``; unknown → ``""``."""
    text = text.strip().lower().removeprefix("debian-").removeprefix("debian")
    if text in _CODENAME_RELEASES:
        return _CODENAME_RELEASES[text]
    m = re.match(r"^(\d+)(?:\.\d+)*$", text)
    return m.group(1) if m else ""


# -- parsing one advisory -------------------------------------------------------------


class MalformedAdvisory(ValueError):
    """An advisory that cannot be used; ``field`` says where (``affected[0].ranges``)."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


@dataclass(frozen=True)
class Event:
    kind: str
    version: str


@dataclass(frozen=True)
class VersionRange:
    type: str
    events: tuple[Event, ...]


@dataclass(frozen=True)
class AffectedEntry:
    """One ``affected[]`` item: a package of one ecosystem (and Debian release)."""

    advisory: str
    ecosystem: str
    release: str
    package: str
    ranges: tuple[VersionRange, ...]
    versions: tuple[str, ...]
    severity: str | None
    """The item's own rating, when it has one; otherwise the advisory's applies."""


@dataclass(frozen=True)
class Advisory:
    id: str
    modified: str
    withdrawn: str | None
    aliases: tuple[str, ...]
    summary: str
    severity: str
    affected: tuple[AffectedEntry, ...]


def _timestamp(value: object, field: str) -> str:
    """An RFC 3339 time, normalized to UTC ``YYYY-MM-DDTHH:MM:SSZ`` so text order is time order."""
    if not isinstance(value, str):
        raise MalformedAdvisory(field, "missing or not an RFC 3339 timestamp")
    try:
        parsed = datetime.datetime.fromisoformat(
            value.replace("Z", "+00:00").replace("z", "+00:00")
        )
    except ValueError:
        raise MalformedAdvisory(field, f"{value[:40]!r} is not an RFC 3339 timestamp") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=datetime.UTC)
    return parsed.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str) -> datetime.datetime:
    return datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC)


def _string(value: object, field: str) -> str:
    if not isinstance(value, str) or not value:
        raise MalformedAdvisory(field, "missing or not a non-empty string")
    return value


def _list(value: object, field: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise MalformedAdvisory(field, "not a list")
    return value


def _check_version(ecosystem: str, version: str, field: str) -> None:
    """Refuse, at import, a version the scan could not order."""
    if version == "0" or ecosystem not in ("Debian", "PyPI"):
        return
    problem = _version_problem(ecosystem, version)
    if problem is not None:
        raise MalformedAdvisory(field, problem)


@functools.lru_cache(maxsize=65536)
def _version_problem(ecosystem: str, version: str) -> str | None:
    if ecosystem == "Debian":
        from debian.debian_support import Version

        try:
            Version(version)
        except ValueError:
            return f"{version[:40]!r} is not a Debian version"
        return None
    from packaging.version import InvalidVersion
    from packaging.version import Version as Pep440

    try:
        Pep440(version)
    except InvalidVersion:
        return f"{version[:40]!r} is not a PEP 440 version"
    return None


def _ranges(raw: object, ecosystem: str, field: str) -> tuple[VersionRange, ...]:
    out: list[VersionRange] = []
    for r_index, item in enumerate(_list(raw, field)):
        where = f"{field}[{r_index}]"
        if not isinstance(item, dict):
            raise MalformedAdvisory(where, "not an object")
        kind = item.get("type")
        if kind not in RANGE_TYPES:
            raise MalformedAdvisory(
                f"{where}.type", f"{kind!r} is not one of {', '.join(RANGE_TYPES)}"
            )
        events: list[Event] = []
        raw_events = item.get("events")
        if not isinstance(raw_events, list) or not raw_events:
            raise MalformedAdvisory(f"{where}.events", "missing or empty")
        for e_index, event in enumerate(raw_events):
            at = f"{where}.events[{e_index}]"
            if not isinstance(event, dict) or len(event) != 1:
                raise MalformedAdvisory(at, f"must have exactly one of {', '.join(EVENT_KINDS)}")
            ((name, version),) = event.items()
            if name not in EVENT_KINDS:
                raise MalformedAdvisory(at, f"{name!r} is not one of {', '.join(EVENT_KINDS)}")
            version = _string(version, f"{at}.{name}")
            if kind != "GIT":
                _check_version(ecosystem, version, f"{at}.{name}")
            events.append(Event(name, version))
        if kind != "GIT":
            out.append(VersionRange(kind, tuple(events)))
    return tuple(out)


def parse_advisory(data: object) -> Advisory:
    """An OSV JSON object → :class:`Advisory`, or :class:`MalformedAdvisory` naming the field."""
    if not isinstance(data, dict):
        raise MalformedAdvisory("(top level)", "not a JSON object")
    advisory_id = _string(data.get("id"), "id")
    modified = _timestamp(data.get("modified"), "modified")
    withdrawn = data.get("withdrawn")
    withdrawn_at = _timestamp(withdrawn, "withdrawn") if withdrawn is not None else None
    aliases = tuple(
        _string(alias, f"aliases[{i}]")
        for i, alias in enumerate(_list(data.get("aliases"), "aliases"))
    )
    summary = data.get("summary") if isinstance(data.get("summary"), str) else ""
    if not summary and isinstance(data.get("details"), str):
        summary = data["details"].strip().splitlines()[0] if data["details"].strip() else ""
    assert isinstance(summary, str)
    severity = _rating(data.get("severity"), "severity") or _database_rating(data) or "unknown"
    affected: list[AffectedEntry] = []
    for index, item in enumerate(_list(data.get("affected"), "affected")):
        where = f"affected[{index}]"
        if not isinstance(item, dict):
            raise MalformedAdvisory(where, "not an object")
        package = item.get("package")
        if not isinstance(package, dict):
            raise MalformedAdvisory(f"{where}.package", "missing or not an object")
        ecosystem_text = _string(package.get("ecosystem"), f"{where}.package.ecosystem")
        name = _string(package.get("name"), f"{where}.package.name")
        ecosystem, _, release_text = ecosystem_text.partition(":")
        release = debian_release(release_text) if ecosystem == "Debian" else release_text
        if ecosystem == "Debian" and release_text and not release:
            raise MalformedAdvisory(
                f"{where}.package.ecosystem", f"{ecosystem_text!r} names no Debian release"
            )
        ranges = _ranges(item.get("ranges"), ecosystem, f"{where}.ranges")
        versions = tuple(
            _string(v, f"{where}.versions[{i}]")
            for i, v in enumerate(_list(item.get("versions"), f"{where}.versions"))
        )
        own = _rating(item.get("severity"), f"{where}.severity") or _database_rating(item)
        affected.append(
            AffectedEntry(
                advisory_id,
                ecosystem,
                release,
                normalize_package(ecosystem, name),
                ranges,
                versions,
                own,
            )
        )
    return Advisory(
        advisory_id, modified, withdrawn_at, aliases, summary[:300], severity, tuple(affected)
    )


@functools.lru_cache(maxsize=4096)
def severity_rating(kind: str, score: str) -> str | None:
    """One OSV ``severity`` entry → a qualitative rating (CVSS v2/v3/v4 vectors are scored
    with the ``cvss`` library); ``None`` for a type Kiln does not rate."""
    import cvss  # type: ignore[import-untyped]

    if kind == "Ubuntu":
        rating = score.strip().lower()
        return "medium" if rating == "moderate" else rating if rating in RATINGS else None
    try:
        if kind == "CVSS_V4":
            return str(cvss.CVSS4(score).severity).lower()
        if kind == "CVSS_V3":
            return str(cvss.CVSS3(score).severities()[0]).lower()
        if kind == "CVSS_V2":
            base = float(cvss.CVSS2(score).scores()[0])
            return "high" if base >= 7.0 else "medium" if base >= 4.0 else "low"
    except cvss.CVSSError:
        raise MalformedAdvisory("score", f"{score[:60]!r} is not a {kind} vector") from None
    return None


def _rating(raw: object, field: str) -> str | None:
    """The highest rating among a ``severity`` list's entries."""
    best: str | None = None
    for index, entry in enumerate(_list(raw, field)):
        where = f"{field}[{index}]"
        if not isinstance(entry, dict):
            raise MalformedAdvisory(where, "not an object")
        kind = _string(entry.get("type"), f"{where}.type")
        score = _string(entry.get("score"), f"{where}.score")
        try:
            rating = severity_rating(kind, score)
        except MalformedAdvisory as e:
            raise MalformedAdvisory(f"{where}.{e.field}", str(e).partition(": ")[2]) from None
        if rating is not None and (best is None or RATINGS.index(rating) < RATINGS.index(best)):
            best = rating
    return best


def _database_rating(item: dict[str, Any]) -> str | None:
    """``database_specific.severity`` (GitHub's ``HIGH``, ``MODERATE``…) when it is a word."""
    specific = item.get("database_specific")
    if isinstance(specific, dict) and isinstance(specific.get("severity"), str):
        word = specific["severity"].strip().lower()
        word = "medium" if word == "moderate" else word
        if word in RATINGS:
            return word
    return None


# -- reading sources, bounded ---------------------------------------------------------


def _read_bounded(stream: IO[bytes], label: str) -> bytes:
    data = stream.read(MAX_ADVISORY_BYTES + 1)
    if len(data) > MAX_ADVISORY_BYTES:
        raise KilnError(f"{label}: more than {MAX_ADVISORY_BYTES // 2**20} MiB: refused")
    return data


def _zip_documents(path: Path) -> Iterator[tuple[str, bytes]]:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise KilnError(f"{path}: not a readable zip: {e}") from None
    with archive:
        members = [info for info in archive.infolist() if not info.is_dir()]
        if len(members) > MAX_ZIP_MEMBERS:
            raise KilnError(f"{path}: {len(members)} members, more than {MAX_ZIP_MEMBERS}: refused")
        total = 0
        for info in members:
            label = f"{path}:{info.filename}"
            if info.file_size > MAX_ADVISORY_BYTES:
                raise KilnError(
                    f"{label}: inflates to {info.file_size} bytes, more than an advisory's "
                    f"{MAX_ADVISORY_BYTES // 2**20} MiB: refused"
                )
            if info.file_size > RATIO_FLOOR and info.file_size > MAX_RATIO * max(
                info.compress_size, 1
            ):
                raise KilnError(
                    f"{label}: inflates {info.file_size // max(info.compress_size, 1)}:1, "
                    "a zip bomb, not JSON: refused"
                )
            total += info.file_size
        if total > MAX_ZIP_BYTES:
            raise KilnError(f"{path}: inflates to {total} bytes in all, more than 16 GiB: refused")
        for info in members:
            if not info.filename.endswith(".json"):
                continue
            label = f"{path}:{info.filename}"
            try:
                with archive.open(info) as member:
                    data = _read_bounded(member, label)
            except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError) as e:
                raise KilnError(f"{label}: cannot be read: {e}") from None
            yield label, data


def _file_document(path: Path) -> tuple[str, bytes]:
    try:
        with open(path, "rb") as stream:
            return str(path), _read_bounded(stream, str(path))
    except OSError as e:
        raise KilnError(f"{path}: cannot be read: {e.strerror or e}") from None


def _documents(source: Path) -> Iterator[tuple[str, bytes]]:
    """(label, bytes) of every advisory document under ``source``, in a stable order."""
    try:
        mode = os.stat(source).st_mode
    except OSError as e:
        raise KilnError(f"{source}: {e.strerror or e}") from None
    if stat.S_ISDIR(mode):
        for root, dirs, files in os.walk(source):
            dirs.sort()
            for name in sorted(files):
                path = Path(root) / name
                if name.endswith(".json") and path.is_file() and not path.is_symlink():
                    yield _file_document(path)
    elif zipfile.is_zipfile(source):
        yield from _zip_documents(source)
    else:
        yield _file_document(source)


# -- the database ---------------------------------------------------------------------


@dataclass(frozen=True)
class ImportResult:
    database: Path
    imported: int
    skipped: int
    advisories: int
    """Advisories in the database after the import (earlier imports included)."""


@dataclass(frozen=True)
class DatabaseInfo:
    path: Path
    advisories: int
    imported_at: datetime.datetime | None
    newest_modified: datetime.datetime | None

    def age_seconds(self, now: datetime.datetime | None = None) -> float | None:
        """How old the newest advisory is: a database nobody refreshes grows old by this."""
        if self.newest_modified is None:
            return None
        now = now or datetime.datetime.now(datetime.UTC)
        return max(0.0, (now - self.newest_modified).total_seconds())


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA foreign_keys = OFF")
    return conn


def _check_schema(conn: sqlite3.Connection, path: Path) -> None:
    row = conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
    if row is not None and row[0] != SCHEMA_VERSION:
        raise KilnError(f"{path}: database schema {row[0]}, this Kiln reads {SCHEMA_VERSION}")


def import_advisories(
    source: Path,
    db_path: Path | None = None,
    warn: Callable[[str], None] | None = None,
    now: datetime.datetime | None = None,
) -> ImportResult:
    """Load every advisory under ``source`` into the database, all or nothing.

    An advisory already there (same id) is replaced. ``warn`` gets one line per
    malformed advisory, which is skipped.
    """
    db_path = db_path or default_db_path()
    private_dirs(db_path.parent)
    created = not db_path.exists()
    warn = warn or (lambda line: None)
    try:
        conn = _connect(db_path)
    except sqlite3.Error as e:
        raise KilnError(f"{db_path}: cannot open the vulnerability database: {e}") from None
    imported = skipped = 0
    try:
        conn.executescript(_SCHEMA)  # idempotent, and executescript would commit a transaction
        _check_schema(conn, db_path)
        conn.execute("BEGIN IMMEDIATE")
        for label, data in _documents(source):
            try:
                advisories = _decode(data)
            except MalformedAdvisory as e:
                warn(f"warning: {label}: {e}: skipped")
                skipped += 1
                continue
            for index, raw in enumerate(advisories):
                where = label if len(advisories) == 1 else f"{label}[{index}]"
                try:
                    advisory = parse_advisory(raw)
                except MalformedAdvisory as e:
                    warn(f"warning: {where}: {e}: skipped")
                    skipped += 1
                    continue
                _store(conn, advisory, where)
                imported += 1
        stamp = (now or datetime.datetime.now(datetime.UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
        newest = conn.execute("SELECT MAX(modified) FROM advisory").fetchone()[0]
        count = int(conn.execute("SELECT COUNT(*) FROM advisory").fetchone()[0])
        meta = {"schema": SCHEMA_VERSION, "imported_at": stamp, "newest_modified": newest or ""}
        conn.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", meta.items())
        conn.execute("COMMIT")
    except BaseException as e:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        conn.close()
        if created:
            db_path.unlink(missing_ok=True)
        if isinstance(e, sqlite3.Error):
            raise KilnError(f"{db_path}: {e}") from None
        raise
    conn.close()
    os.chmod(db_path, 0o600)
    return ImportResult(db_path, imported, skipped, count)


def _decode(data: bytes) -> list[Any]:
    try:
        document = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise MalformedAdvisory("(JSON)", f"not valid JSON: {str(e)[:80]}") from None
    return document if isinstance(document, list) else [document]


def _store(conn: sqlite3.Connection, advisory: Advisory, origin: str) -> None:
    conn.execute("DELETE FROM affected WHERE advisory = ?", (advisory.id,))
    conn.execute(
        "INSERT OR REPLACE INTO advisory VALUES (?, ?, ?, ?, ?, ?, ?)",
        (
            advisory.id,
            advisory.modified,
            advisory.withdrawn,
            json.dumps(advisory.aliases),
            advisory.summary,
            advisory.severity,
            origin,
        ),
    )
    conn.executemany(
        "INSERT INTO affected VALUES (?, ?, ?, ?, ?, ?, ?)",
        [
            (
                advisory.id,
                entry.ecosystem,
                entry.release,
                entry.package,
                entry.severity,
                json.dumps(
                    [[r.type, [[e.kind, e.version] for e in r.events]] for r in entry.ranges]
                ),
                json.dumps(entry.versions),
            )
            for entry in advisory.affected
        ],
    )


@dataclass(frozen=True)
class Candidate:
    """An ``affected`` entry of a live (not withdrawn) advisory, with the advisory's facts."""

    entry: AffectedEntry
    aliases: tuple[str, ...]
    summary: str
    severity: str


class OsvDatabase:
    """Read-only access for a scan."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or default_db_path()
        if not self.path.is_file():
            raise KilnError(
                f"no vulnerability database at {self.path}: run `kiln scan db import PATH` first"
            )
        try:
            self._conn = sqlite3.connect(f"{self.path.as_uri()}?mode=ro", uri=True)
            _check_schema(self._conn, self.path)
        except sqlite3.Error as e:
            raise KilnError(f"{self.path}: not a Kiln vulnerability database: {e}") from None

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> OsvDatabase:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def info(self) -> DatabaseInfo:
        meta = dict(self._conn.execute("SELECT key, value FROM meta").fetchall())
        count = int(self._conn.execute("SELECT COUNT(*) FROM advisory").fetchone()[0])
        imported = meta.get("imported_at")
        newest = meta.get("newest_modified")
        return DatabaseInfo(
            self.path,
            count,
            parse_time(imported) if imported else None,
            parse_time(newest) if newest else None,
        )

    def candidates(self, ecosystem: str, package: str, release: str | None) -> list[Candidate]:
        """Entries for ``package``; for Debian, of ``release`` (and release-less ones), or of
        every release when ``release`` is ``None``. Withdrawn advisories are left out."""
        query = (
            "SELECT f.advisory, f.release, f.severity, f.ranges, f.versions, "
            "a.aliases, a.summary, a.severity FROM affected f JOIN advisory a ON a.id = f.advisory "
            "WHERE f.ecosystem = ? AND f.package = ? AND a.withdrawn IS NULL"
        )
        args: list[str] = [ecosystem, normalize_package(ecosystem, package)]
        if release is not None:
            query += " AND f.release IN (?, '')"
            args.append(release)
        out: list[Candidate] = []
        for advisory, rel, own, ranges, versions, aliases, summary, severity in self._conn.execute(
            query + " ORDER BY f.advisory", args
        ):
            entry = AffectedEntry(
                advisory,
                ecosystem,
                rel,
                args[1],
                tuple(
                    VersionRange(kind, tuple(Event(k, v) for k, v in events))
                    for kind, events in json.loads(ranges)
                ),
                tuple(json.loads(versions)),
                own,
            )
            out.append(Candidate(entry, tuple(json.loads(aliases)), summary, severity))
        return out
