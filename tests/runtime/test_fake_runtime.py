"""The fake runtime the engine's fast tests stand on: it must behave as the protocol
says, or those tests prove nothing. Timing bounds are loose on purpose: what is
asserted is that a call blocks or returns, not how fast the machine is."""

from __future__ import annotations

import json
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from kiln.runtime import (
    Execer,
    InstanceHandle,
    InstanceSpec,
    InstanceStatus,
    Runtime,
    RuntimeFailure,
    Signaller,
)
from kiln.runtime.fake import KILLED, FakeHost, FakeRuntime

TERM, KILL = signal.SIGTERM, signal.SIGKILL


def spec(instance_id: str, service: str = "web", port: int = 8080, **extra: Any) -> InstanceSpec:
    return InstanceSpec(
        instance_id=instance_id,
        service=service,
        revision=1,
        image_digest="sha256:" + "0" * 64,
        command=["app"],
        user=None,
        workdir="/",
        env={"PORT": str(port)},
        port=port,
        **extra,
    )


@pytest.fixture
def runtime(tmp_path: Path) -> FakeRuntime:
    return FakeRuntime(tmp_path / "home")


def test_it_is_a_runtime_with_honest_capabilities(runtime: FakeRuntime) -> None:
    assert isinstance(runtime, Runtime)
    assert isinstance(runtime, Execer)
    assert isinstance(runtime, Signaller)
    caps = runtime.capabilities
    assert (caps.exec, caps.signal, caps.raw_layers) == (True, True, True)
    assert not (caps.memory_limit or caps.cpu_limit or caps.pids_limit or caps.user_namespace)


def test_start_returns_a_serialisable_handle_with_an_address(runtime: FakeRuntime) -> None:
    handle = runtime.start(spec("web-1", port=9001, layers=(Path("/nowhere"),)))
    assert (handle.runtime, handle.instance_id, handle.address) == (
        "fake",
        "web-1",
        "127.0.0.1:9001",
    )
    again = InstanceHandle.from_json(json.loads(json.dumps(handle.to_json())))
    assert again == handle
    assert runtime.inspect(again).status is InstanceStatus.RUNNING
    shared = FakeRuntime(runtime.home, host=runtime.host, address=("127.0.0.1", 7000))
    assert shared.start(spec("web-2", port=9002)).address == "127.0.0.1:7000"


def test_wait_times_out_running_and_wakes_at_once_on_a_kill(runtime: FakeRuntime) -> None:
    handle = runtime.start(spec("web-1"))
    began = time.monotonic()
    assert runtime.wait(handle, 0.2).status is InstanceStatus.RUNNING
    assert time.monotonic() - began >= 0.2

    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(runtime.wait, handle, 30)
        time.sleep(0.1)
        assert not waiting.done(), "wait returned while the instance still runs"
        killed = time.monotonic()
        runtime.kill("web-1")
        state = waiting.result(timeout=5)
    assert time.monotonic() - killed < 1
    assert (state.status, state.exit_code) == (InstanceStatus.EXITED, KILLED)
    assert runtime.signals("web-1") == [KILL]


def test_a_blocked_wait_costs_no_cpu(runtime: FakeRuntime) -> None:
    """The agent keeps one watcher per instance in ``wait``: 50 of them for 0.5 s must
    not spin (a poll every millisecond would cost tenths of a second)."""
    handles = [runtime.start(spec(f"web-{n}")) for n in range(50)]
    with ThreadPoolExecutor(50) as pool:
        cpu = time.process_time()
        states = list(pool.map(lambda h: runtime.wait(h, 0.5), handles))
        used = time.process_time() - cpu
    assert all(s.status is InstanceStatus.RUNNING for s in states)
    assert used < 0.1, f"{used:.3f}s of CPU for 50 idle waits"


def test_stop_sends_the_signal_and_an_obedient_instance_exits_cleanly(
    runtime: FakeRuntime,
) -> None:
    handle = runtime.start(spec("web-1"))
    state = runtime.stop(handle, grace=5)
    assert (state.status, state.exit_code) == (InstanceStatus.EXITED, 0)
    assert runtime.signals("web-1") == [TERM]
    assert runtime.stop(handle, grace=5) == state, "a second stop changes nothing"
    assert runtime.signals("web-1") == [TERM]

    other = runtime.start(spec("web-2"))
    runtime.stop(other, grace=1, sig=signal.SIGQUIT)
    assert runtime.signals("web-2") == [signal.SIGQUIT]


