"""Fixtures for end-to-end tests against a real agent: a tmp KILN_HOME, busybox images
built through the image store API, and a detached agent that is always torn down.

Other e2e tests reuse them by importing this module's fixtures (``kiln_home``,
``busybox_image``, ``agent``, ``free_port``) and the helpers in ``agent_harness``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from agent_harness import (
    HTTPD,
    ImageFactory,
    RunningAgent,
    _free_port,
    build_busybox_rootfs,
    kill_everything,
    put_image,
)

from kiln.agent.client import AgentClient, start_background
from leftovers import assert_nothing_left


@pytest.fixture
def free_port() -> Callable[[], int]:
    return _free_port


@pytest.fixture
def kiln_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    # Shared rootfs trees must be readable by an unprivileged image user.
    for parent in [home, *home.parents]:
        if parent == Path("/"):
            break
        parent.chmod(parent.stat().st_mode | 0o055)
    monkeypatch.setenv("KILN_HOME", str(home))
    return home


@pytest.fixture
def image(kiln_home: Path, tmp_path: Path) -> str:
    """A one-file image in the home's store: the fake runtime runs nothing from it, but
    the engine reads its config and digest as it would for any runtime."""
    tree = tmp_path / "tree"
    (tree / "bin").mkdir(parents=True)
    (tree / "bin" / "app").write_text("#!/bin/sh\n")
    return put_image(kiln_home, "app:v1", tree, ["/bin/app"])


@pytest.fixture
def busybox_image(kiln_home: Path, tmp_path: Path) -> ImageFactory:
    """``busybox_image("web:v1", files={"healthz": "ok"})`` → digest of an httpd image."""
    counter = iter(range(1000))

    def build(
        name: str,
        files: dict[str, str] | None = None,
        cmd: list[str] | None = None,
        env: dict[str, str] | None = None,
    ) -> str:
        tree = build_busybox_rootfs(tmp_path / f"tree{next(counter)}", files)
        return put_image(kiln_home, name, tree, cmd or HTTPD, env)

    return build


@pytest.fixture
def agent(kiln_home: Path) -> Iterator[RunningAgent]:
    start_background(kiln_home)
    client = AgentClient(kiln_home)
    downed = False
    try:
        yield RunningAgent(kiln_home, client)
    finally:
        with contextlib.suppress(Exception):
            if client.running():
                client.down()
                deadline = time.monotonic() + 10
                while client.running() and time.monotonic() < deadline:
                    time.sleep(0.1)
                downed = not client.running()
        client.close()
        try:
            if downed:
                # After every story: kiln down leaves no process, mount, cgroup,
                # interface or secret copy.
                assert_nothing_left(kiln_home)
        finally:
            kill_everything(kiln_home)
