"""The Swarm edge: HAProxy on every node, fed the agent's routes by a watch.

Run as ``python3 -m kiln.traffic.edge`` (a global Swarm service). It long-polls
``GET /v1/routes?after=EPOCH:VERSION&wait=S`` on the agent over verified TLS with
a viewer token, checks every answer as strictly as a ``kiln.toml`` (a hostile
answer changes nothing), and programs Kiln's own :class:`HAProxyRouter` with what
changed. While the agent cannot be reached, refuses the token or answers nonsense,
the last routes keep being served (they are also written to the state directory,
so a restarted edge serves them before the agent answers).

While the routes name services under analysis (``report_counters``: a canary runs),
the edge posts its HAProxy's counters of those services to ``POST /v1/edge/counters``
every :data:`REPORT_EVERY` seconds, and once more when a service leaves the list: the
agent judges the canary from every node's counters. Otherwise it posts nothing.

Only the standard library and Kiln's stdlib-only modules are imported: the edge
image holds Debian's python3 and a copy of the kiln source, nothing from PyPI.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import os
import re
import secrets
import select
import signal
import socket
import ssl
import stat
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

from kiln.errors import KilnError
from kiln.paths import private_dirs, write_private
from kiln.traffic.haproxy import HAProxyRouter, RouterSettings
from kiln.traffic.router import BackendCounters, Router
from kiln.traffic.routes import Route, RouteError

__all__ = [
    "REPORT_EVERY",
    "AgentError",
    "Edge",
    "EdgeSettings",
    "RouteSet",
    "counters_report",
    "fetch_routes",
    "main",
    "parse_answer",
]

log = logging.getLogger("kiln.edge")

MAX_ANSWER = 8 << 20
"""The largest answer read from the agent: a route table of thousands of backends is
far smaller, and a bigger one is a broken or hostile agent."""
MAX_WAIT = 60
RETRY_MIN = 0.2
STATE_FILE = "routes.json"
CHECK_EVERY = 10.0
_EPOCH = re.compile(r"[0-9a-f]{1,64}")
"""What the agent makes (``secrets.token_hex``) and takes back in ``after``."""
MAX_VERSION = 10**19 - 1
_TOKEN = re.compile(r"[A-Za-z0-9._~+/=-]{1,4096}")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
"""An edge's name (its node's hostname) and a service's, as routes name them."""
REPORT_EVERY = 1.0
"""Seconds between two counter reports while a service is under analysis: a failing
canary is seen by the agent within about this (its analysis reads every 0.25 s)."""
COUNTERS_PATH = "/v1/edge/counters"

ENV_AGENT = "KILN_EDGE_AGENT"
ENV_TOKEN_FILE = "KILN_EDGE_TOKEN_FILE"
ENV_CA_FILE = "KILN_EDGE_CA_FILE"
ENV_STATE = "KILN_EDGE_STATE"
ENV_BIND = "KILN_EDGE_BIND"
ENV_WAIT = "KILN_EDGE_WAIT"
ENV_RETRY_MAX = "KILN_EDGE_RETRY_MAX"
ENV_NAME = "KILN_EDGE_NAME"
ENV_NODE_ID = "KILN_EDGE_NODE_ID"
DEFAULT_TOKEN_FILE = "/run/secrets/kiln-edge-token"
DEFAULT_CA_FILE = "/run/secrets/kiln-agent-ca"
DEFAULT_STATE = "/var/lib/kiln-edge"


