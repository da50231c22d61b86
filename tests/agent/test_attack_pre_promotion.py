"""``pre_promotion = { exec = [...] }`` as a hostile plan would write it: the command is
the plan's, so it must run inside each green instance and nowhere else, within its
timeout, with bounded output, and leave nothing running once the rollout fails."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from agent_harness import ImageFactory, RunningAgent, deploy, get, plan_request, service_spec

pytestmark = pytest.mark.e2e

MARK = "31337"
"""In the hostile command's argv: how the test finds a process it left behind."""


def _spec(digest: str, listen: int, **update: Any) -> Any:
    return service_spec(
        digest,
        listen=listen,
        update={
            "strategy": "blue-green",
            "blue_hold": "2s",
            "min_healthy_time": "0.2s",
            "healthy_deadline": "10s",
            **update,
        },
    )


def _live(agent: RunningAgent) -> dict[str, int]:
    return {i["id"]: i["revision"] for i in agent.client.status()["services"]["web"]["instances"]}


def _host_processes_with(mark: str) -> list[str]:
    """Command lines of this host's processes that carry ``mark`` (any namespace)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if mark in argv and "pytest" not in argv:
            found.append(argv)
    return found


def test_a_hostile_pre_promotion_exec_stays_in_green_is_timed_out_and_leaves_nothing(
    agent: RunningAgent,
    busybox_image: ImageFactory,
    free_port: Callable[[], int],
    tmp_path: Path,
) -> None:
    """The command tries to write a file on the agent's host, floods its output and then
    never exits: the host file is never made, the rollout fails on the timeout within
    seconds with a bounded reason, blue keeps serving, and no process of the command is
    left on the host."""
    listen = free_port()
    v0 = busybox_image("web:v0", {"healthz": "ok\n", "index.html": "v0\n"})
    assert deploy(agent.client, _spec(v0, listen))["outcome"] == "succeeded"
    blue = _live(agent)
    marker = tmp_path / "ran-on-the-host"
    hostile = [
        "/bin/sh",
        "-c",
        f"touch {marker}; echo pwned > /proc/1/root{marker}; "
        f"yes flood-flood-flood | head -c 20000000; exec sleep {MARK}",
    ]
    v1 = busybox_image("web:v1", {"healthz": "ok\n", "index.html": "v1\n"})
    planned = agent.client.plan(
        **plan_request(_spec(v1, listen, pre_promotion={"exec": hostile, "timeout": "2s"}))
    )
    began = time.monotonic()
    deployment = str(agent.client.apply(planned["plan"])["deployment"])
    done = agent.client.wait_deployment(deployment, timeout=90)
    took = time.monotonic() - began
    assert done["outcome"] == "failed", done
    reason = done["services"]["web"]["reason"]
    assert "pre-promotion check failed" in reason and "timed out after 2" in reason, reason
    assert len(reason) < 4000
    assert took < 45, took
    assert not marker.exists()
    assert _live(agent) == blue and get(listen) == (200, "v0\n")
    deadline = time.monotonic() + 10
    while _host_processes_with(MARK) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _host_processes_with(MARK) == []
