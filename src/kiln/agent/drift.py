"""Drift detection: proof, every ``drift_interval``, that each instance is what its
revision declared, and repair by replacement when it is not.

What is checked, per live instance of the local runtime (here, in the agent):

* the process is the one that was started (the shim the handle names is alive and
  is this instance's; the sandbox init has its recorded start time);
* the launch plan it runs (``spec.json``): the revision's image digest, revision
  and service env;
* its root filesystem: each layer snapshot it is mounted on against the manifest
  recorded when the snapshot was unpacked (:mod:`kiln.image.file_manifest`; the
  cheap metadata pass every interval, a full re-hash every ``drift_full_interval``),
  and the overlay's upper dir, which a read-only root leaves empty but for the
  mount points runc made;
* no extra instance: a sandbox the runtime lists under this home that no record
  names is reported and destroyed.

The docker and swarm runtimes check their own instances (:class:`kiln.runtime.DriftInspector`:
the container or task is the one started, its image, labels and env are the revision's,
and on docker nothing was written into its layer outside its mount points); the agent
applies the service's ``drift_ignore`` to the files they list. docs/drift.md says what
each runtime checks and what it cannot.

A snapshot found changed is shared by every instance on it and every later start, so
it is rebuilt from its blob (re-hashed first) and every instance on it is replaced.
The old tree is set aside with the ids of the instances on it, so an agent restarted
before they are replaced still replaces them, and it is removed once they are gone.

Paths under the service's ``writable`` dirs and its ``drift_ignore`` globs are not
drift. Replacing goes the reconciler's way (a new instance that ``replaces`` the
drifted one, which is retired when the new one is ready); ``on_drift = "warn"``
only records the ``instance.drift`` event.
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import logging
import os
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.agent.waiting import wait_set
from kiln.deploy.state import InstanceRecord, Revision
from kiln.errors import KilnError
from kiln.image.file_manifest import FileDifference, compare_tree, read_manifest
from kiln.runtime import DriftExpectation, DriftInspector

if TYPE_CHECKING:
    from kiln.agent.engine import Engine

__all__ = [
    "DEFAULT_FULL_INTERVAL",
    "DEFAULT_INTERVAL",
    "MAX_LISTED_FILES",
    "DriftChecker",
    "InstanceDrift",
    "ignore_rule",
]

log = logging.getLogger("kiln.agent")

DEFAULT_INTERVAL = 30.0
DEFAULT_FULL_INTERVAL = 600.0
MAX_LISTED_FILES = 50
"""Differences listed per instance in an event or report; the rest are counted."""
_CHECKED_STATES = ("starting", "ready", "unhealthy")
_REPLACEABLE_STATES = ("ready", "unhealthy")
_ASIDE_RECORD = "instances.json"


def _utf8(text: str) -> str:
    """A file name as text every JSON answer can carry: the instance chooses its names,
    and a byte that is not UTF-8 (a lone surrogate once decoded) made the agent's
    answers (the drift report, the events holding it) fail to encode; shown as ``\\xNN``."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


@dataclass
class InstanceDrift:
    """What differs for one instance: ``what`` is files, snapshot, process, config or extra."""

    service: str
    instance: str
    revision: int | None
    what: str
    detail: str
    files: list[FileDifference] = field(default_factory=list)
    action: str = "none"

    def to_json(self) -> dict[str, Any]:
        return {
            "service": self.service,
            "instance": self.instance,
            "revision": self.revision,
            "what": self.what,
            "detail": self.detail,
            "files": [
                {key: _utf8(value) for key, value in f.to_json().items()}
                for f in self.files[:MAX_LISTED_FILES]
            ],
            "files_total": len(self.files),
            "files_not_listed": max(0, len(self.files) - MAX_LISTED_FILES),
            "action": self.action,
        }


def ignore_rule(writable: Sequence[str], patterns: Sequence[str]) -> Callable[[str], bool]:
    """Whether a ``/path`` in an instance's root is not drift: under a writable dir, or
    matched by a ``drift_ignore`` glob (``/dir/**`` is the dir and all below it)."""
    prefixes = [w.rstrip("/") for w in writable if w.startswith("/")]
    globs: list[str] = []
    for pattern in patterns:
        if pattern.endswith("/**"):
            prefixes.append(pattern[:-3].rstrip("/"))
        else:
            globs.append(pattern)

    def ignored(path: str) -> bool:
        for prefix in prefixes:
            if not prefix or path == prefix or path.startswith(prefix + "/"):
                return True
        return any(fnmatch.fnmatchcase(path, g) for g in globs)

    return ignored


