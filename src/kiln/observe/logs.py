"""Instance logs that outlive their instances.

Layout under ``root`` (``KILN_HOME/logs``)::

    <service>/<instance>.log    JSONL: {"ts": float, "stream": "stdout"|"stderr", "line": str}
    <service>/<instance>.json   LogMeta: service, instance, revision, image_digest, started

The writer is the runtime's shim, never the agent, so lines keep flowing while
the agent restarts. Each line is one ``write(2)`` on an ``O_APPEND`` descriptor:
readers never see half a line from a live writer, and nothing sits in a buffer
when the writer dies. This module stays import-light because the shim loads it
on every instance start.
"""

from __future__ import annotations

import heapq
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from collections.abc import Set as AbstractSet
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kiln.errors import KilnError
from kiln.paths import open_private, private_dirs, write_private

__all__ = ["STREAMS", "LogLine", "LogMeta", "LogStore", "LogWriter"]

STREAMS = ("stdout", "stderr")
_NAME_FORBIDDEN = ("/", "\\", "\0")


@dataclass(frozen=True)
class LogLine:
    ts: float
    instance: str
    stream: str
    line: str


@dataclass(frozen=True)
class LogMeta:
    service: str
    instance: str
    revision: int
    image_digest: str
    started: float

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> LogMeta:
        return cls(
            service=str(d["service"]),
            instance=str(d["instance"]),
            revision=int(d["revision"]),
            image_digest=str(d["image_digest"]),
            started=float(d["started"]),
        )


def _check_name(kind: str, name: str) -> None:
    if not name or name in (".", "..") or any(c in name for c in _NAME_FORBIDDEN):
        raise KilnError(f"logs: invalid {kind} name {name!r}")


class LogWriter:
    """Appends one instance's lines; opened by the shim for the instance's lifetime."""

    def __init__(self, store: LogStore, meta: LogMeta) -> None:
        _check_name("service", meta.service)
        _check_name("instance", meta.instance)
        self.meta = meta
        directory = store.root / meta.service
        private_dirs(directory)  # logs hold whatever apps print, secrets included: owner-only
        write_private(
            directory / f"{meta.instance}.json",
            json.dumps(asdict(meta), sort_keys=True).encode(),
        )
        self._fd: int | None = open_private(
            directory / f"{meta.instance}.log", os.O_WRONLY | os.O_APPEND
        )

    def write(self, stream: str, line: str, ts: float | None = None) -> None:
        if self._fd is None:
            raise KilnError(f"logs: writer for instance {self.meta.instance} is closed")
        if stream not in STREAMS:
            raise KilnError(f"logs: unknown stream {stream!r} (known: {', '.join(STREAMS)})")
        record = {"ts": time.time() if ts is None else ts, "stream": stream, "line": line}
        data = (json.dumps(record, ensure_ascii=False) + "\n").encode()
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> LogWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _parse_lines(data: bytes, instance: str) -> Iterator[LogLine]:
    for raw in data.splitlines():
        try:
            record = json.loads(raw)
            yield LogLine(
                ts=float(record["ts"]),
                instance=instance,
                stream=str(record["stream"]),
                line=str(record["line"]),
            )
        except (ValueError, KeyError, TypeError):
            continue


class _Tail:
    """Reads only complete lines past an offset, so a follower never splits a record."""

    def __init__(self, path: Path, instance: str) -> None:
        self.path = path
        self.instance = instance
        self.offset = 0

    def read_new(self) -> list[LogLine]:
        try:
            with self.path.open("rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n")
        if end < 0:
            return []
        self.offset += end + 1
        return list(_parse_lines(data[: end + 1], self.instance))


StopCondition = threading.Event | Callable[[], bool]


def _stopped(stop: StopCondition | None) -> bool:
    if stop is None:
        return False
    if isinstance(stop, threading.Event):
        return stop.is_set()
    return stop()


