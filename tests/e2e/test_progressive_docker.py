"""Issue 12 on the docker runtime, through the real CLI on the session's private engine:
one agent and one service walk through blue/green (switch under load, ``kiln rollback``
during the hold as an instant switch back), a canary answering 500 aborted by analysis,
quarantine of an unhealthy instance (``docker pause``, evidence, destroyed when the
window closes), ``kiln burn``, ``kiln chaos kill`` and max_age churn, all under load."""

from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_story import KILN, free_port, kiln, status, wait_for

import busybox_tree
from dockerd import Dockerd, docker_engine
from kiln.agent.client import AgentClient
from kiln.observe.load import LoadGenerator
from kiln.oci.runc import home_tag
from kiln.runtime.docker import LABEL_HOME

__all__ = ["docker_engine"]  # the session's private engine, a fixture

pytestmark = [pytest.mark.e2e, pytest.mark.docker]

APP = "/cgi-bin/app"
GOOD = 'printf "Content-Type: text/plain\\r\\n\\r\\n{version}\\n"'
FLAKY = (
    'if [ $((RANDOM % 4)) -eq 0 ]; then printf "Status: 500 Boom\\r\\n\\r\\nboom\\n"; '
    "else " + GOOD + "; fi"
)
HEALTH = (
    'if [ -e /data/sick ]; then printf "Status: 500 Sick\\r\\n\\r\\nsick\\n"; '
    'else printf "Content-Type: text/plain\\r\\n\\r\\nok\\n"; fi'
)
BLUE_GREEN = '{ strategy = "blue-green", blue_hold = "120s", min_healthy_time = "0.5s" }'
CANARY = (
    '{ strategy = "canary", steps = [{ weight = 20, pause = "20s" }], '
    "analysis = { max_error_rate = 0.05, min_requests = 20 }, "
    'min_healthy_time = "0.5s", progress_deadline = "30s" }'
)
ROLLING = '{ min_healthy_time = "0.5s" }'

TOML = """\
[project]
name = "progressive"

[runtime]
kind = "{kind}"
{runtime}

[images.web]
from = "scratch"
steps = [{{ copy = "rootfs/", to = "/" }}]
cmd = ["/bin/sh", "-c", "echo started; exec httpd -f -p $PORT -h /www"]
user = "65534:65534"

[services.web]
image = "web"
replicas = 2
listen = {listen}
writable = ["/data"]
health = {{ http = "/cgi-bin/health", interval = "0.5s", timeout = "1s" }}
stop_grace = "2s"
drain_timeout = "2s"
quarantine = "{quarantine}"
heal = {{ meltdown_fraction = 5.0 }}
update = {update}
{extra}
"""


def write_app(project: Path, version: str, body: str = GOOD) -> None:
    """The CGI every request of the load reaches: ``body`` printing ``version``."""
    cgi = project / "rootfs" / "www" / "cgi-bin"
    (cgi / "app").write_text("#!/bin/sh\n" + body.format(version=version) + "\n")
    (cgi / "app").chmod(0o755)


def make_project(root: Path, version: str) -> Path:
    """A busybox httpd whose app and health check are CGIs: the health check fails once
    ``/data/sick`` exists (a writable path), so a test can make one instance unhealthy."""
    rootfs = busybox_tree.build_busybox_rootfs(
        root / "rootfs",
        www={"index.html": f"{version}\n"},
        applets=("sh", "httpd", "cat", "echo", "printf", "sleep", "touch", "test", "["),
        users=False,
    )
    cgi = rootfs / "www" / "cgi-bin"
    cgi.mkdir()
    cgi.chmod(0o755)
    (cgi / "health").write_text("#!/bin/sh\n" + HEALTH + "\n")
    (cgi / "health").chmod(0o755)
    write_app(root, version)
    return root


def configure(
    project: Path,
    *,
    kind: str,
    runtime: str,
    listen: int,
    update: str,
    quarantine: str = "6s",
    extra: str = "",
) -> None:
    (project / "kiln.toml").write_text(
        TOML.format(
            kind=kind,
            runtime=runtime,
            listen=listen,
            update=update,
            quarantine=quarantine,
            extra=extra,
        )
    )


def get(port: int, path: str = APP, host: str = "127.0.0.1") -> str:
    with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=5) as resp:
        return str(resp.read().decode().strip())


def events(home: Path) -> list[dict[str, Any]]:
    """Every event so far, a page at a time (``kiln events`` prints the first 1000)."""
    found: list[dict[str, Any]] = []
    with AgentClient(home) as client:
        while page := client.events(after=found[-1]["id"] if found else 0, limit=1000):
            found.extend(page)
    return found


