"""Issue 12, item 1: blue/green. A full green set starts beside blue, passes health and a
pre-promotion check, then one route push switches traffic; blue is held out of rotation
for ``blue_hold`` (``kiln rollback`` within it is an instant switch back), then retired.
Real sandboxes (local runtime), real HAProxy, real HTTP on loopback, under load."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
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
from kiln.errors import KilnError
from kiln.observe.load import LoadGenerator
from kiln.runtime.local import LocalRuntime

pytestmark = pytest.mark.e2e


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


def _events(agent: RunningAgent, kind: str, deployment: str | None = None) -> list[dict[str, Any]]:
    return [
        e
        for e in agent.client.events(limit=10_000)
        if e["kind"] == kind
        and (deployment is None or (e.get("data") or {}).get("deployment") == deployment)
    ]


def _start(agent: RunningAgent, spec: Any) -> str:
    planned = agent.client.plan(**plan_request(spec))
    return str(agent.client.apply(planned["plan"])["deployment"])


def _live(agent: RunningAgent) -> dict[str, int]:
    """Live instance id → revision."""
    return {i["id"]: i["revision"] for i in agent.client.status()["services"]["web"]["instances"]}


def _blue(agent: RunningAgent, busybox_image: ImageFactory, listen: int) -> dict[str, int]:
    v0 = busybox_image("web:v0", {"healthz": "ok\n", "index.html": "v0\n"})
    assert deploy(agent.client, _spec(v0, listen))["outcome"] == "succeeded"
    assert get(listen) == (200, "v0\n")
    return _live(agent)


def _no_orphans(agent: RunningAgent) -> None:
    with StateStore(agent.home / "state.db") as state:
        live = {i.id for i in state.instances(live_only=True)}
    running = {h.instance_id for h in LocalRuntime(agent.home).list()}
    assert running <= live, f"orphans: {running - live}"


class _Sampler:
    """One client asking in a loop: (sent, answered, body) of every answer, in order."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.seen: list[tuple[float, float, str]] = []
        self.failed: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=5.0) as client:
            while not self._stop.is_set():
                sent = time.time()
                try:
                    resp = client.get(f"http://127.0.0.1:{self.port}/")
                    self.seen.append((sent, time.time(), resp.text.strip()))
                    if resp.status_code != 200:
                        self.failed.append(f"HTTP {resp.status_code}")
                except httpx.HTTPError as e:
                    self.failed.append(type(e).__name__)
                time.sleep(0.005)

    def __enter__(self) -> _Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def test_switch_under_load_serves_one_set_at_a_time_and_fails_no_request(
    agent: RunningAgent, busybox_image: ImageFactory, free_port: Callable[[], int]
) -> None:
    listen = free_port()
    blue = _blue(agent, busybox_image, listen)
    v1 = busybox_image("web:v1", {"healthz": "ok\n", "ready": "yes\n", "index.html": "v1\n"})
    load = LoadGenerator("127.0.0.1", listen, workers=2, pause=0.01, classify=str.strip)
    with load, _Sampler(listen) as sampler:
        deployment = _start(agent, _spec(v1, listen, pre_promotion={"http": "/ready"}))
        wait_for(lambda: _events(agent, "bluegreen.switched", deployment), 30, "the switch")
        during_hold = _live(agent)
        assert set(blue) <= set(during_hold), "blue was not kept during the hold"
        assert len(during_hold) == 6
        done = agent.client.wait_deployment(deployment, timeout=60)
        time.sleep(0.3)
    assert done["outcome"] == "succeeded", done
    assert load.report.failed == 0, load.report.errors
    assert not sampler.failed, sampler.failed
    assert load.report.bodies.get("v1", 0) > 0 and load.report.bodies.get("v0", 0) > 0
    print(f"blue/green switch under load: {load.report.summary()} (failed requests: 0 target)")
    # Green passed its pre-promotion check before the switch.
    assert _events(agent, "bluegreen.checked", deployment)
    # One set at a time: no v1 answer before the switch began, no v0 request sent after it.
    switching = next(
        e["ts"]
        for e in _events(agent, "bluegreen.phase", deployment)
        if e["data"]["phase"].startswith("switched")
    )
    switched = _events(agent, "bluegreen.switched", deployment)[0]["ts"]
    assert all(end >= switching - 0.05 for _, end, body in sampler.seen if body == "v1")
    assert all(sent <= switched + 0.05 for sent, _, body in sampler.seen if body == "v0")
    # Blue was held for blue_hold, then retired: only green runs, and it is active.
    stopped = [
        e
        for e in agent.client.events(limit=10_000)
        if e["kind"] == "instance.stopped" and e.get("instance") in blue
    ]
    assert len(stopped) == 3 and min(e["ts"] for e in stopped) - switched >= 1.9
    after = _live(agent)
    assert len(after) == 3 and not set(after) & set(blue)
    status = agent.client.status()["services"]["web"]
    assert set(after.values()) == {status["active_revision"]}
    assert get(listen) == (200, "v1\n")
    _no_orphans(agent)


