"""An in-memory runtime for fast, deterministic tests of the engine and for benchmarks.

No process, file or socket per instance: an instance is a record under a lock.
Everything a real runtime leaves to chance is set by the test instead: how long
a start or a stop takes (seconds, or an :class:`threading.Event` the test
releases), which starts fail and with what exception, when an instance dies
(:meth:`FakeRuntime.kill`), whether its exec health check passes
(:meth:`FakeRuntime.set_healthy`), and whether it honours SIGTERM. Every call
is counted (:attr:`FakeRuntime.calls`) and every signal recorded.

Instances live on a :class:`FakeHost`, which plays the machine (or the
container engine): two runtimes given the same host and home see the same
instances, as an agent restarted on the same ``KILN_HOME`` does, and a runtime
lists only the instances labelled with its own home. Each instance has
its own condition, so a watcher blocked in :meth:`FakeRuntime.wait` costs no
CPU and is woken only by a change of its own instance.

It enforces nothing, so it claims no limit; it runs no program, so it writes no
logs; it accepts raw layers and ignores them.
"""

from __future__ import annotations

import builtins
import contextlib
import os
import signal
import threading
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

from kiln.oci.runc import home_tag
from kiln.runtime import (
    HANDLE_VERSION,
    Capabilities,
    InstanceHandle,
    InstanceSpec,
    InstanceState,
    InstanceStatus,
    RuntimeFailure,
)

__all__ = ["KILLED", "FakeCalls", "FakeHost", "FakeRuntime", "StartFailure"]

KILLED = 128 + signal.SIGKILL
"""The exit code of an instance killed by SIGKILL, as a shell reports it."""

Delay = float | threading.Event
"""Seconds to take, or an event that holds the call until the test sets it."""

StartError = BaseException | type[BaseException]


@dataclass(frozen=True)
class FakeCalls:
    """How many times each method was called (started calls, whether they raised or not)."""

    starts: int = 0
    inspects: int = 0
    waits: int = 0
    stops: int = 0
    destroys: int = 0
    recovers: int = 0
    lists: int = 0
    execs: int = 0
    signals: int = 0


@dataclass
class StartFailure:
    """A start that raises ``error``: for the next ``times`` starts (None: every one),
    only of ``service`` when it is given."""

    error: StartError
    times: int | None = 1
    service: str | None = None

    def matches(self, spec: InstanceSpec) -> bool:
        return self.service is None or self.service == spec.service

    def exception(self, spec: InstanceSpec) -> BaseException:
        if isinstance(self.error, BaseException):
            return self.error
        return self.error(f"fake start of {spec.instance_id} refused")


@dataclass
class _Instance:
    spec: InstanceSpec
    home: str
    serial: int
    host: str
    port: int
    changed: threading.Condition
    status: InstanceStatus = InstanceStatus.RUNNING
    exit_code: int | None = None
    oom_killed: bool = False
    healthy: bool = True
    ignores_term: bool = False
    signals: list[int] = field(default_factory=list)
    """Shared with :attr:`FakeHost.signals`, which keeps it after a destroy."""
    exit_fds: list[int] = field(default_factory=list)
    """Our copies of the eventfds handed out by ``exit_fd``: written, then closed, at exit."""


