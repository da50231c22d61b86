"""Typed models of ``kiln.toml``: what users write, checked before anything runs."""

from __future__ import annotations

import datetime
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    ValidationInfo,
    field_validator,
    model_validator,
)

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)$")
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)([KMGT]i?B?|[kmgt]|B)?$")
_NAME = r"^[a-z0-9][a-z0-9_.-]{0,62}$"
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}

MAX_DURATION = 24 * 3600.0
"""Cap of every duration in ``kiln.toml``: a longer wait is a typo, not a setting."""
MAX_COUNT = 1000
"""Cap of replicas, surges and other counts: more would be a typo, not a plan."""
MIN_MEMORY = 1024**2
"""A smaller memory limit cannot even start a process."""
MAX_MEMORY = 64 * 1024**4
"""More memory than any one machine has is a typo."""
MAX_CPU = 1024.0
DEFAULT_PIDS = 1024
MAX_PIDS = 1 << 22
"""The kernel's own ceiling (pid_max)."""


def _kind(value: object) -> str:
    """How a TOML value of the wrong type is named in a message."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list | tuple):
        return "an array"
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    if isinstance(value, float) and math.isinf(value):
        return "infinity"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, datetime.date | datetime.time):
        return "a date or time"
    return type(value).__name__


def shown(value: object, limit: int = 40) -> str:
    """``repr`` cut short: an error message must stay one readable line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _seconds_text(seconds: float) -> str:
    for unit in ("h", "m", "s"):
        if seconds >= _UNITS[unit] and (seconds / _UNITS[unit]).is_integer():
            return f"{seconds / _UNITS[unit]:.0f}{unit}"
    return f"{seconds * 1000:g}ms"


def parse_duration(value: object, maximum: float | None = None) -> float:
    """``"1s"``, ``"250ms"``, ``"2m"``, ``"1h"`` or a number of seconds → seconds.

    Anything else (a table, a boolean, NaN, infinity, a negative number, more
    than ``maximum``) is a ``ValueError`` whose message fits after a key name.
    """
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(f'must be a duration such as "1s" or "250ms", not {_kind(value)}')
    if isinstance(value, str):
        m = _DURATION.match(value.strip())
        if not m:
            raise ValueError(f'{shown(value)} is not a duration such as "1s", "250ms" or "2m"')
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    else:
        try:
            seconds = float(value)
        except OverflowError:  # an int beyond float's range
            seconds = math.inf if value > 0 else -math.inf
    if math.isnan(seconds):
        raise ValueError("must be a duration, not NaN")
    if seconds < 0:
        raise ValueError("must be ≥ 0")
    if math.isinf(seconds) or (maximum is not None and seconds > maximum):
        cap = f"at most {_seconds_text(maximum)}" if maximum is not None else "finite"
        raise ValueError(f"must be {cap}")
    return seconds


def _bytes_text(size: int) -> str:
    for power, unit in ((4, "TiB"), (3, "GiB"), (2, "MiB"), (1, "KiB")):
        if size >= 1024**power and size % 1024**power == 0:
            return f"{size // 1024**power}{unit}"
    return f"{size} bytes"


