"""What the escape suites of the container runtimes (Docker, Swarm) share: the probe
instance reached over HTTP, its spec, and the helpers that run the attacks and read
what they left behind.

Both runtimes give a handle whose ``host:port`` answers from here (a container's
address on the Docker runtime, a node's address and published port on Swarm), so
one probe client serves both.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import hostside
import pytest
from probe import INSTANCE, Attack, Host, Outcome, execute, iter_attacks, parse_cgi

from kiln.runtime import InstanceHandle, InstanceSpec, InstanceState, InstanceStatus

__all__ = [
    "APP_PORT",
    "DEDICATED",
    "HTTP",
    "Probe",
    "assert_log_lines_cut_at",
    "attack_id",
    "log_path",
    "logging_flows",
    "probe_spec",
    "run_attack",
    "shared_attacks",
    "skip_if_differs",
    "status_fields",
    "uid",
]

APP_PORT = 8080
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
