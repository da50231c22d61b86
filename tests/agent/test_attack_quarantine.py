"""The quarantine deadline kept in state.db, attacked: a deadline far in the future (the
host clock set back while no agent ran, a restored snapshot, a row written by hand) or
infinite must not keep a frozen instance out of retirement beyond its service's window."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from agent_harness import ImageFactory, RunningAgent, deploy, service_spec, wait_for

from kiln.agent.client import start_background
from kiln.deploy.state import StateStore
from kiln.process import pid_alive
from kiln.runtime.local import LocalRuntime

APP = [
    "/bin/sh",
    "-c",
    "mkdir -p /data/www; echo ok > /data/www/healthz; echo q > /data/www/index.html; "
    "exec httpd -f -p $PORT -h /data/www",
]


def _event(agent: RunningAgent, kind: str, instance: str) -> dict[str, object] | None:
    found = [e for e in agent.client.events(limit=10_000) if e["kind"] == kind]
    return next((e for e in found if e["instance"] == instance), None)


@pytest.mark.e2e
# Offsets from now, not times: every pytest-xdist worker must collect the same ids.
@pytest.mark.parametrize("ahead", [float("inf"), 1e300, 365 * 86400.0])
def test_a_deadline_beyond_the_window_still_retires_the_instance_within_it(
    agent: RunningAgent,
    busybox_image: ImageFactory,
    free_port: Callable[[], int],
    kiln_home: Path,
    ahead: float,
) -> None:
    deadline = time.time() + ahead
    digest = busybox_image("q:v1", {"index.html": "q\n"}, cmd=APP)
    spec = service_spec(digest, listen=free_port(), replicas=1, writable=["/data"], quarantine="4s")
    assert deploy(agent.client, spec)["outcome"] == "succeeded"
    [suspect] = [i["id"] for i in agent.client.status()["services"]["web"]["instances"]]
    handle = LocalRuntime(agent.home).handle_for(suspect)
    assert handle is not None
    pid = int(handle.data["sandbox_pid"])
    agent.client.exec(suspect, ["rm", "/data/www/healthz"], 10.0)
    wait_for(lambda: _event(agent, "instance.quarantined", suspect), 20, "quarantine")

    os.kill(agent.pid(), signal.SIGKILL)
    time.sleep(0.3)
    with StateStore(kiln_home / "state.db") as state:
        state.update_instance(suspect, quarantined_until=deadline)
    restarted = time.monotonic()
    start_background(kiln_home)
    resumed = wait_for(
        lambda: _event(agent, "instance.quarantine_resumed", suspect), 15, "the window resumed"
    )
    left = resumed["data"]["left"]  # type: ignore[index]
    assert isinstance(left, float) and 0 <= left <= 4, resumed
    json.dumps(resumed, allow_nan=False)  # the event is plain JSON: no Infinity
    wait_for(lambda: _event(agent, "instance.stopped", suspect), 20, "the window to close")
    assert time.monotonic() - restarted < 15
    wait_for(lambda: not pid_alive(pid), 10, "the frozen process to be gone")