class LogStore:
    """Reads, follows and prunes the logs of every instance, live or gone."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def writer(self, meta: LogMeta) -> LogWriter:
        return LogWriter(self, meta)

    def services(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir())

    def _service_dir(self, service: str) -> Path:
        _check_name("service", service)
        directory = self.root / service
        if not directory.is_dir():
            known = ", ".join(self.services()) or "none"
            raise KilnError(f"logs: no service {service!r} in {self.root} (known: {known})")
        return directory

    def instances(self, service: str) -> list[LogMeta]:
        """Every instance with a log for ``service``, oldest first."""
        directory = self._service_dir(service)
        metas = []
        for path in directory.glob("*.json"):
            if path.name.startswith("."):
                continue
            try:
                metas.append(LogMeta.from_json(json.loads(path.read_text())))
            except (OSError, ValueError, KeyError, TypeError):
                continue
        return sorted(metas, key=lambda m: (m.started, m.instance))

    def _log_paths(self, service: str, instance: str | None) -> dict[str, Path]:
        directory = self._service_dir(service)
        paths = {p.stem: p for p in directory.glob("*.log")}
        if instance is None:
            return paths
        _check_name("instance", instance)
        if instance not in paths:
            known = ", ".join(sorted(paths)) or "none"
            raise KilnError(
                f"logs: service {service!r} has no instance {instance!r} (known: {known})"
            )
        return {instance: paths[instance]}

    def read(
        self, service: str, instance: str | None = None, since: float | None = None
    ) -> Iterator[LogLine]:
        """Lines so far, merged by time across instances when ``instance`` is None."""
        paths = self._log_paths(service, instance)
        per_instance = []
        for name, path in sorted(paths.items()):
            lines = _Tail(path, name).read_new()
            if since is not None:
                lines = [line for line in lines if line.ts >= since]
            per_instance.append(lines)
        return heapq.merge(*per_instance, key=lambda line: line.ts)

    def follow(
        self,
        service: str,
        instance: str | None = None,
        since: float | None = None,
        stop: StopCondition | None = None,
        poll: float = 0.2,
    ) -> Iterator[LogLine]:
        """Existing lines, then new ones as they are written, until ``stop`` says so.

        With ``instance`` None, instances that appear later are followed too.
        Each poll's new lines are yielded in time order.
        """
        self._log_paths(service, instance)
        tails: dict[str, _Tail] = {}
        while True:
            try:
                paths = self._log_paths(service, instance)
            except KilnError:
                paths = {}
            for name, path in paths.items():
                tails.setdefault(name, _Tail(path, name))
            batch: list[LogLine] = []
            for tail in tails.values():
                batch.extend(tail.read_new())
            if since is not None:
                batch = [line for line in batch if line.ts >= since]
            batch.sort(key=lambda line: line.ts)
            yield from batch
            if _stopped(stop):
                return
            if isinstance(stop, threading.Event):
                stop.wait(poll)
            else:
                time.sleep(poll)

    def prune(
        self,
        max_bytes_per_service: int,
        max_age: float,
        live: AbstractSet[str] = frozenset(),
        now: float | None = None,
    ) -> int:
        """Delete logs of instances not in ``live``: older than ``max_age`` seconds
        (by last write), then the oldest until each service fits in
        ``max_bytes_per_service``. Returns how many instance logs were deleted.
        """
        now = time.time() if now is None else now
        deleted = 0
        for service in self.services():
            directory = self.root / service
            entries: list[tuple[float, str, Path, int]] = []
            total = 0
            for path in directory.glob("*.log"):
                try:
                    st = path.stat()
                except FileNotFoundError:
                    continue
                total += st.st_size
                if path.stem not in live:
                    entries.append((st.st_mtime, path.stem, path, st.st_size))
            entries.sort()
            for mtime, name, path, size in entries:
                if now - mtime > max_age or total > max_bytes_per_service:
                    path.unlink(missing_ok=True)
                    (directory / f"{name}.json").unlink(missing_ok=True)
                    total -= size
                    deleted += 1
        return deleted