class FakeHost:
    """The machine the instances of one or more fake runtimes live on.

    Instances outlive the runtime objects that started them, as containers
    outlive an agent; ``destroy`` is what removes them.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.instances: dict[tuple[str, str], _Instance] = {}
        self.signals: dict[tuple[str, str], list[int]] = {}
        """Every signal sent to each (home, instance id), kept after it is destroyed."""
        self._serials = 0

    def next_serial(self) -> int:
        """A number no other instance on this host ever had (guards a reused id)."""
        self._serials += 1
        return self._serials


class FakeRuntime:
    """The :class:`kiln.runtime.Runtime` protocol (with ``Execer`` and ``Signaller``)
    in memory; thread-safe, since the engine calls it from its thread pool.

    ``address`` is where every instance answers (default ``127.0.0.1`` and the
    spec's own port): a test that wants HTTP checks can point it at one real
    server. ``start_delay`` and ``stop_delay`` are how long each start takes and
    how long an instance takes to exit after SIGTERM; both can be changed at any
    time, and an :class:`threading.Event` in their place holds the calls until
    the test sets it.
    """

    name = "fake"
    capabilities = Capabilities(exec=True, signal=True, raw_layers=True)

    def __init__(
        self,
        home: Path | str = "fake-home",
        *,
        host: FakeHost | None = None,
        address: tuple[str, int] | None = None,
        start_delay: Delay = 0.0,
        stop_delay: Delay = 0.0,
    ) -> None:
        self.home = Path(home)
        self.label = home_tag(self.home)
        self.host = host or FakeHost()
        self.address = address
        self.start_delay = start_delay
        self.stop_delay = stop_delay
        self._lock = self.host.lock
        self._counts: dict[str, int] = {f.name: 0 for f in fields(FakeCalls)}
        self._failures: list[StartFailure] = []
        self._crashing: dict[str, int] = {}
        self._unhealthy_services: set[str] = set()
        self._starting: set[str] = set()
        self._closes = 0
        """How many times :meth:`close` ran: it ends the waits under way at that moment."""

    # what the test controls

    def fail_start(
        self, error: StartError, *, times: int | None = 1, service: str | None = None
    ) -> None:
        """Make the next ``times`` starts (None: all, until :meth:`clear_failures`), or
        only those of ``service``, raise ``error`` (an exception or its type)."""
        with self._lock:
            self._failures.append(StartFailure(error, times, service))

    def crash_on_start(self, service: str, exit_code: int = 1) -> None:
        """Instances of ``service`` started from now on exit at once with ``exit_code``,
        as an app that crashes on start-up does; the start itself succeeds."""
        with self._lock:
            self._crashing[service] = exit_code

    def clear_failures(self) -> None:
        with self._lock:
            self._failures.clear()
            self._crashing.clear()

    def kill(self, instance_id: str, exit_code: int = KILLED, *, oom: bool = False) -> None:
        """The instance dies now (as under SIGKILL, or the OOM killer with ``oom``)."""
        with self._lock:
            inst = self._instance(instance_id)
            if inst.status is InstanceStatus.RUNNING:
                inst.signals.append(signal.SIGKILL)
                self._exit(inst, exit_code, oom_killed=oom)

    def set_healthy(self, instance_id: str, healthy: bool) -> None:
        """Whether the instance's exec health check passes from now on."""
        with self._lock:
            self._instance(instance_id).healthy = healthy

    def set_service_healthy(self, service: str, healthy: bool) -> None:
        """The same for every instance of ``service``, running or started later."""
        with self._lock:
            if healthy:
                self._unhealthy_services.discard(service)
            else:
                self._unhealthy_services.add(service)
            for inst in self._mine():
                if inst.spec.service == service:
                    inst.healthy = healthy

    def ignore_term(self, instance_id: str, ignores: bool = True) -> None:
        """The instance ignores SIGTERM: a stop waits its whole grace, then kills it."""
        with self._lock:
            self._instance(instance_id).ignores_term = ignores

    # what the test reads

    @property
    def calls(self) -> FakeCalls:
        with self._lock:
            return FakeCalls(**self._counts)

    def starting(self) -> builtins.list[str]:
        """Ids whose start has begun and not returned yet (held by ``start_delay``)."""
        with self._lock:
            return sorted(self._starting)

    def running(self) -> builtins.list[str]:
        """Ids of this home's instances that run now."""
        with self._lock:
            return sorted(i.spec.instance_id for i in self._mine() if _runs(i))

    def signals(self, instance_id: str) -> builtins.list[int]:
        """Every signal the last instance of that id received, in order (stop, signal,
        kill), even after it was destroyed."""
        with self._lock:
            return list(self.host.signals.get((self.label, instance_id), []))

    def spec(self, instance_id: str) -> InstanceSpec:
        """What the instance was started with."""
        with self._lock:
            return self._instance(instance_id).spec

    # the Runtime protocol

    def start(self, spec: InstanceSpec) -> InstanceHandle:
        with self._lock:
            self._count("starts")
            key = (self.label, spec.instance_id)
            if spec.instance_id in self._starting or key in self.host.instances:
                raise RuntimeFailure(f"instance {spec.instance_id}: already exists")
            failure = next((f for f in self._failures if f.matches(spec)), None)
            if failure is not None and failure.times is not None:
                failure.times -= 1
                if failure.times <= 0:
                    self._failures.remove(failure)
            self._starting.add(spec.instance_id)
            delay = self.start_delay
        try:
            _pause(delay)
            if failure is not None:
                raise failure.exception(spec)
            with self._lock:
                return self._create(spec)
        finally:
            with self._lock:
                self._starting.discard(spec.instance_id)

    def _create(self, spec: InstanceSpec) -> InstanceHandle:
        host, port = self.address or ("127.0.0.1", spec.port)
        inst = _Instance(
            spec=spec,
            home=self.label,
            serial=self.host.next_serial(),
            host=host,
            port=port,
            changed=threading.Condition(self._lock),
            healthy=spec.service not in self._unhealthy_services,
        )
        self.host.instances[(self.label, spec.instance_id)] = inst
        self.host.signals[(self.label, spec.instance_id)] = inst.signals
        crash = self._crashing.get(spec.service)
        if crash is not None:
            self._exit(inst, crash)
        return self._handle(inst)

    def inspect(self, handle: InstanceHandle) -> InstanceState:
        with self._lock:
            self._count("inspects")
            return self._state(self._find(handle))

    def wait(self, handle: InstanceHandle, timeout: float) -> InstanceState:
        with self._lock:
            self._count("waits")
            inst = self._find(handle)
            closes = self._closes
            if inst is not None:
                inst.changed.wait_for(
                    lambda: not _runs(inst) or self._closes != closes, timeout=max(0.0, timeout)
                )
            return self._state(self._find(handle))

    def stop(
        self, handle: InstanceHandle, grace: float, sig: int = signal.SIGTERM
    ) -> InstanceState:
        """``sig``, then up to ``grace`` seconds for the instance to exit (it takes
        ``stop_delay`` unless it ignores ``sig``), then SIGKILL."""
        with self._lock:
            self._count("stops")
            delay = self.stop_delay
            inst = self._find(handle)
            if inst is None or not _runs(inst):
                return self._state(inst)
            inst.signals.append(sig)
            obeys = sig != signal.SIGKILL and not inst.ignores_term
        if sig == signal.SIGKILL:
            with self._lock:
                if _runs(inst):
                    self._exit(inst, KILLED)
                return self._state(inst)
        deadline = time.monotonic() + max(0.0, grace)
        if obeys:
            if isinstance(delay, threading.Event):
                exits = delay.wait(max(0.0, grace))
            else:
                exits = delay <= grace
                with self._lock:
                    inst.changed.wait_for(lambda: not _runs(inst), timeout=min(delay, grace))
            with self._lock:
                if exits and _runs(inst):
                    self._exit(inst, 0)
        with self._lock:
            inst.changed.wait_for(
                lambda: not _runs(inst), timeout=max(0.0, deadline - time.monotonic())
            )
            if _runs(inst):
                inst.signals.append(signal.SIGKILL)
                self._exit(inst, KILLED)
            return self._state(inst)

    def destroy(self, handle: InstanceHandle) -> None:
        with self._lock:
            self._count("destroys")
            inst = self._find(handle)
            if inst is None:
                return
            if _runs(inst):
                inst.signals.append(signal.SIGKILL)
                self._exit(inst, KILLED)
            del self.host.instances[(inst.home, inst.spec.instance_id)]
            inst.status = InstanceStatus.GONE
            inst.changed.notify_all()
            _signal_exit(inst)

    def recover(self, handle: InstanceHandle) -> bool:
        with self._lock:
            self._count("recovers")
            if handle.runtime != self.name:
                return False
            inst = self._find(handle)
            return inst is not None and _runs(inst)

    def list(self) -> builtins.list[InstanceHandle]:
        with self._lock:
            self._count("lists")
            return [self._handle(i) for i in self._mine() if _runs(i)]

    def close(self) -> None:
        """Instances keep running; every :meth:`wait` under way returns at once (the
        instance still RUNNING), so no thread of the caller's pool stays blocked."""
        with self._lock:
            self._closes += 1
            for inst in self._mine():
                inst.changed.notify_all()

    # Execer and Signaller

    def exec(
        self, handle: InstanceHandle, argv: builtins.list[str], timeout: float
    ) -> tuple[int, str]:
        """(0, "") while the instance is healthy, (1, …) once the test made it unhealthy."""
        with self._lock:
            self._count("execs")
            inst = self._find(handle)
            if inst is None or not _runs(inst):
                raise RuntimeFailure(f"instance {handle.instance_id}: not running, cannot exec")
            if inst.healthy:
                return 0, ""
            return 1, f"{argv[0] if argv else '?'}: unhealthy (set by the test)\n"

    def signal(self, handle: InstanceHandle, sig: int) -> None:
        """Recorded; SIGKILL kills, and SIGTERM ends an instance that obeys it."""
        with self._lock:
            self._count("signals")
            inst = self._find(handle)
            if inst is None or not _runs(inst):
                return
            inst.signals.append(sig)
            if sig == signal.SIGKILL:
                self._exit(inst, KILLED)
            elif sig == signal.SIGTERM and not inst.ignores_term:
                self._exit(inst, 0)

    # inside the lock

    def _count(self, name: str) -> None:
        self._counts[name] += 1

    def _mine(self) -> builtins.list[_Instance]:
        return [i for i in self.host.instances.values() if i.home == self.label]

    def _instance(self, instance_id: str) -> _Instance:
        inst = self.host.instances.get((self.label, instance_id))
        if inst is None:
            raise RuntimeFailure(f"instance {instance_id}: no such fake instance")
        return inst

    def _find(self, handle: InstanceHandle) -> _Instance | None:
        """The instance the handle names, if it is still the one the handle was made for."""
        if handle.runtime != self.name:
            raise RuntimeFailure(
                f"instance {handle.instance_id}: handle of runtime {handle.runtime!r}, "
                f"not {self.name!r}"
            )
        inst = self.host.instances.get((self.label, handle.instance_id))
        if inst is None or handle.data.get("serial") != inst.serial:
            return None
        return inst

    def _handle(self, inst: _Instance) -> InstanceHandle:
        return InstanceHandle(
            version=HANDLE_VERSION,
            runtime=self.name,
            instance_id=inst.spec.instance_id,
            host=inst.host,
            port=inst.port,
            data={"serial": inst.serial, "home": inst.home, "service": inst.spec.service},
        )

    def _exit(self, inst: _Instance, exit_code: int, *, oom_killed: bool = False) -> None:
        inst.status = InstanceStatus.EXITED
        inst.exit_code = exit_code
        inst.oom_killed = oom_killed
        inst.changed.notify_all()
        _signal_exit(inst)

    def exit_fd(self, handle: InstanceHandle) -> int | None:
        """An eventfd written when the instance stops running (the local runtime's pidfd,
        in memory): a thousand fake instances are watched without a thread each."""
        with self._lock:
            inst = self._find(handle)
            if inst is None or not _runs(inst):
                return None
            fd = os.eventfd(0, os.EFD_CLOEXEC)
            inst.exit_fds.append(os.dup(fd))
            return fd

    @staticmethod
    def _state(inst: _Instance | None) -> InstanceState:
        if inst is None or inst.status is InstanceStatus.GONE:
            return InstanceState(InstanceStatus.GONE, None, None)
        pid = None if inst.status is not InstanceStatus.RUNNING else 100_000 + inst.serial
        return InstanceState(inst.status, inst.exit_code, pid, inst.oom_killed)


def _signal_exit(inst: _Instance) -> None:
    for fd in inst.exit_fds:
        with contextlib.suppress(OSError):
            os.eventfd_write(fd, 1)
        os.close(fd)
    inst.exit_fds.clear()


def _runs(inst: _Instance) -> bool:
    return inst.status is InstanceStatus.RUNNING


def _pause(delay: Delay) -> None:
    """Take ``delay``: seconds, or until the test sets the event."""
    if isinstance(delay, threading.Event):
        delay.wait()
    elif delay > 0:
        time.sleep(delay)
