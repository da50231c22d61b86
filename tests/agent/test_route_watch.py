"""``GET /v1/routes``: the versioned route watch data planes elsewhere pull from (as Envoy's
xDS), tried against a real agent over TLS with real bearer tokens and a real service of
busybox httpd instances behind it.

A watch naming the current epoch and version is held until the served routes change
(an apply, a scale) or its wait passes; anything else is answered at once. Watchers are
bounded, a hung-up watcher frees its place, and a new agent process starts a new epoch.
"""

from __future__ import annotations

import asyncio
import os
import re
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from agent_harness import HTTPD, build_busybox_rootfs, deploy, put_image, service_spec
from test_remote_api import _start, _stop

from kiln.agent.client import AgentClient
from kiln.agent.daemon import ROUTE_WATCHERS_MAX
from kiln.agent.tls import home_ca
from kiln.agent.tokens import TokenStore


@dataclass
class Watched:
    home: Path
    port: int
    listen: int
    digest: str
    viewer: str
    deployer: str
    expired: str
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(home_ca(self.home)))

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, verify=self.context(), timeout=90.0)

    def routes(self, token: str | None = None, **params: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token or self.viewer}"}
        with self.http() as client:
            return client.get("/v1/routes", params=params, headers=headers)

    def current(self) -> dict[str, Any]:
        resp = self.routes()
        assert resp.status_code == 200, resp.text
        body: dict[str, Any] = resp.json()
        return body

    def deployer_client(self) -> AgentClient:
        return AgentClient(self.home, addr=self.url, token=self.deployer, ca=home_ca(self.home))


@pytest.fixture(scope="module")
def watched(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Watched]:
    base = tmp_path_factory.mktemp("watch")
    home = base / "home"
    home.mkdir(mode=0o700)
    # The instances' rootfs trees must be readable by an unprivileged image user.
    for parent in [base, *base.parents]:
        if parent == Path("/"):
            break
        parent.chmod(parent.stat().st_mode | 0o055)
    tree = build_busybox_rootfs(base / "tree", {"healthz": "ok", "index.html": "hello"})
    digest = put_image(home, "web:v1", tree, HTTPD)
    store = TokenStore(home)
    viewer = store.create("viewer", "edge")[1]
    deployer = store.create("deployer", "ci")[1]
    expired = store.create("viewer", "short", expires_in=0.3)[1]
    from agent_harness import _free_port

    port, process = _start(home)
    try:
        while store.check(expired) is not None:
            time.sleep(0.05)
        yield Watched(home, port, _free_port(), digest, viewer, deployer, expired, process)
    finally:
        _stop(home, process)


class HeldWatch:
    """A watch running in a thread, so the test can change the routes meanwhile."""

    def __init__(self, watched: Watched, after: str, wait: float) -> None:
        self.response: httpx.Response | None = None
        self.elapsed = 0.0

        def run() -> None:
            started = time.monotonic()
            self.response = watched.routes(after=after, wait=wait)
            self.elapsed = time.monotonic() - started

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def result(self, timeout: float) -> tuple[dict[str, Any], float]:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the watch did not return"
        assert self.response is not None and self.response.status_code == 200
        body: dict[str, Any] = self.response.json()
        return body, self.elapsed


def _after(answer: dict[str, Any]) -> str:
    return f"{answer['epoch']}:{answer['version']}"


def _backends(answer: dict[str, Any], state: str = "ready") -> list[str]:
    route = next((r for r in answer["routes"] if r["name"] == "web"), None)
    if route is None:
        return []
    return sorted(b["address"] for b in route["backends"] if b["state"] == state)


def _watch_until(watched: Watched, pred: Any, timeout: float) -> dict[str, Any]:
    """Follow the watch (as an edge does) until ``pred`` holds; returns that answer."""
    deadline = time.monotonic() + timeout
    answer = watched.current()
    while not pred(answer):
        left = deadline - time.monotonic()
        assert left > 0, f"routes never got there: {answer}"
        resp = watched.routes(after=_after(answer), wait=min(left, 10.0))
        assert resp.status_code == 200, resp.text
        nxt = resp.json()
        assert nxt["epoch"] == answer["epoch"] and nxt["version"] >= answer["version"]
        answer = nxt
    return answer


def test_the_agent_log_names_the_ca_clients_must_trust(watched: Watched) -> None:
    log = (watched.home / "agent.log").read_text()
    assert f"clients trust the CA {home_ca(watched.home)}" in log
    assert home_ca(watched.home).is_file()


def test_first_call_answers_at_once(watched: Watched) -> None:
    started = time.monotonic()
    answer = watched.current()
    assert time.monotonic() - started < 2.0
    assert re.fullmatch(r"[0-9a-f]{16}", answer["epoch"])
    assert isinstance(answer["version"], int) and answer["version"] >= 0
    assert isinstance(answer["routes"], list)
    # Not current (another epoch, another version, or no wait): answered at once too.
    for params in (
        {"wait": 30},
        {"after": f"{'0' * 16}:{answer['version']}", "wait": 30},
        {"after": f"{answer['epoch']}:{answer['version'] + 5}", "wait": 30},
        {"after": _after(answer)},
    ):
        started = time.monotonic()
        resp = watched.routes(**params)
        assert resp.status_code == 200, resp.text
        assert resp.json()["version"] == answer["version"], params
        assert time.monotonic() - started < 2.0, params


def test_wait_expiry_returns_the_same_version(watched: Watched) -> None:
    answer = watched.current()
    started = time.monotonic()
    resp = watched.routes(after=_after(answer), wait=1.0)
    elapsed = time.monotonic() - started
    assert resp.status_code == 200
    assert resp.json() == answer
    assert 0.9 <= elapsed < 5.0


