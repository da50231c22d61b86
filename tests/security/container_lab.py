"""What the escape suites of the container runtimes (Docker, Swarm) share: the probe
instance reached over HTTP, its spec, and the helpers that run the attacks and read
what they left behind.

Both runtimes give a handle whose ``host:port`` answers from here (a container's
address on the Docker runtime, a node's address and published port on Swarm), so
one probe client serves both.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import json
import os
import re
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import hostside
import pytest
from probe import (
    INSTANCE,
    Attack,
    Host,
    Outcome,
    execute,
    iter_attacks,
    parse_cgi,
    tree_fingerprint,
)

from kiln.runtime import InstanceHandle, InstanceSpec, InstanceState, InstanceStatus
from kiln.runtime.shim import memory_cgroup_dir

__all__ = [
    "APP_PORT",
    "DEDICATED",
    "FLOOD_BYTES",
    "HTTP",
    "MEMORY_LIMIT_MB",
    "PIDS_LIMIT",
    "RACE_SECONDS",
    "USERS",
    "HostTargets",
    "Probe",
    "assert_host_services_answer_but_not_its_loopback",
    "assert_log_lines_cut_at",
    "assert_root_inside_writes_its_own_dev_but_not_the_init",
    "attack_id",
    "attack_variables",
    "follower_monitors",
    "host_observations",
    "log_path",
    "logging_flows",
    "other_spec",
    "probe_spec",
    "run_attack",
    "sandbox_host",
    "shared_attacks",
    "skip_if_differs",
    "status_fields",
    "uid",
]

APP_PORT = 8080
USERS = {"image-user": "65534:65534", "root-inside": None}
PIDS_LIMIT = 64
MEMORY_LIMIT_MB = 64
RACE_SECONDS = 3
FLOOD_BYTES = 100_000_000
HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))
"""Straight to the probe: a proxy from the environment must not stand in between."""


class ProbeRuntime(Protocol):
    def inspect(self, handle: InstanceHandle) -> InstanceState: ...

    def stop(self, handle: InstanceHandle, grace: float) -> InstanceState: ...

    def destroy(self, handle: InstanceHandle) -> None: ...


@dataclass
class Probe:
    """A running probe app: POST a command, get its output and exit status."""

    runtime: ProbeRuntime
    handle: InstanceHandle
    user: str | None

    @property
    def address(self) -> str:
        return self.handle.host

    @property
    def port(self) -> int:
        return self.handle.port

    def url(self, path: str) -> str:
        return f"http://{self.address}:{self.port}{path}"

    def send(self, command: str, timeout: float = 30.0) -> Outcome:
        request = urllib.request.Request(
            self.url("/cgi-bin/run"), data=command.encode(), method="POST"
        )
        try:
            with HTTP.open(request, timeout=timeout) as response:
                body = response.read().decode("utf-8", errors="replace")
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            return Outcome(-1, f"no answer from the probe: {e!r}")
        return parse_cgi(body)

    def wait_ready(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with HTTP.open(self.url("/index.html"), timeout=2) as response:
                    response.read()
                    return
            except (urllib.error.URLError, OSError, http.client.HTTPException):
                if time.monotonic() > deadline:
                    state = self.runtime.inspect(self.handle)
                    raise AssertionError(f"probe not ready: {state}") from None
                time.sleep(0.05)

    def alive(self) -> bool:
        return self.runtime.inspect(self.handle).status is InstanceStatus.RUNNING

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.runtime.stop(self.handle, 0.0)
        self.runtime.destroy(self.handle)


def probe_spec(image: str, name: str, user: str | None, **overrides: Any) -> InstanceSpec:
    """The probe app (or ``command``) of ``image`` as instance ``name``."""
    command = overrides.pop("command", ["httpd", "-f", "-p", str(APP_PORT), "-h", "/www"])
    env = {"PATH": "/bin", "PORT": str(APP_PORT), **overrides.pop("env", {})}
    fields: dict[str, Any] = {
        "instance_id": name,
        "service": overrides.pop("service", "probe"),
        "revision": 1,
        "image_digest": image,
        "command": command,
        "user": user,
        "workdir": "/",
        "env": env,
        "port": APP_PORT,
        "stop_grace": 1.0,
    }
    fields.update(overrides)
    return InstanceSpec(**fields)


@dataclass
class HostTargets:
    """What the attacks aim at: a secret file, a process and listeners of this machine,
    an abstract socket name, and the other instance's banner, secret and log line."""

    marker_path: Path
    marker: str
    sleep: hostside.HostSleep
    loopback: hostside.BannerServer
    anywhere: hostside.BannerServer
    udp: hostside.DatagramCounter
    abstract_name: str
    other_secret_name: str
    other_secret: str
    other_log_marker: str
    other_banner: str

    @classmethod
    def create(cls, base: Path) -> HostTargets:
        """Fresh targets under ``base``: every name is a new token, so a hit is no accident."""
        marker = hostside.token("host-marker-content")
        marker_path = base / hostside.token("host-marker")
        marker_path.write_text(marker + "\n")
        marker_path.chmod(0o600)
        return cls(
            marker_path=marker_path,
            marker=marker,
            sleep=hostside.HostSleep(),
            loopback=hostside.BannerServer("127.0.0.1", hostside.token("loopback-banner")),
            anywhere=hostside.BannerServer("0.0.0.0", hostside.token("anywhere-banner")),
            udp=hostside.DatagramCounter("0.0.0.0"),
            abstract_name=hostside.token("kiln-escape-abstract"),
            other_secret_name=hostside.token("dbpass").replace("-", "_"),
            other_secret=hostside.token("s3cr3t"),
            other_log_marker=hostside.token("other-log-line"),
            other_banner=hostside.token("other-banner"),
        )

    def targets(self) -> dict[str, Any]:
        """These fields by name, to build a lab that extends them."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(HostTargets)}

    def close(self) -> None:
        self.sleep.close()
        self.loopback.close()
        self.anywhere.close()
        self.udp.close()


def other_spec(image: str, targets: HostTargets) -> InstanceSpec:
    """The other instance: logs its marker, serves its banner, holds its secret."""
    return probe_spec(
        image,
        "other",
        None,
        service="other",
        command=[
            "sh",
            "-c",
            'echo "$LOG_MARKER"; mkdir /tmp/www; echo "$BANNER" > '
            "/tmp/www/index.html; exec httpd -f -p $PORT -h /tmp/www",
        ],
        env={"LOG_MARKER": targets.other_log_marker, "BANNER": targets.other_banner},
        secrets={targets.other_secret_name: targets.other_secret.encode()},
    )


def attack_variables(
    home: Path, targets: HostTargets, other: Probe, gateway: str, tmp_fill_mb: int
) -> dict[str, str]:
    """The variables the attack commands are written with, for a container runtime."""
    return {
        "home": str(home),
        "home_b64": hostside.b64(str(home)),
        "host_marker_path": str(targets.marker_path),
        "host_marker_name": targets.marker_path.name,
        "host_marker": targets.marker,
        "host_shadow_line": hostside.shadow_first_line(),
        "host_pid": str(targets.sleep.pid),
        "host_sleep_marker": targets.sleep.marker,
        "host_sleep_marker_b64": hostside.b64(targets.sleep.marker),
        "gateway": gateway,
        "loopback_port": str(targets.loopback.port),
        "loopback_banner": targets.loopback.banner,
        "any_port": str(targets.anywhere.port),
        "any_banner": targets.anywhere.banner,
        "udp_port": str(targets.udp.port),
        "host_addresses": " ".join(hostside.host_addresses()),
        "abstract_socket": targets.abstract_name,
        "bind_port": str(hostside.free_port()),
        "other_address": other.address,
        "other_port": str(other.port),
        "other_banner": targets.other_banner,
        "other_secret": targets.other_secret,
        "other_secret_name": targets.other_secret_name,
        "other_log_marker": targets.other_log_marker,
        "tmp_fill_mb": str(tmp_fill_mb),
        "flood_bytes": str(FLOOD_BYTES),
        "log_growth_limit_mb": str(FLOOD_BYTES * 1.1 / 2**20 + 1),
        "shim_rss_limit_mb": f"{hostside.peak_rss_mb(os.getpid()) + 64:.0f}",
        "race_seconds": str(RACE_SECONDS),
        "pids_limit": str(PIDS_LIMIT),
        "hold_count": str(PIDS_LIMIT + 50),
        "hold_seconds": "120",
        "bomb_seconds": "2",
        "host_process_rise_limit": str(PIDS_LIMIT + 100),
        "hog_mb": "256",
        "memory_limit_mb": str(MEMORY_LIMIT_MB),
    }


def host_observations(
    targets: HostTargets,
    other: Probe,
    probe: Probe,
    layers: list[Path],
    bind_port: int,
    log: Path,
    clock_offset: float,
) -> dict[str, Callable[[], object]]:
    """What the host checks before and after an attack from ``probe`` of a container
    runtime (whose runc and docker-init are this machine's)."""
    runc_path = Path(shutil.which("runc") or "/usr/sbin/runc")
    init_path = Path(shutil.which("docker-init") or "/usr/bin/docker-init").resolve()
    return {
        "core_pattern": lambda: Path("/proc/sys/kernel/core_pattern").read_text(),
        "sysctl_fingerprint": hostside.sysctl_fingerprint,
        "modules": hostside.loaded_modules,
        "hostname": lambda: Path("/proc/sys/kernel/hostname").read_text(),
        "clock": lambda: abs(time.time() - time.monotonic() - clock_offset) < 60,
        "host_sleep_alive": targets.sleep.alive,
        "other_sandbox_alive": lambda: other.alive() and probe.alive(),
        "layer": lambda: [tree_fingerprint(p) for p in layers],
        "runc_binary": lambda: hostside.sha256_file(runc_path),
        "init_binary": lambda: hostside.sha256_file(init_path),
        "loopback_accepts": lambda: targets.loopback.accepted,
        "any_accepts": lambda: targets.anywhere.accepted,
        "udp_datagrams": lambda: targets.udp.received,
        "host_listener_on_bind_port": lambda: hostside.host_listener_on(bind_port),
        "shim_alive": lambda: probe.alive() and logging_flows(probe, log),
    }


def follower_monitors(log: Path) -> dict[str, Callable[[], Callable[[], float]]]:
    """The log follower's memory (it runs in this process) and the instance log's growth."""

    def follower_peak() -> Callable[[], float]:
        return lambda: hostside.peak_rss_mb(os.getpid())

    def log_growth() -> Callable[[], float]:
        start = log.stat().st_size
        return lambda: (log.stat().st_size - start) / 2**20

    return {"shim_peak_rss_mb": follower_peak, "instance_log_growth_mb": log_growth}


def sandbox_host(
    host: Host,
    attack: Attack,
    container_id: Callable[[], str],
    host_pid: Callable[[], int],
    other_alive: Callable[[], bool],
) -> Host:
    """``host`` for an attack in a sandbox of its own (its container named by
    ``container_id``): its process or memory peak measured, the module's probe as the
    other sandbox that must stay alive."""
    monitors = dict(host.monitors)
    if attack.sandbox == "pids":
        container = container_id()
        monitors["host_process_rise"] = lambda: hostside.ProcessSampler().rise
        monitors["sandbox_pids_peak"] = lambda: hostside.ProcessSampler(container).sandbox_peak
    if attack.sandbox == "memory":
        memory_dir = memory_cgroup_dir(host_pid())
        assert memory_dir is not None

        def memory_peak() -> Callable[[], float]:
            return lambda: int((memory_dir / "memory.max_usage_in_bytes").read_text()) / 2**20

        monitors["memory_peak_mb"] = memory_peak
    observations = dict(host.observations)
    observations["other_sandbox_alive"] = other_alive
    return dataclasses.replace(host, monitors=monitors, observations=observations)


def uid(user: str | None) -> int:
    return int(user.split(":")[0]) if user else 0


def status_fields(output: str) -> dict[str, str]:
    """``Name:\\tvalue`` lines of a /proc/*/status read inside."""
    return dict(line.split(":\t", 1) for line in output.splitlines() if ":\t" in line)


# -- which attacks run where


def attack_id(attack: Attack) -> str:
    return attack.name


def shared_attacks(not_applicable: set[str] | dict[str, str]) -> list[Attack]:
    """The attacks a runner sends to its module's probe (no sandbox of their own)."""
    return [a for a in iter_attacks(INSTANCE) if a.sandbox is None and a.name not in not_applicable]


DEDICATED = [a for a in iter_attacks(INSTANCE) if a.sandbox is not None]
"""The attacks that need a sandbox of their own (they kill or exhaust it)."""


def skip_if_differs(
    differences: dict[str, tuple[frozenset[str], str]], attack: Attack, key: str, engine: str
) -> None:
    """Skip an attack that succeeds by ``engine``'s design for user ``key``, naming the
    test that asserts what it gives instead."""
    users, test = differences.get(attack.name, (frozenset(), ""))
    if key in users:
        pytest.skip(f"succeeds by {engine}'s design for {key}: see {test}")


def run_attack(attack: Attack, host: Host, send: Callable[[str, float], Outcome]) -> Outcome:
    """Run and judge one attack (it must be blocked), printing what it met."""
    assert not host.missing(attack), f"the {host.kind} runner lacks {host.missing(attack)}"
    outcome = execute(attack, host, send)
    print(f"{attack.name}: blocked, exit {outcome.exit_code}, measured {outcome.measured}")
    print(outcome.output[-1500:])
    return outcome


# -- the probe's log, as the runtime's follower copies it into the home's log store


def log_path(home: Path, service: str, instance: str) -> Path:
    return home / "logs" / service / f"{instance}.log"


def logging_flows(probe: Probe, log: Path, timeout: float = 20.0) -> bool:
    """A line written to the probe's log reaches the log store (its follower works)."""
    mark = hostside.token("still-logging")
    if probe.send(f"echo {mark} >&9").exit_code != 0:
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), log.open("rb") as stream:
            stream.seek(max(0, stream.seek(0, os.SEEK_END) - 1_000_000))
            if mark.encode() in stream.read():
                return True
        time.sleep(0.1)
    return False


