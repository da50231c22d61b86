"""Progressive delivery and phoenix guarantees: figures for issue 12, one section per
function, each on a busybox httpd service of ``--replicas`` instances brought up through
the CLI in a private ``KILN_HOME`` (health every 0.5 s, ``min_healthy_time`` 0.5 s,
``max_surge`` 1), with 4 closed-loop load workers through Kiln's proxy.

Run: ``.venv/bin/python bench/progressive.py [--quick] [--only SECTION] [--json FILE]``.
The default runs each churn for 5 minutes, as issue 12 asks (``--churn``), 5 switches and
canaries and 10 faults of each kind: about 30 minutes with the swarm. ``--quick`` runs
each churn for 1 minute, 2 of each run and 4 faults: about 10 minutes.

* ``peer``: the same image as a Docker Swarm service on a private engine (one node),
  configured as Kiln is: ``--update-order start-first`` (max_unavailable 0),
  ``--update-parallelism REPLICAS`` (blue/green starts the whole set beside the old),
  ``--update-monitor 0.5s`` = ``min_healthy_time``, health every 0.5 s (timeout 1 s,
  3 retries), ``--restart-delay 0s``, stop grace 1 s. Its update time and the time from
  a SIGKILLed task to full healthy strength (the one ``kill_recoveries`` of
  bench/_common.py that times Kiln on swarm too). Swarm can only check health by exec
  in the task (busybox ``wget``); its tasks share the host's network here.
* ``bluegreen``: a blue/green switch under load, ``--runs`` times: failed requests,
  the deployment's first event → ``bluegreen.switched`` (after the bake and plan in the
  CLI; the peer's update time also includes stopping the old tasks), and how long both
  sets answered (first green answer to last blue one).
* ``canary``: a good revision promoted through two steps (10 %, 50 %) under load:
  failed requests, apply → ``canary.promoted``.
* ``badcanary``: a canary answering 500 to a quarter of requests at 20 % for 20 s:
  requests that reached it (the analysis' own count) and failed requests before the
  abort, against the bound weight × rate × pause; ``canary.step`` → ``canary.aborted``.
* ``drift``: ``drift_interval = "1s"``, a file planted in an instance's root on disk
  (``kiln chaos drift``'s injector): injection → replacement ready; then the agent CPU
  of one pass per instance, full and quick, from ``kiln drift --json`` (``cpu_seconds``
  / ``instances_checked``).
* ``chaos``: SIGKILLs of an instance's sandbox init timed exactly as the peer's tasks
  are (``kill_recoveries``), then ``kiln chaos`` kill, pause (1 s) and latency (200 ms
  for 2 s): time to recovery, median and p95 (drift is the ``drift`` section's, at a
  1 s interval).
* ``churn``: ``max_age`` as short as Kiln allows for the service (4 × its estimated
  rollout: 12 s for 3 replicas), under constant load for ``--churn`` seconds:
  replacements and failed requests.
* ``swarm``: Kiln on the three-node swarm of the multi-node tests (tests/swarm_cluster.py,
  ``[runtime] kind = "swarm"``, load through the edge of node 2): blue/green switches,
  SIGKILLs of an instance's container on its node (timed as the peer's are), ``kiln
  chaos kill`` (which on swarm scales the task's service to 0), and a ``max_age`` churn
  (20 s). Then Swarm's own service of Kiln's image on the same cluster, configured as in
  ``peer``. A canary answering 500 to a quarter of requests at 20 % for 20 s with load
  only through the edges of nodes 2 and 3, judged from the counters they report: failed
  requests before the abort against the bound; then a good canary (20 % for 3 s)
  promoted: failed requests. Drift there has no file check (docs/drift.md): the table
  says so.

Where no peer tool exists on the machine (canary analysis, drift, max_age) the table
says "no peer on this machine". Swarm's failed-request figure cannot be taken here: its
routing mesh needs IPVS, which this kernel lacks, so it is never printed as 0.

On a shared 2-core machine the load generator, the router and the instances compete
for CPU: the ratios matter more than the absolute figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _common import (
    docker_runner,
    kill_recoveries,
    median_p95,
    private_dockerd,
    swarm_healthy_tasks,
    swarm_service_create,
    wait_for,
)

from busybox_tree import build_busybox_rootfs, free_port
from kiln.agent.client import AgentClient
from kiln.observe.chaos import ChaosPlan, ChaosReport, run_chaos
from kiln.observe.load import LoadGenerator
from kiln.spec.models import Health, Update, shortest_max_age

KILN = str(Path(sys.executable).parent / "kiln")
NO_PEER = "no peer on this machine"
HEALTH_INTERVAL = 0.5
MIN_HEALTHY = 0.5
STOP_GRACE = 1.0
WORKERS = 4
SETTLE = 11.0
"""Seconds at full strength before a SIGKILL: past Kiln's ``healthy_period`` (10 s), so a
kill is a death, not a crash loop that backs off. Kiln and the peer wait the same."""
CGI = "/cgi-bin/app"
GOOD = 'printf "Content-Type: text/plain\\r\\n\\r\\n{version}\\n"'
FLAKY = (
    'if [ $((RANDOM % 4)) -eq 0 ]; then printf "Status: 500 Boom\\r\\n\\r\\nboom\\n"; '
    "else " + GOOD + "; fi"
)
BAD_WEIGHT, BAD_PAUSE = 20, 20.0
PEER_COMMAND = (
    # Swarm's tasks share the host's network here (no overlay or bridge for them): each
    # listens on a port of its own and writes it down for its health check.
    "sh",
    "-c",
    "P=$((RANDOM % 20000 + 30000)); echo $P > /tmp/port; exec httpd -f -p 127.0.0.1:$P -h /www",
)
PEER_HEALTH = "wget -q -O /dev/null http://127.0.0.1:$(cat /tmp/port)/healthz"
PEER_OPTIONS = ("--network", "host", "--user", "0")
PEER_AS_KILN = (
    # What the swarm runtime gives each of Kiln's tasks (runtime/swarm.py ``_create``).
    "--network", "peer-net", "--publish", "mode=host,target=8080", "--user", "65534:65534",
    "--read-only", "--init", "--cap-drop", "ALL",
)  # fmt: skip
PEER_TASK_HEALTH = "wget -q -O /dev/null http://127.0.0.1:8080/healthz"

TOML = """\
[project]
name = "bench-{name}"
{runtime}
[images.web]
from = "scratch"
steps = [{{ copy = "rootfs/", to = "/" }}]
cmd = ["/bin/sh", "-c", "exec httpd -f -p $PORT -h /www"]
user = "65534:65534"

