"""Where instances run: the one protocol every runtime implements.

The deploy layer and the agent code against :class:`Runtime` only; concrete
runtimes (``kiln.runtime.local``, ``kiln.runtime.docker``, ``kiln.runtime.fake``)
live in their own modules and are never imported by the planner or the
reconciler. Optional abilities (exec, signal) are small extra protocols checked
with ``isinstance`` and refused with :class:`NotSupported`.

Nothing here assumes one machine: a runtime delivers the image itself (by
digest, from the home's store), returns the address each instance answers on
(which probes and routes use), writes each instance's output into the home's
log store, and lists only the instances labelled as this home's.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from kiln.errors import KilnError
from kiln.image.file_manifest import FileDifference

__all__ = [
    "EXEC_OUTPUT_MAX",
    "HANDLE_VERSION",
    "OUTPUT_CUT",
    "Capabilities",
    "DriftExpectation",
    "DriftFinding",
    "DriftInspector",
    "EdgeHost",
    "Execer",
    "ExitNotifier",
    "ExitSuspect",
    "Freezer",
    "HostResources",
    "InstanceHandle",
    "InstanceSpec",
    "InstanceState",
    "InstanceStatus",
    "NotSupported",
    "OutputTail",
    "Releaser",
    "Runtime",
    "RuntimeFailure",
    "Signaller",
    "VolumeMount",
]

HANDLE_VERSION = 2
EXEC_OUTPUT_MAX = 1 << 20
"""The most of an exec's output a runtime keeps (its tail): a command that prints
forever must not fill the agent's memory."""


OUTPUT_CUT = "[kiln: earlier output cut; its last 1 MiB follows]\n"


class OutputTail:
    """The last ``limit`` bytes of a stream, and whether anything before them was cut."""

    def __init__(self, limit: int = EXEC_OUTPUT_MAX) -> None:
        self.limit = limit
        self._data = bytearray()
        self.cut = False

    def add(self, chunk: bytes) -> None:
        self._data += chunk
        if len(self._data) > self.limit:
            del self._data[: len(self._data) - self.limit]
            self.cut = True

    def text(self) -> str:
        """The tail as text, starting with ``OUTPUT_CUT`` when earlier output was cut."""
        return (OUTPUT_CUT if self.cut else "") + self._data.decode("utf-8", errors="replace")


class RuntimeFailure(KilnError):
    """A runtime could not do what was asked (start, stop, …) for an instance."""


class NotSupported(KilnError):
    """The runtime does not have an optional ability (exec, signal, volumes…)."""


@dataclass(frozen=True)
class VolumeMount:
    """A named volume of the home (``volumes`` in kiln.toml); each runtime keeps its
    data its own way (local: ``KILN_HOME/volumes/NAME``; docker: a named volume)."""

    name: str
    target: str
    readonly: bool = False


@dataclass(frozen=True)
class InstanceSpec:
    """Everything a runtime needs to start one instance; resolved by the caller.

    ``command`` is already entrypoint + cmd; ``env`` already merges image env,
    service env and ``PORT``; ``port`` is where the app listens in its own
    network. The runtime delivers ``image_digest`` from the home's image store
    itself. ``layers`` is only for callers that bring unpacked layer trees of
    their own (the bake's sandbox, runtime tests): bottom first, shared read-only,
    never written; a runtime that cannot run raw layers refuses them.
    """

    instance_id: str
    service: str
    revision: int
    image_digest: str
    command: list[str]
    user: str | None
    workdir: str
    env: dict[str, str]
    port: int
    writable: tuple[str, ...] = ()
    volumes: tuple[VolumeMount, ...] = ()
    secrets: dict[str, bytes] = field(default_factory=dict)
    memory: int | None = None
    cpu: float | None = None
    pids: int = 1024
    stop_grace: float = 10.0
    cap_add: tuple[str, ...] = ()
    seccomp: bool = True
    outbound: bool = False
    layers: tuple[Path, ...] = ()
    project: str | None = None
    """The ``[project] name`` the instance belongs to, for the runtime's labels."""


