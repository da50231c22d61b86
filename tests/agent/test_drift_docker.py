"""Drift detection on the docker runtime (issue 12 item 3): a real agent on a private
Docker Engine finds a file written into a container's layer, a container restarted or
replaced behind its back, and a container that claims to be one of its instances."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
from agent_harness import ImageFactory, RunningAgent, _free_port, deploy, service_spec, wait_for

from dockerd import Dockerd, docker_engine, tear_down
from kiln.agent.client import AgentClient, start_background
from kiln.observe.load import LoadGenerator
from kiln.oci.runc import home_tag
from kiln.process import pid_alive
from kiln.runtime import DriftExpectation, DriftFinding, InstanceSpec
from kiln.runtime.docker import LABEL_HOME, LABEL_INSTANCE, DockerRuntime
from kiln.runtime.select import RuntimeChoice

__all__ = ["docker_engine"]

pytestmark = [
    pytest.mark.docker,
    pytest.mark.skipif(os.geteuid() != 0, reason="the private engine needs root"),
]

V1 = {"healthz": "ok\n", "index.html": "v1\n"}


@pytest.fixture
def api(docker_engine: Dockerd) -> Iterator[Any]:
    client = docker.APIClient(base_url=docker_engine.host, version="auto")
    yield client
    client.close()


def _start_agent(home: Path, engine: Dockerd) -> None:
    start_background(home, runtime=RuntimeChoice("docker", engine.host))


@pytest.fixture
def docker_agent(kiln_home: Path, docker_engine: Dockerd) -> Iterator[RunningAgent]:
    """An agent whose runtime is the session's private engine; torn down with every
    container of its home."""
    _start_agent(kiln_home, docker_engine)
    client = AgentClient(kiln_home)
    try:
        yield RunningAgent(kiln_home, client)
    finally:
        with contextlib.suppress(Exception):
            if client.running():
                client.down()
                wait_for(lambda: not client.running(), 10, "the agent down")
        client.close()
        with contextlib.suppress(OSError, ValueError):
            pid = int((kiln_home / "agent.pid").read_text().strip())
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        from kiln.traffic.haproxy import HAProxyRouter

        with contextlib.suppress(Exception):
            HAProxyRouter(kiln_home).stop()
        tear_down(DockerRuntime(kiln_home, docker_engine.host))


def _ready(agent: RunningAgent) -> set[str]:
    instances = agent.client.status()["services"]["web"]["instances"]
    return {str(i["id"]) for i in instances if i["state"] == "ready"}


def _events(agent: RunningAgent, kind: str) -> list[dict[str, Any]]:
    return [e for e in agent.client.events() if e["kind"] == kind]


def _container(api: Any, home: Path, instance: str) -> dict[str, Any]:
    """The inspect data of the running container of ``instance`` in ``home``."""
    labels = [f"{LABEL_HOME}={home_tag(home)}", f"{LABEL_INSTANCE}={instance}"]
    [found] = api.containers(filters={"label": labels})
    attrs: dict[str, Any] = api.inspect_container(found["Id"])
    return attrs


def _layer(api: Any, home: Path, instance: str) -> Path:
    """The container's writable layer on the host (overlay2's upper dir): the only way in,
    as the root is read-only and a privileged exec is refused (no-new-privileges)."""
    return Path(_container(api, home, instance)["GraphDriver"]["Data"]["UpperDir"])


def _exec(api: Any, container: str, script: str) -> tuple[int, str]:
    run = api.exec_create(container, ["sh", "-c", script])
    out = api.exec_start(run["Id"]).decode()
    return int(api.exec_inspect(run["Id"])["ExitCode"]), out


def test_a_file_written_into_a_container_layer_replaces_it_with_no_failed_request(
    docker_agent: RunningAgent, busybox_image: ImageFactory, api: Any
) -> None:
    digest = busybox_image("web:v1", V1)
    listen = _free_port()
    spec = service_spec(digest, listen=listen, replicas=2, drift_interval="1s",
                        writable=["/data"], drift_ignore=["/www/cache/**"])  # fmt: skip
    assert deploy(docker_agent.client, spec)["outcome"] == "succeeded"
    home = docker_agent.home
    victim, other = sorted(_ready(docker_agent))
    other_id = _container(api, home, other)["Id"]
    code, out = _exec(api, other_id, "echo x > /data/kept && echo y > /tmp/kept")
    assert code == 0, out
    code, out = _exec(api, other_id, "echo z > /www/planted")
    assert code != 0 and "Read-only file system" in out
    (_layer(api, home, other) / "www" / "cache").mkdir(parents=True)
    (_layer(api, home, other) / "www" / "cache" / "page").write_text("ignored\n")
    time.sleep(2.5)  # two passes: writable paths and ignored globs are not drift
    assert _ready(docker_agent) == {victim, other}
    assert not _events(docker_agent, "instance.drift")

    with LoadGenerator("127.0.0.1", listen, workers=4) as load:
        time.sleep(0.3)
        layer = _layer(api, home, victim)
        (layer / "www").mkdir(exist_ok=True)
        (layer / "www" / "planted.sh").write_text("#!/bin/sh\n")
        injected = time.monotonic()
        wait_for(lambda: victim not in _ready(docker_agent) and len(_ready(docker_agent)) == 2,
                 30, "the drifted container replaced")  # fmt: skip
        seconds = time.monotonic() - injected
        time.sleep(0.3)
    assert other in _ready(docker_agent), "an instance with only allowed writes was replaced"
    [event] = _events(docker_agent, "instance.drift")
    assert event["instance"] == victim and event["data"]["what"] == "files"
    assert event["data"]["files"] == [
        {"path": "/www/planted.sh", "change": "added", "detail": "file, 10 bytes"}
    ]
    assert event["data"]["action"].startswith("replaced by ")
    assert load.report.sent > 50
    assert load.report.failed == 0, load.report.errors
    print(f"\nFIGURE docker drift injection → replacement ready (1s interval): {seconds:.2f}s, "
          f"{load.report.sent} requests, {load.report.failed} failed")  # fmt: skip


def test_on_drift_warn_only_warns_on_docker(
    docker_agent: RunningAgent, busybox_image: ImageFactory, api: Any
) -> None:
    digest = busybox_image("web:v1", V1)
    spec = service_spec(digest, listen=_free_port(), replicas=1, drift_interval="0.5s",
                        on_drift="warn")  # fmt: skip
    assert deploy(docker_agent.client, spec)["outcome"] == "succeeded"
    [iid] = _ready(docker_agent)
    www = _layer(api, docker_agent.home, iid) / "www"
    www.mkdir(exist_ok=True)
    os.mknod(www / "index.html", 0o600 | 0o020000, os.makedev(0, 0))  # an overlay whiteout
    wait_for(lambda: _events(docker_agent, "instance.drift"), 20, "the drift warning")
    time.sleep(2.0)  # four more passes: still one event, still the same instance
    assert _ready(docker_agent) == {iid}
    [event] = _events(docker_agent, "instance.drift")
    assert event["data"]["action"] == "warned"
    assert event["data"]["files"] == [
        {"path": "/www/index.html", "change": "removed", "detail": "deleted from the image"}
    ]
    assert not _events(docker_agent, "reconcile.replace")


def test_a_container_started_by_hand_with_the_homes_labels_is_extra_and_removed(
    docker_agent: RunningAgent, busybox_image: ImageFactory, api: Any
) -> None:
    digest = busybox_image("web:v1", V1)
    spec = service_spec(digest, listen=_free_port(), replicas=1, drift_interval="0.5s")
    assert deploy(docker_agent.client, spec)["outcome"] == "succeeded"
    real = _ready(docker_agent)
    image = _container(api, docker_agent.home, next(iter(real)))["Image"]
    labels = {LABEL_HOME: home_tag(docker_agent.home), LABEL_INSTANCE: "web-impostor",
              "dev.kiln.service": "web", "dev.kiln.port": "8080"}  # fmt: skip
    impostor = api.create_container(image, command=["sleep", "600"], labels=labels)["Id"]
    try:
        api.start(impostor)
        wait_for(lambda: not api.containers(all=True, filters={"id": impostor}), 20,
                 "the impostor removed")  # fmt: skip
        wait_for(lambda: _events(docker_agent, "instance.drift"), 10, "the drift event")
        [event] = _events(docker_agent, "instance.drift")
        assert event["instance"] == "web-impostor" and event["service"] == "web"
        assert event["data"]["what"] == "extra" and event["data"]["action"] == "removed"
        assert _ready(docker_agent) == real
    finally:
        with contextlib.suppress(docker.errors.NotFound):
            api.remove_container(impostor, force=True)


def test_containers_restarted_or_recreated_behind_kilns_back_are_replaced(
    docker_agent: RunningAgent, busybox_image: ImageFactory, api: Any, docker_engine: Dockerd
) -> None:
    """While the agent is down (so no watcher sees the restart): one container restarted
    is process drift; one removed and recreated under its name is lost, and the
    recreated container is an extra."""
    digest = busybox_image("web:v1", V1)
    spec = service_spec(digest, listen=_free_port(), replicas=2, drift_interval="0.5s")
    assert deploy(docker_agent.client, spec)["outcome"] == "succeeded"
    home = docker_agent.home
    restarted, recreated = sorted(_ready(docker_agent))
    old = _container(api, home, recreated)
    os.kill(docker_agent.pid(), signal.SIGKILL)
    wait_for(lambda: not docker_agent.client.running(), 10, "the agent dead")
    api.restart(_container(api, home, restarted)["Id"], timeout=1)
    api.remove_container(old["Id"], force=True)
    twin = api.create_container(old["Image"], command=["sleep", "600"], name=old["Name"][1:],
                                labels=old["Config"]["Labels"])["Id"]  # fmt: skip
    api.start(twin)
    _start_agent(home, docker_engine)

    def settled() -> bool:
        ready = _ready(docker_agent)
        return len(ready) == 2 and not ready & {restarted, recreated}

    wait_for(settled, 40, "both replaced")
    wait_for(lambda: not api.containers(all=True, filters={"id": twin}), 10, "the twin removed")
    drifts = {e["instance"]: e["data"] for e in _events(docker_agent, "instance.drift")}
    assert drifts[restarted]["what"] == "process"
    assert "restarted" in drifts[restarted]["detail"]
    assert drifts[recreated]["what"] == "extra" and drifts[recreated]["action"] == "removed"
    assert recreated in {e["instance"] for e in _events(docker_agent, "instance.lost")}


def test_the_runtime_check_reads_the_layer_and_falls_back_to_the_engines_diff(
    kiln_home: Path, busybox_image: ImageFactory, docker_engine: Dockerd, api: Any
) -> None:
    """DockerRuntime.check_drift alone: a fresh container (writable paths, secrets,
    docker-init) is clean both ways; a changed env or image is config drift; a file at
    the layer's root is found both ways; a restart is process drift."""
    digest = busybox_image("web:v1", V1)
    runtime = DockerRuntime(kiln_home, docker_engine.host)
    try:
        spec = InstanceSpec(
            "web-check", "web", 3, digest, ["httpd", "-f", "-p", "8080", "-h", "/www"], None,
            "/www", {"PORT": "8080", "MODE": "prod"}, 8080, writable=("/data", "/var/cache"),
            secrets={"token": b"t0ken"},
        )  # fmt: skip
        handle = runtime.start(spec)
        expected = DriftExpectation(digest, 3, {"MODE": "prod"}, ("/data", "/var/cache"))
        assert runtime.check_drift(handle, expected) is None
        runtime.local_engine = False  # as for a remote engine: the engine's diff
        assert runtime.check_drift(handle, expected) is None
        runtime.local_engine = True

        changed_env = DriftExpectation(digest, 3, {"MODE": "debug"}, ())
        assert runtime.check_drift(handle, changed_env) == DriftFinding(
            "config", "env MODE is not the revision's"
        )
        other = DriftExpectation("sha256:" + "0" * 64, 3, {}, ())
        found = runtime.check_drift(handle, other)
        assert found is not None and found.what == "config"

        (_layer(api, kiln_home, "web-check") / "planted").write_text("x")
        for local in (True, False):
            runtime.local_engine = local
            found = runtime.check_drift(handle, expected)
            assert found is not None and found.what == "files", (local, found)
            assert [(f.path, f.change) for f in found.files] == [("/planted", "added")]
        runtime.local_engine = True

        api.restart(handle.data["container_id"], timeout=1)
        found = runtime.check_drift(handle, expected)
        assert found is not None and found.what == "process" and "restarted" in found.detail
    finally:
        tear_down(runtime)


