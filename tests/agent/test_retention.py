"""Logs outlive their instances, within the retention the agent enforces."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_harness import kill_everything

from kiln.agent.client import AgentClient, start_background
from kiln.agent.engine import log_retention
from kiln.errors import KilnError
from kiln.observe.logs import LogMeta, LogStore


@pytest.fixture
def home(kiln_home: Path) -> Iterator[Path]:
    yield kiln_home
    with AgentClient(kiln_home) as client:
        if client.running():
            client.down()
    kill_everything(kiln_home)


def test_the_agent_prunes_logs_of_gone_instances_past_their_age(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LogStore(home / "logs")
    for name, age in (("web-old", 3600.0), ("web-new", 0.0)):
        meta = LogMeta("web", name, 1, "sha256:" + "0" * 64, time.time() - age)
        with store.writer(meta) as writer:
            writer.write("stdout", f"hello from {name}", ts=time.time() - age)
        log = home / "logs" / "web" / f"{name}.log"
        os.utime(log, (time.time() - age, time.time() - age))
    monkeypatch.setenv("KILN_LOG_MAX_AGE", "10m")
    start_background(home)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if [m.instance for m in store.instances("web")] == ["web-new"]:
            break
        time.sleep(0.1)
    assert [m.instance for m in store.instances("web")] == ["web-new"]
    with AgentClient(home) as client:
        assert any(e["kind"] == "logs.pruned" for e in client.events())


def test_retention_settings_are_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KILN_LOG_MAX_BYTES", "1GiB")
    monkeypatch.setenv("KILN_LOG_MAX_AGE", "2h")
    assert log_retention() == (1024**3, 7200.0)
    monkeypatch.setenv("KILN_LOG_MAX_AGE", "forever")
    with pytest.raises(KilnError, match="log retention: 'forever' is not a duration"):
        log_retention()