def test_malformed_after_is_422_and_a_bad_wait_is_400(watched: Watched) -> None:
    for after in ("x", "abc:", ":1", "abc:-1", "ABC:1", "a:1:2", "a:" + "9" * 20, "a :1", "é:1"):
        resp = watched.routes(after=after)
        assert resp.status_code == 422, (after, resp.text)
        detail = resp.json()["detail"]
        assert detail.startswith("after: expected EPOCH:VERSION") and "\n" not in detail
    for wait in ("61", "-1", "nan", "inf", "x", "1e9"):
        resp = watched.routes(wait=wait)
        assert resp.status_code == 400, (wait, resp.text)
        assert resp.json()["detail"].startswith("wait: must be seconds from 0 to 60")


def test_tokens_missing_wrong_or_expired_are_refused(watched: Watched) -> None:
    with watched.http() as client:
        assert client.get("/v1/routes").status_code == 401
        forged = client.get("/v1/routes", headers={"Authorization": "Bearer kiln_" + "x" * 43})
        assert forged.status_code == 401
        assert forged.json()["detail"] == "a valid bearer token is required"
    expired = watched.routes(token=watched.expired)
    assert expired.status_code == 401
    assert "expired at" in expired.json()["detail"]
    assert watched.routes(token=watched.deployer).status_code == 200  # above viewer


def test_watchers_are_bounded_and_a_hung_up_one_frees_its_place(watched: Watched) -> None:
    after = _after(watched.current())
    headers = {"Authorization": f"Bearer {watched.viewer}"}

    async def scenario() -> None:
        limits = httpx.Limits(max_connections=ROUTE_WATCHERS_MAX + 8)
        async with httpx.AsyncClient(
            base_url=watched.url, verify=watched.context(), limits=limits, timeout=60.0
        ) as client:

            async def watch(wait: float) -> httpx.Response:
                params = {"after": after, "wait": wait}
                return await client.get("/v1/routes", params=params, headers=headers)

            # One more than the bound: exactly one is refused at once, the others are held.
            held = [asyncio.create_task(watch(30)) for _ in range(ROUTE_WATCHERS_MAX + 1)]
            await asyncio.wait(held, timeout=20, return_when=asyncio.FIRST_COMPLETED)
            await asyncio.sleep(0.5)  # a second refusal would have come by now
            done = {task for task in held if task.done()}
            assert len(done) == 1 and len(held) - len(done) == ROUTE_WATCHERS_MAX
            refused = done.pop().result()
            assert refused.status_code == 429, refused.text
            assert refused.headers["retry-after"] == "1"
            assert f"{ROUTE_WATCHERS_MAX} route watchers" in refused.json()["detail"]
            for task in held:
                task.cancel()
            await asyncio.gather(*held, return_exceptions=True)
            await client.aclose()  # the held requests' connections close: the agent sees it

        async with httpx.AsyncClient(
            base_url=watched.url, verify=watched.context(), timeout=60.0
        ) as fresh:
            deadline = time.monotonic() + 10  # far sooner than the 30 s the watches asked
            while True:
                started = time.monotonic()
                resp = await fresh.get(
                    "/v1/routes", params={"after": after, "wait": 0.5}, headers=headers
                )
                if resp.status_code == 200:
                    assert time.monotonic() - started >= 0.4  # held, not refused
                    break
                assert resp.status_code == 429
                assert time.monotonic() < deadline, "hung-up watchers kept their places"
                await asyncio.sleep(0.2)

    asyncio.run(scenario())


def test_a_held_watch_returns_when_a_service_is_applied_then_scaled(watched: Watched) -> None:
    before = watched.current()
    held = HeldWatch(watched, _after(before), wait=50)
    time.sleep(0.5)
    assert held.thread.is_alive()  # held: nothing changed yet
    spec = service_spec(watched.digest, replicas=2, listen=watched.listen)
    with watched.deployer_client() as client:
        record = deploy(client, spec)
        assert record["outcome"] == "succeeded", record
    changed, elapsed = held.result(10)
    assert changed["epoch"] == before["epoch"]
    assert changed["version"] == before["version"] + 1
    assert elapsed < 40
    web = next(r for r in changed["routes"] if r["name"] == "web")
    assert web["listen"] == watched.listen and web["protocol"] == "http"
    two = _watch_until(watched, lambda a: len(_backends(a)) == 2, 30)
    # The addresses are the instances' own: each serves the page.
    for address in _backends(two):
        assert httpx.get(f"http://{address}/index.html", timeout=5).text == "hello"

    held = HeldWatch(watched, _after(two), wait=50)
    time.sleep(0.3)
    assert held.thread.is_alive()
    with watched.deployer_client() as client:
        client.scale("web", 3)
    scaled, _ = held.result(30)
    assert scaled["version"] == two["version"] + 1
    three = _watch_until(watched, lambda a: len(_backends(a)) == 3, 30)
    assert set(_backends(two)) < set(_backends(three))


def test_a_new_agent_process_starts_a_new_epoch(watched: Watched) -> None:
    before = watched.current()
    with AgentClient(watched.home, addr="") as local:
        pid = local.health()["pid"]
    os.kill(pid, 15)  # the agent stops; instances and the proxy keep running
    assert watched.process.wait(20) == 0
    watched.port, watched.process = _start(watched.home)
    started = time.monotonic()
    resp = watched.routes(after=_after(before), wait=30)
    assert time.monotonic() - started < 2.0  # the old epoch is not current: at once
    after_restart = resp.json()
    assert after_restart["epoch"] != before["epoch"]
    assert (
        _watch_until(watched, lambda a: len(_backends(a)) == 3, 30)["epoch"]
        == (after_restart["epoch"])
    )
