"""A newcomer's first minutes, through the real CLI: ``kiln init``, ``kiln up``, a request
served; an edit applied and rolled back; the static and redis templates baked and
serving beside it; ``kiln down`` leaving nothing.

The python template is also the README's "The file" (tests/docs/test_snippets.py
checks they are the same), so this is the test that the README's example bakes and
serves. The three bakes share one home and run at once: the static and redis ones
start in the background while the python one is timed as a newcomer lives it.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

import busybox_tree
from leftovers import assert_nothing_left

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="mmdebstrap --mode=root and runc need root"),
    pytest.mark.skipif(shutil.which("mmdebstrap") is None, reason="mmdebstrap not installed"),
]

KILN = str(Path(sys.executable).parent / "kiln")
DEB_CACHE = "/var/cache/kiln-test"
"""The tests' shared download cache (tests/image/conftest_bake.py), so bakes reuse .debs."""


def environ(home: Path) -> dict[str, str]:
    return dict(os.environ, KILN_HOME=str(home), KILN_CACHE=os.environ.get("KILN_CACHE", DEB_CACHE))


def kiln(home: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [KILN, *args], env=environ(home), cwd=cwd, text=True, capture_output=True, timeout=600
    )


def get(port: int) -> tuple[int, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as resp:
        return resp.status, resp.read().decode()


def init(home: Path, root: Path, template: str) -> tuple[Path, int]:
    """``kiln init`` of ``template`` in ``root/template``, its listen port made a free one."""
    project = root / template
    made = kiln(home, "init", str(project), "--template", template)
    assert made.returncode == 0, made.stderr
    port = busybox_tree.free_port()
    toml = project / "kiln.toml"
    text, count = re.subn(r"^listen = \d+", f"listen = {port}", toml.read_text(), flags=re.M)
    assert count == 1
    toml.write_text(text)
    return project, port


class Background:
    """``kiln bake`` of the other templates, running while the python one is timed."""

    def __init__(self, home: Path, projects: list[Path]) -> None:
        self.procs = [
            subprocess.Popen(
                [KILN, "bake", str(project)],
                env=environ(home),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for project in projects
        ]

    def wait(self) -> None:
        for proc in self.procs:
            out, err = proc.communicate(timeout=600)
            assert proc.returncode == 0, err[-3000:]
            assert "@sha256:" in out

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    home = tmp_path / "home"
    yield home
    kiln(home, "down")


def test_init_up_edit_apply_rollback_and_the_other_templates(home: Path, tmp_path: Path) -> None:
    web, web_port = init(home, tmp_path, "python")
    site, site_port = init(home, tmp_path, "static")
    cache, cache_port = init(home, tmp_path, "redis")
    others = Background(home, [site, cache])
    try:
        started = time.monotonic()
        up = kiln(home, "up", "--yes", cwd=web)
        assert up.returncode == 0, up.stderr[-3000:]
        assert "Plan: 2 to create, 0 to replace, 0 to destroy." in up.stderr
        status, body = get(web_port)
        first_request = time.monotonic() - started
        assert status == 200 and body.startswith("Hello from Kiln (web-"), body
        print(f"kiln up of the python template to its first request: {first_request:.1f} s")

        server = web / "app" / "server.py"
        server.write_text(server.read_text().replace("Hello from Kiln", "Hello again"))
        edited = time.monotonic()
        applied = kiln(home, "apply", "--yes", cwd=web)
        assert applied.returncode == 0, applied.stderr[-3000:]
        assert "Plan: 0 to create, 2 to replace, 0 to destroy." in applied.stdout
        assert get(web_port)[1].startswith("Hello again (web-")
        print(f"edit → kiln apply → new version serving: {time.monotonic() - edited:.1f} s")

        back = kiln(home, "rollback", "web")
        assert back.returncode == 0, back.stderr[-3000:]
        assert get(web_port)[1].startswith("Hello from Kiln (web-")
        logs = kiln(home, "logs", "web")
        assert logs.returncode == 0 and "listening on port 8080" in logs.stdout

        others.wait()
        for project in (site, cache):
            up = kiln(home, "up", "--yes", str(project))
            assert up.returncode == 0, up.stderr[-3000:]
        status, body = get(site_port)
        assert status == 200 and "<h1>Hello from Kiln</h1>" in body
        with socket.create_connection(("127.0.0.1", cache_port), timeout=5) as conn:
            conn.sendall(b"PING\r\nSET greeting hello\r\nGET greeting\r\n")
            answer = b""
            while answer.count(b"\r\n") < 4:
                chunk = conn.recv(1024)
                assert chunk, answer
                answer += chunk
        assert answer == b"+PONG\r\n+OK\r\n$5\r\nhello\r\n"
        print(f"the three templates served {time.monotonic() - started:.1f} s after the first up")
    finally:
        others.kill()

    down = kiln(home, "down")
    assert down.returncode == 0, down.stderr
    with pytest.raises(OSError):
        get(web_port)
    assert_nothing_left(home)
