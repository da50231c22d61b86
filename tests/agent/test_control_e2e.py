"""kiln exec, restart, stop and start through the real CLI, on real sandboxes behind
the real proxy: what the user types, what runs afterwards, and what the proxy serves."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from agent_harness import ImageFactory, RunningAgent, deploy, get, service_spec
from test_e2e import V1, Load

pytestmark = pytest.mark.e2e

KILN = str(Path(sys.executable).parent / "kiln")


def kiln(agent: RunningAgent, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, KILN_HOME=str(agent.home))
    return subprocess.run([KILN, *args], env=env, text=True, capture_output=True, timeout=120)


def live_ids(agent: RunningAgent) -> set[str]:
    web = agent.client.status()["services"]["web"]
    return {i["id"] for i in web["instances"] if i["state"] == "ready"}


def test_exec_marks_touched_restart_replaces_it_first_and_stop_start_keep_the_revision(
    agent: RunningAgent, busybox_image: ImageFactory, free_port: Callable[[], int]
) -> None:
    listen = free_port()
    digest = busybox_image("web:v1", V1)
    spec = service_spec(digest, listen=listen, replicas=2)
    assert deploy(agent.client, spec)["outcome"] == "succeeded"
    before = live_ids(agent)
    newest = max(agent.client.status()["services"]["web"]["instances"], key=lambda i: -i["age"])[
        "id"
    ]

    ran = kiln(agent, "exec", newest, "--", "cat", "/www/index.html")
    assert (ran.returncode, ran.stdout) == (0, "v1\n"), ran
    assert f"ran in {newest}, now marked touched" in ran.stderr
    missing = kiln(agent, "exec", "nope", "--", "true")
    assert missing.returncode == 1 and "no running instance or service 'nope'" in missing.stderr
    no_command = kiln(agent, "exec", newest)
    assert no_command.returncode != 0 and "Traceback" not in no_command.stderr

    shown = kiln(agent, "status")
    assert shown.returncode == 0, shown
    assert "ready, touched" in shown.stdout and "kiln restart web replaces it" in shown.stdout

    with Load(listen) as load:
        restarted = kiln(agent, "restart", "web")
    assert restarted.returncode == 0, restarted.stderr
    assert load.ok > 0 and load.failures == [], load.failures[:5]
    after = live_ids(agent)
    assert len(after) == 2 and not after & before, (before, after)
    retired = [
        e["instance"]
        for e in agent.client.events()
        if e["kind"] == "instance.stopped" and e["instance"] in before
    ]
    assert retired[0] == newest, f"the touched instance was not replaced first: {retired}"
    history = agent.client.history("web")["revisions"]
    assert [r["number"] for r in history] == [1], "restart made a revision"

    stopped = kiln(agent, "stop", "web")
    assert stopped.returncode == 0, stopped.stderr
    with pytest.raises(httpx.TransportError):
        get(listen)
    shown = kiln(agent, "status")
    assert shown.returncode == 0 and "web: stopped (r1; kiln start web runs it)" in shown.stdout

    started = kiln(agent, "start", "web")
    assert started.returncode == 0, started.stderr
    assert get(listen) == (200, "v1\n")
    assert not live_ids(agent) & (before | after)
    code = kiln(agent, "exec", "web", "--", "sh", "-c", "echo out; exit 7")
    assert (code.returncode, code.stdout) == (7, "out\n"), code
    again = kiln(agent, "start", "web")
    assert again.returncode == 1 and "running already" in again.stderr


def test_a_long_wait_says_what_it_waits_for_and_is_never_silent_long(
    agent: RunningAgent, busybox_image: ImageFactory, free_port: Callable[[], int]
) -> None:
    """An app that takes 6 s to listen: the follower names the instance, the probe's
    result and the deadline, and prints something at least every ~2 s."""
    slow = busybox_image(
        "web:slow", V1, ["/bin/sh", "-c", "sleep 6; exec httpd -f -p $PORT -h /www"]
    )
    update = {
        "max_surge": 1,
        "max_unavailable": 0,
        "min_healthy_time": "0.2s",
        "healthy_deadline": "30s",
        "progress_deadline": "40s",
    }
    spec = service_spec(slow, listen=free_port(), replicas=1, update=update)
    assert deploy(agent.client, spec)["outcome"] == "succeeded"

    env = dict(os.environ, KILN_HOME=str(agent.home))
    proc = subprocess.Popen(
        [KILN, "restart", "web"], env=env, text=True, stderr=subprocess.PIPE, bufsize=1
    )
    stamped: list[tuple[float, str]] = []

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            stamped.append((time.monotonic(), line.rstrip("\n")))

    reader = threading.Thread(target=read)
    began = time.monotonic()
    reader.start()
    assert proc.wait(60) == 0, stamped
    reader.join(5)
    waits = [line for _, line in stamped if line.startswith("waiting for web-")]
    assert waits, stamped
    assert any("GET /healthz: " in line and "of healthy_deadline 30 s" in line for line in waits), (
        waits
    )
    times = [began] + [t for t, _ in stamped]
    gap = max(b - a for a, b in itertools.pairwise(times))
    assert gap < 3.5, f"silent for {gap:.1f} s: {stamped}"


def test_exec_keeps_only_the_tail_of_endless_output_and_a_timeout_kills_it(
    agent: RunningAgent, busybox_image: ImageFactory, free_port: Callable[[], int]
) -> None:
    """A compromised or careless command cannot fill the agent's memory or hold it."""
    digest = busybox_image("web:v1", V1)
    spec = service_spec(digest, listen=free_port(), replicas=1)
    assert deploy(agent.client, spec)["outcome"] == "succeeded"
    flood = kiln(agent, "exec", "web", "--", "sh", "-c", "head -c 50000000 /dev/zero; echo end")
    assert flood.returncode == 0, flood.stderr[-500:]
    assert flood.stdout.endswith("end\n") and len(flood.stdout) <= (1 << 20)
    assert "truncated to its last 1 MiB" in flood.stderr
    began = time.monotonic()
    slow = kiln(agent, "exec", "--timeout", "1", "web", "--", "sleep", "30")
    assert slow.returncode == 1 and "timed out after 1.0s" in slow.stderr, slow
    assert time.monotonic() - began < 15
    assert agent.client.status()["services"]["web"]["state"] == "ok"
