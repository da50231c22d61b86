"""The Swarm edge (``python3 -m kiln.traffic.edge``) as a real process under Debian's
python3: real HAProxy, a fake agent serving the route watch over real TLS on loopback,
backends that are small HTTP servers. Plus the edge image, baked for real.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from traffic_harness import HTTPBackend, Load, free_port, get, refused, wait_for

import kiln
from kiln.agent.tls import ensure_server_certificate
from kiln.image.store import ImageStore
from kiln.image.unpack import unpack_image
from kiln.traffic import Backend, Route
from kiln.traffic.edge import MAX_ANSWER, AgentError, parse_answer
from kiln.traffic.edge_image import bake_edge_image
from kiln.traffic.haproxy import HAProxyRouter, RouterSettings

SYSTEM_PYTHON = Path("/usr/bin/python3")
SOURCE = Path(kiln.__file__).resolve().parent.parent
TOKEN = "edge-viewer-token-0123456789"

pytestmark = pytest.mark.skipif(
    not SYSTEM_PYTHON.exists() or not Path("/usr/sbin/haproxy").exists(),
    reason="needs Debian's python3 and haproxy",
)


# -- a fake agent: the watch contract, over TLS --------------------------------


class _AgentHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _AgentServer

    def log_message(self, format: str, *args: object) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        self.server.agent.connections.add(self.request)

    def finish(self) -> None:
        self.server.agent.connections.discard(self.request)
        super().finish()

    def do_GET(self) -> None:
        agent = self.server.agent
        url = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        with agent.lock:
            agent.requests.append(query)
        if url.path != "/v1/routes":
            self._send(404, b'{"detail": "no such route"}')
            return
        if self.headers.get("Authorization") != f"Bearer {agent.token}":
            with agent.lock:
                agent.refused += 1
            self._send(401, b'{"detail": "invalid token"}')
            return
        body = agent.answer(query.get("after"), float(query.get("wait", "0")))
        if isinstance(body, tuple):
            status, raw = body
            self._send(status, raw)
        elif isinstance(body, bytes) and body.startswith(b"CHUNKED"):
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            piece = b"x" * (1 << 20)
            for _ in range(int(body[7:])):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\n\r\n")
        else:
            self._send(200, body)

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _AgentServer(ThreadingHTTPServer):
    daemon_threads = True
    agent: FakeAgent

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # the edge hangs up on an answer it refuses: expected here


class FakeAgent:
    """``GET /v1/routes?after=EPOCH:VERSION&wait=S`` as the agent serves it; ``hostile``
    replaces the next answers (bytes, ``(status, bytes)`` or ``b"CHUNKED<MiB>"``)."""

    def __init__(self, tls: tuple[Path, Path], port: int = 0, token: str = TOKEN) -> None:
        self.tls = tls
        self.port = port or free_port()
        self.token = token
        self.epoch = os.urandom(8).hex()
        self.version = 0
        self.routes: list[dict[str, Any]] = []
        self.hostile: bytes | tuple[int, bytes] | None = None
        self.hostile_served = 0
        self.refused = 0
        self.requests: list[dict[str, str]] = []
        self.connections: set[Any] = set()
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.server: _AgentServer | None = None

    def start(self) -> FakeAgent:
        server = _AgentServer(("127.0.0.1", self.port), _AgentHandler)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(*self.tls)
        server.socket = context.wrap_socket(server.socket, server_side=True)
        server.agent = self
        self.server = server
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def kill(self) -> None:
        """As a killed process: the port closes and every open connection breaks."""
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
        for conn in list(self.connections):
            with contextlib.suppress(OSError):
                conn.shutdown(2)
        with self.changed:
            self.changed.notify_all()

    def publish(self, *routes: Route) -> None:
        with self.changed:
            self.routes = [r.to_json() for r in routes]
            self.version += 1
            self.changed.notify_all()

    def set_hostile(self, answer: bytes | tuple[int, bytes] | None) -> None:
        with self.changed:
            self.hostile = answer
            self.hostile_served = 0
            self.version += 1
            self.changed.notify_all()

    def answer(self, after: str | None, wait: float) -> bytes | tuple[int, bytes]:
        with self.changed:
            seen = (self.epoch, self.version)
            if after == f"{self.epoch}:{self.version}" and self.hostile is None:
                self.changed.wait_for(
                    lambda: (self.epoch, self.version) != seen or self.server is None,
                    timeout=wait,
                )
            if self.hostile is not None:
                self.hostile_served += 1
                return self.hostile
            return json.dumps(
                {"epoch": self.epoch, "version": self.version, "routes": self.routes}
            ).encode()


# -- the edge process ----------------------------------------------------------


class EdgeProcess:
    def __init__(self, root: Path, agent_port: int, ca: Path) -> None:
        self.state = root / "state"
        self.log = root / "edge.log"
        self.token_file = root / "token"
        self.token_file.write_text(TOKEN + "\n")
        self.ca = root / "ca.pem"
        self.ca.write_bytes(ca.read_bytes())
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "PYTHONPATH": str(SOURCE),
            "KILN_EDGE_AGENT": f"https://127.0.0.1:{agent_port}",
            "KILN_EDGE_TOKEN_FILE": str(self.token_file),
            "KILN_EDGE_CA_FILE": str(self.ca),
            "KILN_EDGE_STATE": str(self.state),
            "KILN_EDGE_BIND": "127.0.0.1",
            "KILN_EDGE_WAIT": "5",
            "KILN_EDGE_RETRY_MAX": "0.3",
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> EdgeProcess:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [str(SYSTEM_PYTHON), "-s", "-m", "kiln.traffic.edge"],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.log.parent,
            )
        return self

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        code = self.proc.wait(20)
        self.proc = None
        return code

    def text(self) -> str:
        return self.log.read_text()

    def lines(self, needle: str) -> list[str]:
        return [line for line in self.text().splitlines() if needle in line]

    def served(self) -> dict[str, Any]:
        """What HAProxy serves, as the router recorded it."""
        data = json.loads((self.state / "haproxy" / "router.json").read_text())
        return dict(data["routes"])


@pytest.fixture
def tls(tmp_path: Path) -> tuple[Path, Path, Path]:
    """The agent's certificate and key, and the CA that signed them."""
    home = tmp_path / "agent-home"
    cert, key = ensure_server_certificate(home, "127.0.0.1")
    return cert, key, home / "tls" / "ca.pem"