def parse_size(value: object, maximum: int | None = None) -> int:
    """``"256MiB"``, ``"1G"``, ``512`` (bytes) → bytes; refuses what ``parse_duration`` does."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        fractional = isinstance(value, float) and math.isfinite(value)
        what = "a fractional number" if fractional else _kind(value)
        raise ValueError(f'must be a size such as "256MiB" or a number of bytes, not {what}')
    if isinstance(value, str):
        m = _SIZE.match(value.strip())
        if not m:
            raise ValueError(f'{shown(value)} is not a size such as "256MiB" or "1G"')
        power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[(m.group(2) or "B")[0].upper()]
        scaled = float(m.group(1)) * 1024**power
        size = int(scaled) if math.isfinite(scaled) else None
    else:
        size = value
    if size is not None and size < 0:
        raise ValueError("must be ≥ 0")
    if size is None or (maximum is not None and size > maximum):
        limit = f"at most {_bytes_text(maximum)}" if maximum is not None else "a finite size"
        raise ValueError(f"must be {limit}")
    return size


WRITTEN = {"written": True}
"""The validation context of a ``kiln.toml``: what a person wrote, held to the file's
rules. Without it (the agent re-reading a stored config) a duration may be a number."""


def _written_duration(value: object, info: ValidationInfo) -> None:
    """In ``kiln.toml`` a duration says its unit: ``interval = 1`` reads as one second to
    some and one millisecond to others, so a bare number is refused, not guessed."""
    context = info.context if isinstance(info.context, dict) else {}
    if not context.get("written") or isinstance(value, bool):
        return
    if isinstance(value, int | float):
        fits = isinstance(value, int) or math.isfinite(value)
        if fits and 0 <= value <= MAX_DURATION:
            raise ValueError(
                f'must be a duration string such as "{value:g}s", not the number {value!r}'
            )
        raise ValueError(f'must be a duration string such as "1s" or "250ms", not {_kind(value)}')


def _spec_duration(value: object, info: ValidationInfo) -> float:
    _written_duration(value, info)
    return parse_duration(value, MAX_DURATION)


def _positive_duration(value: object, info: ValidationInfo) -> float:
    _written_duration(value, info)
    seconds = parse_duration(value, MAX_DURATION)
    if seconds <= 0:
        raise ValueError("must be > 0")
    return seconds


def _memory(value: object) -> int | None:
    if value is None:
        return None
    size = parse_size(value, MAX_MEMORY)
    if size < MIN_MEMORY:
        raise ValueError(f"must be at least {_bytes_text(MIN_MEMORY)}")
    return size


Duration = Annotated[float, BeforeValidator(_spec_duration, json_schema_input_type=str)]
"""A duration in ``kiln.toml``: ``"250ms"`` … ``"24h"`` (a number of seconds only from code)."""
PositiveDuration = Annotated[float, BeforeValidator(_positive_duration, json_schema_input_type=str)]


def _max_age(value: object, info: ValidationInfo) -> float:
    _written_duration(value, info)
    seconds = parse_duration(value, MAX_INSTANCE_AGE)
    if seconds <= 0:
        raise ValueError("must be > 0")
    return seconds


MaxAge = Annotated[float, BeforeValidator(_max_age, json_schema_input_type=str)]
"""``max_age``: up to 90 days, written in hours beyond a day (``"168h"``)."""
Count = Annotated[int, Field(strict=True, ge=0, le=MAX_COUNT)]
"""A whole number of things: TOML booleans, floats and strings are refused, not coerced."""
PositiveCount = Annotated[int, Field(strict=True, ge=1, le=MAX_COUNT)]
Port = Annotated[int, Field(strict=True, ge=1, le=65535)]


def _exposed_port(value: object) -> object:
    """``8080``, ``"8080"`` or ``"53/udp"``: the spellings of Docker's ``ExposedPorts``."""
    number = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str):
        m = re.fullmatch(r"(\d{1,5})(?:/(?:tcp|udp|sctp))?", value)
        number = int(m.group(1)) if m else None
    if number is None:
        raise ValueError(f'must be a port such as 8080 or "53/udp", not {shown(value)}')
    if not 1 <= number <= 65535:
        raise ValueError("must be a port between 1 and 65535")
    return value


ExposedPort = Annotated[int | str, BeforeValidator(_exposed_port)]


def _environment(value: object) -> object:
    """Every runtime writes ``NAME=VALUE``: a name holding ``=`` would set another variable
    than the one written (``"PORT=1" = "x"`` sets PORT), and a NUL ends the string early."""
    if not isinstance(value, dict):
        return value
    for name, text in value.items():
        if not isinstance(name, str) or not isinstance(text, str):
            continue
        if not name or "=" in name or "\0" in name:
            raise ValueError(f"variable name {shown(name)} must be non-empty, without = or NUL")
        if "\0" in text:
            raise ValueError(f"value of {name} contains a NUL byte")
    return value


EnvVars = Annotated[dict[str, str], BeforeValidator(_environment)]


