"""Issue 8, defect 4: a rollout survives its agent. The agent is SIGKILLed at every step
of a 3-replica rolling update, under load; each time a new agent continues the same
deployment from the step it saved, no request fails and nothing is left orphaned.
Real sandboxes, real HAProxy, real HTTP on loopback."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import Any

import pytest
from agent_harness import (
    ImageFactory,
    RunningAgent,
    deploy,
    get,
    plan_request,
    service_spec,
    wait_for,
)

from kiln.agent.client import start_background
from kiln.deploy.state import StateStore
from kiln.observe.load import LoadGenerator
from kiln.runtime.local import LocalRuntime

pytestmark = pytest.mark.e2e


def _events(agent: RunningAgent, kind: str, deployment: str) -> list[dict[str, Any]]:
    return [
        e
        for e in agent.client.events()
        if e["kind"] == kind and (e.get("data") or {}).get("deployment") == deployment
    ]


def _spec(digest: str, listen: int) -> Any:
    # min_healthy_time long enough that every step is a moment the test can hit.
    return service_spec(
        digest,
        listen=listen,
        health={"http": "/healthz", "interval": "0.2s", "timeout": "0.5s"},
        update={
            "max_surge": 1,
            "max_unavailable": 0,
            "min_healthy_time": "1s",
            "healthy_deadline": "10s",
            "progress_deadline": "30s",
        },
    )


def _no_orphans(agent: RunningAgent) -> None:
    with StateStore(agent.home / "state.db") as state:
        live = {i.id for i in state.instances(live_only=True)}
        running = {h.instance_id for h in LocalRuntime(agent.home).list()}
        assert running <= live, f"orphans: {running - live}"
        assert not [i for i in state.instances(live_only=True) if i.state == "pending"]


def test_sigkill_of_the_agent_at_every_rollout_step_continues_the_same_deployment(
    agent: RunningAgent, busybox_image: ImageFactory, free_port: Callable[[], int]
) -> None:
    listen = free_port()
    first = busybox_image("web:v0", {"healthz": "ok\n", "index.html": "v0\n"})
    assert deploy(agent.client, _spec(first, listen))["outcome"] == "succeeded"

    # An uninterrupted rollout says how many steps there are.
    reference = busybox_image("web:v1", {"healthz": "ok\n", "index.html": "v1\n"})
    record = deploy(agent.client, _spec(reference, listen))
    assert record["outcome"] == "succeeded", record
    steps = len(_events(agent, "rollout.step", record["id"]))
    assert steps >= 3, f"a 3-replica rolling update took {steps} step(s)"

    failed = sent = resumes = 0
    for step in range(1, steps + 1):
        version = f"v{step + 1}"
        digest = busybox_image(f"web:{version}", {"healthz": "ok\n", "index.html": f"{version}\n"})
        load = LoadGenerator("127.0.0.1", listen, workers=2, pause=0.01)
        with load:
            planned = agent.client.plan(**plan_request(_spec(digest, listen)))
            deployment = agent.client.apply(planned["plan"])["deployment"]
            wait_for(
                lambda d=deployment, s=step: [
                    e for e in _events(agent, "rollout.step", d) if e["data"]["step"] == s
                ],
                30,
                f"step {step}",
            )
            old_pid = agent.pid()
            os.kill(old_pid, signal.SIGKILL)
            time.sleep(0.3)
            with StateStore(agent.home / "state.db") as state:
                record = state.deployment(deployment)
            assert record is not None
            start_background(agent.home)
            if record["outcome"] == "running":
                resumed = wait_for(
                    lambda d=deployment: _events(agent, "rollout.resumed", d), 15, "the resume"
                )
                assert resumed[0]["data"]["step"] >= step, resumed
                resumes += 1
            else:
                # The last step only retires: it may end before the kill lands.
                assert step == steps, f"deployment ended before the kill at step {step}"
            done = agent.client.wait_deployment(deployment, timeout=60)
            time.sleep(0.3)
        assert done["id"] == deployment
        assert done["outcome"] == "succeeded", (step, done)
        assert get(listen) == (200, f"{version}\n")
        status = agent.client.status()["services"]["web"]
        assert sorted(i["state"] for i in status["instances"]) == ["ready"] * 3
        assert {i["revision"] for i in status["instances"]} == {status["active_revision"]}
        _no_orphans(agent)
        print(f"agent SIGKILL at step {step}/{steps}: {load.report.summary()}")
        failed += load.report.failed
        sent += load.report.sent
        assert load.report.failed == 0, (step, load.report.errors)
    assert sent > 100
    assert failed == 0
    assert resumes >= steps - 1
    started = [e for e in agent.client.events() if e["kind"] == "rollout.started"]
    assert len(started) == steps + 2, "a restart started a rollout over instead of resuming it"
