"""``kiln secret set|list|rm``: thin commands over :class:`kiln.deploy.secrets.SecretStore`.

A value comes from a file or stdin, never from an argument, so it never lands
in shell history or ``ps``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from kiln.cli.app import JsonFlag, app, emit_json
from kiln.errors import KilnError
from kiln.paths import kiln_home

secret_app = typer.Typer(
    help="Secret values for services, versioned; mounted under /run/secrets.",
    no_args_is_help=True,
)
app.add_typer(secret_app, name="secret")


def _store() -> Any:
    from kiln.deploy.secrets import SecretStore

    return SecretStore(kiln_home() / "secrets")


def read_value(source: Path | None) -> bytes:
    if source is None:
        if sys.stdin.isatty():
            print("reading the value from stdin; end it with Ctrl-D", file=sys.stderr)
        return sys.stdin.buffer.read()
    try:
        return source.read_bytes()
    except OSError as e:
        raise KilnError(f"--from-file {source}: {e.strerror or e}") from None


@secret_app.command("set")
def secret_set(
    name: str,
    from_file: Annotated[
        Path | None, typer.Option("--from-file", help="Read the value from F (default: stdin).")
    ] = None,
) -> None:
    """Store a new version of NAME (no-op when the value is unchanged); prints NAME vN."""
    print(f"{name} {_store().set(name, read_value(from_file))}")


@secret_app.command("list")
def secret_list(as_json: JsonFlag = False) -> None:
    """Secret names and their current versions (never values)."""
    import time

    infos = _store().list()
    if as_json:
        emit_json([i.to_json() for i in infos])
        return
    from kiln.cli.render import print_table

    rows = [
        [info.name, info.version, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.updated))]
        for info in infos
    ]
    print_table(["NAME", "VERSION", "UPDATED"], rows)


@secret_app.command("rm")
def secret_rm(name: str) -> None:
    """Delete every version of NAME; instances already running keep their copy."""
    _store().remove(name)
    print(f"removed {name}")
