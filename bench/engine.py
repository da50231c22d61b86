"""The engine's own cost, apart from the sandboxes and the proxy it drives:

* (a) one plan and one reconcile pass over 100, 1,000 and 10,000 instances,
  with the state in a real StateStore (a temporary directory) and the instances
  on the fake runtime: ``StateStore.snapshot()``, ``make_plan`` for "no change"
  and "every instance replaced", the reconciler's read and decision per service,
  and one pass of the Engine's reconciler. Services hold at most 1,000 replicas
  (kiln.toml's cap), so 10,000 instances are ten services. The per-instance
  cost shows whether growth stays linear;
* (b) the event loop's lag while an Engine on the fake runtime (and the
  in-memory router) deploys 1,000 replicas, rolls them from r1 to r2, and then
  watches them idle: a ticker task measures how late ``asyncio.sleep(0.01)``
  wakes; worst, p99 and median;
* (c) an idle agent watching 30 (then 3) ready instances on the real local
  runtime: ``kiln up`` of a busybox httpd project, then the agent process's CPU
  (utime + stime from /proc/PID/stat) over 60 s, as % of one core; ``kiln down``.

Run: .venv/bin/python bench/engine.py [--idle-seconds 60] [--parts abc]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "agent"))
from agent_harness import put_image

from busybox_tree import build_busybox_rootfs
from kiln.agent.client import AgentClient
from kiln.agent.engine import Engine
from kiln.deploy.plan import DesiredService, desired_from_spec, make_plan
from kiln.deploy.reconcile import ReconcilePolicy, ReconcileView, reconcile
from kiln.deploy.state import StateStore
from kiln.runtime import InstanceSpec
from kiln.runtime.fake import FakeRuntime
from kiln.spec.models import Spec
from kiln.traffic.memory import MemoryRouter

KILN = str(Path(sys.executable).parent / "kiln")
SIZES = (100, 1_000, 10_000)
PER_SERVICE = 1_000
PROJECT = "bench"
DIGEST_A = "sha256:" + "a" * 64
DIGEST_B = "sha256:" + "b" * 64
ROLLOUT_REPLICAS = 1_000
TICK = 0.01


# (a) plan + reconcile pass


def desired(digest: str, total: int) -> dict[str, DesiredService]:
    """``total`` replicas in services of at most PER_SERVICE, as kiln.toml would give them."""
    services: dict[str, Any] = {}
    for n in range(math.ceil(total / PER_SERVICE)):
        services[f"svc{n:02d}"] = {
            "image": digest,
            "replicas": min(PER_SERVICE, total - n * PER_SERVICE),
            "port": 8080,
            "listen": 20000 + n,
            "env": {"GREETING": "hello"},
            "health": {"exec": ["/bin/check"], "interval": "1s"},
        }
    spec = Spec.model_validate({"project": {"name": PROJECT}, "services": services})
    return desired_from_spec(spec, {})


def populate(store: StateStore, runtime: FakeRuntime, want: dict[str, DesiredService]) -> None:
    """Every replica started on the fake runtime and recorded ready, as after a deploy."""
    for name, service in want.items():
        config = {**service.revision_config({}), "project": PROJECT}
        rev = store.next_revision(
            name,
            image_digest=service.image_digest,
            config=config,
            config_hash=service.config_hash,
            status="active",
        )
        for n in range(service.replicas):
            instance_id = f"{name}-{n:05d}"
            handle = runtime.start(
                InstanceSpec(
                    instance_id=instance_id,
                    service=name,
                    revision=rev.number,
                    image_digest=service.image_digest,
                    command=["/bin/app"],
                    user=None,
                    workdir="/",
                    env={"PORT": "8080"},
                    port=8080,
                )
            )
            store.add_instance(
                name,
                rev.number,
                port=8080,
                id=instance_id,
                handle=handle.to_json(),
                state="ready",
                created=time.time() - 3600,
            )


def best_of(runs: int, fn: Callable[[], object]) -> float:
    """The median of ``runs`` timings, in seconds."""
    times = []
    for _ in range(runs):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def reconcile_read(store: StateStore, services: list[str], now: float) -> list[Any]:
    window = ReconcilePolicy().meltdown_window
    return [store.working_set(s, now - window) for s in services]


def reconcile_decide(
    store_records: list[Any], services: list[str], want: dict[str, DesiredService], now: float
) -> None:
    for name, records in zip(services, store_records, strict=True):
        view = ReconcileView.from_records(name, 1, want[name].replicas, records, now)
        decision = reconcile(view, now)
        assert decision.noop, decision


def engine_pass(home: Path, store: StateStore, runtime: FakeRuntime, runs: int) -> float:
    """One pass of the Engine's reconciler (its reads go through its state thread)."""

    async def main() -> float:
        engine = Engine(home, store, runtime, MemoryRouter())
        times = []
        for _ in range(runs):
            began = time.perf_counter()
            await engine.reconciler.once()
            times.append(time.perf_counter() - began)
        await engine.stop()
        return statistics.median(times)

    return asyncio.run(main())