class _Model(BaseModel):
    """Strict: TOML has real booleans and numbers, so ``"3"`` or ``1`` for ``true`` is a mistake."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, strict=True)


class Project(_Model):
    name: str = Field(pattern=_NAME)
    description: str = ""


class CopyStep(_Model):
    copy_: str = Field(alias="copy", min_length=1)
    to: str = Field(min_length=1)
    chmod: str | None = Field(default=None, pattern=r"^[0-7]{3,4}$")

    @field_validator("to")
    @classmethod
    def _absolute(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError(f"must be an absolute path in the image, not {v!r}")
        return v


class RunStep(_Model):
    run: str | list[str]
    network: bool = False

    @field_validator("run")
    @classmethod
    def _non_empty(cls, v: str | list[str]) -> str | list[str]:
        if not v:
            raise ValueError("must not be empty")
        return v


class EnvStep(_Model):
    env: EnvVars


class WorkdirStep(_Model):
    workdir: str


def _step_kind(value: Any) -> str | None:
    if isinstance(value, dict):
        kinds = [k for k in ("copy", "run", "env", "workdir") if k in value]
        return kinds[0] if len(kinds) == 1 else None
    for kind, model in (("copy", CopyStep), ("run", RunStep), ("env", EnvStep)):
        if isinstance(value, model):
            return kind
    return "workdir" if isinstance(value, WorkdirStep) else None


Step = Annotated[
    Annotated[CopyStep, Tag("copy")]
    | Annotated[RunStep, Tag("run")]
    | Annotated[EnvStep, Tag("env")]
    | Annotated[WorkdirStep, Tag("workdir")],
    Discriminator(
        _step_kind,
        custom_error_type="step_kind",
        custom_error_message="a step needs exactly one of copy, run, env, workdir",
    ),
]


class ImageHealthcheck(_Model):
    """Stored in the image config (as Docker's ``Healthcheck``) for the deploy layer."""

    http: str | None = None
    tcp: bool | None = None
    exec: list[str] | None = None
    interval: Duration = 1.0
    timeout: Duration = 1.0


class SecretAllow(_Model):
    """An accepted secret-scan finding (a test fixture key): the reason is required so
    the list says why each entry is there."""

    path: str = Field(min_length=2, pattern=r"^/")
    rule: str | None = Field(default=None, pattern=r"^[a-z0-9-]{1,64}$")
    reason: str = Field(min_length=1)


class Recipe(_Model):
    """``[images.NAME]``: how to bake one image."""

    from_: str = Field(alias="from", min_length=1)
    packages: list[str] = []
    steps: list[Step] = []
    env: EnvVars = {}
    user: str | None = None
    workdir: str | None = None
    cmd: list[str] | None = None
    entrypoint: list[str] | None = None
    expose: list[ExposedPort] = []
    labels: dict[str, str] = {}
    healthcheck: ImageHealthcheck | None = None
    tag: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
    secrets_allow: list[SecretAllow] = []


class Health(_Model):
    """How Kiln decides an instance is ready (in rotation) or unhealthy (replaced)."""

    http: str | None = None
    tcp: bool = False
    exec: list[str] | None = None
    interval: PositiveDuration = 1.0
    timeout: PositiveDuration = 1.0
    healthy_after: PositiveCount = 1
    unhealthy_after: PositiveCount = 3
    start_period: Duration = 0.0

    @model_validator(mode="after")
    def _one_kind(self) -> Health:
        kinds = [k for k in ("http", "exec") if getattr(self, k)] + (["tcp"] if self.tcp else [])
        if len(kinds) > 1:
            raise ValueError(f"choose one check kind, not {' and '.join(kinds)}")
        if self.http is not None and not self.http.startswith("/"):
            # "healthz" would be probed as GET healthz, which no server answers.
            raise ValueError(f"http must be a path starting with /, such as /{self.http}")
        return self

    @property
    def kind(self) -> Literal["http", "tcp", "exec", "none"]:
        if self.http:
            return "http"
        if self.exec:
            return "exec"
        if self.tcp:
            return "tcp"
        return "none"


class CanaryStep(_Model):
    """One canary step: the canary set gets ``weight`` % of requests for ``pause``."""

    weight: int = Field(strict=True, ge=1, le=100)
    pause: PositiveDuration


class CanaryAnalysis(_Model):
    """When a canary step fails: absolute limits, limits relative to the stable set,
    judged only once the canary answered ``min_requests`` in the step (docs/strategies.md)."""

    max_error_rate: float = Field(default=0.05, ge=0, le=1, strict=True, allow_inf_nan=False)
    max_error_rate_ratio: float | None = Field(
        default=2.0, ge=1, le=MAX_COUNT, strict=True, allow_inf_nan=False
    )
    max_p95_ms: float | None = Field(default=None, gt=0, le=3.6e6, allow_inf_nan=False)
    max_p95_ratio: float | None = Field(
        default=None, ge=1, le=MAX_COUNT, strict=True, allow_inf_nan=False
    )
    min_requests: PositiveCount = 20


class PrePromotion(_Model):
    """A blue/green gate every green instance must pass before traffic switches, beyond
    its health check (a warm-up, a smoke test): ``http``, a path answered with 2xx or
    3xx, or ``exec``, a command run inside the instance that exits 0. The command runs
    in the instance, never on the agent's host: a plan sent with a deployer token must
    not be a way to run code as the agent."""

    http: str | None = Field(default=None, pattern=r"^/[\x21-\x7e]{0,1023}$")
    exec: list[str] | None = Field(default=None, min_length=1, max_length=256)
    timeout: PositiveDuration = 5.0

    @model_validator(mode="after")
    def _one_kind(self) -> PrePromotion:
        if (self.http is None) == (self.exec is None):
            raise ValueError("give one of http (a path) or exec (a command run in each instance)")
        if self.exec is not None and not self.exec[0].strip():
            raise ValueError("exec: the command (its first element) is empty")
        if self.exec is not None and any(len(a) > 4096 for a in self.exec):
            raise ValueError("exec: an argument is over 4096 characters")
        return self


class Update(_Model):
    """Rolling-update knobs, with Nomad's names and Kiln's safe defaults."""

    strategy: Literal["rolling", "canary", "blue-green"] = "rolling"
    steps: list[CanaryStep] = Field(default=[], max_length=100)
    """``strategy = "canary"``: the weights the canary set goes through, in order."""
    analysis: CanaryAnalysis = CanaryAnalysis()
    blue_hold: Duration = 300.0
    """``strategy = "blue-green"``: how long blue stays, out of rotation, after the switch;
    ``kiln rollback`` within it is an instant switch back."""
    auto_promote: bool = True
    """Blue/green: switch as soon as green passes; false waits for ``kiln promote``."""
    pre_promotion: PrePromotion | None = None
    """Blue/green: a check every green instance must pass before the switch."""
    max_surge: Count = 1
    max_unavailable: Count = 0
    min_healthy_time: Duration = 2.0
    healthy_deadline: Duration = 60.0
    progress_deadline: Duration = 300.0
    auto_rollback: bool = True

    @model_validator(mode="after")
    def _can_progress(self) -> Update:
        if self.max_surge == 0 and self.max_unavailable == 0:
            raise ValueError("max_surge and max_unavailable cannot both be 0")
        if self.strategy == "canary":
            if not self.steps:
                raise ValueError('strategy "canary" needs steps = [{ weight = 10, pause = "30s" }]')
            weights = [s.weight for s in self.steps]
            if weights != sorted(set(weights)):
                raise ValueError(f"canary step weights must grow step by step, not {weights}")
        elif self.steps:
            raise ValueError(f'steps are for strategy "canary", not "{self.strategy}"')
        return self


class Heal(_Model):
    """The reconciler's knobs, with BOSH's meltdown breaker as the default."""

    max_parallel: PositiveCount = 4
    meltdown_fraction: float = Field(
        default=0.2, gt=0, le=MAX_COUNT, strict=True, allow_inf_nan=False
    )
    """Above 1 the breaker never trips."""
    meltdown_window: Duration = 600.0
    backoff_cap: Duration = 60.0


class Resources(_Model):
    memory: Annotated[int, BeforeValidator(_memory, json_schema_input_type=str | int)] | None = None
    cpu: float | None = Field(default=None, gt=0, le=MAX_CPU, strict=True, allow_inf_nan=False)
    pids: int = Field(default=DEFAULT_PIDS, ge=1, le=MAX_PIDS, strict=True)
    """Every instance has a pids limit: a fork bomb stops at it, not at the host's."""


def _capability(value: object) -> object:
    if not isinstance(value, str):
        return value
    from kiln.errors import KilnError
    from kiln.oci.config import capability_name

    try:
        return capability_name(value)
    except KilnError as e:
        raise ValueError(str(e)) from e


Capability = Annotated[str, BeforeValidator(_capability)]


class Volume(_Model):
    """A named volume under ``KILN_HOME`` that outlives every instance."""

    name: str = Field(pattern=_NAME)
    path: str
    readonly: bool = False


def _drift_ignore(pattern: object) -> object:
    """A ``drift_ignore`` glob names paths in an instance's root: absolute, no ``..``."""
    if isinstance(pattern, str) and (not pattern.startswith("/") or ".." in pattern.split("/")):
        raise ValueError(f"{pattern!r} is not an absolute path glob without '..' segments")
    return pattern


DriftIgnore = Annotated[str, BeforeValidator(_drift_ignore), Field(max_length=4096)]


class Service(_Model):
    """``[services.NAME]``: how one service runs."""

    image: str = Field(min_length=1)
    replicas: Count = 1
    port: Port = 8080
    listen: Port | None = None
    protocol: Literal["http", "tcp"] = "http"
    health: Health = Health()
    env: EnvVars = {}
    secrets: list[str] = []
    volumes: list[Volume] = []
    writable: list[str] = []
    resources: Resources = Resources()
    cap_add: list[Capability] = []
    """Capabilities the app keeps (``NET_ADMIN``, ``CAP_CHOWN`` …); none by default."""
    seccomp: Literal["default", "unconfined"] = "default"
    network: Literal["private", "outbound"] = "private"
    """``outbound``: the instances may open connections beyond the host (NAT)."""
    stop_grace: Duration = 10.0
    drain_timeout: Duration = 10.0
    update: Update = Update()
    heal: Heal = Heal()
    drift_interval: PositiveDuration = 30.0
    """How often the cheap drift pass (metadata) proves each instance (docs/drift.md)."""
    drift_full_interval: PositiveDuration = 600.0
    """How often the drift pass re-hashes every file of the instances' layers."""
    on_drift: Literal["replace", "warn"] = "replace"
    drift_ignore: list[DriftIgnore] = []
    """``/path`` globs in an instance's root that are not drift (``/var/cache/**``)."""
    max_age: MaxAge | None = None
    """Instances older than this are replaced, a batch at a time (docs/drift.md)."""
    quarantine: PositiveDuration | None = None
    """How long an instance replaced for unhealth or drift is kept frozen, for evidence."""

    @field_validator("max_age")
    @classmethod
    def _age_outlasts_rollout(cls, value: float | None, info: ValidationInfo) -> float | None:
        """A max_age shorter than replacing every instance would keep a service in
        rollouts forever: refused, with the estimate it was held to."""
        update, health = info.data.get("update"), info.data.get("health")
        if value is None or not isinstance(update, Update) or not isinstance(health, Health):
            return value
        replicas = int(info.data.get("replicas") or 0)
        least = shortest_max_age(replicas, update, health)
        if value < least:
            raise ValueError(
                f"{_seconds_text(value)} is shorter than replacing every instance allows: "
                f"at least {_seconds_text(least)} ({MAX_AGE_ROLLOUTS} × the estimated "
                "rollout: batches × (start_period + healthy_after × health.interval + "
                "min_healthy_time))"
            )
        return value


MAX_AGE_ROLLOUTS = 4
"""A max_age must last this many estimated rollouts: a service is never mostly churning."""
MIN_MAX_AGE = 5.0
MAX_INSTANCE_AGE = 90 * 24 * 3600.0


def shortest_max_age(replicas: int, update: Update, health: Health) -> float:
    """The shortest ``max_age`` allowed, in whole seconds: ``MAX_AGE_ROLLOUTS`` × an
    estimate of replacing every instance (one batch is max_surge + max_unavailable
    instances, each needing its start period, ``healthy_after`` probes and
    ``min_healthy_time``), and at least ``MIN_MAX_AGE``."""
    per_batch = max(1, update.max_surge + update.max_unavailable)
    batches = math.ceil(replicas / per_batch)
    batch = health.start_period + health.healthy_after * health.interval + update.min_healthy_time
    return max(MIN_MAX_AGE, float(math.ceil(MAX_AGE_ROLLOUTS * batches * batch)))


MAX_ENGINE_HOST = 1024
"""Longer than any socket path or URL an engine listens on: a paste gone wrong."""
_ENGINE_SCHEMES = ("unix", "tcp", "ssh")


def _engine_host(value: object) -> object:
    """``unix:///PATH``, ``tcp://HOST:PORT`` or ``ssh://[USER@]HOST``: where a Docker
    Engine listens (what ``DOCKER_HOST`` holds)."""
    if not isinstance(value, str):
        return value
    if len(value) > MAX_ENGINE_HOST:
        raise ValueError(f"must be at most {MAX_ENGINE_HOST} characters, not {len(value)}")
    if any(not c.isprintable() or c.isspace() for c in value):
        raise ValueError(f"{shown(value)} contains whitespace or control characters")
    scheme, separator, rest = value.partition("://")
    if not separator or scheme not in _ENGINE_SCHEMES:
        raise ValueError(
            f'{shown(value)} is not an engine address such as "unix:///run/docker.sock" '
            'or "tcp://10.0.0.5:2376"'
        )
    if scheme == "unix" and not rest.startswith("/"):
        raise ValueError(f'{shown(value)}: a unix socket needs an absolute path, "unix:///PATH"')
    if scheme != "unix" and not rest.strip("/"):
        raise ValueError(f"{shown(value)} names no host")
    return value


EngineHost = Annotated[str, BeforeValidator(_engine_host)]


def _registry_path(value: Any) -> Any:
    from kiln.errors import KilnError
    from kiln.image.registry import parse_ref

    if not isinstance(value, str):
        return value
    text = value.rstrip("/")
    try:
        ref = parse_ref(text + "/probe")
    except KilnError as e:
        raise ValueError(
            f"{shown(value)} is not HOST[:PORT][/PATH] (path in lower case: a-z 0-9 . _ - /)"
        ) from e
    if "." not in ref.host and ":" not in ref.host and ref.host != "localhost":
        raise ValueError(f"{shown(value)} must start with a registry host, e.g. 10.0.0.5:5000/kiln")
    return text


RegistryPath = Annotated[str, BeforeValidator(_registry_path)]

_NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,252}$")


