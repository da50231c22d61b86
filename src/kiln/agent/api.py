"""The agent's HTTP+JSON API: a thin FastAPI shell over :class:`kiln.agent.daemon.Agent`.

Imported only by the daemon, so the CLI never pays for FastAPI. Every
KilnError becomes ``{"detail": message}`` with 400 (409 for conflicts such
as a stale plan, 404 for unknown ids), which the client re-raises verbatim.
A request that breaks a bound (every number here has one) is a 400 naming
the parameter, never a 422 list or a 500 from SQLite's 64-bit integers.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from kiln.agent.errors import Busy, Conflict, NotFound
from kiln.errors import KilnError
from kiln.spec.loader import describe_errors, key_name
from kiln.spec.models import MAX_COUNT, Service, shown
from kiln.traffic.router import RESPONSE_CLASSES, BackendCounters, Latency

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Receive, Scope, Send

    from kiln.agent.daemon import Agent
    from kiln.agent.tokens import TokenStore

__all__ = [
    "EDGE_ROUTES",
    "MAX_EDGE_REPORT",
    "MAX_EVENTS",
    "MAX_ID",
    "ROUTE_ROLES",
    "build_app",
    "build_remote_app",
]

MAX_ID = 2**63 - 1
"""Event ids and revision numbers are SQLite INTEGERs: nothing above fits."""
MAX_EVENTS = 10_000
"""One page of events; a follower pages with ``after``."""
FOLLOW_BATCH = 500

QUERY_BOUNDS = {"after": (0, MAX_ID), "limit": (1, MAX_EVENTS), "follow": (0, 1)}
"""``GET /v1/events``: every query parameter is an integer in its range."""
_DEPLOYMENT_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
ROUTES_WAIT_MAX = 60.0
"""The longest a route watch is held; the watcher asks again after it."""
_AFTER = re.compile(r"([0-9a-f]{1,64}):([0-9]{1,19})")

Revision = Annotated[int, Field(strict=True, ge=1, le=MAX_ID)]

MAX_EDGE_REPORT = 1 << 20
"""The largest counters report an edge may post: a thousand backends take a fraction."""
_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
"""A service's, a backend's and an edge's name, as routes name them."""
Count = Annotated[int, Field(strict=True, ge=0, le=MAX_ID)]
EdgeName = Annotated[str, Field(pattern=_NAME_PATTERN)]


_LATENCY_BUCKETS = frozenset(
    str(Latency.bucket(digit * 10**exp))
    for exp in range(9)
    for digit in range(1 if exp else 0, 100)
)
"""Every bucket of the router's histogram as an edge writes it (``Latency.bucket``: every
ms below 100, then two significant digits up to ten digits)."""


class _BackendReport(BaseModel):
    """One backend's counts at one edge, since its HAProxy started."""

    model_config = ConfigDict(extra="forbid")

    requests: Count
    responses: dict[Literal["1xx", "2xx", "3xx", "4xx", "5xx", "other"], Count] = {}
    errors: Count = 0
    active: Count = 0
    latency: Annotated[
        dict[Annotated[str, Field(pattern=r"^[0-9]{1,10}$")], Count], Field(max_length=1024)
    ] = {}
    """Histogram: bucket (ms) → requests."""

    @field_validator("latency")
    @classmethod
    def _router_buckets(cls, latency: dict[str, int]) -> dict[str, int]:
        """Only the buckets the router's histogram has (``Latency.bucket``: two
        significant digits, about 800 in all), so a backend's histogram kept by the agent
        stays that small whatever an edge token posts."""
        odd = sorted(latency.keys() - _LATENCY_BUCKETS)
        if odd:
            raise ValueError(f"not a bucket of the router's histogram: {', '.join(odd[:3])}")
        return latency


class EdgeReport(BaseModel):
    """``POST /v1/edge/counters``: what one edge process counted of the services the
    routes asked it for."""

    model_config = ConfigDict(extra="forbid")

    edge: EdgeName
    generation: Annotated[str, Field(pattern=r"^[0-9a-f]{1,64}$")]
    services: Annotated[
        dict[
            EdgeName,
            Annotated[dict[EdgeName, _BackendReport], Field(max_length=4096)],
        ],
        Field(max_length=256),
    ]

    def counters(self) -> dict[str, dict[str, BackendCounters]]:
        return {
            service: {
                bid: BackendCounters(
                    requests=b.requests,
                    responses={
                        **dict.fromkeys(RESPONSE_CLASSES, 0),
                        **{str(k): n for k, n in b.responses.items()},
                    },
                    errors=b.errors,
                    active=b.active,
                    latency=Latency({int(k): v for k, v in b.latency.items()}),
                )
                for bid, b in backends.items()
            }
            for service, backends in self.services.items()
        }