@pytest.fixture
def agent(tls: tuple[Path, Path, Path]) -> Iterator[FakeAgent]:
    fake = FakeAgent((tls[0], tls[1])).start()
    yield fake
    fake.kill()


@pytest.fixture
def edge(tmp_path: Path, agent: FakeAgent, tls: tuple[Path, Path, Path]) -> Iterator[EdgeProcess]:
    process = EdgeProcess(tmp_path, agent.port, tls[2])
    yield process
    if process.proc is not None:
        assert process.stop() == 0, process.text()
    # Whatever a killed edge left serving is stopped with its own router.
    HAProxyRouter(process.state, RouterSettings(bind="127.0.0.1")).stop()
    assert "Traceback" not in process.text(), process.text()


@pytest.fixture
def backends() -> Iterator[list[HTTPBackend]]:
    started = [HTTPBackend(name=f"b{i}").start() for i in range(3)]
    yield started
    for b in started:
        b.stop()


def web(port: int, *backends: Backend) -> Route:
    return Route(name="web", listen=port, backends=tuple(backends))


def answers(port: int) -> set[bytes]:
    """The bodies of a few requests: which backends serve ``port``."""
    return {get(port)[1] for _ in range(6)}


def wait_serving(port: int, bodies: set[bytes], timeout: float = 15) -> None:
    def ok() -> bool:
        try:
            return answers(port) == bodies
        except OSError:
            return False

    wait_for(ok, timeout)


# -- the watch, end to end -----------------------------------------------------


