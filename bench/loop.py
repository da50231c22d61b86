"""The edit-to-serving loop of the example, as a developer lives it.

Once: copy examples/shop, ``kiln up`` (cold bake, agent, 3 instances on the
listen port). Then, per edit: change ``VERSION`` in ``app/server.py``, run
``kiln apply --yes``, and time until a request on the listen port is answered
by the new version (the first new instance is healthy and routed; the rest
of the rolling update goes on). Also the growth of ``KILN_HOME`` per edit
(images + snapshots + everything else), and what ``kiln image gc`` reclaims
once the old images are removed.

Run: .venv/bin/python bench/loop.py [--edits N]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import median_p95

REPO = Path(__file__).resolve().parents[1]
KILN = str(Path(sys.executable).parent / "kiln")


def kiln(home: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, KILN_HOME=str(home))
    return subprocess.run(
        [KILN, *args], env=env, cwd=cwd, text=True, capture_output=True, check=True
    )


def du(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(root, name))
                total += st.st_blocks * 512
    return total


def answer(port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1) as response:
            return response.read().decode()
    except OSError:
        return ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--edits", type=int, default=5)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kiln-bench-loop-"))
    home = work / "home"
    project = work / "shop"
    shutil.copytree(REPO / "examples" / "shop", project)
    listen = free_port()
    toml = project / "kiln.toml"
    toml.write_text(toml.read_text().replace("listen = 8000", f"listen = {listen}"))
    server = project / "app" / "server.py"
    loops: list[float] = []
    growth: list[int] = []
    try:
        began = time.perf_counter()
        kiln(home, "up", str(project))
        print(f"kiln up (cold bake, 3 instances): {time.perf_counter() - began:.1f} s", flush=True)
        before = du(home)
        for edit in range(2, 2 + args.edits):
            source = server.read_text()
            server.write_text(source.replace(f'VERSION = "{edit - 1}"', f'VERSION = "{edit}"'))
            began = time.perf_counter()
            env = dict(os.environ, KILN_HOME=str(home))
            apply = subprocess.Popen(
                [KILN, "apply", "--yes", "-f", str(project)],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            while f"(version {edit})" not in answer(listen):
                if time.perf_counter() - began > 120:
                    raise TimeoutError(f"edit {edit} never served")
                time.sleep(0.01)
            loops.append(time.perf_counter() - began)
            if apply.wait(timeout=300) != 0:
                raise RuntimeError(f"kiln apply failed on edit {edit}")
            after = du(home)
            growth.append(after - before)
            before = after
        images = kiln(home, "images", "--json").stdout
        reclaim_before = du(home)
        kiln(home, "down")
        for digest in sorted(
            {i["digest"] for i in json.loads(images) if i["ref"].startswith("web")}
        ):
            kiln(home, "image", "rm", digest)
        kiln(home, "image", "gc")
        reclaimed = reclaim_before - du(home)
    finally:
        with contextlib.suppress(Exception):
            kiln(home, "down")
        shutil.rmtree(work, ignore_errors=True)
    med, p95 = median_p95(loops)
    print(
        f"edit → first answer by the new version ({args.edits} edits): "
        f"median {med:.2f} s  p95 {p95:.2f} s  (target < 2 s)"
    )
    gmed, gp95 = median_p95([float(g) for g in growth])
    print(f"KILN_HOME growth per edit: median {gmed / 1e6:.2f} MB  p95 {gp95 / 1e6:.2f} MB")
    print(f"kiln image rm of every web image + kiln image gc reclaimed {reclaimed / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