[services.web]
image = "web"
replicas = {replicas}
listen = {listen}
health = {{ http = "/healthz", interval = "{interval}s", timeout = "1s" }}
stop_grace = "{grace}s"
drain_timeout = "{grace}s"
heal = {{ meltdown_fraction = 100.0 }}
{extra}
"""


# -- the figures ------------------------------------------------------------------------


@dataclass
class Row:
    section: str
    label: str
    kiln: str
    peer: str


@dataclass
class Figures:
    """What the run measured: table rows for the end, numbers for ``--json``."""

    rows: list[Row] = field(default_factory=list)
    numbers: dict[str, Any] = field(default_factory=dict)

    def add(self, section: str, label: str, kiln: str, peer: str = NO_PEER) -> None:
        self.rows.append(Row(section, label, kiln, peer))
        print(f"  {label}: kiln {kiln}; {peer}", flush=True)

    def table(self) -> str:
        widths = [
            max([len(k)] + [len(getattr(r, k)) for r in self.rows])
            for k in ("section", "label", "kiln")
        ]
        lines = [
            f"{'section':<{widths[0]}}  {'label':<{widths[1]}}  "
            f"{'kiln':<{widths[2]}}  peer (same settings)"
        ]
        for r in self.rows:
            lines.append(
                f"{r.section:<{widths[0]}}  {r.label:<{widths[1]}}  {r.kiln:<{widths[2]}}  {r.peer}"
            )
        return "\n".join(lines)


def spread(samples: list[float], unit: str = "s") -> str:
    if not samples:
        return "(no samples)"
    med, p95 = median_p95(samples)
    return f"median {med:.2f} {unit}, p95 {p95:.2f} {unit} (n={len(samples)})"


def ratio(kiln_samples: list[float], peer_samples: list[float], peer: str) -> str:
    if not peer_samples:
        return f"{peer}: no figure"
    kiln_median, peer_median = median_p95(kiln_samples)[0], median_p95(peer_samples)[0]
    return f"{peer} {spread(peer_samples)}; kiln/{peer} {kiln_median / peer_median:.2f}"


class VersionClock:
    """A load generator's ``classify``: when each answer body was first and last seen,
    so a switch shows how long both sets answered."""

    def __init__(self) -> None:
        self.first: dict[str, float] = {}
        self.last: dict[str, float] = {}
        self._lock = threading.Lock()

    def __call__(self, body: str) -> str:
        now, key = time.monotonic(), body.strip()
        with self._lock:
            self.first.setdefault(key, now)
            self.last[key] = now
        return key

    def overlap(self, old: str, new: str) -> float | None:
        """Seconds from the first ``new`` answer to the last ``old`` one (0: none mixed)."""
        if old not in self.last or new not in self.first:
            return None
        return max(0.0, self.last[old] - self.first[new])


# -- a service on the local runtime -------------------------------------------------------


def kiln_cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, KILN_HOME=str(home))
    env.pop("KILN_ADDR", None)
    return subprocess.run([KILN, *args], env=env, text=True, capture_output=True, timeout=900)


@dataclass
class Deployed:
    """One service ``web`` up in its own KILN_HOME; ``roll`` bakes and applies a revision."""

    home: Path
    project: Path
    listen: int
    client: AgentClient

    def roll(self, version: str, cgi: str = GOOD) -> tuple[float, subprocess.CompletedProcess[str]]:
        """Wall-clock start (to compare with event times) and the ``kiln apply``."""
        write_revision(self.project, version, cgi)
        began = time.time()
        return began, kiln_cli(self.home, "apply", "--file", str(self.project), "--yes")

    def events(self, kind: str, since: float, any_kind: bool = False) -> list[dict[str, Any]]:
        """Events of ``kind`` (or all) at or after wall-clock ``since``, page by page."""
        found: list[dict[str, Any]] = []
        cursor = 0
        while page := self.client.events(after=cursor, limit=10_000):
            found += [e for e in page if (any_kind or e["kind"] == kind) and e["ts"] >= since]
            cursor = int(page[-1]["id"])
        return found

    def deployment_began(self, event: dict[str, Any], since: float) -> float:
        """When the deployment ``event`` belongs to emitted its first event (after the
        bake and plan in the CLI): what Swarm's update time is compared with."""
        deployment = (event.get("data") or {}).get("deployment")
        mine = [e for e in self.events("", since, any_kind=True) if
                (e.get("data") or {}).get("deployment") == deployment]  # fmt: skip
        return float(min(e["ts"] for e in mine)) if mine else since

    def ready(self) -> list[dict[str, Any]]:
        found = self.client.status()["services"]["web"]["instances"]
        return [i for i in found if i["state"] == "ready"]


def service_toml(name: str, replicas: int, listen: int, extra: str, runtime: str = "") -> str:
    return TOML.format(
        name=name,
        runtime=runtime,
        replicas=replicas,
        listen=listen,
        interval=HEALTH_INTERVAL,
        grace=STOP_GRACE,
        extra=extra,
    )


