"""``kiln render kubernetes``: manifests for a cluster the user's own tools apply."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kiln.cli.app import EnvOption, Target, app

render_app = typer.Typer(
    help="Write what another platform runs from kiln.toml (Kiln applies none of it).",
    no_args_is_help=True,
)
app.add_typer(render_app, name="render")


@render_app.command("kubernetes")
def render_kubernetes(
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Directory for SERVICE.yaml (made if absent).")
    ],
    target: Target = None,
    env: EnvOption = None,
    registry: Annotated[
        str | None,
        typer.Option("--registry", help="HOST\\[:PORT]\\[/PREFIX] the images are pulled from."),
    ] = None,
) -> None:
    """Bake, then write a Deployment, Service and PodDisruptionBudget per service."""
    from kiln.deploy.kubernetes import render_project

    for path in render_project(target or Path.cwd(), env, output, registry=registry):
        print(f"wrote {path}")
