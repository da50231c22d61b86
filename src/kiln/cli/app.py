"""Command definitions. Each command parses its arguments and calls one function."""

from __future__ import annotations

import enum
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperCommand, TyperGroup

from kiln.errors import KilnError


def _untag_flags(command: TyperCommand | TyperGroup, ctx: Any) -> None:
    """A flag takes no value, so its help shows no type: Typer tags each one ``<bool>``,
    its own ``--help`` included."""
    for param in command.get_params(ctx):
        if getattr(param, "is_flag", False):
            param.metavar = ""


class _Command(TyperCommand):
    def format_help(self, ctx: Any, formatter: Any) -> None:
        _untag_flags(self, ctx)
        super().format_help(ctx, formatter)


class _Group(TyperGroup):
    def format_help(self, ctx: Any, formatter: Any) -> None:
        _untag_flags(self, ctx)
        super().format_help(ctx, formatter)


def _untagged_help(typer_app: typer.Typer) -> None:
    """Every command and group of ``typer_app`` (those other modules register too) gets
    the help without ``<bool>`` tags."""
    if not isinstance(typer_app.info.cls, type) or typer_app.info.cls is TyperGroup:
        typer_app.info.cls = _Group
    for command in typer_app.registered_commands:
        if command.cls in (None, TyperCommand):
            command.cls = _Command
    for group in typer_app.registered_groups:
        if not isinstance(group.cls, type) or group.cls is TyperGroup:
            group.cls = _Group
        if group.typer_instance is not None:
            _untagged_help(group.typer_instance)


app = typer.Typer(
    name="kiln",
    help="Bake golden images, deploy them by replacement, never repair in place.",
    no_args_is_help=True,
    add_completion=False,  # `kiln completion SHELL` instead of --install-completion
    pretty_exceptions_enable=False,
)
image_app = typer.Typer(help="Work with images in the local store.", no_args_is_help=True)
app.add_typer(image_app, name="image")
COMPLETE_VAR = "_KILN_COMPLETE"
"""Set by the completion scripts when the shell asks ``kiln`` for completions."""

JsonFlag = Annotated[bool, typer.Option("--json", help="Machine-readable output.", metavar="")]
Target = Annotated[
    Path | None, typer.Argument(help="kiln.toml or the directory holding it (default: .)")
]
EnvOption = Annotated[
    str | None, typer.Option("--env", "-e", help="Apply the \\[environments.NAME] overlays.")
]


def _print_version(value: bool) -> None:
    if value:
        from kiln import __version__

        print(f"kiln {__version__}")
        raise typer.Exit()


@app.callback()
def _private_home(
    ctx: typer.Context,
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            "-V",
            help="Print the version and exit.",
            callback=_print_version,
            is_eager=True,
        ),
    ] = False,
    context: Annotated[
        str | None,
        typer.Option(
            "--context",
            help="Target the agent of this context (kiln context list).",
            metavar="NAME",
        ),
    ] = None,
) -> None:
    if context is not None:
        os.environ["KILN_CONTEXT"] = context
    # Every command but `schema`, `completion` and `init` reads or writes KILN_HOME: make it
    # owner-only first.
    if ctx.invoked_subcommand not in ("schema", "completion", "init") and not ctx.resilient_parsing:
        from kiln.paths import ensure_home

        ensure_home()


def emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def _store() -> Any:
    from kiln.image.store import ImageStore

    return ImageStore.default()


@app.command()
def bake(
    target: Target = None,
    image: Annotated[
        list[str] | None, typer.Option("--image", "-i", help="Bake only NAME (and its bases).")
    ] = None,
    no_cache: Annotated[
        bool, typer.Option("--no-cache", help="Ignore the layer cache.", metavar="")
    ] = False,
    update_lock: Annotated[
        bool,
        typer.Option(
            "--update-lock",
            help="Re-resolve Debian package versions and registry base tags.",
            metavar="",
        ),
    ] = False,
    env: EnvOption = None,
) -> None:
    """Bake the recipes of kiln.toml; prints NAME@sha256:… per image."""
    from kiln.image.bake import bake_project

    results = bake_project(
        target or Path.cwd(), image or None, no_cache=no_cache, update_lock=update_lock, env=env
    )
    for name, result in results.items():
        print(f"{name}@{result.digest}")


@app.command()
def schema() -> None:
    """Print the JSON Schema of kiln.toml."""
    from kiln.spec import json_schema

    emit_json(json_schema())


class Shell(enum.StrEnum):
    bash = "bash"
    zsh = "zsh"
    fish = "fish"


@app.command()
def completion(shell: Annotated[Shell, typer.Argument(help="bash, zsh or fish")]) -> None:
    """Print the shell completion script for SHELL.

    bash: put eval "$(kiln completion bash)" in ~/.bashrc

    zsh: put eval "$(kiln completion zsh)" in ~/.zshrc, after compinit

    fish: kiln completion fish > ~/.config/fish/completions/kiln.fish
    """
    from typer._completion_shared import get_completion_script

    print(get_completion_script(prog_name="kiln", complete_var=COMPLETE_VAR, shell=shell.value))