Found = InstanceDrift


@dataclass
class _Pass:
    """One pass's shared work: each snapshot is compared once, whatever shares it."""

    full: bool
    snapshots: dict[Path, list[FileDifference] | None] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


class DriftChecker:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.wake = asyncio.Event()
        self.lock = asyncio.Lock()
        self.reports: dict[str, dict[str, Any]] = {}
        """instance id → its last drift report (for the evidence bundle of its quarantine)."""
        self.next_cheap: dict[str, float] = {}
        self.next_full: dict[str, float] = {}
        self.warned: dict[str, str] = {}
        self.cpu_seconds: list[tuple[bool, int, float]] = []
        """(full, instances checked, CPU seconds) of the last passes: the cost figures."""

    def last_report(self, instance: str) -> dict[str, Any] | None:
        return self.reports.get(instance)

    # scheduling

    def poke(self, service: str) -> None:
        """A service changed: the loop schedules it if it has not yet (an apply)."""
        if service not in self.next_cheap:
            self.wake.set()

    async def loop(self) -> None:
        """Asleep until the next service is due (its ``drift_interval``); no polling."""
        while True:
            now = time.time()
            due_cheap, due_full, wake_at = await self._due(now)
            if due_cheap or due_full:
                if due_full:
                    await self.check(sorted(due_full), full=True)
                rest = sorted(due_cheap - due_full)
                if rest:
                    await self.check(rest, full=False)
                continue
            self.wake.clear()
            await wait_set(self.wake, max(0.05, wake_at - now))

    async def _due(self, now: float) -> tuple[set[str], set[str], float]:
        e = self.engine
        cheap: set[str] = set()
        full: set[str] = set()
        wake_at = now + 3600.0
        for service in await e.db(e.state.services):
            active = await e.db(e.state.active_revision, service)
            if active is None:
                continue
            interval = float(active.config.get("drift_interval") or DEFAULT_INTERVAL)
            full_interval = float(active.config.get("drift_full_interval") or DEFAULT_FULL_INTERVAL)
            next_cheap = self.next_cheap.setdefault(service, now + interval)
            next_full = self.next_full.setdefault(service, now + full_interval)
            if next_full <= now:
                full.add(service)
                self.next_full[service] = now + full_interval
                self.next_cheap[service] = now + interval
            elif next_cheap <= now:
                cheap.add(service)
                self.next_cheap[service] = now + interval
            wake_at = min(wake_at, self.next_cheap[service], self.next_full[service])
        return cheap, full, wake_at

    # checking

    async def check(
        self, services: Sequence[str] | None = None, *, full: bool = True, act: bool = True
    ) -> dict[str, Any]:
        """One pass over ``services`` (all when None): the report, and, with ``act``, each
        drifted instance handled as its service says."""
        e = self.engine
        async with self.lock:
            started = time.time()
            cpu_before = time.process_time()
            known = set(await e.db(e.state.services))
            if services is not None:
                for name in services:
                    if name not in known:
                        raise KilnError(f"no service {name!r}")
            names = sorted(known if services is None else set(services))
            work = _Pass(full)
            drifts: list[InstanceDrift] = []
            checked = 0
            for service in names:
                for rec in await e.db(e.state.instances, service, True):
                    if rec.state not in _CHECKED_STATES or rec.handle is None:
                        continue
                    checked += 1
                    try:
                        rev = await e.revision(rec.service, rec.revision)
                    except KilnError as err:
                        work.errors.append(f"{rec.id}: {err}")
                        continue
                    drift = await e.io(self._check_instance, rec, rev, work)
                    if drift is not None:
                        drifts.append(drift)
            drifts.extend(await self._extras(names if services is not None else None))
            drifts.extend(await self._set_aside(names))
            rebuilt = await self._rebuild_snapshots(work, drifts) if act else []
            if act:
                for drift in drifts:
                    await self._handle(drift)
            await e.io(self._sweep_aside)
            cpu = time.process_time() - cpu_before
            self.cpu_seconds = [*self.cpu_seconds[-99:], (full, checked, cpu)]
            report = {
                "checked_at": started,
                "full": full,
                "services": names,
                "instances_checked": checked,
                "drift": [d.to_json() for d in drifts],
                "snapshots_rebuilt": rebuilt,
                "errors": work.errors,
                "seconds": time.time() - started,
                "cpu_seconds": cpu,
            }
            for drift in drifts:
                self.reports[drift.instance] = {**drift.to_json(), "checked_at": started}
            return report

    def _check_instance(
        self, rec: InstanceRecord, rev: Revision, work: _Pass
    ) -> InstanceDrift | None:
        """Runs in the pool: the instance's process, launch plan and root against ``rev``."""
        runtime = self.engine.runtime
        if isinstance(runtime, DriftInspector):
            return self._inspect(runtime, rec, rev, work)
        from kiln.runtime.local import LocalRuntime

        if not isinstance(runtime, LocalRuntime):
            return None  # a runtime that can say nothing of its instances (the fake)
        from kiln.agent.lifecycle import handle_of
        from kiln.process import proc_start_time

        def drift(
            what: str, detail: str, files: list[FileDifference] | None = None
        ) -> InstanceDrift:
            return InstanceDrift(rec.service, rec.id, rec.revision, what, detail, files or [])

        handle = handle_of(rec)
        if handle is None:
            return None
        if not runtime.recover(handle):
            return None  # gone: its watcher reports the death and the reconciler replaces it
        sandbox_pid = handle.data.get("sandbox_pid")
        if sandbox_pid and proc_start_time(int(sandbox_pid)) != handle.data.get(
            "sandbox_start_time"
        ):
            return drift("process", f"the sandbox init (pid {sandbox_pid}) is not the one started")
        directory = runtime.instances_dir / rec.id
        plan = _read_json(directory / "spec.json")
        if plan is None:
            return drift("config", "its launch plan (spec.json) is missing or unreadable")
        meta = plan.get("meta") or {}
        if meta.get("image_digest") != rev.image_digest or meta.get("revision") != rev.number:
            return drift(
                "config",
                f"runs image {str(meta.get('image_digest'))[:19]}… r{meta.get('revision')}, "
                f"not {rev.image_digest[:19]}… r{rev.number}",
            )
        env = plan.get("env") or {}
        for key, value in sorted((rev.config.get("env") or {}).items()):
            if env.get(key) != str(value):
                return drift("config", f"env {key} is not the revision's")
        ignored = ignore_rule(
            [str(w) for w in rev.config.get("writable") or []],
            [str(p) for p in rev.config.get("drift_ignore") or []],
        )
        files: list[FileDifference] = []
        for layer in plan.get("layers") or []:
            found = self._snapshot_differences(Path(layer).parent, work)
            if found:
                files.extend(f for f in found if not ignored(f.path))
        if files:
            return drift("snapshot", f"{len(files)} file(s) of its image layers changed", files)
        upper = self._upper_differences(runtime, handle.data, directory, ignored)
        if upper:
            return drift("files", f"{len(upper)} file(s) written into its root", upper)
        return None

    def _inspect(
        self, runtime: DriftInspector, rec: InstanceRecord, rev: Revision, work: _Pass
    ) -> InstanceDrift | None:
        """A runtime that asks its engine (docker, swarm): what it finds, less the
        service's ``drift_ignore`` paths."""
        from kiln.agent.lifecycle import handle_of

        handle = handle_of(rec)
        if handle is None:
            return None
        writable = tuple(str(w) for w in rev.config.get("writable") or [])
        env = {str(k): str(v) for k, v in (rev.config.get("env") or {}).items()}
        expected = DriftExpectation(rev.image_digest, rev.number, env, writable)
        try:
            found = runtime.check_drift(handle, expected)
        except KilnError as err:
            work.errors.append(f"{rec.id}: {err}")
            return None
        if found is None:
            return None
        ignored = ignore_rule(writable, [str(p) for p in rev.config.get("drift_ignore") or []])
        files = [f for f in found.files if not ignored(f.path)]
        detail = found.detail
        if found.what == "files":
            if not files:
                return None
            detail = f"{len(files)} file(s) written into its root"
        return InstanceDrift(rec.service, rec.id, rec.revision, found.what, detail, files)

    def _snapshot_differences(self, snapshot: Path, work: _Pass) -> list[FileDifference] | None:
        if snapshot in work.snapshots:
            return work.snapshots[snapshot]
        differences: list[FileDifference] | None
        try:
            manifest = read_manifest(snapshot)
            if manifest is None:
                differences = [FileDifference("/", "changed", "no manifest was recorded")]
            else:
                differences = compare_tree(snapshot / "fs", manifest, full=work.full)
        except (KilnError, OSError) as err:
            work.errors.append(f"snapshot {snapshot.name}: {err}")
            differences = None
        work.snapshots[snapshot] = differences
        return differences

    def _upper_differences(
        self,
        runtime: Any,
        data: dict[str, Any],
        directory: Path,
        ignored: Callable[[str], bool],
    ) -> list[FileDifference]:
        """What the overlay's upper dir holds beyond the mount points runc made, read
        through the shim's mount namespace (the view is mounted there only)."""
        shim_pid = int(data.get("shim_pid") or 0)
        upper = Path(f"/proc/{shim_pid}/root") / str(runtime.view_dir(directory.name)).lstrip("/")
        upper = upper / "upper"
        config = _read_json(directory / "bundle" / "config.json") or {}
        targets = {str(m.get("destination", "")).rstrip("/") for m in config.get("mounts") or []}
        found: list[FileDifference] = []
        try:
            stack = [upper]
            while stack:
                current = stack.pop()
                with os.scandir(current) as entries:
                    for item in entries:
                        st = item.stat(follow_symlinks=False)
                        rel = "/" + Path(item.path).relative_to(upper).as_posix()
                        if stat.S_ISDIR(st.st_mode):
                            stack.append(Path(item.path))  # a copied-up parent: its files count
                            continue
                        empty_target = rel in targets and st.st_size == 0
                        if empty_target or ignored(rel):
                            continue
                        if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                            found.append(FileDifference(rel, "removed", "deleted from the image"))
                            continue
                        kind = "file" if stat.S_ISREG(st.st_mode) else "entry"
                        found.append(FileDifference(rel, "added", f"{kind}, {st.st_size} bytes"))
        except OSError:
            return []  # the shim left meanwhile: its watcher handles that
        return sorted(found, key=lambda d: d.path)

    async def _extras(self, services: Sequence[str] | None) -> list[InstanceDrift]:
        """Sandboxes the runtime lists under this home that no live record names."""
        e = self.engine
        handles = await e.io(e.runtime.list)
        known = {rec.id for rec in await e.db(e.state.instances, None, True)}
        out: list[InstanceDrift] = []
        for handle in handles:
            if handle.instance_id in known:
                continue
            service = str(handle.data.get("service") or "?")
            if services is not None and service not in services:
                continue
            out.append(
                InstanceDrift(
                    service,
                    handle.instance_id,
                    None,
                    "extra",
                    "an instance the runtime lists under this home that no record names",
                )
            )
        return out

    # repairing

    async def _rebuild_snapshots(self, work: _Pass, drifts: list[InstanceDrift]) -> list[str]:
        """Every snapshot found changed, rebuilt from its verified blob; the old tree set
        aside with the ids of the instances on it."""
        e = self.engine
        changed = [path for path, diffs in work.snapshots.items() if diffs]
        rebuilt: list[str] = []
        for path in changed:
            on_it = [d.instance for d in drifts if d.what == "snapshot"]
            try:
                aside = await e.io(self._rebuild_one, path, on_it)
            except (KilnError, OSError) as err:
                work.errors.append(f"rebuilding snapshot {path.name}: {err}")
                continue
            rebuilt.append(path.name)
            e.emit(
                "snapshot.rebuilt",
                f"layer snapshot {path.name} changed on disk: rebuilt from its verified blob",
                data={"snapshot": path.name, "set_aside": str(aside) if aside else None},
            )
        return rebuilt

    def _rebuild_one(self, snapshot: Path, instances: list[str]) -> Path | None:
        from kiln.image.snapshots import SnapshotStore
        from kiln.image.store import ImageStore

        record = _read_json(snapshot / "chain.json") or {}
        chain = record.get("chain_id")
        if not isinstance(chain, str):
            raise KilnError(f"snapshot {snapshot.name} has no chain record")
        home = self.engine.home
        _new, aside = SnapshotStore(home).rebuild(ImageStore(home / "images"), chain)
        if aside is not None:
            (aside / _ASIDE_RECORD).write_text(json.dumps(sorted(instances)))
        return aside

    async def _set_aside(self, services: Sequence[str]) -> list[InstanceDrift]:
        """Instances still on a snapshot set aside by an earlier pass (or agent)."""
        e = self.engine
        out: list[InstanceDrift] = []
        aside_ids = await e.io(self._aside_instances)
        for rec in await e.db(e.state.instances, None, True):
            if rec.id in aside_ids and rec.service in services and rec.state in _CHECKED_STATES:
                out.append(
                    InstanceDrift(
                        rec.service,
                        rec.id,
                        rec.revision,
                        "snapshot",
                        "still on a layer snapshot found changed earlier",
                    )
                )
        return out

    def _aside_instances(self) -> dict[str, Path]:
        from kiln.image.snapshots import SnapshotStore

        out: dict[str, Path] = {}
        for path in SnapshotStore(self.engine.home).drifted():
            try:
                listed = json.loads((path / _ASIDE_RECORD).read_text())
            except (OSError, ValueError):
                continue
            if isinstance(listed, list):
                out.update({str(i): path for i in listed})
        return out

    def _sweep_aside(self) -> None:
        """Set-aside snapshots go once no instance listed in them is alive."""
        from kiln.image.snapshots import SnapshotStore

        live = {h.instance_id for h in self.engine.runtime.list()}
        keep = {path for iid, path in self._aside_instances().items() if iid in live}
        SnapshotStore(self.engine.home).remove_drifted(keep)

    async def _handle(self, drift: InstanceDrift) -> None:
        e = self.engine
        listed = ", ".join(f"{f.path} ({f.change})" for f in drift.files[:5])
        more = f" and {len(drift.files) - 5} more" if len(drift.files) > 5 else ""
        message = f"{drift.instance} drifted ({drift.what}): {drift.detail}"
        if listed:
            message += f": {listed}{more}"
        if drift.what == "extra":
            listed_now = await e.io(e.runtime.list)
            handle = next((h for h in listed_now if h.instance_id == drift.instance), None)
            if handle is not None:
                await e.io(e.runtime.destroy, handle)
            drift.action = "removed"
            e.emit("instance.drift", message + "; removed", drift.service, drift.instance,
                   None, drift.to_json())  # fmt: skip
            return
        rec = await e.db(e.state.instance, drift.instance)
        rev = await e.revision(rec.service, rec.revision)
        on_drift = str(rev.config.get("on_drift") or "replace")
        if on_drift == "warn":
            drift.action = "warned"
            signature = json.dumps(drift.to_json(), sort_keys=True)
            if self.warned.get(drift.instance) != signature:
                self.warned[drift.instance] = signature
                e.emit("instance.drift", message + "; on_drift = warn: left running",
                       rec.service, rec.id, rec.revision, drift.to_json())  # fmt: skip
            return
        if rec.replaced_by is not None or rec.state not in _REPLACEABLE_STATES:
            drift.action = f"replacement {rec.replaced_by} under way" if rec.replaced_by else "none"
            return
        await e.db(e.state.cas_instance, rec.id, _REPLACEABLE_STATES, noticed=time.time())
        replacement = await e.lifecycle.new(rec.service, rev, replaces=rec.id)
        drift.action = f"replaced by {replacement.id}"
        e.emit("instance.drift", message, rec.service, rec.id, rec.revision, drift.to_json())
        e.emit(
            "reconcile.replace",
            f"replacing {rec.id} (drift: {drift.detail}) with {replacement.id}",
            rec.service,
            rec.id,
            rev.number,
            {"replacement": replacement.id, "reason": f"drift: {drift.detail}"},
        )
        e.lifecycle.launch(replacement, rev)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