def test_routes_arrive_over_the_watch_and_requests_reach_backends(
    agent: FakeAgent, edge: EdgeProcess, backends: list[HTTPBackend]
) -> None:
    port = free_port()
    agent.publish(web(port, backends[0].spec(), backends[1].spec()))
    edge.start()
    wait_serving(port, {b"b0", b"b1"})
    assert backends[0].requests > 0 and backends[1].requests > 0
    # A watch, not a poll: once current, the edge asks with its cursor and is held.
    cursor = f"{agent.epoch}:{agent.version}"
    wait_for(lambda: any(q.get("after") == cursor for q in agent.requests))
    assert all(q.get("wait") == "5" for q in agent.requests)
    persisted = json.loads((edge.state / "routes.json").read_text())
    assert persisted["epoch"] == agent.epoch and persisted["version"] == agent.version
    assert [r["name"] for r in persisted["routes"]] == ["web"]
    # A second service, then the first one removed: its port closes.
    other = free_port()
    agent.publish(
        web(port, backends[0].spec()),
        Route(name="api", listen=other, backends=(backends[2].spec(),)),
    )
    wait_serving(other, {b"b2"})
    agent.publish(Route(name="api", listen=other, backends=(backends[2].spec(),)))
    wait_for(lambda: refused(port), 15)
    assert answers(other) == {b"b2"}


def test_backend_added_drained_removed_under_load_fails_nothing(
    agent: FakeAgent, edge: EdgeProcess, backends: list[HTTPBackend]
) -> None:
    port = free_port()
    b0, b1, b2 = backends
    agent.publish(web(port, b0.spec(), b1.spec()))
    edge.start()
    wait_serving(port, {b"b0", b"b1"})
    with Load(port, clients=3, connectors=1) as load:
        load.wait_ok(50)
        agent.publish(web(port, b0.spec(), b1.spec(), b2.spec()))
        wait_for(lambda: load.bodies[b"b2"] > 10, 15)
        draining = Backend(id="b0", address=b0.address, state="draining")
        agent.publish(web(port, draining, b1.spec(), b2.spec()))
        time.sleep(1.5)  # the change reaches HAProxy, what b0 had in flight finishes
        before = b0.requests
        load.wait_ok(100)
        assert b0.requests == before, "a draining backend got new requests"
        agent.publish(web(port, b1.spec(), b2.spec()))
        wait_for(lambda: "b0" not in str(edge.served().get("web")), 15)
        b0.stop()
        load.wait_ok(100)
    assert load.failures == [] and load.refused == 0
    assert load.ok > 250
    assert load.bodies[b"b1"] > 0 and load.bodies[b"b2"] > 0


def test_agent_killed_edge_keeps_serving_then_resumes_on_a_new_epoch(
    agent: FakeAgent, edge: EdgeProcess, backends: list[HTTPBackend]
) -> None:
    port = free_port()
    agent.publish(web(port, backends[0].spec()))
    edge.start()
    wait_serving(port, {b"b0"})
    with Load(port, clients=2) as load:
        agent.kill()
        wait_for(lambda: edge.lines("unreachable"), 10)
        time.sleep(3)  # ten retries or more at a 0.3 s cap
        load.wait_ok(50)
    assert load.failures == [] and load.refused == 0
    assert len(edge.lines("unreachable")) == 1, edge.text()  # one line, not one per retry
    assert edge.served()["web"]["backends"][0]["id"] == "b0"
    # The agent comes back (a new process: a new epoch) with other routes.
    old_epoch = agent.epoch
    agent.epoch = os.urandom(8).hex()
    agent.publish(web(port, backends[1].spec()))
    agent.start()
    wait_serving(port, {b"b1"})
    assert agent.epoch != old_epoch
    # The edge applies the routes first and keeps them on disk after: wait for the file.
    wait_for(
        lambda: json.loads((edge.state / "routes.json").read_text())["epoch"] == agent.epoch, 5
    )
    assert len(edge.lines("the agent answers")) == 2, edge.text()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["stopped", "killed"])
def test_edge_restarted_while_agent_is_down_serves_persisted_routes(
    agent: FakeAgent, edge: EdgeProcess, backends: list[HTTPBackend], sig: int
) -> None:
    port = free_port()
    agent.publish(web(port, backends[0].spec(), backends[1].spec()))
    edge.start()
    wait_serving(port, {b"b0", b"b1"})
    agent.kill()
    edge.stop(sig)
    if sig == signal.SIGTERM:
        wait_for(lambda: refused(port), 10)  # a stopped edge stops its HAProxy
    else:
        assert answers(port) == {b"b0", b"b1"}  # HAProxy outlives a killed edge
    edge.start()
    wait_serving(port, {b"b0", b"b1"})
    wait_for(lambda: edge.lines("persisted routes"), 10)
    assert edge.lines("haproxy adopted" if sig == signal.SIGKILL else "haproxy started")


