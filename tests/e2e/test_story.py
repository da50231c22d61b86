"""The main job through the real CLI: up, plan, apply under load, SIGKILL, rollback,
logs of a gone instance, down — on a busybox image baked from a kiln.toml."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

import busybox_tree
from dockerd import Dockerd, docker_engine
from kiln.observe.load import LoadGenerator
from kiln.oci.runc import home_tag
from leftovers import assert_nothing_left

__all__ = ["docker_engine"]  # the session's private engine, a fixture

pytestmark = pytest.mark.e2e

KILN = str(Path(sys.executable).parent / "kiln")

TOML = """\
[project]
name = "story"

[images.web]
from = "scratch"
steps = [{{ copy = "rootfs/", to = "/" }}]
cmd = ["/bin/sh", "-c", "echo started $(cat /www/index.html); exec httpd -f -v -p $PORT -h /www"]
user = "65534:65534"

[services.web]
image = "web"
replicas = 3
listen = {listen}
health = {{ http = "/healthz", interval = "0.5s", timeout = "1s" }}
stop_grace = "2s"
drain_timeout = "2s"
update = {{ min_healthy_time = "0.5s" }}
"""


free_port = busybox_tree.free_port


def make_project(root: Path, listen: int, version: str) -> Path:
    busybox_tree.build_busybox_rootfs(
        root / "rootfs",
        www={"healthz": "ok\n", "index.html": f"{version}\n"},
        applets=("sh", "httpd", "cat", "echo"),
        users=False,
    )
    (root / "kiln.toml").write_text(TOML.format(listen=listen))
    return root


def kiln(home: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, KILN_HOME=str(home))
    return subprocess.run(
        [KILN, *args], env=env, cwd=cwd, text=True, capture_output=True, timeout=300
    )


def fetch(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as resp:
        return str(resp.read().decode().strip())


def status(home: Path) -> dict:  # type: ignore[type-arg]
    out = kiln(home, "status", "--json")
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout)["services"]["web"])


def wait_for(predicate, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    home = tmp_path / "home"
    yield home
    kiln(home, "down")


def test_the_main_job_through_the_cli(home: Path, tmp_path: Path) -> None:
    listen = free_port()
    project = make_project(tmp_path / "p", listen, "v1")

    up = kiln(home, "up", str(project))
    assert up.returncode == 0, up.stderr
    assert "Plan: 3 to create, 0 to replace, 0 to destroy." in up.stderr
    assert fetch(listen) == "v1"
    first = status(home)
    assert len([i for i in first["instances"] if i["state"] == "ready"]) == 3
    assert first["state"] == "ok"
    assert kiln(home, "status").returncode == 0

    (project / "rootfs" / "www" / "index.html").write_text("v2\n")
    plan = kiln(home, "plan", str(project), "-o", str(tmp_path / "plan.json"))
    assert plan.returncode == 2, plan.stderr
    assert plan.stdout.count("-/+ web-") == 3 and "image sha256:" in plan.stdout
    assert "Plan: 0 to create, 3 to replace, 0 to destroy." in plan.stdout

    with LoadGenerator("127.0.0.1", listen, workers=4) as load:
        time.sleep(0.3)
        applied = kiln(home, "apply", str(tmp_path / "plan.json"))
        time.sleep(0.3)
    assert applied.returncode == 0, applied.stderr
    assert load.report.sent > 100
    assert load.report.failed == 0, load.report.errors
    assert fetch(listen) == "v2"

    stale = kiln(home, "apply", str(tmp_path / "plan.json"))
    assert stale.returncode == 1
    assert "the state changed since this plan was made; run kiln plan again" in stale.stderr

    again = kiln(home, "plan", str(project))
    assert again.returncode == 0 and "No changes" in again.stdout

    victim = next(i for i in status(home)["instances"] if i["state"] == "ready")
    os.kill(int(victim["pid"]), signal.SIGKILL)

    def replaced() -> bool:
        ready = [i for i in status(home)["instances"] if i["state"] == "ready"]
        return len(ready) == 3 and victim["id"] not in {i["id"] for i in ready}

    wait_for(replaced, timeout=15)
    events = [json.loads(line) for line in kiln(home, "events", "--json").stdout.splitlines()]
    assert any(e["kind"] == "instance.recovered" and e["instance"] == victim["id"] for e in events)

    back = kiln(home, "rollback", "web")
    assert back.returncode == 0, back.stderr
    assert fetch(listen) == "v1"
    history = json.loads(kiln(home, "history", "web", "--json").stdout)["revisions"]
    assert [r["status"] for r in history].count("active") == 1

    logs = kiln(home, "logs", "web", "--instance", victim["id"])
    assert logs.returncode == 0, logs.stderr
    assert f"{victim['id']} started v2" in logs.stdout

    down = kiln(home, "down")
    assert down.returncode == 0, down.stderr
    with pytest.raises(OSError):
        fetch(listen)
    shims = subprocess.run(["pgrep", "-f", f"kiln.runtime.shim.*{home}"], capture_output=True)
    assert shims.stdout == b""
    assert_nothing_left(home)


def test_bad_inputs_through_the_cli_change_nothing(home: Path, tmp_path: Path) -> None:
    listen = free_port()
    project = make_project(tmp_path / "p", listen, "v1")
    assert kiln(home, "up", str(project)).returncode == 0

    toml = project / "kiln.toml"
    good = toml.read_text()
    toml.write_text(good.replace("replicas = 3", "replicas = 3\nreplicas = 4"))
    bad = kiln(home, "apply", "--file", str(project), "--yes")
    assert bad.returncode == 1
    assert "malformed TOML" in bad.stderr and "kiln.toml:" in bad.stderr

    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        toml.write_text(good.replace(f"listen = {listen}", f"listen = {taken.getsockname()[1]}"))
        clash = kiln(home, "apply", "--file", str(project), "--yes")
    assert clash.returncode == 1
    assert "in use" in clash.stderr
    assert fetch(listen) == "v1"
    assert len([i for i in status(home)["instances"] if i["state"] == "ready"]) == 3

    toml.write_text(good.replace('image = "web"', 'image = "nope"'))
    missing = kiln(home, "plan", str(project))
    assert missing.returncode == 1
    assert "services.web.image: no recipe images.nope" in missing.stderr
    assert fetch(listen) == "v1"


def test_a_second_apply_during_a_rollout_is_refused_naming_it(home: Path, tmp_path: Path) -> None:
    listen = free_port()
    project = make_project(tmp_path / "p", listen, "v1")
    assert kiln(home, "up", str(project)).returncode == 0
    (project / "rootfs" / "www" / "index.html").write_text("v2\n")
    env = dict(os.environ, KILN_HOME=str(home))
    first = subprocess.Popen(
        [KILN, "apply", "--file", str(project), "--yes"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: status(home).get("rollout") is not None, timeout=30)
        (project / "rootfs" / "www" / "index.html").write_text("v3\n")
        second = kiln(home, "apply", "--file", str(project), "--yes")
        assert second.returncode == 1
        assert "service web has a rollout in progress (deployment d-" in second.stderr
    finally:
        _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert fetch(listen) == "v2"


def test_read_commands_never_start_an_agent(home: Path, tmp_path: Path) -> None:
    """After ``kiln down``, ``kiln plan`` (and ``apply`` with nothing to apply) must not
    start an agent, which would bring back what ``down`` stopped (issue 8, defect 9)."""
    listen = free_port()
    project = make_project(tmp_path / "p", listen, "v1")
    assert kiln(home, "up", str(project)).returncode == 0
    assert kiln(home, "down").returncode == 0
    wait_for(lambda: not (home / "agent.sock").exists(), 10)

    planned = kiln(home, "plan", str(project))
    assert planned.returncode == 2, planned.stderr  # changes pending: web is to be created
    assert "3 to create" in planned.stdout, planned.stdout
    assert not (home / "agent.sock").exists(), "kiln plan started an agent"
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", listen), timeout=1).close()

    # A saved plan with nothing in it is not a reason to start one either.
    assert kiln(home, "up", str(project)).returncode == 0
    empty = tmp_path / "empty.json"
    assert kiln(home, "plan", str(project), "-o", str(empty)).returncode == 0
    assert kiln(home, "down").returncode == 0
    wait_for(lambda: not (home / "agent.sock").exists(), 10)
    applied = kiln(home, "apply", str(empty))
    assert applied.returncode == 0, applied.stderr
    assert "Nothing to apply" in applied.stdout
    assert not (home / "agent.sock").exists(), "kiln apply of an empty plan started an agent"


def test_two_projects_share_a_home_and_up_asks_before_destroying(
    home: Path, tmp_path: Path
) -> None:
    """A second project's ``kiln up`` never retires the first's services, and ``kiln up``
    destroys nothing without being told (issue 8, defect 8)."""
    shop_port, blog_port = free_port(), free_port()
    shop = make_project(tmp_path / "shop", shop_port, "shop")
    blog = make_project(tmp_path / "blog", blog_port, "blog")
    text = (blog / "kiln.toml").read_text()
    (blog / "kiln.toml").write_text(
        text.replace('name = "story"', 'name = "blog"').replace("[services.web]", "[services.blog]")
    )
    assert kiln(home, "up", str(shop)).returncode == 0
    second = kiln(home, "up", str(blog))
    assert second.returncode == 0, second.stderr
    assert "destroy" not in second.stdout, second.stdout
    assert fetch(shop_port) == "shop" and fetch(blog_port) == "blog"

    # The blog project now drops its service: up refuses to destroy it unasked.
    (blog / "kiln.toml").write_text(
        text.replace('name = "story"', 'name = "blog"').split("[services.web]")[0]
    )
    refused = kiln(home, "up", str(blog))
    assert refused.returncode == 1
    assert "kiln up would destroy service blog; nothing was changed" in refused.stderr
    assert fetch(blog_port) == "blog"
    confirmed = kiln(home, "up", "--yes", str(blog))
    assert confirmed.returncode == 0, confirmed.stderr
    assert fetch(shop_port) == "shop"
    with pytest.raises(OSError):
        fetch(blog_port)


def test_the_main_job_on_the_docker_runtime(
    home: Path, tmp_path: Path, docker_engine: Dockerd
) -> None:
    """The same story with ``[runtime] kind = "docker"`` on a private engine: the same
    plan, a rolling update under load with no failed request, a SIGKILLed container
    replaced, a SIGKILLed agent whose containers are adopted, a rollback, the logs of a
    container that no longer exists, and a down that leaves no container of the home."""
    import docker

    listen = free_port()
    project = make_project(tmp_path / "p", listen, "v1")
    toml = project / "kiln.toml"
    toml.write_text(
        toml.read_text().replace(
            "[images.web]",
            f'[runtime]\nkind = "docker"\nhost = "{docker_engine.host}"\n\n[images.web]',
        )
    )
    engine = docker.DockerClient(base_url=docker_engine.host)
    try:
        up = kiln(home, "up", str(project))
        assert up.returncode == 0, up.stderr
        assert fetch(listen) == "v1"
        first = status(home)
        assert len([i for i in first["instances"] if i["state"] == "ready"]) == 3
        assert all(i["container"] for i in first["instances"])

        (project / "rootfs" / "www" / "index.html").write_text("v2\n")
        with LoadGenerator("127.0.0.1", listen, workers=4) as load:
            time.sleep(0.3)
            applied = kiln(home, "apply", "--file", str(project), "--yes")
            time.sleep(0.3)
        assert applied.returncode == 0, applied.stderr
        print(f"docker rollout under load: {load.report.summary()}")
        assert load.report.sent > 100
        assert load.report.failed == 0, load.report.errors
        assert fetch(listen) == "v2"

        victim = next(i for i in status(home)["instances"] if i["state"] == "ready")
        engine.containers.get(victim["container"]).kill("SIGKILL")

        def replaced() -> bool:
            ready = [i for i in status(home)["instances"] if i["state"] == "ready"]
            return len(ready) == 3 and victim["id"] not in {i["id"] for i in ready}

        wait_for(replaced, timeout=20)

        before = {i["id"] for i in status(home)["instances"]}
        agent_pid = int((home / "agent.pid").read_text().strip())
        with LoadGenerator("127.0.0.1", listen, workers=2) as load:
            os.kill(agent_pid, signal.SIGKILL)
            time.sleep(0.5)
            again = kiln(home, "up", str(project))
            time.sleep(0.3)
        assert again.returncode == 0, again.stderr
        assert "No changes" in again.stderr or "No changes" in again.stdout
        assert {i["id"] for i in status(home)["instances"]} == before, "containers were replaced"
        events = [json.loads(line) for line in kiln(home, "events", "--json").stdout.splitlines()]
        adopted = {e["instance"] for e in events if e["kind"] == "instance.adopted"}
        assert before <= adopted
        assert load.report.failed == 0, load.report.errors

        back = kiln(home, "rollback", "web")
        assert back.returncode == 0, back.stderr
        assert fetch(listen) == "v1"

        logs = kiln(home, "logs", "web", "--instance", victim["id"])
        assert logs.returncode == 0, logs.stderr
        assert f"{victim['id']} started v2" in logs.stdout

        down = kiln(home, "down")
        assert down.returncode == 0, down.stderr
        with pytest.raises(OSError):
            fetch(listen)
        tag = home_tag(home)
        left = engine.containers.list(all=True, filters={"label": f"dev.kiln.home={tag}"})
        assert left == [], [c.name for c in left]
    finally:
        kiln(home, "down")
        engine.close()


def test_ctrl_c_on_apply_leaves_the_rollout_to_the_agent_and_says_so(
    home: Path, tmp_path: Path
) -> None:
    listen = free_port()
    project = make_project(tmp_path / "p", listen, "v1")
    assert kiln(home, "up", str(project)).returncode == 0
    (project / "rootfs" / "www" / "index.html").write_text("v2\n")
    env = dict(os.environ, KILN_HOME=str(home))
    applying = subprocess.Popen(
        [KILN, "apply", "--file", str(project), "--yes"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(lambda: status(home).get("rollout") is not None, timeout=30)
    applying.send_signal(signal.SIGINT)
    _, err = applying.communicate(timeout=30)
    assert applying.returncode == 1, err
    last = err.strip().splitlines()[-1]
    assert "interrupted: deployment d-" in last and "goes on in the agent" in last, err
    assert "kiln events --follow" in last and "kiln rollback web" in last, err
    wait_for(lambda: status(home).get("rollout") is None and fetch(listen) == "v2", timeout=60)
