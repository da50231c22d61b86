"""The Docker runtime: each instance is a container of a Docker Engine, driven
through the Engine API (the ``docker`` SDK).

What lives where:

* the image, in the engine, loaded from the home's store on first use and
  named ``kiln/<home tag>:<hex of the manifest digest>`` (see
  :meth:`DockerRuntime.image_name`);
* the container ``kiln-<home tag>-<instance>``, labelled ``dev.kiln.*`` with
  the home, project, service, revision and instance, on the home's network
  ``kiln-<home tag>`` (``internal``) or ``kiln-<home tag>-outbound``;
* named volumes ``kiln-<home tag>-<name>``, labelled with the home;
* secrets, as files on a tmpfs of this machine mounted at
  ``/run/kiln/<home tag>/secrets/<instance>`` and bound read-only at
  ``/run/secrets`` (so secrets need the engine on this machine);
* logs: a follower thread per running container copies what Docker captured
  into the home's log store, and resumes after the last line written.

Nothing here keeps state of its own: containers carry their facts in labels,
so a restarted agent (a new ``DockerRuntime``) adopts them by label.
"""

from __future__ import annotations

import builtins
import collections
import contextlib
import errno
import functools
import io
import json
import os
import re
import shutil
import signal as signals
import socket
import stat
import struct
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any, Protocol, TypeVar

import docker
import docker.errors
import requests.exceptions

from kiln.errors import KilnError
from kiln.image.digest import ANNOTATION_REF_NAME
from kiln.image.export import export_image
from kiln.image.file_manifest import FileDifference
from kiln.image.store import ImageStore
from kiln.observe.logs import LogMeta, LogStore, LogWriter
from kiln.oci.config import capability_name
from kiln.oci.launch import mount, umount_detached
from kiln.oci.runc import RUN_ROOT, home_tag
from kiln.runtime import (
    HANDLE_VERSION,
    Capabilities,
    DriftExpectation,
    DriftFinding,
    InstanceHandle,
    InstanceSpec,
    InstanceState,
    InstanceStatus,
    OutputTail,
    RuntimeFailure,
)
from kiln.runtime.procfacts import WRITABLE_TAR_MAX, tar_writable

__all__ = [
    "DEFAULT_HOST",
    "LABEL_HOME",
    "LABEL_INSTANCE",
    "DockerRuntime",
    "EngineClient",
    "LogCopier",
    "LogSource",
    "log_meta",
]

DEFAULT_HOST = "unix:///run/docker.sock"
LABEL_HOME = "dev.kiln.home"
LABEL_PROJECT = "dev.kiln.project"
LABEL_SERVICE = "dev.kiln.service"
LABEL_REVISION = "dev.kiln.revision"
LABEL_INSTANCE = "dev.kiln.instance"
LABEL_IMAGE = "dev.kiln.image"
LABEL_PORT = "dev.kiln.port"
LABEL_STARTED = "dev.kiln.started"
LABEL_STOP_GRACE = "dev.kiln.stop-grace"
LABEL_VOLUME = "dev.kiln.volume"
SECRETS_TARGET = "/run/secrets"
DEFAULT_TMPFS_SIZE = 512 * 1024 * 1024
KILL_TIMEOUT = 10.0
LOG_DRAIN_TIMEOUT = 5.0
MAX_LINE = 64 * 1024
"""A log line longer than this is stored in pieces, as the local runtime's shim does."""
ENGINE_LOG_OPTIONS: dict[str, str] = {}
"""The engine keeps its own copy of a container's output (json-file, which the logs API
can read back), not rotated: following across a rotation loses and repeats lines
(measured with Docker 20.10: a 100 MB burst lost 4.6 MB with 16 MiB × 2 files and was
repeated in part with 64 MiB × 2). It goes with the container at destroy; Kiln's log
store is the copy that lasts."""
POOL_SIZE = 256
"""Connections to the engine: one blocked ``wait`` per watched instance holds one."""
DOCKER_INIT = "/sbin/docker-init"
"""Where the engine binds its init (``init=True``): a mount point in every container."""
_ENGINE_MOUNT_POINTS = ("/etc/hosts", "/etc/hostname", "/etc/resolv.conf", "/dev", "/proc", "/sys")
_DIFF_KINDS = {0: "changed", 1: "added", 2: "removed"}
"""``docker diff``'s change kinds."""
MAX_LAYER_ENTRIES = 100_000
"""Entries of a container's layer read in one drift check: the container controls the
layer, so a flood of entries must not make the agent's pass slow or large; a layer
holding more is drift in itself (reported at ``/``, so no ``drift_ignore`` hides it)."""
MAX_LAYER_FINDINGS = 1_000
"""Changes kept from one layer: the report lists 50 and counts the rest."""
MAX_LAYER_DEPTH = 64
"""Directory levels read below the layer's root; a deeper tree is reported, not walked."""
_OPEN_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_TIMESTAMP = re.compile(rb"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?Z$")
_FRAME_HEADER = struct.Struct(">BxxxL")
_STREAMS = {1: "stdout", 2: "stderr"}
_MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 0x2, 0x4, 0x8


def _engine_reason(error: BaseException) -> str:
    """One line saying why the engine did not answer, without the SDK's nesting."""
    text = str(error)
    if isinstance(error, docker.errors.APIError):
        text = str(error.explanation or error)
    return " ".join(text.split())[:300]


def _parse_id(text: str) -> int | None:
    return int(text) if text.isdigit() else None


def _find_entry(text: str, key: str, id_field: int) -> list[str] | None:
    """The /etc/passwd or /etc/group entry named ``key`` (or with that numeric id)."""
    for line in text.splitlines():
        fields = line.split(":")
        if len(fields) > id_field and key in (fields[0], fields[id_field]):
            return fields
    return None


@functools.lru_cache(maxsize=64)
def _epoch_seconds(whole: bytes) -> int:
    return int(datetime.fromisoformat(whole.decode() + "+00:00").timestamp())


def _docker_timestamp(text: bytes) -> int | None:
    """``2024-05-01T12:34:56.123456789Z`` → nanoseconds since the epoch."""
    m = _TIMESTAMP.match(text)
    if m is None:
        return None
    fraction = (m.group(2) or b"0").decode().ljust(9, "0")
    return _epoch_seconds(m.group(1)) * 1_000_000_000 + int(fraction)


def _frames(read1: Callable[[int], bytes]) -> Iterator[tuple[int, bytes]]:
    """The Engine's multiplexed stream, (stream id, payload) per frame; ``read1`` returns
    what has arrived (up to n bytes) and b"" at the end."""
    buffer = bytearray()
    while True:
        while len(buffer) >= _FRAME_HEADER.size:
            kind, length = _FRAME_HEADER.unpack_from(buffer)
            end = _FRAME_HEADER.size + length
            if len(buffer) < end:
                break
            frame = bytes(buffer[_FRAME_HEADER.size : end])
            del buffer[:end]
            yield kind, frame
        chunk = read1(1 << 16)
        if not chunk:
            return
        buffer += chunk


@dataclass
class _StreamCursor:
    """Where one stream of an instance's log stops: the last time written and the
    lines written at exactly that time (Docker's ``since`` includes it)."""

    last: float | None = None
    at_last: collections.Counter[str] = field(default_factory=collections.Counter)

    def admit(self, ts: float, line: str) -> bool:
        """Whether a line read back from the engine is new (and then remember it)."""
        if self.last is not None:
            if ts < self.last:
                return False
            if ts == self.last and self.at_last[line] > 0:
                self.at_last[line] -= 1
                return False
        if self.last is None or ts > self.last:
            self.last = ts
            self.at_last = collections.Counter()
        return True


def _log_cursors(path: Path) -> dict[str, _StreamCursor]:
    """Each stream's cursor, read back from the end of the instance's log file.

    The log file is the only record of what was copied, so resuming from it can
    neither lose nor repeat a line whatever killed the previous copier.
    """
    cursors = {stream: _StreamCursor() for stream in _STREAMS.values()}
    done: set[str] = set()
    try:
        f = path.open("rb")
    except FileNotFoundError:
        return cursors
    with f:
        end = f.seek(0, os.SEEK_END)
        carry = b""
        while end > 0 and len(done) < len(cursors):
            start = max(0, end - (1 << 20))
            f.seek(start)
            chunk = f.read(end - start) + carry
            end = start
            lines = chunk.split(b"\n")
            carry = lines.pop(0) if start > 0 else b""
            for stream, cursor in cursors.items():
                if stream in done or f'"stream": "{stream}"'.encode() not in chunk:
                    continue
                for raw in reversed(lines):
                    record = _record(raw)
                    if record is None or record[1] != stream:
                        continue
                    ts, _, line = record
                    if cursor.last is None:
                        cursor.last = ts
                    if ts == cursor.last:
                        cursor.at_last[line] += 1
                    elif ts < cursor.last:
                        done.add(stream)
                        break
        return cursors