def assert_log_lines_cut_at(probe: Probe, log: Path, max_line: int, timeout: float = 5.0) -> None:
    """A 65 545-byte line reaches the log store as lines of at most ``max_line``."""
    mark = hostside.token("cut")
    command = (
        f"echo {mark} >&9; head -c 65535 /dev/zero | tr '\\0' C >&9; sleep 0.3; "
        "printf 'CCCCCCCCCC\\n' >&9"
    )
    assert probe.send(command).exit_code == 0
    deadline = time.monotonic() + timeout
    while True:
        text = log.read_text() if log.exists() else ""
        complete = text[: text.rfind("\n") + 1]
        lines = [json.loads(x)["line"] for x in complete.splitlines() if x]
        after = lines[lines.index(mark) + 1 :] if mark in lines else []
        if sum(len(x) for x in after) >= 65545:
            break
        assert time.monotonic() < deadline, f"the cut line did not reach {log}"
        time.sleep(0.05)
    assert [len(x) for x in after] == [max_line, 65545 - max_line]


# -- what the Docker engine gives instead, on both container runtimes


def assert_root_inside_writes_its_own_dev_but_not_the_init(probe: Probe) -> None:
    """/dev is a tmpfs of the container's own, writable by its root, so the local
    runtime's init path (/dev/init) is just a new file there; the init the engine runs
    (pid 1, /sbin/docker-init) is read-only and busy, and this machine's runc and
    docker-init are unchanged."""
    init = Path(shutil.which("docker-init") or "/usr/bin/docker-init").resolve()
    runc = Path(shutil.which("runc") or "/usr/sbin/runc")
    before = (hostside.sha256_file(init), hostside.sha256_file(runc))
    outcome = probe.send(
        "printf '' >> /dev/init && echo made-dev-init; "
        "printf '' >> /sbin/docker-init 2>&1; printf '' >> /proc/1/exe 2>&1; "
        "printf '' >> /proc/self/exe 2>&1; readlink /proc/1/exe; exit 0"
    )
    assert "made-dev-init" in outcome.output
    assert "/sbin/docker-init" in outcome.output
    assert re.search(r"can't create /sbin/docker-init: (Read-only|Text file busy)", outcome.output)
    assert "can't create /proc/1/exe: Text file busy" in outcome.output
    assert (hostside.sha256_file(init), hostside.sha256_file(runc)) == before


def assert_host_services_answer_but_not_its_loopback(
    probe: Probe, targets: HostTargets, gateway: str, also: str = ""
) -> Outcome:
    """What listens on every address of this machine answers the instance over TCP and
    UDP (through ``gateway`` and each address); its loopback does not. ``also`` is more
    shell to run after; the outcome is returned for more checks."""
    udp_before = targets.udp.received
    outcome = probe.send(
        f"nc -w 2 {gateway} {targets.anywhere.port} < /dev/null; "
        f"for a in {' '.join(hostside.host_addresses())}; do "
        f"nc -w 2 $a {targets.anywhere.port} < /dev/null; done; "
        f"nc -w 2 {gateway} {targets.loopback.port} < /dev/null; "
        f"nc -w 2 127.0.0.1 {targets.loopback.port} < /dev/null; "
        f"timeout 1 tftp -g -r probe -l /tmp/tftp {gateway} {targets.udp.port}; {also}exit 0"
    )
    assert outcome.output.count(targets.anywhere.banner) >= 2, outcome.output
    deadline = time.monotonic() + 2
    while targets.udp.received == udp_before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert targets.udp.received > udp_before
    assert targets.loopback.banner not in outcome.output
    return outcome
