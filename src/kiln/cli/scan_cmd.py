"""``kiln scan REF`` and ``kiln scan db import PATH``: thin commands over
:mod:`kiln.supply.scan` and :mod:`kiln.supply.osv`.

``scan`` is a group whose default command is the image scan, so ``kiln scan REF`` and
``kiln scan db …`` both read naturally.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from kiln.cli.app import JsonFlag, _Group, app, emit_json

FINDINGS_EXIT = 3
"""Findings remain (``kiln status`` uses 3 for "not every service is well")."""


class _DefaultImageGroup(_Group):
    """Anything that is not a subcommand is the image scan's: ``kiln scan REF``."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["image", *args]
        return list(super().parse_args(ctx, args))


scan_app = typer.Typer(
    cls=_DefaultImageGroup,
    help="Scan an image's SBOM for known vulnerabilities, offline: `kiln scan REF` is "
    "`kiln scan image REF`.",
    no_args_is_help=True,
)
db_app = typer.Typer(help="The local OSV advisory database.", no_args_is_help=True)
scan_app.add_typer(db_app, name="db")
app.add_typer(scan_app, name="scan", cls=_DefaultImageGroup)

DbOption = Annotated[
    Path | None,
    typer.Option("--db", help="The database file (default: KILN_HOME/scan/osv.db)."),
]


@scan_app.command("image")
def scan_image_cmd(
    ref: str,
    as_json: JsonFlag = False,
    max_db_age: Annotated[
        str | None,
        typer.Option("--max-db-age", help='Fail when the newest advisory is older (e.g. "7d").'),
    ] = None,
    suppressions: Annotated[
        Path | None,
        typer.Option(
            "--suppressions", help="TOML file of accepted findings (\\[\\[suppression]] tables)."
        ),
    ] = None,
    db: DbOption = None,
) -> None:
    """Match REF's SBOM against the advisories: exit 3 when findings remain, 0 when clean."""
    from kiln.supply.scan import parse_age, scan_image

    age = parse_age(max_db_age) if max_db_age is not None else None
    report = scan_image(ref, db_path=db, max_db_age=age, suppressions=suppressions)
    if as_json:
        emit_json(report.as_json())
    else:
        print("\n".join(report.lines()))
    if report.findings:
        raise typer.Exit(FINDINGS_EXIT)


@db_app.command("import")
def db_import(path: Path, db: DbOption = None, as_json: JsonFlag = False) -> None:
    """Load OSV advisories (a .json file, a directory of them, or a zip such as all.zip)."""
    from kiln.supply.osv import import_advisories

    result = import_advisories(path, db, warn=lambda line: print(line, file=sys.stderr))
    if as_json:
        emit_json({**vars(result), "database": str(result.database)})
    else:
        print(
            f"imported {result.imported} advisories ({result.skipped} skipped) into "
            f"{result.database}: {result.advisories} in all"
        )


@db_app.command("status")
def db_status(db: DbOption = None, as_json: JsonFlag = False) -> None:
    """Show how many advisories the database holds and how old the newest is."""
    from kiln.supply.osv import OsvDatabase
    from kiln.supply.scan import age_text

    with OsvDatabase(db) as database:
        info = database.info()
    age = info.age_seconds()
    if as_json:
        emit_json({**vars(info), "path": str(info.path), "age_seconds": age})
        return
    newest = f"{info.newest_modified:%Y-%m-%d %H:%M} UTC" if info.newest_modified else "none"
    imported = f"{info.imported_at:%Y-%m-%d %H:%M} UTC" if info.imported_at else "never"
    aged = f" ({age_text(age)} ago)" if age is not None else ""
    print(f"{info.path}: {info.advisories} advisories, newest modified {newest}{aged}")
    print(f"imported {imported}")
