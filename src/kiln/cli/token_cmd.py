"""``kiln token create|list|revoke``: bearer tokens for the agent's network API.

A token is printed once, at creation; the home keeps only its hash. Revoking
takes effect at the agent's next request, without a restart; so does expiry.
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
    edge = "edge"


def _store() -> Any:
    from kiln.agent.tokens import TokenStore

    return TokenStore(kiln_home())


@token_app.command("create")
def token_create(
    role: Annotated[
        Role,
        typer.Option(
            "--role",
            help="viewer (read), deployer (change), admin (exec, down); edge (a Swarm edge run "
            "by hand: routes and counters only).",
        ),
    ],
    name: Annotated[str, typer.Option("--name", help="What the token is for.")] = "",
    expires: Annotated[
        str,
        typer.Option("--expires", help="Lifetime: 30d, 12h, 45m, 2w, or never.", metavar="TIME"),
    ] = "90d",
    as_json: JsonFlag = False,
) -> None:
    """Make a token of ROLE; prints it once (only its hash is kept)."""
    from kiln.agent.tokens import parse_expiry

    record, token = _store().create(role.value, name, parse_expiry(expires))
    if as_json:
        emit_json({**record.public(), "token": token})
        return
    print(token)
    print(
        f"token {record.id} ({record.role}, {_expiry(record.expires_at)}); it is shown only now",
        file=sys.stderr,
    )


def _when(stamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(stamp))


def _expiry(expires_at: float | None) -> str:
    return "never expires" if expires_at is None else f"expires {_when(expires_at)}"


@token_app.command("list")
def token_list(as_json: JsonFlag = False) -> None:
    """Every token's id, role, state (active, expired, revoked), creation and expiry, and
    name (never the token)."""
    records = _store().records()
    if as_json:
        emit_json([r.public() for r in records])
        return
    for r in records:
        expiry = "never" if r.expires_at is None else _when(r.expires_at)
        print(f"{r.id}  {r.role:<8}  {r.state():<7}  {_when(r.created)}  {expiry:<16}  {r.name}")


@token_app.command("revoke")
def token_revoke(token_id: Annotated[str, typer.Argument(metavar="ID")]) -> None:
    """Revoke token ID: the agent refuses it from its next request on."""
    record = _store().revoke(token_id)
    print(f"revoked token {record.id} ({record.role})")
