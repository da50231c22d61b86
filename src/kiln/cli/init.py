"""``kiln init``: a working ``kiln.toml`` and app, the first command of a newcomer.

The writing is :func:`kiln.spec.templates.write_project`; this prints what was
written and the commands that come next.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated

import typer

from kiln.cli.app import app

TEMPLATE_HELP = (
    "python (the default): a small web app on Python's standard library, 2 replicas; "
    "static: a static site served by busybox httpd, 2 replicas; "
    "redis: a Redis cache behind a TCP listener."
)
"""Every template of :data:`kiln.spec.templates.TEMPLATES`, described without importing
it: that module imports pydantic, which no help text may pay for."""


def _template_names(incomplete: str) -> list[str]:
    from kiln.spec.templates import TEMPLATES

    return [name for name in TEMPLATES if name.startswith(incomplete)]


@app.command()
def init(
    directory: Annotated[
        Path | None,
        typer.Argument(help="Where to write the project (default: .; made if missing)."),
    ] = None,
    template: Annotated[
        str,
        typer.Option(
            "--template",
            "-t",
            help=TEMPLATE_HELP,
            autocompletion=_template_names,
        ),
    ] = "python",
    name: Annotated[
        str | None,
        typer.Option("--name", help="The project name (default: the directory's, made valid)."),
    ] = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="Overwrite the template's files where they exist.", metavar=""
        ),
    ] = False,
) -> None:
    """Write a kiln.toml and an app that kiln up runs at once, with comments that teach it."""
    from kiln.spec.templates import write_project

    target = directory or Path(".")
    result = write_project(target, template, name, force)
    where = "" if target == Path(".") else f" in {target}"
    print(f"wrote the {result.template} template as project {result.project}{where}:")
    for path in result.files:
        print(f"  {path}")
    print("next:")
    if target != Path("."):
        print(f"  cd {shlex.quote(str(target))}")
    serves = f", served on port {result.listen}" if result.listen is not None else ""
    instances = f"{result.replicas} instance{'s' if result.replicas != 1 else ''}"
    print(f"  kiln up        # bake the image, start {instances}{serves}")
    if result.try_it:
        print(f"  {result.try_it}")
    edit = " or ".join([*result.files[1:], "kiln.toml"])
    print(
        f"then edit {edit} and run kiln apply to roll out the change; "
        f"kiln status, kiln logs {result.service}, kiln rollback {result.service}"
    )
