"""The agent lifecycle: one per KILN_HOME, a private socket, a stop that spares the proxy."""

from __future__ import annotations

import fcntl
import os
import signal
import stat
import sys
import time
from pathlib import Path

import pytest
from agent_harness import RunningAgent, build_busybox_rootfs, kill_everything

from kiln.agent._lock import AgentAlreadyRunning
from kiln.agent.client import AgentClient, AgentUnavailable, agent_command, start_background
from kiln.agent.daemon import run_agent
from kiln.agent.executor import build_instance_spec, image_launch
from kiln.errors import KilnError
from kiln.process import pid_alive


def _wait_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.05)
    return False


def test_agent_command_runs_this_python_for_this_home(tmp_path: Path) -> None:
    assert agent_command(tmp_path) == [
        sys.executable,
        "-m",
        "kiln.agent",
        "--home",
        str(tmp_path),
    ]


def test_image_launch_joins_entrypoint_and_cmd_and_service_env_wins() -> None:
    launch = image_launch(
        {
            "config": {
                "Entrypoint": ["/bin/sh", "-c"],
                "Cmd": ["exec httpd -f -p $PORT"],
                "Env": ["PATH=/bin", "GREETING=image"],
                "User": "65534:65534",
                "WorkingDir": "/srv",
            }
        },
        "web",
    )
    assert launch.command == ["/bin/sh", "-c", "exec httpd -f -p $PORT"]
    spec = build_instance_spec(
        instance_id="web-1",
        service="web",
        revision=2,
        image_digest="sha256:" + "a" * 64,
        launch=launch,
        service_env={"GREETING": "service", "PORT": "1"},
        port=41000,
        writable=["/cache"],
        volumes=[{"name": "data", "path": "/data", "readonly": False}],
        memory=None,
        cpu=0.5,
        stop_grace=3.0,
    )
    assert spec.env == {"PATH": "/bin", "GREETING": "service", "PORT": "41000"}
    assert (spec.user, spec.workdir, spec.writable) == ("65534:65534", "/srv", ("/cache",))
    assert (spec.volumes[0].name, spec.volumes[0].target) == ("data", "/data")
    assert spec.layers == (), "the runtime delivers the image by digest"
    assert (spec.cpu, spec.stop_grace) == (0.5, 3.0)


def test_image_without_command_is_refused() -> None:
    with pytest.raises(KilnError, match="image web r1: no Entrypoint or Cmd"):
        image_launch({"config": {"Env": []}}, "web r1")


def test_client_without_agent_says_how_to_start_one(kiln_home: Path) -> None:
    client = AgentClient(kiln_home)
    assert not client.running()
    with pytest.raises(AgentUnavailable, match=r"no agent answers on .*agent.sock; start one"):
        client.status()


def test_start_background_reports_the_log_tail_when_the_agent_cannot_start(
    kiln_home: Path,
) -> None:
    # Hold the agent lock as a fake agent would: the spawned agent must refuse and say why.
    fd = os.open(kiln_home / "agent.pid", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, b"4242\n")
        with pytest.raises(KilnError, match=r"did not start(.|\n)*already runs .*pid 4242"):
            start_background(kiln_home, timeout=10)
    finally:
        os.close(fd)


def test_agent_lifecycle(agent: RunningAgent) -> None:
    home = agent.home
    health = agent.client.health()
    assert health["ok"] and health["pid"] == agent.pid()
    sock = home / "agent.sock"
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600

    with pytest.raises(AgentAlreadyRunning, match=rf"an agent already runs for {home} \(pid "):
        run_agent(home)

    proxy_pid = health["proxy_pid"]
    agent_pid = agent.pid()
    os.kill(agent_pid, signal.SIGTERM)
    assert _wait_gone(agent_pid), "agent did not stop on SIGTERM"
    assert pid_alive(proxy_pid), "the proxy must outlive the agent"
    assert not sock.exists()
    assert not agent.client.running()

    start_background(home)
    assert agent.client.health()["proxy_pid"] == proxy_pid
    kinds = [e["kind"] for e in agent.client.events()]
    assert kinds.count("agent.started") == 2
    assert "proxy.adopted" in kinds and "agent.stopped" in kinds

    second_pid = agent.pid()
    agent.client.down()
    assert _wait_gone(second_pid), "the agent exits after kiln down"
    assert _wait_gone(proxy_pid), "kiln down stops the proxy"
    kill_everything(home)


def test_events_can_be_followed_as_a_stream(agent: RunningAgent) -> None:
    stream = agent.client.follow_events(after=0)
    first = next(stream)
    assert first["id"] == 1 and first["kind"].startswith("proxy.")
    kinds = [first["kind"], next(stream)["kind"]]
    assert "agent.started" in kinds
    stream.close()


def test_instances_unknown_to_the_state_are_destroyed_on_start(
    kiln_home: Path, tmp_path: Path
) -> None:
    from kiln.runtime import InstanceSpec
    from kiln.runtime.local import LocalRuntime

    rootfs = build_busybox_rootfs(tmp_path / "rootfs")
    runtime = LocalRuntime(kiln_home)
    orphan = runtime.start(
        InstanceSpec(
            instance_id="web-0rphan00",
            service="web",
            revision=1,
            image_digest="sha256:" + "0" * 64,
            layers=(rootfs,),
            command=["/bin/sleep", "60"],
            user=None,
            workdir="/",
            env={"PATH": "/bin"},
            port=1,
        )
    )
    try:
        start_background(kiln_home)
        client = AgentClient(kiln_home)
        events = [e for e in client.events() if e["kind"] == "instance.orphan"]
        assert [e["instance"] for e in events] == ["web-0rphan00"]
        assert not runtime.recover(orphan)
        assert runtime.list() == []
        client.down()
    finally:
        kill_everything(kiln_home)


def test_port_in_the_commands_arguments_is_interpolated_without_a_shell() -> None:
    """``cmd = ["redis-server", "--port", "${PORT}"]`` works as Nomad's args do; other
    words that only start like it are left alone."""

    def command(config: dict[str, object]) -> list[str]:
        spec = build_instance_spec(
            instance_id="redis-1",
            service="redis",
            revision=1,
            image_digest="sha256:" + "b" * 64,
            launch=image_launch({"config": config}, "redis"),
            service_env={},
            port=6379,
            writable=[],
            volumes=[],
            memory=None,
            cpu=None,
            stop_grace=1.0,
        )
        return spec.command

    assert command({"Entrypoint": ["redis-server"], "Cmd": ["--port", "${PORT}", "--x=$PORT"]}) == [
        "redis-server", "--port", "6379", "--x=6379",
    ]  # fmt: skip
    assert command({"Cmd": ["echo", "$PORTS", "$$", "${PORTAL}"]}) == [
        "echo", "$PORTS", "$$", "${PORTAL}",
    ]  # fmt: skip