def write_revision(project: Path, version: str, cgi: str = GOOD) -> None:
    """What a revision serves: ``/`` answers ``version``, the CGI runs ``cgi``."""
    www = project / "rootfs" / "www"
    (www / "index.html").write_text(f"{version}\n")
    (www / "cgi-bin" / "app").write_text("#!/bin/sh\n" + cgi.format(version=version) + "\n")
    (www / "cgi-bin" / "app").chmod(0o755)


def make_project(project: Path, toml: str) -> None:
    """A busybox httpd project serving v1."""
    build_busybox_rootfs(
        project / "rootfs",
        www={"healthz": "ok\n", "index.html": "v1\n"},
        applets=("sh", "httpd", "printf", "wget", "cat"),
        users=False,
    )
    cgi = project / "rootfs" / "www" / "cgi-bin"
    cgi.mkdir()
    cgi.chmod(0o755)
    (project / "kiln.toml").write_text(toml)
    write_revision(project, "v1")


@contextlib.contextmanager
def local_service(name: str, replicas: int, extra: str) -> Iterator[Deployed]:
    """``kiln up`` of v1 (good) in a fresh home; ``kiln down`` after."""
    with tempfile.TemporaryDirectory(prefix=f"kiln-bench-{name}-") as tmp:
        root = Path(tmp)
        home, project, listen = root / "home", root / "p", free_port()
        make_project(project, service_toml(name, replicas, listen, extra))
        up = kiln_cli(home, "up", str(project))
        if up.returncode != 0:
            raise SystemExit(f"kiln up ({name}) failed:\n{up.stderr[-3000:]}")
        try:
            with AgentClient(home, addr="") as client:
                yield Deployed(home, project, listen, client)
        finally:
            kiln_cli(home, "down")


def update_table(**keys: str) -> str:
    inner = ", ".join(f"{k} = {v}" for k, v in keys.items())
    return f"update = {{ {inner} }}"


# -- (1) blue/green -----------------------------------------------------------------------


def bluegreen_section(args: argparse.Namespace, figures: Figures) -> None:
    extra = update_table(
        strategy='"blue-green"', blue_hold='"2s"', min_healthy_time=f'"{MIN_HEALTHY}s"'
    )
    failed, sent, switch, overlap, applies = 0, 0, [], [], []
    with local_service("bluegreen", args.replicas, extra) as svc:
        for run in range(args.runs):
            old, new = f"v{run + 1}", f"v{run + 2}"
            clock = VersionClock()
            with LoadGenerator("127.0.0.1", svc.listen, workers=WORKERS, classify=clock) as load:
                time.sleep(0.5)
                began, out = svc.roll(new)
                applies.append(time.time() - began)
                time.sleep(0.5)
            if out.returncode != 0:
                raise SystemExit(f"blue/green apply failed:\n{out.stderr[-2000:]}")
            [switched] = svc.events("bluegreen.switched", began)
            switch.append(switched["ts"] - svc.deployment_began(switched, began))
            both = clock.overlap(old, new)
            if both is not None:
                overlap.append(both * 1000)
            failed, sent = failed + load.report.failed, sent + load.report.sent
            print(
                f"  run {run + 1}: switched {switch[-1]:.2f} s after the deployment began, both "
                f"sets answered {(both or 0) * 1000:.0f} ms; {load.report.summary()}",
                flush=True,
            )
    peer = figures.numbers.get("swarm_peer_local", {}).get("update", [])
    figures.numbers["bluegreen"] = {
        "failed": failed,
        "sent": sent,
        "deployment_to_switch_s": switch,
        "both_sets_answered_ms": overlap,
        "apply_s": applies,
    }
    figures.add(
        "bluegreen",
        "failed requests during the switch",
        f"{failed} of {sent}",
        "swarm: not measurable here (its routing mesh needs IPVS)",
    )
    figures.add(
        "bluegreen",
        "deployment → switched (green started, ready)",
        spread(switch),
        ratio(switch, peer, "swarm start-first update"),
    )
    figures.add("bluegreen", "both sets answering", spread(overlap, "ms"))


# -- (2) canary, good ---------------------------------------------------------------------


def canary_extra(steps: str) -> str:
    return update_table(
        strategy='"canary"',
        steps=steps,
        analysis="{ max_error_rate = 0.05, min_requests = 20 }",
        min_healthy_time=f'"{MIN_HEALTHY}s"',
        healthy_deadline='"20s"',
        progress_deadline='"60s"',
    )


def canary_section(args: argparse.Namespace, figures: Figures) -> None:
    pause = 3 if args.quick else 5
    steps = f'[{{ weight = 10, pause = "{pause}s" }}, {{ weight = 50, pause = "{pause}s" }}]'
    failed, sent, took, promoted = 0, 0, [], 0
    with local_service("canary", args.replicas, canary_extra(steps)) as svc:
        for run in range(args.runs):
            with LoadGenerator("127.0.0.1", svc.listen, workers=WORKERS) as load:
                time.sleep(0.5)
                began, out = svc.roll(f"v{run + 2}")
                time.sleep(0.5)
            done = svc.events("canary.promoted", began)
            if out.returncode == 0 and done:
                promoted += 1
                took.append(done[0]["ts"] - began)
            failed, sent = failed + load.report.failed, sent + load.report.sent
            print(
                f"  run {run + 1}: {'promoted' if done else 'NOT promoted'} "
                f"{took[-1] if done else 0:.1f} s after apply; {load.report.summary()}",
                flush=True,
            )
    figures.numbers["canary"] = {
        "failed": failed,
        "sent": sent,
        "promoted": promoted,
        "runs": args.runs,
        "apply_to_promoted_s": took,
        "steps": f"10% {pause}s, 50% {pause}s",
    }
    figures.add(
        "canary",
        f"failed requests, good canary 10%/50% × {pause}s",
        f"{failed} of {sent} ({promoted}/{args.runs} promoted)",
    )
    figures.add("canary", "apply → promoted", spread(took))


# -- (3) bad canary -----------------------------------------------------------------------