def test_stop_honours_the_grace_before_killing(runtime: FakeRuntime) -> None:
    deaf = runtime.start(spec("web-1"))
    runtime.ignore_term("web-1")
    began = time.monotonic()
    state = runtime.stop(deaf, grace=0.3)
    assert time.monotonic() - began >= 0.3
    assert (state.status, state.exit_code) == (InstanceStatus.EXITED, KILLED)
    assert runtime.signals("web-1") == [TERM, KILL]

    runtime.stop_delay = 0.2  # shuts down in 0.2 s: within a 5 s grace, too slow for 0.05 s
    began = time.monotonic()
    assert runtime.stop(runtime.start(spec("web-2")), grace=5).exit_code == 0
    assert 0.2 <= time.monotonic() - began < 2
    assert runtime.stop(runtime.start(spec("web-3")), grace=0.05).exit_code == KILLED
    assert runtime.signals("web-3") == [TERM, KILL]


def test_a_stop_held_by_an_event_ends_when_the_test_releases_it(runtime: FakeRuntime) -> None:
    release = threading.Event()
    runtime.stop_delay = release
    handle = runtime.start(spec("web-1"))
    with ThreadPoolExecutor(1) as pool:
        stopping = pool.submit(runtime.stop, handle, 30)
        time.sleep(0.1)
        assert not stopping.done()
        assert runtime.inspect(handle).status is InstanceStatus.RUNNING
        release.set()
        assert stopping.result(timeout=5).exit_code == 0


def test_destroy_removes_the_instance_and_is_idempotent(runtime: FakeRuntime) -> None:
    handle = runtime.start(spec("web-1"))
    runtime.destroy(handle)
    assert runtime.inspect(handle).status is InstanceStatus.GONE
    assert not runtime.recover(handle)
    assert runtime.list() == []
    runtime.destroy(handle)
    assert runtime.calls.destroys == 2
    assert runtime.signals("web-1") == [KILL], "destroy kills what still runs; the record stays"
    # The id is free again, and the old handle does not point at the new instance.
    fresh = runtime.start(spec("web-1"))
    assert runtime.recover(fresh) and not runtime.recover(handle)
    assert runtime.inspect(handle).status is InstanceStatus.GONE


def test_list_and_recover_see_only_this_homes_live_instances(tmp_path: Path) -> None:
    host = FakeHost()
    ours = FakeRuntime(tmp_path / "a", host=host)
    theirs = FakeRuntime(tmp_path / "b", host=host)
    live = ours.start(spec("web-1"))
    dead = ours.start(spec("web-2"))
    ours.kill("web-2", exit_code=3)
    foreign = theirs.start(spec("web-3"))

    assert [h.instance_id for h in ours.list()] == ["web-1"]
    assert [h.instance_id for h in theirs.list()] == ["web-3"]
    assert ours.recover(live) and not ours.recover(dead)
    assert not ours.recover(foreign), "an instance of another home is not ours"
    assert ours.inspect(dead).exit_code == 3

    # An agent restarted on the same home (a new runtime object) adopts what still runs.
    restarted = FakeRuntime(tmp_path / "a", host=host)
    assert [h.instance_id for h in restarted.list()] == ["web-1"]
    assert restarted.recover(live)


def test_a_handle_of_another_runtime_is_refused(runtime: FakeRuntime) -> None:
    handle = runtime.start(spec("web-1"))
    alien = InstanceHandle(handle.version, "local", "web-1", handle.host, handle.port, handle.data)
    assert not runtime.recover(alien)
    with pytest.raises(RuntimeFailure, match="local"):
        runtime.inspect(alien)


@pytest.mark.parametrize("error", [PermissionError, PermissionError(13, "Permission denied")])
def test_an_injected_start_failure_raises_once_and_creates_nothing(
    runtime: FakeRuntime, error: BaseException | type[BaseException]
) -> None:
    runtime.fail_start(error)
    with pytest.raises(PermissionError):
        runtime.start(spec("web-1"))
    assert runtime.list() == [] and runtime.starting() == []
    assert runtime.recover(runtime.start(spec("web-1")))
    assert runtime.calls.starts == 2


def test_start_failures_by_count_and_by_service(runtime: FakeRuntime) -> None:
    runtime.fail_start(RuntimeFailure("no room"), times=2, service="db")
    assert runtime.recover(runtime.start(spec("web-1")))
    for n in (1, 2):
        with pytest.raises(RuntimeFailure, match="no room"):
            runtime.start(spec(f"db-{n}", service="db"))
    assert runtime.recover(runtime.start(spec("db-3", service="db")))

    runtime.fail_start(OSError, times=None)
    for n in range(3):
        with pytest.raises(OSError):
            runtime.start(spec(f"web-x{n}"))
    runtime.clear_failures()
    assert runtime.recover(runtime.start(spec("web-2")))


