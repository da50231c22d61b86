"""Quarantine and burn on real sandboxes: an instance replaced for unhealth leaves the
routes, is frozen (its counter stops), its evidence is written and checked, it is
destroyed when the window closes; kiln burn and kiln evidence; pruning."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from agent_harness import ImageFactory, RunningAgent, deploy, service_spec, wait_for

from kiln.agent.client import start_background
from kiln.agent.quarantine import evidence_path, export_evidence, prune_evidence
from kiln.errors import KilnError
from kiln.process import pid_alive
from kiln.runtime.local import LocalRuntime

KILN = str(Path(sys.executable).parent / "kiln")
COUNTING_APP = [
    "/bin/sh",
    "-c",
    "mkdir -p /data/www; echo ok > /data/www/healthz; echo q > /data/www/index.html; "
    "(i=0; while :; do i=$((i+1)); echo $i > /data/counter; sleep 0.05; done) & "
    "exec httpd -f -p $PORT -h /data/www",
]


def _counter(pid: int) -> int:
    return int(Path(f"/proc/{pid}/root/data/counter").read_text().strip() or 0)


def _event(agent: RunningAgent, kind: str, instance: str) -> dict[str, object] | None:
    found = [e for e in agent.client.events(limit=10_000) if e["kind"] == kind]
    return next((e for e in found if e["instance"] == instance), None)


@pytest.mark.e2e
def test_unhealthy_instance_is_frozen_kept_as_evidence_then_destroyed(
    agent: RunningAgent, busybox_image: ImageFactory, free_port: Callable[[], int], tmp_path: Path
) -> None:
    digest = busybox_image("q:v1", {"index.html": "q\n"}, cmd=COUNTING_APP)
    spec = service_spec(digest, listen=free_port(), replicas=2, writable=["/data"], quarantine="4s")
    done = deploy(agent.client, spec)
    assert done["outcome"] == "succeeded", (done, agent.client.events(limit=10_000)[-8:])
    web = agent.client.status()["services"]["web"]["instances"]
    suspect = web[0]["id"]
    handle = LocalRuntime(agent.home).handle_for(suspect)
    assert handle is not None
    pid = int(handle.data["sandbox_pid"])
    wait_for(lambda: _counter(pid) > 3, 10, "the counter to advance")

    agent.client.exec(suspect, ["rm", "/data/www/healthz"], 10.0)
    wait_for(lambda: _event(agent, "instance.quarantined", suspect), 20, "the quarantine")

    # Frozen: the counter no longer advances, and the process is still there.
    first = _counter(pid)
    time.sleep(0.6)
    assert _counter(pid) == first and pid_alive(pid)
    states = {i["id"]: i["state"] for i in agent.client.status()["services"]["web"]["instances"]}
    assert states[suspect] == "draining", states  # out of the routes, not destroyed

    bundle = evidence_path(agent.home, suspect)
    assert oct(bundle.stat().st_mode & 0o777) == "0o600"
    with tarfile.open(bundle) as tar:
        names = set(tar.getnames())
        manifest = json.loads(tar.extractfile("manifest.json").read())  # type: ignore[union-attr]
        processes = json.loads(tar.extractfile("processes.json").read())  # type: ignore[union-attr]
        network = json.loads(tar.extractfile("network.json").read())  # type: ignore[union-attr]
        inner = tar.extractfile("writable.tar")
        assert inner is not None
        with tarfile.open(fileobj=inner) as writable:
            files = set(writable.getnames())
    assert {"manifest.json", "writable.tar", "processes.json", "network.json"} <= names
    assert set(manifest["files"]) == names - {"manifest.json"}
    assert manifest["reason"].startswith("unhealthy")
    assert {"data/counter", "data/www/index.html"} <= files and "data/www/healthz" not in files
    assert any("httpd" in " ".join(p["cmdline"]) for p in processes), processes
    assert any(s.endswith(":8080") for s in network["listening"]), network

    out = tmp_path / "out.tar.gz"
    exported = subprocess.run(
        [KILN, "evidence", suspect, "-o", str(out)],
        env={**os.environ, "KILN_HOME": str(agent.home)},
        text=True,
        capture_output=True,
        timeout=60,
    )
    assert exported.returncode == 0, exported.stderr
    assert out.read_bytes() == bundle.read_bytes()

    # The window closes: destroyed, and the service is back at two ready instances.
    wait_for(lambda: _event(agent, "instance.stopped", suspect), 20, "the window to close")
    wait_for(lambda: not pid_alive(pid), 10, "the frozen process to be gone")

    def two_ready() -> bool:
        live = agent.client.status()["services"]["web"]["instances"]
        return sum(1 for i in live if i["state"] == "ready") == 2

    wait_for(two_ready, 20, "two ready instances")


@pytest.mark.e2e
def test_an_agent_sigkill_during_a_window_keeps_the_instance_frozen_until_its_deadline(
    agent: RunningAgent, busybox_image: ImageFactory, free_port: Callable[[], int], kiln_home: Path
) -> None:
    digest = busybox_image("q:v1", {"index.html": "q\n"}, cmd=COUNTING_APP)
    spec = service_spec(
        digest,
        listen=free_port(),
        replicas=1,
        writable=["/data"],
        quarantine="6s",
        update={"min_healthy_time": "0.2s", "healthy_deadline": "20s", "progress_deadline": "30s"},
    )
    assert deploy(agent.client, spec)["outcome"] == "succeeded"
    [suspect] = [i["id"] for i in agent.client.status()["services"]["web"]["instances"]]
    handle = LocalRuntime(agent.home).handle_for(suspect)
    assert handle is not None
    pid = int(handle.data["sandbox_pid"])
    agent.client.exec(suspect, ["rm", "/data/www/healthz"], 10.0)
    taken = wait_for(lambda: _event(agent, "instance.quarantined", suspect), 20, "quarantine")

    os.kill(agent.pid(), signal.SIGKILL)
    time.sleep(0.3)
    start_background(kiln_home)
    resumed = wait_for(
        lambda: _event(agent, "instance.quarantine_resumed", suspect), 15, "the window resumed"
    )
    left = float(resumed["data"]["left"])  # type: ignore[index]
    assert 0 < left < 6, resumed
    # Still there, still frozen, still out of the routes: not retired by the new agent.
    first = _counter(pid)
    time.sleep(0.5)
    assert pid_alive(pid) and _counter(pid) == first
    states = {i["id"]: i["state"] for i in agent.client.status()["services"]["web"]["instances"]}
    assert states[suspect] == "draining", states

    stopped = wait_for(lambda: _event(agent, "instance.stopped", suspect), 20, "the deadline")
    held = float(stopped["ts"]) - float(taken["ts"])  # type: ignore[arg-type]
    assert 5.5 <= held <= 9.0, f"the window lasted {held:.1f}s, not 6s"
    wait_for(lambda: not pid_alive(pid), 10, "the frozen process to be gone")


@pytest.mark.e2e
def test_burn_replaces_now_and_keeps_evidence_when_asked(
    agent: RunningAgent, busybox_image: ImageFactory, free_port: Callable[[], int]
) -> None:
    digest = busybox_image("q:v1", {"index.html": "q\n"}, cmd=COUNTING_APP)
    spec = service_spec(digest, listen=free_port(), replicas=2, writable=["/data"])
    assert deploy(agent.client, spec)["outcome"] == "succeeded"
    first, second = (i["id"] for i in agent.client.status()["services"]["web"]["instances"])

    kept = agent.client.burn(first, keep_evidence=True)
    assert kept["evidence"] == str(evidence_path(agent.home, first))
    assert Path(kept["evidence"]).is_file()
    burnt = agent.client.burn(second, keep_evidence=False)
    assert burnt["evidence"] is None and not evidence_path(agent.home, second).exists()
    with pytest.raises(KilnError, match="no running instance"):
        agent.client.burn(second, keep_evidence=False)

    def replaced() -> bool:
        live = agent.client.status()["services"]["web"]["instances"]
        ready = {i["id"] for i in live if i["state"] == "ready"}
        return len(ready) == 2 and not ready & {first, second}

    wait_for(replaced, 30, "both burnt instances replaced")


def test_export_refuses_a_tampered_bundle_and_a_hostile_id(tmp_path: Path) -> None:
    home = tmp_path
    bundle = evidence_path(home, "web-1")
    bundle.parent.mkdir(parents=True)
    manifest = {"files": {"logs.jsonl": {"sha256": "0" * 64, "size": 3}}}
    with tarfile.open(bundle, "w:gz") as tar:
        for name, body in (
            ("logs.jsonl", b"abc"),
            ("manifest.json", json.dumps(manifest).encode()),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    with pytest.raises(KilnError, match=r"logs\.jsonl does not match its manifest digest"):
        export_evidence(home, "web-1", tmp_path / "out.tar.gz")
    assert not (tmp_path / "out.tar.gz").exists()
    for hostile in ("../web-1", "a/b", "..", ""):
        with pytest.raises(KilnError, match="is not an instance id"):
            evidence_path(home, hostile)


def test_prune_by_age_then_size_keeps_held_bundles(tmp_path: Path) -> None:
    root = tmp_path / "evidence"
    root.mkdir()
    now = time.time()
    for name, age, size in (
        ("old", 10_000, 10),
        ("held", 20_000, 10),
        ("a", 30, 100),
        ("b", 20, 100),
        ("c", 10, 100),
    ):
        path = root / f"{name}.tar.gz"
        path.write_bytes(b"x" * size)
        os.utime(path, (now - age, now - age))
    removed = prune_evidence(root, 250, 3600.0, frozenset({"held"}))
    assert removed == ["old", "a"]
    assert sorted(p.name for p in root.iterdir()) == ["b.tar.gz", "c.tar.gz", "held.tar.gz"]