def badcanary_section(args: argparse.Namespace, figures: Figures) -> None:
    steps = f'[{{ weight = {BAD_WEIGHT}, pause = "{BAD_PAUSE:g}s" }}]'
    runs: list[dict[str, float]] = []
    with local_service("badcanary", args.replicas, canary_extra(steps)) as svc:
        for run in range(args.runs):
            with LoadGenerator("127.0.0.1", svc.listen, path=CGI, workers=WORKERS) as load:
                time.sleep(0.5)
                load_began = time.monotonic()
                began, _ = svc.roll(f"bad{run + 1}", FLAKY)
                time.sleep(0.5)
                seconds = time.monotonic() - load_began
            aborted = svc.events("canary.aborted", began)
            step = svc.events("canary.step", began)
            if not aborted or not step:
                print(f"  run {run + 1}: NOT aborted; {load.report.summary()}", flush=True)
                continue
            numbers = aborted[0]["data"]["analysis"]["canary"]
            rate = load.report.sent / seconds
            figure = {
                "failed": load.report.failed,
                "reached_canary": numbers["requests"],
                "canary_errors": numbers.get("errors", 0),
                "bound": BAD_WEIGHT / 100 * rate * BAD_PAUSE,
                "step_to_abort_s": aborted[0]["ts"] - step[0]["ts"],
                "sent": load.report.sent,
            }
            runs.append(figure)
            print(
                f"  run {run + 1}: aborted {figure['step_to_abort_s']:.2f} s into the step; "
                f"{figure['reached_canary']} requests reached the canary, {figure['failed']} "
                f"failed; bound {figure['bound']:.0f}; {load.report.summary()}",
                flush=True,
            )
    figures.numbers["badcanary"] = {"weight": BAD_WEIGHT, "pause_s": BAD_PAUSE, "runs": runs}
    if not runs:
        figures.add("badcanary", "bad canary", "never aborted")
        return
    figures.add(
        "badcanary",
        f"reached the canary / failed / bound ({BAD_WEIGHT}% × rate × {BAD_PAUSE:g}s)",
        "; ".join(f"{r['reached_canary']}/{r['failed']}/{r['bound']:.0f}" for r in runs),
    )
    figures.add("badcanary", "step → abort", spread([r["step_to_abort_s"] for r in runs]))


# -- (4) drift ----------------------------------------------------------------------------


def chaos_report(label: str, report: ChaosReport) -> list[float]:
    samples = [f.recovery_seconds for f in report.faults if f.recovery_seconds is not None]
    detected = [f.detected for f in report.faults if f.detected is not None]
    print(
        f"  {label}: {spread(samples)}, recovered {len(samples)}/{len(report.faults)}, "
        f"{report.failed} of {report.sent} requests failed, load p95 {report.p95_ms:.1f} ms"
        + (f", drift detected {sum(detected)}/{len(detected)}" if detected else ""),
        flush=True,
    )
    return samples


def drift_cpu_ms(home: Path, quick: bool, passes: int) -> list[float]:
    """Agent CPU of one drift pass per instance, in ms, from ``kiln drift --json``."""
    out = []
    for _ in range(passes):
        done = kiln_cli(home, "drift", "--json", *(("--quick",) if quick else ()))
        if done.returncode not in (0, 2):
            raise SystemExit(f"kiln drift failed:\n{done.stderr[-2000:]}")
        report = json.loads(done.stdout)
        out.append(report["cpu_seconds"] / max(1, report["instances_checked"]) * 1000)
    return out


def drift_section(args: argparse.Namespace, figures: Figures) -> None:
    extra = f'drift_interval = "1s"\nupdate = {{ min_healthy_time = "{MIN_HEALTHY}s" }}'
    with local_service("drift", args.replicas, extra) as svc:
        plan = ChaosPlan(
            kind="drift", service="web", count=args.faults, every=1.0, probe=1.0,
            recovery_timeout=30.0,
        )  # fmt: skip
        report = run_chaos(plan, svc.home, status=svc.client.status)
        took = chaos_report("drift (file in an instance's root)", report)
        full = drift_cpu_ms(svc.home, quick=False, passes=args.runs * 2)
        quick = drift_cpu_ms(svc.home, quick=True, passes=args.runs * 2)
    figures.numbers["drift"] = {
        "injection_to_replacement_s": took,
        "faults": len(report.faults),
        "failed": report.failed,
        "sent": report.sent,
        "cpu_ms_per_instance_full": full,
        "cpu_ms_per_instance_quick": quick,
    }
    figures.add(
        "drift",
        "injection → replacement ready (instance root, interval 1s)",
        f"{spread(took)}; {report.failed} of {report.sent} requests failed",
    )
    figures.add("drift", "CPU per instance per pass, full", spread(full, "ms"))
    figures.add("drift", "CPU per instance per pass, quick", spread(quick, "ms"))


# -- (5) chaos ----------------------------------------------------------------------------


