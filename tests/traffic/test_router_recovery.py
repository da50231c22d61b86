"""A router that restarts on a home must find this home's HAProxy by what it is, never
by a pid file alone: a stale, hostile or missing ``router.json`` must not make it kill
another process, take another home's sockets, or leave a HAProxy behind."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from traffic_harness import HTTPBackend, free_port, get, route, wait_for

from kiln.process import pid_alive
from kiln.traffic import Route, RouteError
from kiln.traffic.haproxy import HAProxyRouter, RouterSettings
from kiln.traffic.haproxy.processes import masters, our_processes

pytestmark = pytest.mark.timeout(60)

SETTINGS = RouterSettings(bind="127.0.0.1")


def _home(tmp_path: Path, name: str) -> Path:
    home = tmp_path / name
    home.mkdir(mode=0o700)
    return home


def test_a_pid_file_naming_another_process_kills_nothing(
    tmp_path: Path, backends: list[HTTPBackend]
) -> None:
    home = _home(tmp_path, "home")
    config = home / "haproxy" / "gen-1.cfg"
    # A process whose command line names this home's config, but is not HAProxy.
    decoy = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", "-f", str(config)]
    )
    try:
        (home / "haproxy").mkdir(mode=0o700)
        (home / "haproxy" / "router.json").write_text(
            json.dumps({"version": 1, "generation": 1, "pid": decoy.pid, "listeners": {}})
        )
        router = HAProxyRouter(home, SETTINGS)
        try:
            assert router.start() == "started"
            assert decoy.poll() is None, "the router killed a process that is not its HAProxy"
            port = free_port()
            router.apply(route("web", port, [backends[0].spec()]))
            assert get(port)[0] == 200
        finally:
            router.stop()
        assert decoy.poll() is None, "stop() killed a process that is not its HAProxy"
    finally:
        decoy.kill()
        decoy.wait()


def test_another_homes_haproxy_is_neither_adopted_nor_killed(
    tmp_path: Path, backends: list[HTTPBackend]
) -> None:
    a_home, b_home = _home(tmp_path, "a"), _home(tmp_path, "b")
    b = HAProxyRouter(b_home, SETTINGS)
    b.start()
    try:
        b_port = free_port()
        b.apply(route("web", b_port, [backends[1].spec()]))
        state = json.loads((b_home / "haproxy" / "router.json").read_text())
        # A hostile or copied record in home a names home b's HAProxy and its socket.
        (a_home / "haproxy").mkdir(mode=0o700)
        (a_home / "haproxy" / "router.json").write_text(json.dumps(state))
        a = HAProxyRouter(a_home, SETTINGS)
        try:
            assert a.start() == "started"
            assert a.routes() == {}
            with pytest.raises(RouteError, match="in use"):
                a.apply(route("web", b_port, [backends[0].spec()]))
        finally:
            a.stop()
        assert pid_alive(state["pid"]), "home a killed home b's HAProxy"
        assert get(b_port)[:2] == (200, b"b1"), "home b no longer serves its own route"
    finally:
        b.stop()


def test_an_unrecorded_generation_is_found_and_stopped(
    tmp_path: Path, backends: list[HTTPBackend]
) -> None:
    """An agent killed between starting a generation and recording it: the record is
    gone or stale, the HAProxy still runs and holds the port."""
    home = _home(tmp_path, "home")
    first = HAProxyRouter(home, SETTINGS)
    first.start()
    port = free_port()
    first.apply(route("web", port, [backends[0].spec()]))
    orphan = first.pid
    first.close()
    (home / "haproxy" / "router.json").write_text("{ truncated")
    second = HAProxyRouter(home, SETTINGS)
    try:
        assert second.start() == "started"
        assert orphan is not None and not pid_alive(orphan)
        # Its port is free again for the new generation.
        second.apply(Route("web", port, backends=(backends[1].spec(),)))
        assert get(port)[:2] == (200, b"b1")
    finally:
        second.stop()
    assert our_processes(home / "haproxy") == []


def test_an_older_generation_finishing_its_work_is_left_to_finish(
    tmp_path: Path, backends: list[HTTPBackend]
) -> None:
    """An agent restarted while an old generation still finishes a request: the
    adopted router lets it finish, kills nothing, and ``stop()`` still ends it."""
    home = _home(tmp_path, "home")
    first = HAProxyRouter(home, SETTINGS)
    first.start()
    port = free_port()
    first.apply(route("web", port, [backends[0].spec()]))
    answers: list[tuple[int, bytes]] = []
    slow = threading.Thread(target=lambda: answers.append(get(port, "/slow?t=1.5")[:2]))
    slow.start()
    time.sleep(0.3)
    first.apply(route("api", free_port(), [backends[1].spec()]))  # a new generation
    first.close()
    second = HAProxyRouter(home, SETTINGS)
    try:
        assert second.start() == "adopted"
        slow.join(10)
        assert answers == [(200, b"b0")]
        wait_for(lambda: len(masters(our_processes(home / "haproxy"))) == 1, 10)
    finally:
        second.stop()
    assert our_processes(home / "haproxy") == []


def test_a_router_adopted_twice_keeps_its_listener_and_its_process(
    tmp_path: Path, backends: list[HTTPBackend]
) -> None:
    """Two agent restarts in a row, with a backend change in between: the record must
    name the listener's fd inside the master, not the adopting agent's own copy (the
    second adoption used to fail and start a new HAProxy, refusing connections)."""
    home = _home(tmp_path, "home")
    port = free_port()
    first = HAProxyRouter(home, SETTINGS)
    first.start()
    first.apply(route("web", port, [backends[0].spec()]))
    pid = first.info()["pid"]
    first.close()
    second = HAProxyRouter(home, SETTINGS)
    third = HAProxyRouter(home, SETTINGS)
    try:
        assert second.start() == "adopted"
        # A backend change through the runtime API: no new generation, a new record.
        second.apply(route("web", port, [backends[0].spec(), backends[1].spec()]))
        assert second.info()["pid"] == pid
        second.close()
        assert third.start() == "adopted"
        assert third.info()["pid"] == pid
        assert {get(port, "/")[1] for _ in range(20)} == {b"b0", b"b1"}
    finally:
        third.stop()
    assert our_processes(home / "haproxy") == []