def ready(home: Path) -> list[dict[str, Any]]:
    return [i for i in status(home)["instances"] if i["state"] == "ready"]


def apply_in_background(home: Path, project: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [KILN, "apply", "--file", str(project), "--yes"],
        env=dict(os.environ, KILN_HOME=str(home)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def phase(home: Path) -> str:
    return str((status(home).get("rollout") or {}).get("phase") or "")


def settled(home: Path, replicas: int = 2) -> bool:
    now = status(home)
    live = [i for i in now["instances"] if i["state"] == "ready"]
    return now.get("rollout") is None and len(live) == replicas == len(now["instances"])


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    home = tmp_path / "home"
    yield home
    kiln(home, "down")


def test_progressive_delivery_quarantine_chaos_and_max_age_on_docker(
    home: Path, tmp_path: Path, docker_engine: Dockerd
) -> None:
    import docker

    listen = free_port()
    project = make_project(tmp_path / "p", "v1")
    runtime = f'host = "{docker_engine.host}"'
    configure(project, kind="docker", runtime=runtime, listen=listen, update=BLUE_GREEN)
    engine = docker.DockerClient(base_url=docker_engine.host)
    label = f"{LABEL_HOME}={home_tag(home)}"

    def containers() -> set[str]:
        """One list call: ``containers.list`` inspects each, racing with their removal."""
        return {str(c["Id"]) for c in engine.api.containers(all=True, filters={"label": label})}

    try:
        up = kiln(home, "up", str(project))
        assert up.returncode == 0, up.stderr
        assert get(listen) == "v1"
        assert len(ready(home)) == 2

        # Blue/green: green beside blue, one switch under load, then kiln rollback within
        # the hold switches back at once and starts nothing.
        write_app(project, "v2")
        with LoadGenerator("127.0.0.1", listen, path=APP, workers=4, classify=str.strip) as load:
            applying = apply_in_background(home, project)
            try:
                wait_for(lambda: phase(home) == "switched; holding blue", timeout=60)
                assert get(listen) == "v2"
                time.sleep(0.5)
                before = containers()
                assert len(before) == 4, before  # blue held beside green
                asked = time.monotonic()
                back = kiln(home, "rollback", "web")
                took = time.monotonic() - asked
                assert back.returncode == 0, back.stderr
                assert get(listen) == "v1"
                time.sleep(0.5)
            finally:
                _, err = applying.communicate(timeout=60)
        print(
            f"docker blue/green switch and instant rollback ({took:.2f}s for the CLI): "
            f"{load.report.summary()}"
        )
        assert load.report.failed == 0, load.report.errors
        assert load.report.bodies.get("v2", 0) > 0 and load.report.bodies.get("v1", 0) > 0
        assert "rolled back" in err or "rolled_back" in err, err
        assert containers() <= before, "kiln rollback during the hold started a container"
        wait_for(lambda: settled(home), timeout=30)
        kinds = [e["kind"] for e in events(home)]
        assert "bluegreen.switched" in kinds and "rollback.instant" in kinds

        # Canary: a revision answering 500 to a quarter of requests gets 20% of them and is
        # aborted by analysis of the router's counters, well under the bound.
        configure(project, kind="docker", runtime=runtime, listen=listen, update=CANARY)
        write_app(project, "v3", FLAKY)
        with LoadGenerator("127.0.0.1", listen, path=APP, workers=4) as load:
            time.sleep(0.5)
            began = time.monotonic()
            canary = kiln(home, "apply", "--file", str(project), "--yes")
            seconds = time.monotonic() - began
            time.sleep(0.3)
        assert canary.returncode != 0, canary.stdout
        aborted = [e for e in events(home) if e["kind"] == "canary.aborted"]
        assert len(aborted) == 1, aborted
        numbers = aborted[0]["data"]["analysis"]
        reason = aborted[0]["data"]["reason"]
        assert "max_error_rate" in reason or "× stable" in reason, reason  # 1 in 20: the ratio
        assert numbers["canary"]["requests"] >= 20 and numbers["canary"]["error_rate"] > 0.02
        bound = 0.20 * (load.report.sent / seconds) * 20.0
        print(
            f"docker bad canary: {load.report.failed} failed requests before the abort "
            f"(the canary answered {numbers['canary']['requests']}); bound weight × rate × "
            f"pause = {bound:.0f}; {load.report.summary()}"
        )
        assert 0 < load.report.failed < bound
        wait_for(lambda: settled(home), timeout=30)
        assert get(listen) == "v1"

        # Quarantine: an instance turned unhealthy leaves the rotation, is paused, its
        # evidence is written, and it is destroyed when the window (6s) closes.
        suspect = ready(home)[0]
        engine.containers.get(suspect["container"]).exec_run(["/bin/touch", "/data/sick"])
        with LoadGenerator("127.0.0.1", listen, path=APP, workers=2) as load:

            def quarantined() -> dict[str, Any] | None:
                return next(
                    (
                        e
                        for e in events(home)
                        if e["kind"] == "instance.quarantined" and e["instance"] == suspect["id"]
                    ),
                    None,
                )

            wait_for(lambda: quarantined() is not None, timeout=30)
            event = quarantined()
            assert event is not None and event["data"]["frozen"] is True, event
            paused = engine.api.inspect_container(suspect["container"])["State"]["Paused"]
            assert paused is True
            bundle = tmp_path / "evidence.tar.gz"
            exported = kiln(home, "evidence", suspect["id"], "-o", str(bundle))
            assert exported.returncode == 0, exported.stderr
            with tarfile.open(bundle) as tar:
                names = set(tar.getnames())
                writable = tar.extractfile("writable.tar")
                assert writable is not None
                with tarfile.open(fileobj=io.BytesIO(writable.read())) as inner:
                    kept = inner.getnames()
            assert {"manifest.json", "logs.jsonl", "processes.json", "writable.tar"} <= names
            assert any("data" in n for n in kept), kept
            wait_for(lambda: suspect["container"] not in containers(), timeout=30)
            wait_for(lambda: settled(home), timeout=30)
        print(f"docker quarantine: {load.report.summary()}")
        assert load.report.failed == 0, load.report.errors

        # kiln burn: the evidence first, then replaced.
        burnt = ready(home)[0]
        burn = kiln(home, "burn", burnt["id"], "--keep-evidence")
        assert burn.returncode == 0, burn.stderr
        assert (home / "evidence" / f"{burnt['id']}.tar.gz").is_file()
        wait_for(lambda: burnt["container"] not in containers() and settled(home), timeout=30)

        # kiln chaos kill: docker kill of a container under load; the report says how
        # fast the service was whole again and that the hypothesis held.
        chaos = kiln(home, "chaos", "kill", "--service", "web", "--path", APP, "--json")
        assert chaos.returncode == 0, chaos.stdout + chaos.stderr
        report = json.loads(chaos.stdout)
        assert report["runtime"] == "docker" and report["held"] is True, report
        fault = report["faults"][0]
        assert fault["recovered"] and fault["replaced"] and "docker kill" in fault["detail"]
        print(
            f"docker chaos kill: recovered in {fault['recovery_seconds']:.2f}s, "
            f"{report['requests']['failed']} of {report['requests']['sent']} requests failed"
        )
        wait_for(lambda: settled(home), timeout=30)

        # max_age: every instance replaced for its age, a batch at a time, no failed request.
        configure(
            project,
            kind="docker",
            runtime=runtime,
            listen=listen,
            update=ROLLING,
            extra='max_age = "10s"',
        )
        write_app(project, "v4")
        assert kiln(home, "apply", "--file", str(project), "--yes").returncode == 0
        first = {i["id"] for i in ready(home)}
        with LoadGenerator("127.0.0.1", listen, path=APP, workers=4) as load:

            def aged_out() -> bool:
                aged = {e["instance"] for e in events(home) if e["kind"] == "instance.aged"}
                return (
                    first <= aged and settled(home) and not first & {i["id"] for i in ready(home)}
                )

            wait_for(aged_out, timeout=60)
        print(f"docker max_age churn: {load.report.summary()}")
        assert load.report.sent > 100
        assert load.report.failed == 0, load.report.errors
        assert get(listen) == "v4"

        down = kiln(home, "down")
        assert down.returncode == 0, down.stderr
        assert containers() == set()
    finally:
        kiln(home, "down")
        engine.close()


def test_a_canary_on_swarm_is_planned_by_kiln_plan_without_an_agent(
    home: Path, tmp_path: Path
) -> None:
    """The CLI's own plan (no agent runs) takes a canary on swarm (its edges report their
    counters while it is judged, docs/strategies.md), and starts no agent."""
    project = make_project(tmp_path / "p", "v1")
    swarm = 'host = "unix:///nonexistent/docker.sock"\nregistry = "127.0.0.1:5000/kiln"'
    configure(project, kind="swarm", runtime=swarm, listen=free_port(), update=CANARY)
    planned = kiln(home, "plan", str(project))
    assert planned.returncode == 2, planned.stderr  # 2: the plan has changes
    assert "error" not in planned.stderr, planned.stderr
    assert "web" in planned.stdout, planned.stdout
    assert not (home / "agent.sock").exists()