@dataclass(frozen=True)
class InstanceHandle:
    """A serialisable, versioned pointer to a running instance (Nomad's TaskHandle).

    The agent stores it so that after a restart it can ``recover`` instances
    that still run instead of replacing healthy ones. ``host``/``port`` is the
    address the instance answers on, which health checks and routes use;
    ``data`` belongs to the runtime (local: the container id and its shim's pid
    and start time; docker: the container id) and nobody else reads it.
    """

    version: int
    runtime: str
    instance_id: str
    host: str
    port: int
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def address(self) -> str:
        """``host:port``, with an IPv6 host in brackets, as a route's backend wants it."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "runtime": self.runtime,
            "instance_id": self.instance_id,
            "host": self.host,
            "port": self.port,
            "data": dict(self.data),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> InstanceHandle:
        try:
            version = int(d["version"])
            if version == 1:
                return _from_v1(d)
            if version != HANDLE_VERSION:
                raise RuntimeFailure(
                    f"instance handle {d.get('instance_id')!r}: unsupported version {version}"
                )
            return cls(
                version=version,
                runtime=str(d["runtime"]),
                instance_id=str(d["instance_id"]),
                host=str(d["host"]),
                port=int(d["port"]),
                data=dict(d.get("data") or {}),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise RuntimeFailure(f"instance handle: malformed ({e!r})") from e


def _from_v1(d: dict[str, Any]) -> InstanceHandle:
    """Handles stored by Kiln before the address moved out of the runtime's data: a
    local instance's shim pid and start time, its address in ``data``."""
    data = dict(d.get("data") or {})
    data["shim_pid"] = int(d["pid"])
    data["shim_start_time"] = int(d["start_time"])
    return InstanceHandle(
        version=HANDLE_VERSION,
        runtime=str(d["runtime"]),
        instance_id=str(d["instance_id"]),
        host=str(data.pop("host", None) or "127.0.0.1"),
        port=int(data.pop("port", None) or 0),
        data=data,
    )


class InstanceStatus(StrEnum):
    RUNNING = "running"
    EXITED = "exited"
    GONE = "gone"


@dataclass(frozen=True)
class InstanceState:
    status: InstanceStatus
    exit_code: int | None
    pid: int | None
    """The app's pid as the runtime's host sees it, where it has one (for display)."""
    oom_killed: bool = False


@dataclass(frozen=True)
class Capabilities:
    """What a runtime can do beyond the core protocol, so callers ask instead of guess.

    Honest: a limit is claimed only where the runtime enforces it, an isolation
    only where every instance gets it."""

    exec: bool = False
    signal: bool = False
    volumes: bool = False
    secrets: bool = False
    memory_limit: bool = False
    cpu_limit: bool = False
    pids_limit: bool = False
    user_namespace: bool = False
    """Root inside an instance is an unprivileged user outside."""
    raw_layers: bool = False
    """Runs ``InstanceSpec.layers`` given by the caller (the bake's sandbox, tests)."""


@runtime_checkable
class Runtime(Protocol):
    """Starts, watches and retires instances; never modifies one in place.

    Every method takes the handle returned by :meth:`start` (or read back from
    the state store). Failures raise :class:`RuntimeFailure` with a message
    naming the instance.
    """

    name: str
    capabilities: Capabilities

    def start(self, spec: InstanceSpec) -> InstanceHandle:
        """Deliver the image if the runtime lacks it, start one instance, and return as
        soon as it runs, with the address it answers on.

        Does not wait for the app to be ready: health checks do that. From here
        on the runtime writes the instance's stdout and stderr into the home's
        log store. Raises RuntimeFailure when the instance cannot be created.
        """
        ...

    def inspect(self, handle: InstanceHandle) -> InstanceState:
        """Current state, without blocking: RUNNING, EXITED (with exit code) or GONE."""
        ...

    def wait(self, handle: InstanceHandle, timeout: float) -> InstanceState:
        """Block until the instance is no longer RUNNING or ``timeout`` seconds pass.

        Returns the state at that moment (still RUNNING on timeout).
        """
        ...

    def stop(
        self, handle: InstanceHandle, grace: float, sig: int = signal.SIGTERM
    ) -> InstanceState:
        """Send ``sig``, wait up to ``grace`` seconds, then kill everything left.

        Returns the final state (EXITED or GONE). Idempotent on stopped instances.
        """
        ...

    def destroy(self, handle: InstanceHandle) -> None:
        """Release everything the instance held except its logs. Stops it first if needed."""
        ...

    def recover(self, handle: InstanceHandle) -> bool:
        """True iff the handle still points at the same live instance (pid reuse guarded)."""
        ...

    def list(self) -> list[InstanceHandle]:
        """Handles of every instance this home has running, including orphans; only
        those labelled as this home's, so clean-up never touches anything else."""
        ...

    def close(self) -> None:
        """Release the runtime's own connections and threads; instances keep running."""
        ...


@runtime_checkable
class Execer(Protocol):
    """Optional: run a command inside a running instance (exec health checks)."""

    def exec(self, handle: InstanceHandle, argv: list[str], timeout: float) -> tuple[int, str]:
        """Run ``argv`` inside the instance; return (exit code, combined output: its
        last ``EXEC_OUTPUT_MAX`` bytes at most).

        Raises RuntimeFailure when the instance is not running or the command
        exceeds ``timeout`` seconds.
        """
        ...