class DriftRequest(BaseModel):
    service: str | None = Field(default=None, min_length=1, max_length=128)
    full: bool = True


class BadRequest(KilnError):
    """A request breaking a bound: 400, naming the parameter."""


class RegistryRequest(BaseModel):
    path: str = Field(max_length=1024)
    ca: str | None = Field(default=None, max_length=4096)
    auth_file: str | None = Field(default=None, max_length=4096)
    plain_http: bool = False


NodeKey = Annotated[str, Field(max_length=253)]
EngineAddress = Annotated[str, Field(max_length=1024)]


class RuntimeRequest(BaseModel):
    kind: str = "local"
    host: str | None = None
    registry: RegistryRequest | None = None
    nodes: dict[NodeKey, EngineAddress] | None = Field(default=None, max_length=1024)
    """A swarm's ``[runtime] nodes``: each node's engine (compared with the agent's)."""


class PlanRequest(BaseModel):
    runtime: RuntimeRequest | None = None
    spec_path: str
    environment: str | None = None
    spec_text: str = ""
    git_commit: str | None = None
    project: str | None = None
    digests: dict[str, str] = {}
    services: dict[str, Any]


class ApplyRequest(BaseModel):
    plan: dict[str, Any]


class ScaleRequest(BaseModel):
    service: str = Field(max_length=64)
    replicas: int = Field(ge=0, le=MAX_COUNT, strict=True)


class ServiceRequest(BaseModel):
    service: str = Field(max_length=64)


class BurnRequest(BaseModel):
    instance: str = Field(min_length=1, max_length=128)
    keep_evidence: bool = False


EXEC_ARGS_MAX = 4096
EXEC_TIMEOUT_MAX = 24 * 3600.0


class ExecRequest(BaseModel):
    """A command for ``kiln exec``: argv as a list (no shell unless it names one), bounded
    so a request cannot make the agent hold an absurd command or wait forever."""

    instance: str = Field(min_length=1, max_length=128)
    argv: list[Annotated[str, Field(max_length=EXEC_ARGS_MAX, pattern=r"^[^\x00]*$")]] = Field(
        min_length=1, max_length=256
    )
    timeout: float = Field(default=60.0, gt=0, le=EXEC_TIMEOUT_MAX, allow_inf_nan=False)


class RollbackRequest(BaseModel):
    service: str
    revision: Revision | None = None


class _Desired(BaseModel):
    """A ``DesiredService`` as the engine reads it. Its service config is checked with
    the very model ``[services.X]`` is, so no client can plan more replicas, longer
    timeouts or stranger numbers than ``kiln.toml`` could say."""

    model_config = ConfigDict(extra="allow")

    name: str
    service_config: Service
    image_digest: str
    config_hash: str
    secrets_versions: dict[str, str] = {}


class _Change(BaseModel):
    model_config = ConfigDict(extra="allow")

    revision: Revision | None = None


class _ServicePlan(BaseModel):
    model_config = ConfigDict(extra="allow")

    changes: list[_Change] = []


class _Plan(BaseModel):
    """The numbers of a plan the client sends back (a plan file can be edited by hand)."""

    model_config = ConfigDict(extra="allow")

    services: list[_ServicePlan] = []
    desired: dict[str, _Desired] = {}


_DESIRED = TypeAdapter(dict[str, _Desired])
_PLAN = TypeAdapter(_Plan)


def _check(adapter: TypeAdapter[Any], value: Any, where: str) -> None:
    """Validate ``value`` only to refuse it: the engine still gets the request as sent."""
    try:
        adapter.validate_python(value)
    except ValidationError as e:
        raise BadRequest(_describe(e.errors(), (where,))) from None


