"""Attacks on kiln restart, stop, start and exec through the engine's public API, on the
fake runtime and the in-memory router: races between the new commands and rollouts,
and what each one leaves running. Tests marked ``xfail(strict=True)`` demonstrate a
defect (the reason says which); the others are attacks the code withstands."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_control import ONE_AT_A_TIME, finished
from test_engine_fake import (
    LISTEN,
    PROJECT,
    apply,
    deploy,
    instances,
    run,
    spec,
    until,
    until_ready,
)

from kiln.agent.engine import Engine
from kiln.agent.errors import Conflict
from kiln.deploy.plan import desired_from_spec, make_plan
from kiln.deploy.state import StateStore
from kiln.errors import KilnError
from kiln.runtime.fake import FakeRuntime
from kiln.spec.models import Spec
from kiln.traffic.memory import MemoryRouter

SLOW_HEALTH = {**ONE_AT_A_TIME, "min_healthy_time": "1s"}
"""A new instance counts as healthy only after 1 s: long enough to act mid-rollout."""


def two_services(image: str, web_listen: int | None, api_listen: int) -> Spec:
    body = spec(image, 1).model_dump(mode="json")["services"]["web"]
    services = {"api": {**body, "listen": api_listen}}
    if web_listen is not None:
        services["web"] = {**body, "listen": web_listen}
    return Spec.model_validate({"project": {"name": PROJECT}, "services": services})


# -- races between the new commands ------------------------------------------


def test_start_twice_does_not_cancel_the_first_start(kiln_home: Path, image: str) -> None:
    runtime, router = FakeRuntime(kiln_home), MemoryRouter()

    async def body(engine: Engine, state: StateStore) -> None:
        wanted = spec(image, 2, update=SLOW_HEALTH)
        assert (await deploy(engine, state, wanted))["outcome"] == "succeeded"
        assert (await finished(engine, await engine.stop_service("web")))["outcome"] == (
            "succeeded"
        )
        first = await engine.start_service("web")
        second_error: Exception | None = None
        try:
            await engine.start_service("web")  # the user presses it again
        except Conflict as err:
            second_error = err
        record = await finished(engine, first)
        assert record["outcome"] == "succeeded", (
            f"the first start ended {record['outcome']!r}; second start raised {second_error!r}"
        )
        assert second_error is not None and "start" in str(second_error)

    run(kiln_home, runtime, router, body)


def test_stop_during_a_start_stops_what_the_start_started(kiln_home: Path, image: str) -> None:
    runtime, router = FakeRuntime(kiln_home), MemoryRouter()

    async def body(engine: Engine, state: StateStore) -> None:
        wanted = spec(image, 2, update=SLOW_HEALTH)
        assert (await deploy(engine, state, wanted))["outcome"] == "succeeded"
        await finished(engine, await engine.stop_service("web"))
        await engine.start_service("web")
        await until(lambda: runtime.running(), 5, "the start's first instance")
        stopped = await engine.stop_service("web")  # BUG: raises "web is not running"
        assert (await finished(engine, stopped))["outcome"] == "succeeded"
        assert runtime.running() == []

    run(kiln_home, runtime, router, body)


def test_a_failed_start_leaves_nothing_running(kiln_home: Path, image: str) -> None:
    runtime, router = FakeRuntime(kiln_home), MemoryRouter()

    async def body(engine: Engine, state: StateStore) -> None:
        held = {**SLOW_HEALTH, "min_healthy_time": "1.5s", "progress_deadline": "3s"}
        wanted = spec(image, 2, update=held)
        assert (await deploy(engine, state, wanted))["outcome"] == "succeeded"
        await finished(engine, await engine.stop_service("web"))
        started = await engine.start_service("web")
        _, second = sorted(await until_ready(engine, 2))
        # Before min_healthy_time passes, one instance turns unhealthy for good.
        runtime.set_healthy(second, False)
        record = await finished(engine, started)
        assert record["outcome"] == "failed", record
        await asyncio.sleep(1.5)  # time for any clean-up
        leaked = runtime.running()
        shown = (await engine.status())["services"].get("web") or {}
        stop_error = None
        try:
            await engine.stop_service("web")
        except KilnError as err:
            stop_error = str(err)
        assert leaked == [], (
            f"a failed start left {leaked} running, status says {shown.get('state')!r}, "
            f"kiln stop says {stop_error!r}"
        )

    run(kiln_home, runtime, router, body)


def test_a_start_whose_instances_never_get_healthy_leaves_nothing_running(
    kiln_home: Path, image: str
) -> None:
    """Held: instances that never got healthy are failed by the health loop's deadline
    once the failed start no longer bounds them."""
    runtime, router = FakeRuntime(kiln_home), MemoryRouter()

    async def body(engine: Engine, state: StateStore) -> None:
        fast_fail = {**ONE_AT_A_TIME, "healthy_deadline": "1s", "progress_deadline": "2s"}
        wanted = spec(image, 2, update=fast_fail)
        assert (await deploy(engine, state, wanted))["outcome"] == "succeeded"
        await finished(engine, await engine.stop_service("web"))
        runtime.set_service_healthy("web", False)
        record = await finished(engine, await engine.start_service("web"))
        assert record["outcome"] == "failed", record
        await until(lambda: runtime.running() == [], 5, "the failed start's instances to go")

    run(kiln_home, runtime, router, body)


def test_start_refuses_a_listen_port_another_service_took_meanwhile(
    kiln_home: Path, image: str
) -> None:
    runtime, router = FakeRuntime(kiln_home), MemoryRouter()

    async def body(engine: Engine, state: StateStore) -> None:
        port = LISTEN
        both = two_services(image, port, port + 1)
        assert (await deploy(engine, state, both))["outcome"] == "succeeded"
        await until(lambda: len(runtime.running()) == 2, 5, "two instances")
        await finished(engine, await engine.stop_service("web"))
        # kiln.toml now gives web's port to api; web is left out (stopped, not removed).
        moved = make_plan(desired_from_spec(two_services(image, None, port), {}), state.snapshot())
        moved_json = moved.to_json()
        moved_json["services"] = [s for s in moved_json["services"] if s["service"] == "api"]
        started = await engine.apply(moved_json)
        assert (await finished(engine, started))["outcome"] == "succeeded"
        assert router.routes()["api"].listen == port

        refused: Exception | None = None
        try:
            record = await finished(engine, await engine.start_service("web"))
        except KilnError as err:
            refused = err
            record = {}
        if refused is None:
            routes = router.routes()
            assert "web" in routes and routes["web"].listen == port, (
                f"kiln start web ended {record.get('outcome')!r} with no route for web; "
                f"port {port} is api's ({routes['api'].listen})"
            )
        assert refused is not None and str(port) in str(refused)

    run(kiln_home, runtime, router, body)


def test_restart_during_an_apply_or_scale_is_refused_and_changes_nothing(
    kiln_home: Path, image: str
) -> None:
    """Held: a restart never races a running rollout of the same service."""
    runtime, router = FakeRuntime(kiln_home), MemoryRouter()

    async def body(engine: Engine, state: StateStore) -> None:
        assert (await deploy(engine, state, spec(image, 2, update=SLOW_HEALTH)))["outcome"] == (
            "succeeded"
        )
        old = await until_ready(engine, 2)
        rolling = await apply(engine, state, spec(image, 2, "2", update=SLOW_HEALTH))
        with pytest.raises(Conflict, match="a rollout is running"):
            await engine.restart("web")
        assert (await finished(engine, rolling))["outcome"] == "succeeded"
        await until_ready(engine, 2, without=old)
        scaling = await engine.scale("web", 3)
        with pytest.raises(Conflict, match="a rollout is running"):
            await engine.restart("web")
        assert (await finished(engine, scaling))["outcome"] == "succeeded"
        assert [r.number for r in state.revisions("web")] == [1, 2, 3]

    run(kiln_home, runtime, router, body)


def test_stop_during_a_restart_cancels_it_and_nothing_is_left(kiln_home: Path, image: str) -> None:
    """Held: stop wins over a running restart; then start brings the same revision back."""
    runtime, router = FakeRuntime(kiln_home), MemoryRouter()

    async def body(engine: Engine, state: StateStore) -> None:
        assert (await deploy(engine, state, spec(image, 2, update=SLOW_HEALTH)))["outcome"] == (
            "succeeded"
        )
        await until_ready(engine, 2)
        restart = await engine.restart("web")
        await until(lambda: len(runtime.running()) == 3, 5, "the restart's surge instance")
        stop = await engine.stop_service("web")
        assert (await finished(engine, restart))["outcome"] == "cancelled"
        assert (await finished(engine, stop))["outcome"] == "succeeded"
        assert runtime.running() == []
        assert "web" not in router.routes()
        record = await finished(engine, await engine.start_service("web"))
        assert record["outcome"] == "succeeded"
        assert {i["revision"] for i in await instances(engine)} == {1}

    run(kiln_home, runtime, router, body)


def test_stop_and_restart_of_a_service_scaled_to_zero(kiln_home: Path, image: str) -> None:
    """Held: replicas 0 cannot be restarted (one clear error), but it can be stopped and
    started again, which runs nothing."""
    runtime, router = FakeRuntime(kiln_home), MemoryRouter()

    async def body(engine: Engine, state: StateStore) -> None:
        assert (await deploy(engine, state, spec(image, 1)))["outcome"] == "succeeded"
        assert (await finished(engine, await engine.scale("web", 0)))["outcome"] == "succeeded"
        with pytest.raises(KilnError, match="no instance to restart"):
            await engine.restart("web")
        assert (await finished(engine, await engine.stop_service("web")))["outcome"] == (
            "succeeded"
        )
        record = await finished(engine, await engine.start_service("web"))
        assert record["outcome"] == "succeeded"
        assert runtime.running() == []

    run(kiln_home, runtime, router, body)


def test_exec_refuses_a_draining_instance_and_an_unknown_one(kiln_home: Path, image: str) -> None:
    """Held: exec goes only into instances in service; a retiring one is not found, and a
    runtime failure (the instance died meanwhile) is one clear error, not a crash."""
    runtime, router = FakeRuntime(kiln_home), MemoryRouter()

    async def body(engine: Engine, state: StateStore) -> None:
        wanted = spec(image, 2, drain_timeout="3s")
        assert (await deploy(engine, state, wanted))["outcome"] == "succeeded"
        first, second = sorted(await until_ready(engine, 2))
        runtime.ignore_term(first)
        stopping = await engine.stop_service("web")
        await until(lambda: state.instance(first).state in ("draining", "stopping"), 5, "drain")
        with pytest.raises(KilnError, match="no running instance"):
            await engine.exec(first, ["/bin/check"], 5.0)
        await finished(engine, stopping)
        with pytest.raises(KilnError):
            await engine.exec(second, ["/bin/check"], 5.0)

    run(kiln_home, runtime, router, body)


def test_exec_by_service_name_never_runs_in_another_service(kiln_home: Path, image: str) -> None:
    runtime, router = FakeRuntime(kiln_home), MemoryRouter()

    async def body(engine: Engine, state: StateStore) -> None:
        web = spec(image, 1).model_dump(mode="json")["services"]["web"]
        both = Spec.model_validate(
            {
                "project": {"name": PROJECT},
                "services": {"web": web, "webhooks": {**web, "listen": LISTEN + 1}},
            }
        )
        assert (await deploy(engine, state, both))["outcome"] == "succeeded"
        await until(lambda: len(runtime.running()) == 2, 5, "two instances")
        await finished(engine, await engine.stop_service("web"))
        ran: dict[str, object] | None = None
        with contextlib.suppress(KilnError):
            ran = await engine.exec("web", ["/bin/rm", "-rf", "/data"], 5.0)
        assert ran is None, f"kiln exec web ran in {ran['instance']}" if ran else ""

    run(kiln_home, runtime, router, body)


def test_plan_after_stop_does_not_call_the_service_new(kiln_home: Path, image: str) -> None:
    runtime, router = FakeRuntime(kiln_home), MemoryRouter()

    async def body(engine: Engine, state: StateStore) -> None:
        assert (await deploy(engine, state, spec(image, 2)))["outcome"] == "succeeded"
        await finished(engine, await engine.stop_service("web"))
        plan = make_plan(desired_from_spec(spec(image, 2), {}), state.snapshot(), PROJECT)
        text = plan.render()
        assert "new service" not in text and "stopped" in text, text

    run(kiln_home, runtime, router, body)


# -- failure hints: ordinary logs must not get a wrong cause ------------------


NGINX_404 = (
    '2026/12/04 17:00:01 [error] 7#7: *1 open() "/usr/share/nginx/html/favicon.ico" failed '
    '(2: No such file or directory), client: 10.213.0.1, request: "GET /favicon.ico HTTP/1.1"'
)


@pytest.mark.parametrize(
    ("exit_code", "logs"),
    [
        (1, ["listening on 8080", NGINX_404, '[emerg] host not found in upstream "db"']),
        (0, ["listening on 8080", "GET /robots.txt: not found", "shutting down"]),
        (
            1,
            [
                "Traceback (most recent call last):",
                "FileNotFoundError: [Errno 2] No such file or directory: '/etc/app/config.yml'",
            ],
        ),
    ],
)
def test_a_missing_file_is_not_a_missing_command(exit_code: int, logs: list[str]) -> None:
    from kiln.observe.hints import instance_hints

    hints = instance_hints(8080, exit_code, f"exited with code {exit_code}", logs)
    assert not any("command was not found" in h for h in hints), hints


def test_a_step_that_copies_a_missing_file_is_not_told_to_add_a_package() -> None:
    from kiln.image.hints import step_hints

    output = ["cp: can't stat '/src/static/app.css': No such file or directory"]
    assert step_hints(1, output, network=False) == []


def test_a_number_after_imported_is_not_a_port() -> None:
    from kiln.observe.hints import instance_hints

    reason = "not healthy within healthy_deadline 60s (GET /healthz: no answer within 1s)"
    logs = ["loading fixtures", "imported 12000 rows", "reported 404 stale entries"]
    (hint,) = instance_hints(40801, None, reason, logs)
    assert "its log mentions port" not in hint, hint


def test_a_file_permission_error_is_not_a_privileged_port() -> None:
    from kiln.observe.hints import instance_hints

    logs = ["listening on port 40801", "open /data/cache.db: permission denied"]
    hints = instance_hints(40801, 1, "exited with code 1", logs)
    assert not any("below 1024" in h for h in hints), hints


def test_the_known_patterns_still_get_their_hint() -> None:
    """Held: the real failures keep their hint (a fix of the above must not lose them)."""
    from kiln.image.hints import step_hints
    from kiln.observe.hints import instance_hints

    missing = instance_hints(8080, 127, "exited with code 127", ["sh: gunicorn: not found"])
    assert any("command was not found" in h for h in missing)
    step = step_hints(127, ["/bin/sh: 1: make: not found"], network=False)
    assert any("not in the image" in h for h in step)


# -- waiting lines: what a follower prints when nothing happens ---------------


def _status(instance: dict[str, object], kind: str = "stop") -> dict[str, object]:
    """What /v1/status answers for service web in the middle of rollout d-1 (shape of
    kiln.agent.views.status and Rollout.info)."""
    rollout = {
        "healthy_deadline": 60.0,
        "min_healthy_time": 2.0,
        "target": 1,
        "kind": kind,
        "started": 0.0,
        "deployment": "d-1",
        "step": 1,
    }
    return {"services": {"web": {"state": "rolling", "instances": [instance], "rollout": rollout}}}


def test_a_stopping_instance_is_not_said_to_wait_for_connections() -> None:
    from kiln.cli.workflow import waiting_lines

    inst = {
        "id": "web-1a2b",
        "revision": 1,
        "state": "stopping",
        "age": 40.0,
        "ready_for": 30.0,
        "probe": "GET /healthz: HTTP 200",
    }
    (line,) = waiting_lines(_status(inst), "d-1", now=100.0)
    assert "connections" not in line, line


def test_waiting_lines_survive_odd_status_shapes() -> None:
    """Held: an agent's status without rollouts, instances or numbers (an older agent, a
    service mid-removal) gives no line or a plain one, never an exception."""
    from kiln.cli.workflow import waiting_lines

    odd: list[dict[str, object]] = [
        {},
        {"services": {}},
        {"services": None},
        {"services": {"web": {"state": "stopped", "instances": [], "alarms": []}}},
        {"services": {"web": {"rollout": None, "instances": None}}},
        {"services": {"web": {"rollout": {"deployment": "d-1"}}}},
        {
            "services": {
                "web": {
                    "rollout": {"deployment": "d-1", "target": 1},
                    "instances": [
                        {"id": "x", "revision": 1, "state": "starting", "age": None, "probe": None}
                    ],
                }
            }
        },
    ]
    for status in odd:
        lines = waiting_lines(status, "d-1", now=100.0)
        assert all(isinstance(line, str) and "\n" not in line for line in lines), lines


class DyingAgent:
    """A real HTTP server on an agent socket that answers as an agent following deployment
    d-1 does, except that its status connection is reset, as a SIGKILLed agent's
    in-flight requests are; deployment d-1 has finished by the next request."""

    def __init__(self, home: Path) -> None:
        self.path = home / "agent.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(self.path))
        self.sock.listen(16)
        self.status_resets = 0
        self._closed = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                head += chunk
            target = head.split(b" ", 2)[1].decode()
            if target.startswith("/v1/status"):
                self.status_resets += 1
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.close()
                return
            if target.startswith("/v1/events") and "follow=1" in target:
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\n"
                    b"transfer-encoding: chunked\r\n\r\n"
                )
                self._closed.wait(30)  # nothing happens: the follower goes idle
                return
            if target.startswith("/v1/events"):
                body: dict[str, object] = {"events": [], "last_id": 0}
            else:
                outcome = "succeeded" if self.status_resets else "running"
                body = {"id": "d-1", "outcome": outcome, "services": {}}
            data = json.dumps(body).encode()
            conn.sendall(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(data), data)
            )
        conn.close()

    def close(self) -> None:
        self._closed.set()
        self.sock.close()


@pytest.fixture
def dying_agent(tmp_path: Path) -> Iterator[DyingAgent]:
    server = DyingAgent(tmp_path)
    yield server
    server.close()


def test_a_reset_status_request_does_not_end_the_follower(
    dying_agent: DyingAgent, tmp_path: Path
) -> None:
    from kiln.agent.client import AgentClient
    from kiln.cli.workflow import _follow

    said: list[str] = []
    with AgentClient(tmp_path) as client:
        record = _follow(client, {"deployment": "d-1"}, 0, said.append)
    assert dying_agent.status_resets == 1
    assert record["outcome"] == "succeeded", record


@pytest.mark.parametrize("timeout", ["nan", "inf", "1e999"])
def test_exec_with_a_non_finite_timeout_is_one_clear_error(tmp_path: Path, timeout: str) -> None:
    import os
    import subprocess
    import sys

    kiln = str(Path(sys.executable).parent / "kiln")
    env = dict(os.environ, KILN_HOME=str(tmp_path / "home"))
    ran = subprocess.run(
        [kiln, "exec", "--timeout", timeout, "web", "--", "true"],
        env=env,
        text=True,
        capture_output=True,
        timeout=60,
    )
    assert ran.returncode != 0
    assert "Traceback" not in ran.stderr, ran.stderr.strip().splitlines()[-1]
    assert "timeout" in ran.stderr, ran.stderr