def _record(raw: bytes) -> tuple[float, str, str] | None:
    if not raw:
        return None
    try:
        record = json.loads(raw)
        return float(record["ts"]), str(record["stream"]), str(record["line"])
    except (ValueError, KeyError, TypeError):
        return None


class _LineAssembler:
    """Docker hands a long line over in pieces (16 KiB each) and a last line
    without its newline; this joins them back into lines of at most MAX_LINE
    bytes, each stamped with the time Docker captured its first piece."""

    def __init__(self) -> None:
        self.pending = b""
        self.ts: float | None = None

    def feed(self, ts: float, payload: bytes) -> list[tuple[float, bytes]]:
        if not self.pending:
            self.ts = ts
        self.pending += payload
        out: list[tuple[float, bytes]] = []
        while True:
            newline = self.pending.find(b"\n", 0, MAX_LINE + 1)
            if newline >= 0:
                out.append((self.ts or ts, self.pending[:newline]))
                self.pending = self.pending[newline + 1 :]
            elif len(self.pending) > MAX_LINE:
                out.append((self.ts or ts, self.pending[:MAX_LINE]))
                self.pending = self.pending[MAX_LINE:]
            else:
                break
            self.ts = ts
        return out

    def flush(self) -> list[tuple[float, bytes]]:
        if not self.pending or self.ts is None:
            return []
        out = [(self.ts, self.pending)]
        self.pending, self.ts = b"", None
        return out


class LogSource(Protocol):
    """What a log copier needs of its runtime: where logs go, and a connection of its own."""

    logs_dir: Path

    def new_api(self, timeout: float = 60.0) -> Any: ...


class LogCopier:
    """Copies one container's (or Swarm service's) output from the engine into the
    home's log store.

    ``follow``: keep reading until the container stops (or :meth:`cancel`);
    otherwise copy what the engine holds and return. Either way it starts
    after the last line the log file already has. ``source`` is the Engine API
    path of the log stream: a container's, or a Swarm service's (the same frames).
    """

    def __init__(
        self,
        runtime: LogSource,
        container_id: str,
        meta: LogMeta,
        follow: bool,
        source: str = "/containers/{0}/logs",
    ) -> None:
        self.runtime = runtime
        self.source = source
        self.container_id = container_id
        self.meta = meta
        self.follow = follow
        self.cancelled = threading.Event()
        self._socket: socket.socket | None = None
        self._lock = threading.Lock()

    def cancel(self) -> None:
        """Stop a follower blocked on the engine: shut its socket down under it."""
        self.cancelled.set()
        with self._lock:
            if self._socket is not None:
                with contextlib.suppress(OSError):
                    self._socket.shutdown(socket.SHUT_RDWR)

    def run(self) -> None:
        store = LogStore(self.runtime.logs_dir)
        path = store.root / self.meta.service / f"{self.meta.instance}.log"
        cursors = _log_cursors(path)
        known = [c.last for c in cursors.values() if c.last is not None]
        params: dict[str, Any] = {
            "stdout": 1,
            "stderr": 1,
            "timestamps": 1,
            "follow": 1 if self.follow else 0,
            "tail": "all",
        }
        if known and len(known) == len(cursors):
            params["since"] = str(max(0, int(min(known)) - 1))
        # A copier that fails (the engine restarted, the home went) just ends: its
        # lines stay in the engine, and the next recover or destroy copies them.
        with contextlib.suppress(Exception):
            api = self.runtime.new_api()
            try:
                with store.writer(self.meta) as writer:
                    self._copy(api, params, cursors, writer)
            finally:
                api.close()

    def _copy(
        self,
        api: Any,
        params: dict[str, Any],
        cursors: dict[str, _StreamCursor],
        writer: LogWriter,
    ) -> None:
        # The SDK's own log stream drops which stream a frame came from; read the
        # multiplexed frames ourselves, with its helpers for the request and socket.
        response = api._get(api._url(self.source, self.container_id), params=params, stream=True)
        api._raise_for_status(response)
        raw = api._get_raw_response_socket(response)
        api._disable_socket_timeout(raw)
        sock = getattr(raw, "_sock", raw)
        with self._lock:
            self._socket = sock if isinstance(sock, socket.socket) else None
        if self.cancelled.is_set():
            return
        assemblers = {stream: _LineAssembler() for stream in cursors}

        def emit(stream: str, pieces: list[tuple[float, bytes]]) -> None:
            for ts, data in pieces:
                line = data.decode("utf-8", errors="replace")
                if cursors[stream].admit(ts, line):
                    writer.write(stream, line, ts=ts)

        # urllib3 2 reads what has arrived with read1; urllib3 1 leaves it to http.client.
        read1 = getattr(response.raw, "read1", None) or response.raw._fp.read1
        try:
            for kind, frame in _frames(read1):
                stream = _STREAMS.get(kind)
                if stream is None or not frame:
                    continue
                stamp, _, payload = frame.partition(b" ")
                nanos = _docker_timestamp(stamp)
                if nanos is None:
                    continue
                emit(stream, assemblers[stream].feed(nanos / 1_000_000_000, payload))
        finally:
            response.close()
        if not self.cancelled.is_set():
            for stream, assembler in assemblers.items():
                emit(stream, assembler.flush())


@dataclass
class _Follower:
    copier: LogCopier
    thread: threading.Thread


def log_meta(labels: dict[str, str]) -> LogMeta:
    """What the log store records of an instance, read back from its ``dev.kiln.*`` labels."""
    return LogMeta(
        service=str(labels[LABEL_SERVICE]),
        instance=str(labels[LABEL_INSTANCE]),
        revision=int(labels.get(LABEL_REVISION) or 0),
        image_digest=str(labels.get(LABEL_IMAGE) or ""),
        started=float(labels.get(LABEL_STARTED) or 0.0),
    )


def _with_parents(paths: Iterable[str]) -> set[str]:
    """Every path given and every directory above it (``/a/b`` → ``/a/b``, ``/a``)."""
    out: set[str] = set()
    for path in paths:
        while path and path not in out:
            out.add(path)
            path = path.rpartition("/")[0]
    return out


def _opaque(directory_fd: int) -> bool:
    """An overlay directory that hides what the layers below hold under it (``user.``
    where the engine mounts its overlays with ``userxattr``, as a rootless one does)."""
    for name in ("trusted.overlay.opaque", "user.overlay.opaque"):
        with contextlib.suppress(OSError):
            if os.getxattr(directory_fd, name) == b"y":
                return True
    return False


