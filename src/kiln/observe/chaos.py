"""Chaos experiments: inject faults into running instances under load and prove the
service heals.

An experiment checks a steady-state hypothesis first (every instance of the service
ready, and a short probe load through its listener fails under ``max_error_rate``),
refuses to start when it does not hold, then injects ``count`` faults one after the
other while the built-in load runs, waits after each for the service to be back in
its steady state (time to recovery), and checks the hypothesis again at the end.

Faults act on the instance itself, from this machine, never through the agent (the
agent is what must notice and heal):

* ``kill``: SIGKILL of the instance's init (local), ``docker kill`` (docker), or its
  one-task service scaled to zero through the manager (swarm, whose tasks have no kill;
  the other faults act through the task's node's engine, from ``[runtime] nodes``, and
  are refused without it);
* ``pause``: the instance frozen (``runc pause`` / ``docker pause``) for ``duration``;
* ``drift``: a file written into the instance's root on disk, outside its writable
  paths (local: the overlay's upper dir in the shim's mount namespace; docker: the
  container's GraphDriver ``UpperDir``); recovery is the drift detector replacing it;
* ``latency``: ``tc netem delay`` on the instance's interface in its network namespace
  for ``duration``; a kernel without netem gets a ``tbf`` rate limit sized so that a
  full-size packet waits ``delay``, and the report says so.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from kiln.errors import KilnError
from kiln.observe.load import LoadGenerator, LoadReport

__all__ = [
    "FAULT_KINDS",
    "ChaosPlan",
    "ChaosRefused",
    "ChaosReport",
    "FaultResult",
    "Hypothesis",
    "render_report",
    "run_chaos",
]

FAULT_KINDS = ("kill", "pause", "drift", "latency")
SWARM_FAULTS = ("kill",)
"""What the swarm runtime can inject from the manager alone (the others need the engine
of the task's node: ``[runtime] nodes``)."""
POLL = 0.1
DRIFT_PREFIX = ".kiln-chaos-drift-"
FULL_PACKET = 1514
"""Bytes of a full Ethernet frame: what the ``tbf`` fallback delays by ``delay``."""
NOT_STEADY = ("pending", "starting", "unhealthy")

StatusSource = Callable[[], dict[str, Any]]


class ChaosRefused(KilnError):
    """The steady state does not hold before the experiment: nothing was injected."""


class Undo(Protocol):
    def __call__(self) -> None: ...


@dataclass(frozen=True)
class ChaosPlan:
    kind: str
    service: str
    count: int = 1
    every: float = 5.0
    """Seconds from one injection to the next (later if the service is not back yet)."""
    duration: float = 5.0
    """How long a pause or a latency fault lasts."""
    delay: float = 0.1
    """The latency fault's added delay, in seconds."""
    max_error_rate: float = 0.01
    probe: float = 2.0
    """Seconds of probe load for each check of the hypothesis."""
    recovery_timeout: float = 60.0
    path: str = "/"
    workers: int = 4

    def check(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise KilnError(f"chaos: unknown fault {self.kind!r} (one of {', '.join(FAULT_KINDS)})")
        if self.count < 1 or self.count > 1000:
            raise KilnError(f"--count: {self.count} is not between 1 and 1000")
        if not 0 <= self.max_error_rate < 1:
            raise KilnError(f"--max-error-rate: {self.max_error_rate} is not in [0, 1)")
        if self.workers < 1 or self.workers > 64:
            raise KilnError(f"--workers: {self.workers} is not between 1 and 64")
        if self.kind in ("pause", "latency") and self.duration <= 0:
            raise KilnError(f"--duration must be more than 0 for a {self.kind} fault")
        if self.kind == "latency" and not 0.001 <= self.delay <= 60:
            raise KilnError("--delay: must be between 1ms and 60s")
        if not self.path.startswith("/") or any(c in self.path for c in " \r\n\t"):
            raise KilnError(f"--path: {self.path!r} is not an absolute URL path")


@dataclass
class Hypothesis:
    """The steady state: all desired instances ready, the probe load's error rate under
    the threshold."""

    held: bool
    ready: int
    desired: int
    sent: int
    failed: int
    error_rate: float
    reason: str = ""


@dataclass
class FaultResult:
    kind: str
    instance: str
    at: float
    """Wall-clock time of the injection (seconds since the epoch)."""
    detail: str
    recovered: bool = False
    recovery_seconds: float | None = None
    replaced: bool = False
    detected: bool | None = None
    """drift only: whether the instance was replaced for it in time."""
    sent: int = 0
    failed: int = 0
    p95_ms: float = 0.0
    """The load's p95 latency between injection and recovery."""
    unrecovered: str = ""
    """Why the service was not steady at the deadline, when it did not recover."""


@dataclass
class ChaosReport:
    service: str
    kind: str
    runtime: str
    before: Hypothesis
    after: Hypothesis | None = None
    faults: list[FaultResult] = field(default_factory=list)
    sent: int = 0
    failed: int = 0
    p50_ms: float = 0.0
    p95_ms: float = 0.0

    @property
    def recovery(self) -> tuple[float | None, float | None]:
        """Median and p95 of the time to recovery of the faults that recovered."""
        samples = sorted(f.recovery_seconds for f in self.faults if f.recovery_seconds is not None)
        if not samples:
            return None, None
        p95 = samples[min(len(samples) - 1, round(0.95 * (len(samples) - 1)))]
        return statistics.median(samples), p95

    @property
    def held(self) -> bool:
        """The experiment's verdict: every fault recovered and the hypothesis held after."""
        return self.after is not None and self.after.held and all(f.recovered for f in self.faults)

    def to_json(self) -> dict[str, Any]:
        median, p95 = self.recovery
        return {
            "service": self.service,
            "kind": self.kind,
            "runtime": self.runtime,
            "hypothesis": {
                "before": asdict(self.before),
                "after": asdict(self.after) if self.after is not None else None,
            },
            "faults": [asdict(f) for f in self.faults],
            "recovery": {"median_seconds": median, "p95_seconds": p95},
            "requests": {"sent": self.sent, "failed": self.failed},
            "latency_ms": {"p50": self.p50_ms, "p95": self.p95_ms},
            "held": self.held,
        }


# -- reading the service from the agent --------------------------------------------


def _service(snapshot: dict[str, Any], name: str) -> dict[str, Any]:
    services = snapshot.get("services") or {}
    svc = services.get(name)
    if svc is None:
        raise KilnError(f"no service {name!r} (kiln status lists them)")
    return dict(svc)


def _ready(svc: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        i
        for i in svc.get("instances") or []
        if i.get("state") == "ready" and i.get("health") != "unhealthy"
    ]


def _steady(svc: dict[str, Any]) -> str:
    """Why the service is not in its steady state, or "" when it is."""
    desired = int(svc.get("desired_replicas") or 0)
    ready = _ready(svc)
    if svc.get("rollout"):
        return "a rollout is in progress"
    alarms = svc.get("alarms") or []
    if alarms:
        return f"alarm: {alarms[0]}"
    if desired == 0:
        return "it has no desired instance"
    unsettled = [i["id"] for i in svc.get("instances") or [] if i.get("state") in NOT_STEADY]
    unsettled += [i["id"] for i in ready if i.get("health") not in (None, "ready")]
    if unsettled:
        return f"instance {unsettled[0]} is not ready"
    if len(ready) != desired:
        return f"{len(ready)} of {desired} instances ready"
    return ""


def _probe(port: int, plan: ChaosPlan) -> LoadReport:
    load = LoadGenerator("127.0.0.1", port, path=plan.path, workers=plan.workers).start()
    time.sleep(plan.probe)
    return load.stop()


def check_hypothesis(status: StatusSource, plan: ChaosPlan) -> Hypothesis:
    svc = _service(status(), plan.service)
    desired = int(svc.get("desired_replicas") or 0)
    why = _steady(svc)
    port = int(svc.get("listen") or 0)
    if not why and not port:
        why = "it has no listener to send load to"
    if why:
        return Hypothesis(False, len(_ready(svc)), desired, 0, 0, 0.0, why)
    report = _probe(port, plan)
    rate = report.failed / report.sent if report.sent else 1.0
    after = _service(status(), plan.service)
    why = _steady(after)
    if not why and rate > plan.max_error_rate:
        top = max(report.errors.items(), key=lambda kv: kv[1])[0] if report.errors else "none"
        why = (
            f"{report.failed} of {report.sent} probe requests failed "
            f"({rate:.1%} > {plan.max_error_rate:.1%}; mostly {top})"
        )
    return Hypothesis(not why, len(_ready(after)), desired, report.sent, report.failed, rate, why)


# -- injectors ----------------------------------------------------------------------


class Injector(Protocol):
    def kill(self, instance: dict[str, Any]) -> str: ...
    def pause(self, instance: dict[str, Any]) -> tuple[str, Undo]: ...
    def drift(self, instance: dict[str, Any]) -> tuple[str, Undo]: ...
    def latency(self, instance: dict[str, Any], delay: float) -> tuple[str, Undo]: ...


def _run(argv: list[str], what: str) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise KilnError(f"{what}: {e}") from e
    if done.returncode != 0:
        reason = (done.stderr.strip() or done.stdout.strip()).splitlines()
        raise KilnError(f"{what}: {reason[-1] if reason else f'exit {done.returncode}'}")
    return done.stdout


def _same_netns(netns: str) -> bool:
    try:
        return os.stat(netns).st_ino == os.stat("/proc/self/ns/net").st_ino
    except OSError as e:
        raise KilnError(f"cannot read the network namespace {netns}: {e.strerror}") from e


def _interfaces(netns: str) -> list[str]:
    out = _run(["nsenter", f"--net={netns}", "ip", "-o", "link", "show"], "ip link")
    names = []
    for line in out.splitlines():
        parts = line.split(":")
        if len(parts) > 1:
            name = parts[1].strip().split("@")[0]
            if name and name != "lo":
                names.append(name)
    return names


def add_latency(netns: str, delay: float) -> tuple[str, Undo]:
    """A delay on every interface but lo of ``netns``: netem when the kernel has it,
    else a tbf rate limit under which a full-size frame waits ``delay``."""
    if _same_netns(netns):
        raise KilnError("the instance shares this machine's network namespace: no latency fault")
    devices = _interfaces(netns)
    if not devices:
        raise KilnError(f"no interface but lo in {netns}")
    enter = ["nsenter", f"--net={netns}", "tc", "qdisc"]
    millis = max(1, round(delay * 1000))
    detail = f"netem delay {millis}ms"
    added: list[str] = []

    def undo() -> None:
        for device in added:
            subprocess.run([*enter, "del", "dev", device, "root"], capture_output=True, timeout=30)

    try:
        for device in devices:
            try:
                _run([*enter, "add", "dev", device, "root", "netem", "delay", f"{millis}ms"], "tc")
            except KilnError as e:
                if "unknown" not in str(e).lower():
                    raise
                rate = max(8000, round(FULL_PACKET * 8 / delay))
                tbf = ["tbf", "rate", f"{rate}bit", "burst", "1600", "latency", "30s"]
                _run([*enter, "add", "dev", device, "root", *tbf], "tc")
                detail = (
                    f"tbf rate {rate // 1000}kbit ≈ {millis}ms per full frame "
                    "(this kernel has no netem)"
                )
            added.append(device)
    except BaseException:
        undo()
        raise
    return f"{detail} on {', '.join(devices)}", undo


def _remove_file(path: Path) -> Undo:
    def undo() -> None:
        with contextlib.suppress(OSError):
            path.unlink()

    return undo


class LocalInjector:
    """Faults on the local runtime's instances, found from their instance directories."""

    def __init__(self, home: Path) -> None:
        from kiln.runtime.local import LocalRuntime

        self.runtime = LocalRuntime(home)

    def _handle_data(self, instance: dict[str, Any]) -> dict[str, Any]:
        from kiln.process import proc_start_time

        iid = str(instance["id"])
        if not iid or iid in (".", "..") or "/" in iid or "\0" in iid or len(iid) > 128:
            raise KilnError(f"instance {iid!r}: not an instance id")
        handle = self.runtime.handle_for(iid)
        if handle is None:
            raise KilnError(f"instance {iid}: no handle on this machine")
        data = dict(handle.data)
        for role in ("sandbox", "shim"):
            pid = int(data.get(f"{role}_pid") or 0)
            if not pid or proc_start_time(pid) != data.get(f"{role}_start_time"):
                raise KilnError(f"instance {iid}: its {role} process is gone")
        return data

    def kill(self, instance: dict[str, Any]) -> str:
        pid = int(self._handle_data(instance)["sandbox_pid"])
        os.kill(pid, signal.SIGKILL)
        return f"SIGKILL to pid {pid}"

    def pause(self, instance: dict[str, Any]) -> tuple[str, Undo]:
        iid = str(instance["id"])
        data = self._handle_data(instance)
        container = str(data.get("container_id") or self.runtime.container_id(iid))
        runc = self.runtime.runc
        _run(runc.argv("pause", container), f"runc pause {container}")

        def undo() -> None:
            subprocess.run(runc.argv("resume", container), capture_output=True, timeout=30)

        return f"runc pause {container}", undo

    def drift(self, instance: dict[str, Any]) -> tuple[str, Undo]:
        iid = str(instance["id"])
        shim = int(self._handle_data(instance)["shim_pid"])
        upper = Path(f"/proc/{shim}/root") / str(self.runtime.view_dir(iid)).lstrip("/") / "upper"
        if not upper.is_dir():
            raise KilnError(f"instance {iid}: its root's upper dir is not at {upper}")
        name = f"{DRIFT_PREFIX}{secrets.token_hex(4)}"
        (upper / name).write_text("written by kiln chaos drift\n")
        return f"wrote /{name} into its root", _remove_file(upper / name)

    def latency(self, instance: dict[str, Any], delay: float) -> tuple[str, Undo]:
        pid = int(self._handle_data(instance)["sandbox_pid"])
        return add_latency(f"/proc/{pid}/ns/net", delay)


def swarm_nodes(home: Path) -> dict[str, str]:
    """The home's ``[runtime] nodes`` as its agent recorded them in ``runtime.json``."""
    from kiln.runtime.select import read_choice

    with contextlib.suppress(KilnError):
        choice = read_choice(home)
        if choice is not None:
            return dict(choice.nodes)
    return {}


def docker_host(home: Path) -> str | None:
    """The engine the home's agent drives (its ``--runtime-host``, else the host its first
    agent recorded in ``runtime.json``: a ``kiln agent --file`` has no flag), else None:
    the SDK's default (``DOCKER_HOST``)."""
    with contextlib.suppress(OSError, ValueError):
        pid = int((home / "agent.pid").read_text().strip())
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if b"--runtime-host" in argv:
            return argv[argv.index(b"--runtime-host") + 1].decode()
    from kiln.runtime.select import read_choice

    with contextlib.suppress(KilnError):
        choice = read_choice(home)
        if choice is not None:
            return choice.host
    return None


_INSTANCE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def _owned_by(home: Path, labels: dict[str, Any] | None, iid: str, what: str) -> None:
    """Refuse a target that is not this home's instance ``iid`` by its labels: the id
    and the container come from the agent's status (a remote agent's, with a context),
    and the engine resolves a name, an id prefix or a ``../`` path in a URL to whatever
    container or service has it, another home's or one Kiln never made."""
    from kiln.oci.runc import home_tag
    from kiln.runtime.docker import LABEL_HOME, LABEL_INSTANCE

    labels = labels or {}
    if labels.get(LABEL_HOME) != home_tag(home.absolute()) or labels.get(LABEL_INSTANCE) != iid:
        raise KilnError(
            f"instance {iid!r}: {what} is not this home's instance (labels "
            f"{LABEL_HOME}, {LABEL_INSTANCE}); nothing injected"
        )


def _instance_id(instance: dict[str, Any]) -> str:
    iid = str(instance.get("id") or "")
    if not _INSTANCE_ID.match(iid):
        raise KilnError(f"instance {iid[:80]!r}: not an instance id; nothing injected")
    return iid


class DockerInjector:
    """Faults on the docker runtime's containers, through the same engine as the agent;
    only on a container labelled as this home's instance."""

    def __init__(self, host: str | None, home: Path) -> None:
        import docker

        self.client = (
            docker.DockerClient(base_url=host) if host else docker.from_env(version="auto")
        )
        self.home = home

    def _container(self, instance: dict[str, Any]) -> Any:
        import docker.errors

        iid = _instance_id(instance)
        cid = str(instance.get("container") or "")
        if not re.fullmatch(r"[0-9a-f]{12,64}", cid):
            raise KilnError(f"instance {iid}: no container id")
        try:
            container = self.client.containers.get(cid)
        except docker.errors.DockerException as e:
            raise KilnError(f"instance {iid}: container {cid}: {e}") from e
        _owned_by(self.home, container.labels, iid, f"container {cid[:12]}")
        return container

    def kill(self, instance: dict[str, Any]) -> str:
        container = self._container(instance)
        container.kill("SIGKILL")
        return f"docker kill {container.short_id}"

    def pause(self, instance: dict[str, Any]) -> tuple[str, Undo]:
        import docker.errors

        container = self._container(instance)
        container.pause()

        def undo() -> None:
            with contextlib.suppress(docker.errors.DockerException):
                container.unpause()

        return f"docker pause {container.short_id}", undo

    def drift(self, instance: dict[str, Any]) -> tuple[str, Undo]:
        container = self._container(instance)
        upper = ((container.attrs.get("GraphDriver") or {}).get("Data") or {}).get("UpperDir")
        if not upper or not Path(upper).is_dir():
            raise KilnError(
                f"instance {instance['id']}: the container's upper dir is not on this machine"
            )
        name = f"{DRIFT_PREFIX}{secrets.token_hex(4)}"
        (Path(upper) / name).write_text("written by kiln chaos drift\n")
        return f"wrote /{name} into its upper dir", _remove_file(Path(upper) / name)

    def latency(self, instance: dict[str, Any], delay: float) -> tuple[str, Undo]:
        container = self._container(instance)
        key = (container.attrs.get("NetworkSettings") or {}).get("SandboxKey")
        if not key or not Path(key).exists():
            raise KilnError(f"instance {instance['id']}: its network namespace is not here")
        return add_latency(str(key), delay)


class SwarmInjector:
    """Faults on the swarm runtime's tasks. Swarm has no kill, pause or exec for a task:
    a kill scales the instance's one-task service to zero through the manager the agent
    drives, so its node stops the task as the crash of an instance would end it, unasked
    by Kiln. Pause, drift and latency act on the task's container through its node's
    engine (``nodes``, the home's ``[runtime] nodes``), once the manager and that engine
    agree it is this home's instance (:mod:`kiln.runtime.swarm_nodes`); without ``nodes``
    they are refused before anything is injected."""

    def __init__(self, host: str | None, home: Path, nodes: dict[str, str] | None = None) -> None:
        import docker

        from kiln.oci.runc import home_tag
        from kiln.runtime.swarm_nodes import NodeEngines

        self.api: Any = (
            docker.APIClient(base_url=host, version="auto")
            if host
            else docker.from_env(version="auto").api
        )
        self.prefix = f"kiln-{home_tag(home.absolute())}-"
        self.home = home
        self.engines = NodeEngines(self.api, nodes, home_tag(home.absolute()))

    def _service(self, iid: str) -> dict[str, Any]:
        import docker.errors

        name = self.prefix + iid
        try:
            service: dict[str, Any] = self.api.inspect_service(name)
        except docker.errors.DockerException as e:
            raise KilnError(f"instance {iid}: swarm service {name}: {e}") from e
        _owned_by(
            self.home, (service.get("Spec") or {}).get("Labels"), iid, f"swarm service {name}"
        )
        return service

    def kill(self, instance: dict[str, Any]) -> str:
        import docker
        import docker.errors

        iid = _instance_id(instance)
        service = self._service(iid)
        name = self.prefix + iid
        try:
            self.api.update_service(
                service["ID"],
                version=service["Version"]["Index"],
                mode=docker.types.ServiceMode("replicated", replicas=0),
                fetch_current_spec=True,
            )
        except docker.errors.DockerException as e:
            raise KilnError(f"instance {iid}: swarm service {name}: {e}") from e
        return f"its swarm service {name} scaled to 0 through the manager (its task ended)"

    def _refuse(self, kind: str) -> KilnError:
        return KilnError(
            f"chaos {kind}: the swarm runtime cannot {kind} a task without [runtime] nodes "
            "(each node's Engine API)"
        )

    def _container(self, instance: dict[str, Any], kind: str) -> Any:
        """The instance's running task's container, through its node's engine."""
        import docker.errors

        if not self.engines:
            raise self._refuse(kind)
        iid = _instance_id(instance)
        service = self._service(iid)
        try:
            tasks = self.api.tasks(filters={"service": service["ID"], "desired-state": "running"})
        except docker.errors.DockerException as e:
            raise KilnError(f"instance {iid}: the tasks of its swarm service: {e}") from e
        running = [t for t in tasks if (t.get("Status") or {}).get("State") == "running"]
        if not running:
            raise KilnError(f"instance {iid}: its swarm task does not run; nothing injected")
        return self.engines.container(iid, running[0], str(service["ID"]))

    def pause(self, instance: dict[str, Any]) -> tuple[str, Undo]:
        import docker.errors

        found = self._container(instance, "pause")
        engine = found.engine
        with engine._engine(str(instance["id"]), "pause the container"):
            engine.api.pause(found.id)

        def undo() -> None:
            with contextlib.suppress(docker.errors.DockerException):
                engine.api.unpause(found.id)

        return f"docker pause {found.id[:12]} on swarm node {engine.node}", undo

    def drift(self, instance: dict[str, Any]) -> tuple[str, Undo]:
        """A file written into the container's layer on disk, as on the docker runtime:
        its root is read-only, which the Engine API's archive upload refuses, so the
        node's engine must be on this machine."""
        found = self._container(instance, "drift")
        upper = ((found.attrs.get("GraphDriver") or {}).get("Data") or {}).get("UpperDir")
        if not found.engine.local_engine or not upper or not Path(upper).is_dir():
            raise KilnError(
                f"instance {instance['id']}: the container's layer is not on this machine "
                f"(swarm node {found.engine.node}; its root is read-only to the Engine API)"
            )
        name = f"{DRIFT_PREFIX}{secrets.token_hex(4)}"
        (Path(upper) / name).write_text("written by kiln chaos drift\n")
        return (
            f"wrote /{name} into its layer on swarm node {found.engine.node}",
            _remove_file(Path(upper) / name),
        )

    def latency(self, instance: dict[str, Any], delay: float) -> tuple[str, Undo]:
        found = self._container(instance, "latency")
        key = (found.attrs.get("NetworkSettings") or {}).get("SandboxKey")
        if not found.engine.local_engine or not key or not Path(key).exists():
            raise KilnError(
                f"instance {instance['id']}: its network namespace is not on this machine "
                f"(swarm node {found.engine.node}): run kiln chaos latency where it is"
            )
        return add_latency(str(key), delay)


def injector_for(runtime: str, home: Path, kind: str = "kill") -> Injector:
    if runtime == "local":
        return LocalInjector(home)
    if runtime == "docker":
        return DockerInjector(docker_host(home), home)
    if runtime == "swarm":
        nodes = swarm_nodes(home)
        if kind in SWARM_FAULTS or nodes:
            return SwarmInjector(docker_host(home), home, nodes)
        raise KilnError(
            f"kiln chaos {kind}: not supported on the swarm runtime without [runtime] nodes "
            "(Swarm has no pause, exec or file access for a task; each node's Engine API "
            "has); kill is"
        )
    raise KilnError(f"kiln chaos: not supported on the {runtime} runtime")


# -- the experiment -----------------------------------------------------------------


def _window(load: LoadGenerator, since: tuple[int, int, int]) -> tuple[int, int, float]:
    """Requests sent and failed and the p95 (ms) since ``since`` (sent, failed, oks)."""
    report = load.report
    sent, failed = report.sent - since[0], report.failed - since[1]
    latencies = sorted(report.latencies[since[2] :])
    p95 = latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))] if latencies else 0.0
    return sent, failed, p95 * 1000


