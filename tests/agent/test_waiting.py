"""``wait_set`` never loses a cancellation, where Python 3.11's ``wait_for`` did: a
rollout cancelled by ``kiln stop`` as an instance changed ran on to "succeeded"."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from kiln.agent.waiting import wait_set


async def _lost_cancels(waiter: object) -> list[int]:
    """The loop steps after ``event.set()`` at which a cancel was accepted (the task was
    not done) and yet the task went on to finish normally: a lost cancellation."""
    lost = []
    for steps in range(4):
        event = asyncio.Event()

        async def caller(event: asyncio.Event = event) -> str:
            await waiter(event)  # type: ignore[operator]
            return "ran on"

        task = asyncio.create_task(caller())
        await asyncio.sleep(0)
        event.set()
        for _ in range(steps):
            await asyncio.sleep(0)
        accepted = task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if accepted and not task.cancelled():
            lost.append(steps)
    return lost


async def _with_wait_for(event: asyncio.Event) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), 10)


def test_a_cancel_as_the_event_is_set_is_never_lost() -> None:
    assert asyncio.run(_lost_cancels(lambda ev: wait_set(ev, 10))) == []


def test_the_timeout_and_the_event_are_told_apart() -> None:
    async def main() -> tuple[bool, bool]:
        event = asyncio.Event()
        timed_out = await wait_set(event, 0.01)
        event.set()
        return timed_out, await wait_set(event, 10)

    assert asyncio.run(main()) == (False, True)


@pytest.mark.skipif(
    not hasattr(asyncio, "timeout") or __import__("sys").version_info >= (3, 12),
    reason="the lost cancel is Python 3.11's wait_for",
)
def test_python_3_11_wait_for_loses_it_which_is_why_wait_set_exists() -> None:
    assert asyncio.run(_lost_cancels(_with_wait_for)) != []
