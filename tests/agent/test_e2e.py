"""The main job against a real agent: real sandboxes, real HAProxy, real HTTP on loopback."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
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
from kiln.errors import KilnError

pytestmark = pytest.mark.e2e

V1 = {"healthz": "ok\n", "index.html": "v1\n"}
V2 = {"healthz": "ok\n", "index.html": "v2\n"}


def instances(agent: RunningAgent) -> list[dict[str, Any]]:
    return list(agent.client.status()["services"]["web"]["instances"])


def events_of(agent: RunningAgent, kind: str) -> list[dict[str, Any]]:
    return [e for e in agent.client.events() if e["kind"] == kind]


class Load:
    """Requests in a loop through the proxy; counts every failure."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.ok = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import httpx

        with httpx.Client(timeout=5.0) as http:
            while not self._stop.is_set():
                try:
                    resp = http.get(f"http://127.0.0.1:{self.port}/")
                    if resp.status_code == 200:
                        self.ok += 1
                    else:
                        self.failures.append(f"HTTP {resp.status_code}")
                except Exception as e:
                    self.failures.append(repr(e))
                time.sleep(0.01)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def test_apply_serves_and_a_killed_instance_is_replaced(
    agent: RunningAgent, busybox_image: ImageFactory, free_port: Callable[[], int]
) -> None:
    digest = busybox_image("web:v1", V1)
    listen = free_port()
    spec = service_spec(digest, listen=listen, health={"http": "/healthz", "interval": "0.5s"})
    record = deploy(agent.client, spec)
    assert record["outcome"] == "succeeded", record
    assert get(listen) == (200, "v1\n")
    running = instances(agent)
    assert len(running) == 3 and {i["state"] for i in running} == {"ready"}
    assert {i["digest"] for i in running} == {digest}

    victim = running[0]
    os.kill(victim["pid"], signal.SIGKILL)
    recovered = wait_for(
        lambda: [
            e for e in events_of(agent, "instance.recovered") if e["instance"] == victim["id"]
        ],
        10,
        "the replacement of the killed instance",
    )
    seconds = recovered[0]["data"]["time_to_recovery"]
    print(f"time to recovery {seconds:.2f}s")
    assert 0 < seconds < 3.0, f"time to recovery {seconds:.2f}s (health interval 0.5s)"
    now = instances(agent)
    assert victim["id"] not in {i["id"] for i in now}
    assert len([i for i in now if i["state"] == "ready"]) == 3
    store = StateStore(agent.home / "state.db")
    try:
        assert [r.instance for r in store.recoveries("web")] == [victim["id"]]
    finally:
        store.close()


def test_agent_killed_and_restarted_adopts_everything_while_the_proxy_serves(
    agent: RunningAgent, busybox_image: ImageFactory, free_port: Callable[[], int]
) -> None:
    listen = free_port()
    assert (
        deploy(agent.client, service_spec(busybox_image("web:v1", V1), listen=listen))["outcome"]
        == "succeeded"
    )
    before = {i["id"]: i["pid"] for i in instances(agent)}
    router_before = agent.client.status()["proxy"]
    with Load(listen) as load:
        time.sleep(0.3)
        os.kill(agent.pid(), signal.SIGKILL)
        time.sleep(1.0)
        start_background(agent.home)
        wait_for(lambda: len(events_of(agent, "instance.adopted")) == 3, 10, "adoption")
        time.sleep(1.5)
    after = {i["id"]: i["pid"] for i in instances(agent)}
    assert after == before, "the restarted agent must keep the running instances"
    assert all(i["state"] == "ready" for i in instances(agent))
    assert not events_of(agent, "reconcile.replace")
    assert not load.failures, load.failures[:5]
    assert load.ok > 20
    # HAProxy was adopted and read back, not reset: same process, same generation.
    assert agent.client.status()["proxy"] == router_before
    assert [e["kind"] for e in events_of(agent, "proxy.adopted")] == ["proxy.adopted"]


def test_a_plan_made_against_an_older_state_is_refused(
    agent: RunningAgent, busybox_image: ImageFactory, free_port: Callable[[], int]
) -> None:
    digest = busybox_image("web:v1", V1)
    listen = free_port()
    first = agent.client.plan(**plan_request(service_spec(digest, listen=listen, replicas=1)))
    stale = agent.client.plan(**plan_request(service_spec(digest, listen=listen, replicas=2)))
    assert "1 to create" in first["text"]
    started = agent.client.apply(first["plan"])
    assert agent.client.wait_deployment(started["deployment"])["outcome"] == "succeeded"
    with pytest.raises(
        KilnError, match=r"^the state changed since this plan was made; run kiln plan again$"
    ):
        agent.client.apply(stale["plan"])
    assert len(instances(agent)) == 1


