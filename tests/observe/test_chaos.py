"""kiln chaos on the local runtime: a busybox service of 3 instances brought up through
the real CLI and agent; each fault injected for real (SIGKILL, runc pause, a file in
the root's upper dir, a qdisc in the instance's netns) and the healing measured."""

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

import pytest

import busybox_tree
from kiln.agent.client import AgentClient
from kiln.errors import KilnError
from kiln.observe.chaos import (
    ChaosPlan,
    ChaosRefused,
    LocalInjector,
    injector_for,
    render_report,
    run_chaos,
)

pytestmark = pytest.mark.e2e

KILN = str(Path(sys.executable).parent / "kiln")

TOML = """\
[project]
name = "chaos"

[images.web]
from = "scratch"
steps = [{{ copy = "rootfs/", to = "/" }}]
cmd = ["/bin/sh", "-c", "exec httpd -f -p $PORT -h /www"]
user = "65534:65534"

[services.web]
image = "web"
replicas = 3
listen = {listen}
health = {{ http = "/healthz", interval = "0.5s", timeout = "1s" }}
stop_grace = "1s"
drain_timeout = "1s"
update = {{ min_healthy_time = "0.5s" }}
heal = {{ meltdown_fraction = 10.0 }}
"""


def kiln(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, KILN_HOME=str(home))
    env.pop("KILN_ADDR", None)
    return subprocess.run([KILN, *args], env=env, text=True, capture_output=True, timeout=300)


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("chaos")
    home = root / "home"
    project = root / "p"
    busybox_tree.build_busybox_rootfs(
        project / "rootfs",
        www={"healthz": "ok\n", "index.html": "hello\n"},
        applets=("sh", "httpd"),
        users=False,
    )
    (project / "kiln.toml").write_text(TOML.format(listen=busybox_tree.free_port()))
    up = kiln(home, "up", str(project))
    assert up.returncode == 0, up.stderr
    try:
        yield home
    finally:
        kiln(home, "down")


def status(home: Path) -> dict[str, Any]:
    with AgentClient(home, addr="") as client:
        return client.status()


def web(home: Path) -> dict[str, Any]:
    return dict(status(home)["services"]["web"])


