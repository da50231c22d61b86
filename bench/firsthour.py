"""A newcomer's first hour, measured as it is lived (issue 9).

From a fresh ``KILN_HOME`` on a machine whose Debian package cache is warm:

1. ``kiln init`` → ``kiln up`` → the first request served (python template);
2. the edit → ``kiln apply`` → new version serving loop, for 2 and 3 replicas:
   until the new text is served, and until the rollout is done;
3. the longest time with no output on screen during each of those commands
   (every line of stdout and stderr is timestamped as it arrives; target ≤ 2 s);
4. the first bake of the same project in a fresh home, next to ``docker build``
   of the same image in the same run, configured alike:

   * machine caches warm (Kiln: the shared Debian base and the packages layer
     another home made; Docker: its build cache holds the base and apt layers)
     — only the app is new;
   * only the base warm (Kiln: the packages layer is not in the machine's
     cache; Docker: ``--no-cache`` from a loaded ``debian:bookworm``);
   * nothing warm but the .deb cache (Kiln: an empty shared-base cache; no
     peer: Docker would pull its base).

Run: .venv/bin/python bench/firsthour.py [--edits N]
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import docker, median_p95, private_dockerd

KILN = str(Path(sys.executable).parent / "kiln")
BASE_CACHE = Path(os.environ.get("KILN_BASE_CACHE", "/var/cache/kiln/bases"))

DOCKERFILE = """\
FROM debian:bookworm
RUN apt-get update && apt-get install -y --no-install-recommends python3 \\
 && rm -rf /var/lib/apt/lists/*
COPY app/ /srv/app
USER 65534:65534
WORKDIR /srv/app
CMD ["python3", "server.py"]
"""

BASE_TOML = """\
[project]
name = "bench-base"

[images.debian]
from = "debian:bookworm"
"""


@dataclass
class Run:
    """One command: how long it took and the longest stretch without a line of output."""

    seconds: float
    silent: float
    lines: list[tuple[float, str]] = field(default_factory=list)
    silent_after: str = ""
    """The line the longest silence followed."""


def run(home: Path, *args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> Run:
    """``kiln ARGS`` with stdout and stderr on one pipe, each line timestamped on arrival."""
    environ = dict(os.environ, KILN_HOME=str(home), **(env or {}))
    began = time.monotonic()
    proc = subprocess.Popen(
        [KILN, *args],
        cwd=cwd,
        env=environ,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )
    assert proc.stdout is not None
    lines = [(time.monotonic(), line.rstrip("\n")) for line in proc.stdout]
    code = proc.wait()
    ended = time.monotonic()
    if code != 0:
        text = "\n".join(line for _, line in lines[-30:])
        raise SystemExit(f"kiln {' '.join(args)} exited {code}:\n{text}")
    stamps = [(began, "(start)"), *lines, (ended, "(exit)")]
    gap, before = max((b[0] - a[0], a[1]) for a, b in itertools.pairwise(stamps))
    return Run(ended - began, gap, lines, before)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serves(port: int, text: str, timeout: float = 120.0) -> float:
    """When ``GET /`` on ``port`` first answers 200 with ``text`` in its body."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as resp:
                if resp.status == 200 and text in resp.read().decode():
                    return time.monotonic()
        except OSError:
            pass
        time.sleep(0.02)
    raise SystemExit(f"port {port} never served {text!r}")


def in_background(fn: Callable[[], Run]) -> tuple[threading.Thread, list[Run]]:
    out: list[Run] = []
    thread = threading.Thread(target=lambda: out.append(fn()))
    thread.start()
    return thread, out


def set_greeting(project: Path, text: str) -> None:
    server = project / "app" / "server.py"
    source = server.read_text()
    server.write_text(re.sub(r'^GREETING = ".*"$', f'GREETING = "{text}"', source, flags=re.M))


def set_key(project: Path, key: str, value: int) -> None:
    toml = project / "kiln.toml"
    toml.write_text(re.sub(rf"^{key} = \d+", f"{key} = {value}", toml.read_text(), flags=re.M))


def row(label: str, samples: list[float], peer: list[float] | None = None) -> None:
    med, p95 = median_p95(samples)
    text = f"{label:<52} median {med:7.2f} s   p95 {p95:7.2f} s   (n={len(samples)})"
    if peer:
        text += f"   ratio kiln/docker {med / median_p95(peer)[0]:.2f}"
    print(text, flush=True)


def first_hour(work: Path, edits: int) -> dict[str, list[float]]:
    figures: dict[str, list[float]] = {}
    home = work / "home"
    project = work / "hello"
    port = free_port()
    began = time.monotonic()
    init = run(home, "init", str(project))
    set_key(project, "listen", port)
    up_thread, up = in_background(lambda: run(home, "up", "--yes", cwd=project))
    first = serves(port, "Hello from Kiln")
    up_thread.join()
    figures["kiln init → first request served"] = [first - began]
    figures["kiln init → kiln up done"] = [up[0].seconds + init.seconds]
    figures["longest silence: kiln up (fresh home)"] = [up[0].silent]
    print(f"kiln up: longest silence {up[0].silent:.2f} s, after: {up[0].silent_after}")
    try:
        for replicas in (2, 3):
            set_key(project, "replicas", replicas)
            run(home, "apply", "--yes", cwd=project)
            serving, done, silent = [], [], []
            for n in range(edits):
                text = f"edit {replicas}-{n}"
                set_greeting(project, text)
                began = time.monotonic()
                thread, applied = in_background(lambda: run(home, "apply", "--yes", cwd=project))
                serving.append(serves(port, text) - began)
                thread.join()
                done.append(applied[0].seconds)
                silent.append(applied[0].silent)
                print(
                    f"kiln apply ({replicas} replicas): longest silence "
                    f"{applied[0].silent:.2f} s, after: {applied[0].silent_after}"
                )
            figures[f"edit → new version serving ({replicas} replicas)"] = serving
            figures[f"edit → rollout done ({replicas} replicas)"] = done
            figures[f"longest silence: kiln apply ({replicas} replicas)"] = silent
    finally:
        subprocess.run([KILN, "down"], env=dict(os.environ, KILN_HOME=str(home)), check=False)
    return figures


def first_bakes(work: Path, project: Path, runs: int) -> None:
    homes = itertools.count()

    def fresh_bake(env: dict[str, str] | None = None) -> float:
        return run(work / f"bake-home-{next(homes)}", "bake", str(project), env=env).seconds

    warm = [fresh_bake() for _ in range(runs)]
    base_only: list[float] = []
    for _ in range(runs):
        cache = work / f"base-only-{next(homes)}"
        # cp -a: the shared trees keep their real owners, which verification checks
        subprocess.run(["cp", "-a", str(BASE_CACHE), str(cache)], check=True)
        for layer in cache.glob("layer-*"):
            shutil.rmtree(layer)
        base_only.append(fresh_bake({"KILN_BASE_CACHE": str(cache)}))
        shutil.rmtree(cache)
    empty = work / "no-base"
    empty.mkdir(mode=0o700)
    cold = [fresh_bake({"KILN_BASE_CACHE": str(empty)})]

    docker_warm: list[float] | None = None
    docker_cold: list[float] | None = None
    with private_dockerd() as host:
        if host is None:
            print("docker: no engine could start here; no peer figures", flush=True)
        else:
            base = work / "base"
            base.mkdir()
            (base / "kiln.toml").write_text(BASE_TOML)
            run(work / "base-home", "bake", str(base))
            archive = work / "debian.tar"
            run(work / "base-home", "image", "export", "debian", "--format", "docker",
                "-o", str(archive))  # fmt: skip
            docker(host, "load", "-i", str(archive))
            docker(host, "tag", docker(host, "images", "-q").stdout.split()[0], "debian:bookworm")
            (project / "Dockerfile").write_text(DOCKERFILE)
            build = ["build", "--network=host", "-q", "-t", "hello-web", str(project)]
            docker(host, *build)  # the apt layer in the build cache, as Kiln's machine cache
            edits = itertools.count()

            def docker_new_app() -> float:
                set_greeting(project, f"docker {next(edits)}")
                began = time.perf_counter()
                docker(host, *build)
                return time.perf_counter() - began

            def docker_no_cache() -> float:
                began = time.perf_counter()
                docker(host, build[0], "--no-cache", *build[1:])
                return time.perf_counter() - began

            docker_warm = [docker_new_app() for _ in range(runs)]
            docker_cold = [docker_no_cache() for _ in range(runs)]
            (project / "Dockerfile").unlink()

    print("\nfirst bake of the python template in a fresh KILN_HOME (.deb cache warm)")
    row("kiln: shared base + packages layer warm", warm, docker_warm)
    row("kiln: shared base warm, packages layer new", base_only, docker_cold)
    row("kiln: no shared base (a new machine)", cold)
    if docker_warm and docker_cold:
        row("docker build: base + apt layers cached, app new", docker_warm)
        row("docker build --no-cache (base loaded)", docker_cold)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--edits", type=int, default=3, help="edits per replica count")
    parser.add_argument("--runs", type=int, default=3, help="first bakes per case")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kiln-bench-firsthour-"))
    work.chmod(0o755)
    try:
        figures = first_hour(work, args.edits)
        print("\na newcomer's first hour (python template, fresh KILN_HOME)")
        for label, samples in figures.items():
            row(label, samples)
        first_bakes(work, work / "hello", args.runs)
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