@runtime_checkable
class Releaser(Protocol):
    """Optional: a runtime that holds resources besides its running instances (a dead
    instance's network address or mounts, a network of the home's, images it loaded),
    which the agent frees at start and at ``kiln down``."""

    def leftovers(self) -> list[str]:
        """Ids of instances that no longer run but still hold something."""
        ...

    def release(self, instance_id: str) -> None:
        """Free what a dead instance still holds (idempotent); logs stay."""
        ...

    def shutdown(self) -> None:
        """With no instance left, free the machine-wide resources (``kiln down``)."""
        ...


@runtime_checkable
class HostResources(Releaser, Protocol):
    """Optional: a runtime whose instances share the host's firewall with the proxy."""

    def publish_ports(self, ports: set[int]) -> None:
        """The proxy's listen ports: the only host ports instances may reach."""
        ...


@runtime_checkable
class Signaller(Protocol):
    """Optional: deliver a signal to an instance's processes without stopping it."""

    def signal(self, handle: InstanceHandle, sig: int) -> None: ...


@runtime_checkable
class ExitNotifier(Protocol):
    """Optional: an instance's exit as a file descriptor the agent's event loop watches,
    so watching a thousand idle instances costs no thread and no wake-up. A runtime
    without it is watched with :meth:`Runtime.wait` in a thread per instance."""

    def exit_fd(self, handle: InstanceHandle) -> int | None:
        """A new fd, owned by the caller, that becomes readable once the instance no
        longer runs; None when it already does not (or cannot be watched this way)."""
        ...


@runtime_checkable
class ExitSuspect(Protocol):
    """Optional: a runtime that learns of exits by looking (a swarm's tasks, listed through
    its manager, which announces no task events) looks again at once when the agent has
    reason to think an instance ended, instead of at its next period."""

    def suspect_exit(self, handle: InstanceHandle) -> None:
        """The instance stopped answering its health check: read its state soon. Never
        blocks (the agent's event loop calls it)."""
        ...


@runtime_checkable
class EdgeHost(Protocol):
    """Optional: a runtime of several nodes that runs Kiln's edge proxy on each of them,
    fed routes by the agent's route watch (the local and docker runtimes have one
    machine, where the agent's own proxy is the data plane)."""

    def ensure_edge(self, image_digest: str, agent_url: str, token: bytes, ca_pem: bytes) -> bool:
        """Run the edge everywhere with these settings; True when something changed."""
        ...

    def remove_edge(self) -> None: ...


@runtime_checkable
class Freezer(Protocol):
    """Optional: quarantine. A frozen instance runs no instruction (cgroup freezer,
    ``docker pause``) while its memory, files and sockets stay for evidence; stopping
    or destroying it kills it without letting it run first. Swarm has no pause for a
    task: the swarm runtime pauses it through its node's engine (``[runtime] nodes``),
    and without one raises :class:`NotSupported`, and quarantine there keeps the logs and
    retires the instance at once."""

    def freeze(self, handle: InstanceHandle) -> None:
        """Every process of the instance stopped where it stands; returns once they are."""
        ...

    def thaw(self, handle: InstanceHandle) -> None: ...

    def collect_evidence(self, handle: InstanceHandle, writable: list[str], into: Path) -> Any:
        """Write ``writable.tar`` (the instance's writable paths) into ``into`` and return
        what was seen: ``{"processes": [...], "network": {...}}``."""
        ...


@dataclass(frozen=True)
class DriftExpectation:
    """What an instance's revision declares, as a runtime's drift check compares it:
    the image Kiln ran (by manifest digest), the revision, the service's env values and
    the writable paths (whose writes are never drift)."""

    image_digest: str
    revision: int
    env: dict[str, str]
    writable: tuple[str, ...] = ()


@dataclass(frozen=True)
class DriftFinding:
    """What differs for one instance: ``what`` is ``process`` (not the one started),
    ``config`` (image, revision or env) or ``files`` (written outside its writable
    paths and the runtime's own mount points, one :class:`FileDifference` each)."""

    what: str
    detail: str
    files: tuple[FileDifference, ...] = ()


@runtime_checkable
class DriftInspector(Protocol):
    """Optional: a runtime that proves an instance still matches its revision by asking
    its engine (the docker and swarm runtimes); the local runtime's check reads its own
    sandboxes and layer manifests in the agent instead."""

    def check_drift(
        self, handle: InstanceHandle, expected: DriftExpectation
    ) -> DriftFinding | None:
        """The first difference found (process, then config, then files), or None when
        it matches or is gone (a gone instance is its watcher's to report)."""
        ...
