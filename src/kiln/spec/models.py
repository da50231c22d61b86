"""Typed models of ``kiln.toml``: what users write, checked before anything runs."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    field_validator,
    model_validator,
)

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)$")
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)([KMGT]i?B?|[kmgt]|B)?$")
_NAME = r"^[a-z0-9][a-z0-9_.-]{0,62}$"


def parse_duration(value: str | float | int) -> float:
    """``"1s"``, ``"250ms"``, ``"2m"`` or a number of seconds → seconds."""
    if isinstance(value, bool):
        raise ValueError('must be a duration such as "1s" or "250ms"')
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("must be ≥ 0")
        return float(value)
    m = _DURATION.match(value.strip())
    if not m:
        raise ValueError(f'{value!r} is not a duration such as "1s", "250ms" or "2m"')
    n, unit = float(m.group(1)), m.group(2)
    return n * {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}[unit]


def parse_size(value: str | int) -> int:
    """``"256MiB"``, ``"1G"``, ``512`` (bytes) → bytes."""
    if isinstance(value, bool):
        raise ValueError('must be a size such as "256MiB"')
    if isinstance(value, int):
        if value < 0:
            raise ValueError("must be ≥ 0")
        return value
    m = _SIZE.match(value.strip())
    if not m:
        raise ValueError(f'{value!r} is not a size such as "256MiB" or "1G"')
    n, unit = float(m.group(1)), (m.group(2) or "B")
    letter = unit[0].upper()
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[letter]
    return int(n * 1024**power)


Duration = Annotated[float, Field(ge=0)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


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
    env: dict[str, str]


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
    interval: float = 1.0
    timeout: float = 1.0

    _durations = field_validator("interval", "timeout", mode="before")(lambda v: parse_duration(v))


class Recipe(_Model):
    """``[images.NAME]``: how to bake one image."""

    from_: str = Field(alias="from", min_length=1)
    packages: list[str] = []
    steps: list[Step] = []
    env: dict[str, str] = {}
    user: str | None = None
    workdir: str | None = None
    cmd: list[str] | None = None
    entrypoint: list[str] | None = None
    expose: list[int | str] = []
    labels: dict[str, str] = {}
    healthcheck: ImageHealthcheck | None = None
    tag: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


class Health(_Model):
    """How Kiln decides an instance is ready (in rotation) or unhealthy (replaced)."""

    http: str | None = None
    tcp: bool = False
    exec: list[str] | None = None
    interval: float = 1.0
    timeout: float = 1.0
    healthy_after: int = Field(default=1, ge=1)
    unhealthy_after: int = Field(default=3, ge=1)
    start_period: float = 0.0

    _durations = field_validator("interval", "timeout", "start_period", mode="before")(
        lambda v: parse_duration(v)
    )

    @model_validator(mode="after")
    def _one_kind(self) -> Health:
        kinds = [k for k in ("http", "exec") if getattr(self, k)] + (["tcp"] if self.tcp else [])
        if len(kinds) > 1:
            raise ValueError(f"choose one check kind, not {' and '.join(kinds)}")
        if self.timeout <= 0 or self.interval <= 0:
            raise ValueError("interval and timeout must be > 0")
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


class Update(_Model):
    """Rolling-update knobs, with Nomad's names and Kiln's safe defaults."""

    strategy: Literal["rolling"] = "rolling"
    max_surge: int = Field(default=1, ge=0)
    max_unavailable: int = Field(default=0, ge=0)
    min_healthy_time: float = 2.0
    healthy_deadline: float = 60.0
    progress_deadline: float = 300.0
    auto_rollback: bool = True

    _durations = field_validator(
        "min_healthy_time", "healthy_deadline", "progress_deadline", mode="before"
    )(lambda v: parse_duration(v))

    @model_validator(mode="after")
    def _can_progress(self) -> Update:
        if self.max_surge == 0 and self.max_unavailable == 0:
            raise ValueError("max_surge and max_unavailable cannot both be 0")
        return self


class Heal(_Model):
    """The reconciler's knobs, with BOSH's meltdown breaker as the default."""

    max_parallel: int = Field(default=4, ge=1)
    meltdown_fraction: float = Field(default=0.2, gt=0)
    meltdown_window: float = 600.0
    backoff_cap: float = 60.0

    _durations = field_validator("meltdown_window", "backoff_cap", mode="before")(
        lambda v: parse_duration(v)
    )


class Resources(_Model):
    memory: int | None = None
    cpu: float | None = Field(default=None, gt=0)

    _size = field_validator("memory", mode="before")(lambda v: None if v is None else parse_size(v))


class Volume(_Model):
    """A named volume under ``KILN_HOME`` that outlives every instance."""

    name: str = Field(pattern=_NAME)
    path: str
    readonly: bool = False


class Service(_Model):
    """``[services.NAME]``: how one service runs."""

    image: str = Field(min_length=1)
    replicas: int = Field(default=1, ge=0, le=1000)
    port: int = Field(default=8080, ge=1, le=65535)
    listen: int | None = Field(default=None, ge=1, le=65535)
    protocol: Literal["http", "tcp"] = "http"
    health: Health = Health()
    env: dict[str, str] = {}
    secrets: list[str] = []
    volumes: list[Volume] = []
    writable: list[str] = []
    resources: Resources = Resources()
    stop_grace: float = 10.0
    drain_timeout: float = 10.0
    update: Update = Update()
    heal: Heal = Heal()

    _durations = field_validator("stop_grace", "drain_timeout", mode="before")(
        lambda v: parse_duration(v)
    )


class Environment(_Model):
    """``[environments.NAME]``: overlays merged over the base file with ``--env NAME``."""

    services: dict[str, dict[str, Any]] = {}
    images: dict[str, dict[str, Any]] = {}


class Spec(_Model):
    """A whole ``kiln.toml`` after parsing, overlays applied."""

    project: Project
    images: dict[str, Recipe] = {}
    services: dict[str, Service] = {}
    environments: dict[str, Environment] = {}

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
