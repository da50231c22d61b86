"""``kiln context add|use|list|remove``: named remote agents, as docker and kubectl keep.

A context's token is copied into the context file (0600) and never printed back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from kiln.cli.app import JsonFlag, app, emit_json

context_app = typer.Typer(
    help="Named remote agents the CLI targets (instead of KILN_ADDR/KILN_TOKEN/KILN_CA).",
    no_args_is_help=True,
)
app.add_typer(context_app, name="context")

Name = Annotated[str, typer.Argument(metavar="NAME")]


def _store() -> Any:
    from kiln.agent.contexts import ContextStore

    return ContextStore()


@context_app.command("add")
def context_add(
    name: Name,
    addr: Annotated[
        str, typer.Option("--addr", help="The agent's HOST:PORT (kiln agent --listen).")
    ],
    token_file: Annotated[
        Path, typer.Option("--token-file", help="A file holding a token from kiln token create.")
    ],
    ca: Annotated[
        Path | None,
        typer.Option("--ca", help="The CA to trust (the agent's KILN_HOME/tls/ca.pem)."),
    ] = None,
) -> None:
    """Add context NAME: the agent at ADDR, its token copied in (the file may then go)."""
    context = _store().add(name, addr, token_file, ca)
    print(f"context {context.name}: {context.addr}; `kiln context use {context.name}` selects it")


@context_app.command("use")
def context_use(name: Name) -> None:
    """Make NAME the current context (`local`: the home's own socket)."""
    _store().use(name)
    print(f"current context: {name}")


@context_app.command("list")
def context_list(as_json: JsonFlag = False) -> None:
    """Every context's name, address and CA; * marks the current one (never the token)."""
    from kiln.agent.contexts import LOCAL

    current, contexts = _store().read()
    rows = [{"name": LOCAL, "addr": "(this home's socket)", "ca": None, "current": not current}]
    rows += [c.public(c.name == current) for c in contexts.values()]
    if as_json:
        emit_json(rows)
        return
    for row in rows:
        mark = "*" if row["current"] else " "
        print(f"{mark} {row['name']:<16}  {row['addr']:<28}  {row['ca'] or ''}".rstrip())


@context_app.command("remove")
def context_remove(name: Name) -> None:
    """Remove context NAME (the current one: back to the home's socket)."""
    _store().remove(name)
    print(f"removed context {name}")
