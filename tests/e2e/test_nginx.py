"""The stock Debian nginx runs unchanged: its master as root inside, its workers as
www-data, both unprivileged ids on the host; it listens on 80 as it always does.

nginx's master needs three capabilities to drop to www-data and own its temp
dirs (SETUID, SETGID, CHOWN): an instance has none unless the service names them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

import busybox_tree
from kiln.oci.idmap import id_range
from leftovers import assert_nothing_left

pytestmark = pytest.mark.e2e

KILN = str(Path(sys.executable).parent / "kiln")
WWW_DATA = 33
TOML = """\
[project]
name = "nginx"

[images.nginx]
from = "debian:bookworm"
packages = ["nginx-light"]
cmd = ["nginx", "-g", "daemon off;"]

[services.nginx]
image = "nginx"
replicas = 2
port = 80
listen = {listen}
writable = ["/var/lib/nginx", "/var/log/nginx"]
cap_add = {caps}
health = {{ http = "/", interval = "0.5s", timeout = "1s" }}
stop_grace = "2s"
drain_timeout = "1s"
"""


def kiln(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, KILN_HOME=str(home))
    return subprocess.run([KILN, *args], env=env, text=True, capture_output=True, timeout=600)


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    home = tmp_path / "home"
    yield home
    assert kiln(home, "down").returncode == 0
    assert_nothing_left(home)


def host_uids(name: str) -> dict[str, set[int]]:
    """Host uid of each nginx process, by role (master/worker)."""
    found: dict[str, set[int]] = {"master": set(), "worker": set()}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace")
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        if not cmdline.startswith(name):
            continue
        uid = int(next(x for x in status.splitlines() if x.startswith("Uid:")).split()[1])
        found["master" if "master" in cmdline else "worker"].add(uid)
    return found


def test_stock_debian_nginx_runs_unchanged_as_unprivileged_host_ids(
    home: Path, tmp_path: Path
) -> None:
    listen = busybox_tree.free_port()
    project = tmp_path / "nginx"
    project.mkdir()
    (project / "kiln.toml").write_text(
        TOML.format(listen=listen, caps='["SETUID", "SETGID", "CHOWN"]')
    )
    up = kiln(home, "up", str(project))
    assert up.returncode == 0, up.stdout + up.stderr
    with urllib.request.urlopen(f"http://127.0.0.1:{listen}/", timeout=5) as response:
        assert response.status == 200
        assert b"nginx" in response.read()
    ids = id_range(home)
    uids = host_uids("nginx: ")
    assert uids["master"] == {ids.base}, uids
    assert uids["worker"] == {ids.base + WWW_DATA}, uids
