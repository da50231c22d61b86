"""``kiln token create|list|revoke``: bearer tokens for the agent's network API.

A token is printed once, at creation; the home keeps only its hash. Revoking
takes effect at the agent's next request, without a restart.
"""

from __future__ import annotations

import enum
import sys
import time
from typing import Annotated, Any

import typer

from kiln.cli.app import JsonFlag, app, emit_json
from kiln.paths import kiln_home

token_app = typer.Typer(
    help="Bearer tokens for the agent's network API (kiln agent --listen).",
    no_args_is_help=True,
)
app.add_typer(token_app, name="token")


class Role(enum.StrEnum):
    viewer = "viewer"
    deployer = "deployer"
    admin = "admin"


def _store() -> Any:
    from kiln.agent.tokens import TokenStore

    return TokenStore(kiln_home())


@token_app.command("create")
def token_create(
    role: Annotated[
        Role, typer.Option("--role", help="viewer (read), deployer (change), admin (exec, down).")
    ],
    name: Annotated[str, typer.Option("--name", help="What the token is for.")] = "",
    as_json: JsonFlag = False,
) -> None:
    """Make a token of ROLE; prints it once (only its hash is kept)."""
    record, token = _store().create(role.value, name)
    if as_json:
        emit_json({**record.public(), "token": token})
        return
    print(token)
    print(f"token {record.id} ({record.role}); it is shown only now", file=sys.stderr)


@token_app.command("list")
def token_list(as_json: JsonFlag = False) -> None:
    """Every token's id, role, name and whether it is revoked (never the token)."""
    records = _store().records()
    if as_json:
        emit_json([r.public() for r in records])
        return
    for r in records:
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(r.created))
        state = "revoked" if r.revoked is not None else "active"
        print(f"{r.id}  {r.role:<8}  {state:<7}  {created}  {r.name}")


@token_app.command("revoke")
def token_revoke(token_id: Annotated[str, typer.Argument(metavar="ID")]) -> None:
    """Revoke token ID: the agent refuses it from its next request on."""
    record = _store().revoke(token_id)
    print(f"revoked token {record.id} ({record.role})")