def test_hostile_answers_change_nothing(
    agent: FakeAgent,
    edge: EdgeProcess,
    backends: list[HTTPBackend],
    tls: tuple[Path, Path, Path],
    tmp_path: Path,
) -> None:
    port = free_port()
    agent.publish(web(port, backends[0].spec()))
    edge.start()
    wait_serving(port, {b"b0"})
    served = edge.served()
    evil = web(port, backends[1].spec()).to_json()

    def routes_with(**change: Any) -> bytes:
        route = {**evil, **change}
        return json.dumps({"epoch": agent.epoch, "version": 99, "routes": [route]}).encode()

    hostile: list[tuple[bytes | tuple[int, bytes], str]] = [
        (b'{"epoch": "ab", "version": 3, "routes": [', "not JSON"),
        (b" " * (MAX_ANSWER + 1), "refused (max"),
        (b"CHUNKED9", "larger than"),
        (
            routes_with(
                backends=[{"id": "b1", "address": "127.0.0.1:80\n    server x 10.0.0.1:1"}]
            ),
            "address must be",
        ),
        (routes_with(backends=[{"id": "b1;evil", "address": backends[1].address}]), "id must"),
        (routes_with(name="web;shutdown"), "name must"),
        (routes_with(listen="80; rm"), "listen must"),
        (b'{"epoch": "ab\\ncd", "version": 3, "routes": []}', "epoch must"),
        ((500, b'{"detail": "boom"}'), "HTTP 500"),
    ]
    for answer, logged in hostile:
        edge.log.write_text("")  # each case counts its own lines
        agent.set_hostile(answer)
        wait_for(lambda: agent.hostile_served >= 3, 15)  # refused, and retried
        assert answers(port) == {b"b0"}, logged
        assert edge.served() == served, logged
        assert len(edge.lines(logged)) == 1, (logged, edge.text())
        agent.set_hostile(None)
        wait_for(lambda: edge.lines("the agent answers"), 15)

    # A wrong token: the agent answers 401, logged once, routes kept.
    edge.token_file.write_text("not-the-token\n")
    agent.publish(web(port, backends[0].spec()))  # the same routes: ends the held request
    wait_for(lambda: agent.refused >= 1, 15)
    agent.publish(web(port, backends[2].spec()))
    wait_for(lambda: agent.refused >= 4, 15)
    assert len(edge.lines("refused the token (HTTP 401)")) == 1, edge.text()
    assert answers(port) == {b"b0"}
    # An agent whose certificate another CA signed: nothing is sent to it.
    other_home = tmp_path / "other-ca"
    ensure_server_certificate(other_home, "127.0.0.1")
    edge.ca.write_bytes((other_home / "tls" / "ca.pem").read_bytes())
    wait_for(lambda: edge.lines("not trusted"), 15)
    asked = len(agent.requests)
    edge.token_file.write_text(TOKEN + "\n")
    time.sleep(1.5)
    assert answers(port) == {b"b0"}
    assert len(edge.lines("not trusted")) == 1, edge.text()
    assert len(agent.requests) == asked  # the handshake fails before any request
    # The right CA again: the edge catches up with what it refused to take unverified.
    edge.ca.write_bytes(tls[2].read_bytes())
    wait_serving(port, {b"b2"})


