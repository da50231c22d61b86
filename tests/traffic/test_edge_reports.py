"""The Swarm edge's counter reports, driven by the route set: a real edge process (Debian's
python3, real HAProxy) and a fake agent over real TLS on loopback that serves the route
watch with ``report_counters`` and takes ``POST /v1/edge/counters``.

Nothing is posted while no service is under analysis; once the routes name one, a
report every second with that service's per-backend counts (latency as its histogram);
one last report when it leaves the list, then silence again. A refused report is
logged once and changes nothing of what the edge serves.
"""

from __future__ import annotations

import itertools
import json
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_edge import (
    EdgeProcess,
    FakeAgent,
    _AgentHandler,
    _AgentServer,
    answers,
    backends,  # noqa: F401 - a fixture, used by name
    tls,  # noqa: F401 - a fixture, used by name
    wait_serving,
    web,
)
from traffic_harness import HTTPBackend, free_port, get, wait_for

from kiln.agent.api import EdgeReport
from kiln.traffic.edge import REPORT_EVERY
from kiln.traffic.haproxy import HAProxyRouter, RouterSettings

pytestmark = pytest.mark.skipif(
    not Path("/usr/bin/python3").exists() or not Path("/usr/sbin/haproxy").exists(),
    reason="needs Debian's python3 and haproxy",
)


class _ReportHandler(_AgentHandler):
    server: _ReportServer

    def do_POST(self) -> None:
        agent = self.server.agent
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        if self.path != "/v1/edge/counters":
            self._send(404, b'{"detail": "no such route"}')
            return
        if self.headers.get("Authorization") != f"Bearer {agent.token}" or agent.refuse_reports:
            self._send(403, b'{"detail": "token (viewer) may not use this route"}')
            return
        # Checked with the agent's own model: what the edge posts, the agent takes.
        report = EdgeReport.model_validate_json(body)
        with agent.lock:
            agent.reports.append((time.monotonic(), report))
        self._send(200, b'{"counted": [], "ignored": []}')


class _ReportServer(_AgentServer):
    agent: ReportingAgent


class ReportingAgent(FakeAgent):
    """The fake agent, plus ``report_counters`` in its answers and the reports it took."""

    def __init__(self, certificate: tuple[Path, Path]) -> None:
        super().__init__(certificate)
        self.report: list[str] = []
        self.reports: list[tuple[float, EdgeReport]] = []
        self.refuse_reports = False

    def start(self) -> ReportingAgent:
        server = _ReportServer(("127.0.0.1", self.port), _ReportHandler)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(*self.tls)
        server.socket = context.wrap_socket(server.socket, server_side=True)
        server.agent = self
        self.server = server
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def ask_for(self, *services: str) -> None:
        with self.changed:
            self.report = list(services)
            self.version += 1
            self.changed.notify_all()

    def answer(self, after: str | None, wait: float) -> bytes | tuple[int, bytes]:
        body = super().answer(after, wait)
        if not isinstance(body, bytes):
            return body
        with self.lock:
            return json.dumps({**json.loads(body), "report_counters": self.report}).encode()

    def taken(self) -> list[tuple[float, EdgeReport]]:
        with self.lock:
            return list(self.reports)


@pytest.fixture
def agent(tls: tuple[Path, Path, Path]) -> Iterator[ReportingAgent]:  # noqa: F811
    fake = ReportingAgent((tls[0], tls[1])).start()
    yield fake
    fake.kill()


@pytest.fixture
def edge(
    tmp_path: Path,
    agent: ReportingAgent,
    tls: tuple[Path, Path, Path],  # noqa: F811
) -> Iterator[EdgeProcess]:
    process = EdgeProcess(tmp_path, agent.port, tls[2])
    process.env["KILN_EDGE_NAME"] = "node-7.example.org"
    yield process
    if process.proc is not None:
        assert process.stop() == 0, process.text()
    HAProxyRouter(process.state, RouterSettings(bind="127.0.0.1")).stop()
    assert "Traceback" not in process.text(), process.text()


def _requests(report: EdgeReport, backend: str) -> int:
    found = report.services.get("web", {}).get(backend)
    return found.requests if found is not None else 0


def test_reports_only_while_the_routes_ask_then_one_last_report(
    agent: ReportingAgent,
    edge: EdgeProcess,
    backends: list[HTTPBackend],  # noqa: F811
) -> None:
    port = free_port()
    agent.publish(web(port, backends[0].spec(), backends[1].spec()))
    edge.start()
    wait_serving(port, {b"b0", b"b1"})
    # Idle: routes served, requests counted, nothing posted.
    for _ in range(20):
        get(port)
    time.sleep(3 * REPORT_EVERY)
    assert agent.taken() == []

    # A canary of web is judged: the edge reports at once, then every second.
    asked = time.monotonic()
    agent.ask_for("web")
    wait_for(lambda: len(agent.taken()) >= 4, 10)
    first_at, first = agent.taken()[0]
    assert first_at - asked < 2.0
    assert first.edge == "node-7" and len(first.generation) == 16
    assert set(first.services) == {"web"}
    assert _requests(first, "b0") + _requests(first, "b1") >= 26  # wait_serving's and ours
    times = [t for t, _ in agent.taken()]
    gaps = [b - a for a, b in itertools.pairwise(times[1:])]
    assert all(0.7 * REPORT_EVERY < g < 2.5 * REPORT_EVERY for g in gaps), gaps
    # The counts only grow, with the latency histogram, under one generation.
    before = agent.taken()[-1][1]
    for _ in range(30):
        get(port)
    wait_for(
        lambda: (
            _requests(agent.taken()[-1][1], "b0") + _requests(agent.taken()[-1][1], "b1")
            >= _requests(before, "b0") + _requests(before, "b1") + 30
        ),
        10,
    )
    last = agent.taken()[-1][1]
    assert last.generation == first.generation
    histogram = sum(sum(b.latency.values()) for b in last.services["web"].values())
    assert histogram >= 30, last
    assert all(b.responses.get("2xx", 0) == b.requests for b in last.services["web"].values())

    # The analysis ends: one last report, then nothing.
    count = len(agent.taken())
    agent.ask_for()
    wait_for(lambda: len(agent.taken()) > count, 5)
    time.sleep(1.0)
    settled = len(agent.taken())
    assert settled <= count + 2  # the last one (and one posted as the news came)
    time.sleep(3 * REPORT_EVERY)
    assert len(agent.taken()) == settled
    assert answers(port) == {b"b0", b"b1"}


def test_a_refused_report_is_logged_once_and_serving_goes_on(
    agent: ReportingAgent,
    edge: EdgeProcess,
    backends: list[HTTPBackend],  # noqa: F811
) -> None:
    port = free_port()
    agent.refuse_reports = True  # an edge deployed with a viewer token
    agent.report = ["web"]
    agent.publish(web(port, backends[0].spec()))
    edge.start()
    wait_serving(port, {b"b0"})
    wait_for(lambda: edge.lines("refused the counters"), 10)
    time.sleep(3 * REPORT_EVERY)
    assert len(edge.lines("refused the counters (HTTP 403")) == 1, edge.text()
    assert answers(port) == {b"b0"}
    # Let through again: reports are taken, and the edge says so once.
    agent.refuse_reports = False
    wait_for(lambda: len(agent.taken()) >= 2, 10)
    assert len(edge.lines("reporting the counters of web")) == 1, edge.text()
