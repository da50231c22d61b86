"""Where instances run: the one protocol every runtime implements.

The deploy layer and the agent code against :class:`Runtime` only; concrete
runtimes (``kiln.runtime.local`` today, docker/swarm later) live in their own
modules and are never imported by the planner or the reconciler. Optional
abilities (exec, signal) are small extra protocols checked with
``isinstance`` and refused with :class:`NotSupported`.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from kiln.errors import KilnError

__all__ = [
    "HANDLE_VERSION",
    "Capabilities",
    "Execer",
    "HostResources",
    "InstanceHandle",
    "InstanceSpec",
    "InstanceState",
    "InstanceStatus",
    "NotSupported",
    "Runtime",
    "RuntimeFailure",
    "Signaller",
    "VolumeMount",
]

HANDLE_VERSION = 1


class RuntimeFailure(KilnError):
    """A runtime could not do what was asked (start, stop, …) for an instance."""


class NotSupported(KilnError):
    """The runtime does not have an optional ability (exec, signal, volumes…)."""


@dataclass(frozen=True)
class VolumeMount:
    source: Path
    target: str
    readonly: bool = False


@dataclass(frozen=True)
class InstanceSpec:
    """Everything a runtime needs to start one instance; resolved by the caller.

    ``command`` is already entrypoint + cmd; ``env`` already merges image env,
    service env and ``PORT``. ``layers`` are the image's layer snapshots,
    bottom first, with ownership already shifted into the home's id range
    (:mod:`kiln.oci.idmap`); they are shared read-only by every instance of
    every image that uses them, so a runtime must never write into them.
    """

    instance_id: str
    service: str
    revision: int
    image_digest: str
    layers: tuple[Path, ...]
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


@dataclass(frozen=True)
class InstanceHandle:
    """A serialisable, versioned pointer to a running instance (Nomad's TaskHandle).

    The agent stores it so that after a restart it can ``recover`` instances
    that still run instead of replacing healthy ones. ``start_time`` is the
    kernel start time of ``pid`` and guards against pid reuse.
    """

    version: int
    runtime: str
    instance_id: str
    pid: int
    start_time: int
    data: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "runtime": self.runtime,
            "instance_id": self.instance_id,
            "pid": self.pid,
            "start_time": self.start_time,
            "data": dict(self.data),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> InstanceHandle:
        try:
            version = int(d["version"])
            if version != HANDLE_VERSION:
                raise RuntimeFailure(
                    f"instance handle {d.get('instance_id')!r}: unsupported version {version}"
                )
            return cls(
                version=version,
                runtime=str(d["runtime"]),
                instance_id=str(d["instance_id"]),
                pid=int(d["pid"]),
                start_time=int(d["start_time"]),
                data=dict(d.get("data") or {}),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise RuntimeFailure(f"instance handle: malformed ({e!r})") from e


class InstanceStatus(StrEnum):
    RUNNING = "running"
    EXITED = "exited"
    GONE = "gone"


@dataclass(frozen=True)
class InstanceState:
    status: InstanceStatus
    exit_code: int | None
    pid: int | None
    oom_killed: bool = False


@dataclass(frozen=True)
class Capabilities:
    """What a runtime can do beyond the core protocol, so callers ask instead of guess."""

    exec: bool = False
    signal: bool = False
    volumes: bool = False
    secrets: bool = False
    memory_limit: bool = False
    cpu_limit: bool = False
    host_network: bool = True


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
        """Start one instance and return as soon as it has a pid.

        Does not wait for the app to be ready: health checks do that.
        Raises RuntimeFailure when the sandbox cannot be created.
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
        """Handles of every instance this runtime currently runs, including orphans."""
        ...


@runtime_checkable
class Execer(Protocol):
    """Optional: run a command inside a running instance (exec health checks)."""

    def exec(self, handle: InstanceHandle, argv: list[str], timeout: float) -> tuple[int, str]:
        """Run ``argv`` inside the instance; return (exit code, combined output).

        Raises RuntimeFailure when the instance is not running or the command
        exceeds ``timeout`` seconds.
        """
        ...


@runtime_checkable
class HostResources(Protocol):
    """Optional: a runtime that holds machine-wide resources besides its instances
    (a bridge, firewall rules, runtime state), which the agent must manage."""

    def publish_ports(self, ports: set[int]) -> None:
        """The proxy's listen ports: the only host ports instances may reach."""
        ...

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
class Signaller(Protocol):
    """Optional: deliver a signal to an instance's processes without stopping it."""

    def signal(self, handle: InstanceHandle, sig: int) -> None: ...