def _mark(load: LoadGenerator) -> tuple[int, int, int]:
    report = load.report
    return report.sent, report.failed, len(report.latencies)


def _inject(injector: Injector, plan: ChaosPlan, victim: dict[str, Any]) -> tuple[str, Undo | None]:
    if plan.kind == "kill":
        return injector.kill(victim), None
    if plan.kind == "pause":
        return injector.pause(victim)
    if plan.kind == "drift":
        return injector.drift(victim)
    return injector.latency(victim, plan.delay)


def _pick(svc: dict[str, Any], hit: list[str]) -> dict[str, Any]:
    """A ready instance, one not hit yet when there is one."""
    ready = sorted(_ready(svc), key=lambda i: str(i["id"]))
    fresh = [i for i in ready if i["id"] not in hit]
    if not ready:
        raise KilnError("no ready instance to inject a fault into")
    return (fresh or ready)[0]


def _fault(
    status: StatusSource,
    injector: Injector,
    plan: ChaosPlan,
    victim: dict[str, Any],
    load: LoadGenerator,
) -> FaultResult:
    """Inject one fault, lift it after ``duration`` (pause, latency), and wait for the
    steady state (for kill and drift: with the victim replaced)."""
    since = _mark(load)
    start = time.monotonic()
    result = FaultResult(plan.kind, str(victim["id"]), time.time(), "")
    result.detail, undo = _inject(injector, plan, victim)
    lifted = undo is None or plan.kind == "drift"
    deadline = start + plan.recovery_timeout + (plan.duration if not lifted else 0)
    try:
        while time.monotonic() < deadline:
            if not lifted and time.monotonic() - start >= plan.duration:
                assert undo is not None
                undo()
                lifted = True
            svc = _service(status(), plan.service)
            live = {i["id"] for i in svc.get("instances") or [] if i.get("state") != "stopped"}
            result.replaced = victim["id"] not in {i["id"] for i in _ready(svc)}
            gone = result.replaced or plan.kind in ("pause", "latency")
            why = _steady(svc) or ("" if gone else f"{victim['id']} is still in service")
            if lifted and not why:
                result.recovered = True
                result.recovery_seconds = round(time.monotonic() - start, 3)
                break
            if not lifted and victim["id"] not in live:
                undo = None  # replaced while frozen or slowed: nothing left to lift
                lifted = True
            result.unrecovered = why
            time.sleep(POLL)
    finally:
        if undo is not None:
            undo()
    if result.recovered:
        result.unrecovered = ""
    if plan.kind == "drift":
        result.detected = result.replaced
    result.sent, result.failed, result.p95_ms = _window(load, since)
    return result


