"""``kiln push`` and ``kiln pull``: thin commands over :mod:`kiln.image.registry`.

Credentials come from ``--auth-file``, ``[registries."HOST"]`` of ./kiln.toml or Docker's
``config.json``, never from an argument, so a password never lands in shell history or ``ps``.
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
NoReferrersOption = Annotated[
    bool,
    typer.Option(
        "--no-referrers",
        help="Leave the image's evidence (SBOM, provenance, signatures) behind.",
        metavar="",
    ),
]


def _options(
    ref: str, ca: Path | None, auth_file: Path | None, plain_http: bool
) -> RegistryOptions:
    """The flags given, over ``[registries."HOST"]`` of ./kiln.toml when there is one."""
    import dataclasses

    from kiln.image.registry import RegistryOptions, options_for, parse_ref

    options = RegistryOptions()
    spec_file = Path.cwd() / "kiln.toml"
    if spec_file.is_file():
        from kiln.spec.loader import load_spec

        options = options_for(load_spec(spec_file), parse_ref(ref).host)
    return dataclasses.replace(
        options,
        ca_file=ca or options.ca_file,
        auth_file=auth_file or options.auth_file,
        plain_http=plain_http or options.plain_http,
    )


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
    no_referrers: NoReferrersOption = False,
    as_json: JsonFlag = False,
) -> None:
    """Push image REF to DEST (HOST[:PORT]/REPO[:TAG]) and its referrers; blobs the registry
    has are skipped."""
    from kiln.image.registry import push

    options = _options(dest, ca, auth_file, plain_http)
    result = push(_store(), ref, dest, options, mount_from=mount_from, referrers=not no_referrers)
    if as_json:
        emit_json(vars(result))
        return
    moved = len(result.referrers) + len(result.referrers_present)
    print(
        f"pushed {result.ref} {result.digest}: {len(result.uploaded)} uploaded "
        f"({result.uploaded_bytes} bytes), {len(result.mounted)} mounted, "
        f"{len(result.skipped)} already there, "
        f"{moved} referrer{'' if moved == 1 else 's'} ({len(result.referrers)} new)"
    )


@app.command("pull")
def pull_cmd(
    src: str,
    ca: CaOption = None,
    auth_file: AuthFileOption = None,
    plain_http: PlainHttpOption = False,
    no_referrers: NoReferrersOption = False,
    as_json: JsonFlag = False,
) -> None:
    """Pull SRC (HOST[:PORT]/REPO[:TAG|@sha256:…]) and its referrers into the store, every
    blob verified; a referrer that fails a check is a warning and is not stored."""
    import sys

    from kiln.image.registry import pull

    result = pull(
        _store(),
        src,
        _options(src, ca, auth_file, plain_http),
        referrers=not no_referrers,
        warn=lambda line: print(line, file=sys.stderr),
    )
    if as_json:
        emit_json(vars(result))
        return
    moved = len(result.referrers) + len(result.referrers_present)
    refused = f", {len(result.referrers_refused)} refused" if result.referrers_refused else ""
    print(
        f"pulled {result.ref} as {result.local_ref} {result.digest}: "
        f"{len(result.fetched)} fetched ({result.fetched_bytes} bytes), "
        f"{len(result.present)} already here, "
        f"{moved} referrer{'' if moved == 1 else 's'} ({len(result.referrers)} new{refused})"
    )
