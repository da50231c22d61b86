"""The control-plane daemon: owns the state, runs rollouts and the reconciler, serves the API.

Public: :func:`run_agent` (``kiln agent``), :class:`AgentClient` and
:func:`start_background` (what the CLI uses). Imports are lazy so that the
CLI never loads FastAPI, uvicorn or httpx before it needs them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kiln.agent.client import AgentClient, start_background

__all__ = ["AgentClient", "run_agent", "start_background"]


def run_agent(home: Path) -> None:
    """Run the agent in the foreground until SIGTERM/SIGINT or ``POST /v1/down``."""
    from kiln.agent.daemon import run_agent as _run

    _run(home)


def __getattr__(name: str) -> Any:
    if name in ("AgentClient", "start_background"):
        from kiln.agent import client

        return getattr(client, name)
    raise AttributeError(name)
