"""The engine against a real runtime whose start is slow or raises, in process: a start
that loses a race against a retire, and a start that fails with something other than a
KilnError (issue 8, defects 1 and 2)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent_harness import ImageFactory, plan_request, service_spec

from kiln.agent.engine import Engine
from kiln.deploy.state import StateStore
from kiln.runtime import InstanceHandle, InstanceSpec
from kiln.runtime.local import LocalRuntime
from kiln.traffic.haproxy import HAProxyRouter
from leftovers import assert_nothing_left

V1 = {"healthz": "ok\n", "index.html": "v1\n"}


class SlowStart(LocalRuntime):
    """A real runtime whose sandbox appears only after ``delay``."""

    def __init__(self, home: Path, delay: float) -> None:
        super().__init__(home)
        self.delay = delay

    def start(self, spec: InstanceSpec) -> InstanceHandle:
        time.sleep(self.delay)
        return super().start(spec)


class RefusedStart(LocalRuntime):
    """A real runtime whose start fails with an error that is not Kiln's."""

    def start(self, spec: InstanceSpec) -> InstanceHandle:
        raise PermissionError(13, "Permission denied", "/dev/fake")


async def _with_engine(home: Path, runtime: LocalRuntime, body: Callable[..., Any]) -> None:
    state = StateStore(home / "state.db")
    engine = Engine(home, state, runtime, HAProxyRouter(home))
    await engine.start()
    try:
        await body(engine, state)
    finally:
        await engine.down()
        state.close()
    assert_nothing_left(home)


async def _until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        await asyncio.sleep(0.02)
    raise AssertionError(f"{what}: not within {timeout}s")


def test_a_retire_during_a_start_waits_for_it_and_stops_what_it_made(
    kiln_home: Path, busybox_image: ImageFactory, free_port: Callable[[], int]
) -> None:
    digest = busybox_image("web:v1", V1)
    runtime = SlowStart(kiln_home, delay=1.0)

    async def body(engine: Engine, state: StateStore) -> None:
        spec = service_spec(digest, listen=free_port(), replicas=1)
        await engine.apply((await engine.plan(plan_request(spec)))["plan"])
        first = await _until(
            lambda: [i for i in state.instances("web") if i.state == "starting"], 5, "a start"
        )
        victim = first[0].id
        await engine.lifecycle.retire(victim, "retired by the test while it starts")
        assert state.instance(victim).state == "stopped"
        assert state.instance(victim).handle is not None, "the start's sandbox was recorded"
        running = {h.instance_id for h in await asyncio.to_thread(runtime.list)}
        assert victim not in running, "a retired instance's sandbox runs unsupervised"
        await asyncio.sleep(0.5)
        assert state.instance(victim).state == "stopped"
        assert victim not in {h.instance_id for h in await asyncio.to_thread(runtime.list)}

    asyncio.run(_with_engine(kiln_home, runtime, body))


def test_a_start_that_raises_any_error_fails_the_instance(
    kiln_home: Path, busybox_image: ImageFactory, free_port: Callable[[], int]
) -> None:
    digest = busybox_image("web:v1", V1)
    runtime = RefusedStart(kiln_home)

    async def body(engine: Engine, state: StateStore) -> None:
        spec = service_spec(digest, listen=free_port(), replicas=1)
        await engine.apply((await engine.plan(plan_request(spec)))["plan"])
        failed = await _until(
            lambda: [i for i in state.instances("web") if i.state == "failed"], 5, "a failure"
        )
        assert "PermissionError" in (failed[0].reason or "")
        events = state.events(0, 1000, kind="instance.failed")
        assert any("Permission denied" in e.message for e in events)
        await asyncio.sleep(0.5)
        # No phantom replica: nothing stays `starting` without a sandbox.
        phantoms = [i for i in state.instances("web") if i.state == "starting" and i.handle is None]
        assert not [p for p in phantoms if time.time() - p.created > 0.5], phantoms

    asyncio.run(_with_engine(kiln_home, runtime, body))


class BrokenExec(LocalRuntime):
    """A real runtime whose ``exec`` fails twice with an error no probe expects."""

    def __init__(self, home: Path) -> None:
        super().__init__(home)
        self.failures = 2

    def exec(self, handle: InstanceHandle, argv: list[str], timeout: float) -> tuple[int, str]:
        if self.failures > 0:
            self.failures -= 1
            raise RuntimeError("the exec channel broke")
        return super().exec(handle, argv, timeout)


def test_a_health_loop_that_raises_is_restarted_not_silently_gone(
    kiln_home: Path, busybox_image: ImageFactory, free_port: Callable[[], int]
) -> None:
    """Issue 8, defect 3: one exception used to end an instance's health checks for
    good, and the instance never became ready."""
    digest = busybox_image("web:v1", V1)
    runtime = BrokenExec(kiln_home)

    async def body(engine: Engine, state: StateStore) -> None:
        spec = service_spec(
            digest,
            listen=free_port(),
            replicas=1,
            health={"exec": ["/bin/sh", "-c", "exit 0"], "interval": "0.2s", "timeout": "2s"},
        )
        await engine.apply((await engine.plan(plan_request(spec)))["plan"])
        await _until(lambda: [i for i in state.instances("web") if i.state == "ready"], 10, "ready")
        errors = state.events(0, 1000, kind="instance.health_error")
        assert len(errors) == 2 and "the exec channel broke" in errors[0].message

    asyncio.run(_with_engine(kiln_home, runtime, body))
