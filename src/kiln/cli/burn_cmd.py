"""``kiln burn`` and ``kiln evidence``: thin commands over quarantine
(:mod:`kiln.agent.quarantine`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kiln.cli.app import JsonFlag, app, emit_json
from kiln.paths import kiln_home


@app.command("burn")
def burn_cmd(
    instance: Annotated[str, typer.Argument(help="The suspect instance's id.")],
    keep_evidence: Annotated[
        bool,
        typer.Option("--keep-evidence", help="Freeze it and write its evidence bundle first."),
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Replace a suspect instance now (its service gets a new one)."""
    from kiln.agent.client import AgentClient

    result = AgentClient(kiln_home()).burn(instance, keep_evidence)
    if as_json:
        emit_json(result)
        return
    kept = f"; evidence in {result['evidence']}" if result.get("evidence") else ""
    typer.echo(f"{result['instance']} burnt{kept}")


@app.command("evidence")
def evidence_cmd(
    instance: Annotated[str, typer.Argument(help="The quarantined or burnt instance's id.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Where to write the bundle.")],
) -> None:
    """Export an instance's evidence bundle (checked against its manifest first)."""
    from kiln.agent.quarantine import export_evidence

    result = export_evidence(kiln_home(), instance, output)
    typer.echo(f"{instance}: {', '.join(result['files'])} → {result['path']}")
