"""Attacks on kiln exec, restart, stop and start against a real agent, real runc
sandboxes and the real CLI, as a careless user or a compromised instance would make
them. Tests marked ``xfail(strict=True)`` demonstrate a defect (the reason says which);
the others are attacks the code withstands.

The agent fixtures are those of ``tests/agent/conftest.py`` (loaded here by path, since
that directory is not a package)."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

_AGENT_TESTS = Path(__file__).resolve().parents[1] / "agent"
if str(_AGENT_TESTS) not in sys.path:
    sys.path.insert(0, str(_AGENT_TESTS))

from agent_harness import (  # noqa: E402
    ImageFactory,
    RunningAgent,
    deploy,
    service_spec,
    wait_for,
)


def _agent_fixtures() -> Any:
    spec = importlib.util.spec_from_file_location("agent_conftest", _AGENT_TESTS / "conftest.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_fixtures = _agent_fixtures()
kiln_home = _fixtures.kiln_home
busybox_image = _fixtures.busybox_image
agent = _fixtures.agent
free_port = _fixtures.free_port

pytestmark = pytest.mark.e2e

KILN = str(Path(sys.executable).parent / "kiln")
WEB = {"healthz": "ok\n", "index.html": "v1\n"}


def kiln(home: Path, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, KILN_HOME=str(home))
    return subprocess.run([KILN, *args], env=env, text=True, capture_output=True, timeout=timeout)


@pytest.fixture
def http(agent: RunningAgent) -> Iterator[httpx.Client]:
    transport = httpx.HTTPTransport(uds=str(agent.home / "agent.sock"))
    with httpx.Client(transport=transport, base_url="http://kiln-agent", timeout=60) as client:
        yield client


def post_raw(http: httpx.Client, path: str, body: str) -> httpx.Response:
    return http.post(path, content=body.encode(), headers={"content-type": "application/json"})


def one_web(agent: RunningAgent, busybox_image: ImageFactory, listen: int, **service: Any) -> str:
    """One ready busybox httpd instance of service web; returns its id."""
    digest = busybox_image("web:v1", WEB)
    spec = service_spec(digest, listen=listen, replicas=1, **service)
    assert deploy(agent.client, spec)["outcome"] == "succeeded"
    ready = [
        i["id"]
        for i in agent.client.status()["services"]["web"]["instances"]
        if i["state"] == "ready"
    ]
    assert len(ready) == 1, ready
    return str(ready[0])


# -- exec: commands that outlive themselves ---------------------------------


def test_exec_of_a_command_that_leaves_a_background_process_is_bounded_and_says_why(
    agent: RunningAgent, busybox_image: ImageFactory, free_port: Callable[[], int]
) -> None:
    """runc (like docker exec) returns when the output pipes close: a background process
    holding them holds the exec until its timeout, which then says why and how to avoid
    it; with the background process's output redirected it returns at once."""
    iid = one_web(agent, busybox_image, free_port())
    began = time.monotonic()
    ran = kiln(
        agent.home, "exec", "--timeout", "3", iid, "--", "sh", "-c", "sleep 20 & echo started"
    )
    took = time.monotonic() - began
    print(f"exec of a command leaving a background process: {took:.1f}s, {ran.stderr.strip()}")
    assert ran.returncode == 1 and took < 10, (took, ran.stderr)
    assert "timed out after 3.0s" in ran.stderr and ">/dev/null 2>&1 &" in ran.stderr
    began = time.monotonic()
    quiet = "sleep 20 >/dev/null 2>&1 & echo started"
    ran = kiln(agent.home, "exec", "--timeout", "10", iid, "--", "sh", "-c", quiet)
    assert (ran.returncode, ran.stdout) == (0, "started\n"), ran.stderr
    assert time.monotonic() - began < 5


