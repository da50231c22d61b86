"""Match an image's SBOM against the local OSV database.

Debian packages match by SOURCE package (OSV's Debian advisories are per source
package) and source version, ordered as dpkg orders them (``python-debian``'s
``Version``); Python distributions match by PEP 503 name and PEP 440 version
(``packaging``). Range evaluation follows the OSV schema: sorted events, where an
``introduced`` at or below the version opens the range, and a ``fixed`` at or below
it (or a ``last_affected`` below it) closes it again; ``versions`` lists match too.

A suppression file records accepted findings with a reason and an expiry; an expired
suppression hides nothing and its finding carries a note, so acceptance must be renewed
on purpose.
"""

from __future__ import annotations

import datetime
import functools
import re
import tomllib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from kiln.errors import KilnError
from kiln.supply.osv import (
    RATINGS,
    AffectedEntry,
    DatabaseInfo,
    OsvDatabase,
    debian_release,
    normalize_package,
)

if TYPE_CHECKING:
    from kiln.image.store import ImageStore

__all__ = [
    "Finding",
    "ScanReport",
    "Suppression",
    "load_suppressions",
    "match_components",
    "parse_age",
    "scan_image",
]


class ScannedComponent(Protocol):
    """What a scan reads of an SBOM component (:class:`kiln.supply.sbom.Component` fits)."""

    @property
    def ecosystem(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def version(self) -> str: ...
    @property
    def source_name(self) -> str: ...
    @property
    def source_version(self) -> str: ...
    @property
    def purl(self) -> str: ...


_ECOSYSTEMS = {"debian": "Debian", "pypi": "PyPI"}
_AGE = re.compile(r"^(\d+)(s|m|h|d|w)$")
_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_age(text: str) -> float:
    """``"7d"``, ``"12h"``, ``"2w"`` → seconds; anything else is one clear error."""
    m = _AGE.match(text.strip())
    if not m:
        raise KilnError(f'--max-db-age: {text!r} is not an age such as "7d", "12h" or "2w"')
    return float(int(m.group(1)) * _AGE_UNITS[m.group(2)])


def age_text(seconds: float) -> str:
    if seconds >= 2 * 86400:
        return f"{seconds / 86400:.0f} days"
    if seconds >= 2 * 3600:
        return f"{seconds / 3600:.0f} hours"
    return f"{seconds / 60:.0f} minutes"


# -- version ordering -----------------------------------------------------------------


@functools.lru_cache(maxsize=65536)
def _debian_key(version: str) -> Any:
    from debian.debian_support import Version

    return Version(version)


@functools.lru_cache(maxsize=65536)
def _pypi_key(version: str) -> Any:
    from packaging.version import Version

    return Version(version)


_KEYS: dict[str, Callable[[str], Any]] = {"Debian": _debian_key, "PyPI": _pypi_key}


def affected_by(entry: AffectedEntry, installed: str) -> tuple[bool, str | None]:
    """Whether ``installed`` falls in ``entry``, and the lowest fix above it if any.

    Per the OSV schema: each range's events are sorted by version; walking them, an
    ``introduced`` ≤ v marks v affected, a ``fixed`` ≤ v or a ``last_affected`` < v
    unmarks it; a ``limit`` ≤ v excludes the range. ``versions`` lists are exact.
    """
    key = _KEYS[entry.ecosystem]
    try:
        version = key(installed)
    except ValueError:  # a version the ordering cannot read matches only by its text
        return installed in entry.versions, None
    hit = any(_same(key, listed, version) for listed in entry.versions)
    fixes: list[Any] = []
    for version_range in entry.ranges:
        events = sorted(
            version_range.events,
            key=lambda e: (0,) if e.version == "0" else (1, key(e.version), e.kind != "introduced"),
        )
        limits = [key(e.version) for e in events if e.kind == "limit" and e.version != "0"]
        if limits and all(version >= limit for limit in limits):
            continue
        inside = False
        for event in events:
            if event.kind == "introduced":
                inside = inside or event.version == "0" or version >= key(event.version)
            elif event.kind in ("fixed", "last_affected"):
                bound = key(event.version)
                inside = inside and (version < bound if event.kind == "fixed" else version <= bound)
        if inside:
            hit = True
            fixes.extend(
                key(e.version) for e in events if e.kind == "fixed" and key(e.version) > version
            )
    if not hit:
        return False, None
    return True, (str(min(fixes)) if fixes else None)


def _same(key: Callable[[str], Any], listed: str, version: Any) -> bool:
    try:
        return bool(key(listed) == version)
    except ValueError:
        return False


# -- findings -------------------------------------------------------------------------


@dataclass
class Finding:
    id: str
    aliases: tuple[str, ...]
    ecosystem: str
    package: str
    """The source package for Debian (what the advisory names), the distribution for PyPI."""
    installed: str
    fixed: str | None
    severity: str
    summary: str
    binaries: list[str] = field(default_factory=list)
    """Debian: the installed binary packages built from ``package``."""
    suppressed_by: Suppression | None = None
    note: str = ""

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "aliases": list(self.aliases),
            "ecosystem": self.ecosystem,
            "package": self.package,
            "installed": self.installed,
            "fixed": self.fixed,
            "severity": self.severity,
            "summary": self.summary,
            "binaries": self.binaries,
        }
        if self.suppressed_by is not None:
            out["suppression"] = self.suppressed_by.as_json()
        if self.note:
            out["note"] = self.note
        return out


