"""Secrets through the real CLI: refused until set, mounted at /run/secrets, rotated by
replacement, rolled back with the revision, and never written anywhere but the store."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import busybox_tree
from leftovers import assert_nothing_left

pytestmark = pytest.mark.e2e

KILN = str(Path(sys.executable).parent / "kiln")
V1 = b"kiln-e2e-first-value-5b1f0c"
V2 = b"kiln-e2e-second-value-9e27d4"

TOML = """\
[project]
name = "secrets"

[images.web]
from = "scratch"
steps = [{{ copy = "rootfs/", to = "/" }}]
cmd = ["/bin/sh", "-c", "exec httpd -f -v -p $PORT -h /www"]
user = "65534:65534"

[services.web]
image = "web"
replicas = 2
listen = {listen}
secrets = ["api_key"]
health = {{ http = "/healthz", interval = "0.5s", timeout = "1s" }}
stop_grace = "2s"
drain_timeout = "1s"
update = {{ min_healthy_time = "0.5s" }}
"""


free_port = busybox_tree.free_port


def make_project(root: Path, listen: int) -> Path:
    """httpd serves /www/key, a link to the mounted secret: what the instance sees."""
    rootfs = busybox_tree.build_busybox_rootfs(
        root / "rootfs", www={"healthz": "ok\n"}, applets=("sh", "httpd"), users=False
    )
    (rootfs / "www" / "key").symlink_to("/run/secrets/api_key")
    (root / "kiln.toml").write_text(TOML.format(listen=listen))
    return root


def kiln(home: Path, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, KILN_HOME=str(home))
    out = subprocess.run([KILN, *args], env=env, input=stdin, capture_output=True, timeout=300)
    return subprocess.CompletedProcess(
        out.args, out.returncode, out.stdout.decode(errors="replace"), out.stderr.decode()
    )


def served(port: int) -> set[bytes]:
    """What /key holds across a few requests, so every routed instance answers."""
    seen = set()
    for _ in range(8):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/key", timeout=5) as resp:
            seen.add(resp.read())
    return seen


def wait_for(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError("condition not met in time")


def files_holding(root: Path, needle: bytes, skip: Callable[[Path], bool]) -> list[Path]:
    return [
        p
        for p in root.rglob("*")
        if p.is_file()
        and not p.is_symlink()
        and not skip(p.relative_to(root))
        and needle in p.read_bytes()
    ]


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    home = tmp_path / "home"
    yield home
    assert kiln(home, "down").returncode == 0
    assert_nothing_left(home, secrets=(V1, V2))


def test_secrets_rotate_and_roll_back_without_ever_leaving_the_store(
    home: Path, tmp_path: Path
) -> None:
    listen = free_port()
    project = make_project(tmp_path / "p", listen)

    refused = kiln(home, "up", str(project))
    assert refused.returncode == 1
    assert f"services.web.secrets: secret api_key is not set in KILN_HOME {home}" in (
        refused.stderr
    )

    missing = kiln(home, "secret", "set", "api_key", "--from-file", str(tmp_path / "nope"))
    assert missing.returncode == 1
    assert "error: --from-file " in missing.stderr and "No such file" in missing.stderr
    first = kiln(home, "secret", "set", "api_key", stdin=V1)
    assert first.returncode == 0, first.stderr
    assert first.stdout == "api_key v1\n"
    up = kiln(home, "up", str(project))
    assert up.returncode == 0, up.stderr
    assert served(listen) == {V1}

    second = kiln(home, "secret", "set", "api_key", stdin=V2)
    assert second.stdout == "api_key v2\n"
    plan_file = tmp_path / "plan.json"
    plan = kiln(home, "plan", str(project), "-o", str(plan_file))
    assert plan.returncode == 2, plan.stderr
    assert plan.stdout.count(": secret api_key v1 → v2") == 2, plan.stdout
    plan_json = kiln(home, "plan", str(project), "--json")
    assert plan_json.returncode == 2
    as_data = json.loads(plan_json.stdout)
    assert as_data["desired"]["web"]["secrets_versions"] == {"api_key": "v2"}
    reasons = [a["reasons"] for a in as_data["actions"] if a["action"] == "replace"]
    assert reasons == [["secret api_key v1 → v2"]] * 2

    applied = kiln(home, "apply", str(plan_file))
    assert applied.returncode == 0, applied.stderr
    assert served(listen) == {V2}

    back = kiln(home, "rollback", "web")
    assert back.returncode == 0, back.stderr
    assert served(listen) == {V1}

    listed = kiln(home, "secret", "list", "--json")
    assert [(s["name"], s["version"]) for s in json.loads(listed.stdout)] == [("api_key", "v2")]

    reads = [
        kiln(home, "status", "--json"),
        kiln(home, "events", "--json"),
        kiln(home, "history", "web", "--json"),
        kiln(home, "logs", "web"),
        listed,
    ]
    outputs = [plan, plan_json, applied, back, up, *reads]
    for value in (V1, V2):
        for out in outputs:
            assert value.decode() not in out.stdout + out.stderr, out.args
        assert value not in plan_file.read_bytes()
        # Encrypted in the store, on a tmpfs only the instances' mount namespaces see.
        assert files_holding(home, value, skip=lambda p: False) == []
        assert files_holding(Path("/run/kiln"), value, skip=lambda p: False) == []
    assert files_holding(home, b"api_key", skip=lambda p: False), "the scan finds clear text"
    assert list((home / "instances").glob("*/spec.json")) and list(home.glob("state.db*"))

    kiln(home, "secret", "rm", "api_key")
    victim = json.loads(kiln(home, "status", "--json").stdout)["services"]["web"]["instances"][0]
    os.kill(int(victim["pid"]), signal.SIGKILL)

    def replacement_refused() -> bool:
        lines = kiln(home, "events", "--json").stdout.splitlines()
        return any(
            e["kind"] == "instance.failed"
            and "secret api_key v1 is not in the secret store" in e["message"]
            for e in map(json.loads, lines)
        )

    wait_for(replacement_refused, timeout=20)
