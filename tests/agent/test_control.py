"""kiln restart, stop, start and exec, through the engine's public API on the fake
runtime: what runs afterwards, in which order instances went, and what is recorded."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from test_engine_fake import (
    _finished,
    deploy,
    instances,
    run,
    spec,
    until,
    until_ready,
)

from kiln.agent.engine import Engine
from kiln.agent.errors import Conflict, NotFound
from kiln.deploy.state import StateStore
from kiln.errors import KilnError
from kiln.runtime.fake import FakeRuntime
from kiln.traffic.memory import MemoryRouter

ONE_AT_A_TIME = {
    "max_surge": 1,
    "max_unavailable": 0,
    "min_healthy_time": "0.1s",
    "healthy_deadline": "5s",
    "progress_deadline": "10s",
}


async def finished(engine: Engine, started: dict[str, object]) -> dict[str, object]:
    deployment = str(started["deployment"])
    record: dict[str, object] = await until(
        lambda: _finished(engine, deployment), 20, f"deployment {deployment}"
    )
    return record


def test_restart_replaces_every_instance_touched_ones_first(kiln_home: Path, image: str) -> None:
    runtime, router = FakeRuntime(kiln_home), MemoryRouter()

    async def body(engine: Engine, state: StateStore) -> None:
        wanted = spec(image, 3, update=ONE_AT_A_TIME)
        assert (await deploy(engine, state, wanted))["outcome"] == "succeeded"
        old = await until_ready(engine, 3)
        newest = max(old, key=lambda i: state.instance(i).created)

        ran = await engine.exec(newest, ["/bin/check", "--verbose"], 5.0)
        assert ran["instance"] == newest and ran["exit_code"] == 0
        assert state.instance(newest).touched is not None
        shown = {i["id"]: i for i in await instances(engine)}
        assert shown[newest]["touched"] and not any(shown[i]["touched"] for i in old - {newest}), (
            shown
        )
        said = await until(
            lambda: [
                e for e in state.events(0, 1000, kind="instance.exec") if e.instance == newest
            ],
            5,
            "an instance.exec event",
        )
        assert "/bin/check --verbose" in said[0].message

        revisions_before = [r.number for r in state.revisions("web")]
        record = await finished(engine, await engine.restart("web"))
        assert record["outcome"] == "succeeded", record
        new = await until_ready(engine, 3, without=old)
        assert set(runtime.running()) == new
        assert {i["revision"] for i in await instances(engine)} == {1}
        assert [r.number for r in state.revisions("web")] == revisions_before, "a new revision"
        drained = [b for _, b in router.drained() if b in old]
        assert drained[0] == newest, f"the touched instance was not retired first: {drained}"
        for iid in old:
            assert runtime.signals(iid)[:1] == [signal.SIGTERM]
            assert state.instance(iid).reason == "restarted by kiln restart"

    run(kiln_home, runtime, router, body)


def test_stop_retires_everything_and_start_brings_the_revision_back(
    kiln_home: Path, image: str
) -> None:
    runtime, router = FakeRuntime(kiln_home), MemoryRouter()

    async def body(engine: Engine, state: StateStore) -> None:
        assert (await deploy(engine, state, spec(image, 2)))["outcome"] == "succeeded"
        old = await until_ready(engine, 2)

        record = await finished(engine, await engine.stop_service("web"))
        assert record["outcome"] == "succeeded", record
        assert runtime.running() == []
        assert "web" not in router.routes(), "a stopped service still has a listener"
        assert state.active_revision("web") is None
        with pytest.raises(KilnError, match="not running"):
            await engine.restart("web")
        with pytest.raises(KilnError, match="not running"):
            await engine.stop_service("web")

        record = await finished(engine, await engine.start_service("web"))
        assert record["outcome"] == "succeeded", record
        new = await until_ready(engine, 2, without=old)
        assert set(runtime.running()) == new
        active = state.active_revision("web")
        assert active is not None and active.number == 1
        assert {b.id for b in router.routes()["web"].backends} == new
        with pytest.raises(Conflict, match="running already"):
            await engine.start_service("web")

    run(kiln_home, runtime, router, body)


def test_start_refuses_a_service_that_was_never_stopped(kiln_home: Path, image: str) -> None:
    runtime, router = FakeRuntime(kiln_home), MemoryRouter()

    async def body(engine: Engine, state: StateStore) -> None:
        with pytest.raises(NotFound, match="no service 'web'"):
            await engine.start_service("web")
        assert (await deploy(engine, state, spec(image, 1)))["outcome"] == "succeeded"
        await until_ready(engine, 1)
        # Removed from kiln.toml is not stopped: start must not bring it back.
        from test_engine_fake import PROJECT

        from kiln.deploy.plan import make_plan
        from kiln.spec.models import Spec

        empty = Spec.model_validate({"project": {"name": PROJECT}})
        plan = make_plan({}, state.snapshot(), PROJECT)
        assert empty.services == {}
        removed = await engine.apply(plan.to_json() | {"source": {"project": PROJECT}})
        assert (await finished(engine, removed))["outcome"] == "succeeded"
        with pytest.raises(KilnError, match="not stopped by kiln stop"):
            await engine.start_service("web")
        assert runtime.running() == []

    run(kiln_home, runtime, router, body)


def test_exec_finds_instances_by_prefix_or_service_and_refuses_the_unknown(
    kiln_home: Path, image: str
) -> None:
    runtime, router = FakeRuntime(kiln_home), MemoryRouter()

    async def body(engine: Engine, state: StateStore) -> None:
        assert (await deploy(engine, state, spec(image, 2)))["outcome"] == "succeeded"
        ready = sorted(await until_ready(engine, 2), key=lambda i: state.instance(i).created)
        by_service = await engine.exec("web", ["/bin/check"], 5.0)
        assert by_service["instance"] == ready[0], "not the oldest ready instance"
        prefix = ready[1][: len("web-") + 6]
        assert (await engine.exec(prefix, ["/bin/check"], 5.0))["instance"] == ready[1]
        with pytest.raises(NotFound, match="no running instance"):
            await engine.exec("nope", ["/bin/check"], 5.0)
        with pytest.raises(KilnError, match="more than one instance"):
            await engine.exec("web-", ["/bin/check"], 5.0)
        runtime.set_healthy(ready[1], False)
        failed = await engine.exec(ready[1], ["/bin/check"], 5.0)
        assert failed["exit_code"] == 1 and "unhealthy" in failed["output"]
        await until(
            lambda: any(
                "exited 1" in e.message for e in state.events(0, 1000, kind="instance.exec_done")
            ),
            5,
            "an instance.exec_done event with the exit code",
        )

    run(kiln_home, runtime, router, body)


def test_history_says_what_each_revision_changed(kiln_home: Path, image: str) -> None:
    """Two revisions of the same image are told apart by what changed."""
    runtime, router = FakeRuntime(kiln_home), MemoryRouter()

    async def body(engine: Engine, state: StateStore) -> None:
        assert (await deploy(engine, state, spec(image, 1)))["outcome"] == "succeeded"
        assert (await deploy(engine, state, spec(image, 1, "2")))["outcome"] == "succeeded"
        assert (await finished(engine, await engine.scale("web", 2)))["outcome"] == "succeeded"
        revisions = (await engine.history("web"))["revisions"]
        assert [r["number"] for r in revisions] == [3, 2, 1], "not newest first"
        assert [r["changes"] for r in revisions] == [
            ["replicas 1 → 2"],
            ["env VERSION changed"],
            ["first revision"],
        ]
        assert len({r["image_digest"] for r in revisions}) == 1

    run(kiln_home, runtime, router, body)