def _component_release(purl: str) -> str | None:
    """The Debian release a ``pkg:deb`` purl names (``distro=debian-12``), else ``None``."""
    from urllib.parse import parse_qs

    distro = parse_qs(purl.partition("?")[2].partition("#")[0]).get("distro")
    release = debian_release(distro[0]) if distro else ""
    return release or None


def match_components(components: Iterable[ScannedComponent], db: OsvDatabase) -> list[Finding]:
    """Every (advisory, package, installed version) that a live advisory affects."""
    found: dict[tuple[str, str, str, str], Finding] = {}
    looked_up: dict[tuple[str, str, str | None], list[Any]] = {}
    for component in components:
        ecosystem = _ECOSYSTEMS.get(component.ecosystem)
        if ecosystem is None:
            continue
        vendor_purl = component.purl.startswith("pkg:deb/") and component.purl
        if vendor_purl and not component.purl.startswith("pkg:deb/debian/"):
            continue  # Ubuntu's (or another vendor's) packages: Debian's advisories do not apply
        if ecosystem == "Debian":
            package, installed = component.source_name, component.source_version
            release = _component_release(component.purl)
        else:
            package, installed = normalize_package(ecosystem, component.name), component.version
            release = None
        if not installed:
            continue
        lookup = (ecosystem, package, release)
        if lookup not in looked_up:
            looked_up[lookup] = db.candidates(*lookup)
        for candidate in looked_up[lookup]:
            hit, fixed = affected_by(candidate.entry, installed)
            if not hit:
                continue
            key = (candidate.entry.advisory, ecosystem, package, installed)
            finding = found.get(key)
            if finding is None:
                finding = found[key] = Finding(
                    candidate.entry.advisory,
                    candidate.aliases,
                    ecosystem,
                    package,
                    installed,
                    fixed,
                    candidate.entry.severity or candidate.severity,
                    candidate.summary,
                )
            elif fixed is not None and finding.fixed is None:
                finding.fixed = fixed
            if ecosystem == "Debian" and component.name not in finding.binaries:
                finding.binaries.append(component.name)
    return sorted(
        found.values(), key=lambda f: (RATINGS.index(f.severity), f.package, f.installed, f.id)
    )


# -- suppressions ---------------------------------------------------------------------


@dataclass(frozen=True)
class Suppression:
    id: str
    package: str | None
    reason: str
    expires: datetime.date
    origin: str
    """``FILE:#N``, for messages."""

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "package": self.package,
            "reason": self.reason,
            "expires": self.expires.isoformat(),
            "origin": self.origin,
        }

    def covers(self, finding: Finding) -> bool:
        if self.id != finding.id and self.id not in finding.aliases:
            return False
        if self.package is None:
            return True
        wanted = normalize_package(finding.ecosystem, self.package)
        return wanted == finding.package or self.package in finding.binaries


