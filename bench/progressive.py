"""Progressive delivery and phoenix guarantees: figures for issue 12, one section per
function.

Run: ``.venv/bin/python bench/progressive.py [--only chaos] [--faults 5]``.

* ``chaos``: a busybox service of ``--replicas`` instances on the local runtime (a
  private ``KILN_HOME``, brought up through the CLI), then ``kiln chaos`` experiments
  through :func:`kiln.observe.chaos.run_chaos` while its built-in load runs: ``--faults``
  SIGKILLs, pauses of 1 s, latency faults of 200 ms for 2 s and drift faults (a file
  in an instance's root). Time to recovery per fault kind (median, p95), requests
  sent and failed, and whether drift was detected. The meltdown breaker is opened
  wide (``heal.meltdown_fraction``): the experiment kills on purpose.

On a shared 2-core machine the load generator, the router and the instances compete
for CPU: the ratios matter more than the absolute figures.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _common import median_p95

from busybox_tree import build_busybox_rootfs, free_port
from kiln.agent.client import AgentClient
from kiln.observe.chaos import ChaosPlan, ChaosReport, run_chaos

KILN = str(Path(sys.executable).parent / "kiln")

TOML = """\
[project]
name = "bench-chaos"

[images.web]
from = "scratch"
steps = [{{ copy = "rootfs/", to = "/" }}]
cmd = ["/bin/sh", "-c", "exec httpd -f -p $PORT -h /www"]
user = "65534:65534"

[services.web]
image = "web"
replicas = {replicas}
listen = {listen}
health = {{ http = "/healthz", interval = "0.5s", timeout = "1s" }}
stop_grace = "1s"
drain_timeout = "1s"
update = {{ min_healthy_time = "0.5s" }}
heal = {{ meltdown_fraction = 100.0 }}
"""


def kiln_cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, KILN_HOME=str(home))
    env.pop("KILN_ADDR", None)
    return subprocess.run([KILN, *args], env=env, text=True, capture_output=True, timeout=600)


def chaos_row(label: str, report: ChaosReport) -> None:
    samples = [f.recovery_seconds for f in report.faults if f.recovery_seconds is not None]
    text = f"{label:<28}"
    if samples:
        med, p95 = median_p95(samples)
        text += f" recovery median {med:6.2f} s  p95 {p95:6.2f} s"
    else:
        text += " recovery: none recovered"
    text += (
        f"  recovered {len(samples)}/{len(report.faults)}"
        f"  failed {report.failed} of {report.sent} requests"
        f"  load p95 {report.p95_ms:.1f} ms"
    )
    detected = [f.detected for f in report.faults if f.detected is not None]
    if detected:
        text += f"  drift detected {sum(detected)}/{len(detected)}"
    print(text, flush=True)
    if report.faults and report.faults[0].detail:
        print(f"{'':<28} ({report.faults[0].detail})", flush=True)


def chaos_section(replicas: int, faults: int) -> None:
    with tempfile.TemporaryDirectory(prefix="kiln-bench-chaos-") as tmp:
        root = Path(tmp)
        home, project = root / "home", root / "p"
        build_busybox_rootfs(
            project / "rootfs",
            www={"healthz": "ok\n", "index.html": "hello\n"},
            applets=("sh", "httpd"),
            users=False,
        )
        (project / "kiln.toml").write_text(TOML.format(replicas=replicas, listen=free_port()))
        up = kiln_cli(home, "up", str(project))
        if up.returncode != 0:
            print(f"kiln up failed: {up.stderr.strip().splitlines()[-1:]}")
            return
        try:
            with AgentClient(home, addr="") as client:
                print(f"{replicas} busybox instances, local runtime, load: 4 workers")
                kinds: tuple[tuple[str, str, dict[str, float]], ...] = (
                    ("kill", "SIGKILL", {}),
                    ("pause", "pause 1 s", {"duration": 1.0}),
                    ("latency", "latency 200 ms for 2 s", {"duration": 2.0, "delay": 0.2}),
                    ("drift", "drift (file in the root)", {"recovery_timeout": 60.0}),
                )
                for kind, label, extra in kinds:
                    plan = ChaosPlan(
                        kind=kind, service="web", count=faults, every=1.0, probe=1.0, **extra
                    )
                    try:
                        report = run_chaos(plan, home, status=client.status)
                    except Exception as e:  # a refused or failed experiment is a figure too
                        print(f"{label:<28} could not run: {e}")
                        continue
                    chaos_row(label, report)
        finally:
            kiln_cli(home, "down")


SECTIONS: dict[str, Callable[[argparse.Namespace], None]] = {
    "chaos": lambda args: chaos_section(args.replicas, args.faults),
}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", action="append", choices=sorted(SECTIONS), help="a section")
    parser.add_argument("--replicas", type=int, default=3, help="chaos: instances")
    parser.add_argument("--faults", type=int, default=5, help="chaos: faults of each kind")
    args = parser.parse_args()
    for name in args.only or list(SECTIONS):
        print(f"== {name}", flush=True)
        SECTIONS[name](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
