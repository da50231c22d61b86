"""How long planning takes for 100 services × 10 instances (the bar: under 1 s).

Builds the state in a real StateStore (in a temporary directory), then times
``snapshot()`` + ``make_plan()`` for three desired states: no change, every
image changed, and replicas doubled. Prints median and p95 per case.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

from kiln.deploy.plan import DesiredService, config_hash, make_plan
from kiln.deploy.state import StateStore

SERVICES = 100
INSTANCES = 10
RUNS = 30
BAR = 1.0


def desired(digest_byte: str, replicas: int) -> dict[str, DesiredService]:
    out = {}
    for n in range(SERVICES):
        name = f"svc{n:03d}"
        cfg = {
            "image": name,
            "replicas": replicas,
            "port": 8080,
            "protocol": "http",
            "env": {"GREETING": "hello", "N": str(n)},
            "secrets": ["api_key"],
            "health": {"http": "/healthz", "interval": 1.0},
            "volumes": [],
            "writable": [],
            "resources": {"memory": None, "cpu": None},
        }
        digest = "sha256:" + digest_byte * 64
        secrets = {"api_key": "1"}
        out[name] = DesiredService(name, cfg, digest, config_hash(cfg, digest, secrets), secrets)
    return out


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp, StateStore(Path(tmp) / "state.db") as store:
        current = desired("a", INSTANCES)
        for name, d in current.items():
            rev = store.next_revision(
                name,
                image_digest=d.image_digest,
                config=d.revision_config(),
                config_hash=d.config_hash,
                status="active",
            )
            for _ in range(INSTANCES):
                store.add_instance(name, rev.number, port=40000, state="ready")
        cases = {
            "no change": current,
            "all images changed": desired("b", INSTANCES),
            "replicas doubled": desired("a", INSTANCES * 2),
        }
        worst = 0.0
        print(f"plan: {SERVICES} services × {INSTANCES} instances, {RUNS} runs each")
        for label, want in cases.items():
            times = []
            for _ in range(RUNS):
                t0 = time.perf_counter()
                plan = make_plan(want, store.snapshot())
                times.append(time.perf_counter() - t0)
            times.sort()
            median = statistics.median(times)
            p95 = times[min(len(times) - 1, int(0.95 * len(times)))]
            worst = max(worst, p95)
            print(
                f"  {label:<20} median {median * 1000:7.1f} ms   p95 {p95 * 1000:7.1f} ms   "
                f"({plan.summary})"
            )
        ok = worst < BAR
        print(f"  {'PASS' if ok else 'FAIL'}: p95 {worst * 1000:.1f} ms (bar {BAR * 1000:.0f} ms)")
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
