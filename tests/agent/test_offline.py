"""``kiln down`` after the agent was SIGKILLed: what it left running still goes."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

import pytest
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


def test_an_agent_whose_home_is_deleted_stops_everything_it_started(
    agent: RunningAgent, busybox_image: ImageFactory, free_port: Callable[[], int]
) -> None:
    """``rm -rf $KILN_HOME`` under a running agent: nothing could reach or stop what it
    runs any more, so the agent stops its instances and HAProxy itself and exits
    (issue 8, defect 10)."""
    import shutil

    from kiln.traffic.haproxy.processes import our_processes

    digest = busybox_image("web:v1", V1)
    listen = free_port()
    assert deploy(agent.client, service_spec(digest, listen=listen, replicas=2))["outcome"] == (
        "succeeded"
    )
    agent_pid = agent.pid()
    sandboxes = [int(i["pid"]) for i in agent.client.status()["services"]["web"]["instances"]]
    assert our_processes(agent.home / "haproxy")
    shutil.rmtree(agent.home)
    deadline = time.monotonic() + 20
    while pid_alive(agent_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not pid_alive(agent_pid), "the agent outlived its home"
    assert not [p for p in sandboxes if pid_alive(p)], "an instance outlived the home"
    assert our_processes(agent.home / "haproxy") == [], "HAProxy outlived the home"
    import socket

    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", listen), timeout=1).close()
