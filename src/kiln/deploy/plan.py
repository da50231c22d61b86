"""Desired vs. actual → a plan of creates, destroys and replaces; never an in-place change.

Pure: no I/O, no clock. The agent builds :class:`DesiredService` values from
``kiln.toml`` and the baked digests, takes a :class:`StateSnapshot` from the
store, and gets back a :class:`Plan` it can render, save as JSON and apply.

What makes an instance is summed up in ``config_hash``: an instance whose
revision has the desired hash is kept, any other is replaced. Replica counts
and proxy-only settings (``listen``, ``drain_timeout``, ``update`` …) are not
part of it: they change how many instances run or how they are routed, not
what one instance is.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from kiln.deploy.state import DEAD_STATES, InstanceRecord, Revision, StateSnapshot
from kiln.errors import KilnError
from kiln.image.digest import canonical_json, sha256_hex

if TYPE_CHECKING:
    from kiln.spec.models import Spec

__all__ = [
    "INSTANCE_KEYS",
    "Action",
    "DesiredService",
    "InstanceChange",
    "Plan",
    "ServicePlan",
    "config_hash",
    "desired_from_spec",
    "make_plan",
]

PLAN_FORMAT = 1
INSTANCE_KEYS = (
    "env",
    "port",
    "protocol",
    "volumes",
    "writable",
    "resources",
    "health",
    "cap_add",
    "seccomp",
    "network",
)
"""Service keys that shape an instance; a change to any of them replaces instances."""
SETTING_KEYS = (
    "listen",
    "drain_timeout",
    "stop_grace",
    "update",
    "heal",
    "drift_interval",
    "drift_full_interval",
    "on_drift",
    "drift_ignore",
    "max_age",
    "quarantine",
)
"""Service keys that change routing or rollout only: a new revision, no replacement."""


class Action(StrEnum):
    CREATE = "+"
    DESTROY = "-"
    REPLACE = "-/+"


@dataclass(frozen=True)
class DesiredService:
    name: str
    service_config: dict[str, Any]
    image_digest: str
    config_hash: str
    secrets_versions: dict[str, str] = field(default_factory=dict)

    @property
    def replicas(self) -> int:
        return int(self.service_config.get("replicas", 1))

    def revision_config(self, image_config: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The ``config`` a revision stores: the service, its secret versions, the image's
        entrypoint/cmd/env. The planner reads ``secrets_versions`` back from it."""
        out = dict(self.service_config)
        out["secrets_versions"] = dict(self.secrets_versions)
        out["image_config"] = dict(image_config or {})
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "service_config": self.service_config,
            "image_digest": self.image_digest,
            "config_hash": self.config_hash,
            "secrets_versions": self.secrets_versions,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DesiredService:
        return cls(
            name=str(data["name"]),
            service_config=dict(data["service_config"]),
            image_digest=str(data["image_digest"]),
            config_hash=str(data["config_hash"]),
            secrets_versions={str(k): str(v) for k, v in data["secrets_versions"].items()},
        )


def config_hash(
    service_config: Mapping[str, Any], image_digest: str, secrets_versions: Mapping[str, str]
) -> str:
    """sha256 of the canonical JSON of what makes an instance (never secret values)."""
    shape = {key: service_config.get(key) for key in INSTANCE_KEYS}
    shape["image_digest"] = image_digest
    shape["secrets"] = {name: secrets_versions.get(name, "") for name in sorted(secrets_versions)}
    return "sha256:" + sha256_hex(canonical_json(shape))