def wait_steady(home: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        svc = web(home)
        ready = [i for i in svc["instances"] if i["state"] == "ready"]
        if len(ready) == 3 and all(i["state"] == "ready" for i in svc["instances"]):
            return
        time.sleep(0.1)
    raise AssertionError("web never got back to 3 ready instances")


def chaos(home: Path, kind: str, **kw: Any) -> Any:
    wait_steady(home)
    plan = ChaosPlan(kind=kind, service="web", probe=1.0, recovery_timeout=30.0, **kw)
    return run_chaos(plan, home, status=lambda: status(home))


def test_kill_is_healed_by_replacement_with_recovery_measured(home: Path) -> None:
    before = {i["id"] for i in web(home)["instances"]}
    report = chaos(home, "kill", count=2, every=0.5)
    assert report.before.held and report.before.sent > 0
    assert len(report.faults) == 2
    assert report.faults[0].instance in before
    assert report.faults[0].instance != report.faults[1].instance
    for fault in report.faults:
        assert fault.recovered and fault.replaced
        assert fault.recovery_seconds is not None and 0 < fault.recovery_seconds < 30
        assert fault.detail.startswith("SIGKILL to pid ")
        assert fault.sent > 0
    now = {i["id"] for i in web(home)["instances"] if i["state"] == "ready"}
    assert not now & {f.instance for f in report.faults}, "a killed instance is still listed"
    assert report.after is not None and report.after.held
    assert report.held
    median, p95 = report.recovery
    assert median is not None and p95 is not None and median <= p95
    assert report.sent > 100
    # The router retries or drains: a kill costs at most a few in-flight requests.
    assert report.failed <= 5, report.to_json()
    text = render_report(report)
    assert "time to recovery: median" in text and "hypothesis after: held" in text


def test_pause_freezes_for_the_duration_then_thaws(home: Path) -> None:
    report = chaos(home, "pause", duration=1.5)
    (fault,) = report.faults
    assert fault.detail.startswith("runc pause kiln-")
    assert fault.recovered
    assert fault.recovery_seconds is not None and fault.recovery_seconds >= 1.5
    # No request failed: those routed to the frozen instance waited for the thaw, or the
    # health check had taken it out of rotation first (which of the two is timing).
    assert fault.failed == 0, fault
    assert report.after is not None and report.after.held
    wait_steady(home)
    if not fault.replaced:  # thawed and kept: it answers again
        state = subprocess.run(
            ["runc", "--root", *_runc_root(home), "state", _container(home, fault.instance)],
            capture_output=True,
            text=True,
        )
        assert json.loads(state.stdout)["status"] == "running"


def _runc_root(home: Path) -> list[str]:
    from kiln.oci.runc import Runc

    return [str(Runc(home).root)]


def _container(home: Path, iid: str) -> str:
    from kiln.runtime.local import LocalRuntime

    return LocalRuntime(home).container_id(iid)


def test_latency_shows_in_the_loads_p95_and_is_lifted(home: Path) -> None:
    report = chaos(home, "latency", duration=2.0, delay=0.2)
    (fault,) = report.faults
    assert "netem delay 200ms" in fault.detail or "tbf rate" in fault.detail
    assert fault.recovered
    assert fault.p95_ms > 100, fault
    assert report.before.held and report.after is not None and report.after.held
    victim = next((i for i in web(home)["instances"] if i["id"] == fault.instance), None)
    if victim is not None:  # still there: the qdisc is gone from its interfaces
        shown = subprocess.run(
            ["nsenter", f"--net=/proc/{victim['pid']}/ns/net", "tc", "qdisc", "show"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert "netem" not in shown and "tbf" not in shown, shown


def test_drift_file_in_the_root_is_replaced_or_reported_not_detected(home: Path) -> None:
    report = chaos(home, "drift", count=1)
    (fault,) = report.faults
    assert "wrote /.kiln-chaos-drift-" in fault.detail
    assert fault.detected is fault.replaced
    if fault.detected:
        assert fault.recovered and report.held
    else:
        # Nothing replaced it: the report says so and the file is taken out again.
        assert not fault.recovered and not report.held
        assert "drift not detected" in render_report(report)
        victim = next(i for i in web(home)["instances"] if i["id"] == fault.instance)
        name = fault.detail.split("/", 1)[1].split()[0]
        root = Path(f"/proc/{victim['pid']}/root")
        assert not (root / name).exists()


def test_refuses_when_an_instance_is_unhealthy(home: Path) -> None:
    wait_steady(home)
    victim = web(home)["instances"][0]
    children = Path(f"/proc/{victim['pid']}/task/{victim['pid']}/children").read_text().split()
    app = int(children[0])
    ids = {i["id"] for i in web(home)["instances"]}
    os.kill(app, signal.SIGSTOP)
    try:
        # The agent heals what it sees: the status is read once, at a moment the frozen
        # instance shows unsteady (unhealthy, or its replacement starting), so the
        # replacement cannot finish between the look and the check under a loaded CI.
        def unsteady() -> dict[str, Any] | None:
            seen = status(home)
            svc = seen["services"]["web"]
            mine = next((i for i in svc["instances"] if i["id"] == victim["id"]), None)
            moving = any(i["state"] != "ready" for i in svc["instances"])
            if mine is not None and (mine["health"] == "unhealthy" or moving):
                return seen
            return None

        deadline = time.monotonic() + 20
        seen = unsteady()
        while seen is None and time.monotonic() < deadline:
            time.sleep(0.02)
            seen = unsteady()
        assert seen is not None, "the frozen instance never showed unhealthy"
        plan = ChaosPlan(kind="kill", service="web", probe=0.5)
        with pytest.raises(ChaosRefused, match="steady state of web does not hold"):
            run_chaos(plan, home, status=lambda: seen)
        assert {i["id"] for i in web(home)["instances"]} >= ids - {victim["id"]}
    finally:
        with contextlib.suppress(ProcessLookupError):  # replaced and gone meanwhile
            os.kill(app, signal.SIGCONT)
    wait_steady(home)


def test_refuses_when_the_probe_load_fails(home: Path) -> None:
    wait_steady(home)
    before = {i["id"] for i in web(home)["instances"]}
    plan = ChaosPlan(kind="kill", service="web", probe=0.5, path="/no-such-page")
    with pytest.raises(ChaosRefused, match=r"probe requests failed .*HTTP 404"):
        run_chaos(plan, home, status=lambda: status(home))
    assert {i["id"] for i in web(home)["instances"]} == before, "something was injected"


def test_bad_input_is_one_clear_error(home: Path) -> None:
    get = lambda: status(home)  # noqa: E731
    for plan, message in (
        (ChaosPlan(kind="nuke", service="web"), "unknown fault 'nuke'"),
        (ChaosPlan(kind="kill", service="web", count=0), "--count"),
        (ChaosPlan(kind="pause", service="web", duration=0), "--duration"),
        (ChaosPlan(kind="kill", service="web", path="x y"), "--path"),
        (ChaosPlan(kind="kill", service="nope"), "no service 'nope'"),
    ):
        with pytest.raises(KilnError, match=message):
            run_chaos(plan, home, status=get)
    with pytest.raises(KilnError, match="chaos pause: not supported on the swarm runtime"):
        injector_for("swarm", home, "pause")
    local = LocalInjector(home)
    for hostile in ("../../etc", "..", "a/b", ""):
        with pytest.raises(KilnError, match="not an instance id"):
            local.kill({"id": hostile})
    with pytest.raises(KilnError, match="no handle on this machine"):
        local.kill({"id": "web-doesnotexist"})


def test_the_cli_reports_json_and_refuses_with_one_line(home: Path) -> None:
    wait_steady(home)
    ran = kiln(home, "chaos", "kill", "--service", "web", "--json", "--timeout", "30s")
    assert ran.returncode == 0, ran.stderr
    data = json.loads(ran.stdout)
    assert set(data) == {
        "service", "kind", "runtime", "hypothesis", "faults", "recovery", "requests",
        "latency_ms", "held",
    }  # fmt: skip
    assert data["service"] == "web" and data["kind"] == "kill" and data["runtime"] == "local"
    assert data["held"] is True
    assert data["hypothesis"]["before"]["held"] and data["hypothesis"]["after"]["held"]
    (fault,) = data["faults"]
    assert fault["recovered"] and fault["recovery_seconds"] > 0 and fault["at"] > 0
    assert data["recovery"]["median_seconds"] == fault["recovery_seconds"]
    assert data["requests"]["sent"] > 0

    wait_steady(home)
    refused = kiln(home, "chaos", "kill", "--service", "web", "--path", "/missing")
    assert refused.returncode == 1
    assert refused.stderr.strip().count("\n") == 0, refused.stderr
    assert refused.stderr.startswith("error: steady state of web does not hold")
    bad = kiln(home, "chaos", "kill", "--service", "web", "--every", "soon")
    assert bad.returncode == 1 and "--every:" in bad.stderr
