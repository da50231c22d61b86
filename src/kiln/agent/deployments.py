"""Deployments: what one ``kiln apply`` (or rollback) asked for and how each service ended.

A deployment lives in state.db from its first moment, so a CLI following it,
and the agent itself, survive an agent restart at any point. Each service's
entry carries its outcome and, when it failed, the reason and the instances
that caused it, which is what ``kiln apply`` prints.
"""

from __future__ import annotations

import secrets
import time
from typing import TYPE_CHECKING, Any

from kiln.agent.errors import NotFound

if TYPE_CHECKING:
    from kiln.agent.engine import Engine

__all__ = ["Deployments"]


class Deployments:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.open: dict[str, dict[str, Any]] = {}
        """Deployments still running, as last written."""

    async def create(self, summary: str, services: dict[str, int | None]) -> dict[str, Any]:
        record: dict[str, Any] = {
            "id": "d-" + secrets.token_hex(4),
            "started": time.time(),
            "finished": None,
            "outcome": "running",
            "summary": summary,
            "services": {s: {"revision": r, "outcome": "running"} for s, r in services.items()},
        }
        self.open[record["id"]] = record
        await self.engine.db(self.engine.state.put_deployment, record)
        return record

    async def add_service(self, deployment: str, service: str, revision: int | None) -> None:
        record = self.open.get(deployment)
        if record is None:
            return
        entry = record["services"].setdefault(service, {"outcome": "running"})
        entry["revision"] = revision
        await self.engine.db(self.engine.state.put_deployment, record)

    async def get(self, deployment: str) -> dict[str, Any]:
        record = self.open.get(deployment)
        if record is not None:
            return record
        found = await self.engine.db(self.engine.state.deployment, deployment)
        if found is None:
            raise NotFound(f"no deployment {deployment!r}")
        return found

    async def resume(self, deployment: str) -> None:
        """After an agent restart: the deployment is open again while its rollouts run."""
        if deployment in self.open:
            return
        found = await self.engine.db(self.engine.state.deployment, deployment)
        if found is not None and found["finished"] is None:
            self.open[deployment] = found

    async def note(
        self, deployment: str | None, service: str, reason: str, culprits: list[str]
    ) -> None:
        """Why a service's rollout failed, kept while its auto-rollback runs."""
        record = self.open.get(deployment or "")
        if record is None:
            return
        entry = record["services"].setdefault(service, {"revision": None, "outcome": "running"})
        entry["reason"] = reason
        entry["culprits"] = list(culprits)
        await self.engine.db(self.engine.state.put_deployment, record)

    async def probed(self, deployment: str | None, service: str, probes: dict[str, str]) -> None:
        """What the last health probe of each culprit saw, for the failure's explanation."""
        record = self.open.get(deployment or "")
        if record is None or not probes:
            return
        entry = record["services"].setdefault(service, {"revision": None, "outcome": "running"})
        entry["probes"] = dict(probes)
        await self.engine.db(self.engine.state.put_deployment, record)

    async def canary(self, deployment: str | None, service: str, saved: dict[str, Any]) -> None:
        """A canary's step, pause start and counter baseline: an agent killed during
        the pause continues it (:mod:`kiln.agent.canary`)."""
        record = self.open.get(deployment or "")
        if record is None:
            return
        entry = record["services"].setdefault(service, {"revision": None, "outcome": "running"})
        entry["canary"] = dict(saved)
        await self.engine.db(self.engine.state.put_deployment, record)

    async def service_done(
        self,
        deployment: str | None,
        service: str,
        outcome: str,
        reason: str | None = None,
        culprits: list[str] | None = None,
    ) -> None:
        if deployment is None:
            return
        record = self.open.get(deployment)
        if record is None:
            return
        entry = record["services"].setdefault(service, {"revision": None})
        entry["outcome"] = outcome
        if reason is not None:
            entry["reason"] = reason
        if culprits:
            entry["culprits"] = list(culprits)
        await self.finish_if_done(deployment)

    async def cancel(self, deployment: str, why: str) -> None:
        """Every service still running in it ends ``cancelled`` (``kiln down``)."""
        record = self.open.get(deployment)
        if record is None:
            return
        for entry in record["services"].values():
            if entry.get("outcome") == "running":
                entry["outcome"] = "cancelled"
                entry["reason"] = why
        await self.finish_if_done(deployment)

    async def finish_if_done(self, deployment: str) -> None:
        e = self.engine
        record = self.open.get(deployment)
        if record is None:
            return
        outcomes = [s["outcome"] for s in record["services"].values()]
        if "running" in outcomes:
            await e.db(e.state.put_deployment, record)
            return
        record["finished"] = time.time()
        if all(o == "succeeded" for o in outcomes):
            record["outcome"] = "succeeded"
        elif "rolled_back" in outcomes:
            record["outcome"] = "rolled_back"
        elif all(o in ("succeeded", "cancelled") for o in outcomes):
            record["outcome"] = "cancelled"
        else:
            record["outcome"] = "failed"
        await e.db(e.state.put_deployment, record)
        self.open.pop(deployment, None)
        e.emit(
            "deployment.finished",
            f"deployment {deployment}: {record['outcome']}",
            data={"deployment": deployment, "services": record["services"]},
        )