def _describe(errors: Any, prefix: tuple[str, ...] = ()) -> str:
    """``revision: must be ≥ 1, not 0``: the parameter (as a key path), then why."""
    first = min(errors, key=lambda err: tuple(map(str, err["loc"])))
    loc = tuple(first["loc"])
    if len(loc) == 2 and loc[0] == "query" and loc[1] in QUERY_BOUNDS:
        low, high = QUERY_BOUNDS[str(loc[1])]
        return f"{loc[1]}: must be an integer from {low} to {high}, not {shown(first['input'])}"
    if loc and loc[0] in ("query", "body", "path"):
        loc = loc[1:]
    path, message = describe_errors([{**first, "loc": loc}])
    message = message.replace("must be a table", "must be an object")
    if first["type"] == "json_invalid":
        return "body: not valid JSON"
    says_why = first["type"] in ("missing", "extra_forbidden", "value_error")
    if not says_why and not isinstance(first.get("input"), dict | list | None):
        message += f", not {shown(first['input'])}"
    return f"{key_name((*prefix, *path)) or 'body'}: {message}"


ROUTE_ROLES: dict[tuple[str, str], str] = {
    ("GET", "/v1/health"): "viewer",
    ("GET", "/v1/status"): "viewer",
    ("GET", "/v1/deployments/{deployment_id}"): "viewer",
    ("GET", "/v1/history/{service}"): "viewer",
    ("GET", "/v1/events"): "viewer",
    ("GET", "/v1/routes"): "viewer",
    ("POST", "/v1/plan"): "deployer",
    ("POST", "/v1/apply"): "deployer",
    ("POST", "/v1/scale"): "deployer",
    ("POST", "/v1/rollback"): "deployer",
    ("POST", "/v1/restart"): "deployer",
    ("POST", "/v1/stop"): "deployer",
    ("POST", "/v1/start"): "deployer",
    ("POST", "/v1/drift"): "deployer",
    ("POST", "/v1/promote"): "deployer",
    ("POST", "/v1/abort"): "deployer",
    ("POST", "/v1/exec"): "admin",
    ("POST", "/v1/burn"): "deployer",
    ("POST", "/v1/down"): "admin",
    ("POST", "/v1/edge/counters"): "admin",
}
"""The role a bearer token needs per route over the network (the Unix socket needs none:
its 0600 mode is its authentication). A route missing here is refused to every token.
Posting counters sways a canary's verdict without a trace in the events, so no role
below admin may (a deployer promotes or aborts in the open, with ``kiln promote``)."""
EDGE_ROUTES = frozenset({("GET", "/v1/routes"), ("POST", "/v1/edge/counters")})
"""All an ``edge`` token may use: its routes in, its counters out; nothing a viewer
reads (status, events, history) and nothing else."""


def build_remote_app(agent: Agent, tokens: TokenStore) -> ASGIApp:
    """The same API for the network listener: every request must carry a bearer token
    whose role the route allows."""
    return _RequireToken(build_app(agent), tokens)


class _RequireToken:
    """Checks the bearer token before anything else runs, unknown paths included: no body
    is parsed and no route is revealed for a request without a valid token."""

    def __init__(self, app: FastAPI, tokens: TokenStore) -> None:
        self.app = app
        self.tokens = tokens

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        record = self.tokens.lookup(_bearer(scope))
        if record is None or record.revoked is not None:
            await _refuse(scope, receive, send, 401, "a valid bearer token is required")
            return
        if record.expired():
            when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(record.expires_at))
            detail = f"token {record.id} expired at {when}; `kiln token create` makes a new one"
            await _refuse(scope, receive, send, 401, detail)
            return
        from starlette.routing import Match

        for route in self.app.router.routes:
            match, _ = route.matches(scope)
            if match is Match.FULL:
                from kiln.agent.tokens import EDGE_ROLE, role_allows

                key = (scope["method"], getattr(route, "path", ""))
                needed = ROUTE_ROLES.get(key, "")
                edge = record.role == EDGE_ROLE and key in EDGE_ROUTES
                if not edge and not role_allows(record.role, needed):
                    detail = f"token {record.id} ({record.role}) may not use this route"
                    if needed:
                        detail += f"; it needs {needed}"
                        if key in EDGE_ROUTES:
                            detail += f" or {EDGE_ROLE}"
                    await _refuse(scope, receive, send, 403, detail)
                    return
                break
        await self.app(scope, receive, send)