def _node_name(value: object) -> object:
    if isinstance(value, str) and not _NODE_NAME.match(value):
        raise ValueError(
            f"{shown(value)} is not a swarm node's hostname, node id or address "
            "(letters, digits, . _ : -)"
        )
    return value


NodeName = Annotated[str, BeforeValidator(_node_name)]
"""A swarm node as ``[runtime] nodes`` names it: its hostname (``docker node ls``), its
node id, or the address the manager lists for it."""


class RuntimeTarget(_Model):
    """``[runtime]``: where the project's instances run. ``local`` is runc on this
    machine; ``docker`` a Docker Engine at ``host`` (default ``DOCKER_HOST`` or
    ``unix:///run/docker.sock``); ``swarm`` a Docker Swarm whose manager is ``host``,
    with images pushed to ``registry`` for every node to pull, and ``nodes`` the Engine
    API of each node (exec, quarantine, file drift and chaos act on a task's node)."""

    kind: Literal["local", "docker", "swarm"] = "local"
    host: EngineHost | None = None
    registry: RegistryPath | None = None
    nodes: dict[NodeName, EngineHost] | None = None


class RuntimeTargetOverlay(_Model):
    """``[environments.NAME.runtime]``: the keys it sets replace the base table's."""

    kind: Literal["local", "docker", "swarm"] | None = None
    host: EngineHost | None = None
    registry: RegistryPath | None = None
    nodes: dict[NodeName, EngineHost] | None = None