def measure(total: int) -> dict[str, float]:
    """Medians, in seconds, of each part of a plan and a reconcile pass over ``total``."""
    with tempfile.TemporaryDirectory(prefix="kiln-bench-engine-") as tmp:
        home = Path(tmp)
        runtime = FakeRuntime(home)
        store = StateStore(home / "state.db")
        try:
            current = desired(DIGEST_A, total)
            changed = desired(DIGEST_B, total)
            populate(store, runtime, current)
            services = sorted(current)
            runs = 5 if total >= 10_000 else 11
            snap = store.snapshot()
            assert len(snap.instances) == total
            assert make_plan(current, snap, PROJECT).empty
            every = make_plan(changed, snap, PROJECT)
            assert sum(1 for _ in every.changes) == total, every.summary
            now = time.time()
            records = reconcile_read(store, services, now)
            return {
                "services": len(services),
                "snapshot": best_of(runs, store.snapshot),
                "plan_same": best_of(runs, lambda: make_plan(current, snap, PROJECT)),
                "plan_every": best_of(runs, lambda: make_plan(changed, snap, PROJECT)),
                "read": best_of(runs, lambda: reconcile_read(store, services, now)),
                "decide": best_of(runs, lambda: reconcile_decide(records, services, current, now)),
                "engine": engine_pass(home, store, runtime, runs),
            }
        finally:
            store.close()
            runtime.close()


def plan_and_reconcile() -> None:
    print("(a) plan + reconcile pass, state in a StateStore on disk, fake runtime")
    header = (
        f"  {'instances':>9} {'services':>8} {'snapshot':>9} {'plan =':>8} {'plan -/+':>9} "
        f"{'rec read':>9} {'rec decide':>10} {'engine pass':>11} {'total':>9} {'per inst':>9}"
    )
    print(header)
    print("  " + "-" * (len(header) - 2))
    for total in SIZES:
        t = measure(total)
        whole = t["snapshot"] + t["plan_every"] + t["read"] + t["decide"]
        print(
            f"  {total:>9,} {t['services']:>8.0f} {ms(t['snapshot']):>9} {ms(t['plan_same']):>8} "
            f"{ms(t['plan_every']):>9} {ms(t['read']):>9} {ms(t['decide']):>10} "
            f"{ms(t['engine']):>11} {ms(whole):>9} {whole / total * 1e6:>6.1f} µs",
            flush=True,
        )
    print(
        "  plan = : nothing to change; plan -/+ : every instance replaced; total: snapshot"
        " + plan -/+ + reconcile read + decide; medians"
    )


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


# (b) event loop lag during a 1,000-instance rollout


class LagMeter:
    """How late ``asyncio.sleep(TICK)`` wakes, sample by sample, while it runs."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            began = loop.time()
            await asyncio.sleep(TICK)
            self.samples.append(max(0.0, loop.time() - began - TICK))

    def start(self) -> None:
        self.samples = []
        self._task = asyncio.ensure_future(self._tick())

    async def stop(self) -> list[float]:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        return self.samples


def lag_line(label: str, samples: list[float], seconds: float) -> str:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    return (
        f"  {label:<34} {seconds:6.1f} s   lag worst {ordered[-1] * 1000:7.1f} ms   "
        f"p99 {p99 * 1000:6.1f} ms   median {statistics.median(ordered) * 1000:5.2f} ms   "
        f"n={len(ordered)}"
    )


def rollout_spec(image: str, version: str) -> Spec:
    return Spec.model_validate(
        {
            "project": {"name": PROJECT},
            "services": {
                "web": {
                    "image": image,
                    "replicas": ROLLOUT_REPLICAS,
                    "port": 8080,
                    "listen": 18080,
                    "env": {"VERSION": version},
                    "health": {"exec": ["/bin/check"], "interval": "1s", "timeout": "1s"},
                    "stop_grace": "1s",
                    "drain_timeout": "1s",
                    "update": {
                        "max_surge": 100,
                        "max_unavailable": 0,
                        "min_healthy_time": "0.2s",
                        "healthy_deadline": "60s",
                        "progress_deadline": "120s",
                    },
                }
            },
        }
    )


async def deploy(engine: Engine, state: StateStore, spec: Spec) -> dict[str, Any]:
    plan = make_plan(desired_from_spec(spec, {}), state.snapshot(), PROJECT)
    started = await engine.apply(plan.to_json() | {"source": {"project": PROJECT}})
    while True:
        record = await engine.deployment(started["deployment"])
        if record.get("outcome") not in (None, "running"):
            return record
        await asyncio.sleep(0.1)


def loop_lag(idle_seconds: float) -> None:
    print(
        f"\n(b) event loop lag, Engine on the fake runtime: {ROLLOUT_REPLICAS:,} replicas, "
        "max_surge 100, exec health every 1 s"
    )
    with tempfile.TemporaryDirectory(prefix="kiln-bench-lag-") as tmp:
        home = Path(tmp) / "home"
        home.mkdir()
        tree = Path(tmp) / "tree"
        (tree / "bin").mkdir(parents=True)
        (tree / "bin" / "app").write_text("#!/bin/sh\n")
        image = put_image(home, "app:v1", tree, ["/bin/app"])

        async def main() -> None:
            runtime, router = FakeRuntime(home), MemoryRouter()
            state = StateStore(home / "state.db")
            engine = Engine(home, state, runtime, router)
            meter = LagMeter()
            await engine.start()
            try:
                for label, version in (("deploy r1 (1,000 starts)", "1"), ("roll r1 → r2", "2")):
                    meter.start()
                    began = time.perf_counter()
                    record = await deploy(engine, state, rollout_spec(image, version))
                    seconds = time.perf_counter() - began
                    samples = await meter.stop()
                    if record["outcome"] != "succeeded":
                        raise SystemExit(f"{label}: {record}")
                    print(lag_line(label, samples, seconds), flush=True)
                meter.start()
                await asyncio.sleep(idle_seconds)
                samples = await meter.stop()
                print(lag_line("1,000 ready, idle", samples, idle_seconds), flush=True)
                print(
                    f"  fake runtime calls: {runtime.calls}; router applies {router.calls.applies}",
                    flush=True,
                )
            finally:
                await engine.down()
                await engine.stop()
                state.close()

        asyncio.run(main())


# (c) an idle agent on the real runtime

PROJECT_TOML = """\
[project]
name = "idle"

