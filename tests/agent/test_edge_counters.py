"""The agent's sum of what the Swarm edges counted (``EdgeCounters``): a first report is
a baseline, later ones add what grew, a reset (a lower count, a new generation) counts
from zero, two edges add up, a silent edge keeps its total and is named stale, and the
canary's window over ``router + edges`` sees only the requests after its baseline."""

from __future__ import annotations

from kiln.agent.canary import _snapshot, window
from kiln.agent.edge_counters import MAX_EDGES, STALE_AFTER, EdgeCounters, with_edges
from kiln.traffic.router import BackendCounters, Latency, ServiceCounters


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def counts(
    requests: int, errors5xx: int = 0, latency: dict[int, int] | None = None
) -> BackendCounters:
    b = BackendCounters(requests=requests, latency=Latency(latency or {}))
    b.responses["2xx"] = requests - errors5xx
    b.responses["5xx"] = errors5xx
    return b


def report(**backends: BackendCounters) -> dict[str, dict[str, BackendCounters]]:
    return {"web": dict(backends)}


def test_first_report_is_a_baseline_then_growth_is_added() -> None:
    agg = EdgeCounters(Clock())
    agg.watch("web")
    # Counted before the analysis began: not the canary's.
    assert agg.record("node-1", "g1", report(c=counts(500, 20))) == {
        "counted": ["web"],
        "ignored": [],
    }
    assert agg.totals("web") == {}
    agg.record("node-1", "g1", report(c=counts(530, 23, {5: 30})))
    total = agg.totals("web")["c"]
    assert (total.requests, total.responses["5xx"], total.responses["2xx"]) == (30, 3, 27)
    assert total.latency.counts == {5: 30}
    agg.record("node-1", "g1", report(c=counts(540, 23, {5: 35, 12: 5})))
    total = agg.totals("web")["c"]
    assert (total.requests, total.responses["5xx"]) == (40, 3)
    assert total.latency.counts == {5: 35, 12: 5}


def test_a_lower_report_or_a_new_generation_is_a_reset_never_a_subtraction() -> None:
    agg = EdgeCounters(Clock())
    agg.watch("web")
    agg.record("node-1", "g1", report(c=counts(100)))
    agg.record("node-1", "g1", report(c=counts(150, 5)))
    assert agg.totals("web")["c"].requests == 50
    # HAProxy restarted within the same edge process: its counts began again.
    agg.record("node-1", "g1", report(c=counts(7, 1)))
    total = agg.totals("web")["c"]
    assert (total.requests, total.responses["5xx"]) == (57, 6)
    # Only the latency histogram went down: still a reset.
    agg.record("node-1", "g1", report(c=counts(9, 1, {})))
    agg.record("node-1", "g1", report(c=counts(10, 1, {3: 1})))
    agg.record("node-1", "g1", report(c=counts(12, 1, {4: 2})))
    assert agg.totals("web")["c"].requests == 57 + 2 + 1 + 12
    # The edge process restarted (a new generation) with counts higher than before:
    # still counted from zero, never as the difference with the old process.
    before = agg.totals("web")["c"].requests
    agg.record("node-1", "g2", report(c=counts(400, 0)))
    assert agg.totals("web")["c"].requests == before + 400
    agg.record("node-1", "g2", report(c=counts(410, 0)))
    assert agg.totals("web")["c"].requests == before + 410


def test_two_edges_add_up_and_a_backend_new_at_an_edge_counts_whole() -> None:
    agg = EdgeCounters(Clock())
    agg.watch("web")
    agg.record("node-1", "a", report(s=counts(1000)))
    agg.record("node-2", "b", report(s=counts(2000)))
    # The canary's backend appears after the edges' first reports: all of it is new.
    agg.record("node-1", "a", report(s=counts(1100), c=counts(10, 4)))
    agg.record("node-2", "b", report(s=counts(2050), c=counts(6, 2)))
    totals = agg.totals("web")
    assert totals["s"].requests == 150
    assert (totals["c"].requests, totals["c"].responses["5xx"]) == (16, 6)
    assert agg.describe("web") == {"reporting": 2, "stale": []}


