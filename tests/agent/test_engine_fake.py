"""The engine's decisions and races, in process, on the fake runtime and the in-memory
router: what it does when a start is slow or raises, when an instance dies, when
deaths pile up. No sandbox, no proxy: each test takes about a second, and the
runtime's own record (what runs, which signals were sent) is what is asserted.

Services use exec health checks, which the fake runtime answers from what the test
set (:meth:`FakeRuntime.set_healthy`), so no app has to serve HTTP. Only the engine's
public API is used (constructor, start, apply, rollback, status, deployment, down,
stop).
"""

from __future__ import annotations

import asyncio
import inspect
import signal
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from kiln.agent.engine import Engine
from kiln.deploy.plan import desired_from_spec, make_plan
from kiln.deploy.state import StateStore
from kiln.runtime.fake import FakeHost, FakeRuntime
from kiln.spec.models import Spec
from kiln.traffic import Router
from kiln.traffic.memory import MemoryRouter

PROJECT = "t"
LISTEN = 18080
NO_BREAKER = {"meltdown_fraction": 100.0}
"""Deaths never trip the meltdown breaker (for tests about something else)."""

Body = Callable[[Engine, StateStore], Awaitable[None]]


def spec(image: str, replicas: int, version: str = "1", **service: Any) -> Spec:
    body: dict[str, Any] = {
        "image": image,
        "replicas": replicas,
        "port": 8080,
        "listen": LISTEN,
        "env": {"VERSION": version},
        "health": {"exec": ["/bin/check"], "interval": "0.1s", "timeout": "1s"},
        "stop_grace": "1s",
        "drain_timeout": "1s",
        "update": {
            "max_surge": 2,
            "max_unavailable": 0,
            "min_healthy_time": "0.1s",
            "healthy_deadline": "5s",
            "progress_deadline": "10s",
        },
    }
    body.update(service)
    return Spec.model_validate({"project": {"name": PROJECT}, "services": {"web": body}})


async def deploy(engine: Engine, state: StateStore, wanted: Spec) -> dict[str, Any]:
    """kiln apply of ``wanted`` against the current state; the deployment once it ends."""
    started = await apply(engine, state, wanted)
    return await until(lambda: _finished(engine, started["deployment"]), 20, "the deployment")


async def apply(engine: Engine, state: StateStore, wanted: Spec) -> dict[str, Any]:
    plan = make_plan(desired_from_spec(wanted, {}), state.snapshot(), PROJECT)
    return await engine.apply(plan.to_json() | {"source": {"project": PROJECT}})


async def _finished(engine: Engine, deployment: str) -> dict[str, Any] | None:
    record = await engine.deployment(deployment)
    return record if record.get("outcome") not in (None, "running") else None


