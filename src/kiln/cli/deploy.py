"""Deployment commands: thin clients of ``kiln.cli.workflow`` and the agent API."""

from __future__ import annotations

import collections
import itertools
import json
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any

import typer

from kiln.cli.app import EnvOption, JsonFlag, Target, app, emit_json
from kiln.errors import KilnError
from kiln.paths import kiln_home


def _client() -> Any:
    from kiln.agent.client import AgentClient

    return AgentClient(kiln_home())


def _finish(record: dict[str, Any]) -> None:
    """A failed deployment says why: each failed service's reason, the instances that
    caused it with their exit and last log lines, and the commands that show more."""
    outcome = record.get("outcome")
    if outcome in ("succeeded", "unchanged", None):
        return
    from kiln.observe.failure import explain_failure

    detail = explain_failure(kiln_home(), record) or str(record.get("reason") or "")
    raise KilnError(f"deployment {record.get('id', '')} {outcome}:\n{detail}".rstrip())


@app.command()
def up(
    target: Target = None,
    env: EnvOption = None,
    yes: Annotated[
        bool, typer.Option("--yes", "-y", help="Destroy without asking.", metavar="")
    ] = False,
) -> None:
    """Bake, start the agent if none runs, plan and apply; asks before destroying."""
    from kiln.cli.workflow import up as run_up

    def confirm(doomed: str) -> bool:
        if yes:
            return True
        if not sys.stdin.isatty():
            raise KilnError(
                f"kiln up would destroy {doomed}; nothing was changed. Run kiln up --yes "
                "to confirm (stdin is not a terminal to ask)"
            )
        return bool(typer.confirm(f"This destroys {doomed}. Apply this plan?"))

    record = run_up(kiln_home(), target or Path.cwd(), env, confirm=confirm)
    if record.get("outcome") == "cancelled":
        raise typer.Exit(1)
    _finish(record)


@app.command()
def scale(service: str, replicas: int) -> None:
    """Run REPLICAS instances of SERVICE: a new revision, planned and rolled out."""
    from kiln.cli.workflow import scale as run_scale

    _finish(run_scale(kiln_home(), service, replicas))


@app.command()
def validate(target: Target = None, env: EnvOption = None) -> None:
    """Check kiln.toml and what it refers to, without baking or an agent; exit 1 on errors."""
    from kiln.spec.validate import validate_project

    errors = validate_project(target or Path.cwd(), env, kiln_home())
    for message in errors:
        sys.stderr.write(f"error: {message}\n")
    if errors:
        raise typer.Exit(1)
    print("kiln.toml is valid")