def test_a_silent_edge_keeps_its_total_and_is_named_stale() -> None:
    clock = Clock()
    agg = EdgeCounters(clock)
    agg.watch("web")
    agg.record("node-1", "a", report(c=counts(0)))
    agg.record("node-2", "b", report(c=counts(0)))
    agg.record("node-1", "a", report(c=counts(10)))
    agg.record("node-2", "b", report(c=counts(20)))
    for _ in range(int(STALE_AFTER) + 2):
        clock.now += 1.0
        agg.record("node-1", "a", report(c=counts(10)))
    assert agg.describe("web") == {"reporting": 1, "stale": ["node-2"]}
    assert agg.totals("web")["c"].requests == 30
    agg.record("node-2", "b", report(c=counts(25)))
    assert agg.describe("web") == {"reporting": 2, "stale": []}
    assert agg.totals("web")["c"].requests == 35


def test_only_watched_services_are_kept_and_forgotten_after() -> None:
    agg = EdgeCounters(Clock())
    assert agg.record("node-1", "a", report(c=counts(5))) == {"counted": [], "ignored": ["web"]}
    agg.watch("web")
    agg.record("node-1", "a", {"web": {"c": counts(0)}, "api": {"x": counts(9)}})
    agg.record("node-1", "a", report(c=counts(5)))
    assert agg.watched() == {"web"} and agg.totals("api") == {}
    agg.forget("web")
    assert agg.totals("web") == {} and agg.watched() == set()
    # One edge too many is ignored: a token holder cannot grow the agent's memory.
    agg.watch("web")
    for i in range(MAX_EDGES):
        agg.record(f"n{i}", "a", report(c=counts(1)))
    assert agg.record("one-more", "a", report(c=counts(1)))["ignored"] == ["web"]
    assert agg.describe("web")["reporting"] == MAX_EDGES


def test_the_canary_window_over_router_plus_edges_sees_only_what_came_after() -> None:
    agg = EdgeCounters(Clock())
    agg.watch("web")
    router = ServiceCounters(backends={"c": counts(3), "s": counts(50)})
    agg.record("node-1", "a", report(c=counts(100), s=counts(9000)))
    baseline = _snapshot(with_edges(router, agg.totals("web")))
    agg.record("node-1", "a", report(c=counts(140, 10, {8: 40}), s=counts(9100)))
    router = ServiceCounters(backends={"c": counts(5, 1, {7: 2}), "s": counts(60)})
    combined = with_edges(router, agg.totals("web"))
    canary = window(combined, baseline, {"c"})
    stable = window(combined, baseline, {"s"})
    assert (canary.requests, canary.errors) == (42, 11)
    assert canary.latency.counts == {8: 40, 7: 2}
    assert stable.requests == 110
    # The edge restarts (new generation): the window keeps growing, never goes back.
    agg.record("node-1", "b", report(c=counts(4, 4)))
    canary = window(with_edges(router, agg.totals("web")), baseline, {"c"})
    assert (canary.requests, canary.errors) == (46, 15)


def test_two_processes_under_one_name_never_count_each_others_numbers() -> None:
    """An edge being replaced while the old process still posts: each generation keeps
    its own last report, so interleaved reports add only what each one grew."""
    clock = Clock()
    agg = EdgeCounters(clock)
    agg.watch("web")
    agg.record("node-1", "old", report(c=counts(1000)))
    agg.record("node-1", "new", report(c=counts(3)))  # a restart: counted from zero
    for step in range(1, 4):
        agg.record("node-1", "old", report(c=counts(1000 + 10 * step)))
        agg.record("node-1", "new", report(c=counts(3 + step)))
    assert agg.totals("web")["c"].requests == 3 + 30 + 3
    # The old process goes; its name still reports through the new one: not stale.
    for _ in range(int(STALE_AFTER) + 2):
        clock.now += 1.0
        agg.record("node-1", "new", report(c=counts(6)))
    assert agg.describe("web") == {"reporting": 1, "stale": []}