def _bearer(scope: Scope) -> str:
    """The token of the one ``Authorization: Bearer`` header, or "" (two such headers are
    ambiguous, so neither counts)."""
    values: list[bytes] = [v for k, v in scope["headers"] if k == b"authorization"]
    if len(values) != 1:
        return ""
    scheme, _, token = values[0].partition(b" ")
    if scheme.lower() != b"bearer":
        return ""
    try:
        return token.strip(b" ").decode("ascii")
    except UnicodeDecodeError:
        return ""


async def _refuse(scope: Scope, receive: Receive, send: Send, code: int, detail: str) -> None:
    headers = {"WWW-Authenticate": 'Bearer realm="kiln"'} if code == 401 else None
    await JSONResponse({"detail": detail}, status_code=code, headers=headers)(scope, receive, send)


def build_app(agent: Agent) -> FastAPI:
    app = FastAPI(title="kiln agent", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(KilnError)
    async def _kiln_error(request: Request, exc: KilnError) -> JSONResponse:
        if isinstance(exc, Busy):
            return JSONResponse({"detail": str(exc)}, status_code=429, headers={"Retry-After": "1"})
        code = 409 if isinstance(exc, Conflict) else 404 if isinstance(exc, NotFound) else 400
        if isinstance(exc, TooLarge):
            code = 413
        return JSONResponse({"detail": str(exc)}, status_code=code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _describe(exc.errors())}, status_code=400)

    @app.get("/v1/health")
    async def health() -> dict[str, Any]:
        return agent.health()

    @app.get("/v1/status")
    async def status() -> dict[str, Any]:
        return await agent.status()

    @app.post("/v1/plan")
    async def plan(body: PlanRequest) -> dict[str, Any]:
        _check(_DESIRED, body.services, "services")
        return await agent.plan(body.model_dump())

    @app.post("/v1/apply")
    async def apply(body: ApplyRequest) -> dict[str, Any]:
        _check(_PLAN, body.plan, "plan")
        return await agent.apply(body.plan)

    @app.get("/v1/deployments/{deployment_id}")
    async def deployment(deployment_id: str) -> dict[str, Any]:
        if not _DEPLOYMENT_ID.fullmatch(deployment_id):  # it becomes a file name
            raise NotFound(f"no deployment {shown(deployment_id)}")
        return await agent.deployment(deployment_id)

    @app.post("/v1/scale")
    async def scale(body: ScaleRequest) -> dict[str, Any]:
        return await agent.scale(body.service, body.replicas)

    @app.post("/v1/rollback")
    async def rollback(body: RollbackRequest) -> dict[str, Any]:
        return await agent.rollback(body.service, body.revision)

    @app.post("/v1/restart")
    async def restart(body: ServiceRequest) -> dict[str, Any]:
        return await agent.restart(body.service)

    @app.post("/v1/stop")
    async def stop(body: ServiceRequest) -> dict[str, Any]:
        return await agent.stop_service(body.service)

    @app.post("/v1/start")
    async def start(body: ServiceRequest) -> dict[str, Any]:
        return await agent.start_service(body.service)

    @app.post("/v1/promote")
    async def promote(body: ServiceRequest) -> dict[str, Any]:
        return await agent.promote(body.service)

    @app.post("/v1/abort")
    async def abort(body: ServiceRequest) -> dict[str, Any]:
        return await agent.abort(body.service)

    @app.post("/v1/exec")
    async def exec_(body: ExecRequest) -> dict[str, Any]:
        return await agent.exec(body.instance, body.argv, body.timeout)

    @app.post("/v1/burn")
    async def burn(body: BurnRequest) -> dict[str, Any]:
        return await agent.burn(body.instance, body.keep_evidence)

    @app.post("/v1/drift")
    async def drift(body: DriftRequest) -> dict[str, Any]:
        return await agent.drift(body.service, body.full)

    @app.get("/v1/history/{service}")
    async def history(service: str) -> dict[str, Any]:
        return await agent.history(service)

    @app.get("/v1/events", response_model=None)
    async def events(
        after: Annotated[int, Query(ge=0, le=MAX_ID)] = 0,
        limit: Annotated[int, Query(ge=1, le=MAX_EVENTS)] = 1000,
        follow: Annotated[int, Query(ge=0, le=1)] = 0,
    ) -> dict[str, Any] | StreamingResponse:
        if not follow:
            return {
                "events": await agent.events(after, limit),
                "last_id": await agent.last_event_id(),
            }
        return StreamingResponse(_follow(agent, after), media_type="application/x-ndjson")

    @app.get("/v1/routes", response_model=None)
    async def routes(
        request: Request, after: str | None = None, wait: str = "0"
    ) -> dict[str, Any] | JSONResponse | None:
        """The routes this agent serves, for data planes elsewhere (a watch with a version,
        as Envoy's xDS): held while ``after`` is current, for at most ``wait`` seconds."""
        since: tuple[str, int] | None = None
        if after is not None:
            parts = _AFTER.fullmatch(after)
            if parts is None:
                detail = f"after: expected EPOCH:VERSION from a previous answer, not {shown(after)}"
                return JSONResponse({"detail": detail}, status_code=422)
            since = (parts.group(1), int(parts.group(2)))
        seconds = _wait_seconds(wait)
        answer = asyncio.ensure_future(agent.routes(since, seconds))
        gone = asyncio.ensure_future(_hung_up(request))
        try:
            done, _ = await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not answer.done():
                answer.cancel()
        if answer not in done:
            return None  # the watcher hung up: nobody to answer
        return answer.result()

    @app.post("/v1/down")
    async def down() -> dict[str, Any]:
        return await agent.down()

    reports_checked = asyncio.Semaphore(1)
    bytes_in_line = 0

    @app.post("/v1/edge/counters")
    async def edge_counters(request: Request) -> dict[str, Any]:
        """An edge's counters of the services under analysis (swarm canaries): read
        bounded, checked whole, then added to what the analysis reads. Checking the
        largest report takes about 0.1 s of CPU (measured): it is done in a thread, one
        report at a time, and one that would put more than ``EDGE_REPORTS_QUEUED``
        bytes in line is answered 429, so a flood of them (one edge token is on every
        node) neither stalls the event loop nor queues without end (measured before:
        the health route's median answer took 341 ms under four posters of the largest
        report). Counts are cumulative: a refused report's are in the edge's next."""
        nonlocal bytes_in_line
        body = await _bounded_body(request, MAX_EDGE_REPORT)
        if bytes_in_line and bytes_in_line + len(body) > EDGE_REPORTS_QUEUED:
            raise Busy(f"{bytes_in_line} bytes of edge reports are being checked: retry later")
        bytes_in_line += len(body)
        try:
            async with reports_checked:
                report, counters = await asyncio.to_thread(_edge_report, body)
        finally:
            bytes_in_line -= len(body)
        return agent.edge_counters(report.edge, report.generation, counters)

    return app