def chaos_section(args: argparse.Namespace, figures: Figures) -> None:
    extra = f'update = {{ min_healthy_time = "{MIN_HEALTHY}s" }}'
    kinds = (  # kind, label, how long a pause or latency lasts
        ("kill", "SIGKILL", 0.0),
        ("pause", "pause 1 s", 1.0),
        ("latency", "latency 200 ms for 2 s", 2.0),
    )
    peer = figures.numbers.get("swarm_peer_local", {}).get("kills", [])
    no_peer = {
        "kill": "swarm: the row above (kiln chaos also waits for no rollout and every "
        "health check passing)",
        "pause": "swarm: no pause for a task",
        "latency": NO_PEER,
    }
    with local_service("chaos", args.replicas, extra) as svc:

        def ready_ids() -> list[str]:
            return [str(i["id"]) for i in sorted(svc.ready(), key=lambda i: -float(i["age"]))]

        def kill(instance: str) -> None:
            [pid] = [int(i["pid"]) for i in svc.ready() if i["id"] == instance]
            os.kill(pid, signal.SIGKILL)

        with LoadGenerator("127.0.0.1", svc.listen, workers=WORKERS) as load:
            kills = kill_recoveries(ready_ids, kill, args.replicas, args.faults, SETTLE)
        figures.numbers["sigkill"] = {
            "recovery_s": kills, "failed": load.report.failed, "sent": load.report.sent,
            "errors": load.report.errors,
        }  # fmt: skip
        figures.add(
            "chaos",
            "SIGKILL → full strength, timed as the peer's",
            f"{spread(kills)}; {load.report.failed} of {load.report.sent} failed",
            ratio(kills, peer, "swarm"),
        )
        for kind, label, lasts in kinds:
            every = SETTLE if kind == "kill" else 1.0
            plan = ChaosPlan(kind=kind, service="web", count=args.faults, every=every, probe=1.0,
                             duration=lasts or 1.0, delay=0.2)  # fmt: skip
            report = run_chaos(plan, svc.home, status=svc.client.status)
            took = chaos_report(label, report)
            figures.numbers[f"chaos_{kind}"] = {
                "recovery_s": took,
                "faults": len(report.faults),
                "failed": report.failed,
                "sent": report.sent,
            }
            figures.add(
                "chaos",
                f"kiln chaos {label}: time to recovery",
                f"{spread(took)}; {report.failed} of {report.sent} failed",
                no_peer[kind],
            )


# -- (6) max_age churn --------------------------------------------------------------------


def churn_max_age(replicas: int) -> float:
    health = Health.model_validate({"http": "/healthz", "interval": HEALTH_INTERVAL})
    update = Update.model_validate({"min_healthy_time": MIN_HEALTHY})
    return shortest_max_age(replicas, update, health)


def churn_section(args: argparse.Namespace, figures: Figures) -> None:
    max_age = churn_max_age(args.replicas)
    extra = f'max_age = "{max_age:g}s"\nupdate = {{ min_healthy_time = "{MIN_HEALTHY}s" }}'
    with local_service("churn", args.replicas, extra) as svc:
        began = time.time()
        with LoadGenerator("127.0.0.1", svc.listen, workers=WORKERS) as load:
            time.sleep(args.churn)
        aged = svc.events("instance.aged", began)
        alive = len(svc.ready())
    figures.numbers["churn"] = {
        "max_age_s": max_age,
        "seconds": args.churn,
        "replacements": len(aged),
        "failed": load.report.failed,
        "sent": load.report.sent,
        "errors": load.report.errors,
        "ready_at_end": alive,
    }
    print(f"  {len(aged)} replacements; {load.report.summary()}", flush=True)
    figures.add(
        "churn",
        f"max_age {max_age:g}s, {args.churn:g}s under load",
        f"{load.report.failed} failed of {load.report.sent}, {len(aged)} replacements "
        f"({len(aged) / args.replicas:.1f} per instance)",
    )


# -- Swarm as the peer on this machine ----------------------------------------------------


def swarm_peer_local(args: argparse.Namespace, figures: Figures) -> None:
    """The same busybox image on a one-node swarm of a private engine: a start-first
    update of the whole set at once (what blue/green starts) and SIGKILL recoveries."""
    with tempfile.TemporaryDirectory(prefix="kiln-bench-peer-") as tmp:
        root = Path(tmp)
        home, project = root / "home", root / "p"
        make_project(project, service_toml("peer", 1, free_port(), ""))
        baked = kiln_cli(home, "bake", str(project))
        archive = root / "web.tar"
        exported = kiln_cli(
            home, "image", "export", "web", "--format", "docker", "-o", str(archive)
        )
        if baked.returncode != 0 or exported.returncode != 0:
            print(f"  peer image: {(baked.stderr + exported.stderr)[-1500:]}")
            return
        with private_dockerd() as host:
            if host is None:
                print("  swarm: no Docker engine could start here; no peer figures")
                return
            run = docker_runner(host)
            ref = run("load", "-i", str(archive)).strip().split()[-1]
            run("tag", ref, "kiln-bench-web:1")
            run("swarm", "init", "--advertise-addr", "127.0.0.1")
            swarm_service_create(
                run, "peer", "kiln-bench-web:1", args.replicas,
                health_cmd=PEER_HEALTH, interval=HEALTH_INTERVAL, timeout=1.0, retries=3,
                parallelism=args.replicas, monitor=MIN_HEALTHY, stop_grace=STOP_GRACE,
                env={"GREETING": "v0"}, extra=PEER_OPTIONS, command=PEER_COMMAND,
            )  # fmt: skip
            wait_for(lambda: len(swarm_healthy_tasks(run, "peer")) == args.replicas, 120,
                     "swarm: peer service healthy")  # fmt: skip
            updates = []
            for n in range(args.runs):
                start = time.perf_counter()
                run(
                    "service", "update", "--detach=false", "--env-add", f"GREETING=v{n + 1}", "peer"
                )
                updates.append(time.perf_counter() - start)
                print(f"  swarm start-first update {n + 1}: {updates[-1]:.2f} s", flush=True)

            def kill(container: str) -> None:
                run("kill", "-s", "KILL", container)

            kills = kill_recoveries(
                lambda: swarm_healthy_tasks(run, "peer"), kill, args.replicas, args.faults, SETTLE
            )
            print(f"  swarm SIGKILL recovery: {spread(kills)}", flush=True)
            run("service", "rm", "peer")
    figures.numbers["swarm_peer_local"] = {"update": updates, "kills": kills}
    figures.add("peer", "swarm start-first update, whole set", "-", f"swarm {spread(updates)}")
    figures.add("peer", "swarm SIGKILL → healthy again", "-", f"swarm {spread(kills)}")


# -- (7) Kiln on the three-node swarm -----------------------------------------------------


