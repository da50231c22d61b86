"""The user's verbs — up, plan, apply — as functions the CLI (and tests) call.

They run in the CLI process: bake locally (the cache makes it free), turn the
spec into desired services, and hand the rest to the agent over its API.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.agent.client import AgentClient, start_background
from kiln.errors import KilnError
from kiln.runtime.select import RuntimeChoice, read_choice

if TYPE_CHECKING:
    from kiln.spec.models import Spec

Say = Callable[[str], None]


def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class PlanOutcome:
    plan: dict[str, Any]
    text: str
    request: dict[str, Any] | None = None
    """What was asked, to ask an agent again for the same plan."""

    @property
    def empty(self) -> bool:
        return not self.plan.get("actions")


def git_commit(root: Path) -> str | None:
    """The commit the spec came from, recorded in every revision."""
    try:
        from dulwich.repo import Repo

        repo = Repo.discover(str(root))
        try:
            return repo.head().decode()
        finally:
            repo.close()
    except Exception:
        return None


def runtime_request(spec: Spec) -> dict[str, Any]:
    """``[runtime]`` as the agent takes it: a Swarm's registry with the CA and credentials
    of its ``[registries."HOST"]`` table, as absolute paths (the agent has no kiln.toml)."""
    runtime = spec.runtime
    registry = None
    if runtime.kind == "swarm" and runtime.registry:
        from kiln.image.registry import options_for, parse_ref
        from kiln.runtime.select import Registry

        options = options_for(spec, parse_ref(runtime.registry + "/probe").host)
        registry = Registry(
            runtime.registry,
            str(options.ca_file.absolute()) if options.ca_file else None,
            str(options.auth_file.absolute()) if options.auth_file else None,
            options.plain_http,
        )
    nodes = tuple(sorted((runtime.nodes or {}).items())) if runtime.kind == "swarm" else ()
    return RuntimeChoice(runtime.kind, runtime.host, registry, nodes).to_json()


def runtime_of(target: Path, env: str | None) -> RuntimeChoice:
    """The runtime a kiln.toml's ``[runtime]`` names (``kiln agent --file``)."""
    from kiln.spec import load_spec

    return RuntimeChoice.from_json(runtime_request(load_spec(target, env=env)))


def desired_request(
    target: Path, env: str | None, say: Say = _stderr, home: Path | None = None
) -> dict[str, Any]:
    """Bake what the services use and describe the desired state for the agent: secret
    versions from ``home``'s store (checked before baking), never their values."""
    from kiln.deploy.plan import desired_from_spec
    from kiln.deploy.secrets import SecretStore
    from kiln.image.bake import bake_project
    from kiln.paths import kiln_home
    from kiln.spec import load_spec

    spec = load_spec(target, env)
    needs = {name: s.secrets for name, s in spec.services.items()}
    secrets_versions = SecretStore((home or kiln_home()) / "secrets").versions_for(needs)
    needed = sorted({s.image for s in spec.services.values()})
    results = bake_project(spec.path, needed or None, env=env) if needed else {}
    digests = {name: r.digest for name, r in results.items()}
    for name in needed:
        say(f"baked {name}@{digests[name]}")
    desired = desired_from_spec(spec, digests, secrets_versions)
    return {
        "spec_path": str(spec.path),
        "environment": env,
        "spec_text": spec.text,
        "git_commit": git_commit(spec.root),
        "project": spec.project.name,
        "runtime": runtime_request(spec),
        "digests": digests,
        "services": {name: d.to_json() for name, d in desired.items()},
    }


def make_plan(
    home: Path, target: Path, env: str | None, say: Say = _stderr, start_agent: bool = False
) -> PlanOutcome:
    """The running agent's plan; with none, the plan against ``state.db`` read here, so a
    read command never starts an agent (one would bring back what ``kiln down``
    stopped). Only ``start_agent`` (``kiln up``) starts one."""
    request = desired_request(target, env, say, home)
    from kiln.policy.gate import gate_request  # issue 11: the gate, before any plan is shown

    gate_request(request, home, say)
    with AgentClient(home) as client:
        if client.running():
            answer = client.plan(**request)
        elif start_agent:
            start_background(home, runtime=_choice(request))
            answer = client.plan(**request)
        else:
            answer = _plan_without_agent(home, request)
    return PlanOutcome(plan=answer["plan"], text=answer["text"], request=request)


def _plan_without_agent(home: Path, request: dict[str, Any]) -> dict[str, Any]:
    import tempfile

    from kiln.deploy.plan import plan_answer
    from kiln.deploy.state import StateStore

    db = home / "state.db"
    with tempfile.TemporaryDirectory() as scratch:
        # No state yet: plan against an empty store, and create nothing in the home.
        state = StateStore(db if db.exists() else Path(scratch) / "state.db")
        try:
            recorded, wanted = read_choice(home) or RuntimeChoice(), _choice(request)
            if wanted and not recorded.same_instances(wanted) and state.instances(live_only=True):
                from kiln.agent.daemon import check_choice

                check_choice(recorded, wanted)
            return plan_answer(request, state.snapshot())
        finally:
            state.close()