EDGE_REPORTS_QUEUED = 2 * MAX_EDGE_REPORT
"""Bytes of edge reports checked or waiting at once: the second largest report waits,
a third is answered 429, while the few kB a node's edge posts each second, from
hundreds of nodes at the same moment, all fit."""


def _edge_report(body: bytes) -> tuple[EdgeReport, dict[str, dict[str, BackendCounters]]]:
    """The report checked whole and its counters (run in a thread: it takes CPU)."""
    try:
        report = EdgeReport.model_validate_json(body)
    except ValidationError as e:
        raise BadRequest(_describe(e.errors())) from None
    return report, report.counters()


class TooLarge(BadRequest):
    """A body over its bound: 413."""


async def _bounded_body(request: Request, limit: int) -> bytes:
    """The body, refused as soon as it passes ``limit`` bytes (a declared length over it
    before reading anything), so a huge or endless body costs the agent nothing."""
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        raise TooLarge(f"body: at most {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise TooLarge(f"body: at most {limit} bytes")
    return bytes(body)


def _wait_seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds <= ROUTES_WAIT_MAX:  # also refuses NaN
        raise BadRequest(f"wait: must be seconds from 0 to {ROUTES_WAIT_MAX:g}, not {shown(text)}")
    return seconds


async def _hung_up(request: Request) -> None:
    """Return when the client disconnects: a held watch then frees its place at once."""
    while (await request.receive())["type"] != "http.disconnect":
        continue


async def _follow(agent: Agent, after: int) -> AsyncIterator[bytes]:
    cursor = after
    while not agent.stopping.is_set():
        batch = await agent.events(cursor, FOLLOW_BATCH)
        for event in batch:
            cursor = max(cursor, int(event["id"]))
            yield (json.dumps(event) + "\n").encode()
        if not batch:
            await agent.wait_for_event(timeout=5.0)
            if agent.stopping.is_set():
                return
            await asyncio.sleep(0)