def test_an_app_that_crashes_on_start_is_started_then_exits(runtime: FakeRuntime) -> None:
    runtime.crash_on_start("web", exit_code=2)
    handle = runtime.start(spec("web-1"))
    state = runtime.wait(handle, 5)
    assert (state.status, state.exit_code) == (InstanceStatus.EXITED, 2)
    assert runtime.recover(runtime.start(spec("db-1", service="db")))


def test_a_slow_start_holds_until_released(runtime: FakeRuntime) -> None:
    release = threading.Event()
    runtime.start_delay = release
    with ThreadPoolExecutor(1) as pool:
        starting = pool.submit(runtime.start, spec("web-1"))
        deadline = time.monotonic() + 5
        while runtime.starting() != ["web-1"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert runtime.starting() == ["web-1"]
        assert runtime.list() == [], "nothing runs before the start returns"
        with pytest.raises(RuntimeFailure, match="already exists"):
            runtime.start(spec("web-1"))
        release.set()
        handle = starting.result(timeout=5)
    assert runtime.starting() == [] and runtime.recover(handle)

    runtime.start_delay = 0.2
    began = time.monotonic()
    runtime.start(spec("web-2"))
    assert time.monotonic() - began >= 0.2


def test_exec_follows_the_health_the_test_sets(runtime: FakeRuntime) -> None:
    handle = runtime.start(spec("web-1"))
    assert runtime.exec(handle, ["check"], 1) == (0, "")
    runtime.set_healthy("web-1", False)
    code, output = runtime.exec(handle, ["check"], 1)
    assert code != 0 and "unhealthy" in output
    runtime.set_healthy("web-1", True)
    assert runtime.exec(handle, ["check"], 1)[0] == 0

    runtime.set_service_healthy("web", False)
    later = runtime.start(spec("web-2"))
    assert runtime.exec(handle, ["check"], 1)[0] != 0
    assert runtime.exec(later, ["check"], 1)[0] != 0

    runtime.kill("web-1")
    with pytest.raises(RuntimeFailure, match="not running"):
        runtime.exec(handle, ["check"], 1)
    assert runtime.calls.execs == 6


def test_signal_is_recorded_and_term_or_kill_end_the_instance(runtime: FakeRuntime) -> None:
    handle = runtime.start(spec("web-1"))
    runtime.signal(handle, signal.SIGHUP)
    assert runtime.inspect(handle).status is InstanceStatus.RUNNING
    runtime.signal(handle, TERM)
    assert runtime.inspect(handle).exit_code == 0
    assert runtime.signals("web-1") == [signal.SIGHUP, TERM]


def test_close_releases_waiters_and_leaves_instances_running(runtime: FakeRuntime) -> None:
    handle = runtime.start(spec("web-1"))
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(runtime.wait, handle, 30)
        time.sleep(0.1)
        runtime.close()
        assert waiting.result(timeout=5).status is InstanceStatus.RUNNING
    began = time.monotonic()
    assert runtime.wait(handle, 0.2).status is InstanceStatus.RUNNING
    assert time.monotonic() - began >= 0.2, "a wait after close must block, not spin"
    assert FakeRuntime(runtime.home, host=runtime.host).recover(handle)


def test_concurrent_starts_stops_and_waits_from_many_threads(runtime: FakeRuntime) -> None:
    """Hundreds of threads start, watch, stop and destroy 400 instances at once: every waiter is
    woken by its own instance's stop, every count is exact and nothing is left."""
    count = 400
    ids = [f"web-{n}" for n in range(count)]
    with ThreadPoolExecutor(32) as workers, ThreadPoolExecutor(count) as watchers:
        handles = list(workers.map(lambda i: runtime.start(spec(i)), ids))
        assert len(runtime.list()) == count
        waits = [watchers.submit(runtime.wait, h, 60) for h in handles]
        time.sleep(0.2)
        assert not any(w.done() for w in waits)
        finals = list(workers.map(lambda h: runtime.stop(h, 5), handles))
        woken = [w.result(timeout=10) for w in waits]
        list(workers.map(runtime.destroy, handles))
    assert all(s.status is InstanceStatus.EXITED and s.exit_code == 0 for s in finals)
    assert all(s.status is InstanceStatus.EXITED for s in woken)
    assert runtime.list() == [] and runtime.running() == []
    calls = runtime.calls
    assert (calls.starts, calls.stops, calls.destroys, calls.waits) == (count,) * 4
    assert all(runtime.inspect(h).status is InstanceStatus.GONE for h in handles)