def run_chaos(
    plan: ChaosPlan,
    home: Path,
    status: StatusSource | None = None,
    injector: Injector | None = None,
    progress: Callable[[str], None] | None = None,
) -> ChaosReport:
    """The experiment; raises :class:`ChaosRefused` when the steady state does not hold
    before it (nothing injected)."""
    plan.check()
    say = progress or (lambda _line: None)
    if status is not None:
        return _experiment(plan, home, status, injector, say)
    from kiln.agent.client import AgentClient

    with AgentClient(home) as client:
        if client.addr is not None:
            raise KilnError(
                f"kiln chaos injects faults on this machine, but the agent is {client.addr} "
                f"({client.source}): run it on the agent's machine"
            )
        return _experiment(plan, home, client.status, injector, say)


def _experiment(
    plan: ChaosPlan,
    home: Path,
    status: StatusSource,
    injector: Injector | None,
    say: Callable[[str], None],
) -> ChaosReport:
    snapshot = status()
    svc = _service(snapshot, plan.service)
    runtime = str(snapshot.get("runtime") or "local")
    injector = injector or injector_for(runtime, home, plan.kind)
    before = check_hypothesis(status, plan)
    if not before.held:
        raise ChaosRefused(
            f"steady state of {plan.service} does not hold: {before.reason}; nothing injected"
        )
    report = ChaosReport(plan.service, plan.kind, runtime, before)
    say(f"steady state holds: {before.ready}/{before.desired} ready, {before.sent} probes")
    port = int(_service(status(), plan.service)["listen"])
    hit: list[str] = []
    with _load(port, plan) as load:
        next_at = time.monotonic()
        for number in range(plan.count):
            time.sleep(max(0.0, next_at - time.monotonic()))
            next_at = time.monotonic() + plan.every
            svc = _service(status(), plan.service)
            victim = _pick(svc, hit)
            hit.append(str(victim["id"]))
            fault = _fault(status, injector, plan, victim, load)
            report.faults.append(fault)
            state = (
                f"recovered in {fault.recovery_seconds:.2f} s"
                if fault.recovered
                else "NOT recovered"
            )
            say(f"fault {number + 1}/{plan.count}: {plan.kind} {victim['id']}: {state}")
            if not fault.recovered:
                break
    report.sent, report.failed = load.report.sent, load.report.failed
    report.p50_ms = load.report.percentile(50) * 1000
    report.p95_ms = load.report.percentile(95) * 1000
    report.after = check_hypothesis(status, plan)
    return report