def desired_from_spec(
    spec: Spec,
    digests: Mapping[str, str],
    secrets_versions: Mapping[str, str] | None = None,
) -> dict[str, DesiredService]:
    """``digests`` maps image name (``services.X.image``) → manifest digest.

    ``secrets_versions`` maps secret name → its current version; a rotated
    secret gets a new version and so replaces the instances that mount it.
    """
    versions = secrets_versions or {}
    out: dict[str, DesiredService] = {}
    for name, service in sorted(spec.services.items()):
        if service.image.startswith("sha256:"):
            digest = service.image
        elif service.image in digests:
            digest = digests[service.image]
        else:
            raise KilnError(
                f"{spec.path.name}: services.{name}.image: no digest for image "
                f"{service.image!r}; bake it first (kiln bake --image {service.image})"
            )
        cfg = service.model_dump(mode="json", by_alias=True)
        mine = {secret: str(versions.get(secret, "")) for secret in service.secrets}
        out[name] = DesiredService(name, cfg, digest, config_hash(cfg, digest, mine), mine)
    return out


@dataclass(frozen=True)
class InstanceChange:
    """One line of a plan: an instance to create (``instance`` None), destroy or replace."""

    action: Action
    service: str
    instance: str | None
    revision: int | None
    reasons: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "action": self.action.name.lower(),
            "service": self.service,
            "instance": self.instance,
            "revision": self.revision,
            "reasons": list(self.reasons),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> InstanceChange:
        return cls(
            action=Action[str(data["action"]).upper()],
            service=str(data["service"]),
            instance=data.get("instance"),
            revision=data.get("revision"),
            reasons=tuple(str(r) for r in data.get("reasons", ())),
        )


