"""``kiln chaos KIND --service S``: a fault experiment with a report (kiln.observe.chaos).

Exit 0 when every fault recovered and the steady state held after; 2 when the
experiment ran but the service did not heal; 1 when it refused to start (the steady
state did not hold before) or could not run.
"""

from __future__ import annotations

import enum
import sys
from typing import Annotated

import typer

from kiln.cli.app import JsonFlag, app, emit_json
from kiln.errors import KilnError
from kiln.paths import kiln_home


class FaultKind(enum.StrEnum):
    kill = "kill"
    pause = "pause"
    drift = "drift"
    latency = "latency"


def _seconds(option: str, value: str) -> float:
    from kiln.spec.models import parse_duration

    try:
        return parse_duration(value, maximum=24 * 3600)
    except ValueError as e:
        raise KilnError(f"{option}: {e}") from e


@app.command()
def chaos(
    kind: Annotated[FaultKind, typer.Argument(help="kill, pause, drift or latency")],
    service: Annotated[str, typer.Option("--service", "-s", help="The service to hit.")],
    count: Annotated[int, typer.Option("--count", "-n", help="Faults to inject.")] = 1,
    every: Annotated[str, typer.Option("--every", help="Time between injections.")] = "5s",
    duration: Annotated[
        str, typer.Option("--duration", help="How long a pause or latency fault lasts.")
    ] = "5s",
    delay: Annotated[str, typer.Option("--delay", help="latency: the delay added.")] = "100ms",
    max_error_rate: Annotated[
        float, typer.Option("--max-error-rate", help="Steady state: probe error rate at most.")
    ] = 0.01,
    timeout: Annotated[
        str, typer.Option("--timeout", help="Wait at most this for recovery of each fault.")
    ] = "60s",
    path: Annotated[str, typer.Option("--path", help="The URL path the load requests.")] = "/",
    as_json: JsonFlag = False,
) -> None:
    """Inject faults into a service's instances under load and report how it heals."""
    from kiln.observe.chaos import ChaosPlan, render_report, run_chaos

    plan = ChaosPlan(
        kind=kind.value,
        service=service,
        count=count,
        every=_seconds("--every", every),
        duration=_seconds("--duration", duration),
        delay=_seconds("--delay", delay),
        max_error_rate=max_error_rate,
        recovery_timeout=_seconds("--timeout", timeout),
        path=path,
    )
    report = run_chaos(
        plan, kiln_home(), progress=None if as_json else lambda line: print(line, file=sys.stderr)
    )
    if as_json:
        emit_json(report.to_json())
    else:
        print(render_report(report))
    if not report.held:
        raise typer.Exit(2)
