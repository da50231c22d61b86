"""``kiln push`` and ``kiln pull``: thin commands over :mod:`kiln.image.registry`.

Credentials come from ``--auth-file`` or Docker's ``config.json``, never from an
argument, so a password never lands in shell history or ``ps``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from kiln.cli.app import JsonFlag, _store, app, emit_json

if TYPE_CHECKING:
    from kiln.image.registry import RegistryOptions

CaOption = Annotated[
    Path | None, typer.Option("--ca", help="Trust the registry's certificate from this CA file.")
]
AuthFileOption = Annotated[
    Path | None,
    typer.Option(
        "--auth-file",
        help="USER:PASSWORD on one line, or Docker's config.json (default: ~/.docker/config.json).",
    ),
]
PlainHttpOption = Annotated[
    bool,
    typer.Option("--plain-http", help="No TLS (only for a registry on loopback).", metavar=""),
]


def _options(ca: Path | None, auth_file: Path | None, plain_http: bool) -> RegistryOptions:
    from kiln.image.registry import RegistryOptions

    return RegistryOptions(ca_file=ca, auth_file=auth_file, plain_http=plain_http)


@app.command("push")
def push_cmd(
    ref: str,
    dest: str,
    ca: CaOption = None,
    auth_file: AuthFileOption = None,
    plain_http: PlainHttpOption = False,
    mount_from: Annotated[
        str | None,
        typer.Option("--mount-from", help="Mount blobs from this repository on the same registry."),
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Push image REF to DEST (HOST[:PORT]/REPO[:TAG]); blobs the registry has are skipped."""
    from kiln.image.registry import push

    result = push(_store(), ref, dest, _options(ca, auth_file, plain_http), mount_from=mount_from)
    if as_json:
        emit_json(vars(result))
        return
    print(
        f"pushed {result.ref} {result.digest}: {len(result.uploaded)} uploaded "
        f"({result.uploaded_bytes} bytes), {len(result.mounted)} mounted, "
        f"{len(result.skipped)} already there"
    )


@app.command("pull")
def pull_cmd(
    src: str,
    ca: CaOption = None,
    auth_file: AuthFileOption = None,
    plain_http: PlainHttpOption = False,
    as_json: JsonFlag = False,
) -> None:
    """Pull SRC (HOST[:PORT]/REPO[:TAG|@sha256:…]) into the store, every blob verified."""
    from kiln.image.registry import pull

    result = pull(_store(), src, _options(ca, auth_file, plain_http))
    if as_json:
        emit_json(vars(result))
        return
    print(
        f"pulled {result.ref} as {result.local_ref} {result.digest}: "
        f"{len(result.fetched)} fetched ({result.fetched_bytes} bytes), "
        f"{len(result.present)} already here"
    )
