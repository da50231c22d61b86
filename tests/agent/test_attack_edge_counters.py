# ruff: noqa: F811 - the remote fixture is imported by name and used as a parameter
"""An edge token in a stranger's hands, against the agent's sum of edge counters: the
largest reports the API takes (parsed by its own model), made of invented backends and
edges, must not grow what the agent keeps past what its routes name; counts past 2**63
(resets an edge may claim again and again) still judge and serialise."""

from __future__ import annotations

import json
import threading
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from pydantic import ValidationError
from test_remote_api import RemoteAgent, remote  # noqa: F401 - a real agent over TLS

from kiln.agent.api import MAX_EDGE_REPORT, MAX_ID, EdgeReport
from kiln.agent.canary import _snapshot, judge, window
from kiln.agent.edge_counters import EdgeCounters, with_edges
from kiln.agent.tokens import EDGE_ROLE
from kiln.spec.models import CanaryAnalysis

ROUTED = {"c", "s"}
INVENTED = 4096
EDGES = 8


def _hostile_report(edge: str, requests: int) -> EdgeReport:
    """As large as the API takes: 4,096 invented backends with a histogram each, and
    the two the route has, parsed by the API's own model."""
    latency = {str(k): 1 for k in range(26)}
    backends: dict[str, Any] = {
        f"x{i}": {"requests": requests, "latency": latency} for i in range(INVENTED - 2)
    }
    backends |= {bid: {"requests": requests} for bid in ROUTED}
    body = json.dumps(
        {"edge": edge, "generation": "ab", "services": {"web": backends}}, separators=(",", ":")
    ).encode()
    assert len(body) <= MAX_EDGE_REPORT
    return EdgeReport.model_validate_json(body)


def test_invented_backends_from_many_edges_cost_the_agent_nothing_it_keeps() -> None:
    """Measured before the fix: 6.7 MiB held per edge generation after its first report
    (1.7 GiB over the 256 edges a service takes, double once totals grow)."""
    agg = EdgeCounters()
    agg.watch("web", lambda: ROUTED)
    reports = [[_hostile_report(f"n{i}", n) for i in range(EDGES)] for n in (1, 5)]
    tracemalloc.start()
    try:
        for round_ in reports:
            for report in round_:
                agg.record(report.edge, report.generation, report.counters())
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert held < 512 * 1024, f"{held / 2**20:.1f} MiB held for {EDGES} edges"
    totals = agg.totals("web")
    assert set(totals) == ROUTED
    assert totals["c"].requests == EDGES * 4


def test_a_backend_an_edge_counted_keeps_counting_after_it_leaves_the_route() -> None:
    routed = set(ROUTED)
    agg = EdgeCounters()
    agg.watch("web", lambda: routed)
    report = _hostile_report("n1", 10)
    agg.record("n1", "ab", report.counters())
    routed.discard("s")  # the stable instance went from the route; the edge still reports
    agg.record("n1", "ab", _hostile_report("n1", 30).counters())
    assert agg.totals("web")["s"].requests == 20
    agg.forget("web")
    agg.watch("web")  # no route given: every backend is kept, as before
    agg.record("n1", "ab", report.counters())
    agg.record("n1", "ab", _hostile_report("n1", 11).counters())
    assert len(agg.totals("web")) == INVENTED


@pytest.mark.parametrize("bucket", ["101", "0007", "1234567891", "99999"])
def test_a_latency_bucket_the_router_never_makes_is_refused(bucket: str) -> None:
    body = {"edge": "n", "generation": "ab",
            "services": {"web": {"c": {"requests": 1, "latency": {bucket: 1}}}}}  # fmt: skip
    with pytest.raises(ValidationError, match="not a bucket of the router's histogram"):
        EdgeReport.model_validate(body)
    body["services"]["web"]["c"]["latency"] = {"100": 1, "110": 1, "99": 1, "0": 1}
    EdgeReport.model_validate(body)


def test_resets_claimed_again_and_again_pass_2_63_and_still_judge_and_serialise() -> None:
    """Each report drops below the last (a reset), so each counts whole: the totals pass
    any SQLite INTEGER, and the analysis and its JSON (the step's saved baseline, the
    event's numbers) still work."""
    agg = EdgeCounters()
    agg.watch("web", lambda: ROUTED)
    agg.record("n1", "ab", {"web": {}})
    baseline = _snapshot(with_edges(None, agg.totals("web")))
    for requests in (MAX_ID, MAX_ID - 1, MAX_ID - 2):
        report = EdgeReport.model_validate(
            {
                "edge": "n1",
                "generation": "ab",
                "services": {
                    "web": {
                        "c": {"requests": requests, "responses": {"5xx": requests}},
                        "s": {"requests": requests, "latency": {"4": requests}},
                    }
                },
            }
        )
        agg.record(report.edge, report.generation, report.counters())
    combined = with_edges(None, agg.totals("web"))
    assert combined is not None and combined.backends["c"].requests > 2**64
    canary = window(combined, baseline, {"c"})
    stable = window(combined, baseline, {"s"})
    verdict = judge(CanaryAnalysis(), canary, stable)
    assert verdict is not None and "error rate" in verdict
    json.dumps({"baseline": _snapshot(combined), "canary": canary.to_json()})


@pytest.mark.serial  # timed: run alone, not beside another worker's load
def test_a_flood_of_the_largest_reports_leaves_the_agent_answering(remote: RemoteAgent) -> None:
    """Four posters send the largest report the API takes, back to back, for 4 s (about
    0.1 s of parsing each); meanwhile the agent still answers its health route: what a
    report costs is spent off the event loop, one report at a time."""
    latency = {str(k): 1 for k in range(26)}
    backends = {f"x{i}": {"requests": 1, "latency": latency} for i in range(INVENTED)}
    body = json.dumps(
        {"edge": "n", "generation": "ab", "services": {"web": backends}}, separators=(",", ":")
    ).encode()
    assert len(body) <= MAX_EDGE_REPORT
    edge = remote.tokens[EDGE_ROLE]
    stop = threading.Event()
    posted: list[int] = []

    def flood() -> None:
        with remote.http() as client:
            while not stop.is_set():
                resp = client.post(
                    "/v1/edge/counters",
                    content=body,
                    headers={"Authorization": f"Bearer {edge}", "Content-Type": "application/json"},
                )
                posted.append(resp.status_code)

    waits: list[float] = []
    with ThreadPoolExecutor(4) as pool:
        floods = [pool.submit(flood) for _ in range(4)]
        try:
            with remote.http() as client:
                viewer = {"Authorization": f"Bearer {remote.tokens['viewer']}"}
                deadline = time.monotonic() + 4
                while time.monotonic() < deadline:
                    began = time.monotonic()
                    assert client.get("/v1/health", headers=viewer).status_code == 200
                    waits.append(time.monotonic() - began)
                    time.sleep(0.05)
        finally:
            stop.set()
        for f in floods:
            f.result()
    waits.sort()
    median, worst = waits[len(waits) // 2], waits[-1]
    refused = posted.count(429)
    print(
        f"{len(posted)} posted ({refused} 429); health median {median:.3f} s, worst {worst:.3f} s"
    )
    assert set(posted) <= {200, 429}, set(posted)
    assert median < 0.25, f"health median {median * 1e3:.0f} ms under the flood"
