"""Shared by the benchmarks: timing statistics and a private Docker engine.

The engine is started here, with its own data root and socket, and stopped
after, so a benchmark never depends on (or disturbs) a Docker already running.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path


def median_p95(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return statistics.median(ordered), p95


def timed(fn: Callable[[], object], runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def dockerd_command(root: Path, bridge: str = "none", userns: bool = False) -> list[str]:
    return [
        "dockerd",
        "--iptables=false",
        f"--bridge={bridge}",
        *(("--userns-remap=default",) if userns else ()),
        f"--data-root={root / 'data'}",
        f"--exec-root={root / 'exec'}",
        f"--pidfile={root / 'docker.pid'}",
        f"--host=unix://{root / 'docker.sock'}",
    ]


@contextlib.contextmanager
def private_dockerd(
    timeout: float = 30.0, bridge: str = "none", userns: bool = False
) -> Iterator[str | None]:
    """Yields DOCKER_HOST for a fresh engine, or None when none can run here.

    ``bridge`` names an existing bridge for containers (default: no network);
    ``userns`` remaps container ids as Kiln's sandbox does."""
    if shutil.which("dockerd") is None:
        yield None
        return
    root = Path(tempfile.mkdtemp(prefix="kiln-bench-docker-"))
    if userns:
        root.chmod(0o711)  # the remapped root must traverse it, as with Kiln's /run/kiln
    log = open(root / "dockerd.log", "wb")  # noqa: SIM115 (closed below)
    command = dockerd_command(root, bridge, userns)
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    host = f"unix://{root / 'docker.sock'}"
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            ok = (
                subprocess.run(
                    ["docker", "-H", host, "info"], capture_output=True, timeout=10
                ).returncode
                == 0
            )
            if ok:
                break
            time.sleep(0.3)
        else:
            yield None
            return
        yield host
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        unmount_below(root)
        shutil.rmtree(root, ignore_errors=True)


def docker(
    host: str, *args: str, check: bool = True, **kw: object
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, DOCKER_HOST=host, DOCKER_BUILDKIT="0")
    return subprocess.run(
        ["docker", *args], env=env, text=True, capture_output=True, check=check, **kw
    )  # type: ignore[call-overload]


def unmount_below(root: Path) -> None:
    """dockerd leaves netns and overlay mounts behind; unmount them deepest first."""
    mounts = []
    with open("/proc/self/mounts") as f:
        for line in f:
            point = line.split()[1]
            if point == str(root) or point.startswith(f"{root}/"):
                mounts.append(point)
    for point in sorted(mounts, key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True)
