"""``kiln policy test [DIR]``: a thin command over :func:`kiln.policy.gate.run_tests`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kiln.cli.app import app
from kiln.errors import KilnError

policy_app = typer.Typer(help="The policy gate's Rego policies.", no_args_is_help=True)
app.add_typer(policy_app, name="policy")


@policy_app.command("test")
def policy_test(
    directory: Annotated[Path, typer.Argument(help="Where the .rego files are.")] = Path("policy"),
) -> None:
    """Run every test_ rule of the .rego files under DIRECTORY; exit 1 when one fails."""
    from kiln.policy.gate import run_tests

    if not directory.is_dir():
        raise KilnError(f"{directory}: no such directory of policies")
    outcomes = run_tests(directory)
    for o in outcomes:
        verdict = "PASS" if o.passed else "FAIL"
        typer.echo(
            f"{verdict} {o.package}.{o.rule} ({o.files})" + (f": {o.error}" if o.error else "")
        )
    failed = sum(not o.passed for o in outcomes)
    typer.echo(f"{len(outcomes) - failed} passed, {failed} failed")
    if failed:
        raise typer.Exit(1)