@app.command()
def plan(
    target: Target = None,
    env: EnvOption = None,
    out: Annotated[Path | None, typer.Option("-o", "--out", help="Save the plan.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Show what apply would do; exit 2 when changes are pending."""
    from kiln.cli.workflow import make_plan

    outcome = make_plan(kiln_home(), target or Path.cwd(), env)
    if out is not None:
        out.write_text(json.dumps(outcome.plan, indent=2, sort_keys=True) + "\n")
    if as_json:
        emit_json(outcome.plan)
    else:
        print(outcome.text)
        if out is not None:
            print(f"saved to {out}; apply it with: kiln apply {out}")
    if not outcome.empty:
        raise typer.Exit(2)


@app.command()
def apply(
    plan_file: Annotated[
        Path | None, typer.Argument(help="A plan saved by kiln plan -o (default: plan now).")
    ] = None,
    target: Annotated[Path | None, typer.Option("--file", "-f", help="kiln.toml or dir.")] = None,
    env: EnvOption = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask.", metavar="")] = False,
) -> None:
    """Carry out a plan: new instances first, health-gated, old ones drained."""
    from kiln.cli.workflow import PlanOutcome, apply_plan, ensure_agent, load_plan_file, make_plan

    home = kiln_home()
    if plan_file is not None:
        outcome = PlanOutcome(plan=load_plan_file(plan_file), text="")
        if outcome.empty:
            print("No changes. Nothing to apply.")
            return
    else:
        outcome = make_plan(home, target or Path.cwd(), env)
        print(outcome.text)
        if outcome.empty:
            return
        if not yes:
            if not sys.stdin.isatty():
                raise KilnError("refusing to apply without --yes when stdin is not a terminal")
            if not typer.confirm("Apply this plan?"):
                raise typer.Exit(1)
    # Something to apply needs an agent: it is started only now.
    _finish(apply_plan(home, ensure_agent(home, outcome)))


@app.command()
def status(as_json: JsonFlag = False) -> None:
    """Services, revisions and instances with state, health, age and digest.

    Exits 3 when a service failed, is degraded (fewer ready than desired, no
    rollout running) or in alarm, as ``systemctl is-active`` does; ``--json`` exits 0
    and says it in each service's ``state``."""
    from kiln.cli.render import print_status

    with _client() as client:
        data = client.status()
    if as_json:
        emit_json(data)
        return
    print_status(data)
    unwell = [
        name
        for name, svc in (data.get("services") or {}).items()
        if svc.get("state") in ("failed", "degraded", "alarm")
    ]
    if unwell:
        raise typer.Exit(3)  # like systemctl is-active: not every service is well


@app.command()
def history(service: str, as_json: JsonFlag = False) -> None:
    """The revisions of SERVICE, newest first."""
    from kiln.cli.render import print_history

    with _client() as client:
        data = client.history(service)
    if as_json:
        emit_json(data)
    else:
        print_history(data)


@app.command()
def rollback(
    service: str,
    revision: Annotated[str | None, typer.Argument(help="r3 or 3 (default: previous)")] = None,
) -> None:
    """Deploy the previous (or named) revision at once, with new instances."""
    from kiln.cli.workflow import rollback as run_rollback

    record = run_rollback(kiln_home(), service, revision)
    # An instant switch back to blue ends the blue/green deployment "rolled_back": what
    # was asked for, not a failure.
    if record.get("outcome") != "rolled_back":
        _finish(record)


@app.command()
def restart(service: str) -> None:
    """Replace every instance of SERVICE with a new one of the same revision (touched first)."""
    from kiln.cli.workflow import control

    _finish(control(kiln_home(), "restart", service))


@app.command()
def stop(service: str) -> None:
    """Retire every instance of SERVICE and close its listener; kiln start runs it again."""
    from kiln.cli.workflow import control

    _finish(control(kiln_home(), "stop", service))


@app.command()
def start(service: str) -> None:
    """Run the revision kiln stop (or kiln down) stopped, with new instances."""
    from kiln.cli.workflow import control

    _finish(control(kiln_home(), "start", service))


@app.command(
    "exec",
    context_settings={"allow_interspersed_args": False},
)
def exec_(
    instance: Annotated[
        str, typer.Argument(help="An instance id (or a unique prefix) or a service.")
    ],
    command: Annotated[
        list[str], typer.Argument(help="The command, after --.", metavar="-- CMD...")
    ],
    timeout: Annotated[
        float, typer.Option("--timeout", help="Seconds before the command is killed.")
    ] = 60.0,
) -> None:
    """Run CMD in a running instance; marks it touched, so kiln restart replaces it first."""
    from kiln.cli.workflow import exec_in

    if not 0 < timeout <= 86400:  # also refuses nan; inf is above the bound
        raise KilnError(f"--timeout: must be a number of seconds from 0 to 86400, not {timeout}")
    argv = list(command)[1:] if list(command)[:1] == ["--"] else list(command)
    result = exec_in(kiln_home(), instance, argv, timeout)
    sys.stdout.write(result.get("output") or "")
    sys.stdout.flush()
    note = " (output truncated to its last 1 MiB)" if result.get("truncated") else ""
    print(f"kiln: ran in {result.get('instance')}, now marked touched{note}", file=sys.stderr)
    raise typer.Exit(int(result.get("exit_code") or 0))


@app.command()
def logs(
    service: str,
    instance: Annotated[str | None, typer.Option("--instance", help="One instance.")] = None,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing.", metavar="")
    ] = False,
    since: Annotated[str | None, typer.Option("--since", help="e.g. 5m, 1h")] = None,
    tail: Annotated[int | None, typer.Option("--tail", help="Only the last N lines.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Logs of SERVICE's instances, also of instances that are gone."""
    from kiln.observe.logs import LogStore
    from kiln.spec.models import parse_duration

    store = LogStore(kiln_home() / "logs")
    try:
        start = time.time() - parse_duration(since) if since else None
    except ValueError as e:
        raise KilnError(f"--since: {e}") from None
    if tail is not None and tail < 0:
        raise KilnError(f"--tail: {tail} is not a number of lines (0 or more)")
    lines: Iterable[Any]
    if tail is not None:
        # The last N lines so far, then (with --follow) only what comes after them.
        last = collections.deque(store.read(service, instance, start), maxlen=tail)
        later = time.time()
        lines = itertools.chain(last, store.follow(service, instance, later)) if follow else last
    else:
        lines = (
            store.follow(service, instance, start)
            if follow
            else store.read(service, instance, start)
        )
    try:
        for line in lines:
            if as_json:
                sys.stdout.write(json.dumps(line.__dict__) + "\n")
            else:
                ts = time.strftime("%H:%M:%S", time.localtime(line.ts))
                sys.stdout.write(f"{ts} {line.instance} {line.line}\n")
            sys.stdout.flush()
    except ValueError as e:
        raise KilnError(f"--since: {e}") from None


@app.command()
def events(
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing.", metavar="")
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """What the agent did and why."""
    from kiln.cli.workflow import format_event

    with _client() as client:
        stream = client.follow_events() if follow else iter(client.events())
        for event in stream:
            if as_json:
                sys.stdout.write(json.dumps(event, sort_keys=True) + "\n")
            else:
                sys.stdout.write(format_event(event) + "\n")
            sys.stdout.flush()


@app.command()
def agent(
    listen: Annotated[
        str | None,
        typer.Option("--listen", help="Serve the API over TLS on HOST:PORT too (bearer tokens)."),
    ] = None,
    tls_cert: Annotated[
        Path | None, typer.Option("--tls-cert", help="Certificate (default: Kiln's own CA).")
    ] = None,
    tls_key: Annotated[Path | None, typer.Option("--tls-key", help="Key of --tls-cert.")] = None,
    file: Annotated[
        Path | None,
        typer.Option("--file", "-f", help="Run on the [runtime] of this kiln.toml (a Swarm…)."),
    ] = None,
    env: Annotated[str | None, typer.Option("--env", help="Environment overlay of --file.")] = None,
) -> None:
    """Run the control-plane daemon in the foreground."""
    from kiln.agent.daemon import run_agent
    from kiln.cli.workflow import runtime_of

    runtime = runtime_of(file, env) if file is not None else None
    run_agent(kiln_home(), runtime, listen=listen, tls_cert=tls_cert, tls_key=tls_key)


@app.command()
def down() -> None:
    """Stop every service, the proxy and the agent."""
    with _client() as client:
        running = client.running()
        if running:
            result = client.down()
    if not running:
        from kiln.agent.offline import down_without_agent

        result = down_without_agent(kiln_home())
        stopped = list(result.get("stopped") or [])
        named = f" ({', '.join(stopped)})" if stopped else ""
        proxy = ", the proxy" if result.get("proxy") == "stopped" else ""
        print(f"no agent runs; stopped {len(stopped)} instances{named}{proxy} of {kiln_home()}")
        return
    stopped = list(result.get("stopped") or [])
    named = f" ({', '.join(stopped)})" if stopped else ""
    print(f"stopped {len(stopped)} instances{named}, the proxy and the agent")
