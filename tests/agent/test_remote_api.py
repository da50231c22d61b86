"""The agent's API over the network: a real agent started with ``--listen`` on loopback,
real TLS from the CA Kiln made in its home, real bearer tokens from ``kiln token``.

Every route of the API is tried without a token, with a wrong one, a revoked one, a
role too low and the right role; the TLS listener refuses clients that do not trust its
CA and plain HTTP; the home keeps only hashes of tokens.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from agent_harness import _free_port, kill_everything

from kiln.agent import tokens as tokens_module
from kiln.agent.api import EDGE_ROUTES, MAX_EDGE_REPORT, ROUTE_ROLES, build_app
from kiln.agent.client import AgentClient, AgentUnavailable
from kiln.agent.tls import ensure_server_certificate, home_ca
from kiln.agent.tokens import EDGE_ROLE, ROLES, TokenStore
from kiln.errors import KilnError

KILN = [sys.executable, "-m", "kiln.cli.main"]

# One request per route, with a body that passes authentication and reaches the route
# (it may then fail for its own reasons: an unknown service, an invalid plan).
ROUTE_REQUESTS: dict[tuple[str, str], tuple[str, dict[str, Any] | None]] = {
    ("GET", "/v1/health"): ("/v1/health", None),
    ("GET", "/v1/status"): ("/v1/status", None),
    ("GET", "/v1/deployments/{deployment_id}"): ("/v1/deployments/nope", None),
    ("GET", "/v1/history/{service}"): ("/v1/history/web", None),
    ("GET", "/v1/events"): ("/v1/events?limit=1", None),
    ("GET", "/v1/routes"): ("/v1/routes", None),
    ("POST", "/v1/plan"): ("/v1/plan", {"spec_path": "kiln.toml", "services": {}}),
    ("POST", "/v1/apply"): ("/v1/apply", {"plan": {"services": []}}),
    ("POST", "/v1/scale"): ("/v1/scale", {"service": "web", "replicas": 1}),
    ("POST", "/v1/rollback"): ("/v1/rollback", {"service": "web"}),
    ("POST", "/v1/restart"): ("/v1/restart", {"service": "web"}),
    ("POST", "/v1/stop"): ("/v1/stop", {"service": "web"}),
    ("POST", "/v1/start"): ("/v1/start", {"service": "web"}),
    ("POST", "/v1/promote"): ("/v1/promote", {"service": "web"}),
    ("POST", "/v1/abort"): ("/v1/abort", {"service": "web"}),
    ("POST", "/v1/exec"): ("/v1/exec", {"instance": "web-1", "argv": ["true"]}),
    ("POST", "/v1/drift"): ("/v1/drift", {"service": "web", "full": False}),
    ("POST", "/v1/burn"): ("/v1/burn", {"instance": "web-1", "keep_evidence": False}),
    ("POST", "/v1/down"): ("/v1/down", None),
    ("POST", "/v1/edge/counters"): (
        "/v1/edge/counters",
        {"edge": "node-1", "generation": "ab12", "services": {"web": {"web-1": {"requests": 1}}}},
    ),
}
ROUTES = sorted(ROUTE_REQUESTS)
ROUTES_BUT_DOWN = [r for r in ROUTES if r != ("POST", "/v1/down")]


@dataclass
class RemoteAgent:
    home: Path
    port: int
    ca: Path
    tokens: dict[str, str]
    """role → a live token of that role"""
    revoked: str
    expired: str
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def http(self, ca: Path | None = None) -> httpx.Client:
        context = ssl.create_default_context(cafile=str(ca or self.ca))
        return httpx.Client(base_url=self.url, verify=context, timeout=10.0)

    def tls_socket(self) -> ssl.SSLSocket:
        context = ssl.create_default_context(cafile=str(self.ca))
        raw = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        return context.wrap_socket(raw, server_hostname="127.0.0.1")


def _start(home: Path, extra: list[str] | None = None) -> tuple[int, subprocess.Popen[bytes]]:
    port = _free_port()
    env = dict(os.environ, KILN_HOME=str(home))
    env.pop("KILN_ADDR", None)
    log = open(home / "agent.log", "ab")  # noqa: SIM115 (the agent owns it)
    process = subprocess.Popen(
        [*KILN, "agent", "--listen", f"127.0.0.1:{port}", *(extra or [])],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    log.close()
    local = AgentClient(home, addr="")
    try:
        deadline = time.monotonic() + 20
        while not local.running():
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError((home / "agent.log").read_text())
            time.sleep(0.1)
        deadline = time.monotonic() + 10
        while True:  # the TLS listener starts right after the socket
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            assert time.monotonic() < deadline, (home / "agent.log").read_text()
            time.sleep(0.05)
    finally:
        local.close()
    return port, process


def _stop(home: Path, process: subprocess.Popen[bytes]) -> None:
    try:
        with AgentClient(home, addr="") as local, contextlib.suppress(KilnError):
            if local.running():
                local.down()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)
        kill_everything(home)


def _home(path: Path) -> Path:
    home = path / "home"
    home.mkdir(mode=0o700, parents=True)
    return home


@pytest.fixture(scope="module")
def remote(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RemoteAgent]:
    home = _home(tmp_path_factory.mktemp("remote"))
    store = TokenStore(home)
    tokens = {role: store.create(role, f"test {role}")[1] for role in (*ROLES, EDGE_ROLE)}
    revoked_record, revoked = store.create("admin", "revoked later")
    expired = store.create("admin", "expires at once", expires_in=0.5)[1]
    port, process = _start(home)
    try:
        store.revoke(revoked_record.id)  # revoked while the agent runs: no restart needed
        while store.check(expired) is not None:  # expires while the agent runs
            time.sleep(0.05)
        yield RemoteAgent(home, port, home_ca(home), tokens, revoked, expired, process)
    finally:
        _stop(home, process)


def _call(client: httpx.Client, route: tuple[str, str], token: str | None) -> httpx.Response:
    path, body = ROUTE_REQUESTS[route]
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return client.request(route[0], path, json=body, headers=headers)


def test_every_route_has_a_role_and_a_request_here() -> None:
    """A route added without a role would be refused to everyone (and fail here)."""
    app = build_app(None)  # type: ignore[arg-type]
    declared = {
        (method, getattr(route, "path", ""))
        for route in app.routes
        for method in getattr(route, "methods", ()) or ()
        if method != "HEAD"
    }
    assert declared == set(ROUTE_ROLES) == set(ROUTE_REQUESTS)
    assert set(ROUTE_ROLES.values()) == set(ROLES)


@pytest.mark.parametrize("route", ROUTES, ids=lambda r: f"{r[0]} {r[1]}")
def test_every_route_refuses_missing_wrong_and_revoked_tokens(
    remote: RemoteAgent, route: tuple[str, str]
) -> None:
    forged = "kiln_" + "A" * 43  # the right shape, never issued
    with remote.http() as client:
        for token in (None, forged, remote.revoked, remote.expired, "not-a-token", forged[:-1]):
            resp = _call(client, route, token)
            assert resp.status_code == 401, (token, resp.text)
            assert resp.headers["www-authenticate"].startswith("Bearer")
            expired = token == remote.expired
            assert ("expired" in resp.json()["detail"]) is expired, resp.text
        # Another scheme, or the right token twice, is no bearer token either.
        path, body = ROUTE_REQUESTS[route]
        for header in ("Basic YWRtaW46YWRtaW4=", "Bearer", remote.tokens["admin"]):
            other = client.request(route[0], path, json=body, headers={"Authorization": header})
            assert other.status_code == 401, header
        twice = client.request(
            route[0],
            path,
            json=body,
            headers=[("Authorization", f"Bearer {remote.tokens['admin']}")] * 2,
        )
        assert twice.status_code == 401


@pytest.mark.parametrize("route", ROUTES, ids=lambda r: f"{r[0]} {r[1]}")
def test_every_route_refuses_a_role_too_low(remote: RemoteAgent, route: tuple[str, str]) -> None:
    needed = ROLES.index(ROUTE_ROLES[route])
    lower = ROLES[:needed]
    if not lower:
        assert ROUTE_ROLES[route] == "viewer"  # nothing is below viewer
        return
    with remote.http() as client:
        for role in lower:
            resp = _call(client, route, remote.tokens[role])
            assert resp.status_code == 403, (role, resp.text)
            assert ROUTE_ROLES[route] in resp.json()["detail"]
    assert AgentClient(remote.home, addr="").running()  # no refused `down` went through


@pytest.mark.parametrize("route", ROUTES_BUT_DOWN, ids=lambda r: f"{r[0]} {r[1]}")
def test_every_route_serves_its_role_and_those_above(
    remote: RemoteAgent, route: tuple[str, str]
) -> None:
    needed = ROLES.index(ROUTE_ROLES[route])
    with remote.http() as client:
        for role in ROLES[needed:]:
            resp = _call(client, route, remote.tokens[role])
            assert resp.status_code not in (401, 403), (role, resp.text)
            assert resp.status_code < 500, resp.text
            # The route itself answered (JSON from the API, not a refusal).
            assert "detail" not in resp.json() or "token" not in resp.json()["detail"]
    if route[0] == "GET" and route[1] in ("/v1/health", "/v1/status", "/v1/events", "/v1/routes"):
        assert resp.status_code == 200


@pytest.mark.parametrize("route", ROUTES, ids=lambda r: f"{r[0]} {r[1]}")
def test_an_edge_token_may_read_routes_and_post_counters_and_nothing_else(
    remote: RemoteAgent, route: tuple[str, str]
) -> None:
    """The edge role is outside viewer < deployer < admin: not even status or events."""
    with remote.http() as client:
        resp = _call(client, route, remote.tokens[EDGE_ROLE])
        if route in EDGE_ROUTES:
            assert resp.status_code == 200, resp.text
        else:
            assert resp.status_code == 403, resp.text
            assert f"({EDGE_ROLE}) may not use this route" in resp.json()["detail"]
    assert AgentClient(remote.home, addr="").running()


def _post_counters(
    client: httpx.Client, token: str, body: Any = None, **kwargs: Any
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}", **kwargs.pop("headers", {})}
    if body is not None:
        kwargs["json"] = body
    return client.post("/v1/edge/counters", headers=headers, **kwargs)


def test_counters_from_a_viewer_or_deployer_are_refused_naming_the_roles(
    remote: RemoteAgent,
) -> None:
    _, body = ROUTE_REQUESTS[("POST", "/v1/edge/counters")]
    with remote.http() as client:
        for role in ("viewer", "deployer"):
            resp = _post_counters(client, remote.tokens[role], body)
            assert resp.status_code == 403, resp.text
            assert resp.json()["detail"].endswith("it needs admin or edge")
        ok = _post_counters(client, remote.tokens["admin"], body)
        # No canary runs here: a well-formed report is taken and its service ignored.
        assert ok.status_code == 200 and ok.json() == {"counted": [], "ignored": ["web"]}


def _report(**backend: Any) -> dict[str, Any]:
    return {"edge": "node-1", "generation": "ab", "services": {"web": {"web-1": backend}}}


HOSTILE_REPORTS: list[tuple[str, Any, str]] = [
    ("negative", _report(requests=-1), "services.web.web-1.requests"),
    ("a float", _report(requests=1.5), "services.web.web-1.requests"),
    ("a huge count", _report(requests=2**64), "services.web.web-1.requests"),
    ("a string count", _report(requests="5"), "services.web.web-1.requests"),
    ("a bool count", _report(requests=True), "services.web.web-1.requests"),
    ("an unknown field", _report(requests=1, evil=1), "services.web.web-1.evil"),
    ("an unknown class", _report(requests=1, responses={"6xx": 1}), "services.web.web-1.responses"),
    ("a latency bucket", _report(requests=1, latency={"-5": 1}), "services.web.web-1.latency"),
    ("an odd bucket", _report(requests=1, latency={"101": 1}), "services.web.web-1.latency"),
    (
        "a service name",
        {"edge": "n", "generation": "ab", "services": {"web\nx": {}}},
        "services",
    ),
    (
        "a backend name",
        {"edge": "n", "generation": "ab", "services": {"web": {"../x": {"requests": 1}}}},
        "services.web",
    ),
    ("an edge name", {"edge": "a b", "generation": "ab", "services": {}}, "edge"),
    ("a generation", {"edge": "n", "generation": "XYZ", "services": {}}, "generation"),
    ("no edge", {"generation": "ab", "services": {}}, "edge"),
    ("a list", [1, 2], "body"),
]


@pytest.mark.parametrize(
    ("body", "names"),
    [(b, n) for _, b, n in HOSTILE_REPORTS],
    ids=[i for i, _, _ in HOSTILE_REPORTS],
)
def test_hostile_counter_reports_are_refused_naming_the_key(
    remote: RemoteAgent, body: Any, names: str
) -> None:
    with remote.http() as client:
        resp = _post_counters(client, remote.tokens[EDGE_ROLE], body)
    assert resp.status_code == 400, resp.text
    assert resp.json()["detail"].startswith(names), resp.text


def test_counter_reports_that_are_not_json_nan_or_too_large_are_refused(
    remote: RemoteAgent,
) -> None:
    edge = remote.tokens[EDGE_ROLE]
    headers = {"Content-Type": "application/json"}
    with remote.http() as client:
        nan = b'{"edge": "n", "generation": "ab", "services": {"web": {"b": {"requests": NaN}}}}'
        resp = _post_counters(client, edge, content=nan, headers=headers)
        assert resp.status_code == 400, resp.text
        assert _post_counters(client, edge, content=b"{", headers=headers).status_code == 400
        # Declared too large: refused before a byte of it is read.
        huge = b" " * (MAX_EDGE_REPORT + 1)
        resp = _post_counters(client, edge, content=huge, headers=headers)
        assert resp.status_code == 413, resp.text

        # No length declared (chunked): refused as soon as it passes the bound.
        def chunks() -> Iterator[bytes]:
            yield b'{"edge": "n", "generation": "ab", "services": {"web": {"b": {"requests": 1'
            for _ in range(MAX_EDGE_REPORT // 65536 + 2):
                yield b" " * 65536

        resp = _post_counters(client, edge, content=chunks(), headers=headers)
        assert resp.status_code == 413, resp.text
        # The agent lives and still takes a good report.
        ok = _post_counters(client, edge, ROUTE_REQUESTS[("POST", "/v1/edge/counters")][1])
        assert ok.status_code == 200, ok.text


def test_events_follow_stream_needs_a_viewer_token(remote: RemoteAgent) -> None:
    with remote.http() as client:
        params = {"after": 0, "follow": 1}
        no_token = client.get("/v1/events", params=params)
        assert no_token.status_code == 401
        headers = {"Authorization": f"Bearer {remote.tokens['viewer']}"}
        with client.stream(
            "GET", "/v1/events", params=params, headers=headers, timeout=httpx.Timeout(10.0)
        ) as resp:
            assert resp.status_code == 200
            first = json.loads(next(resp.iter_lines()))
            assert first["id"] == 1 and first["kind"]


def test_unknown_paths_need_a_token_too(remote: RemoteAgent) -> None:
    """Without a token nothing about the API is revealed, not even which paths exist."""
    with remote.http() as client:
        assert client.get("/v1/nope").status_code == 401
        assert client.get("/docs").status_code == 401
        ok = client.get("/v1/nope", headers={"Authorization": f"Bearer {remote.tokens['admin']}"})
        assert ok.status_code == 404


def test_client_with_the_home_ca_works_and_names_both_addresses(remote: RemoteAgent) -> None:
    for host in ("127.0.0.1", "localhost"):
        with AgentClient(
            Path("/nonexistent"),
            addr=f"https://{host}:{remote.port}",
            token=remote.tokens["viewer"],
            ca=remote.ca,
        ) as client:
            assert client.status()["services"] == {} or "services" in client.status()
            assert client.health()["pid"] == remote.process.pid


def test_client_with_another_ca_is_refused_by_verification(
    remote: RemoteAgent, tmp_path: Path
) -> None:
    other_home = _home(tmp_path)
    ensure_server_certificate(other_home, "127.0.0.1")
    other_ca = home_ca(other_home)
    assert other_ca.read_bytes() != remote.ca.read_bytes()
    verify_failed = pytest.raises(AgentUnavailable, match=r"TLS failed.*CERTIFICATE_VERIFY")
    admin = remote.tokens["admin"]
    with AgentClient(other_home, addr=remote.url, token=admin, ca=other_ca) as c, verify_failed:
        c.status()
    with pytest.raises(httpx.ConnectError), remote.http(ca=other_ca) as raw:
        raw.get("/v1/health")
    # And no CA at all (the system's store) does not trust Kiln's own CA either.
    with pytest.raises(httpx.ConnectError), httpx.Client(verify=True) as system:
        system.get(f"{remote.url}/v1/health")


def test_plain_http_to_the_tls_port_gets_no_answer(remote: RemoteAgent) -> None:
    """A request in clear (token included) is never served: the listener speaks only TLS."""
    token = remote.tokens["admin"].encode()
    with socket.create_connection(("127.0.0.1", remote.port), timeout=10) as sock:
        sock.sendall(
            b"GET /v1/status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Authorization: Bearer " + token + b"\r\n\r\n"
        )
        answer = b""
        with contextlib.suppress(OSError):
            while chunk := sock.recv(65536):
                answer += chunk
    assert b"services" not in answer and not answer.startswith(b"HTTP/1.1 2")
    with httpx.Client(timeout=5.0) as plain, pytest.raises(httpx.HTTPError):
        plain.get(f"http://127.0.0.1:{remote.port}/v1/health")


def test_client_refuses_plain_http_and_a_missing_token(remote: RemoteAgent) -> None:
    for addr, token, message in (
        (f"http://127.0.0.1:{remote.port}", "x", "must be https"),
        (remote.url, "", "KILN_TOKEN is not"),
        (remote.url, "bad\ntoken", "not a token"),
    ):
        with (
            AgentClient(remote.home, addr=addr, token=token) as c,
            pytest.raises(KilnError, match=message),
        ):
            c.status()


def test_the_home_keeps_only_hashes_and_private_keys_stay_private(remote: RemoteAgent) -> None:
    path = remote.home / "tokens.json"
    assert path.stat().st_mode & 0o777 == 0o600
    text = path.read_text()
    for token in [*remote.tokens.values(), remote.revoked, remote.expired]:
        assert token not in text
        assert token[len("kiln_") :] not in text
    records = json.loads(text)["tokens"]
    assert len(records) == len(remote.tokens) + 2
    assert sum(r["revoked"] is not None for r in records) == 1
    tls = remote.home / "tls"
    assert tls.stat().st_mode & 0o777 == 0o700
    for name in ("ca-key.pem", "server-key.pem"):
        assert (tls / name).stat().st_mode & 0o777 == 0o600


def test_cli_status_against_a_remote_agent(remote: RemoteAgent, tmp_path: Path) -> None:
    """The CLI on another "machine" (another home, no socket) reaches the agent with
    KILN_ADDR, KILN_TOKEN and KILN_CA."""
    elsewhere = _home(tmp_path)
    env = dict(
        os.environ,
        KILN_HOME=str(elsewhere),
        KILN_ADDR=remote.url,
        KILN_TOKEN=remote.tokens["viewer"],
        KILN_CA=str(remote.ca),
    )
    ok = subprocess.run([*KILN, "status", "--json"], env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "services" in json.loads(ok.stdout)
    low = subprocess.run([*KILN, "down"], env=env, capture_output=True, text=True)
    assert low.returncode == 1
    assert low.stderr.strip().splitlines() == [
        f"error: token {_id_of(remote, 'viewer')} (viewer) may not use this route; it needs admin"
    ]
    env["KILN_TOKEN"] = remote.revoked
    refused = subprocess.run([*KILN, "status"], env=env, capture_output=True, text=True)
    assert refused.returncode == 1
    assert refused.stderr.strip() == "error: a valid bearer token is required"
    env.pop("KILN_CA")  # the home elsewhere has no CA: the system's store does not trust it
    env["KILN_TOKEN"] = remote.tokens["viewer"]
    untrusted = subprocess.run([*KILN, "status"], env=env, capture_output=True, text=True)
    assert untrusted.returncode == 1
    assert "TLS failed" in untrusted.stderr and len(untrusted.stderr.splitlines()) == 1
    assert AgentClient(remote.home, addr="").running()


def _id_of(remote: RemoteAgent, role: str) -> str:
    store = TokenStore(remote.home)
    found = store.check(remote.tokens[role])
    assert found is not None
    return found.id


def test_huge_authorization_header_is_refused_and_the_agent_lives(remote: RemoteAgent) -> None:
    huge = "Bearer kiln_" + "A" * 1_000_000
    with remote.http() as client:
        with contextlib.suppress(httpx.HTTPError):  # the server may just close
            resp = client.get("/v1/status", headers={"Authorization": huge})
            assert resp.status_code in (400, 401, 413, 431)
        # Just over the token bound, but a header the server parses: refused unhashed.
        long = "kiln_" + "A" * 200
        assert _call(client, ("GET", "/v1/status"), long).status_code == 401
        good = _call(client, ("GET", "/v1/status"), remote.tokens["viewer"])
        assert good.status_code == 200


@pytest.mark.parametrize("junk", [b"\x00", b"\n", b"\r\nX-Injected: 1", b"\xff", b"\t"])
def test_tokens_with_control_bytes_are_refused(remote: RemoteAgent, junk: bytes) -> None:
    """Raw bytes on a TLS socket (httpx refuses to send them): a valid token with a NUL,
    a line break or a non-ASCII byte is no valid token. (A line break or a tab after the
    token ends the header line or is HTTP's optional whitespace, so those two are tried
    before and inside the token.)"""
    token = remote.tokens["admin"].encode()
    values = [junk + token, token[:20] + junk + token[20:]]
    if b"\n" not in junk and junk != b"\t":
        values.append(token + junk)
    for value in values:
        with remote.tls_socket() as sock:
            sock.sendall(
                b"GET /v1/status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                b"Authorization: Bearer " + value + b"\r\n\r\n"
            )
            answer = b""
            with contextlib.suppress(OSError):
                while chunk := sock.recv(65536):
                    answer += chunk
        status = answer.split(b" ", 2)[1] if answer.startswith(b"HTTP/1.1 ") else b""
        assert status in (b"", b"400", b"401"), answer[:200]
    assert TokenStore(remote.home).check(token.decode() + "\x00") is None
    assert TokenStore(remote.home).check(token.decode() + "\n") is None


def test_check_compares_every_hash_in_constant_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = _home(tmp_path)
    store = TokenStore(home)
    first = store.create("admin")[1]
    for _ in range(4):
        store.create("viewer")
    compared: list[tuple[str, str]] = []
    constant_time = hmac.compare_digest

    def recording(a: str, b: str) -> bool:
        compared.append((a, b))
        return constant_time(a, b)

    monkeypatch.setattr(hmac, "compare_digest", recording)
    assert tokens_module.__name__ == "kiln.agent.tokens"  # it reads hmac.compare_digest at call
    record = store.check(first)
    assert record is not None and record.role == "admin"
    assert len(compared) == 5  # no early exit on the first (matching) record
    compared.clear()
    assert store.check("kiln_" + "B" * 43) is None
    assert len(compared) == 5
    assert all(len(a) == len(b) == 64 for a, b in compared)


def test_token_cli_create_list_revoke(tmp_path: Path) -> None:
    home = _home(tmp_path)
    env = dict(os.environ, KILN_HOME=str(home))

    def kiln(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*KILN, *args], env=env, capture_output=True, text=True)

    made = kiln("token", "create", "--role", "deployer", "--name", "ci", "--json")
    assert made.returncode == 0, made.stderr
    created = json.loads(made.stdout)
    assert created["token"].startswith("kiln_") and created["role"] == "deployer"
    listed = kiln("token", "list", "--json")
    assert [r["id"] for r in json.loads(listed.stdout)] == [created["id"]]
    assert created["token"] not in listed.stdout
    assert kiln("token", "revoke", created["id"]).returncode == 0
    again = kiln("token", "revoke", created["id"])
    assert again.returncode == 1 and again.stderr.strip().endswith("is already revoked")
    unknown = kiln("token", "revoke", "../../etc/passwd")
    assert unknown.returncode == 1 and "no token" in unknown.stderr
    bad_role = kiln("token", "create", "--role", "root")
    assert bad_role.returncode != 0
    # An edge run by hand gets a token of its own role (routes and counters only).
    edge = json.loads(kiln("token", "create", "--role", "edge", "--json").stdout)
    assert edge["role"] == "edge" and TokenStore(home).check(edge["token"]) is not None
    assert TokenStore(home).check(created["token"]) is None


def test_bad_listen_and_tls_options_fail_with_one_line(tmp_path: Path) -> None:
    home = _home(tmp_path)
    env = dict(os.environ, KILN_HOME=str(home))
    for args, message in (
        (["--listen", "nope"], "expected HOST:PORT"),
        (["--listen", "127.0.0.1:99999"], "expected HOST:PORT"),
        (["--listen", "127.0.0.1:1", "--tls-cert", str(home)], "go together"),
        (["--tls-cert", "a", "--tls-key", "b"], "need --listen"),
        (
            ["--listen", "127.0.0.1:1", "--tls-cert", "/dev/null", "--tls-key", "/dev/null"],
            "unusable",
        ),
    ):
        done = subprocess.run(
            [*KILN, "agent", *args], env=env, capture_output=True, text=True, timeout=30
        )
        assert done.returncode == 1, (args, done.stderr)
        assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (home / "agent.sock").exists()


def test_certificate_from_files_and_down_with_an_admin_token(tmp_path: Path) -> None:
    """An operator's own certificate is served as given; ``down`` needs admin, and with
    it the agent stops."""
    issuer = _home(tmp_path / "issuer")
    cert, key = ensure_server_certificate(issuer, "127.0.0.1")
    home = _home(tmp_path)
    admin = TokenStore(home).create("admin")[1]
    deployer = TokenStore(home).create("deployer")[1]
    port, process = _start(home, ["--tls-cert", str(cert), "--tls-key", str(key)])
    try:
        assert not (home / "tls").exists()  # no CA of its own made
        url = f"https://127.0.0.1:{port}"
        with AgentClient(home, addr=url, token=deployer, ca=home_ca(issuer)) as client:
            assert "services" in client.status()
            with pytest.raises(KilnError, match="needs admin"):
                client.down()
            assert client.running()
        with AgentClient(home, addr=url, token=admin, ca=home_ca(issuer)) as client:
            assert "stopped" in client.down()
        assert process.wait(15) == 0
    finally:
        _stop(home, process)
