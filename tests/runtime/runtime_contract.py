"""The behaviour every Runtime must show, written once and run against each one.

A runtime's test module subclasses :class:`RuntimeContract` and provides two
fixtures: ``runtime`` (a fresh Runtime) and ``app_spec`` (a callable
``(command: list[str], **InstanceSpec overrides) -> InstanceSpec`` for an image
with busybox under /bin and ``/www/index.html``). A new runtime is done when
this suite passes. The app listens on ``$PORT`` at the address the handle names
(``handle.host``), on ``handle.port``.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Callable

import pytest

from kiln.runtime import (
    InstanceHandle,
    InstanceSpec,
    InstanceState,
    InstanceStatus,
    Runtime,
)

AppSpec = Callable[..., InstanceSpec]

TRAP_TERM = "trap 'echo got-term; exit 0' TERM; while true; do sleep 0.05; done"
IGNORE_TERM = "trap '' TERM; while true; do sleep 0.05; done"


def host_of(handle: InstanceHandle) -> str:
    """Where the instance listens: its own address, or the host's loopback."""
    return handle.host


def http_get(handle: InstanceHandle, port: int, timeout: float = 5.0) -> bytes:
    """GET / on the app's port at the instance's address, retrying until it listens."""
    deadline = time.monotonic() + timeout
    url = f"http://{host_of(handle)}:{port}/"
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via $http_proxy
    while True:
        try:
            with direct.open(url, timeout=1) as response:
                body: bytes = response.read()
                return body
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def wait_running_output(runtime: Runtime, handle: InstanceHandle) -> InstanceState:
    state = runtime.wait(handle, 10)
    assert state.status is InstanceStatus.EXITED, state
    return state


class RuntimeContract:
    def test_start_returns_a_serialisable_handle_of_a_running_instance(
        self, runtime: Runtime, app_spec: AppSpec
    ) -> None:
        spec = app_spec(["sleep", "30"])
        handle = runtime.start(spec)
        assert handle.runtime == runtime.name
        assert handle.instance_id == spec.instance_id
        again = InstanceHandle.from_json(json.loads(json.dumps(handle.to_json())))
        assert again == handle
        assert runtime.inspect(again).status is InstanceStatus.RUNNING

    def test_the_app_serves_http_on_its_port(self, runtime: Runtime, app_spec: AppSpec) -> None:
        spec = app_spec(["sh", "-c", "exec httpd -f -p $PORT -h /www"])
        handle = runtime.start(spec)
        assert http_get(handle, spec.port) == b"hello from kiln\n"

    def test_exit_code_is_recorded(self, runtime: Runtime, app_spec: AppSpec) -> None:
        handle = runtime.start(app_spec(["sh", "-c", "exit 3"]))
        state = wait_running_output(runtime, handle)
        assert state.exit_code == 3
        assert runtime.inspect(handle) == state

    def test_wait_returns_running_after_its_timeout(
        self, runtime: Runtime, app_spec: AppSpec
    ) -> None:
        handle = runtime.start(app_spec(["sleep", "30"]))
        began = time.monotonic()
        state = runtime.wait(handle, 0.3)
        assert state.status is InstanceStatus.RUNNING
        assert 0.25 <= time.monotonic() - began < 2

    def test_stop_sends_term_first_so_the_app_exits_cleanly(
        self, runtime: Runtime, app_spec: AppSpec
    ) -> None:
        handle = runtime.start(app_spec(["sh", "-c", TRAP_TERM]))
        time.sleep(0.2)
        began = time.monotonic()
        state = runtime.stop(handle, grace=5)
        assert state.status is InstanceStatus.EXITED
        assert state.exit_code == 0
        assert time.monotonic() - began < 2

    def test_stop_kills_an_app_that_ignores_term_after_the_grace(
        self, runtime: Runtime, app_spec: AppSpec
    ) -> None:
        handle = runtime.start(app_spec(["sh", "-c", IGNORE_TERM]))
        time.sleep(0.2)
        began = time.monotonic()
        state = runtime.stop(handle, grace=0.5)
        elapsed = time.monotonic() - began
        assert state.status in (InstanceStatus.EXITED, InstanceStatus.GONE)
        assert 0.5 <= elapsed < 4
        if state.exit_code is not None:
            assert state.exit_code == 137

    def test_stop_of_a_stopped_instance_is_a_no_op(
        self, runtime: Runtime, app_spec: AppSpec
    ) -> None:
        handle = runtime.start(app_spec(["sh", "-c", "exit 0"]))
        first = runtime.wait(handle, 10)
        assert runtime.stop(handle, grace=1) == first

    def test_recover_and_list_find_live_instances_only(
        self, runtime: Runtime, app_spec: AppSpec
    ) -> None:
        live = runtime.start(app_spec(["sleep", "30"]))
        done = runtime.start(app_spec(["sh", "-c", "exit 0"]))
        runtime.wait(done, 10)
        assert runtime.recover(live)
        assert not runtime.recover(done)
        listed = {h.instance_id: h for h in runtime.list()}
        assert live.instance_id in listed
        assert done.instance_id not in listed
        assert listed[live.instance_id].address == live.address

    def test_destroy_leaves_nothing_running(self, runtime: Runtime, app_spec: AppSpec) -> None:
        handle = runtime.start(app_spec(["sleep", "30"]))
        runtime.destroy(handle)
        assert runtime.inspect(handle).status is InstanceStatus.GONE
        assert not runtime.recover(handle)
        assert handle.instance_id not in {h.instance_id for h in runtime.list()}

    def test_a_handle_from_another_runtime_is_refused(
        self, runtime: Runtime, app_spec: AppSpec
    ) -> None:
        handle = runtime.start(app_spec(["sleep", "30"]))
        foreign = InstanceHandle(
            handle.version, "elsewhere", handle.instance_id, handle.host, handle.port, handle.data
        )
        assert not runtime.recover(foreign)

    @pytest.mark.parametrize("code", [0, 1, 42])
    def test_exit_codes_pass_through(self, runtime: Runtime, app_spec: AppSpec, code: int) -> None:
        handle = runtime.start(app_spec(["sh", "-c", f"exit {code}"]))
        assert runtime.wait(handle, 10).exit_code == code