[images.web]
from = "scratch"
steps = [{{ copy = "rootfs/", to = "/" }}]
cmd = ["/bin/sh", "-c", "exec httpd -f -p $PORT -h /www"]
user = "65534:65534"

[services.web]
image = "web"
replicas = {replicas}
listen = {listen}
health = {{ http = "/healthz", interval = "1s", timeout = "1s" }}
stop_grace = "2s"
drain_timeout = "1s"
update = {{ max_surge = 5, min_healthy_time = "0.5s" }}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def kiln(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, KILN_HOME=str(home))
    out = subprocess.run([KILN, *args], env=env, text=True, capture_output=True)
    if out.returncode != 0:
        raise SystemExit(f"kiln {' '.join(args)} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return out


def cpu_ticks(pid: int) -> int:
    """utime + stime of every thread of ``pid``, in clock ticks."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])


def threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return 0


def idle_agent(replicas: int, seconds: float) -> None:
    work = Path(tempfile.mkdtemp(prefix="kiln-bench-idle-"))
    home, project = work / "home", work / "project"
    build_busybox_rootfs(
        project / "rootfs",
        www={"healthz": "ok\n", "index.html": "idle\n"},
        applets=("sh", "httpd"),
        users=False,
    )
    (project / "kiln.toml").write_text(PROJECT_TOML.format(replicas=replicas, listen=free_port()))
    try:
        began = time.perf_counter()
        kiln(home, "up", str(project))
        with AgentClient(home) as client:
            ready = [
                i for i in client.status()["services"]["web"]["instances"] if i["state"] == "ready"
            ]
        if len(ready) != replicas:
            raise SystemExit(f"{len(ready)} of {replicas} instances ready after kiln up")
        up = time.perf_counter() - began
        pid = int((home / "agent.pid").read_text().strip())
        time.sleep(3)  # the tail of the rollout (events, route pushes) settles
        clock = os.sysconf("SC_CLK_TCK")
        before, t0 = cpu_ticks(pid), time.monotonic()
        time.sleep(seconds)
        used = (cpu_ticks(pid) - before) / clock
        elapsed = time.monotonic() - t0
        print(
            f"  {replicas:>2} ready instances: agent CPU {used:.2f} s over {elapsed:.0f} s = "
            f"{used / elapsed * 100:.2f}% of one core  (threads {threads(pid)}, "
            f"kiln up {up:.1f} s)",
            flush=True,
        )
    finally:
        with contextlib.suppress(SystemExit):
            kiln(home, "down")
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--idle-seconds", type=float, default=60.0)
    parser.add_argument("--parts", default="abc", help="which parts to run (default: abc)")
    args = parser.parse_args()
    if "a" in args.parts:
        plan_and_reconcile()
    if "b" in args.parts:
        loop_lag(min(args.idle_seconds, 10.0))
    if "c" in args.parts:
        print(
            f"\n(c) idle agent on the local runtime, HTTP health every 1 s, "
            f"CPU over {args.idle_seconds:.0f} s"
        )
        for replicas in (30, 3):
            idle_agent(replicas, args.idle_seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