def _kiln(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sys.executable).with_name("kiln")), *args],
        capture_output=True, text=True, env={**os.environ, "KILN_HOME": str(home)}, timeout=120,
    )  # fmt: skip


def test_kiln_drift_reports_file_by_file_on_docker(
    docker_agent: RunningAgent, busybox_image: ImageFactory, api: Any
) -> None:
    digest = busybox_image("web:v1", V1)
    spec = service_spec(digest, listen=_free_port(), replicas=2, drift_interval="1h",
                        on_drift="warn")  # fmt: skip
    assert deploy(docker_agent.client, spec)["outcome"] == "succeeded"
    home = docker_agent.home
    clean = _kiln(home, "drift", "--json")
    assert clean.returncode == 0, clean.stderr
    report = json.loads(clean.stdout)
    assert report["drift"] == [] and report["instances_checked"] == 2, report
    per = [json.loads(_kiln(home, "drift", "--json").stdout) for _ in range(3)]
    cpu = min(r["cpu_seconds"] / r["instances_checked"] for r in per) * 1000
    print(f"\nFIGURE docker drift check CPU per instance per pass (agent): {cpu:.2f} ms")

    victim = sorted(_ready(docker_agent))[0]
    layer = _layer(api, home, victim)
    (layer / "etc").mkdir(exist_ok=True)
    (layer / "etc" / "cron").write_text("* * * * * evil\n")
    (layer / "www").mkdir(exist_ok=True)
    (layer / "www" / "index.html").write_text("defaced\n")
    found = _kiln(home, "drift", "web")
    assert found.returncode == 2, found.stderr
    assert f"web/{victim}: files" in found.stdout
    assert "added    /etc/cron" in found.stdout
    as_json = json.loads(_kiln(home, "drift", "--json").stdout)
    [drift] = as_json["drift"]
    assert drift["instance"] == victim and drift["files_total"] == 2
    assert [(f["path"], f["change"]) for f in drift["files"]] == [
        ("/etc/cron", "added"),
        ("/www/index.html", "changed"),
    ]