async def until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """The first true value of ``predicate`` (plain or async), polled every 20 ms."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        await asyncio.sleep(0.02)
    raise AssertionError(f"{what}: not within {timeout}s")


async def instances(engine: Engine, state: str | None = None) -> list[dict[str, Any]]:
    """The live instances ``engine.status()`` shows for service web (in ``state``)."""
    service = (await engine.status())["services"].get("web") or {"instances": []}
    return [i for i in service["instances"] if state is None or i["state"] == state]


async def ready_ids(engine: Engine) -> set[str]:
    return {i["id"] for i in await instances(engine, "ready")}


async def until_ready(engine: Engine, count: int, without: set[str] | None = None) -> set[str]:
    """Wait until exactly ``count`` instances are ready, none of them in ``without``."""

    async def check() -> set[str] | None:
        ready = await ready_ids(engine)
        return ready if len(ready) == count and not ready & (without or set()) else None

    found: set[str] = await until(check, 10, f"{count} ready instances")
    return found


async def alarms(engine: Engine) -> list[str]:
    service = (await engine.status())["services"].get("web") or {}
    return list(service.get("alarms") or [])


def events(state: StateStore, kind: str, instance: str) -> list[str]:
    return [e.message for e in state.events(0, 10_000, kind=kind) if e.instance == instance]


def run(home: Path, runtime: FakeRuntime, router: MemoryRouter, body: Body) -> None:
    """The engine from start to ``down``; afterwards the runtime runs nothing."""

    async def main() -> None:
        state = StateStore(home / "state.db")
        engine = Engine(home, state, runtime, router)
        await engine.start()
        try:
            await body(engine, state)
        finally:
            try:
                await engine.down()
            finally:
                await engine.stop()  # as the agent does after kiln down
                runtime.close()
                state.close()

    asyncio.run(main())
    assert runtime.running() == [], "kiln down left instances running"


def test_a_rollout_reaches_n_ready_and_retires_the_old(kiln_home: Path, image: str) -> None:
    runtime, router = FakeRuntime(kiln_home), MemoryRouter()
    assert isinstance(router, Router)

    async def body(engine: Engine, state: StateStore) -> None:
        first = await deploy(engine, state, spec(image, 5))
        assert first["outcome"] == "succeeded", first
        old = await until_ready(engine, 5)
        assert set(runtime.running()) == old

        second = await deploy(engine, state, spec(image, 5, version="2"))
        assert second["outcome"] == "succeeded", second
        new = await until_ready(engine, 5, without=old)
        assert {i["revision"] for i in await instances(engine)} == {2}
        assert set(runtime.running()) == new, "the old revision still runs"
        for iid in old:
            assert runtime.signals(iid)[:1] == [signal.SIGTERM], "retired without SIGTERM"
        assert {b for _, b in router.drained()} >= old, "a ready instance left undrained"
        route = router.routes()["web"]
        assert route.listen == LISTEN
        assert {b.id for b in route.backends if b.state == "ready"} == new
        assert all(b.address == "127.0.0.1:8080" for b in route.backends)

    run(kiln_home, runtime, router, body)


def test_a_start_that_raises_fails_the_instance_and_it_is_replaced(
    kiln_home: Path, image: str
) -> None:
    """Issue 8, defect 2: a PermissionError from the runtime used to leave a `starting`
    record that counted as a replica, with nothing running and nothing replacing it."""
    runtime, router = FakeRuntime(kiln_home), MemoryRouter()

    async def body(engine: Engine, state: StateStore) -> None:
        assert (await deploy(engine, state, spec(image, 2, heal=NO_BREAKER)))["outcome"] == (
            "succeeded"
        )
        victim = sorted(await until_ready(engine, 2))[0]
        runtime.fail_start(PermissionError(13, "Permission denied", "/dev/fake"))
        runtime.kill(victim)

        failed = await until(
            lambda: [r for r in state.instances("web") if r.state == "failed" and r.id != victim],
            10,
            "the refused start to fail its instance",
        )
        assert "PermissionError" in (failed[0].reason or ""), failed[0]
        said = await until(
            lambda: events(state, "instance.failed", failed[0].id), 5, "an instance.failed event"
        )
        assert "Permission denied" in said[0]

        # No phantom: the service gets back to two ready replicas, each one running.
        ready = await until_ready(engine, 2, without={victim, failed[0].id})
        assert set(runtime.running()) == ready
        assert {i["id"] for i in await instances(engine)} == ready

    run(kiln_home, runtime, router, body)


def test_a_retire_during_a_slow_start_leaves_nothing_running(kiln_home: Path, image: str) -> None:
    """Issue 8, defect 1: a rollback retires the new revision's instance while the
    runtime is still starting it; when the start lands, its sandbox must be stopped,
    not left running unsupervised."""
    runtime, router = FakeRuntime(kiln_home), MemoryRouter()
    release = threading.Event()

    async def body(engine: Engine, state: StateStore) -> None:
        assert (await deploy(engine, state, spec(image, 1)))["outcome"] == "succeeded"
        (kept,) = await until_ready(engine, 1)
        runtime.start_delay = release
        try:
            await apply(engine, state, spec(image, 1, version="2"))
            (slow,) = await until(runtime.starting, 5, "the r2 start to reach the runtime")
            await engine.rollback("web", 1)
            await until(
                lambda: state.instance(slow).state in ("draining", "stopping", "stopped"),
                5,
                "the rollback to retire the starting instance",
            )
        finally:
            release.set()  # a failure above must not leave kiln down waiting for the start
        await until(lambda: state.instance(slow).state == "stopped", 10, f"{slow} stopped")
        await until(lambda: runtime.running() == [kept], 5, "only r1 running")
        assert runtime.starting() == []
        assert runtime.signals(slow)[:1] == [signal.SIGTERM]
        assert await ready_ids(engine) == {kept}
        assert {b.id for b in router.routes()["web"].backends} == {kept}

    run(kiln_home, runtime, router, body)


def test_down_during_a_slow_start_stops_what_the_start_made(kiln_home: Path, image: str) -> None:
    """Issue 8, defect 1, through ``kiln down``: it never cancels a start already in the
    runtime, so it must stop the sandbox that start returns."""
    release = threading.Event()
    runtime, router = FakeRuntime(kiln_home, start_delay=release), MemoryRouter()

    async def body(engine: Engine, state: StateStore) -> None:
        await apply(engine, state, spec(image, 2))
        await until(lambda: len(runtime.starting()) == 2, 5, "both starts in the runtime")
        asyncio.get_running_loop().call_later(0.3, release.set)

    try:
        run(kiln_home, runtime, router, body)
    finally:
        release.set()
    assert runtime.calls.starts == 2
    assert runtime.starting() == []


def test_a_killed_instance_is_replaced(kiln_home: Path, image: str) -> None:
    runtime, router = FakeRuntime(kiln_home), MemoryRouter()

    async def body(engine: Engine, state: StateStore) -> None:
        assert (await deploy(engine, state, spec(image, 3)))["outcome"] == "succeeded"
        before = await until_ready(engine, 3)
        victim = sorted(before)[0]
        runtime.kill(victim)
        after = await until_ready(engine, 3, without={victim})
        assert len(after - before) == 1
        assert set(runtime.running()) == after
        died = await until(lambda: events(state, "instance.died", victim), 5, "instance.died")
        assert "137" in died[0]
        assert not await alarms(engine)

    run(kiln_home, runtime, router, body)


def test_an_unhealthy_instance_is_replaced_then_retired(kiln_home: Path, image: str) -> None:
    """A failing health check takes the instance out of the route; once its replacement
    is ready it is drained and stopped with SIGTERM, not killed."""
    runtime, router = FakeRuntime(kiln_home), MemoryRouter()

    async def body(engine: Engine, state: StateStore) -> None:
        wanted = spec(image, 2, heal=NO_BREAKER)
        assert (await deploy(engine, state, wanted))["outcome"] == "succeeded"
        sick = sorted(await until_ready(engine, 2))[0]
        runtime.set_healthy(sick, False)
        ready = await until_ready(engine, 2, without={sick})
        await until(lambda: set(runtime.running()) == ready, 5, f"{sick} stopped")
        assert runtime.signals(sick) == [signal.SIGTERM]
        states = router.backend_history("web", sick)
        assert states[-1] is None, states
        after_ready = states[states.index("ready") + 1]
        assert after_ready == "maintenance", f"unhealthy but still routed: {states}"
        assert await until(lambda: events(state, "instance.unhealthy", sick), 5, "the event")

    run(kiln_home, runtime, router, body)


def test_the_meltdown_breaker_trips_after_repeated_deaths(kiln_home: Path, image: str) -> None:
    """Three replicas tolerate one death in the window (20%, at least one); the second
    trips the breaker: an alarm, and nothing more is replaced."""
    runtime, router = FakeRuntime(kiln_home), MemoryRouter()

    async def body(engine: Engine, state: StateStore) -> None:
        assert (await deploy(engine, state, spec(image, 3)))["outcome"] == "succeeded"
        first = sorted(await until_ready(engine, 3))[0]
        runtime.kill(first)
        second = sorted(await until_ready(engine, 3, without={first}))[0]
        assert not await alarms(engine)
        starts = runtime.calls.starts

        runtime.kill(second)
        (alarm,) = await until(lambda: alarms(engine), 10, "the meltdown alarm")
        assert "died" in alarm
        await asyncio.sleep(1.5)  # the reconciler had every chance to replace it
        assert runtime.calls.starts == starts, "replacing went on after the breaker tripped"
        assert len(runtime.running()) == 2

    run(kiln_home, runtime, router, body)


def test_deaths_of_a_revision_never_live_do_not_trip_the_breaker(
    kiln_home: Path, image: str
) -> None:
    """Issue 8, defect 7: a first deploy whose instances crash, a fixed deploy that
    succeeds, then one SIGKILL: it is replaced, and no meltdown alarm stands."""
    runtime, router = FakeRuntime(kiln_home), MemoryRouter()

    async def body(engine: Engine, state: StateStore) -> None:
        runtime.crash_on_start("web", exit_code=1)
        broken = await deploy(engine, state, spec(image, 3))
        assert broken["outcome"] != "succeeded", broken
        assert runtime.calls.starts >= 1 and runtime.running() == []

        runtime.clear_failures()
        fixed = await deploy(engine, state, spec(image, 3, version="2"))
        assert fixed["outcome"] == "succeeded", fixed
        live = await until_ready(engine, 3)
        assert not await alarms(engine)

        victim = sorted(live)[0]
        runtime.kill(victim)
        await until_ready(engine, 3, without={victim})
        assert not await alarms(engine)
        assert len(runtime.running()) == 3

    run(kiln_home, runtime, router, body)


def test_an_idle_engine_neither_polls_the_runtime_nor_rereads_history(
    kiln_home: Path, image: str
) -> None:
    """Issue 8: watching ready instances costs their exits (an fd each on the loop),
    not a runtime call per instance per tick; the reconciler sleeps until something
    changes. A death is still seen at once."""
    runtime, router = FakeRuntime(kiln_home), MemoryRouter()

    async def body(engine: Engine, state: StateStore) -> None:
        assert (await deploy(engine, state, spec(image, 4)))["outcome"] == "succeeded"
        ready = await until_ready(engine, 4)
        await asyncio.sleep(0.5)  # the last retirements and probes of the rollout settle
        before = runtime.calls
        passes = engine.reconciler.passes
        await asyncio.sleep(2.0)
        after = runtime.calls
        assert (after.inspects, after.waits) == (before.inspects, before.waits), (before, after)
        assert engine.reconciler.passes == passes, "the reconciler ran with nothing to do"
        victim = sorted(ready)[0]
        runtime.kill(victim)
        await until(lambda: victim not in runtime.running(), 2, "the death")
        replaced = await until_ready(engine, 4, without={victim})
        assert victim not in replaced

    run(kiln_home, runtime, router, body)


def two_services(image: str, with_a: bool = True) -> Spec:
    """Service ``a`` (2 replicas, on LISTEN) beside ``web`` (1 replica, LISTEN + 1)."""
    services: dict[str, Any] = {"web": spec(image, 1, listen=LISTEN + 1).services["web"]}
    if with_a:
        services["a"] = spec(image, 2).services["web"]
    return Spec.model_validate({"project": {"name": PROJECT}, "services": services})


def test_a_removed_service_is_not_brought_back_while_it_drains(kiln_home: Path, image: str) -> None:
    """Found by review: the reconciler saw the removed service's revision still active
    while its instances drained and started replacements nobody retired."""
    runtime, router = FakeRuntime(kiln_home), MemoryRouter()

    async def body(engine: Engine, state: StateStore) -> None:
        assert (await deploy(engine, state, two_services(image)))["outcome"] == "succeeded"
        removed = await deploy(engine, state, two_services(image, with_a=False))
        assert removed["outcome"] == "succeeded", removed
        await asyncio.sleep(1.0)  # what the reconciler would start, it would by now
        assert [i for i in runtime.running() if i.startswith("a-")] == []
        assert [i.id for i in state.instances("a", live_only=True)] == []
        assert [r.status for r in state.revisions("a")] == ["superseded"]
        assert "a" not in router.routes()
        assert state.rollouts() == []

    run(kiln_home, runtime, router, body)


def test_a_removal_cut_by_an_agent_restart_is_finished_by_the_next_agent(
    kiln_home: Path, image: str
) -> None:
    host = FakeHost()
    runtime, router = FakeRuntime(kiln_home, host=host), MemoryRouter()
    hold = threading.Event()

    async def main() -> str:
        state = StateStore(kiln_home / "state.db")
        engine = Engine(kiln_home, state, runtime, router)
        await engine.start()
        assert (await deploy(engine, state, two_services(image)))["outcome"] == "succeeded"
        runtime.stop_delay = hold  # SIGTERM takes a while to be obeyed
        started = await apply(engine, state, two_services(image, with_a=False))
        await until(
            lambda: any(i.state == "stopping" for i in state.instances("a", live_only=True)),
            5,
            "a stopping",
        )
        await engine.stop()  # the agent dies here
        hold.set()
        state.close()
        return str(started["deployment"])

    deployment = asyncio.run(main())
    second = FakeRuntime(kiln_home, host=host)

    async def body(engine: Engine, state: StateStore) -> None:
        record = await until(lambda: _finished(engine, deployment), 10, "the removal")
        assert record["outcome"] == "succeeded", record
        await asyncio.sleep(0.5)
        assert [i for i in second.running() if i.startswith("a-")] == []
        assert [r.status for r in state.revisions("a")] == ["superseded"]
        assert "a" not in router.routes()

    run(kiln_home, second, router, body)


def test_an_apply_and_a_rollback_at_once_never_run_two_rollouts(
    kiln_home: Path, image: str
) -> None:
    """Found by review: both passed their checks, two rollouts ran on one service, and
    the apply reported success with none of its instances left."""
    runtime, router = FakeRuntime(kiln_home), MemoryRouter()

    async def body(engine: Engine, state: StateStore) -> None:
        for version in ("1", "2"):
            done = await deploy(engine, state, spec(image, 2, version=version))
            assert done["outcome"] == "succeeded"
        plan = make_plan(
            desired_from_spec(spec(image, 2, version="3"), {}), state.snapshot(), PROJECT
        )
        applied, rolled = await asyncio.gather(
            engine.apply(plan.to_json() | {"source": {"project": PROJECT}}),
            engine.rollback("web", 1),
            return_exceptions=True,
        )
        outcomes = [x for x in (applied, rolled) if isinstance(x, dict)]
        assert len(outcomes) == 1, (applied, rolled)
        refused = rolled if isinstance(rolled, BaseException) else applied
        assert "try again" in str(refused)
        record = await until(lambda: _finished(engine, outcomes[0]["deployment"]), 20, "it")
        assert record["outcome"] == "succeeded", record
        active = [r.number for r in state.revisions("web") if r.status == "active"]
        live = {i.revision for i in state.instances("web", live_only=True)}
        assert live == set(active), (active, live)
        assert state.rollouts() == []

    run(kiln_home, runtime, router, body)


def test_a_home_without_a_runtime_record_is_not_switched_under_running_instances(
    kiln_home: Path, image: str
) -> None:
    """Found by review: a home from before ``runtime.json`` (or one whose record was
    removed) could be moved to docker while its local instances ran, orphaning them."""
    from kiln.agent.daemon import choose_runtime
    from kiln.errors import KilnError
    from kiln.runtime.select import RuntimeChoice, read_choice

    runtime, router = FakeRuntime(kiln_home), MemoryRouter()

    async def body(engine: Engine, state: StateStore) -> None:
        assert (await deploy(engine, state, spec(image, 1)))["outcome"] == "succeeded"
        assert read_choice(kiln_home) is None
        with pytest.raises(KilnError, match="runs its instances on the local runtime"):
            choose_runtime(kiln_home, RuntimeChoice("docker", "unix:///nowhere.sock"))
        assert choose_runtime(kiln_home, None) == RuntimeChoice()
        assert read_choice(kiln_home) == RuntimeChoice(), "the first agent records its choice"

    run(kiln_home, runtime, router, body)


def test_a_swarm_home_may_change_its_node_engines_under_running_instances(
    kiln_home: Path, image: str
) -> None:
    """``[runtime] nodes`` names how the agent reaches each node, not where instances
    run: a new agent may take other nodes while instances live; a running agent says to
    restart it; another manager is still refused."""
    from kiln.agent.daemon import check_choice, choose_runtime
    from kiln.errors import KilnError
    from kiln.runtime.select import Registry, RuntimeChoice, read_choice, write_choice

    runtime, router = FakeRuntime(kiln_home), MemoryRouter()

    async def body(engine: Engine, state: StateStore) -> None:
        assert (await deploy(engine, state, spec(image, 1)))["outcome"] == "succeeded"
        registry = Registry("10.0.0.5:5000/k")
        first = RuntimeChoice("swarm", "tcp://10.0.0.11:2376", registry)
        write_choice(kiln_home, first)
        nodes = (("node-2", "tcp://10.0.0.12:2376"),)
        more = RuntimeChoice("swarm", "tcp://10.0.0.11:2376", registry, nodes)
        assert choose_runtime(kiln_home, more) == more
        assert read_choice(kiln_home) == more
        with pytest.raises(KilnError, match="restart the agent"):
            check_choice(first, more)
        with pytest.raises(KilnError, match="runs its instances on the swarm"):
            choose_runtime(kiln_home, RuntimeChoice("swarm", "tcp://10.0.0.99:2376", registry))

    run(kiln_home, runtime, router, body)
