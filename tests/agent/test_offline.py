"""``kiln down`` after the agent was SIGKILLed: what it left running still goes."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

from agent_harness import ImageFactory, RunningAgent, deploy, service_spec

from kiln.agent.offline import down_without_agent
from kiln.process import pid_alive
from kiln.runtime.local import LocalRuntime
from leftovers import assert_nothing_left

V1 = {"healthz": "ok\n", "index.html": "v1\n"}


def test_down_without_an_agent_stops_its_orphans_and_leaves_nothing(
    agent: RunningAgent, busybox_image: ImageFactory, free_port: Callable[[], int]
) -> None:
    digest = busybox_image("web:v1", V1)
    spec = service_spec(digest, listen=free_port(), replicas=2)
    assert deploy(agent.client, spec)["outcome"] == "succeeded"
    agent_pid = agent.pid()
    os.kill(agent_pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while pid_alive(agent_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    running = sorted(h.instance_id for h in LocalRuntime(agent.home).list())
    assert len(running) == 2

    result = down_without_agent(agent.home)

    assert result["stopped"] == running
    assert result["proxy"] == "stopped"
    assert_nothing_left(agent.home)
