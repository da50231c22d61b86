"""Quarantine and burn: a suspect instance leaves the rotation at once, is frozen, and
its evidence is kept before it is destroyed.

In a service with ``quarantine = "15m"``, an instance whose replacement has been
started because it turned unhealthy or drifted (a live record that ``replaces`` it)
is taken at once: moved to ``draining`` (out of the routes; the router drains what
it carries), frozen through the runtime's :class:`kiln.runtime.Freezer`, and an
evidence bundle is written to ``KILN_HOME/evidence/<instance>.tar.gz``. A timer
retires it when the window closes. ``kiln burn`` retires one instance now, with a
bundle first when asked. The window's end is stored with the instance
(``quarantined_until``): an agent restarted during a window keeps the instance frozen
until then, and one restarted after it retires the instance at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import math
import os
import re
import shutil
import tarfile
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.agent.errors import NotFound
from kiln.agent.lifecycle import IN_SERVICE, handle_of
from kiln.errors import KilnError
from kiln.runtime import Freezer, InstanceHandle, NotSupported, Runtime

if TYPE_CHECKING:
    from kiln.agent.engine import Engine
    from kiln.deploy.state import InstanceRecord

__all__ = [
    "Quarantine",
    "evidence_path",
    "evidence_retention",
    "export_evidence",
    "prune_evidence",
    "write_bundle",
]

_INSTANCE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
BUNDLE_SUFFIX = ".tar.gz"


def evidence_path(home: Path, instance: str) -> Path:
    """``KILN_HOME/evidence/<instance>.tar.gz``; an id that could leave the directory is
    refused."""
    if not _INSTANCE_ID.match(instance) or ".." in instance:
        raise KilnError(f"{instance!r} is not an instance id")
    return home / "evidence" / f"{instance}{BUNDLE_SUFFIX}"


def write_bundle(
    home: Path,
    rec: InstanceRecord,
    reason: str,
    runtime: Runtime,
    handle: InstanceHandle | None,
    writable: list[str],
    drift: dict[str, Any] | None,
) -> Path:
    """Logs, writable paths, process and network facts, the drift report and a
    ``manifest.json`` of sha256 digests, as one tar.gz written atomically (mode 0600)."""
    target = evidence_path(home, rec.id)
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".collect-") as scratch:
        work = Path(scratch)
        facts: dict[str, Any] = {}
        if handle is not None and isinstance(runtime, Freezer):
            try:
                facts = runtime.collect_evidence(handle, writable, work)
            except KilnError as err:
                facts = {"error": str(err)}
        members: dict[str, bytes | Path] = {}
        log = home / "logs" / rec.service / f"{rec.id}.log"
        if log.is_file():
            members["logs.jsonl"] = log
        if (work / "writable.tar").is_file():
            members["writable.tar"] = work / "writable.tar"
        members["processes.json"] = _json(facts.get("processes", []))
        members["network.json"] = _json(facts.get("network", {}))
        if drift is not None:
            members["drift.json"] = _json(drift)
        members["instance.json"] = _json(
            {
                "id": rec.id,
                "service": rec.service,
                "revision": rec.revision,
                "created": rec.created,
                "state": rec.state,
                "handle": rec.handle,
                "reason": reason,
            }
        )
        manifest = {
            "instance": rec.id,
            "service": rec.service,
            "reason": reason,
            "collected": time.time(),
            "runtime": runtime.name,
            "writable": facts.get("writable"),
            "error": facts.get("error"),
            "files": {name: _digest(body) for name, body in sorted(members.items())},
        }
        members["manifest.json"] = _json(manifest)
        partial = work / "bundle.tar.gz"
        with tarfile.open(partial, "w:gz", format=tarfile.PAX_FORMAT) as tar:
            for name, body in members.items():
                if isinstance(body, Path):
                    tar.add(body, arcname=name, recursive=False)
                else:
                    info = tarfile.TarInfo(name)
                    info.size, info.mtime, info.mode = len(body), int(time.time()), 0o600
                    tar.addfile(info, io.BytesIO(body))
        os.chmod(partial, 0o600)
        os.replace(partial, target)
    return target


def _json(value: Any) -> bytes:
    return json.dumps(value, indent=2, sort_keys=True, default=str).encode()


def _digest(body: bytes | Path) -> dict[str, Any]:
    h = hashlib.sha256()
    size = 0
    if isinstance(body, Path):
        with body.open("rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
                size += len(chunk)
    else:
        h.update(body)
        size = len(body)
    return {"sha256": h.hexdigest(), "size": size}


def export_evidence(home: Path, instance: str, out: Path) -> dict[str, Any]:
    """Copy a bundle to ``out`` after checking every member against its manifest: an
    altered bundle is refused, not exported."""
    source = evidence_path(home, instance)
    if not source.is_file():
        raise KilnError(f"no evidence for {instance} in {source.parent}")
    with tarfile.open(source, "r:gz") as tar:
        manifest_member = tar.extractfile("manifest.json")
        if manifest_member is None:
            raise KilnError(f"{source}: no manifest.json")
        manifest = json.loads(manifest_member.read())
        for name, want in (manifest.get("files") or {}).items():
            member = tar.extractfile(name)
            if member is None:
                raise KilnError(f"{source}: {name} is missing")
            h = hashlib.sha256()
            while chunk := member.read(1 << 20):
                h.update(chunk)
            if h.hexdigest() != want.get("sha256"):
                raise KilnError(f"{source}: {name} does not match its manifest digest")
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, out)
    return {"instance": instance, "path": str(out), "files": sorted(manifest["files"])}


def evidence_retention() -> tuple[int, float]:
    """``KILN_EVIDENCE_MAX_BYTES`` (default 2GiB in all), ``KILN_EVIDENCE_MAX_AGE`` (720h)."""
    from kiln.spec.models import parse_duration, parse_size

    try:
        max_bytes = parse_size(os.environ.get("KILN_EVIDENCE_MAX_BYTES", "2GiB"))
        max_age = parse_duration(os.environ.get("KILN_EVIDENCE_MAX_AGE", "720h"))
    except ValueError as e:
        raise KilnError(f"evidence retention: {e}") from e
    return max_bytes, max_age


def prune_evidence(
    root: Path, max_bytes: int, max_age: float, keep: frozenset[str] = frozenset()
) -> list[str]:
    """Bundles older than ``max_age`` (by write time), then the oldest until the rest fit
    in ``max_bytes``; those of ``keep`` (instances still in quarantine) stay. Returns
    the instances whose bundles went."""
    if not root.is_dir():
        return []
    now = time.time()
    entries = []
    total = 0
    for path in root.glob(f"*{BUNDLE_SUFFIX}"):
        with contextlib.suppress(FileNotFoundError):
            st = path.stat()
            total += st.st_size
            entries.append((st.st_mtime, path, st.st_size))
    removed = []
    for mtime, path, size in sorted(entries):
        instance = path.name.removesuffix(BUNDLE_SUFFIX)
        if instance in keep:
            continue
        if now - mtime > max_age or total > max_bytes:
            path.unlink(missing_ok=True)
            total -= size
            removed.append(instance)
    return removed


class Quarantine:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.wake = asyncio.Event()
        self.held: dict[str, asyncio.Task[None]] = {}
        """instance id → the timer that retires it when its window closes."""

    def poke(self) -> None:
        self.wake.set()

    async def loop(self) -> None:
        """Woken by every instance change; takes what a replacement has been started for."""
        await self._prune()
        while True:
            self.wake.clear()
            await self.once()
            await self.wake.wait()

    async def once(self) -> list[str]:
        e = self.engine
        live = await e.db(e.state.instances, None, True)
        replaced = {r.replaces for r in live if r.replaces is not None and r.state in IN_SERVICE}
        taken = []
        for rec in live:
            if rec.id not in replaced or rec.state not in IN_SERVICE or rec.id in self.held:
                continue
            cfg = await e.config_of(rec)
            window = cfg.get("quarantine")
            if not window:
                continue
            drift = self._drift_report(rec.id)
            why = (
                f"drift: {drift.get('detail', 'see drift.json')}"
                if drift is not None
                else f"unhealthy ({rec.reason or 'failed its health checks'})"
                if rec.state == "unhealthy"
                else "replaced"
            )
            if await self.take(rec, why, float(window), drift):
                taken.append(rec.id)
        return taken

    def _drift_report(self, instance: str) -> dict[str, Any] | None:
        checker = getattr(self.engine, "drift", None)
        last = getattr(checker, "last_report", None)
        report = last(instance) if callable(last) else None
        return report if isinstance(report, dict) else None

    async def take(
        self, rec: InstanceRecord, why: str, window: float, drift: dict[str, Any] | None
    ) -> bool:
        """Out of rotation, frozen, evidence written; retired when ``window`` closes (at
        once when the runtime cannot freeze). False when another owner moved it first."""
        e = self.engine
        was_routed = rec.state == "ready"
        moved = await e.lifecycle.move(rec.id, "draining", reason=f"quarantined: {why}")
        if moved is None:
            return False
        e.health.forget(rec.id)
        await e.routing.push(rec.service)
        cfg = await e.config_of(moved)
        if was_routed:
            with contextlib.suppress(KilnError):
                await e.io(e.router.drain, rec.service, rec.id, float(cfg.get("drain_timeout", 10)))
        handle = handle_of(moved)
        frozen = False
        unfrozen = "the runtime cannot freeze"
        if handle is not None and isinstance(e.runtime, Freezer):
            try:
                await e.io(e.runtime.freeze, handle)
                frozen = True
            except NotSupported as err:
                unfrozen = str(err)
            except KilnError as err:
                unfrozen = str(err)
                e.emit("instance.freeze_failed", f"{rec.id}: {err}", rec.service, rec.id)
        writable = [str(p) for p in cfg.get("writable") or []]
        path = await e.io(write_bundle, e.home, moved, why, e.runtime, handle, writable, drift)
        e.emit(
            "instance.quarantined",
            f"{rec.id} quarantined ({why}): "
            + (f"frozen for {window:g}s" if frozen else f"not frozen ({unfrozen}); retired now")
            + f"; evidence in {path}",
            rec.service,
            rec.id,
            rec.revision,
            {
                "reason": why,
                "frozen": frozen,
                "window": window,
                "evidence": str(path),
                **({} if frozen else {"not_frozen": unfrozen}),
            },
        )
        if frozen and window > 0:
            await e.db(e.state.update_instance, rec.id, quarantined_until=time.time() + window)
        await self._prune()
        self.held[rec.id] = e.spawn(self._expire(rec.id, window if frozen else 0.0), "quarantine")
        return True

    async def resume(self, rec: InstanceRecord) -> None:
        """An agent restarted during ``rec``'s window: the timer is armed again for what
        is left of it (nothing, when the deadline passed while no agent ran), never more
        than the service's window: a stored deadline that is infinite, or far off because
        the clock was set back while no agent ran, must not keep it frozen for ever."""
        if rec.id in self.held:
            return
        try:
            window = float((await self.engine.config_of(rec)).get("quarantine") or 0.0)
        except (TypeError, ValueError):
            window = 0.0
        left = min(max(0.0, (rec.quarantined_until or 0.0) - time.time()), window)
        left = left if math.isfinite(left) else 0.0
        self.engine.emit(
            "instance.quarantine_resumed",
            f"{rec.id} stays in quarantine for {left:.0f}s more after the agent restart",
            rec.service,
            rec.id,
            rec.revision,
            {"left": left},
        )
        self.held[rec.id] = self.engine.spawn(self._expire(rec.id, left), "quarantine")

    async def _expire(self, instance: str, window: float) -> None:
        try:
            await asyncio.sleep(window)
            await self.engine.lifecycle.retire(instance, "quarantine window closed")
        finally:
            self.held.pop(instance, None)

    async def burn(self, instance: str, keep_evidence: bool) -> dict[str, Any]:
        """Replace a suspect instance now: retired (the reconciler starts another), after
        its evidence is written when ``keep_evidence``."""
        e = self.engine
        live = [r for r in await e.db(e.state.instances, None, True) if r.id == instance]
        if not live or live[0].state not in IN_SERVICE:
            raise NotFound(f"no running instance {instance!r}; kiln status lists them")
        rec = live[0]
        evidence = None
        if keep_evidence:
            await self.take(rec, "burnt by kiln burn", 0.0, self._drift_report(rec.id))
            evidence = str(evidence_path(e.home, rec.id))
            held = self.held.get(rec.id)
            if held is not None:
                await asyncio.shield(held)
        else:
            e.emit("instance.burnt", f"{rec.id} burnt by kiln burn", rec.service, rec.id)
            await e.lifecycle.retire(rec.id, "burnt by kiln burn")
        return {"instance": rec.id, "service": rec.service, "evidence": evidence}

    async def _prune(self) -> None:
        e = self.engine
        max_bytes, max_age = evidence_retention()
        removed = await e.io(
            prune_evidence, e.home / "evidence", max_bytes, max_age, frozenset(self.held)
        )
        if removed:
            e.emit("evidence.pruned", f"removed the evidence of {len(removed)} instance(s)")
