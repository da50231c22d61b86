"""``kiln promote`` and ``kiln abort``: thin commands over a running canary
(:mod:`kiln.agent.canary`), and the status line that shows one."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from kiln.cli.app import JsonFlag, app, emit_json
from kiln.paths import kiln_home

ServiceArg = Annotated[str, typer.Argument(help="The service whose canary is running.")]


@app.command("promote")
def promote_cmd(service: ServiceArg, as_json: JsonFlag = False) -> None:
    """Move a canary to its next step now, or switch a blue/green rollout's traffic to green."""
    from kiln.agent.client import AgentClient

    result = AgentClient(kiln_home()).promote(service)
    if as_json:
        emit_json(result)
        return
    if result.get("promoted"):
        typer.echo(f"{service}: {result['promoted']}")
        return
    typer.echo(f"{service}: promote asked at step {result.get('step') or 'start'}")


@app.command("abort")
def abort_cmd(service: ServiceArg, as_json: JsonFlag = False) -> None:
    """Abort the canary now: weight 0, canary retired, revision failed; stable keeps serving."""
    from kiln.agent.client import AgentClient

    result = AgentClient(kiln_home()).abort(service)
    if as_json:
        emit_json(result)
        return
    typer.echo(f"{service}: abort asked; kiln events shows canary.aborted")


def canary_line(info: dict[str, Any]) -> str:
    """``canary step 1/2 at 10%: canary 41 req 0.0% err p95 3 ms · stable 380 req …``"""
    canary = info.get("canary")
    if not isinstance(canary, dict):
        return ""

    def numbers(side: dict[str, Any]) -> str:
        p95 = side.get("p95_ms")
        shown = f"{p95:g} ms" if isinstance(p95, int | float) else "-"
        return (
            f"{side.get('requests', 0)} req, {float(side.get('error_rate') or 0):.1%} errors, "
            f"p95 {shown}"
        )

    line = (
        f"canary step {canary.get('step')}/{canary.get('steps')} at {canary.get('weight')}% "
        f"({canary.get('elapsed')}/{canary.get('pause')}s): "
        f"canary {numbers(canary.get('canary') or {})} · "
        f"stable {numbers(canary.get('stable') or {})} · {canary.get('verdict')}"
    )
    edges = canary.get("edges")
    if isinstance(edges, dict):  # swarm: what every node's edge reported
        line += f" · edges: {edges.get('reporting', 0)} reporting"
        stale = edges.get("stale") or []
        if stale:
            line += f", stale {', '.join(str(name) for name in stale)}"
    return line
