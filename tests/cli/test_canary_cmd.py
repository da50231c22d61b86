"""The status line of a running canary: its step, both sides' numbers, the verdict, and
on swarm how many edges report and which went silent."""

from __future__ import annotations

from kiln.cli.canary_cmd import canary_line

ANALYSIS = {
    "step": 1,
    "steps": 2,
    "weight": 20,
    "elapsed": 4.5,
    "pause": 20,
    "canary": {"requests": 41, "error_rate": 0.0244, "p95_ms": 3},
    "stable": {"requests": 380, "error_rate": 0.0, "p95_ms": None},
    "verdict": "passing",
}


def test_the_line_of_a_canary_on_one_machine_has_no_edges() -> None:
    line = canary_line({"canary": ANALYSIS})
    assert line == (
        "canary step 1/2 at 20% (4.5/20s): canary 41 req, 2.4% errors, p95 3 ms · "
        "stable 380 req, 0.0% errors, p95 - · passing"
    )


def test_the_line_of_a_canary_on_swarm_names_its_edges() -> None:
    reporting = canary_line({"canary": {**ANALYSIS, "edges": {"reporting": 3, "stale": []}}})
    assert reporting.endswith("· passing · edges: 3 reporting")
    stale = {"reporting": 1, "stale": ["node-2", "node-3"]}
    line = canary_line({"canary": {**ANALYSIS, "edges": stale}})
    assert line.endswith("· edges: 1 reporting, stale node-2, node-3")
    assert canary_line({}) == ""