@app.command()
def images(as_json: JsonFlag = False) -> None:
    """List the images in the store."""
    from kiln.cli.render import print_images

    print_images(_store().images(), as_json)


@image_app.command("inspect")
def image_inspect(ref: str) -> None:
    """Show an image's manifest and config (always JSON)."""
    from kiln.cli.render import inspect_image

    emit_json(inspect_image(_store(), ref))


@image_app.command("rm")
def image_rm(ref: str) -> None:
    """Remove a tag, or every tag of a digest; blobs go at the next gc."""
    for name in _store().remove(ref):
        print(f"untagged {name}")


@image_app.command("gc")
def image_gc(as_json: JsonFlag = False) -> None:
    """Delete blobs that no tag and no cached layer needs."""
    from kiln.image.bake import collect_garbage

    result = collect_garbage(_store())
    if as_json:
        emit_json({"removed_blobs": result.removed_blobs, "freed_bytes": result.freed_bytes})
    else:
        print(f"removed {result.removed_blobs} blobs, freed {result.freed_bytes} bytes")


@image_app.command("verify")
def image_verify(ref: str, as_json: JsonFlag = False) -> None:
    """Re-hash every blob reachable from REF; exit 1 naming each corrupt one."""
    problems = _store().verify(ref)
    if as_json:
        emit_json({"ref": ref, "ok": not problems, "problems": problems})
    else:
        for line in problems:
            print(line, file=sys.stderr)
        if not problems:
            print(f"{ref}: every blob matches its digest")
    if problems:
        raise typer.Exit(1)


@image_app.command("export")
def image_export(
    ref: str,
    output: Annotated[Path, typer.Option("--output", "-o", help="The archive to write.")],
    fmt: Annotated[str, typer.Option("--format", help="oci or docker")] = "oci",
) -> None:
    """Write REF as an OCI archive or a `docker load` archive."""
    from kiln.image.export import export_image

    if fmt not in ("oci", "docker"):
        raise KilnError(f"--format: {fmt!r} is not one of oci, docker")
    export_image(_store(), ref, fmt, output)  # type: ignore[arg-type]
    print(f"wrote {output}")


@image_app.command("unpack")
def image_unpack(ref: str, dest: Path) -> None:
    """Extract REF's root filesystem into DEST (refuses anything that escapes it)."""
    from kiln.image.unpack import unpack_image

    unpack_image(_store(), ref, dest)
    print(f"unpacked {ref} into {dest}")


INTERRUPTED_EXIT = 130
"""Ctrl-C, as a shell reports SIGINT (128 + 2)."""


def _by_ctrl_c(exit: BaseException) -> bool:
    """Whether an exit came from a KeyboardInterrupt (not, say, ``kiln exec`` handing on
    a command's own exit code 130)."""
    seen: set[int] = set()
    error: BaseException | None = exit
    while error is not None and id(error) not in seen:
        if isinstance(error, KeyboardInterrupt):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def run(args: list[str]) -> int:
    from kiln.cli import burn_cmd as _burn_cmd  # noqa: F401  (registers burn, evidence)
    from kiln.cli import canary_cmd as _canary_cmd  # noqa: F401  (registers promote, abort)
    from kiln.cli import chaos_cmd as _chaos_cmd  # noqa: F401  (registers kiln chaos)
    from kiln.cli import context_cmd as _context_cmd  # noqa: F401  (registers kiln context)
    from kiln.cli import deploy as _deploy  # noqa: F401  (registers the deploy commands)
    from kiln.cli import drift_cmd as _drift_cmd  # noqa: F401  (registers kiln drift)
    from kiln.cli import init as _init  # noqa: F401  (registers kiln init)
    from kiln.cli import policy_cmd as _policy_cmd  # noqa: F401  (registers kiln policy)
    from kiln.cli import registry_cmd as _registry_cmd  # noqa: F401  (registers push, pull)
    from kiln.cli import render_cmd as _render  # noqa: F401  (registers kiln render)
    from kiln.cli import sbom_cmd as _sbom_cmd  # noqa: F401  (registers sbom, image referrers)
    from kiln.cli import scan_cmd as _scan_cmd  # noqa: F401  (registers kiln scan)
    from kiln.cli import secret as _secret  # noqa: F401  (registers kiln secret)
    from kiln.cli import sign_cmd as _sign_cmd  # noqa: F401  (registers key, sign, verify)
    from kiln.cli import token_cmd as _token_cmd  # noqa: F401  (registers kiln token)

    if os.environ.get(COMPLETE_VAR):
        # The shell asks for completions: Typer's own protocol (complete_bash, …).
        from typer._completion_classes import completion_init

        completion_init()
    _untagged_help(app)
    try:
        app(args, prog_name="kiln", standalone_mode=True)
    except KilnError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if code == INTERRUPTED_EXIT and _by_ctrl_c(e):  # typer makes Ctrl-C a silent exit
            print("interrupted", file=sys.stderr)
        return code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return INTERRUPTED_EXIT
    return 0
