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


# -- Docker Swarm as the peer, configured as Kiln is -----------------------------------

DockerRun = Callable[..., str]
"""Runs ``docker ARGS...`` against one engine (a private one, or a swarm manager) and
returns its stdout: the Swarm helpers below work on either."""


def swarm_service_create(
    run: DockerRun,
    name: str,
    image: str,
    replicas: int,
    *,
    health_cmd: str,
    interval: float,
    timeout: float,
    retries: int,
    parallelism: int,
    monitor: float,
    stop_grace: float,
    env: dict[str, str],
    extra: tuple[str, ...] = (),
    command: tuple[str, ...] = (),
    detach: bool = True,
) -> None:
    """A service updated as Kiln rolls: ``--update-order start-first`` (max_unavailable
    = 0), ``--update-parallelism`` = the batch Kiln starts at once, ``--update-monitor``
    = ``min_healthy_time`` (Swarm's default is 5 s), health by exec every ``interval``;
    restarted at once when a task dies (restart delay 0, Swarm's default is 5 s).
    ``detach=False`` returns once every task is running."""
    envs = [arg for key, value in env.items() for arg in ("--env", f"{key}={value}")]
    run(
        "service",
        "create",
        f"--detach={str(detach).lower()}",
        "--name",
        name,
        "--replicas",
        str(replicas),
        *envs,
        "--health-cmd",
        health_cmd,
        "--health-interval",
        f"{interval}s",
        "--health-timeout",
        f"{timeout}s",
        "--health-retries",
        str(retries),
        "--update-order",
        "start-first",
        "--update-parallelism",
        str(parallelism),
        "--update-delay",
        "0s",
        "--update-monitor",
        f"{monitor}s",
        "--restart-condition",
        "any",
        "--restart-delay",
        "0s",
        "--stop-grace-period",
        f"{stop_grace}s",
        *extra,
        image,
        *command,
    )


def swarm_healthy_tasks(run: DockerRun, name: str) -> list[str]:
    """Ids of this service's containers the engine reports healthy (one engine)."""
    return run(
        "ps",
        "-q",
        "--filter",
        f"label=com.docker.swarm.service.name={name}",
        "--filter",
        "health=healthy",
    ).split()


def wait_for(check: Callable[[], bool], timeout: float, what: str, poll: float = 0.05) -> float:
    """Seconds until ``check()`` holds; SystemExit naming ``what`` after ``timeout``."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise SystemExit(f"{what}: not within {timeout:.0f} s")
        time.sleep(poll)
    return time.monotonic() - start


def kill_recoveries(
    healthy: Callable[[], list[str]],
    kill: Callable[[str], None],
    replicas: int,
    kills: int,
    settle: float = 0.0,
) -> list[float]:
    """SIGKILL a healthy instance (a Kiln instance or a Swarm task; the first ``healthy()``
    lists) ``kills`` times: seconds until the service is back to ``replicas`` healthy ones
    without the victim. One function for Kiln and its peer, so both are timed the same
    way. ``settle``: seconds at full strength before each kill, so the victim is not a
    replacement that has just started (Kiln counts the death of one ready for less than
    its ``healthy_period`` as a crash loop and backs off)."""
    out = []
    for _ in range(kills):
        wait_for(lambda: len(healthy()) == replicas, 120, "full strength")
        time.sleep(settle)
        victim = healthy()[0]

        def replaced(gone: str = victim) -> bool:
            now = healthy()
            return len(now) >= replicas and gone not in now

        start = time.monotonic()
        kill(victim)
        wait_for(replaced, 120, "a SIGKILLed instance replaced")
        out.append(time.monotonic() - start)
    return out


def docker_runner(host: str) -> DockerRun:
    """A :data:`DockerRun` on the engine at ``host`` whose failure says what the engine said."""

    def run(*args: str) -> str:
        done = docker(host, *args, check=False)
        if done.returncode != 0:
            raise SystemExit(f"docker {' '.join(args[:2])}: {done.stderr.strip()[-500:]}")
        return str(done.stdout)

    return run