@contextlib.contextmanager
def _load(port: int, plan: ChaosPlan) -> Iterator[LoadGenerator]:
    load = LoadGenerator("127.0.0.1", port, path=plan.path, workers=plan.workers).start()
    try:
        yield load
    finally:
        load.stop()


# -- the report ---------------------------------------------------------------------


def _hypothesis_line(label: str, h: Hypothesis | None) -> str:
    if h is None:
        return f"hypothesis {label}: not checked"
    verdict = "held" if h.held else f"did NOT hold ({h.reason})"
    return (
        f"hypothesis {label}: {verdict}: {h.ready}/{h.desired} ready, "
        f"{h.failed} of {h.sent} probe requests failed"
    )


def render_report(report: ChaosReport) -> str:
    lines = [
        f"chaos {report.kind} on {report.service} ({report.runtime} runtime): "
        f"{len(report.faults)} fault(s)",
        _hypothesis_line("before", report.before),
    ]
    for f in report.faults:
        at = time.strftime("%H:%M:%S", time.localtime(f.at)) + f".{int(f.at % 1 * 1000):03d}"
        took = (
            f"recovered in {f.recovery_seconds:.2f} s"
            if f.recovered
            else f"NOT recovered ({f.unrecovered})"
        )
        extra = ""
        if f.detected is not None:
            extra = ", drift detected" if f.detected else ", drift not detected"
        lines.append(
            f"  {f.kind:<8} {f.instance:<16} at {at}  {took}{extra}  "
            f"{f.failed} of {f.sent} requests failed  p95 {f.p95_ms:.1f} ms  ({f.detail})"
        )
    median, p95 = report.recovery
    if median is not None and p95 is not None:
        lines.append(f"time to recovery: median {median:.2f} s, p95 {p95:.2f} s")
    else:
        lines.append("time to recovery: no fault recovered")
    rate = report.failed / report.sent if report.sent else 0.0
    lines.append(
        f"requests: {report.sent} sent, {report.failed} failed ({rate:.2%}); "
        f"p50 {report.p50_ms:.1f} ms, p95 {report.p95_ms:.1f} ms"
    )
    lines.append(_hypothesis_line("after", report.after))
    lines.append(
        "verdict: the service healed" if report.held else "verdict: the service did NOT heal"
    )
    return "\n".join(lines)


def report_json(report: ChaosReport) -> str:
    return json.dumps(report.to_json(), indent=2, sort_keys=True)