class _LayerWalk:
    """A read of a container's writable layer, whose content the container controls:
    every directory is opened from its parent's descriptor with ``O_NOFOLLOW`` (a
    directory swapped for a symlink between listing and opening is never followed out
    of the layer), nothing but directories is opened (a FIFO, a device or a huge file is
    only ``lstat``-ed), and the entries, changes and depth read are bounded."""

    def __init__(self, lowers: list[Path], targets: set[str], holding_mounts: set[str]):
        self.lowers = lowers
        self.targets = targets
        self.holding_mounts = holding_mounts
        self.found: builtins.list[FileDifference] = []
        self.entries = 0
        self.exhausted = False

    def in_image(self, rel: str) -> bool:
        return any(os.path.lexists(lower / rel.lstrip("/")) for lower in self.lowers)

    def add(self, path: str, change: str, detail: str) -> None:
        if len(self.found) < MAX_LAYER_FINDINGS:
            self.found.append(FileDifference(path, change, detail))

    def directory(self, fd: int, rel_dir: str, depth: int) -> None:
        """Read the directory open at ``fd`` (``rel_dir`` in the container, "" at its
        root) and everything below it, within the bounds."""
        if rel_dir and _opaque(fd):
            self.add(rel_dir, "changed", "directory replaced")
        empty = True
        with os.scandir(fd) as listing:
            for item in listing:
                empty = False
                self.entries += 1
                if self.entries > MAX_LAYER_ENTRIES:
                    self.exhausted = True
                    return
                self.entry(fd, item, f"{rel_dir}/{item.name}", depth)
                if self.exhausted:
                    return
        if empty and rel_dir and rel_dir not in self.holding_mounts and not self.in_image(rel_dir):
            self.add(rel_dir, "added", "empty directory")

    def entry(self, parent_fd: int, item: os.DirEntry[str], rel: str, depth: int) -> None:
        try:
            st = item.stat(follow_symlinks=False)
        except FileNotFoundError:
            return  # removed while read: the next pass sees what replaced it
        if stat.S_ISDIR(st.st_mode):
            if depth >= MAX_LAYER_DEPTH:
                self.add(rel, "added", f"directory deeper than {MAX_LAYER_DEPTH} levels")
                return
            try:
                child = os.open(item.name, _OPEN_DIRECTORY, dir_fd=parent_fd)
            except FileNotFoundError:
                return
            except OSError as e:
                if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                self.add(rel, "added", "entry swapped while read")
                return
            try:
                self.directory(child, rel, depth + 1)
            finally:
                os.close(child)
        elif rel in self.targets and st.st_size == 0:
            return  # a mount point (docker-init's, a file secret's)
        elif stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
            self.add(rel, "removed", "deleted from the image")
        elif self.in_image(rel):
            self.add(rel, "changed", "changed in its layer")
        else:
            kind = "file" if stat.S_ISREG(st.st_mode) else "entry"
            self.add(rel, "added", f"{kind}, {st.st_size} bytes")


def _spool(stream: Iterable[bytes], into: IO[bytes], limit: int) -> int | None:
    """Copy ``stream`` into ``into``; the bytes copied, or None once more than ``limit``
    came (the rest is not read)."""
    size = 0
    for chunk in stream:
        size += len(chunk)
        if size > limit:
            return None
        into.write(chunk)
    return size


_T = TypeVar("_T")