def test_a_health_check_that_never_passes_rolls_back_to_the_previous_revision(
    agent: RunningAgent, busybox_image: ImageFactory, free_port: Callable[[], int]
) -> None:
    listen = free_port()
    good = busybox_image("web:v1", V1)
    broken = busybox_image("web:v2", {"index.html": "v2\n"})  # no /healthz: 404 forever
    assert deploy(agent.client, service_spec(good, listen=listen))["outcome"] == "succeeded"
    r1_ids = {i["id"] for i in instances(agent)}
    with Load(listen) as load:
        record = deploy(agent.client, service_spec(broken, listen=listen))
    assert record["outcome"] == "rolled_back", record
    auto = events_of(agent, "rollback.auto")
    assert len(auto) == 1
    assert "auto-rollback to r1 because r2 failed" in auto[0]["message"]
    assert "healthy_deadline" in auto[0]["message"]
    history = {r["number"]: r for r in agent.client.history("web")["revisions"]}
    assert history[2]["status"] == "failed" and history[1]["status"] == "active"
    status = agent.client.status()["services"]["web"]
    assert status["active_revision"] == 1
    assert {i["revision"] for i in status["instances"]} == {1}
    assert {i["id"] for i in status["instances"]} == r1_ids, "healthy r1 instances were kept"
    assert get(listen) == (200, "v1\n")
    assert not load.failures, load.failures[:5]


def test_rollback_starts_new_instances_of_the_previous_revision(
    agent: RunningAgent, busybox_image: ImageFactory, free_port: Callable[[], int]
) -> None:
    listen = free_port()
    v1, v2 = busybox_image("web:v1", V1), busybox_image("web:v2", V2)
    assert (
        deploy(agent.client, service_spec(v1, listen=listen, replicas=2))["outcome"] == "succeeded"
    )
    assert (
        deploy(agent.client, service_spec(v2, listen=listen, replicas=2))["outcome"] == "succeeded"
    )
    assert get(listen) == (200, "v2\n")
    started = agent.client.rollback("web")
    assert started["revision"] == 1
    assert agent.client.wait_deployment(started["deployment"])["outcome"] == "succeeded"
    assert get(listen) == (200, "v1\n")
    history = {r["number"]: r["status"] for r in agent.client.history("web")["revisions"]}
    assert history == {1: "active", 2: "rolled_back"}


