"""``kiln drift``: a thin command over the agent's drift pass (:mod:`kiln.agent.drift`)."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from kiln.cli.app import JsonFlag, app, emit_json
from kiln.errors import KilnError
from kiln.paths import kiln_home

DRIFT_FOUND_EXIT = 2
"""Exit status when an instance differs from its revision (0 clean, 1 error)."""


@app.command("drift")
def drift_cmd(
    service: Annotated[str | None, typer.Argument(help="Only this service.")] = None,
    quick: Annotated[
        bool, typer.Option("--quick", help="Metadata only: no file is re-hashed.")
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Prove every instance still matches its revision; exit 2 when one does not."""
    from kiln.agent.client import AgentClient

    report = AgentClient(kiln_home()).drift(service, full=not quick)
    if as_json:
        emit_json(report)
    else:
        _print(report)
    if report.get("drift"):
        raise typer.Exit(DRIFT_FOUND_EXIT)
    if report.get("errors"):
        raise KilnError("drift check incomplete: " + "; ".join(map(str, report["errors"])))


def printable(value: object) -> str:
    """``value`` as one line safe for a terminal: a file name in an instance's root is
    the instance's to choose, so a control character (an escape sequence, a newline), a
    byte that is not UTF-8 or a backslash is shown as an escape, never written as is."""

    def escape(ch: str) -> str:
        if ch == "\\":
            return "\\\\"
        if ch.isprintable():
            return ch
        return f"\\x{ord(ch):02x}" if ord(ch) <= 0xFF else f"\\u{ord(ch):04x}"

    return "".join(map(escape, str(value)))


def _print(report: dict[str, Any]) -> None:
    kind = "full" if report.get("full") else "quick"
    drifts = report.get("drift") or []
    typer.echo(
        f"{kind} drift check: {report.get('instances_checked', 0)} instance(s), "
        f"{len(drifts)} drifted"
    )
    for drift in drifts:
        head = f"{drift['service']}/{drift['instance']}: {drift['what']}: {drift['detail']}"
        typer.echo(f"{printable(head)} [{printable(drift['action'])}]")
        for item in drift.get("files") or []:
            change = printable(item["change"])
            typer.echo(f"  {change:<8} {printable(item['path'])}  {printable(item['detail'])}")
        if drift.get("files_not_listed"):
            typer.echo(f"  … and {drift['files_not_listed']} more")
    for name in report.get("snapshots_rebuilt") or []:
        typer.echo(f"layer snapshot {name} rebuilt from its verified blob")
