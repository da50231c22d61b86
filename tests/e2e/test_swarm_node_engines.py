"""Issue 12 on a real three-node swarm with ``[runtime] nodes``, through the real CLI:
exec health checks pass (refused without ``nodes``), ``kiln burn --keep-evidence``
freezes the instance through its node's engine and keeps the file its app wrote,
``kiln chaos pause`` pauses a task on its node and the service heals, and a file that
``kiln chaos drift`` writes into a task's root is found as drift and the instance
replaced; ``max_age`` replaces every instance with no failed request."""

# ruff: noqa: F811 - the swarm_cluster fixture is imported by name and used as a parameter
from __future__ import annotations

import io
import json
import os
import tarfile
import time
from pathlib import Path

import pytest
from test_story import free_port, kiln, status, wait_for
from test_swarm import home, ready, swarm_project  # noqa: F401

from kiln.observe.load import LoadGenerator
from swarm_cluster import SwarmCluster, swarm_cluster  # noqa: F401

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.docker,
    pytest.mark.skipif(os.geteuid() != 0, reason="a swarm of engines needs root"),
]


def test_exec_checks_quarantine_with_evidence_and_chaos_pause_through_each_nodes_engine(
    home: Path, tmp_path: Path, swarm_cluster: SwarmCluster
) -> None:
    listen = free_port()
    project = swarm_project(tmp_path / "p", listen, swarm_cluster)
    toml = project / "kiln.toml"
    text = (
        toml.read_text()
        .replace(
            "replicas = 3",
            'replicas = 2\nwritable = ["/data"]\nquarantine = "3s"\ndrift_interval = "1s"',
        )
        .replace(
            'health = { http = "/healthz", interval = "0.5s", timeout = "1s" }',
            'health = { exec = ["cat", "/www/healthz"], interval = "1s", timeout = "3s" }',
        )
        .replace("exec httpd", "echo note-$HOSTNAME > /data/note; exec httpd")
    )
    toml.write_text(text)
    refused = kiln(home, "plan", str(project))
    assert refused.returncode == 1 and "without [runtime] nodes" in refused.stderr, refused
    nodes = "".join(f'"{n.address}" = "{n.host}"\n' for n in swarm_cluster.nodes)
    toml.write_text(text + "\n[runtime.nodes]\n" + nodes)
    try:
        started = time.monotonic()
        up = kiln(home, "up", str(project))
        assert up.returncode == 0, up.stderr
        wait_for(lambda: len(ready(home)) == 2, timeout=120)
        print(f"swarm nodes: 2 instances ready on exec checks in {time.monotonic() - started:.1f}s")

        victim = ready(home)[0]
        burn = kiln(home, "burn", victim["id"], "--keep-evidence")
        assert burn.returncode == 0, burn.stderr
        events = [json.loads(line) for line in kiln(home, "events", "--json").stdout.splitlines()]
        taken = [
            e
            for e in events
            if e["kind"] == "instance.quarantined" and e["instance"] == victim["id"]
        ]
        assert taken and taken[0]["data"]["frozen"] is True, taken
        bundle = tmp_path / "evidence.tar.gz"
        assert kiln(home, "evidence", victim["id"], "-o", str(bundle)).returncode == 0
        with tarfile.open(bundle) as tar:
            writable = tar.extractfile("writable.tar")
            processes = tar.extractfile("processes.json")
            assert writable is not None and processes is not None
            assert "httpd" in processes.read().decode()
            with tarfile.open(fileobj=io.BytesIO(writable.read())) as kept:
                note = kept.extractfile("data/note")
                assert note is not None and note.read().startswith(b"note-")

        def whole(gone: str) -> bool:
            now = status(home)
            live = [i for i in now["instances"] if i["state"] == "ready"]
            return (
                now.get("rollout") is None
                and len(live) == len(now["instances"]) == 2
                and gone not in {i["id"] for i in live}
            )

        wait_for(lambda: whole(victim["id"]), timeout=90)

        chaos = kiln(
            home, "chaos", "pause", "--service", "web", "--duration", "2s", "--json",
            "--timeout", "60s",
        )  # fmt: skip
        assert chaos.returncode == 0, chaos.stdout + chaos.stderr
        report = json.loads(chaos.stdout)
        fault = report["faults"][0]
        assert report["runtime"] == "swarm" and report["held"] is True, report
        assert fault["recovered"] and "docker pause" in fault["detail"], fault
        print(
            f"swarm chaos pause (2 s) through the node's engine: recovered in "
            f"{fault['recovery_seconds']:.2f}s, {report['requests']['failed']} of "
            f"{report['requests']['sent']} requests failed"
        )

        # A file written into a task's root on its node is drift: found by the agent's
        # check through the node's engine, and the instance replaced.
        since = time.time()
        chaos = kiln(home, "chaos", "drift", "--service", "web", "--json", "--timeout", "60s")
        assert chaos.returncode == 0, chaos.stdout + chaos.stderr
        report = json.loads(chaos.stdout)
        fault = report["faults"][0]
        assert report["held"] is True and fault["recovered"] and fault["detected"], report
        events = [json.loads(line) for line in kiln(home, "events", "--json").stdout.splitlines()]
        drifted = [
            e
            for e in events
            if e["kind"] == "instance.drift"
            and e["instance"] == fault["instance"]
            and e["ts"] >= since
        ]
        assert drifted and drifted[0]["data"]["what"] == "files", drifted
        assert "kiln-chaos-" in json.dumps(drifted[0]["data"]), drifted[0]
        print(
            f"swarm chaos drift through the node's engine: replaced in "
            f"{fault['recovery_seconds']:.2f}s, {report['requests']['failed']} of "
            f"{report['requests']['sent']} requests failed"
        )

        # max_age: every instance replaced for its age, a batch at a time, no failed request.
        wait_for(lambda: whole(fault["instance"]), timeout=90)
        toml.write_text(toml.read_text().replace('drift_interval = "1s"', 'max_age = "12s"'))
        assert kiln(home, "apply", "--file", str(project), "--yes").returncode == 0
        first = {i["id"] for i in ready(home)}
        with LoadGenerator("127.0.0.1", listen, workers=2) as load:

            def aged_out() -> bool:
                lines = kiln(home, "events", "--json").stdout.splitlines()
                found = [json.loads(line) for line in lines]
                aged = {e["instance"] for e in found if e["kind"] == "instance.aged"}
                live = {i["id"] for i in ready(home)}
                return first <= aged and len(live) == 2 and not first & live

            wait_for(aged_out, timeout=90)
        print(f"swarm max_age churn: {load.report.summary()}")
        assert load.report.sent > 100
        assert load.report.failed == 0, load.report.errors

        down = kiln(home, "down")
        assert down.returncode == 0, down.stderr
    finally:
        kiln(home, "down")