def test_rollback_during_the_hold_switches_back_at_once_with_no_new_instance(
    agent: RunningAgent, busybox_image: ImageFactory, free_port: Callable[[], int]
) -> None:
    listen = free_port()
    blue = _blue(agent, busybox_image, listen)
    blue_revision = set(blue.values()).pop()
    v1 = busybox_image("web:v1", {"healthz": "ok\n", "index.html": "v1\n"})
    load = LoadGenerator("127.0.0.1", listen, workers=2, pause=0.01)
    with load:
        deployment = _start(agent, _spec(v1, listen, blue_hold="60s"))
        wait_for(lambda: _events(agent, "bluegreen.switched", deployment), 30, "the switch")
        assert get(listen) == (200, "v1\n")
        green = set(_live(agent)) - set(blue)
        began = time.monotonic()
        answer = agent.client.rollback("web")
        took = time.monotonic() - began
        assert answer["instant"] is True and answer["revision"] == blue_revision
        assert [get(listen) for _ in range(20)] == [(200, "v0\n")] * 20
        done = agent.client.wait_deployment(deployment, timeout=30)
        time.sleep(0.3)
    print(f"instant rollback answered in {took * 1000:.0f} ms; {load.report.summary()}")
    assert took < 5
    assert load.report.failed == 0, load.report.errors
    assert done["outcome"] == "rolled_back", done
    assert _live(agent) == blue, "a rollback within the hold started or lost an instance"
    starts = [e for e in agent.client.events(limit=10_000) if e["kind"] == "instance.started"]
    assert not [e for e in starts if e.get("instance") not in {*blue, *green}]
    status = agent.client.status()["services"]["web"]
    assert status["active_revision"] == blue_revision
    history = {r["number"]: r["status"] for r in agent.client.history("web")["revisions"]}
    assert history[blue_revision + 1] == "rolled_back"
    _no_orphans(agent)


def test_green_never_healthy_switches_nothing_and_fails_the_revision(
    agent: RunningAgent, busybox_image: ImageFactory, free_port: Callable[[], int]
) -> None:
    listen = free_port()
    blue = _blue(agent, busybox_image, listen)
    broken = busybox_image("web:v1", {"index.html": "v1\n"})  # no /healthz: 404 forever
    load = LoadGenerator("127.0.0.1", listen, workers=2, pause=0.01, classify=str.strip)
    with load:
        deployment = _start(agent, _spec(broken, listen, healthy_deadline="2s"))
        done = agent.client.wait_deployment(deployment, timeout=60)
        time.sleep(0.3)
    assert done["outcome"] == "failed", done
    reason = done["services"]["web"]["reason"]
    assert "not healthy within 2s" in reason, reason
    assert load.report.failed == 0, load.report.errors
    assert set(load.report.bodies) == {"v0"}, load.report.bodies
    assert not _events(agent, "bluegreen.switched", deployment)
    assert _live(agent) == blue
    history = {r["number"]: r for r in agent.client.history("web")["revisions"]}
    failed = history[max(history)]
    assert failed["status"] == "failed" and "not healthy" in (failed["reason"] or "")
    assert agent.client.status()["services"]["web"]["active_revision"] == set(blue.values()).pop()
    _no_orphans(agent)


