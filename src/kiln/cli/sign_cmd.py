"""``kiln key generate``, ``kiln sign`` and ``kiln verify``: thin commands over
:mod:`kiln.supply.signing` (imported lazily: ``cryptography`` is not cheap)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from kiln.cli.app import JsonFlag, _store, app, emit_json

key_app = typer.Typer(help="Signing keys (ECDSA P-256 or Ed25519, PEM).", no_args_is_help=True)
app.add_typer(key_app, name="key")


@key_app.command("generate")
def key_generate(
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Writes NAME.key (0600) and NAME.pub.")
    ],
    key_type: Annotated[
        str, typer.Option("--type", help="ecdsa-p256 (default) or ed25519.")
    ] = "ecdsa-p256",
) -> None:
    """Make a key pair for kiln sign (NAME.key) and kiln verify (NAME.pub)."""
    from kiln.supply.signing import generate_key, key_id

    private, public = generate_key(output, key_type)
    typer.echo(f"wrote {private} and {public} (key id {key_id(public.read_bytes())})")


@app.command("sign")
def sign(
    ref: str,
    key: Annotated[Path, typer.Option("--key", help="The private key (NAME.key).")],
) -> None:
    """Sign REF's manifest digest and its provenance; offline."""
    from kiln.supply.signing import sign_image

    result = sign_image(_store(), ref, key)
    if result.signature is None and result.provenance is None:
        typer.echo(f"{ref} ({result.digest}) is already signed by key {result.key_id}")
        return
    typer.echo(f"signed {ref} ({result.digest}) with key {result.key_id}")


@app.command("verify")
def verify(
    ref: str,
    key: Annotated[
        list[Path], typer.Option("--key", help="A trusted public key (NAME.pub); repeatable.")
    ],
    as_json: JsonFlag = False,
) -> None:
    """Check REF's signature, provenance, SBOM and blobs against the given keys, offline.
    Exit 1 with one line per failure."""
    from kiln.supply.signing import verify_image

    result = verify_image(_store(), ref, key)
    if as_json:
        emit_json(
            {
                "digest": result.digest,
                "verified": result.ok,
                "signed": result.signed,
                "signers": list(result.signers),
                "provenance": result.provenance,
                "errors": list(result.errors),
            }
        )
    elif result.ok:
        builder = (result.provenance or {}).get("predicate", {}).get("runDetails", {})
        builder_id = builder.get("builder", {}).get("id", "?")
        typer.echo(
            f"verified {ref} ({result.digest}): signed by {', '.join(result.signers)}; "
            f"provenance from {builder_id}"
        )
    for line in result.errors:
        print(f"error: {line}", file=sys.stderr)
    if not result.ok:
        raise typer.Exit(1)