def test_edge_refuses_bad_settings_with_one_line(tmp_path: Path) -> None:
    base = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(SOURCE)}
    token = tmp_path / "token"
    token.write_text("bad token with spaces\n")
    cases = [
        ({}, "KILN_EDGE_AGENT is not set"),
        ({"KILN_EDGE_AGENT": "http://127.0.0.1:1"}, "expected https://HOST:PORT"),
        (
            {"KILN_EDGE_AGENT": "https://127.0.0.1:1", "KILN_EDGE_TOKEN_FILE": str(tmp_path / "x")},
            "does not exist",
        ),
        (
            {
                "KILN_EDGE_AGENT": "https://127.0.0.1:1",
                "KILN_EDGE_TOKEN_FILE": str(token),
                "KILN_EDGE_CA_FILE": str(token),
            },
            "does not hold a token",
        ),
    ]
    for env, message in cases:
        done = subprocess.run(
            [str(SYSTEM_PYTHON), "-s", "-m", "kiln.traffic.edge"],
            env={**base, **env},
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 2, done.stderr
        assert done.stderr.count("\n") == 1 and message in done.stderr, done.stderr


def test_edge_imports_nothing_from_pypi() -> None:
    """Debian's python3 with only the kiln source: the edge and the router it drives."""
    code = (
        "import sys, kiln.traffic.edge, kiln.traffic.haproxy\n"
        "std = sys.stdlib_module_names\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} - std - {'kiln', '__main__'}))"
    )
    done = subprocess.run(
        [str(SYSTEM_PYTHON), "-S", "-c", code],
        env={"PYTHONPATH": str(SOURCE)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# -- the answer's checks, case by case ----------------------------------------


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        ([], "not an object"),
        ({"epoch": "AB", "version": 1, "routes": []}, "epoch must"),
        ({"epoch": "ab", "version": True, "routes": []}, "version must"),
        ({"epoch": "ab", "version": -1, "routes": []}, "version must"),
        ({"epoch": "ab", "version": 10**20, "routes": []}, "version must"),
        ({"epoch": "ab", "version": 1, "routes": {}}, "routes must"),
        ({"epoch": "ab", "version": 1, "routes": [1]}, "must be an object"),
        (
            {"epoch": "ab", "version": 1, "routes": [{"name": "a", "listen": 1}] * 2},
            "twice",
        ),
        (
            {
                "epoch": "ab",
                "version": 1,
                "routes": [{"name": "a", "listen": 1}, {"name": "b", "listen": 1}],
            },
            "also serves",
        ),
        (
            {
                "epoch": "ab",
                "version": 1,
                "routes": [
                    {"name": "a", "listen": 1, "backends": [{"id": "x", "address": "h.example:80"}]}
                ],
            },
            "address must",
        ),
        (
            {"epoch": "ab", "version": 1, "routes": [{"name": "a", "listen": 1, "weight": []}]},
            None,
        ),
    ],
)
def test_parse_answer_refuses_the_whole_table(answer: Any, message: str | None) -> None:
    body = json.dumps(answer).encode()
    if message is None:  # unknown keys are ignored, as the agent may add some
        assert list(parse_answer(body).routes) == ["a"]
        return
    with pytest.raises(AgentError, match=message):
        parse_answer(body)
    assert parse_answer(b'{"epoch": "ab", "version": 0, "routes": []}').cursor == "ab:0"
    with pytest.raises(AgentError, match="not JSON"):
        parse_answer(b"[" * 100_000)


# -- the edge image ------------------------------------------------------------


def _tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


@pytest.mark.e2e
@pytest.mark.timeout(900)
@pytest.mark.skipif(os.geteuid() != 0, reason="a Debian bake needs root (mmdebstrap)")
@pytest.mark.skipif(shutil.which("mmdebstrap") is None, reason="mmdebstrap not installed")
def test_edge_image_bakes_with_haproxy_python3_and_the_kiln_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("KILN_HOME", str(home))
    monkeypatch.setenv("KILN_CACHE", os.environ.get("KILN_CACHE", "/var/cache/kiln-test"))
    monkeypatch.setenv("KILN_BASE_CACHE", str(tmp_path / "bases"))
    for _ in range(3):  # other work may edit the kiln source between two bakes
        source = _tree_digest(SOURCE / "kiln")
        digest = bake_edge_image(home)
        again = bake_edge_image(home)  # cached, and reproducible
        if _tree_digest(SOURCE / "kiln") == source:
            break
    assert again == digest
    assert (home / "edge-image" / "kiln.lock").is_file()  # haproxy's version pinned

    store = ImageStore(home / "images")
    config = store.config(f"edge@{digest}")["config"]
    assert config["Entrypoint"] == ["python3", "-m", "kiln.traffic.edge"]
    assert config["User"] == "65534:65534"  # never root
    rootfs = tmp_path / "rootfs"
    unpack_image(store, f"edge@{digest}", rootfs)
    assert (rootfs / "usr/sbin/haproxy").is_file()
    staged = home / "edge-image" / "kiln"
    assert _tree_digest(rootfs / "opt/kiln/kiln") == _tree_digest(staged)
    assert (rootfs / "opt/kiln/kiln/traffic/edge.py").is_file()
    assert not list((rootfs / "opt/kiln").rglob("__pycache__"))
    st = (rootfs / "var/lib/kiln-edge").stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (65534, 65534, 0o700)
    assert not (rootfs / "run/kiln").exists()  # a tmpfs of the runtime's, not the image's
    # The image's own python3 imports the edge and its router: the stdlib it needs is in.
    env = dict(item.split("=", 1) for item in config["Env"])
    done = subprocess.run(
        [
            "chroot",
            "--userspec=65534:65534",
            str(rootfs),
            "python3",
            "-c",
            "import kiln.traffic.edge, kiln.traffic.haproxy; print('edge ok')",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and done.stdout.strip() == "edge ok", done.stderr
    version = subprocess.run(
        ["chroot", str(rootfs), "haproxy", "-v"], capture_output=True, text=True, timeout=60
    )
    assert version.stdout.startswith("HAProxy version 2.6"), version.stdout


# -- against the real agent ----------------------------------------------------


def test_edge_watches_a_real_agent_over_tls_with_a_viewer_token(tmp_path: Path) -> None:
    """The real ``kiln agent --listen``: its CA, a viewer token from ``kiln token``, its
    epoch taken back in ``after`` (held polls, no 422), a wrong token refused."""
    from kiln.agent.client import AgentClient
    from kiln.errors import KilnError

    home = tmp_path / "agent-home"
    home.mkdir(mode=0o700)
    kiln_cli = [sys.executable, "-m", "kiln.cli.main"]
    env = {k: v for k, v in os.environ.items() if k not in ("KILN_ADDR", "KILN_TOKEN")}
    env["KILN_HOME"] = str(home)
    port = free_port()
    with (home / "agent.log").open("ab") as log:
        agent = subprocess.Popen(
            [*kiln_cli, "agent", "--listen", f"127.0.0.1:{port}"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    edge: EdgeProcess | None = None
    try:

        def listening() -> bool:
            try:
                socket.create_connection(("127.0.0.1", port), 1).close()
                return (home / "tls" / "ca.pem").exists()
            except OSError:
                return False

        wait_for(listening, 30)
        made = subprocess.run(
            [*kiln_cli, "token", "create", "--role", "viewer", "--name", "edge", "--json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert made.returncode == 0, made.stderr
        (tmp_path / "edge").mkdir()
        edge = EdgeProcess(tmp_path / "edge", port, home / "tls" / "ca.pem")
        edge.token_file.write_text(json.loads(made.stdout)["token"] + "\n")
        edge.env["KILN_EDGE_WAIT"] = "1"
        edge.start()
        wait_for(lambda: edge.lines("the agent answers"), 20)
        persisted = json.loads((edge.state / "routes.json").read_text())
        assert persisted["routes"] == [] and len(persisted["epoch"]) == 16
        time.sleep(3)  # three held polls with the agent's own cursor
        assert not edge.lines("HTTP 4"), edge.text()
        assert len(edge.lines("the agent answers")) == 1
        edge.token_file.write_text("kiln_not-a-real-token\n")
        wait_for(lambda: edge.lines("refused the token (HTTP 401)"), 20)
        assert edge.stop() == 0, edge.text()
        edge.proc = None
        assert "Traceback" not in edge.text(), edge.text()
    finally:
        if edge is not None and edge.proc is not None:
            edge.stop()
        if edge is not None:
            HAProxyRouter(edge.state, RouterSettings(bind="127.0.0.1")).stop()
        with AgentClient(home, addr="") as local, contextlib.suppress(KilnError):
            if local.running():
                local.down()
        with contextlib.suppress(subprocess.TimeoutExpired):
            agent.wait(15)
        if agent.poll() is None:
            agent.kill()
            agent.wait(5)
        HAProxyRouter(home).stop()
