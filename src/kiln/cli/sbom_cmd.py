"""``kiln sbom`` and ``kiln image referrers``: thin commands over :mod:`kiln.supply.sbom`
and the store's referrer index."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from kiln.cli.app import JsonFlag, _store, app, emit_json, image_app
from kiln.errors import KilnError


@app.command("sbom")
def sbom_cmd(
    ref: str,
    fmt: Annotated[
        str, typer.Option("--format", help="cyclonedx (1.6 JSON) or spdx (2.3 JSON)")
    ] = ("cyclonedx"),
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write to FILE instead of stdout.")
    ] = None,
) -> None:
    """Print REF's software bill of materials (the one its bake attached)."""
    from kiln.supply.sbom import image_sbom

    if fmt not in ("cyclonedx", "spdx"):
        raise KilnError(f"--format: {fmt!r} is not one of cyclonedx, spdx")
    text = json.dumps(image_sbom(_store(), ref, fmt), indent=2, sort_keys=True) + "\n"
    if output is None:
        typer.echo(text, nl=False)
        return
    try:
        output.write_text(text)
    except OSError as e:
        raise KilnError(f"cannot write {output}: {e}") from e
    typer.echo(f"wrote {output}", err=True)


@image_app.command("referrers")
def image_referrers(
    ref: str,
    artifact_type: Annotated[
        str | None, typer.Option("--type", help="Only artifacts of this artifactType.")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """List the artifacts attached to REF (SBOM, provenance, signatures)."""
    listed = _store().referrers(ref, artifact_type)
    if as_json:
        emit_json([d.to_json() for d in listed])
        return
    if not listed:
        typer.echo(f"{ref}: no referrers")
        return
    for d in listed:
        created = (d.annotations or {}).get("org.opencontainers.image.created", "")
        typer.echo(f"{d.artifact_type}  {d.digest}  {d.size}  {created}".rstrip())