def _within(seconds: float, call: Callable[[], _T]) -> _T:
    """``call()``, given up after ``seconds`` in all (``requests`` Timeout): a client's
    timeout bounds each read, and an engine that answers every read at once but never
    ends its answer (measured: 20 s of a byte every 0.2 s went through a 1 s timeout)
    would hold the caller (a drift pass, an exec, a quarantine) as long as it likes.
    The call's thread is left to end when the engine hangs up or a read times out."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = call()
        except BaseException as e:
            outcome["error"] = e

    worker = threading.Thread(target=run, name="kiln-engine-call", daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise requests.exceptions.Timeout(f"did not answer within {seconds:g}s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]  # type: ignore[no-any-return]


def _runs_in(pid: int, container_id: str) -> bool:
    """Whether ``pid`` is a process of this machine in the container's cgroup (an engine
    in another pid namespace reports pids that mean something else here)."""
    if pid <= 0:
        return False
    try:
        return container_id in Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return False


def _check_capabilities(who: str, cap_add: Iterable[str]) -> None:
    for cap in cap_add:
        try:
            capability_name(cap)
        except KilnError as e:
            raise RuntimeFailure(f"{who}: {e}") from e


class EngineClient:
    """What the docker and swarm runtimes share as clients of one Engine API: the error
    wrapping that names the instance and what to do, fresh connections, handle checks."""

    name: str
    tag: str
    host: str
    api_version: str
    api: Any
    from_env = False
    """True where the engine comes from ``DOCKER_HOST`` with its TLS settings."""
    local_engine = False
    """True where the engine runs on this machine (a unix socket): its containers' layers
    and processes can be read here."""
    engine_title = "the docker engine"
    """How messages name the engine (``the docker engine at HOST``)."""
    archive_timeout: float | None = None
    """Seconds one path's archive may take in all, where the engine is not trusted to
    end it (a node's engine trickling it would hold a quarantine); None: no bound."""

    def _unreachable(self, who: str, error: BaseException) -> str:
        """One line saying the engine did not answer and what to do; each runtime's own."""
        raise NotImplementedError

    @contextlib.contextmanager
    def _engine(self, instance_id: str | None, doing: str) -> Iterator[None]:
        """Engine errors as RuntimeFailures naming the instance and what to do."""
        who = f"instance {instance_id}" if instance_id else f"{self.name} runtime (home {self.tag})"
        try:
            yield
        except RuntimeFailure:
            raise
        except docker.errors.APIError as e:
            raise RuntimeFailure(
                f"{who}: {doing}: {self.engine_title} at {self.host} refused: {_engine_reason(e)}"
            ) from e
        except (docker.errors.DockerException, requests.exceptions.RequestException) as e:
            raise RuntimeFailure(f"{self._unreachable(who, e)} (while trying to {doing})") from e

    def new_api(self, timeout: float = 60.0) -> Any:
        """A connection of its own, for a call that blocks (a log follower, an exec)."""
        if self.from_env:
            return docker.from_env(version=self.api_version, timeout=timeout).api
        return docker.APIClient(base_url=self.host, version=self.api_version, timeout=timeout)

    def _instance_labels(self, spec: InstanceSpec, started: float) -> dict[str, str]:
        """The ``dev.kiln.*`` labels that let a restarted agent adopt the instance."""
        labels = {
            LABEL_HOME: self.tag,
            LABEL_SERVICE: spec.service,
            LABEL_REVISION: str(spec.revision),
            LABEL_INSTANCE: spec.instance_id,
            LABEL_IMAGE: spec.image_digest,
            LABEL_PORT: str(spec.port),
            LABEL_STARTED: repr(started),
            LABEL_STOP_GRACE: repr(spec.stop_grace),
        }
        if spec.project:
            labels[LABEL_PROJECT] = spec.project
        return labels

    def _check_runnable(self, spec: InstanceSpec, who: str) -> None:
        """What no engine runtime runs: raw layer trees (it runs stored images), no command."""
        if spec.layers:
            raise RuntimeFailure(
                f"{who}: the {self.name} runtime runs images from the home's store, not raw "
                "layer trees (InstanceSpec.layers); bake the image and give its digest"
            )
        if not spec.command:
            raise RuntimeFailure(f"{who}: no command to run")

    def _check_handle(self, handle: InstanceHandle) -> None:
        if handle.runtime != self.name:
            raise RuntimeFailure(
                f"instance {handle.instance_id}: handle is for runtime {handle.runtime!r}, "
                f"not {self.name!r}"
            )

    def _pause(self, who: str, attrs: dict[str, Any]) -> None:
        """``docker pause``: the engine's cgroup freezer on the container (once)."""
        if (attrs.get("State") or {}).get("Paused"):
            return
        with self._engine(who, "pause the container"):
            self.api.pause(attrs["Id"])

    def _unpause(self, who: str, attrs: dict[str, Any]) -> None:
        if not (attrs.get("State") or {}).get("Paused"):
            return
        with self._engine(who, "unpause the container"):
            self.api.unpause(attrs["Id"])

    def _evidence(
        self,
        who: str,
        attrs: dict[str, Any],
        address: str,
        writable: builtins.list[str],
        into: Path,
    ) -> dict[str, Any]:
        """The writable paths into ``into/writable.tar``, its processes as ``docker top``
        lists them, its address and ports from inspect. The writable paths are tmpfs
        mounts, which only the container's own mount namespace holds: the engine's
        archive endpoint (``docker cp``) returns the empty directory beneath (measured
        with Docker 20.10). So a frozen container of an engine on this machine is read
        as the local runtime reads its instances, through ``/proc/PID/root`` (frozen, it
        cannot swap a directory for a link while the walk reads it); otherwise the
        archive endpoint is all there is."""
        state = attrs.get("State") or {}
        pid = int(state.get("Pid") or 0)
        container_id = str(attrs["Id"])
        if self.local_engine and state.get("Paused") and _runs_in(pid, container_id):
            kept = tar_writable(
                pid, writable, into / "writable.tar", None, lambda: _runs_in(pid, container_id)
            )
        else:
            kept = self._archive_writable(who, str(attrs["Id"]), writable, into)
        with self._engine(who, "list its processes"):
            top = self.api.top(attrs["Id"])
        titles = [str(t) for t in top.get("Titles") or []]
        processes = [dict(zip(titles, row, strict=False)) for row in top.get("Processes") or []]
        ports = (attrs.get("NetworkSettings") or {}).get("Ports") or {}
        return {
            "processes": processes,
            "network": {"address": address, "listening": sorted(ports)},
            "writable": kept,
        }

    def _archive_writable(
        self, who: str, container_id: str, writable: builtins.list[str], into: Path
    ) -> dict[str, Any]:
        """Each path as the archive endpoint gives it, one tar in the tar, at most
        ``WRITABLE_TAR_MAX`` bytes in all (the instance controls what they hold: a path
        past the bound is listed as cut, not kept)."""
        stored = 0
        refused: builtins.list[str] = []
        cut: builtins.list[str] = []
        with tarfile.open(into / "writable.tar", "w", format=tarfile.PAX_FORMAT) as out:
            for path in writable:
                with tempfile.TemporaryFile(dir=into) as spool:
                    try:
                        with self._engine(who, f"archive {path}"):
                            size = self._spool_archive(container_id, path, spool, stored)
                    except (KilnError, docker.errors.APIError):
                        refused.append(path)
                        continue
                    if size is None:
                        cut.append(path)
                        continue
                    spool.seek(0)
                    info = tarfile.TarInfo(path.strip("/").replace("/", "_") + ".tar")
                    info.size = size
                    out.addfile(info, spool)
                    stored += size
        return {"bytes": stored, "cut": cut, "refused": refused}

    def _spool_archive(
        self, container_id: str, path: str, spool: IO[bytes], stored: int
    ) -> int | None:
        """One path's archive into ``spool`` (see :func:`_spool`), within
        ``archive_timeout`` in all where it is set: a read of the stream waits for its
        whole buffer, so only a bound on the whole copy holds an engine that trickles."""

        def copy() -> int | None:
            stream, _ = self.api.get_archive(container_id, path)
            return _spool(stream, spool, WRITABLE_TAR_MAX - stored)

        return copy() if self.archive_timeout is None else _within(self.archive_timeout, copy)

    def _written(self, attrs: dict[str, Any]) -> builtins.list[FileDifference]:
        """What was written into the container's root outside the mount points the
        runtime and the engine made: read from its layer on this machine where it can
        be, else ``docker diff`` (less the directories made to hold mount points and the
        parents the engine lists above each change)."""
        host_config = attrs.get("HostConfig") or {}
        targets = {str(m.get("Destination") or "") for m in attrs.get("Mounts") or []}
        targets |= {str(t) for t in host_config.get("Tmpfs") or {}}
        targets |= set(_ENGINE_MOUNT_POINTS)
        if host_config.get("Init"):
            targets.add(DOCKER_INIT)
        targets = {t.rstrip("/") for t in targets if t.startswith("/")}
        holding_mounts = _with_parents(targets)
        in_layer = self._layer_changes(attrs, targets, holding_mounts)
        if in_layer is not None:
            return in_layer
        with self._engine(None, "diff the container"):
            changes = self.api.diff(attrs["Id"]) or []
        paths = [str(c.get("Path") or "") for c in changes]
        above_changes = _with_parents(p.rpartition("/")[0] for p in paths)
        found = []
        for change, path in zip(changes, paths, strict=True):
            if path in holding_mounts or path in above_changes or not path.startswith("/"):
                continue
            kind = _DIFF_KINDS.get(int(change.get("Kind") or 0), "changed")
            found.append(FileDifference(path, kind, "in the container's layer (docker diff)"))
        return sorted(found, key=lambda d: d.path)

    def _layer_changes(
        self, attrs: dict[str, Any], targets: set[str], holding_mounts: set[str]
    ) -> builtins.list[FileDifference] | None:
        """The container's writable layer read on this machine (overlay2's upper dir), or
        None where it cannot be (a remote engine, another driver). The engine's diff of a
        running container looks through the mounted overlay, whose caches hide a file
        written into the layer from outside it (measured with Docker 20.10): the layer
        itself does not. Directories are walked, not listed, unless empty or opaque; the
        mount points the engine made there (``targets``, and the empty directories that
        hold them) are not changes."""
        driver = attrs.get("GraphDriver") or {}
        data = driver.get("Data") or {}
        if not self.local_engine or driver.get("Name") != "overlay2" or not data.get("UpperDir"):
            return None
        upper = Path(str(data["UpperDir"]))
        lowers = [Path(p) for p in str(data.get("LowerDir") or "").split(":") if p]
        if not upper.is_dir() or not os.access(upper, os.R_OK | os.X_OK):
            return None  # not readable here (an agent in the docker group, not root)
        walk = _LayerWalk(lowers, targets, holding_mounts)
        try:
            root_fd = os.open(upper, _OPEN_DIRECTORY)
        except FileNotFoundError:
            return []  # removed meanwhile: its watcher reports that
        except OSError:
            return None
        try:
            walk.directory(root_fd, "", 0)
        except OSError:
            return None  # a part it may not read: the engine's diff instead
        finally:
            os.close(root_fd)
        found = sorted(walk.found, key=lambda d: d.path)
        if walk.exhausted:
            found.insert(
                0,
                FileDifference(
                    "/", "changed", f"more than {MAX_LAYER_ENTRIES} entries: not read to the end"
                ),
            )
        return found

    def _exec_in(
        self, who: str, container_id: str, argv: builtins.list[str], timeout: float
    ) -> tuple[int, str]:
        """Run ``argv`` in a running container of this engine; its output's tail is kept
        (``OutputTail``); past ``timeout`` the command is killed (on an engine of this
        machine) and RuntimeFailure raised."""
        with self._engine(who, f"exec {argv[:1]!r}"):
            exec_id = self.api.exec_create(container_id, list(argv), stdout=True, stderr=True)["Id"]
        result: dict[str, Any] = {}
        api = self.new_api(timeout=max(timeout, 1.0) + 5)

        tail = OutputTail()

        def run() -> None:
            try:
                for chunk in api.exec_start(exec_id, stream=True, demux=False):
                    tail.add(chunk)
            except Exception as e:
                result["error"] = e
            finally:
                api.close()

        worker = threading.Thread(target=run, name=f"kiln-exec-{who}", daemon=True)
        worker.start()
        worker.join(timeout)
        if worker.is_alive():
            self._kill_exec(exec_id, container_id)
            raise RuntimeFailure(f"instance {who}: exec {argv[0]!r} timed out after {timeout}s")
        with self._engine(who, f"exec {argv[:1]!r}"):
            if "error" in result:
                raise result["error"]
            code = self.api.exec_inspect(exec_id).get("ExitCode")
        return int(code if code is not None else -1), tail.text()

    def _kill_exec(self, exec_id: str, container_id: str) -> None:
        """The Engine API cannot kill an exec: on an engine of this machine, kill its
        process once /proc shows it in the container's cgroup."""
        with contextlib.suppress(
            docker.errors.DockerException, requests.exceptions.RequestException
        ):
            info = self.api.exec_inspect(exec_id)
            pid = int(info.get("Pid") or 0)
            if not self.local_engine or not info.get("Running") or pid <= 0:
                return
            with contextlib.suppress(OSError):
                if container_id in Path(f"/proc/{pid}/cgroup").read_text():
                    os.kill(pid, signals.SIGKILL)


class DockerRuntime(EngineClient):
    """Containers of one Docker Engine, labelled as this home's.

    ``home`` is ``KILN_HOME``; ``host`` the engine's address
    (``unix:///run/docker.sock``, ``tcp://HOST:PORT``, ``ssh://…``); None means
    ``DOCKER_HOST`` (with its TLS settings) or ``/run/docker.sock``. Connects at
    once: an engine that does not answer is a RuntimeFailure naming it.
    """

    name = "docker"

    def __init__(self, home: Path, host: str | None = None) -> None:
        self.home = home.absolute()
        self.tag = home_tag(self.home)
        self.logs_dir = self.home / "logs"
        self.secrets_root = RUN_ROOT / self.tag / "secrets"
        self.host = host or os.environ.get("DOCKER_HOST") or DEFAULT_HOST
        self.local_engine = self.host.startswith("unix://")
        self.from_env = host is None and bool(os.environ.get("DOCKER_HOST"))
        try:
            if self.from_env:
                self.client: Any = docker.from_env(version="auto", max_pool_size=POOL_SIZE)
            else:
                self.client = docker.DockerClient(
                    base_url=self.host, version="auto", max_pool_size=POOL_SIZE
                )
            info: dict[str, Any] = self.client.api.info()
        except (docker.errors.DockerException, requests.exceptions.RequestException) as e:
            raise RuntimeFailure(self._unreachable("docker runtime", e)) from e
        self.api: Any = self.client.api
        self.api_version = str(self.api.api_version)
        security = " ".join(str(x) for x in info.get("SecurityOptions") or [])
        self.remapped = "name=userns" in security
        self.enforces = {
            "memory": bool(info.get("MemoryLimit", True)),
            "swap": bool(info.get("SwapLimit", True)),
            "cpu": bool(info.get("CpuCfsQuota", True)),
            "pids": bool(info.get("PidsLimit", True)),
        }
        self.capabilities = Capabilities(
            exec=True,
            signal=True,
            volumes=True,
            secrets=self.local_engine and not self.remapped,
            memory_limit=self.enforces["memory"],
            cpu_limit=self.enforces["cpu"],
            pids_limit=self.enforces["pids"],
            user_namespace=self.remapped,
            raw_layers=False,
        )
        self._guard = threading.Lock()
        self._image_locks: dict[str, threading.Lock] = {}
        self._network_lock = threading.Lock()
        self._followers: dict[str, _Follower] = {}
        self._closed = False

    # -- names

    def container_name(self, instance_id: str) -> str:
        return f"kiln-{self.tag}-{instance_id}"

    def image_name(self, digest: str) -> str:
        """``kiln/<home tag>:<hex of the manifest digest>``.

        Named by content, so "does the engine have this image" is one lookup and
        the name can never point at other bytes; under the home's tag, so two
        homes sharing an engine never retag or remove each other's images.
        """
        return f"kiln/{self.tag}:{digest.removeprefix('sha256:')}"

    def network_name(self, outbound: bool) -> str:
        return f"kiln-{self.tag}-outbound" if outbound else f"kiln-{self.tag}"

    def volume_name(self, name: str) -> str:
        return f"kiln-{self.tag}-{name}"

    def secrets_dir(self, instance_id: str) -> Path:
        return self.secrets_root / instance_id

    # -- errors

    def _unreachable(self, who: str, error: BaseException) -> str:
        reason = _engine_reason(error)
        if "Permission denied" in reason or "PermissionError" in reason:
            return (
                f"{who}: permission denied on the docker engine socket {self.host}: "
                "run Kiln as root or as a member of the docker group"
            )
        return (
            f"{who}: the docker engine at {self.host} is unreachable ({reason}): start "
            "dockerd, or point [runtime] host (or DOCKER_HOST) at a running engine"
        )

    # -- start

    def _check_spec(self, spec: InstanceSpec) -> None:
        who = f"instance {spec.instance_id}"
        if not _NAME.match(spec.instance_id) or len(self.container_name(spec.instance_id)) > 128:
            raise RuntimeFailure(f"{who}: invalid instance id for a container name")
        self._check_runnable(spec, who)
        for name in spec.secrets:
            if not name or name in (".", "..") or "/" in name or "\0" in name or len(name) > 128:
                raise RuntimeFailure(f"{who}: invalid secret name {name!r}")
        if spec.secrets and not self.capabilities.secrets:
            where = "a remapping (userns-remap) engine" if self.remapped else "a remote engine"
            raise RuntimeFailure(
                f"{who}: secrets need the docker engine on this machine without userns-remap "
                f"(they live on a tmpfs here); {self.host} is {where}"
            )
        for volume in spec.volumes:
            if not _NAME.match(volume.name):
                raise RuntimeFailure(f"{who}: invalid volume name {volume.name!r}")
        limits = (("memory", spec.memory), ("cpu", spec.cpu))
        for kind, value in limits:
            if value is not None and not self.enforces[kind]:
                raise RuntimeFailure(
                    f"{who}: the docker engine at {self.host} cannot enforce a {kind} limit "
                    "(its kernel lacks the cgroup controller); remove the limit or use "
                    "another engine"
                )
        _check_capabilities(who, spec.cap_add)

    def start(self, spec: InstanceSpec) -> InstanceHandle:
        """Deliver the image, create the container with its limits, start it, return
        its address on the home's network and start copying its output."""
        self._check_spec(spec)
        who = spec.instance_id
        image = self._deliver_image(spec)
        network = self._ensure_network(spec.outbound, who)
        created_volumes = [self._ensure_volume(v.name, who) for v in spec.volumes]
        secrets_dir: Path | None = None
        container_id: str | None = None
        try:
            if spec.secrets:
                secrets_dir = self._mount_secrets_tmpfs(spec)
            started = time.time()
            with self._engine(who, "create the container"):
                container_id = self._create(spec, image, network, secrets_dir, started)
            if spec.secrets or any(created_volumes):
                uid, gid = self._container_user(container_id, spec, image)
                for volume, created in zip(spec.volumes, created_volumes, strict=True):
                    if created:
                        self._own_volume(volume.name, uid, gid, who)
                if secrets_dir is not None:
                    self._write_secrets(secrets_dir, spec.secrets, uid, gid)
            with self._engine(who, "start the container"):
                self.api.start(container_id)
                attrs = self.api.inspect_container(container_id)
        except BaseException:
            if container_id is not None:
                with contextlib.suppress(Exception):
                    self.api.remove_container(container_id, v=True, force=True)
            if secrets_dir is not None:
                self._release_secrets(spec.instance_id)
            raise
        meta = LogMeta(spec.service, spec.instance_id, spec.revision, spec.image_digest, started)
        self._follow(container_id, meta)
        return self._handle(
            attrs["Config"]["Labels"] or {},
            attrs["NetworkSettings"] or {},
            str(attrs["Id"]),
            str((attrs.get("State") or {}).get("StartedAt") or ""),
        )

    def _create(
        self,
        spec: InstanceSpec,
        image: str,
        network: str,
        secrets_dir: Path | None,
        started: float,
    ) -> str:
        tmpfs_size = spec.memory or DEFAULT_TMPFS_SIZE
        tmpfs = {
            "/tmp": f"rw,nosuid,nodev,mode=1777,size={tmpfs_size}",
            "/run": f"rw,nosuid,nodev,mode=755,size={tmpfs_size}",
        }
        for path in spec.writable:
            tmpfs[path] = f"rw,nosuid,nodev,mode=1777,size={tmpfs_size}"
        mounts = [
            docker.types.Mount(
                target=v.target,
                source=self.volume_name(v.name),
                type="volume",
                read_only=v.readonly,
                no_copy=True,
            )
            for v in spec.volumes
        ]
        if secrets_dir is not None:
            mounts.append(
                docker.types.Mount(
                    target=SECRETS_TARGET, source=str(secrets_dir), type="bind", read_only=True
                )
            )
        security = ["no-new-privileges"]
        if not spec.seccomp:
            security.append("seccomp=unconfined")
        limits: dict[str, Any] = {"pids_limit": spec.pids}
        if spec.memory is not None:
            limits["mem_limit"] = spec.memory
            if self.enforces["swap"]:
                limits["memswap_limit"] = spec.memory
        if spec.cpu is not None:
            limits["nano_cpus"] = round(spec.cpu * 1e9)
        host_config = self.api.create_host_config(
            network_mode=network,
            read_only=True,
            tmpfs=tmpfs,
            mounts=mounts,
            security_opt=security,
            cap_drop=["ALL"],
            cap_add=[capability_name(c).removeprefix("CAP_") for c in spec.cap_add] or None,
            init=True,
            restart_policy={"Name": "no"},
            log_config=docker.types.LogConfig(type="json-file", config=ENGINE_LOG_OPTIONS),
            **limits,
        )
        labels = self._instance_labels(spec, started)
        try:
            created = self.api.create_container(
                image,
                command=list(spec.command[1:]),
                entrypoint=list(spec.command[:1]),
                hostname=spec.instance_id[:63],  # the kernel's limit for a hostname
                user=spec.user or None,
                environment=dict(spec.env),
                labels=labels,
                working_dir=spec.workdir or "/",
                host_config=host_config,
                networking_config=self.api.create_networking_config(
                    {network: self.api.create_endpoint_config()}
                ),
                name=self.container_name(spec.instance_id),
            )
        except docker.errors.APIError as e:
            if e.status_code == 409:
                raise RuntimeFailure(
                    f"instance {spec.instance_id}: already exists in the docker engine at "
                    f"{self.host} (container {self.container_name(spec.instance_id)})"
                ) from e
            raise
        return str(created["Id"])

    def _handle(
        self,
        labels: dict[str, str],
        network_settings: dict[str, Any],
        container_id: str,
        started_at: str = "",
    ) -> InstanceHandle:
        """A handle from what the engine says of a container: the same one whether it
        comes from start, list or an inspect after an agent restart; from start it also
        records when the engine started it (a restart behind Kiln's back is drift)."""
        networks = network_settings.get("Networks") or {}
        address = ""
        for name in (self.network_name(False), self.network_name(True), *sorted(networks)):
            if (networks.get(name) or {}).get("IPAddress"):
                address = str(networks[name]["IPAddress"])
                break
        return InstanceHandle(
            version=HANDLE_VERSION,
            runtime=self.name,
            instance_id=str(labels[LABEL_INSTANCE]),
            host=address,
            port=int(labels.get(LABEL_PORT) or 0),
            data={
                "container_id": container_id,
                "service": str(labels.get(LABEL_SERVICE) or ""),
                **({"started_at": started_at} if started_at else {}),
            },
        )

    # -- image delivery

    def _image_lock(self, digest: str) -> threading.Lock:
        with self._guard:
            return self._image_locks.setdefault(digest, threading.Lock())

    def _deliver_image(self, spec: InstanceSpec) -> str:
        """The engine's name of the spec's image, loaded from the home's store when the
        engine lacks it; one load per digest however many starts ask at once."""
        who = spec.instance_id
        digest = spec.image_digest
        if not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
            raise RuntimeFailure(f"instance {who}: image digest {digest!r} is not sha256:<64 hex>")
        name = self.image_name(digest)
        with self._image_lock(digest), self._engine(who, f"deliver image {digest}"):
            if self._image_id(name) is not None:
                return name
            store = ImageStore(self.home / "images")
            try:
                descriptor = store.resolve(digest)
                config_digest = str(store.read_json(descriptor.digest)["config"]["digest"])
            except (KilnError, KeyError, TypeError) as e:
                raise RuntimeFailure(
                    f"instance {who}: image {digest} is not in the home's image store "
                    f"{store.root} ({e}); bake or import it first"
                ) from e
            # Another home may have loaded the same image: then naming it is enough.
            if self._image_id(config_digest) is None:
                ref_name = (descriptor.annotations or {}).get(ANNOTATION_REF_NAME)
                self._load(store, descriptor.digest, config_digest, ref_name, who)
            else:
                self._tag(config_digest, name)
        return name

    def _image_id(self, reference: str) -> str | None:
        try:
            return str(self.api.inspect_image(reference)["Id"])
        except docker.errors.NotFound:
            return None

    def _tag(self, image_id: str, name: str) -> None:
        repository, _, tag = name.rpartition(":")
        self.api.tag(image_id, repository, tag)

    def _load(
        self, store: ImageStore, digest: str, config_digest: str, ref_name: str | None, who: str
    ) -> None:
        """``docker load`` the store's export and name it by digest. The archive also
        carries the image's own name (``web:…``): put back as the engine had it."""
        before = self._image_id(ref_name) if ref_name else None
        scratch = Path(tempfile.mkdtemp(prefix=".docker-load-", dir=self.home))
        try:
            archive = scratch / "image.tar"
            try:
                export_image(store, digest, "docker", archive)
            except KilnError as e:
                raise RuntimeFailure(f"instance {who}: image load failed: {e}") from e
            with archive.open("rb") as f:
                try:
                    self.client.images.load(f)
                except docker.errors.DockerException as e:
                    raise RuntimeFailure(
                        f"instance {who}: image load failed: the engine at {self.host} refused "
                        f"{digest}: {_engine_reason(e)}"
                    ) from e
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        if self._image_id(config_digest) is None:
            raise RuntimeFailure(
                f"instance {who}: image load failed: the engine at {self.host} does not show "
                f"image {config_digest} after loading {digest}"
            )
        self._tag(config_digest, self.image_name(digest))
        if ref_name and before is None:
            with contextlib.suppress(docker.errors.APIError):
                self.api.remove_image(ref_name, noprune=True)
        elif ref_name and before is not None and before != self._image_id(ref_name):
            self._tag(before, ref_name)

    # -- networks and volumes

    def _ensure_network(self, outbound: bool, who: str) -> str:
        """The home's bridge network, made once: ``internal`` unless outbound, with
        inter-container traffic off (both enforced by the engine's firewall rules)."""
        name = self.network_name(outbound)
        with self._network_lock, self._engine(who, f"create network {name}"):
            found = self.api.networks(names=[name])
            for network in found:
                if network.get("Name") != name:
                    continue
                if (network.get("Labels") or {}).get(LABEL_HOME) != self.tag:
                    raise RuntimeFailure(
                        f"instance {who}: network {name} exists in the engine at {self.host} but "
                        f"is not labelled {LABEL_HOME}={self.tag}; remove or rename it"
                    )
                return name
            self.api.create_network(
                name,
                driver="bridge",
                internal=not outbound,
                check_duplicate=True,
                labels={LABEL_HOME: self.tag},
                options={"com.docker.network.bridge.enable_icc": "false"},
            )
        return name

    def _ensure_volume(self, name: str, who: str) -> bool:
        """True if the volume was created now (its owner is then set to the app's user)."""
        full = self.volume_name(name)
        with self._engine(who, f"create volume {full}"):
            try:
                found = self.api.inspect_volume(full)
            except docker.errors.NotFound:
                self.api.create_volume(
                    full, driver="local", labels={LABEL_HOME: self.tag, LABEL_VOLUME: name}
                )
                return True
            if (found.get("Labels") or {}).get(LABEL_HOME) != self.tag:
                raise RuntimeFailure(
                    f"instance {who}: volume {full} exists in the engine at {self.host} but is "
                    f"not labelled {LABEL_HOME}={self.tag}; remove or rename it"
                )
        return False

    def _own_volume(self, name: str, uid: int, gid: int, who: str) -> None:
        """A new volume belongs to the app's user, as the local runtime's do (only when
        the engine's files are on this machine)."""
        if not self.local_engine:
            return
        with self._engine(who, f"inspect volume {name}"):
            mountpoint = Path(self.api.inspect_volume(self.volume_name(name))["Mountpoint"])
        with contextlib.suppress(OSError):
            os.chown(mountpoint, uid, gid)

    # -- the user and secrets

    def _container_user(self, container_id: str, spec: InstanceSpec, image: str) -> tuple[int, int]:
        """Numeric uid and gid of the app's user (``spec.user``, else the image's), the
        way runc finds them: names in the image's /etc/passwd and /etc/group, and a
        bare uid's group from its passwd entry (else 0)."""
        who = spec.instance_id
        user = spec.user
        if user is None:
            with self._engine(who, "inspect the image"):
                user = str((self.api.inspect_image(image).get("Config") or {}).get("User") or "")
        if not user:
            return 0, 0
        name, _, group = user.partition(":")
        uid = _parse_id(name)
        gid = _parse_id(group) if group else None
        if uid is None or not group:
            entry = _find_entry(self._read_image_file(container_id, "/etc/passwd", who), name, 2)
            if uid is None:
                if entry is None or len(entry) < 4 or _parse_id(entry[2]) is None:
                    raise RuntimeFailure(f"instance {who}: user {name!r} is not in the image")
                uid = int(entry[2])
            if not group:
                gid = (_parse_id(entry[3]) if entry is not None and len(entry) >= 4 else 0) or 0
        if gid is None:
            entry = _find_entry(self._read_image_file(container_id, "/etc/group", who), group, 2)
            if entry is None or _parse_id(entry[2]) is None:
                raise RuntimeFailure(f"instance {who}: group {group!r} is not in the image")
            gid = int(entry[2])
        return uid, gid

    def _read_image_file(self, container_id: str, path: str, who: str) -> str:
        with self._engine(who, f"read {path} of the image"):
            try:
                chunks, _ = self.api.get_archive(container_id, path)
            except docker.errors.NotFound:
                return ""
            data = b"".join(chunks)
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            for member in tar.getmembers():
                if member.isfile():
                    extracted = tar.extractfile(member)
                    if extracted is not None:
                        return extracted.read(1 << 20).decode("utf-8", errors="replace")
        return ""

    def _mount_secrets_tmpfs(self, spec: InstanceSpec) -> Path:
        """A tmpfs of this instance's own, where its secret files will be written: the
        values never reach a disk, the container's config, env, argv or labels."""
        directory = self.secrets_dir(spec.instance_id)
        for parent in (RUN_ROOT, RUN_ROOT / self.tag):
            parent.mkdir(mode=0o711, exist_ok=True)
        self.secrets_root.mkdir(mode=0o700, exist_ok=True)
        try:
            directory.mkdir(mode=0o700)
        except FileExistsError as e:
            raise RuntimeFailure(
                f"instance {spec.instance_id}: its secrets directory {directory} already exists"
            ) from e
        size = 1024 * 1024 + sum(len(v) + 4096 for v in spec.secrets.values())
        try:
            flags = _MS_NOSUID | _MS_NODEV | _MS_NOEXEC
            mount("tmpfs", str(directory), "tmpfs", flags, f"mode=0700,size={size}")
        except OSError as e:
            with contextlib.suppress(OSError):
                directory.rmdir()
            raise RuntimeFailure(
                f"instance {spec.instance_id}: cannot mount a tmpfs for its secrets at "
                f"{directory} ({e}); the docker runtime needs root for secrets"
            ) from e
        return directory

    @staticmethod
    def _write_secrets(directory: Path, secrets: dict[str, bytes], uid: int, gid: int) -> None:
        for name, value in secrets.items():
            path = directory / name
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o400)
            with os.fdopen(fd, "wb") as f:
                f.write(value)
            os.chown(path, uid, gid)
        os.chown(directory, uid, gid)
        os.chmod(directory, 0o500)

    def _release_secrets(self, instance_id: str) -> None:
        directory = self.secrets_dir(instance_id)
        if directory.is_mount():
            umount_detached(directory)
        with contextlib.suppress(FileNotFoundError):
            directory.rmdir()
        for empty in (self.secrets_root, self.secrets_root.parent):
            with contextlib.suppress(OSError):
                empty.rmdir()

    # -- logs

    def _follow(self, container_id: str, meta: LogMeta) -> None:
        """One follower per container: copies its output until it stops."""
        with self._guard:
            if self._closed:
                return
            current = self._followers.get(container_id)
            if current is not None and current.thread.is_alive():
                return
            copier = LogCopier(self, container_id, meta, follow=True)
            thread = threading.Thread(
                target=copier.run, name=f"kiln-logs-{meta.instance}", daemon=True
            )
            self._followers[container_id] = _Follower(copier, thread)
            thread.start()

    def _end_follower(self, container_id: str, timeout: float) -> None:
        """Let a follower finish on its own (the engine ends the stream when the container
        stops), or cut it off after ``timeout``."""
        with self._guard:
            follower = self._followers.pop(container_id, None)
        if follower is None:
            return
        follower.thread.join(timeout)
        if follower.thread.is_alive():
            follower.copier.cancel()
            follower.thread.join(KILL_TIMEOUT)

    def _meta(self, attrs: dict[str, Any]) -> LogMeta:
        return log_meta(attrs["Config"]["Labels"] or {})

    def _drain_logs(self, attrs: dict[str, Any]) -> None:
        """Whatever the engine captured and the log store lacks (the follower may have
        been cut off, or the agent was down when the container stopped)."""
        container_id = str(attrs["Id"])
        self._end_follower(container_id, LOG_DRAIN_TIMEOUT)
        copier = LogCopier(self, container_id, self._meta(attrs), follow=False)
        copier.run()

    # -- state

    def _attrs(
        self, handle: InstanceHandle, doing: str = "inspect the container"
    ) -> dict[str, Any] | None:
        """The container's inspect data, or None when it is gone or is not this home's
        instance of that id (a handle never leads to anything else on a shared engine)."""
        reference = str(handle.data.get("container_id") or self.container_name(handle.instance_id))
        with self._engine(handle.instance_id, doing):
            try:
                attrs: dict[str, Any] = self.api.inspect_container(reference)
            except docker.errors.NotFound:
                return None
        labels = attrs.get("Config", {}).get("Labels") or {}
        if labels.get(LABEL_HOME) != self.tag or labels.get(LABEL_INSTANCE) != handle.instance_id:
            return None
        return attrs

    def _state(self, attrs: dict[str, Any] | None) -> InstanceState:
        if attrs is None:
            return InstanceState(InstanceStatus.GONE, None, None)
        state = attrs.get("State") or {}
        if state.get("Running") or state.get("Status") in ("running", "paused", "restarting"):
            return InstanceState(InstanceStatus.RUNNING, None, int(state.get("Pid") or 0) or None)
        if state.get("Status") == "created":
            return InstanceState(InstanceStatus.EXITED, None, None)
        code = int(state.get("ExitCode") or 0)
        oom = bool(state.get("OOMKilled"))
        if code == 128 + signals.SIGKILL and not oom:
            oom = self._oom_event(attrs)
        return InstanceState(InstanceStatus.EXITED, code, None, oom_killed=oom)

    def _oom_event(self, attrs: dict[str, Any]) -> bool:
        """Whether the engine reported an OOM kill in the container: its State.OOMKilled
        misses one whose event the engine handled after the exit."""
        started = _docker_timestamp(str((attrs.get("State") or {}).get("StartedAt", "")).encode())
        since = started // 1_000_000_000 - 1 if started else 0
        with contextlib.suppress(
            docker.errors.DockerException, requests.exceptions.RequestException
        ):
            events = self.api.events(
                since=max(since, 1),
                until=f"{time.time():.9f}",  # now: a later time would wait for it
                decode=True,
                filters={"container": attrs["Id"], "event": "oom"},
            )
            return any(True for _ in events)
        return False

    def inspect(self, handle: InstanceHandle) -> InstanceState:
        self._check_handle(handle)
        return self._state(self._attrs(handle))

    def wait(self, handle: InstanceHandle, timeout: float) -> InstanceState:
        """The engine's wait endpoint, bounded by ``timeout`` as the read timeout: the
        thread sleeps in a socket read until the container stops."""
        self._check_handle(handle)
        attrs = self._attrs(handle)
        state = self._state(attrs)
        if state.status is not InstanceStatus.RUNNING or timeout <= 0 or attrs is None:
            return state
        with self._engine(handle.instance_id, "wait for the container"):
            try:
                self.api.wait(attrs["Id"], timeout=timeout, condition="not-running")
            except requests.exceptions.ReadTimeout:
                pass
            except requests.exceptions.ConnectionError as e:
                if "timed out" not in str(e).lower():
                    raise
        return self.inspect(handle)

    def stop(
        self, handle: InstanceHandle, grace: float, sig: int = signals.SIGTERM
    ) -> InstanceState:
        """``sig``, up to ``grace`` seconds, then SIGKILL (Docker's own stop takes whole
        seconds and the image's stop signal)."""
        self._check_handle(handle)
        attrs = self._attrs(handle)
        state = self._state(attrs)
        if state.status is not InstanceStatus.RUNNING or attrs is None:
            return state
        self._kill(handle, attrs, sig)
        state = self.wait(handle, grace)
        if state.status is InstanceStatus.RUNNING:
            self._kill(handle, attrs, signals.SIGKILL)
            state = self.wait(handle, KILL_TIMEOUT)
        return state

    def _kill(self, handle: InstanceHandle, attrs: dict[str, Any], sig: int) -> None:
        with self._engine(handle.instance_id, f"send signal {sig}"):
            try:
                self.api.kill(attrs["Id"], signal=int(sig))
            except docker.errors.APIError as e:
                if e.status_code not in (404, 409):  # gone, or no longer running
                    raise

    def signal(self, handle: InstanceHandle, sig: int) -> None:
        """Deliver ``sig`` to the container's init (tini), which passes it to the app."""
        self._check_handle(handle)
        attrs = self._attrs(handle)
        if attrs is not None and self._state(attrs).status is InstanceStatus.RUNNING:
            self._kill(handle, attrs, sig)

    def freeze(self, handle: InstanceHandle) -> None:
        """``docker pause``: the engine's cgroup freezer on the container."""
        self._check_handle(handle)
        attrs = self._attrs(handle)
        if attrs is None or self._state(attrs).status is not InstanceStatus.RUNNING:
            raise RuntimeFailure(f"instance {handle.instance_id}: not running, cannot freeze")
        self._pause(handle.instance_id, attrs)

    def thaw(self, handle: InstanceHandle) -> None:
        self._check_handle(handle)
        attrs = self._attrs(handle)
        if attrs is not None:
            self._unpause(handle.instance_id, attrs)

    def collect_evidence(
        self, handle: InstanceHandle, writable: builtins.list[str], into: Path
    ) -> dict[str, Any]:
        """The writable paths through the engine's archive endpoint (``docker cp``), its
        processes as ``docker top`` lists them, its address and ports from inspect."""
        self._check_handle(handle)
        attrs = self._attrs(handle)
        if attrs is None:
            raise RuntimeFailure(f"instance {handle.instance_id}: gone, no evidence")
        return self._evidence(handle.instance_id, attrs, handle.address, writable, into)

    def destroy(self, handle: InstanceHandle) -> None:
        """Stop if needed, copy the last of its output into the log store, then remove
        the container (with its anonymous volumes) and its secrets tmpfs. Named volumes
        and logs stay."""
        self._check_handle(handle)
        attrs = self._attrs(handle)
        if attrs is not None:
            if self._state(attrs).status is InstanceStatus.RUNNING:
                grace = float((attrs["Config"]["Labels"] or {}).get(LABEL_STOP_GRACE) or 10.0)
                self.stop(handle, grace)
            self._drain_logs(attrs)
            with (
                self._engine(handle.instance_id, "remove the container"),
                contextlib.suppress(docker.errors.NotFound),
            ):
                self.api.remove_container(attrs["Id"], v=True, force=True)
        self._release_secrets(handle.instance_id)

    # -- drift

    def check_drift(
        self, handle: InstanceHandle, expected: DriftExpectation
    ) -> DriftFinding | None:
        """The container against what Kiln started: the same container not restarted
        since (``State.StartedAt``), the image loaded for the digest (by image id), the
        revision's labels and env, and a ``docker diff`` with nothing outside its mount
        points (tmpfs, secrets, volumes, docker-init)."""
        self._check_handle(handle)
        attrs = self._attrs(handle, "inspect the container for drift")
        if attrs is None or self._state(attrs).status is not InstanceStatus.RUNNING:
            return None  # gone or stopped: its watcher reports that
        state = attrs.get("State") or {}
        started_at = str(handle.data.get("started_at") or "")
        if started_at and str(state.get("StartedAt") or "") != started_at:
            return DriftFinding(
                "process",
                f"container {str(attrs['Id'])[:12]} was restarted at {state.get('StartedAt')} "
                f"behind Kiln's back (Kiln started it at {started_at})",
            )
        config = attrs.get("Config") or {}
        labels = config.get("Labels") or {}
        if labels.get(LABEL_IMAGE) != expected.image_digest or labels.get(LABEL_REVISION) != str(
            expected.revision
        ):
            return DriftFinding(
                "config",
                f"labelled image {str(labels.get(LABEL_IMAGE))[:19]}… "
                f"r{labels.get(LABEL_REVISION)}, not {expected.image_digest[:19]}… "
                f"r{expected.revision}",
            )
        image_ids = self._image_ids(expected.image_digest)
        if str(attrs.get("Image") or "") not in image_ids:
            return DriftFinding(
                "config",
                f"runs image {str(attrs.get('Image'))[:19]}…, not the one loaded for "
                f"{expected.image_digest[:19]}…",
            )
        env = dict(str(item).partition("=")[::2] for item in config.get("Env") or [])
        for key, value in sorted(expected.env.items()):
            if env.get(key) != value:
                return DriftFinding("config", f"env {key} is not the revision's")
        files = self._written(attrs)
        if files:
            return DriftFinding(
                "files", f"{len(files)} file(s) written into its root", tuple(files)
            )
        return None

    def _image_ids(self, digest: str) -> set[str]:
        """The engine ids the image of ``digest`` may have: its config digest (the classic
        image store's id), the manifest digest (the containerd store's), and whatever the
        home's name for it points at when the home's store no longer has it."""
        ids = {digest}
        try:
            store = ImageStore(self.home / "images")
            ids.add(str(store.read_json(store.resolve(digest).digest)["config"]["digest"]))
        except (KilnError, KeyError, TypeError):
            with self._engine(None, f"inspect image {digest}"):
                found = self._image_id(self.image_name(digest))
            if found is not None:
                ids.add(found)
        return ids

    def recover(self, handle: InstanceHandle) -> bool:
        """True iff the container still runs and carries this home's labels and the
        handle's instance id; then its log follower resumes where the log stops."""
        if handle.runtime != self.name:
            return False
        try:
            attrs = self._attrs(handle)
        except RuntimeFailure:
            return False
        expected = handle.data.get("container_id")
        if attrs is None or (expected and attrs["Id"] != expected):
            return False
        if self._state(attrs).status is not InstanceStatus.RUNNING:
            return False
        self._follow(str(attrs["Id"]), self._meta(attrs))
        return True

    def _labelled(self, running_only: bool) -> builtins.list[dict[str, Any]]:
        filters: dict[str, Any] = {"label": [f"{LABEL_HOME}={self.tag}"]}
        if running_only:
            filters["status"] = ["running"]
        with self._engine(None, "list containers"):
            found = self.api.containers(all=not running_only, filters=filters)
        # The engine filtered by label already; check again rather than trust a filter.
        return [c for c in found if (c.get("Labels") or {}).get(LABEL_HOME) == self.tag]

    def list(self) -> builtins.list[InstanceHandle]:
        """Running containers labelled as this home's; nothing else on the engine."""
        handles = [
            self._handle(
                summary.get("Labels") or {}, summary.get("NetworkSettings") or {}, summary["Id"]
            )
            for summary in self._labelled(running_only=True)
            if LABEL_INSTANCE in (summary.get("Labels") or {})
        ]
        return sorted(handles, key=lambda h: h.instance_id)

    def leftovers(self) -> builtins.list[str]:
        """Instances of this home that no longer run but whose container remains."""
        stopped = []
        for summary in self._labelled(running_only=False):
            labels = summary.get("Labels") or {}
            if summary.get("State") != "running" and LABEL_INSTANCE in labels:
                stopped.append(str(labels[LABEL_INSTANCE]))
        return sorted(stopped)

    def release(self, instance_id: str) -> None:
        """Remove an instance's containers (found by label) and secrets, keeping its logs."""
        filters = {"label": [f"{LABEL_HOME}={self.tag}", f"{LABEL_INSTANCE}={instance_id}"]}
        with self._engine(instance_id, "list its containers"):
            found = self.api.containers(all=True, filters=filters)
        for summary in found or [{"Id": ""}]:
            data = {"container_id": str(summary["Id"])}
            self.destroy(InstanceHandle(HANDLE_VERSION, self.name, instance_id, "", 0, data))

    def shutdown(self) -> None:
        """With no instance of the home running: remove the leftovers, the home's networks
        and its run directory. Volumes and images stay."""
        if self.list():
            return
        for instance_id in self.leftovers():
            self.release(instance_id)
        with self._engine(None, "remove the home's networks"):
            for network in self.api.networks(filters={"label": [f"{LABEL_HOME}={self.tag}"]}):
                if (network.get("Labels") or {}).get(LABEL_HOME) == self.tag:
                    with contextlib.suppress(docker.errors.NotFound):
                        self.api.remove_network(network["Id"])
        for empty in (self.secrets_root, self.secrets_root.parent):
            with contextlib.suppress(OSError):
                empty.rmdir()

    def exec(
        self, handle: InstanceHandle, argv: builtins.list[str], timeout: float
    ) -> tuple[int, str]:
        """Run ``argv`` in the container (the Engine's exec: the app's user, env,
        capabilities, seccomp and no-new-privileges); past ``timeout`` the command is
        killed (on an engine of this machine) and RuntimeFailure raised."""
        self._check_handle(handle)
        attrs = self._attrs(handle)
        if attrs is None or self._state(attrs).status is not InstanceStatus.RUNNING:
            raise RuntimeFailure(f"instance {handle.instance_id}: not running, cannot exec")
        return self._exec_in(handle.instance_id, str(attrs["Id"]), argv, timeout)

    def close(self) -> None:
        """Stop the log followers and the engine client; containers keep running."""
        with self._guard:
            self._closed = True
            followers = list(self._followers.values())
            self._followers.clear()
        for follower in followers:
            follower.copier.cancel()
        for follower in followers:
            follower.thread.join(KILL_TIMEOUT)
        self.client.close()