_REGISTRY_HOST = r"^(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?$"
RegistryHost = Annotated[str, Field(pattern=_REGISTRY_HOST, max_length=255)]
"""``HOST[:PORT]`` exactly as it starts a registry reference (``127.0.0.1:5000``)."""


class RegistryAccess(_Model):
    """``[registries."HOST:PORT"]``: how to reach one registry, for ``registry:`` bases and
    ``kiln push``/``kiln pull``; paths are relative to ``kiln.toml`` so the file travels."""

    ca: str | None = Field(default=None, min_length=1)
    auth_file: str | None = Field(default=None, min_length=1)
    plain_http: bool = False


_AGE = re.compile(r"^(\d{1,6})([smhdw])$")
_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class PolicySettings(_Model):
    """``[policy]``: the gate every plan and apply passes (docs/policy.md). Without
    ``enforce`` the default bundle only warns, so a project that predates it still deploys."""

    enforce: bool = False
    keys: list[Annotated[str, Field(min_length=1)]] = []
    """Public keys (PEM) whose signature makes an image trusted; relative to kiln.toml."""
    sources: list[Annotated[str, Field(min_length=1)]] = []
    """Globs an image's base (its recipe's ``from``) must match; empty allows any."""
    max_image_age: str | None = None
    files: list[Annotated[str, Field(min_length=1)]] = []
    """The project's own Rego files (globs relative to kiln.toml)."""
    suppressions: str | None = Field(default=None, min_length=1)
    """Accepted scan findings (the file ``kiln scan --suppressions`` reads)."""

    @field_validator("max_image_age")
    @classmethod
    def _age(cls, value: str | None) -> str | None:
        if value is not None and not _AGE.match(value):
            raise ValueError(f'{shown(value)} is not an age such as "30d", "12h" or "2w"')
        return value

    @property
    def max_image_age_seconds(self) -> float | None:
        m = _AGE.match(self.max_image_age or "")
        return float(int(m.group(1)) * _AGE_UNITS[m.group(2)]) if m else None


