"""Waiting on an event with a deadline, without losing a cancellation.

Python 3.11's ``asyncio.wait_for`` returns the inner result when a cancel arrives in
the same loop step as the event is set, and the cancel is lost: a rollout cancelled
by ``kiln stop`` at the moment an instance changed ran on to "succeeded".
``asyncio.timeout`` tells its own deadline from an outside cancel, so it is used here.
"""

from __future__ import annotations

import asyncio
import contextlib

__all__ = ["wait_set"]


async def wait_set(event: asyncio.Event, timeout: float) -> bool:
    """Until ``event`` is set or ``timeout`` seconds pass; True when it was set."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            await event.wait()
    return event.is_set()