def test_long_execs_do_not_starve_the_agent(
    agent: RunningAgent, busybox_image: ImageFactory, free_port: Callable[[], int]
) -> None:
    health = {"exec": ["true"], "interval": "0.2s", "timeout": "0.5s"}
    iid = one_web(agent, busybox_image, free_port(), health=health)
    socket_path = str(agent.home / "agent.sock")
    answers: list[int] = []

    def long_exec() -> None:
        transport = httpx.HTTPTransport(uds=socket_path)
        with httpx.Client(transport=transport, base_url="http://kiln-agent", timeout=60) as c:
            body = {"instance": iid, "argv": ["sleep", "7"], "timeout": 30}
            answers.append(c.post("/v1/exec", json=body).status_code)

    threads = [threading.Thread(target=long_exec) for _ in range(16)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(5)
        unhealthy = [e for e in agent.client.events() if e["kind"] == "instance.unhealthy"]
    finally:
        for thread in threads:
            thread.join(30)
    # Eight run (in a pool of their own); the rest are refused at once, not queued.
    assert sorted(answers) == [200] * 8 + [409] * 8, answers
    # With 14 such execs (two threads left) the instance stays healthy: the pool, not the
    # load, is what starves the check.
    assert unhealthy == [], f"16 execs made a healthy instance unhealthy: {unhealthy[0]['message']}"


def test_exec_of_binary_output_is_not_called_truncated(
    agent: RunningAgent, busybox_image: ImageFactory, free_port: Callable[[], int]
) -> None:
    iid = one_web(agent, busybox_image, free_port())
    script = "head -c 400000 /dev/zero | tr '\\000' '\\377'; echo; echo end"
    ran = kiln(agent.home, "exec", iid, "--", "sh", "-c", script)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.endswith("end\n") and ran.stdout.count("\ufffd") == 400_000
    assert "truncated" not in ran.stderr, ran.stderr.strip()


def test_every_bad_body_of_the_new_routes_is_one_clear_400(
    agent: RunningAgent,
    http: httpx.Client,
    busybox_image: ImageFactory,
    free_port: Callable[[], int],
) -> None:
    """Held: wrong types, missing keys, absurd or non-finite timeouts, NUL bytes, lone
    surrogates and oversized argv get a 400 with one line naming the key (or a 404 for a
    well-formed name nobody has); never a 422 list or a 500, and the agent keeps serving."""
    iid = one_web(agent, busybox_image, free_port())
    pid = agent.pid()
    service_bodies = [
        "{}",
        "[]",
        "null",
        "1",
        '"web"',
        "{",
        "",
        '{"service": 1}',
        '{"service": null}',
        '{"service": ["web"]}',
        '{"service": true}',
        '{"service": "\\ud800"}',
        '{"service": "' + "a" * 100 + '"}',
    ]
    exec_bodies = [
        "{}",
        "[]",
        "null",
        "{",
        "",
        f'{{"instance": "{iid}", "argv": []}}',
        f'{{"instance": "{iid}", "argv": "ls"}}',
        f'{{"instance": "{iid}", "argv": [1]}}',
        f'{{"instance": "{iid}", "argv": [null]}}',
        f'{{"instance": "{iid}", "argv": ["a\\u0000b"]}}',
        f'{{"instance": "{iid}", "argv": ["\\ud800"]}}',
        f'{{"instance": "{iid}", "argv": ["' + "a" * 5000 + '"]}',
        f'{{"instance": "{iid}", "argv": [' + ",".join(['"a"'] * 300) + "]}",
        *(
            f'{{"instance": "{iid}", "argv": ["true"], "timeout": {t}}}'
            for t in ("NaN", "Infinity", "-Infinity", "1e400", "0", "-1", "1e12", "null", "[]")
        ),
        '{"instance": 5, "argv": ["true"]}',
        '{"instance": "", "argv": ["true"]}',
        '{"instance": "' + "w" * 200 + '", "argv": ["true"]}',
    ]
    cases = [(p, b) for p in ("/v1/restart", "/v1/stop", "/v1/start") for b in service_bodies]
    cases += [("/v1/exec", b) for b in exec_bodies]
    for path, body in cases:
        resp = post_raw(http, path, body)
        assert resp.status_code == 400, (path, body[:80], resp.status_code, resp.text[:300])
        detail = resp.json()["detail"]
        assert isinstance(detail, str) and "\n" not in detail, (path, body[:80], detail)
    # Well-formed, but nobody has that name: 404; an empty argv[0] or a missing command
    # runs and fails inside the instance, a 200 with its exit code.
    for path in ("/v1/restart", "/v1/stop", "/v1/start"):
        assert post_raw(http, path, '{"service": "a\\u0000"}').status_code == 404
    other_home = post_raw(http, "/v1/exec", '{"instance": "web-0123abcd", "argv": ["true"]}')
    assert other_home.status_code == 404, other_home.text
    for argv in ([""], ["/no/such/command"], ["true"] * 256, ["echo", "x" * 4096]):
        resp = http.post("/v1/exec", json={"instance": iid, "argv": argv, "timeout": 10})
        assert resp.status_code == 200, (argv[:2], resp.text[:300])
        assert isinstance(resp.json()["exit_code"], int)
    assert agent.client.health()["ok"] and agent.pid() == pid


def test_exec_gains_nothing_the_instance_does_not_have(
    agent: RunningAgent, busybox_image: ImageFactory, free_port: Callable[[], int]
) -> None:
    """Held: the exec'd process has the app's user, capabilities (none), no_new_privs,
    seccomp filter and cgroup; the process file it was started from is owner-only on the
    host and not reachable from inside."""
    iid = one_web(agent, busybox_image, free_port())
    keys = ("Uid", "Gid", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs", "Seccomp")

    def fields(text: str) -> dict[str, str]:
        pairs = (line.split(":", 1) for line in text.splitlines() if ":" in line)
        return {k: v.strip() for k, v in pairs if k in keys}

    app = kiln(
        agent.home,
        "exec",
        iid,
        "--",
        "sh",
        "-c",
        "cat /proc/$(pidof httpd)/status; echo ===; cat /proc/self/status; echo ===; "
        "cat /proc/$(pidof httpd)/cgroup; echo ===; cat /proc/self/cgroup",
    )
    assert app.returncode == 0, app.stderr
    app_status, exec_status, app_cgroup, exec_cgroup = app.stdout.split("===\n")
    assert fields(exec_status) == fields(app_status), (fields(exec_status), fields(app_status))
    assert fields(exec_status)["CapEff"] == "0000000000000000"
    assert fields(exec_status)["NoNewPrivs"] == "1"
    assert exec_cgroup == app_cgroup
    # Setuid helpers cannot lift it either (no_new_privs), and the host's process file
    # is out of reach.
    probe = kiln(
        agent.home,
        "exec",
        iid,
        "--",
        "sh",
        "-c",
        "ls -a / /proc/1/root/.. 2>&1 | grep -c exec- ; id -u",
    )
    assert probe.stdout.split()[0] == "0", probe.stdout
    instance_dir = agent.home / "instances" / iid
    assert (instance_dir.stat().st_mode & 0o077) == 0
    config = instance_dir / "bundle" / "config.json"
    assert config.stat().st_uid == 0 and (config.stat().st_mode & 0o022) == 0


# -- restart, stop and start against a crashing agent, a down and a Ctrl-C ----


def _restart_spec(agent: RunningAgent, busybox_image: ImageFactory, listen: int) -> set[str]:
    """Two ready instances that a restart replaces one by one (1 s each); their ids."""
    digest = busybox_image("web:v1", WEB)
    slow = {
        "max_surge": 1,
        "max_unavailable": 0,
        "min_healthy_time": "1s",
        "healthy_deadline": "10s",
        "progress_deadline": "30s",
    }
    spec = service_spec(digest, listen=listen, replicas=2, update=slow)
    assert deploy(agent.client, spec)["outcome"] == "succeeded"
    return {i["id"] for i in agent.client.status()["services"]["web"]["instances"]}


def _kill_agent_once_a_new_instance_is_ready(agent: RunningAgent, before: set[str]) -> None:
    from kiln.agent.client import start_background

    wait_for(
        lambda: [
            e
            for e in agent.client.events()
            if e["kind"] == "instance.ready" and e["instance"] not in before
        ],
        10,
        "the restart's first new instance",
    )
    os.kill(agent.pid(), signal.SIGKILL)
    time.sleep(0.3)
    start_background(agent.home)


def test_a_restart_and_a_stop_survive_a_sigkill_of_the_agent(
    agent: RunningAgent, busybox_image: ImageFactory, free_port: Callable[[], int]
) -> None:
    """Held: the new agent resumes a 'restart' rollout (same revision, every old instance
    replaced, none kept because it has the target's revision) and a 'stop' one."""
    from kiln.agent.client import start_background
    from kiln.runtime.local import LocalRuntime

    before = _restart_spec(agent, busybox_image, free_port())
    deployment = agent.client.restart("web")["deployment"]
    _kill_agent_once_a_new_instance_is_ready(agent, before)
    record = agent.client.wait_deployment(deployment, timeout=60)
    assert record["outcome"] == "succeeded", record
    web = agent.client.status()["services"]["web"]
    after = {i["id"] for i in web["instances"] if i["state"] == "ready"}
    assert len(after) == 2 and not after & before, (before, web["instances"])
    assert [r["number"] for r in agent.client.history("web")["revisions"]] == [1]

    stopping = agent.client.stop_service("web")["deployment"]
    os.kill(agent.pid(), signal.SIGKILL)
    time.sleep(0.3)
    start_background(agent.home)
    assert agent.client.wait_deployment(stopping, timeout=30)["outcome"] == "succeeded"
    shown = agent.client.status()["services"]["web"]
    assert shown["state"] == "stopped" and shown["instances"] == [], shown
    assert LocalRuntime(agent.home).list() == []


def test_exec_during_kiln_down_neither_hangs_down_nor_the_exec(
    agent: RunningAgent, busybox_image: ImageFactory, free_port: Callable[[], int]
) -> None:
    """Held: kiln down while a long exec runs stops the instance; the exec ends with an
    answer (its command was killed), and down is not held by it."""
    iid = one_web(agent, busybox_image, free_port())
    result: dict[str, Any] = {}

    def long_exec() -> None:
        began = time.monotonic()
        result["ran"] = kiln(agent.home, "exec", "--timeout", "60", iid, "--", "sleep", "50")
        result["took"] = time.monotonic() - began

    thread = threading.Thread(target=long_exec)
    thread.start()
    time.sleep(1.5)
    began = time.monotonic()
    down = kiln(agent.home, "down")
    took = time.monotonic() - began
    thread.join(30)
    print(f"down took {took:.1f}s; the exec ended after {result.get('took', -1):.1f}s")
    assert down.returncode == 0, down.stderr
    assert took < 10 and not thread.is_alive() and result["took"] < 15
    assert result["ran"].returncode != 0 and "Traceback" not in result["ran"].stderr


def test_ctrl_c_on_restart_does_not_advise_a_rollback_to_an_older_revision(
    agent: RunningAgent, busybox_image: ImageFactory, free_port: Callable[[], int]
) -> None:
    listen = free_port()
    slow = {
        "max_surge": 1,
        "max_unavailable": 0,
        "min_healthy_time": "3s",
        "healthy_deadline": "10s",
        "progress_deadline": "30s",
    }
    for version in ("v1", "v2"):
        digest = busybox_image(f"web:{version}", {"healthz": "ok\n", "index.html": version})
        spec = service_spec(digest, listen=listen, replicas=1, update=slow)
        assert deploy(agent.client, spec)["outcome"] == "succeeded"
    env = dict(os.environ, KILN_HOME=str(agent.home))
    proc = subprocess.Popen(
        [KILN, "restart", "web"], env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    wait_for(lambda: agent.client.status()["services"]["web"].get("rollout"), 10, "the restart")
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=20)
    assert "interrupted" in err, err
    assert "kiln rollback web" not in err, err.strip()


def test_exec_with_an_image_workdir_on_a_leaked_fd_stays_in_the_sandbox(
    agent: RunningAgent, tmp_path: Path, free_port: Callable[[], int]
) -> None:
    """Held (CVE-2024-21626, its runc exec variant): an image whose WorkingDir is
    /proc/self/fd/N gets the exec'd command nowhere near the host's filesystem."""
    from agent_harness import HTTPD, build_busybox_rootfs, put_image
    from probe import MALICIOUS_WORKDIRS, WORKDIR_ESCAPE

    marker = tmp_path / f"host-marker-{os.getpid()}"
    marker.write_text("host\n")
    tree = build_busybox_rootfs(tmp_path / "tree", WEB)
    tried = 0
    for n, workdir in enumerate(MALICIOUS_WORKDIRS[3:6] + MALICIOUS_WORKDIRS[-1:]):
        digest = put_image(agent.home, f"wd:{n}", tree, HTTPD, workdir=workdir)
        spec = service_spec(
            digest,
            listen=free_port(),
            replicas=1,
            update={"healthy_deadline": "3s", "progress_deadline": "6s"},
        )
        record = deploy(agent.client, spec)
        if record["outcome"] != "succeeded":
            print(f"{workdir}: refused ({record['outcome']})")
            continue
        tried += 1
        ran = kiln(
            agent.home,
            "exec",
            "web",
            "--",
            "sh",
            "-c",
            WORKDIR_ESCAPE.format(host_marker_path=str(marker)),
        )
        print(f"{workdir}: exec rc {ran.returncode}: {ran.stdout.strip()!r} {ran.stderr.strip()!r}")
        assert ran.returncode != 0 and "ESCAPED" not in ran.stdout, ran.stdout
    print(f"{tried} workdir(s) ran an instance to exec into")


def test_an_exec_event_stays_small_whatever_the_argv(
    agent: RunningAgent,
    http: httpx.Client,
    busybox_image: ImageFactory,
    free_port: Callable[[], int],
) -> None:
    iid = one_web(agent, busybox_image, free_port())
    argv = ["true", *(["x" * 4096] * 255)]
    resp = http.post("/v1/exec", json={"instance": iid, "argv": argv, "timeout": 10})
    assert resp.status_code == 200 and resp.json()["exit_code"] == 0, resp.text[:300]
    (event,) = [e for e in agent.client.events() if e["kind"] == "instance.exec"]
    size = len(json.dumps(event))
    print(f"one instance.exec event: {size} bytes")
    assert size < 64 * 1024, f"one instance.exec event is {size} bytes"
