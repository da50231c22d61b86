"""The agent's HTTP+JSON API: a thin FastAPI shell over :class:`kiln.agent.daemon.Agent`.

Imported only by the daemon, so the CLI never pays for FastAPI. Every
KilnError becomes ``{"detail": message}`` with 400 (409 for conflicts such
as a stale plan, 404 for unknown ids), which the client re-raises verbatim.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel

from kiln.agent.errors import Conflict, NotFound
from kiln.errors import KilnError

if TYPE_CHECKING:
    from kiln.agent.daemon import Agent

__all__ = ["build_app"]


class PlanRequest(BaseModel):
    spec_path: str
    environment: str | None = None
    spec_text: str = ""
    git_commit: str | None = None
    digests: dict[str, str] = {}
    services: dict[str, Any]


class ApplyRequest(BaseModel):
    plan: dict[str, Any]


class RollbackRequest(BaseModel):
    service: str
    revision: int | None = None


def build_app(agent: Agent) -> FastAPI:
    app = FastAPI(title="kiln agent", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(KilnError)
    async def _kiln_error(request: Request, exc: KilnError) -> JSONResponse:
        code = 409 if isinstance(exc, Conflict) else 404 if isinstance(exc, NotFound) else 400
        return JSONResponse({"detail": str(exc)}, status_code=code)

    @app.get("/v1/health")
    async def health() -> dict[str, Any]:
        return agent.health()

    @app.get("/v1/status")
    async def status() -> dict[str, Any]:
        return agent.status()

    @app.post("/v1/plan")
    async def plan(body: PlanRequest) -> dict[str, Any]:
        return await agent.plan(body.model_dump())

    @app.post("/v1/apply")
    async def apply(body: ApplyRequest) -> dict[str, Any]:
        return await agent.apply(body.plan)

    @app.get("/v1/deployments/{deployment_id}")
    async def deployment(deployment_id: str) -> dict[str, Any]:
        return agent.deployment(deployment_id)

    @app.post("/v1/rollback")
    async def rollback(body: RollbackRequest) -> dict[str, Any]:
        return await agent.rollback(body.service, body.revision)

    @app.get("/v1/history/{service}")
    async def history(service: str) -> dict[str, Any]:
        return agent.history(service)

    @app.get("/v1/events", response_model=None)
    async def events(
        after: int = 0, limit: int = 1000, follow: int = 0
    ) -> dict[str, Any] | StreamingResponse:
        if not follow:
            return {"events": agent.events(after, limit)}
        return StreamingResponse(_follow(agent, after), media_type="application/x-ndjson")

    @app.post("/v1/down")
    async def down() -> dict[str, Any]:
        return await agent.down()

    return app


async def _follow(agent: Agent, after: int) -> AsyncIterator[bytes]:
    cursor = after
    while not agent.stopping.is_set():
        batch = agent.events(cursor, 500)
        for event in batch:
            cursor = max(cursor, int(event["id"]))
            yield (json.dumps(event) + "\n").encode()
        if not batch:
            await agent.wait_for_event(timeout=5.0)
            if agent.stopping.is_set():
                return
            await asyncio.sleep(0)