def _choice(request: dict[str, Any] | None) -> RuntimeChoice | None:
    wanted = (request or {}).get("runtime")
    if not wanted:
        return None
    return RuntimeChoice.from_json(wanted)


def ensure_agent(home: Path, outcome: PlanOutcome) -> dict[str, Any]:
    """Start the agent a plan with changes needs, and return the plan to apply: the
    agent's own answer to the same request, which must propose the same changes (an
    agent that starts marks instances lost after a reboot, say, which changes the plan)."""
    with AgentClient(home) as client:
        if client.running():
            return outcome.plan
        start_background(home, runtime=_choice(outcome.request))
        if outcome.request is None:
            return outcome.plan
        fresh = client.plan(**outcome.request)
    if fresh["plan"].get("actions") != outcome.plan.get("actions"):
        raise KilnError(
            "the state changed while the agent started, so the plan shown is not what would "
            f"be applied now:\n{fresh['text']}\nrun kiln apply again"
        )
    return dict(fresh["plan"])


def load_plan_file(path: Path) -> dict[str, Any]:
    if path.is_dir():
        raise KilnError(
            f"{path}: is a directory, not a plan file; apply a project with "
            f"kiln apply -f {path}, or a plan saved by kiln plan -o FILE"
        )
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise KilnError(f"{path}: no such plan file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise KilnError(f"{path}: cannot read the plan file ({e})") from None
    except json.JSONDecodeError as e:
        raise KilnError(f"{path}:{e.lineno}: not a plan file ({e.msg})") from None
    if not isinstance(data, dict) or "actions" not in data:
        raise KilnError(f"{path}: not a plan file (no actions); write one with kiln plan -o")
    return data


WAIT_NOTE = 1.5
"""After this long without an event a following command says what the deployment waits
for, so nothing stays silent for 2 s (the status read and the print take a little)."""


def _follow(client: AgentClient, started: dict[str, Any], after: int, say: Say) -> dict[str, Any]:
    """Print the events after ``after`` until the deployment ends, and what it waits
    for whenever nothing happened for ``WAIT_NOTE`` seconds."""
    deployment = started.get("deployment")
    if not deployment:
        return started

    def waiting() -> None:
        try:
            lines = waiting_lines(client.status(), str(deployment))
        except KilnError:
            return  # an agent being restarted: the follower waits for its successor
        for line in lines:
            say(line)

    return client.follow_deployment(
        str(deployment),
        after,
        lambda event: say(format_event(event)),
        timeout=24 * 3600.0,
        on_idle=waiting,
        idle=WAIT_NOTE,
    )


def waiting_lines(status: dict[str, Any], deployment: str, now: float | None = None) -> list[str]:
    """``waiting for web-1a2b: GET /healthz: HTTP 503 (12 s of healthy_deadline 60 s)``:
    one line per instance the deployment's rollouts wait on, read from ``kiln status``."""
    now = time.time() if now is None else now
    lines: list[str] = []
    for name, svc in sorted((status.get("services") or {}).items()):
        rollout = svc.get("rollout") or {}
        if rollout.get("deployment") != deployment:
            continue
        target = rollout.get("target")
        deadline = float(rollout.get("healthy_deadline") or 0)
        hold = float(rollout.get("min_healthy_time") or 0)
        waits = 0
        for inst in svc.get("instances") or []:
            age = float(inst.get("age") or 0)
            of_deadline = f"{age:.0f} s of healthy_deadline {deadline:g} s"
            iid, state = inst.get("id"), inst.get("state")
            if state == "draining":
                why = "draining (its open connections finish, then it stops)"
            elif state == "stopping":
                why = "stopping (sent SIGTERM; killed after its stop_grace)"
            elif inst.get("revision") != target:
                continue
            elif state == "pending":
                why = f"creating its sandbox and unpacking the image ({age:.0f} s)"
            elif state in ("starting", "unhealthy"):
                probe = inst.get("probe") or "started; no probe answer yet"
                why = f"{probe} ({of_deadline})"
            elif state == "ready" and float(inst.get("ready_for") or 0) < hold:
                why = (
                    f"healthy for {float(inst.get('ready_for') or 0):.1f} s of "
                    f"min_healthy_time {hold:g} s"
                )
            else:
                continue
            lines.append(f"waiting for {iid}: {why}")
            waits += 1
        if not waits:
            lines.append(
                f"waiting: {name} r{target}, {rollout.get('healthy', 0)}/"
                f"{rollout.get('desired', '?')} healthy"
            )
    return lines


def apply_plan(home: Path, plan: dict[str, Any], say: Say = _stderr) -> dict[str, Any]:
    """Start the rollouts and follow their events until they end."""
    with AgentClient(home) as client:
        after = client.last_event_id()
        started = client.apply(plan)
        return _follow_or_explain(client, started, after, say, home)


UNDO = {"restart": None, "stop": "kiln start", "start": "kiln stop"}
"""What undoes a service command; a restart changes no revision, so nothing does."""


def _follow_or_explain(
    client: AgentClient,
    started: dict[str, Any],
    after: int,
    say: Say,
    home: Path,
    verb: str | None = None,
) -> dict[str, Any]:
    """Ctrl-C stops the following, not the rollout: say so, and how to go on."""
    try:
        return _follow(client, started, after, say)
    except KeyboardInterrupt:
        services = " ".join(sorted(started.get("services") or [started.get("service") or ""]))
        undo = UNDO.get(verb or "", "kiln rollback")
        text = (
            f"interrupted: deployment {started.get('deployment')} goes on in the agent "
            f"(KILN_HOME {home}); follow it with: kiln events --follow"
        )
        if undo:
            text += f"; undo it with: {undo} {services.strip() or 'SERVICE'}"
        raise KilnError(text) from None


def _agent(client: AgentClient) -> AgentClient:
    """The agent of the client's home, started when none runs and the home has services
    (a rollback or a restart after a reboot needs no ``kiln up`` first)."""
    if not client.running() and (client.home / "state.db").exists():
        start_background(client.home, runtime=read_choice(client.home))
    return client


def scale(home: Path, service: str, replicas: int, say: Say = _stderr) -> dict[str, Any]:
    """A new revision of SERVICE with REPLICAS instances, applied and followed."""
    with AgentClient(home) as client:
        after = _agent(client).last_event_id()
        started = client.scale(service, replicas)
        if not started.get("deployment"):
            say(f"{service} already runs {replicas} replica(s); nothing to do")
            return {"outcome": "unchanged"}
        return _follow_or_explain(client, started, after, say, home)


def rollback(home: Path, service: str, revision: str | None, say: Say = _stderr) -> dict[str, Any]:
    """New instances from the previous (or named: ``r3`` or ``3``) revision, followed."""
    number: int | None = None
    if revision is not None:
        text = revision.removeprefix("r")
        if not text.isdigit():
            raise KilnError(f"rollback: {revision!r} is not a revision such as r3")
        number = int(text)
    with AgentClient(home) as client:
        after = _agent(client).last_event_id()
        return _follow(client, client.rollback(service, number), after, say)


def control(home: Path, verb: str, service: str, say: Say = _stderr) -> dict[str, Any]:
    """``kiln restart|stop|start SERVICE``: the agent's rollout for it, followed."""
    with AgentClient(home) as client:
        after = _agent(client).last_event_id()
        change = {
            "restart": client.restart,
            "stop": client.stop_service,
            "start": client.start_service,
        }[verb]
        return _follow_or_explain(client, change(service), after, say, home, verb)


def exec_in(home: Path, instance: str, argv: list[str], timeout: float) -> dict[str, Any]:
    """``kiln exec``: the command's exit code and output, from inside the instance."""
    if not argv:
        raise KilnError("exec: no command; usage: kiln exec INSTANCE -- CMD [ARG...]")
    with AgentClient(home) as client:
        return client.exec(instance, argv, timeout)


def format_event(event: dict[str, Any]) -> str:
    ts = time.strftime("%H:%M:%S", time.localtime(float(event.get("ts", 0))))
    where = "/".join(str(event[k]) for k in ("service", "instance") if event.get(k))
    head = f"{ts} {event.get('kind', '')}" + (f" {where}" if where else "")
    return f"{head}: {event.get('message', '')}".rstrip()


def up(
    home: Path,
    target: Path,
    env: str | None,
    say: Say = _stderr,
    confirm: Callable[[str], bool] = lambda _: True,
) -> dict[str, Any]:
    """bake → start the agent when none runs → plan → apply; a question only when the
    plan destroys something (``confirm`` is asked, with what it destroys)."""
    outcome = make_plan(home, target, env, say, start_agent=True)
    say(outcome.text)
    if outcome.empty:
        return {"outcome": "unchanged"}
    doomed = destroyed(outcome.plan)
    if doomed and not confirm(doomed):
        return {"outcome": "cancelled"}
    return apply_plan(home, outcome.plan, say)


def destroyed(plan: dict[str, Any]) -> str:
    """What a plan destroys without replacing (services removed, instances scaled away),
    in words; empty when nothing."""
    actions = list(plan.get("actions") or ())
    removed = {str(a.get("service")) for a in actions if a.get("action") == "remove"}
    scaled = 0
    for a in actions:
        if a.get("action") != "destroy":
            continue
        if "service removed from kiln.toml" in (a.get("reasons") or ()):
            removed.add(str(a.get("service")))
        else:
            scaled += 1
    parts = []
    if removed:
        names = sorted(removed)
        parts.append(f"service{'s' if len(names) > 1 else ''} {', '.join(names)}")
    if scaled:
        parts.append(f"{scaled} instance{'s' if scaled > 1 else ''}")
    return " and ".join(parts)
