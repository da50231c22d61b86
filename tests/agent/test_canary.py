"""Issue 12 item 2: canary with automatic analysis, on the local runtime with real HAProxy
and real HTTP on loopback. The canary's answers come from a busybox CGI: one answers 500
to a quarter of requests, one is only slow, one is good; the analysis reads the router's
own counters."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from agent_harness import (
    HTTPD,
    RunningAgent,
    build_busybox_rootfs,
    deploy,
    plan_request,
    put_image,
    service_spec,
    wait_for,
)

from kiln.agent.canary import Window, judge, split_weights
from kiln.agent.client import start_background
from kiln.errors import KilnError
from kiln.observe.load import LoadGenerator
from kiln.spec.models import CanaryAnalysis, Spec
from kiln.traffic.router import Latency

pytestmark = pytest.mark.e2e

GOOD = 'printf "Content-Type: text/plain\\r\\n\\r\\n{version}\\n"'
FLAKY = (
    'if [ $((RANDOM % 4)) -eq 0 ]; then printf "Status: 500 Boom\\r\\n\\r\\nboom\\n"; '
    "else " + GOOD + "; fi"
)
SLOW = "sleep 0.6; " + GOOD
PATH = "/cgi-bin/app"


def _image(home: Path, tmp: Path, version: str, body: str) -> str:
    """A busybox httpd image whose /cgi-bin/app runs ``body`` (a shell snippet)."""
    tree = build_busybox_rootfs(tmp / f"tree-{version}", {"healthz": "ok\n"})
    cgi = tree / "www" / "cgi-bin"
    cgi.mkdir()
    (cgi / "app").write_text("#!/bin/sh\n" + body.format(version=version) + "\n")
    (cgi / "app").chmod(0o755)
    cgi.chmod(0o755)
    return put_image(home, f"web:{version}", tree, HTTPD)


def _spec(digest: str, listen: int, steps: list[dict[str, Any]], **analysis: Any) -> Spec:
    return service_spec(
        digest,
        replicas=2,
        listen=listen,
        update={
            "strategy": "canary",
            "steps": steps,
            "analysis": {"max_error_rate": 0.05, "min_requests": 20, **analysis},
            "min_healthy_time": "0.2s",
            "healthy_deadline": "10s",
            "progress_deadline": "30s",
        },
    )


def _events(agent: RunningAgent, kind: str, deployment: str) -> list[dict[str, Any]]:
    return [
        e
        for e in agent.client.events()
        if e["kind"] == kind and (e.get("data") or {}).get("deployment") == deployment
    ]


def _start(agent: RunningAgent, spec: Spec) -> str:
    planned = agent.client.plan(**plan_request(spec))
    return str(agent.client.apply(planned["plan"])["deployment"])


def _live(agent: RunningAgent) -> dict[str, Any]:
    return dict(agent.client.status()["services"]["web"])


@pytest.fixture
def stable(agent: RunningAgent, kiln_home: Path, tmp_path: Path, free_port: Callable[[], int]):
    """r1 of ``web`` (two good instances) serving on a free port; yields the port."""
    listen = free_port()
    first = _image(kiln_home, tmp_path, "v1", GOOD)
    steps = [{"weight": 20, "pause": "2s"}]
    assert deploy(agent.client, _spec(first, listen, steps))["outcome"] == "succeeded"
    return listen


def test_the_analysis_rules() -> None:
    """Absolute limits, ratios with floors, and no verdict before min_requests."""
    a = CanaryAnalysis(max_error_rate=0.05, max_error_rate_ratio=2.0, max_p95_ms=500,
                       max_p95_ratio=2.0, min_requests=20)  # fmt: skip
    fast = Latency({3: 100})
    assert judge(a, Window(19, 19, fast), Window(100, 0, fast)) is None
    assert "max_error_rate" in str(judge(a, Window(20, 2, fast), Window(100, 0, fast)))
    assert judge(a, Window(100, 1, fast), Window(100, 0, fast)) is None  # 1% ≤ 2 × floor
    assert "× stable" in str(judge(a, Window(100, 4, fast), Window(1000, 10, fast)))
    slow = Latency({600: 100})
    assert "max_p95_ms" in str(judge(a, Window(100, 0, slow), Window(100, 0, fast)))
    middling = Latency({40: 100})
    assert "× stable" in str(judge(a, Window(100, 0, middling), Window(100, 0, fast)))
    assert judge(a, Window(100, 0, Latency({15: 100})), Window(100, 0, fast)) is None
    assert split_weights(10, 2, 2) == (1, 9)
    assert split_weights(50, 1, 3) == (3, 1)
    assert split_weights(0, 2, 2) == (0, 100)
    assert split_weights(100, 2, 2) == (100, 0)
    each_canary, each_stable = split_weights(1, 1, 200)
    assert max(each_canary, each_stable) <= 256 and each_canary >= 1


def _rate(load: LoadGenerator, seconds: float) -> float:
    return load.report.sent / seconds


def test_a_canary_answering_500_is_aborted_within_the_bound(
    agent: RunningAgent, kiln_home: Path, tmp_path: Path, stable: int
) -> None:
    bad = _image(kiln_home, tmp_path, "v2", FLAKY)
    weight, pause = 20, 20.0
    load = LoadGenerator("127.0.0.1", stable, path=PATH, workers=4)
    began = time.monotonic()
    with load:
        time.sleep(1.0)
        deployment = _start(agent, _spec(bad, stable, [{"weight": weight, "pause": f"{pause}s"}]))
        done = agent.client.wait_deployment(deployment, timeout=60)
        time.sleep(0.5)
    seconds = time.monotonic() - began
    assert done["outcome"] == "failed", done
    aborted = _events(agent, "canary.aborted", deployment)
    assert len(aborted) == 1
    numbers = aborted[0]["data"]["analysis"]
    assert "max_error_rate" in aborted[0]["data"]["reason"]
    assert numbers["canary"]["error_rate"] > 0.05
    assert numbers["canary"]["requests"] >= 20
    bound = weight / 100 * _rate(load, seconds) * pause
    print(
        f"bad canary: {load.report.failed} failed requests before the abort "
        f"(canary answered {numbers['canary']['requests']}); bound weight × rate × pause = "
        f"{bound:.0f}; {load.report.summary()}"
    )
    assert 0 < load.report.failed < bound
    live = _live(agent)
    assert {i["revision"] for i in live["instances"]} == {live["active_revision"]}
    assert live["active_revision"] != done["services"]["web"]["revision"]
    history = agent.client.history("web")["revisions"]
    assert [r["status"] for r in history if r["number"] == 2] == ["failed"]
    route = agent.client._request("GET", "/v1/routes")["routes"][0]
    assert all(b["weight"] == 100 for b in route["backends"]), route


def test_a_slow_canary_is_aborted_on_p95_with_no_failed_request(
    agent: RunningAgent, kiln_home: Path, tmp_path: Path, stable: int
) -> None:
    slow = _image(kiln_home, tmp_path, "v2", SLOW)
    spec = _spec(slow, stable, [{"weight": 30, "pause": "30s"}], max_p95_ms=300, min_requests=10)
    with LoadGenerator("127.0.0.1", stable, path=PATH, workers=6) as load:
        deployment = _start(agent, spec)
        done = agent.client.wait_deployment(deployment, timeout=60)
    assert done["outcome"] == "failed", done
    aborted = _events(agent, "canary.aborted", deployment)
    assert "max_p95_ms" in aborted[0]["data"]["reason"], aborted
    assert aborted[0]["data"]["analysis"]["canary"]["p95_ms"] >= 300
    print(f"slow canary: {aborted[0]['data']['reason']}; {load.report.summary()}")
    assert load.report.failed == 0, load.report.errors


def test_a_good_canary_is_promoted_through_every_step_with_no_failed_request(
    agent: RunningAgent, kiln_home: Path, tmp_path: Path, stable: int
) -> None:
    good = _image(kiln_home, tmp_path, "v2", GOOD)
    steps = [{"weight": 10, "pause": "2s"}, {"weight": 50, "pause": "2s"}]
    load = LoadGenerator("127.0.0.1", stable, path=PATH, workers=4, classify=str.strip)
    with load:
        deployment = _start(agent, _spec(good, stable, steps))
        seen = wait_for(
            lambda: (_live(agent).get("rollout") or {}).get("canary"), 20, "live analysis"
        )
        done = agent.client.wait_deployment(deployment, timeout=60)
        time.sleep(0.3)
    assert seen["weight"] in (10, 50) and "canary" in seen and "weights" in seen
    assert done["outcome"] == "succeeded", done
    assert [e["data"]["weight"] for e in _events(agent, "canary.step", deployment)] == [10, 50]
    print(f"good canary through 10% and 50%: {load.report.summary()}")
    assert load.report.failed == 0, load.report.errors
    assert load.report.bodies.get("v2", 0) > 0, load.report.bodies
    live = _live(agent)
    assert sorted(i["state"] for i in live["instances"]) == ["ready", "ready"]
    assert {i["revision"] for i in live["instances"]} == {live["active_revision"]}


def test_promote_skips_ahead_and_abort_twice_is_a_clear_error(
    agent: RunningAgent, kiln_home: Path, tmp_path: Path, stable: int
) -> None:
    with pytest.raises(KilnError, match="nothing to promote"):
        agent.client.promote("web")
    long_steps = [{"weight": 10, "pause": "10m"}, {"weight": 50, "pause": "10m"}]
    good = _image(kiln_home, tmp_path, "v2", GOOD)
    deployment = _start(agent, _spec(good, stable, long_steps))
    for step in (1, 2):
        wait_for(
            lambda s=step: [
                e for e in _events(agent, "canary.step", deployment) if e["data"]["step"] == s
            ],
            30,
            f"step {step}",
        )
        agent.client.promote("web")
    assert agent.client.wait_deployment(deployment, timeout=30)["outcome"] == "succeeded"

    other = _image(kiln_home, tmp_path, "v3", GOOD)
    deployment = _start(agent, _spec(other, stable, long_steps))
    wait_for(lambda: _events(agent, "canary.step", deployment), 30, "the first step")
    agent.client.abort("web")
    done = agent.client.wait_deployment(deployment, timeout=30)
    assert done["outcome"] == "failed"
    assert "kiln abort" in done["services"]["web"]["reason"]
    with pytest.raises(KilnError, match="already aborted"):
        agent.client.abort("web")
    with pytest.raises(KilnError, match="no service"):
        agent.client.abort("nope")


def test_an_agent_sigkill_during_a_pause_continues_from_the_saved_step(
    agent: RunningAgent, kiln_home: Path, tmp_path: Path, stable: int
) -> None:
    good = _image(kiln_home, tmp_path, "v2", GOOD)
    steps = [{"weight": 20, "pause": "4s"}, {"weight": 50, "pause": "1s"}]
    with LoadGenerator("127.0.0.1", stable, path=PATH, workers=2, pause=0.01) as load:
        deployment = _start(agent, _spec(good, stable, steps))
        wait_for(lambda: _events(agent, "canary.step", deployment), 30, "step 1")
        killed = time.monotonic()
        os.kill(agent.pid(), signal.SIGKILL)
        time.sleep(0.3)
        start_background(kiln_home)
        resumed = wait_for(lambda: _events(agent, "canary.resumed", deployment), 15, "resume")
        done = agent.client.wait_deployment(deployment, timeout=60)
        took = time.monotonic() - killed
    assert resumed[0]["data"]["step"] == 1
    assert done["outcome"] == "succeeded", done
    step_events = [e["data"]["step"] for e in _events(agent, "canary.step", deployment)]
    assert step_events == [1, 2], "the restart began the pause over"
    print(f"agent SIGKILL in a canary pause: finished {took:.1f}s later; {load.report.summary()}")
    assert load.report.failed == 0, load.report.errors