def load_suppressions(path: Path) -> list[Suppression]:
    """``[[suppression]]`` tables with ``id``, ``reason``, ``expires`` (a date) and an
    optional ``package``; anything else is one error naming the entry."""
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise KilnError(f"{path}: {e.strerror or e}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise KilnError(f"{path}: not valid TOML: {e}") from None
    unknown = set(document) - {"suppression"}
    if unknown:
        raise KilnError(f"{path}: unknown key {sorted(unknown)[0]!r} (expected [[suppression]])")
    entries = document.get("suppression", [])
    if not isinstance(entries, list):
        raise KilnError(f"{path}: suppression must be an array of tables ([[suppression]])")
    out: list[Suppression] = []
    for index, entry in enumerate(entries, 1):
        origin = f"{path}:#{index}"
        if not isinstance(entry, dict):
            raise KilnError(f"{origin}: not a table")
        extra = set(entry) - {"id", "package", "reason", "expires"}
        if extra:
            raise KilnError(f"{origin}: unknown key {sorted(extra)[0]!r}")
        for name in ("id", "reason"):
            if not isinstance(entry.get(name), str) or not entry[name].strip():
                raise KilnError(f"{origin}: {name} must be a non-empty string")
        package = entry.get("package")
        if package is not None and (not isinstance(package, str) or not package):
            raise KilnError(f"{origin}: package must be a non-empty string")
        out.append(
            Suppression(
                entry["id"], package, entry["reason"], _expiry(entry.get("expires"), origin), origin
            )
        )
    return out


def _expiry(value: object, origin: str) -> datetime.date:
    if isinstance(value, datetime.datetime):
        return value.date()
    if isinstance(value, datetime.date):
        return value
    if isinstance(value, str):
        try:
            return datetime.date.fromisoformat(value)
        except ValueError:
            pass
    raise KilnError(f"{origin}: expires must be a date such as 2025-06-30 (every suppression ends)")


def apply_suppressions(
    findings: Sequence[Finding], suppressions: Sequence[Suppression], today: datetime.date
) -> tuple[list[Finding], list[Finding]]:
    """(findings still shown, findings hidden). A finding whose only suppressions have
    expired is shown, with a note saying which expired and when."""
    shown: list[Finding] = []
    hidden: list[Finding] = []
    for finding in findings:
        matching = [s for s in suppressions if s.covers(finding)]
        live = [s for s in matching if s.expires >= today]
        if live:
            finding.suppressed_by = live[0]
            hidden.append(finding)
            continue
        if matching:
            last = max(matching, key=lambda s: s.expires)
            finding.note = (
                f"suppression {last.origin} expired {last.expires.isoformat()} ({last.reason})"
            )
        shown.append(finding)
    return shown, hidden


# -- a scan of an image ---------------------------------------------------------------


@dataclass
class ScanReport:
    ref: str
    digest: str
    database: DatabaseInfo
    components: int
    findings: list[Finding]
    suppressed: list[Finding]
    now: datetime.datetime

    def as_json(self) -> dict[str, Any]:
        info = self.database
        return {
            "image": self.ref,
            "digest": self.digest,
            "components": self.components,
            "database": {
                "path": str(info.path),
                "advisories": info.advisories,
                "imported_at": _iso(info.imported_at),
                "newest_modified": _iso(info.newest_modified),
                "age_seconds": info.age_seconds(self.now),
            },
            "findings": [f.as_json() for f in self.findings],
            "suppressed": [f.as_json() for f in self.suppressed],
        }

    def lines(self) -> list[str]:
        """The human report: the database's age first, one line per finding, a summary."""
        info = self.database
        age = info.age_seconds(self.now)
        freshness = (
            f"newest advisory modified {_iso(info.newest_modified)} ({age_text(age)} ago)"
            if age is not None
            else "no advisories"
        )
        imported = _iso(info.imported_at)
        out = [f"database: {info.advisories} advisories, {freshness}, imported {imported}"]
        for f in self.findings:
            fixed = f"fixed in {f.fixed}" if f.fixed else "no fix yet"
            via = (
                f" (via {', '.join(f.binaries)})"
                if f.binaries and f.binaries != [f.package]
                else ""
            )
            aliases = f" [{', '.join(f.aliases)}]" if f.aliases else ""
            out.append(f"{f.severity:<8} {f.id}{aliases} {f.package} {f.installed}{via}: {fixed}")
            if f.note:
                out.append(f"         note: {f.note}")
        out.append(
            f"{self.ref} ({self.digest}): {len(self.findings)} finding(s), "
            f"{len(self.suppressed)} suppressed, {self.components} components scanned"
        )
        return out


def _iso(moment: datetime.datetime | None) -> str | None:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ") if moment is not None else None


def scan_image(
    ref: str,
    *,
    store: ImageStore | None = None,
    db_path: Path | None = None,
    max_db_age: float | None = None,
    suppressions: Path | None = None,
    now: datetime.datetime | None = None,
) -> ScanReport:
    """Scan image ``ref``; a database older than ``max_db_age`` seconds is an error."""
    from kiln.supply.sbom import components, image_sbom

    now = now or datetime.datetime.now(datetime.UTC)
    accepted = load_suppressions(suppressions) if suppressions is not None else []
    with OsvDatabase(db_path) as db:
        info = db.info()
        age = info.age_seconds(now)
        if max_db_age is not None and (age is None or age > max_db_age):
            what = f"{age_text(age)} old" if age is not None else "empty"
            raise KilnError(
                f"vulnerability database {info.path} is {what}, more than --max-db-age "
                f"allows ({age_text(max_db_age)}): import a fresh export with `kiln scan db import`"
            )
        if store is None:
            from kiln.image.store import ImageStore

            store = ImageStore.default()
        digest = store.resolve(ref).digest
        parts = components(image_sbom(store, ref))  # the referrer, else computed now
        findings = match_components(parts, db)
    shown, hidden = apply_suppressions(findings, accepted, now.date())
    return ScanReport(ref, digest, info, len(parts), shown, hidden, now)