@dataclass(frozen=True)
class ServicePlan:
    service: str
    changes: tuple[InstanceChange, ...] = ()
    settings: tuple[str, ...] = ()
    """Proxy/rollout settings that change without replacing any instance."""
    new_revision: bool = False
    """Applying needs a new revision (instances to replace or create, or settings changed)."""
    removed: bool = False
    """The service is gone from kiln.toml: destroy its instances, retire its revision."""

    def count(self, action: Action) -> int:
        return sum(1 for c in self.changes if c.action is action)

    @property
    def empty(self) -> bool:
        return not (self.changes or self.settings or self.new_revision or self.removed)

    def to_json(self) -> dict[str, Any]:
        return {
            "service": self.service,
            "changes": [c.to_json() for c in self.changes],
            "settings": list(self.settings),
            "new_revision": self.new_revision,
            "removed": self.removed,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ServicePlan:
        return cls(
            service=str(data["service"]),
            changes=tuple(InstanceChange.from_json(c) for c in data.get("changes", ())),
            settings=tuple(str(s) for s in data.get("settings", ())),
            new_revision=bool(data.get("new_revision", False)),
            removed=bool(data.get("removed", False)),
        )


_COLORS = {Action.CREATE: "\x1b[32m", Action.DESTROY: "\x1b[31m", Action.REPLACE: "\x1b[33m"}
_RESET = "\x1b[0m"
_BOLD = "\x1b[1m"


@dataclass(frozen=True)
class Plan:
    base: str
    """``StateSnapshot.state_hash`` of the state this plan was made against."""
    services: tuple[ServicePlan, ...] = ()
    desired: Mapping[str, DesiredService] = field(default_factory=dict)
    """What applying this plan deploys (secret versions only, never values)."""

    @property
    def empty(self) -> bool:
        return all(s.empty for s in self.services)

    @property
    def changes(self) -> Iterator[InstanceChange]:
        for s in self.services:
            yield from s.changes

    def count(self, action: Action) -> int:
        return sum(s.count(action) for s in self.services)

    def service(self, name: str) -> ServicePlan | None:
        return next((s for s in self.services if s.service == name), None)

    @property
    def summary(self) -> str:
        if self.empty:
            return "No changes. Actual matches kiln.toml."
        text = (
            f"Plan: {self.count(Action.CREATE)} to create, {self.count(Action.REPLACE)} to "
            f"replace, {self.count(Action.DESTROY)} to destroy."
        )
        settings = sum(len(s.settings) for s in self.services)
        if settings:
            text += f" {settings} setting{'s' if settings != 1 else ''} changed without replacing."
        return text

    def render(self, color: bool = False) -> str:
        """Terraform-like: one line per instance, ``+``/``-``/``-/+`` first, then a summary."""
        lines: list[str] = []
        for sp in self.services:
            if sp.empty:
                continue
            head = _service_headline(sp)
            lines.append(f"{_BOLD}{head}{_RESET}" if color else head)
            for change in sp.changes:
                symbol = f"{change.action.value:<3}"
                if color:
                    symbol = f"{_COLORS[change.action]}{symbol}{_RESET}"
                who = change.instance or "(new instance)"
                rev = f" r{change.revision}" if change.revision is not None else ""
                lines.append(f"{symbol} {who}{rev}: {'; '.join(change.reasons)}")
            lines.extend(f"  ~ {setting}" for setting in sp.settings)
            lines.append("")
        lines.append(self.summary)
        return "\n".join(lines) + "\n"

    def to_json(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "base": self.base,
            "services": [s.to_json() for s in self.services],
            "desired": {name: d.to_json() for name, d in sorted(self.desired.items())},
            "summary": {
                "create": self.count(Action.CREATE),
                "replace": self.count(Action.REPLACE),
                "destroy": self.count(Action.DESTROY),
                "empty": self.empty,
            },
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | str) -> Plan:
        try:
            raw: Mapping[str, Any] = json.loads(data) if isinstance(data, str) else data
            if raw.get("format") != PLAN_FORMAT:
                raise KilnError(
                    f"plan format {raw.get('format')!r} is not {PLAN_FORMAT}; run kiln plan again"
                )
            return cls(
                base=str(raw["base"]),
                services=tuple(ServicePlan.from_json(s) for s in raw["services"]),
                desired={name: DesiredService.from_json(d) for name, d in raw["desired"].items()},
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise KilnError(f"not a kiln plan: {e.__class__.__name__}: {e}") from e


def _service_headline(sp: ServicePlan) -> str:
    parts = []
    for action, word in (
        (Action.REPLACE, "to replace"),
        (Action.CREATE, "to create"),
        (Action.DESTROY, "to destroy"),
    ):
        n = sp.count(action)
        if n:
            parts.append(f"{n} {word}")
    if sp.removed:
        parts.append("service removed from kiln.toml")
    if not parts:
        parts.append("new revision, no instance changes")
    return f"# {sp.service}: {', '.join(parts)}"


def short_digest(digest: str) -> str:
    algo, _, hexpart = digest.partition(":")
    return f"{algo}:{hexpart[:12]}…" if hexpart else digest[:12] + "…"


def instance_diff(
    old: Mapping[str, Any],
    old_digest: str,
    new: Mapping[str, Any],
    new_digest: str,
    old_secrets: Mapping[str, str],
    new_secrets: Mapping[str, str],
) -> list[str]:
    """Why an instance must be replaced, one phrase per difference, without any value
    that could be secret (env shows keys only; secrets show names and versions)."""
    reasons: list[str] = []
    if old_digest != new_digest:
        reasons.append(f"image {short_digest(old_digest)} → {short_digest(new_digest)}")
    old_env, new_env = dict(old.get("env") or {}), dict(new.get("env") or {})
    for key in sorted(set(old_env) | set(new_env)):
        if key not in old_env:
            reasons.append(f"env {key} added")
        elif key not in new_env:
            reasons.append(f"env {key} removed")
        elif old_env[key] != new_env[key]:
            reasons.append(f"env {key} changed")
    for key in ("port", "protocol"):
        if old.get(key) != new.get(key):
            reasons.append(f"{key} {old.get(key)} → {new.get(key)}")
    for key in ("health", "resources"):
        a, b = old.get(key) or {}, new.get(key) or {}
        for sub in sorted(set(a) | set(b)):
            if a.get(sub) != b.get(sub):
                reasons.append(f"{key}.{sub} changed")
    for key in ("volumes", "writable", "cap_add", "seccomp", "network"):
        if old.get(key) != new.get(key):
            reasons.append(f"{key} changed")
    for name in sorted(set(old_secrets) | set(new_secrets)):
        if name not in old_secrets:
            reasons.append(f"secret {name} added")
        elif name not in new_secrets:
            reasons.append(f"secret {name} removed")
        elif old_secrets[name] != new_secrets[name]:
            reasons.append(
                f"secret {name} {old_secrets[name] or 'unset'} → {new_secrets[name] or 'unset'}"
            )
    return reasons


def revision_changes(before: Revision | None, after: Revision) -> list[str]:
    """What a revision changed from the one before it, as the plan said it (``kiln
    history`` tells two revisions of the same image apart by this)."""
    if before is None:
        return ["first revision"]

    def secrets(rev: Revision) -> dict[str, str]:
        versions = dict(rev.config.get("secrets_versions") or {})
        return versions or {s: "" for s in rev.config.get("secrets") or []}

    changes = instance_diff(
        before.config,
        before.image_digest,
        after.config,
        after.image_digest,
        secrets(before),
        secrets(after),
    )
    if before.config.get("replicas") != after.config.get("replicas"):
        changes.append(f"replicas {before.config.get('replicas')} → {after.config.get('replicas')}")
    changes += settings_diff(before.config, after.config)
    return changes or ["no change (same config)"]


def settings_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    out: list[str] = []
    for key in SETTING_KEYS:
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(
                f"{key}.{sub} {a.get(sub)} → {b.get(sub)}"
                for sub in sorted(set(a) | set(b))
                if a.get(sub) != b.get(sub)
            )
        else:
            out.append(f"{key} {a} → {b}")
    return out


_DESTROY_ORDER = {"failed": 0, "lost": 0, "unhealthy": 1, "pending": 2, "starting": 2, "ready": 3}


def make_plan(
    desired: Mapping[str, DesiredService], actual: StateSnapshot, project: str | None = None
) -> Plan:
    """With ``project``, the plan touches only that project's services: another
    project's service in the same ``KILN_HOME`` is neither removed nor taken over."""
    by_service: dict[str, list[InstanceRecord]] = {}
    for inst in actual.instances:
        if inst.state in ("draining", "stopping"):
            continue
        by_service.setdefault(inst.service, []).append(inst)
    plans: list[ServicePlan] = []
    for name in sorted(set(desired) | set(by_service) | set(actual.active)):
        want = desired.get(name)
        current = by_service.get(name, [])
        owner = _project_of(actual, name, current)
        if project is not None and owner is not None and owner != project:
            if want is not None:
                raise KilnError(
                    f"service {name} belongs to project {owner!r} in this KILN_HOME, not to "
                    f"{project!r}; rename the service or use another KILN_HOME"
                )
            continue
        if want is None:
            changes = tuple(
                InstanceChange(
                    Action.DESTROY, name, i.id, i.revision, ("service removed from kiln.toml",)
                )
                for i in current
            )
            plans.append(ServicePlan(name, changes, removed=True))
            continue
        plans.append(_plan_service(want, current, actual))
    return Plan(base=actual.state_hash, services=tuple(plans), desired=dict(desired))


def _project_of(actual: StateSnapshot, service: str, current: list[InstanceRecord]) -> str | None:
    """The project whose ``kiln.toml`` made the service (None before Kiln recorded it)."""
    rev = actual.active_revision(service)
    if rev is None:
        rev = next((r for i in current if (r := actual.revision_of(i)) is not None), None)
    project = (rev.config.get("project") if rev is not None else None) or None
    return str(project) if project is not None else None


def _plan_service(
    want: DesiredService, current: list[InstanceRecord], actual: StateSnapshot
) -> ServicePlan:
    name = want.name
    keep: list[InstanceRecord] = []
    replace: list[InstanceChange] = []
    for inst in current:
        rev = actual.revision_of(inst)
        if inst.state in DEAD_STATES:
            replace.append(
                InstanceChange(Action.REPLACE, name, inst.id, inst.revision, ("instance dead",))
            )
        elif rev is None or rev.config_hash != want.config_hash:
            reasons = ["revision unknown"] if rev is None else _reasons(rev, want)
            replace.append(
                InstanceChange(Action.REPLACE, name, inst.id, inst.revision, tuple(reasons))
            )
        else:
            keep.append(inst)
    have = len(current)
    target = want.replicas
    changes: list[InstanceChange] = []
    if have > target:
        scale = f"replicas {have} → {target}"
        excess = have - target
        by_replace = {c.instance: c for c in replace}
        ordered = sorted(
            current,
            key=lambda i: (
                i.id not in by_replace,
                _DESTROY_ORDER.get(i.state, 0),
                -i.created,
            ),
        )
        doomed = {i.id for i in ordered[:excess]}
        for inst in ordered[:excess]:
            changes.append(InstanceChange(Action.DESTROY, name, inst.id, inst.revision, (scale,)))
        replace = [c for c in replace if c.instance not in doomed]
    changes.extend(replace)
    if have < target:
        reason = None
        if have == 0 and name not in actual.active:
            reason = (
                "stopped by kiln stop or kiln down; applying runs it again"
                if name in actual.stopped
                else "new service"
            )
        scale = reason or f"replicas {have} → {target}"
        changes.extend(
            InstanceChange(Action.CREATE, name, None, None, (scale,)) for _ in range(target - have)
        )
    active = actual.active_revision(name)
    settings: list[str] = []
    new_revision = bool(changes)
    if active is not None:
        settings = settings_diff(active.config, want.service_config)
        if active.config_hash != want.config_hash or active.config.get("replicas") != target:
            new_revision = True
        new_revision = new_revision or bool(settings)
    elif target > 0 or current:
        new_revision = True
    order = {Action.DESTROY: 0, Action.REPLACE: 1, Action.CREATE: 2}
    changes.sort(key=lambda c: order[c.action])
    return ServicePlan(name, tuple(changes), tuple(settings), new_revision)


def _reasons(rev: Revision, want: DesiredService) -> list[str]:
    old_secrets = dict(rev.config.get("secrets_versions") or {})
    if not old_secrets:
        old_secrets = {s: "" for s in rev.config.get("secrets") or []}
    reasons = instance_diff(
        rev.config,
        rev.image_digest,
        want.service_config,
        want.image_digest,
        old_secrets,
        want.secrets_versions,
    )
    return reasons or ["config changed"]


def plan_answer(body: Mapping[str, Any], actual: StateSnapshot) -> dict[str, Any]:
    """The answer to a plan request (desired services as JSON, and where they came
    from) against ``actual`` (a ``StateSnapshot``): what the agent answers and what the
    CLI computes itself when no agent runs, so both show the same plan."""
    try:
        desired = {
            name: DesiredService.from_json(d) for name, d in (body.get("services") or {}).items()
        }
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise KilnError(f"plan request: services: malformed desired service ({e})") from e
    project = body.get("project")
    plan = make_plan(desired, actual, str(project) if project else None)
    out = plan.to_json()
    out["actions"] = plan_actions(plan)
    out["source"] = {
        key: body.get(key)
        for key in ("spec_path", "environment", "spec_text", "git_commit", "digests", "project")
    }
    return {"plan": out, "text": plan.render()}


def plan_actions(plan: Plan) -> list[dict[str, Any]]:
    """Every change as one flat list: what the CLI counts to tell an empty plan."""
    out: list[dict[str, Any]] = [c.to_json() for c in plan.changes]
    for sp in plan.services:
        out.extend({"action": "setting", "service": sp.service, "setting": s} for s in sp.settings)
        if sp.new_revision and not sp.changes and not sp.settings:
            out.append({"action": "revision", "service": sp.service})
        if sp.removed and not sp.changes:
            out.append({"action": "remove", "service": sp.service})
    return out
