"""Errors the API maps to HTTP status codes; light so the engine never imports FastAPI."""

from __future__ import annotations

from kiln.errors import KilnError

__all__ = ["Busy", "Conflict", "NotFound"]


class Conflict(KilnError):
    """The request contradicts the current state (stale plan, rollout running, down underway)."""


class NotFound(KilnError):
    """An unknown service, revision or deployment."""


class Busy(KilnError):
    """A bounded resource is full (route watchers): retry later."""