class AgentError(KilnError):
    """The agent could not be asked, or its answer was refused. ``kind`` names the
    state (``unreachable``, ``tls``, ``auth``, ``http-500``, ``invalid``...) so that
    a change of state is logged once, not each retry."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class EdgeSettings:
    """Where the agent is and how to trust it; read from the environment."""

    agent: str
    token_file: Path
    ca_file: Path
    state_dir: Path
    bind: str = "0.0.0.0"
    wait: int = 30
    retry_max: float = 10.0
    name: str = "edge"
    """Which edge posts counters (the node's hostname in Swarm), for ``kiln status``."""

    @property
    def host(self) -> str:
        return urlsplit(self.agent).hostname or ""

    @property
    def port(self) -> int:
        return urlsplit(self.agent).port or 443

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> EdgeSettings:
        agent = env.get(ENV_AGENT, "").strip().rstrip("/")
        if not agent:
            raise KilnError(f"{ENV_AGENT} is not set (the agent's https://HOST:PORT)")
        try:
            url = urlsplit(agent)
            url.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError:
            raise KilnError(f"{ENV_AGENT}={agent!r}: not a URL") from None
        if url.scheme != "https" or not url.hostname or url.path or url.query or url.username:
            raise KilnError(f"{ENV_AGENT}={agent!r}: expected https://HOST:PORT")
        settings = cls(
            agent=agent,
            token_file=Path(env.get(ENV_TOKEN_FILE) or DEFAULT_TOKEN_FILE),
            ca_file=Path(env.get(ENV_CA_FILE) or DEFAULT_CA_FILE),
            state_dir=Path(env.get(ENV_STATE) or DEFAULT_STATE),
            bind=env.get(ENV_BIND) or "0.0.0.0",
            wait=_number(env, ENV_WAIT, 30, 1, MAX_WAIT),
            retry_max=float(_number(env, ENV_RETRY_MAX, 10, 0.1, 300)),
            name=edge_name(env.get(ENV_NAME) or socket.gethostname(), env.get(ENV_NODE_ID, "")),
        )
        for what, path in (("token", settings.token_file), ("CA", settings.ca_file)):
            if not path.is_file():
                raise KilnError(f"{what} file {path} does not exist")
        read_token(settings.token_file)
        return settings


def edge_name(hostname: str, node_id: str = "") -> str:
    """The name the edge's reports carry: its node's hostname (the first label, in NAME's
    characters; an odd hostname must not keep the edge from serving), then the start of
    the node's Swarm ID when known, since nodes may share a hostname."""
    host = re.sub(r"[^A-Za-z0-9_-]", "-", hostname.split(".")[0])[:48].strip("-_") or "edge"
    node = re.sub(r"[^A-Za-z0-9]", "", node_id)[:12]
    name = f"{host}-{node}" if node else host
    return name if NAME.fullmatch(name) else "edge"


def _number(env: Mapping[str, str], key: str, default: float, low: float, high: float) -> Any:
    raw = env.get(key)
    if not raw:
        return default
    try:
        value = float(raw) if "." in raw else int(raw)
    except ValueError:
        raise KilnError(f"{key}={raw!r}: not a number") from None
    if not low <= value <= high:
        raise KilnError(f"{key}={raw!r}: must be {low:g}-{high:g}")
    return value


def read_token(path: Path) -> str:
    """The token goes into a header: anything but a plain token would be a new line."""
    try:
        # Non-blocking and bounded: a FIFO or /dev/zero in its place must not hang the
        # watch or fill memory (a token is at most 4 KiB, as _TOKEN says).
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as file:
            raw = file.read(8192) if stat.S_ISREG(os.fstat(fd).st_mode) else b""
        token = raw.decode().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise AgentError("token", f"token file {path}: unreadable ({e})") from None
    if not _TOKEN.fullmatch(token):
        raise AgentError("token", f"token file {path}: does not hold a token")
    return token


@dataclass(frozen=True)
class RouteSet:
    """One version of the agent's routes; ``epoch`` changes when the agent restarts."""

    epoch: str
    version: int
    routes: dict[str, Route]
    report: frozenset[str] = frozenset()
    """The services whose counters the agent asks for (a canary of each is judged)."""

    @property
    def cursor(self) -> str:
        return f"{self.epoch}:{self.version}"

    def to_json(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "version": self.version,
            "routes": [self.routes[n].to_json() for n in sorted(self.routes)],
            "report_counters": sorted(self.report),
        }


def parse_answer(body: bytes) -> RouteSet:
    """The agent's answer, checked whole: one bad route refuses all of it, so the
    edge never serves half of a table."""
    if len(body) > MAX_ANSWER:
        raise AgentError("invalid", f"answer larger than {MAX_ANSWER} bytes")
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as e:
        raise AgentError("invalid", f"answer is not JSON ({e})") from None
    if not isinstance(data, dict):
        raise AgentError("invalid", "answer is not an object")
    epoch, version, raw = data.get("epoch"), data.get("version"), data.get("routes")
    if not isinstance(epoch, str) or not _EPOCH.fullmatch(epoch):
        raise AgentError("invalid", f"epoch must match {_EPOCH.pattern}")
    if isinstance(version, bool) or not isinstance(version, int) or not 0 <= version <= MAX_VERSION:
        raise AgentError("invalid", "version must be a whole number")
    if not isinstance(raw, list):
        raise AgentError("invalid", "routes must be a list")
    routes: dict[str, Route] = {}
    ports: dict[int, str] = {}
    for i, item in enumerate(raw):
        try:
            route = Route.from_json(item)
        except (RouteError, ValueError, TypeError) as e:
            raise AgentError("invalid", f"routes[{i}]: {e}") from None
        if route.name in routes:
            raise AgentError("invalid", f"routes[{i}]: service {route.name!r} twice")
        if route.listen in ports:
            raise AgentError(
                "invalid", f"routes[{i}]: port {route.listen} also serves {ports[route.listen]!r}"
            )
        routes[route.name] = route
        ports[route.listen] = route.name
    # Absent from an older agent's answer: nothing to report.
    report = data.get("report_counters", [])
    if not isinstance(report, list) or not all(
        isinstance(n, str) and NAME.fullmatch(n) for n in report
    ):
        raise AgentError("invalid", "report_counters must be a list of service names")
    return RouteSet(epoch, version, routes, frozenset(report))


def counters_report(
    edge: str, generation: str, services: dict[str, dict[str, BackendCounters]]
) -> dict[str, Any]:
    """The body of ``POST /v1/edge/counters``: per service and backend the counts that
    only grow, latency as its histogram (buckets in ms), so the agent can add them up."""
    return {
        "edge": edge,
        "generation": generation,
        "services": {
            service: {
                bid: {
                    "requests": b.requests,
                    "responses": dict(b.responses),
                    "errors": b.errors,
                    "active": b.active,
                    "latency": {str(ms): n for ms, n in sorted(b.latency.counts.items())},
                }
                for bid, b in sorted(backends.items())
            }
            for service, backends in sorted(services.items())
        },
    }


@contextlib.contextmanager
def _agent_connection(
    settings: EdgeSettings, timeout: float
) -> Iterator[tuple[http.client.HTTPSConnection, str]]:
    """A TLS connection to the agent (trusting only its CA) and the edge's token; what
    goes wrong on it is an ``AgentError`` that says what: TLS, or unreachable."""
    token = read_token(settings.token_file)
    try:
        context = ssl.create_default_context(cafile=str(settings.ca_file))
    except (OSError, ssl.SSLError) as e:
        raise AgentError("tls", f"CA file {settings.ca_file}: unusable ({e})") from None
    conn = http.client.HTTPSConnection(
        settings.host, settings.port, context=context, timeout=timeout
    )
    try:
        yield conn, token
    except ssl.SSLCertVerificationError as e:
        raise AgentError(
            "tls", f"the agent's certificate is not trusted ({e.verify_message})"
        ) from None
    except (OSError, http.client.HTTPException) as e:
        raise AgentError(
            "unreachable", f"the agent is unreachable ({e or type(e).__name__})"
        ) from None
    finally:
        conn.close()


def post_counters(settings: EdgeSettings, body: dict[str, Any]) -> None:
    """One report to the agent; an ``AgentError`` when it was not taken."""
    with _agent_connection(settings, 10) as (conn, token):
        conn.request(
            "POST",
            COUNTERS_PATH,
            body=json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )
        resp = conn.getresponse()
        detail = resp.read(4096).decode(errors="replace")
        if resp.status in (401, 403):
            raise AgentError(
                "auth", f"the agent refused the counters (HTTP {resp.status}: {detail})"
            )
        if resp.status != 200:
            raise AgentError(f"http-{resp.status}", f"the agent answered HTTP {resp.status}")


def fetch_routes(settings: EdgeSettings, after: RouteSet | None) -> RouteSet:
    """One long poll: the agent's routes once they differ from ``after`` (or at once)."""
    query = {"wait": str(settings.wait)}
    if after is not None:
        query["after"] = after.cursor
    with _agent_connection(settings, settings.wait + 15) as (conn, token):
        conn.request(
            "GET",
            f"/v1/routes?{urlencode(query)}",
            headers={"Authorization": f"Bearer {token}", "Accept": "application/json"},
        )
        resp = conn.getresponse()
        if resp.status in (401, 403):
            raise AgentError("auth", f"the agent refused the token (HTTP {resp.status})")
        if resp.status != 200:
            raise AgentError(f"http-{resp.status}", f"the agent answered HTTP {resp.status}")
        length = resp.getheader("Content-Length")
        if length is not None and (not length.isdigit() or int(length) > MAX_ANSWER):
            raise AgentError("invalid", f"answer of {length} bytes refused (max {MAX_ANSWER})")
        body = resp.read(MAX_ANSWER + 1)
    return parse_answer(body)


def load_state(state_dir: Path) -> RouteSet | None:
    path = state_dir / STATE_FILE
    try:
        return parse_answer(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, AgentError) as e:
        log.warning("ignoring %s: %s", path, e)
        return None


def save_state(state_dir: Path, routes: RouteSet) -> None:
    write_private(state_dir / STATE_FILE, json.dumps(routes.to_json(), indent=1).encode())


class Edge:
    """The watch (a thread) hands each accepted ``RouteSet`` to the main loop, which
    programs the router, retries what failed and keeps HAProxy alive."""

    def __init__(self, settings: EdgeSettings, router: Router | None = None) -> None:
        self.settings = settings
        self.router: Router = router or HAProxyRouter(
            settings.state_dir, RouterSettings(bind=settings.bind)
        )
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._received: RouteSet | None = None
        self._wake = threading.Event()
        self._agent_state = ""
        self.generation = secrets.token_hex(8)
        """New per process: the agent sees a restarted edge's counts begin again."""
        self._report_wake = threading.Event()
        self._report_state = ""

    def request_stop(self) -> None:
        """From a signal handler: the main loop stops HAProxy gracefully and returns."""
        self.stopping.set()
        self._wake.set()
        self._report_wake.set()

    # -- the watch (its own thread) --------------------------------------

    def _watch(self) -> None:
        backoff = RETRY_MIN
        while not self.stopping.is_set():
            with self._lock:
                after = self._received
            try:
                answer = fetch_routes(self.settings, after)
            except AgentError as e:
                served = len(after.routes) if after is not None else 0
                self._agent(e.kind, f"{e}; serving the last {served} routes, retrying")
                self.stopping.wait(backoff)
                backoff = min(backoff * 2, self.settings.retry_max)
                continue
            backoff = RETRY_MIN
            self._agent("ok", f"the agent answers: routes {answer.cursor}")
            if after is not None and answer == after:
                continue
            with self._lock:
                self._received = answer
            self._wake.set()
            if after is None or answer.report != after.report:
                self._report_wake.set()

    # -- the counter reports (their own thread) ------------------------------

    def _report(self) -> None:
        """Idle (no wake-up at all) while no service is under analysis; else a report
        every ``REPORT_EVERY`` seconds, and a last one for a service that left the list."""
        last: frozenset[str] = frozenset()
        while not self.stopping.is_set():
            with self._lock:
                wanted = self._received.report if self._received is not None else frozenset()
            if not wanted and not last:
                self._report_wake.wait()
                self._report_wake.clear()
                continue
            self._report_once(wanted | last)
            last = wanted
            if wanted:
                self._report_wake.wait(REPORT_EVERY)
                self._report_wake.clear()

    def _report_once(self, services: frozenset[str]) -> None:
        try:
            counters = self.router.counters()
        except KilnError as e:
            self._reported("counters", f"reading haproxy's counters failed: {e}")
            return
        picked = {s: counters[s].backends for s in sorted(services) if s in counters}
        body = counters_report(self.settings.name, self.generation, picked)
        try:
            post_counters(self.settings, body)
        except AgentError as e:
            self._reported(e.kind, f"counters of {', '.join(sorted(services))} not taken: {e}")
            return
        self._reported("ok", f"reporting the counters of {', '.join(sorted(services))}")

    def _reported(self, state: str, message: str) -> None:
        """One line per change of the reports' state, none per report."""
        if state != self._report_state:
            self._report_state = state
            (log.info if state == "ok" else log.warning)("%s", message)

    def _agent(self, state: str, message: str) -> None:
        """One line per change of the agent's state, none per retry."""
        if state != self._agent_state:
            self._agent_state = state
            (log.info if state == "ok" else log.warning)("%s", message)

    # -- the main loop ---------------------------------------------------

    def run(self) -> None:
        private_dirs(self.settings.state_dir)
        how = self.router.start()
        persisted = load_state(self.settings.state_dir)
        if persisted is not None:
            log.info(
                "haproxy %s; serving %d persisted routes (%s) until the agent answers",
                how,
                len(persisted.routes),
                persisted.cursor,
            )
            with self._lock:
                self._received = persisted
        else:
            log.info("haproxy %s; no routes yet, asking %s", how, self.settings.agent)
        watcher = threading.Thread(target=self._watch, name="edge-watch", daemon=True)
        watcher.start()
        reporter = threading.Thread(target=self._report, name="edge-report", daemon=True)
        reporter.start()
        applied: RouteSet | None = None
        failing = ""
        retry_at = 0.0
        backoff = RETRY_MIN
        next_check = time.monotonic() + CHECK_EVERY
        try:
            while not self.stopping.is_set():
                with self._lock:
                    wanted = self._received
                now = time.monotonic()
                if wanted is not None and (wanted != applied or (failing and now >= retry_at)):
                    problems = self._reconcile(wanted)
                    if wanted != applied:
                        save_state(self.settings.state_dir, wanted)
                    applied = wanted
                    text = "; ".join(problems)
                    if text != failing:
                        if text:
                            log.warning("routes %s not all served: %s", wanted.cursor, text)
                        else:
                            log.info(
                                "routes %s served (%d services)", wanted.cursor, len(wanted.routes)
                            )
                        failing = text
                    backoff = (
                        RETRY_MIN if not problems else min(backoff * 2, self.settings.retry_max)
                    )
                    retry_at = time.monotonic() + backoff
                self._supervise(next_check)
                if time.monotonic() >= next_check:
                    next_check = time.monotonic() + CHECK_EVERY
                self._wake.wait(0.5)
                self._wake.clear()
        finally:
            self.stopping.set()
            self.router.stop()

    def _reconcile(self, wanted: RouteSet) -> list[str]:
        """Remove what went away, then apply each route; a route that cannot take its
        port yet (another one still holds it) is tried again in the same pass."""
        served = self.router.routes()
        problems: dict[str, str] = {}
        for name in sorted(set(served) - set(wanted.routes)):
            try:
                self.router.remove(name)
                log.info("removed %s", name)
            except KilnError as e:
                problems[name] = str(e)
        pending = [wanted.routes[n] for n in sorted(wanted.routes)]
        while pending:
            left = []
            for route in pending:
                try:
                    if self.router.apply(route):
                        log.info("applied %s (%d backends)", route.name, len(route.backends))
                    problems.pop(route.name, None)
                except KilnError as e:
                    problems[route.name] = str(e)
                    left.append(route)
            if len(left) == len(pending):
                break
            pending = left
        return [f"{name}: {text}" for name, text in sorted(problems.items())]

    def _supervise(self, next_check: float) -> None:
        """A HAProxy that exited is restarted at once, one that stopped answering at the
        next check; both on the same sockets, with every route."""
        fd = self.router.exit_fd()
        exited = fd is not None and bool(select.select([fd], [], [], 0)[0])
        try:
            if exited:
                self.router.restart("haproxy exited")
            elif time.monotonic() >= next_check:
                problems = self.router.check()
                if problems:
                    self.router.restart("; ".join(problems))
        except KilnError as e:
            log.warning("restarting haproxy failed: %s", e)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s kiln-edge %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    if argv is None:
        argv = sys.argv[1:]
    if argv:
        print(
            f"usage: python3 -m kiln.traffic.edge (settings from {ENV_AGENT}, {ENV_TOKEN_FILE}, "
            f"{ENV_CA_FILE}, {ENV_STATE}, {ENV_BIND}, {ENV_WAIT}, {ENV_RETRY_MAX}, {ENV_NAME}, "
            f"{ENV_NODE_ID})",
            file=sys.stderr,
        )
        return 0 if argv[0] in ("-h", "--help") else 2
    try:
        settings = EdgeSettings.from_env(os.environ)
    except KilnError as e:
        print(f"kiln-edge: {e}", file=sys.stderr)
        return 2
    edge = Edge(settings)

    signal.signal(signal.SIGTERM, lambda signum, frame: edge.request_stop())
    signal.signal(signal.SIGINT, lambda signum, frame: edge.request_stop())
    try:
        edge.run()
    except KilnError as e:
        log.error("%s", e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