def test_manual_promote_switches_and_promote_with_nothing_waiting_is_refused(
    agent: RunningAgent, busybox_image: ImageFactory, free_port: Callable[[], int]
) -> None:
    listen = free_port()
    _blue(agent, busybox_image, listen)
    with pytest.raises(KilnError, match="nothing to promote"):
        agent.client.promote("web")
    with pytest.raises(KilnError, match="no service 'nope'"):
        agent.client.promote("nope")
    v1 = busybox_image("web:v1", {"healthz": "ok\n", "index.html": "v1\n"})
    deployment = _start(agent, _spec(v1, listen, auto_promote=False, blue_hold="1s"))
    wait_for(lambda: _events(agent, "bluegreen.waiting", deployment), 30, "green ready")
    time.sleep(1.0)
    assert get(listen) == (200, "v0\n"), "switched without kiln promote"
    assert not _events(agent, "bluegreen.switched", deployment)
    answer = agent.client.promote("web")
    assert answer["deployment"] == deployment
    done = agent.client.wait_deployment(deployment, timeout=30)
    assert done["outcome"] == "succeeded", done
    assert get(listen) == (200, "v1\n")
    with pytest.raises(KilnError, match="nothing to promote"):
        agent.client.promote("web")


def test_agent_sigkill_during_the_hold_and_before_the_switch_continues(
    agent: RunningAgent, busybox_image: ImageFactory, free_port: Callable[[], int]
) -> None:
    listen = free_port()
    _blue(agent, busybox_image, listen)
    load = LoadGenerator("127.0.0.1", listen, workers=2, pause=0.01)
    with load:
        # Killed while waiting for promotion: the new agent keeps blue serving.
        v1 = busybox_image("web:v1", {"healthz": "ok\n", "index.html": "v1\n"})
        deployment = _start(agent, _spec(v1, listen, auto_promote=False, blue_hold="3s"))
        wait_for(lambda: _events(agent, "bluegreen.waiting", deployment), 30, "green ready")
        green = set(_live(agent))
        os.kill(agent.pid(), signal.SIGKILL)
        time.sleep(0.3)
        start_background(agent.home)
        wait_for(lambda: _events(agent, "rollout.resumed", deployment), 15, "the resume")
        assert get(listen) == (200, "v0\n")
        assert set(_live(agent)) == green, "the resume started instances over"
        agent.client.promote("web")
        # Killed during the hold: the new agent holds the rest, then retires blue.
        wait_for(lambda: _events(agent, "bluegreen.switched", deployment), 30, "the switch")
        os.kill(agent.pid(), signal.SIGKILL)
        time.sleep(0.3)
        start_background(agent.home)
        wait_for(lambda: len(_events(agent, "rollout.resumed", deployment)) >= 2, 15, "resume")
        assert get(listen) == (200, "v1\n")
        done = agent.client.wait_deployment(deployment, timeout=60)
        time.sleep(0.3)
    print(f"blue/green with 2 agent SIGKILLs: {load.report.summary()}")
    assert done["outcome"] == "succeeded", done
    assert load.report.failed == 0, load.report.errors
    assert len(_events(agent, "bluegreen.switched", deployment)) == 1
    after = _live(agent)
    assert len(after) == 3 and set(after) <= green
    assert get(listen) == (200, "v1\n")
    _no_orphans(agent)


def test_an_exec_pre_promotion_runs_in_each_green_instance_and_a_failure_switches_nothing(
    agent: RunningAgent, busybox_image: ImageFactory, free_port: Callable[[], int]
) -> None:
    listen = free_port()
    blue = _blue(agent, busybox_image, listen)
    smoke = ["/bin/sh", "-c", "test -f /www/warm || { echo cold cache; exit 3; }"]
    cold = busybox_image("web:v1", {"healthz": "ok\n", "index.html": "v1\n"})
    deployment = _start(agent, _spec(cold, listen, pre_promotion={"exec": smoke}))
    done = agent.client.wait_deployment(deployment, timeout=60)
    assert done["outcome"] == "failed", done
    reason = done["services"]["web"]["reason"]
    assert "pre-promotion check failed" in reason and "exited 3: cold cache" in reason, reason
    assert not _events(agent, "bluegreen.switched", deployment)
    assert _live(agent) == blue and get(listen) == (200, "v0\n")
    # A declared check is not a human's exec: no green instance was marked touched.
    assert not _events(agent, "instance.exec")

    warm = busybox_image("web:v2", {"healthz": "ok\n", "index.html": "v2\n", "warm": "1\n"})
    deployment = _start(agent, _spec(warm, listen, pre_promotion={"exec": smoke}))
    done = agent.client.wait_deployment(deployment, timeout=60)
    assert done["outcome"] == "succeeded", done
    [checked] = _events(agent, "bluegreen.checked", deployment)
    assert checked["data"]["exec"] == smoke and "3 green instance(s)" in checked["message"]
    assert get(listen) == (200, "v2\n")
    _no_orphans(agent)