class Environment(_Model):
    """``[environments.NAME]``: overlays merged over the base file with ``--env NAME``."""

    services: dict[str, dict[str, Any]] = {}
    images: dict[str, dict[str, Any]] = {}
    runtime: RuntimeTargetOverlay = RuntimeTargetOverlay()


class Spec(_Model):
    """A whole ``kiln.toml`` after parsing, overlays applied."""

    project: Project
    runtime: RuntimeTarget = RuntimeTarget()
    images: dict[str, Recipe] = {}
    services: dict[str, Service] = {}
    environments: dict[str, Environment] = {}
    registries: dict[RegistryHost, RegistryAccess] = {}
    policy: PolicySettings = PolicySettings()

    _path: Path = PrivateAttr(default=Path("kiln.toml"))
    _text: str = PrivateAttr(default="")
    _environment: str | None = PrivateAttr(default=None)

    @property
    def path(self) -> Path:
        return self._path

    @property
    def text(self) -> str:
        """The file as written: revisions keep it so a rollback knows what it restores."""
        return self._text

    @property
    def environment(self) -> str | None:
        return self._environment

    @property
    def root(self) -> Path:
        """The project directory: ``copy`` sources are relative to it and may not leave it."""
        return self.path.parent

    def line(self, *path: str | int) -> int | None:
        """The line of key ``path`` in the file (or of its nearest written ancestor),
        for errors found after loading: the environment's overlay of it when it has one."""
        from kiln.spec._locate import key_lines, line_of

        return line_of(key_lines(self._text), path, self._environment)