def test_a_taken_listen_port_fails_the_apply_and_loses_nothing(
    agent: RunningAgent, busybox_image: ImageFactory, free_port: Callable[[], int]
) -> None:
    digest = busybox_image("web:v1", V1)
    listen = free_port()
    assert (
        deploy(agent.client, service_spec(digest, listen=listen, replicas=2))["outcome"]
        == "succeeded"
    )
    before = instances(agent)
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("0.0.0.0", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        planned = agent.client.plan(**plan_request(service_spec(digest, listen=taken, replicas=2)))
        with pytest.raises(
            KilnError, match=rf"service web: cannot listen on port {taken} .*nothing was changed"
        ):
            agent.client.apply(planned["plan"])
    assert [(i["id"], i["pid"]) for i in instances(agent)] == [(i["id"], i["pid"]) for i in before]
    assert [r["number"] for r in agent.client.history("web")["revisions"]] == [1]
    assert get(listen) == (200, "v1\n")


def test_a_dead_proxy_is_restarted_with_its_routes(
    agent: RunningAgent, busybox_image: ImageFactory, free_port: Callable[[], int]
) -> None:
    listen = free_port()
    spec = service_spec(busybox_image("web:v1", V1), listen=listen, replicas=1)
    assert deploy(agent.client, spec)["outcome"] == "succeeded"
    old = agent.client.health()["proxy_pid"]
    os.kill(old, signal.SIGKILL)
    restarted = wait_for(lambda: events_of(agent, "proxy.restarted"), 10, "proxy restart")
    assert restarted[0]["data"]["old"]["pid"] == old
    assert agent.client.health()["proxy_pid"] not in (None, old)
    assert wait_for(lambda: _serves(listen), 5, "the route after the restart") == (200, "v1\n")


def _serves(port: int) -> tuple[int, str] | None:
    try:
        return get(port)
    except Exception:
        return None


def test_a_rollout_interrupted_by_an_agent_crash_is_resumed(
    agent: RunningAgent, busybox_image: ImageFactory, free_port: Callable[[], int]
) -> None:
    listen = free_port()
    v1, v2 = busybox_image("web:v1", V1), busybox_image("web:v2", V2)
    slow = {"min_healthy_time": "1s", "healthy_deadline": "10s"}
    assert deploy(agent.client, service_spec(v1, listen=listen, update=slow))["outcome"] == (
        "succeeded"
    )
    planned = agent.client.plan(**plan_request(service_spec(v2, listen=listen, update=slow)))
    deployment = agent.client.apply(planned["plan"])["deployment"]
    wait_for(lambda: events_of(agent, "instance.ready")[3:], 10, "the first new instance")
    os.kill(agent.pid(), signal.SIGKILL)
    time.sleep(0.5)
    start_background(agent.home)
    resumed = events_of(agent, "rollout.resumed")
    assert resumed and resumed[0]["revision"] == 2
    record = agent.client.wait_deployment(deployment, timeout=60)
    assert record["outcome"] == "succeeded", record
    status = agent.client.status()["services"]["web"]
    assert status["active_revision"] == 2
    assert [i["revision"] for i in status["instances"]] == [2, 2, 2]
    assert get(listen) == (200, "v2\n")


def test_too_many_deaths_trip_the_meltdown_breaker(
    agent: RunningAgent, busybox_image: ImageFactory, free_port: Callable[[], int]
) -> None:
    listen = free_port()
    spec = service_spec(busybox_image("web:v1", V1), listen=listen)
    assert deploy(agent.client, spec)["outcome"] == "succeeded"
    first, second, _ = instances(agent)
    os.kill(first["pid"], signal.SIGKILL)
    os.kill(second["pid"], signal.SIGKILL)
    meltdown = wait_for(lambda: events_of(agent, "meltdown"), 10, "the meltdown alarm")
    assert "2 instances died within 10 min" in meltdown[0]["message"]
    time.sleep(1.0)
    status = agent.client.status()["services"]["web"]
    assert status["alarms"] and "replacing stopped" in status["alarms"][0]
    # The reconciler runs on each death, so the first may be replaced before the second
    # is seen; from the alarm on, nothing is.
    alarm_id = meltdown[0]["id"]
    later = [e for e in events_of(agent, "reconcile.replace") if e["id"] > alarm_id]
    assert later == [], "no replacement while the breaker is open"
    assert len(status["instances"]) in (1, 2)
    time.sleep(1.0)
    assert len(agent.client.status()["services"]["web"]["instances"]) == len(status["instances"])
    assert get(listen) == (200, "v1\n")


def test_apply_retires_exactly_the_instances_the_plan_names(
    agent: RunningAgent, busybox_image: ImageFactory, free_port: Callable[[], int]
) -> None:
    """Issue 8, defect 6: the planner's actions are the work. A scale-down plan that
    names the two oldest instances (reviewed and saved, say) retires those two, not
    whichever the rolling strategy would have picked (it used to pick the newest)."""
    listen = free_port()
    digest = busybox_image("web:v1", V1)
    assert deploy(agent.client, service_spec(digest, listen=listen))["outcome"] == "succeeded"
    by_age = [i["id"] for i in sorted(instances(agent), key=lambda i: -i["age"])]
    planned = agent.client.plan(**plan_request(service_spec(digest, listen=listen, replicas=1)))
    plan = planned["plan"]
    changes = plan["services"][0]["changes"]
    assert [c["action"] for c in changes] == ["destroy", "destroy"]
    assert {c["instance"] for c in changes} == set(by_age[1:]), "the planner picks the newest"
    for change, oldest in zip(changes, by_age[:2], strict=True):
        change["instance"] = oldest
    started = agent.client.apply(plan)
    record = agent.client.wait_deployment(started["deployment"], timeout=30)
    assert record["outcome"] == "succeeded", record
    assert [i["id"] for i in instances(agent)] == [by_age[2]]
    assert get(listen) == (200, "v1\n")
    stopped = {e["instance"]: e["message"] for e in agent.client.events()
               if e["kind"] == "instance.stopped"}  # fmt: skip
    for gone in by_age[:2]:
        assert "scaled down to 1 by r2" in stopped[gone], stopped  # not "replaced by r2"


def test_a_failed_deployment_explains_itself(
    agent: RunningAgent, busybox_image: ImageFactory, free_port: Callable[[], int]
) -> None:
    """Not ``see kiln events``: the reason, the failing instance's exit and last log
    lines, and the command that shows more."""
    from kiln.observe.failure import explain_failure

    crashing = busybox_image(
        "web:bad", V1, ["/bin/sh", "-c", "echo listening on nothing; echo boom >&2; exit 3"]
    )
    record = deploy(agent.client, service_spec(crashing, listen=free_port(), replicas=1))
    assert record["outcome"] == "failed", record
    entry = record["services"]["web"]
    assert entry["reason"] and entry["culprits"], entry
    text = explain_failure(agent.home, record)
    culprit = entry["culprits"][0]
    assert text.startswith("web r1: failed: "), text
    assert f"{culprit}: exited with code 3" in text, text
    assert "stderr: boom" in text and "stdout: listening on nothing" in text, text
    assert f"kiln logs web --instance {culprit}" in text, text

    # A first rollout that failed stays in kiln status, which says so in its exit code.
    web = agent.client.status()["services"]["web"]
    assert (web["state"], web["failed"]["revision"]) == ("failed", 1), web
    shown = subprocess.run(
        [str(Path(sys.executable).parent / "kiln"), "status"],
        env=dict(os.environ, KILN_HOME=str(agent.home)),
        text=True,
        capture_output=True,
    )
    assert shown.returncode == 3, shown
    assert shown.stdout.startswith("web: FAILED: r1: "), shown.stdout


def test_kiln_scale_is_a_revision_that_touches_no_other_service(
    agent: RunningAgent, busybox_image: ImageFactory, free_port: Callable[[], int]
) -> None:
    listen = free_port()
    digest = busybox_image("web:v1", V1)
    assert deploy(agent.client, service_spec(digest, listen=listen))["outcome"] == "succeeded"
    kiln = [str(Path(sys.executable).parent / "kiln")]
    env = dict(os.environ, KILN_HOME=str(agent.home))

    def scale(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*kiln, "scale", *args], env=env, text=True, capture_output=True)

    down = scale("web", "1")
    assert down.returncode == 0, down.stderr
    assert [i["state"] for i in instances(agent)] == ["ready"]
    history = agent.client.history("web")["revisions"]
    assert [(r["number"], r["status"], r["config"]["replicas"]) for r in history[:2]] == [
        (2, "active", 1),
        (1, "superseded", 3),
    ]
    assert history[0]["config_hash"] == history[1]["config_hash"], "the instances' config kept"
    up = scale("web", "2")
    assert up.returncode == 0, up.stderr
    assert sorted(i["state"] for i in instances(agent)) == ["ready", "ready"]
    same = scale("web", "2")
    assert same.returncode == 0 and "nothing to do" in same.stderr
    unknown = scale("nope", "2")
    assert unknown.returncode == 1 and "no service 'nope'" in unknown.stderr
    absurd = scale("web", "100000")
    assert absurd.returncode == 1 and "replicas" in absurd.stderr
    assert get(listen) == (200, "v1\n")


def test_an_app_not_on_port_says_so_with_the_last_probe_and_a_hint(
    agent: RunningAgent, busybox_image: ImageFactory, free_port: Callable[[], int]
) -> None:
    """The classic first mistake: the app listens on a port of its own, not on $PORT."""
    from kiln.observe.failure import explain_failure

    wrong = busybox_image(
        "web:wrong-port",
        V1,
        ["/bin/sh", "-c", "echo listening on port 9999; exec httpd -f -p 9999 -h /www"],
    )
    record = deploy(agent.client, service_spec(wrong, listen=free_port(), replicas=1))
    assert record["outcome"] == "failed", record
    text = explain_failure(agent.home, record)
    culprit = record["services"]["web"]["culprits"][0]
    assert "  last probe: GET /healthz: connection refused on " in text, text
    assert (
        "hint: nothing answered on port 8080, the one Kiln gave it in $PORT; its log "
        "mentions port 9999" in text
    ), text
    assert f"kiln logs web --instance {culprit}" in text