def swarm_runtime_table(cluster: Any) -> str:
    """The cluster's manager and registry, and each node's engine (``[runtime] nodes``:
    the file drift check and ``kiln chaos drift``/``pause`` reach a task through it)."""
    nodes = "".join(f'"{n.address}" = "{n.host}"\n' for n in cluster.nodes)
    return (
        f'\n[runtime]\nkind = "swarm"\nhost = "{cluster.manager.host}"\n'
        f'registry = "{cluster.registry}/bench"\n\n[runtime.nodes]\n{nodes}\n'
        f'[registries."{cluster.registry}"]\nca = "{cluster.registry_ca}"\n'
    )


@contextlib.contextmanager
def swarm_agent(home: Path, project: Path, cluster: Any) -> Iterator[AgentClient]:
    """``kiln agent --listen`` on the cluster's bridge (every node's edge watches it)."""
    home.mkdir(mode=0o700)
    log = open(home / "agent-fg.log", "wb")  # noqa: SIM115 - closed below
    agent = subprocess.Popen(
        [KILN, "agent", "--listen", f"{cluster.gateway}:{free_port()}", "--file", str(project)],
        env=dict(os.environ, KILN_HOME=str(home)),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(lambda: (home / "agent.sock").exists(), 30, "the swarm agent's socket")
        with AgentClient(home, addr="") as client:
            yield client
    finally:
        kiln_cli(home, "down")
        if agent.poll() is None:
            agent.terminate()
            agent.wait(30)
        log.close()


def edge_answers(address: str, port: int) -> bool:
    with contextlib.suppress(OSError, ValueError):
        load = LoadGenerator(address, port, workers=1)
        with load:
            time.sleep(0.3)
        return load.report.sent > 0 and load.report.failed == 0
    return False


def kiln_on_swarm(
    args: argparse.Namespace, figures: Figures, cluster: Any, root: Path
) -> list[str]:
    """Blue/green through the edge of node 2, ``kiln chaos kill``, ``drift`` and
    ``pause``, a max_age churn; returns the images of Kiln's revisions, which the peer
    updates through in the same order."""
    home, project, listen = root / "home", root / "p", free_port()
    max_age = max(20.0, churn_max_age(args.replicas))
    bluegreen = update_table(
        strategy='"blue-green"', blue_hold='"2s"', min_healthy_time=f'"{MIN_HEALTHY}s"'
    )
    runtime = swarm_runtime_table(cluster)
    drift = 'drift_interval = "1s"\n'
    make_project(project, service_toml("swarm", args.replicas, listen, drift + bluegreen, runtime))
    edge = cluster.nodes[1].address
    numbers: dict[str, Any] = {}
    with swarm_agent(home, project, cluster) as client:
        svc = Deployed(home, project, listen, client)
        up = kiln_cli(home, "up", str(project), "--yes")
        if up.returncode != 0:
            raise SystemExit(f"kiln up on swarm failed:\n{up.stderr[-2000:]}")
        wait_for(lambda: edge_answers(edge, listen), 300, "the edge of node 2", poll=0.5)
        images = [f"{cluster.registry}/bench/web@{svc.ready()[0]['digest']}"]
        failed, sent, switch = 0, 0, []
        for run in range(args.runs):
            with LoadGenerator(edge, listen, workers=WORKERS) as load:
                time.sleep(0.5)
                began, out = svc.roll(f"v{run + 2}")
                time.sleep(1.0)
            if out.returncode != 0:
                raise SystemExit(f"blue/green on swarm failed:\n{out.stderr[-2000:]}")
            [switched] = svc.events("bluegreen.switched", began)
            switch.append(switched["ts"] - svc.deployment_began(switched, began))
            images.append(f"{cluster.registry}/bench/web@{svc.ready()[0]['digest']}")
            failed, sent = failed + load.report.failed, sent + load.report.sent
            print(
                f"  swarm blue/green {run + 1}: switched {switch[-1]:.2f} s after the "
                f"deployment began; through the edge of node 2: {load.report.summary()}",
                flush=True,
            )
        numbers.update(bluegreen_failed=failed, bluegreen_sent=sent, deployment_to_switch_s=switch)
        numbers.update(swarm_canaries(svc, cluster, listen, bluegreen, args.runs))

        def ready_ids() -> list[str]:
            return [str(i["id"]) for i in sorted(svc.ready(), key=lambda i: -float(i["age"]))]

        def kill(instance: str) -> None:
            """SIGKILL its container on its node, as the peer's tasks are killed."""
            [address] = [i["address"] for i in svc.ready() if i["id"] == instance]
            node = next(n for n in cluster.nodes if n.address == address.rpartition(":")[0])
            [container] = cluster.containers(node, f"dev.kiln.instance={instance}")
            node.docker("kill", "-s", "KILL", container["Id"])

        with LoadGenerator(edge, listen, workers=WORKERS) as load:
            kills = kill_recoveries(ready_ids, kill, args.replicas, args.faults, SETTLE)
        numbers.update(
            sigkill_recovery_s=kills,
            sigkill_failed=load.report.failed,
            sigkill_sent=load.report.sent,
            sigkill_errors=load.report.errors,
        )
        print(f"  swarm SIGKILL of a container: {spread(kills)}; {load.report.summary()}")
        plan = ChaosPlan(kind="kill", service="web", count=args.faults, every=SETTLE, probe=1.0)
        report = run_chaos(plan, home, status=client.status)
        numbers["kill_recovery_s"] = chaos_report("swarm kiln chaos kill (scaled to 0)", report)
        numbers.update(kill_failed=report.failed, kill_sent=report.sent)
        for kind in ("drift", "pause"):
            plan = ChaosPlan(kind=kind, service="web", count=args.faults, every=1.0, probe=1.0,
                             duration=1.0)  # fmt: skip
            report = run_chaos(plan, home, status=client.status)
            numbers[f"{kind}_recovery_s"] = chaos_report(f"swarm kiln chaos {kind}", report)
            numbers.update({f"{kind}_failed": report.failed, f"{kind}_sent": report.sent})
            if kind == "drift":
                numbers["drift_detected"] = sum(bool(f.detected) for f in report.faults)

        churn = (
            (project / "kiln.toml")
            .read_text()
            .replace(bluegreen, f'max_age = "{max_age:g}s"\n' + bluegreen)
        )
        (project / "kiln.toml").write_text(churn)
        began, out = svc.roll(f"v{args.runs + 2}")
        if out.returncode != 0:
            raise SystemExit(f"max_age on swarm refused:\n{out.stderr[-2000:]}")
        with LoadGenerator(edge, listen, workers=WORKERS) as load:
            time.sleep(args.churn)
        aged = svc.events("instance.aged", began)
        numbers.update(churn_failed=load.report.failed, churn_sent=load.report.sent,
                       churn_replacements=len(aged), max_age_s=max_age)  # fmt: skip
        print(f"  swarm max_age {max_age:g}s: {len(aged)} replacements; {load.report.summary()}")
    figures.numbers["swarm"] = numbers
    return images


def swarm_canaries(
    svc: Deployed, cluster: Any, listen: int, bluegreen: str, runs: int
) -> dict[str, Any]:
    """A bad canary, then a good one, with load only through the edges of nodes 2 and 3:
    the analysis sees those requests only through the counters the edges report."""
    toml = svc.project / "kiln.toml"
    before = toml.read_text()
    edges = [cluster.nodes[1].address, cluster.nodes[2].address]
    bad_steps = f'[{{ weight = {BAD_WEIGHT}, pause = "{BAD_PAUSE:g}s" }}]'
    found: dict[str, Any] = {"bad": [], "good_failed": 0, "good_sent": 0, "good_promoted": 0}
    for run in range(runs):
        toml.write_text(before.replace(bluegreen, canary_extra(bad_steps)))
        with contextlib.ExitStack() as stack:
            loads = [
                stack.enter_context(LoadGenerator(e, listen, path=CGI, workers=WORKERS // 2))
                for e in edges
            ]
            time.sleep(0.5)
            load_began = time.monotonic()
            began, _ = svc.roll(f"swarm-bad{run + 1}", FLAKY)
            time.sleep(0.5)
            seconds = time.monotonic() - load_began
        failed, sent = sum(x.report.failed for x in loads), sum(x.report.sent for x in loads)
        aborted = svc.events("canary.aborted", began)
        if not aborted:
            print(f"  swarm bad canary {run + 1}: NOT aborted", flush=True)
            continue
        analysis = aborted[0]["data"]["analysis"]
        figure = {
            "failed": failed,
            "sent": sent,
            "reached_canary": analysis["canary"]["requests"],
            "edges_reporting": analysis.get("edges", {}).get("reporting", 0),
            "bound": BAD_WEIGHT / 100 * (sent / seconds) * BAD_PAUSE,
        }
        found["bad"].append(figure)
        print(
            f"  swarm bad canary {run + 1} (edges of nodes 2 and 3): {failed} failed of {sent} "
            f"before the abort; {figure['reached_canary']} reached the canary, "
            f"{figure['edges_reporting']} edges reporting; bound {figure['bound']:.0f}",
            flush=True,
        )
    good_steps = '[{ weight = 20, pause = "3s" }]'
    for run in range(runs):
        toml.write_text(before.replace(bluegreen, canary_extra(good_steps)))
        with contextlib.ExitStack() as stack:
            loads = [
                stack.enter_context(LoadGenerator(e, listen, path=CGI, workers=WORKERS // 2))
                for e in edges
            ]
            time.sleep(0.5)
            began, out = svc.roll(f"swarm-good{run + 1}")
            time.sleep(0.5)
        failed, sent = sum(x.report.failed for x in loads), sum(x.report.sent for x in loads)
        promoted = out.returncode == 0 and bool(svc.events("canary.promoted", began))
        found["good_failed"] += failed
        found["good_sent"] += sent
        found["good_promoted"] += promoted
        print(
            f"  swarm good canary {run + 1}: {'promoted' if promoted else 'NOT promoted'}; "
            f"{failed} failed of {sent}",
            flush=True,
        )
    toml.write_text(before)
    return {"canary": found}


def swarm_peer_on_cluster(
    args: argparse.Namespace, cluster: Any, images: list[str]
) -> tuple[list[float], list[float]]:
    """Swarm's own service of Kiln's images, run as Kiln runs a task (an overlay network,
    a host-mode port, the image's user, read-only root, init, no capability) and updated
    through the same revisions, each pulled afresh as Kiln's were: update times and
    SIGKILL recoveries."""
    live = [n for n in cluster.nodes if n.index not in cluster.cut_nodes]
    for node in live:
        node.docker("image", "prune", "--all", "--force")

    def healthy() -> list[str]:
        return [c for node in live for c in swarm_healthy_tasks(node.docker, "peer")]

    def kill(container: str) -> None:
        node = next(n for n in live if container in n.docker("ps", "-q").split())
        node.docker("kill", "-s", "KILL", container)

    manager = cluster.manager
    manager.docker("network", "create", "--driver", "overlay", "peer-net")
    swarm_service_create(
        manager.docker, "peer", images[0], args.replicas,
        health_cmd=PEER_TASK_HEALTH, interval=HEALTH_INTERVAL, timeout=1.0, retries=3,
        parallelism=args.replicas, monitor=MIN_HEALTHY, stop_grace=STOP_GRACE,
        env={"PORT": "8080"}, extra=PEER_AS_KILN,
    )  # fmt: skip
    try:
        wait_for(lambda: len(healthy()) == args.replicas, 300, "swarm peer healthy", poll=0.3)
        updates = []
        for n in range(args.runs):
            start = time.perf_counter()
            manager.docker("service", "update", "--detach=false", "--image", images[n + 1], "peer")
            updates.append(time.perf_counter() - start)
            print(f"  swarm peer start-first update {n + 1}: {updates[-1]:.2f} s", flush=True)
        kills = kill_recoveries(healthy, kill, args.replicas, args.faults, SETTLE)
        print(f"  swarm peer SIGKILL recovery: {spread(kills)}", flush=True)
    finally:
        manager.docker("service", "rm", "peer")
        wait_for(lambda: not healthy(), 60, "the swarm peer's tasks gone", poll=0.3)
        with contextlib.suppress(RuntimeError):
            manager.docker("network", "rm", "peer-net")
    return updates, kills


def swarm_section(args: argparse.Namespace, figures: Figures) -> None:
    """One three-node swarm: Kiln first (then kiln down), then Swarm's own service."""
    from swarm_cluster import start_cluster

    with tempfile.TemporaryDirectory(prefix="kiln-bench-swarm-") as tmp:
        cluster = start_cluster()
        try:
            images = kiln_on_swarm(args, figures, cluster, Path(tmp))
            updates, kills = swarm_peer_on_cluster(args, cluster, images)
        finally:
            cluster.stop()
    k = figures.numbers["swarm"]
    k.update(peer_update_s=updates, peer_kill_recovery_s=kills)
    figures.add(
        "swarm",
        "blue/green: failed requests through another node's edge",
        f"{k['bluegreen_failed']} of {k['bluegreen_sent']}",
        "swarm: not measurable here (its routing mesh needs IPVS)",
    )
    figures.add(
        "swarm",
        "blue/green: deployment → switched",
        spread(k["deployment_to_switch_s"]),
        ratio(k["deployment_to_switch_s"], updates, "swarm start-first update"),
    )
    figures.add(
        "swarm",
        "SIGKILL of a container: time to recovery",
        f"{spread(k['sigkill_recovery_s'])}; {k['sigkill_failed']} of {k['sigkill_sent']} failed",
        ratio(k["sigkill_recovery_s"], kills, "swarm"),
    )
    figures.add(
        "swarm",
        "kiln chaos kill (task's service scaled to 0): recovery",
        f"{spread(k['kill_recovery_s'])}; {k['kill_failed']} of {k['kill_sent']} failed",
        "swarm: the same SIGKILL figure above",
    )
    figures.add(
        "swarm",
        f"max_age {k['max_age_s']:g}s, {args.churn:g}s under load (edge of node 2)",
        f"{k['churn_failed']} failed of {k['churn_sent']}, {k['churn_replacements']} replacements",
    )
    canary = k["canary"]
    figures.add(
        "swarm",
        f"bad canary through 2 edges: reached / failed / bound ({BAD_WEIGHT}% × rate × "
        f"{BAD_PAUSE:g}s)",
        "; ".join(f"{r['reached_canary']}/{r['failed']}/{r['bound']:.0f}" for r in canary["bad"])
        or "never aborted",
        "no peer on this machine",
    )
    figures.add(
        "swarm",
        "good canary through 2 edges (20% × 3s): failed requests",
        f"{canary['good_failed']} of {canary['good_sent']} "
        f"({canary['good_promoted']}/{args.runs} promoted)",
        "no peer on this machine",
    )
    figures.add(
        "swarm",
        "kiln chaos drift (a file in a task's root, 1 s interval) → replaced",
        f"{spread(k['drift_recovery_s'])}; {k['drift_detected']} found as drift; "
        f"{k['drift_failed']} of {k['drift_sent']} failed",
        "no drift check in Swarm",
    )
    figures.add(
        "swarm",
        "kiln chaos pause 1 s (through the node's engine): recovery",
        f"{spread(k['pause_recovery_s'])}; {k['pause_failed']} of {k['pause_sent']} failed",
        "swarm: no pause for a task",
    )


SECTIONS: dict[str, Callable[[argparse.Namespace, Figures], None]] = {
    "peer": swarm_peer_local,
    "bluegreen": bluegreen_section,
    "canary": canary_section,
    "badcanary": badcanary_section,
    "drift": drift_section,
    "chaos": chaos_section,
    "churn": churn_section,
    "swarm": swarm_section,
}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="about 5 minutes, a 1-minute churn")
    parser.add_argument("--only", action="append", choices=sorted(SECTIONS), help="a section")
    parser.add_argument("--replicas", type=int, default=3, help="instances of each service")
    parser.add_argument("--runs", type=int, help="switches and canaries (default 5, quick 2)")
    parser.add_argument("--faults", type=int, help="chaos faults of each kind (10, quick 4)")
    parser.add_argument("--churn", type=float, help="max_age churn seconds (300, quick 60)")
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    args = parser.parse_args()
    args.runs = args.runs or (2 if args.quick else 5)
    args.faults = args.faults or (4 if args.quick else 10)
    args.churn = args.churn or (60.0 if args.quick else 300.0)
    figures = Figures()
    figures.numbers["settings"] = {
        "quick": args.quick, "replicas": args.replicas, "runs": args.runs,
        "faults": args.faults, "churn_s": args.churn, "health_interval_s": HEALTH_INTERVAL,
        "min_healthy_time_s": MIN_HEALTHY, "load_workers": WORKERS,
    }  # fmt: skip
    started = time.monotonic()
    for name in args.only or list(SECTIONS):
        print(f"== {name}", flush=True)
        try:
            SECTIONS[name](args, figures)
        except (SystemExit, Exception) as e:  # one section failing is a result, not the end
            print(f"  {name} could not run: {e}", flush=True)
            figures.add(name, "could not run", str(e).splitlines()[0][:120] if str(e) else "?")
    print(
        f"\nissue 12 figures ({args.replicas} busybox instances, health every "
        f"{HEALTH_INTERVAL}s, min_healthy_time = update-monitor = {MIN_HEALTHY}s, "
        f"{WORKERS} load workers; {time.monotonic() - started:.0f} s)\n{figures.table()}",
        flush=True,
    )
    if args.json:
        args.json.write_text(json.dumps(figures.numbers, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
