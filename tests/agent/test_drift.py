"""Drift detection (issue 12 item 3): file manifests of layer snapshots, and a real agent
on the local runtime that finds a changed file and replaces what runs on it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from agent_harness import ImageFactory, RunningAgent, deploy, service_spec, wait_for

from kiln.agent.drift import ignore_rule
from kiln.errors import KilnError
from kiln.image.file_manifest import compare_tree, read_manifest, record_manifest, write_manifest
from kiln.runtime.local import LocalRuntime
from kiln.spec.models import Spec

V1 = {"healthz": "ok\n", "index.html": "v1\n"}


# -- manifests -----------------------------------------------------------------


def _tree(root: Path) -> Path:
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    (root / "bin").mkdir()
    (root / "bin" / "sh").write_bytes(b"\x7fELF" + b"\0" * 100)
    os.symlink("sh", root / "bin" / "ash")
    return root


def test_the_cheap_pass_sees_metadata_and_only_the_full_pass_sees_same_size_content(
    tmp_path: Path,
) -> None:
    root = _tree(tmp_path / "fs")
    manifest = record_manifest(root)
    assert compare_tree(root, manifest, full=True) == []
    passwd = root / "etc" / "passwd"
    before = os.lstat(passwd)
    passwd.write_text("evil:x:0:0::/root:/bin/sh\n")  # same size
    os.utime(passwd, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert compare_tree(root, manifest, full=False) == []
    [found] = compare_tree(root, manifest, full=True)
    assert (found.path, found.change, found.detail) == ("/etc/passwd", "changed", "content changed")
    (root / "bin" / "backdoor").write_text("x")
    os.chmod(root / "bin" / "sh", 0o4755)
    (root / "bin" / "ash").unlink()
    quick = {(d.path, d.change) for d in compare_tree(root, manifest, full=False)}
    assert quick == {("/bin/backdoor", "added"), ("/bin/sh", "changed"), ("/bin/ash", "removed")}


def test_a_manifest_that_is_not_kilns_is_refused(tmp_path: Path) -> None:
    snapshot = tmp_path / "snap"
    snapshot.mkdir()
    assert read_manifest(snapshot) is None
    write_manifest(snapshot, record_manifest(_tree(snapshot / "fs")))
    assert read_manifest(snapshot) is not None
    hostile = [
        '{"version": 9, "entries": {}}',
        "[1]",
        '{"version": 1, "entries": {"/a": [1]}}',
        '{"version": 1, "entries": {"/a": ["file", "x", 0, 0, 0, 0, ""]}}',
        "{",
    ]
    for text in hostile:
        (snapshot / "manifest.json").write_text(text)
        with pytest.raises(KilnError):
            read_manifest(snapshot)
    (snapshot / "manifest.json").unlink()
    os.symlink("/etc/passwd", snapshot / "manifest.json")
    with pytest.raises(KilnError, match="regular file"):
        read_manifest(snapshot)


def test_ignore_rules_cover_writable_dirs_and_globs_and_nothing_else() -> None:
    ignored = ignore_rule(["/data"], ["/var/cache/**", "/etc/*.pid"])
    assert ignored("/data") and ignored("/data/x/y")
    assert ignored("/var/cache") and ignored("/var/cache/a/b")
    assert ignored("/etc/app.pid")
    assert not ignored("/database") and not ignored("/var/cachex") and not ignored("/etc/passwd")


@pytest.mark.parametrize("pattern", ["relative/**", "/a/../etc/**", ".."])
def test_a_drift_ignore_outside_the_root_is_refused(pattern: str) -> None:
    with pytest.raises(ValueError, match="absolute path glob"):
        service_spec("sha256:" + "a" * 64, drift_ignore=[pattern])


def test_drift_settings_default_to_replace_every_30s_and_rehash_every_10m() -> None:
    service = Spec.model_validate(
        {"project": {"name": "t"}, "services": {"web": {"image": "x"}}}
    ).services["web"]
    assert (service.drift_interval, service.drift_full_interval) == (30.0, 600.0)
    assert service.on_drift == "replace" and service.drift_ignore == []


# -- a real agent on the local runtime -----------------------------------------


def _ids(agent: RunningAgent) -> set[str]:
    instances = agent.client.status()["services"]["web"]["instances"]
    return {str(i["id"]) for i in instances if i["state"] == "ready"}


def _events(agent: RunningAgent, kind: str) -> list[dict[str, Any]]:
    return [e for e in agent.client.events() if e["kind"] == kind]


def _snapshot_fs(agent: RunningAgent, instance: str) -> Path:
    plan = json.loads((agent.home / "instances" / instance / "spec.json").read_text())
    return Path(plan["layers"][-1])


def _root_of(agent: RunningAgent, instance: str) -> Path:
    """The instance's merged root, through its shim's mount namespace."""
    runtime = LocalRuntime(agent.home)
    handle = runtime.handle_for(instance)
    assert handle is not None
    view = runtime.view_dir(instance)
    return Path(f"/proc/{handle.data['shim_pid']}/root") / str(view).lstrip("/") / "upper"


def test_a_file_changed_in_a_shared_snapshot_replaces_every_instance_and_rebuilds_it(
    agent: RunningAgent, busybox_image: ImageFactory, free_port: Callable[[], int]
) -> None:
    digest = busybox_image("web:v1", V1)
    spec = service_spec(digest, listen=free_port(), replicas=2, drift_interval="1s")
    assert deploy(agent.client, spec)["outcome"] == "succeeded"
    before = _ids(agent)
    fs = _snapshot_fs(agent, sorted(before)[0])
    (fs / "www" / "index.html").write_text("defaced\n")
    injected = time.monotonic()

    replaced = wait_for(lambda: _ids(agent).isdisjoint(before) and len(_ids(agent)) == 2, 30,
                        "every instance on the changed snapshot replaced")  # fmt: skip
    seconds = time.monotonic() - injected
    assert replaced
    drifts = _events(agent, "instance.drift")
    assert {e["instance"] for e in drifts} == before
    files = drifts[0]["data"]["files"]
    assert files == [{"path": "/www/index.html", "change": "changed",
                      "detail": files[0]["detail"]}]  # fmt: skip
    assert "size" in files[0]["detail"]
    assert _events(agent, "snapshot.rebuilt")
    assert (fs / "www" / "index.html").read_text() == "v1\n", "the tree was not rebuilt"
    now = _ids(agent)
    assert _snapshot_fs(agent, sorted(now)[0]) == fs
    print(f"\nFIGURE drift injection → replacement (shared snapshot, 1s interval): {seconds:.2f}s")


def test_a_file_written_into_one_instance_root_replaces_that_instance_only(
    agent: RunningAgent, busybox_image: ImageFactory, free_port: Callable[[], int]
) -> None:
    digest = busybox_image("web:v1", V1)
    spec = service_spec(digest, listen=free_port(), replicas=2, drift_interval="1s",
                        drift_ignore=["/www/cache/**"])  # fmt: skip
    assert deploy(agent.client, spec)["outcome"] == "succeeded"
    victim, other = sorted(_ids(agent))
    upper = _root_of(agent, victim)
    (upper / "www" / "cache").mkdir(parents=True)
    (upper / "www" / "cache" / "page").write_text("ignored\n")
    (_root_of(agent, other) / "www").mkdir()
    (_root_of(agent, other) / "www" / "cache").mkdir()
    (_root_of(agent, other) / "www" / "cache" / "x").write_text("ignored\n")
    (upper / "www" / "planted.sh").write_text("#!/bin/sh\n")
    injected = time.monotonic()
    wait_for(lambda: victim not in _ids(agent) and len(_ids(agent)) == 2, 30, "victim replaced")
    seconds = time.monotonic() - injected
    assert other in _ids(agent), "an instance with only ignored writes was replaced"
    [event] = _events(agent, "instance.drift")
    assert event["instance"] == victim
    assert [f["path"] for f in event["data"]["files"]] == ["/www/planted.sh"]
    print(f"\nFIGURE drift injection → replacement (instance root, 1s interval): {seconds:.2f}s")


def test_on_drift_warn_only_warns(
    agent: RunningAgent, busybox_image: ImageFactory, free_port: Callable[[], int]
) -> None:
    digest = busybox_image("web:v1", V1)
    spec = service_spec(digest, listen=free_port(), replicas=1, drift_interval="0.5s",
                        on_drift="warn")  # fmt: skip
    assert deploy(agent.client, spec)["outcome"] == "succeeded"
    [iid] = _ids(agent)
    (_root_of(agent, iid) / "planted").write_text("x")
    wait_for(lambda: _events(agent, "instance.drift"), 20, "the drift warning")
    time.sleep(2.0)  # four more passes: still one event, still the same instance
    assert _ids(agent) == {iid}
    [event] = _events(agent, "instance.drift")
    assert event["data"]["action"] == "warned"
    assert not _events(agent, "reconcile.replace")


def test_an_extra_process_claiming_to_be_an_instance_is_reported_and_removed(
    agent: RunningAgent, busybox_image: ImageFactory, free_port: Callable[[], int]
) -> None:
    digest = busybox_image("web:v1", V1)
    spec = service_spec(digest, listen=free_port(), replicas=1, drift_interval="0.5s")
    assert deploy(agent.client, spec)["outcome"] == "succeeded"
    real = _ids(agent)
    fake_dir = agent.home / "instances" / "web-impostor"
    fake_dir.mkdir()
    impostor = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(600)", "kiln.runtime.shim",
         "--instance-dir", str(fake_dir)],
        start_new_session=True,
    )  # fmt: skip
    try:
        from kiln.process import proc_start_time

        start = proc_start_time(impostor.pid)
        (fake_dir / "handle.json").write_text(json.dumps({
            "shim_pid": impostor.pid, "shim_start_time": start,
            "sandbox_pid": None, "sandbox_start_time": None}))  # fmt: skip
        (fake_dir / "spec.json").write_text(json.dumps({"meta": {"service": "web"}, "port": 1}))
        wait_for(lambda: impostor.poll() is not None, 20, "the impostor removed")
        # the kill lands before the agent writes its event: wait for the event too
        wait_for(lambda: _events(agent, "instance.drift"), 10, "the drift event")
        [event] = _events(agent, "instance.drift")
        assert event["instance"] == "web-impostor"
        assert event["data"]["what"] == "extra" and event["data"]["action"] == "removed"
        assert not fake_dir.exists()
        assert _ids(agent) == real
    finally:
        if impostor.poll() is None:
            impostor.kill()
        impostor.wait()


def _kiln(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sys.executable).with_name("kiln")), *args],
        capture_output=True, text=True, env={**os.environ, "KILN_HOME": str(home)}, timeout=120,
    )  # fmt: skip


def test_kiln_drift_exits_0_clean_2_on_drift_and_1_on_error(
    agent: RunningAgent, busybox_image: ImageFactory, free_port: Callable[[], int]
) -> None:
    digest = busybox_image("web:v1", V1)
    spec = service_spec(digest, listen=free_port(), replicas=2, drift_interval="1h",
                        on_drift="warn")  # fmt: skip
    assert deploy(agent.client, spec)["outcome"] == "succeeded"
    clean = _kiln(agent.home, "drift", "--json")
    assert clean.returncode == 0, clean.stderr
    report = json.loads(clean.stdout)
    assert report["drift"] == [] and report["instances_checked"] == 2 and report["full"]
    quick = json.loads(_kiln(agent.home, "drift", "--json", "--quick").stdout)
    for name, run in (("full", report), ("quick", quick)):
        per = run["cpu_seconds"] / run["instances_checked"] * 1000
        print(f"\nFIGURE drift check CPU per instance per pass ({name}, busybox): {per:.2f} ms")

    victim = sorted(_ids(agent))[0]
    (_root_of(agent, victim) / "etc").mkdir()
    (_root_of(agent, victim) / "etc" / "cron").write_text("* * * * * evil\n")
    found = _kiln(agent.home, "drift", "web")
    assert found.returncode == 2, found.stderr
    assert f"web/{victim}: files" in found.stdout
    assert "added    /etc/cron" in found.stdout
    as_json = json.loads(_kiln(agent.home, "drift", "--json", "--quick").stdout)
    assert [d["instance"] for d in as_json["drift"]] == [victim] and not as_json["full"]

    missing = _kiln(agent.home, "drift", "nosuch")
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines() == ["error: no service 'nosuch'"]
