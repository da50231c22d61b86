"""The one way the CLI talks to the agent: HTTP+JSON over ``KILN_HOME/agent.sock``,
or over TLS to a remote agent (``KILN_ADDR=https://HOST:PORT`` with ``KILN_TOKEN``, the
CA in ``KILN_CA`` or the home's own; or a context, :mod:`kiln.agent.contexts`).

httpx is imported on first use so that ``kiln --version`` stays fast.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Generator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.errors import KilnError
from kiln.paths import ensure_home, open_private

if TYPE_CHECKING:
    import httpx

    from kiln.runtime.select import RuntimeChoice

__all__ = ["AgentClient", "AgentUnavailable", "agent_command", "start_background"]

SOCKET_NAME = "agent.sock"
LOG_NAME = "agent.log"
AGENT_GONE = 30.0
"""How long a follower waits for a stopped agent to come back before giving up."""
FOLLOW_IDLE = 6.0
"""A follower reconnects after this long without an event (the agent sends none while
idle), which is when it also checks its deadline."""


class AgentUnavailable(KilnError):
    """No agent answers on the socket of this KILN_HOME."""


def agent_command(home: Path, runtime: RuntimeChoice | None = None) -> list[str]:
    """The detached agent process: ``kiln agent`` for this home, without relying on PATH."""
    argv = [sys.executable, "-m", "kiln.agent", "--home", str(home)]
    if runtime is not None:
        argv += ["--runtime", runtime.kind]
        if runtime.host:
            argv += ["--runtime-host", runtime.host]
        if runtime.registry:
            argv += ["--runtime-registry", json.dumps(runtime.registry.to_json())]
        if runtime.nodes:
            argv += ["--runtime-nodes", json.dumps(dict(runtime.nodes))]
    return argv


class AgentClient:
    """A method per API endpoint; every failure is a KilnError with the agent's message.

    ``addr`` (default ``KILN_ADDR``, else the context of ``KILN_CONTEXT`` or the current
    one) targets a remote agent over HTTPS; ``token`` (default ``KILN_TOKEN``, else the
    context's) and ``ca`` (default ``KILN_CA``, else the context's, else
    ``KILN_HOME/tls/ca.pem`` when it exists, else the system's CAs) go with it.
    ``addr=""`` forces the home's socket."""

    def __init__(
        self,
        home: Path,
        timeout: float = 30.0,
        addr: str | None = None,
        token: str | None = None,
        ca: Path | None = None,
    ) -> None:
        self.home = Path(home)
        self.socket = self.home / SOCKET_NAME
        self.timeout = timeout
        from kiln.agent.contexts import resolve_target

        target = resolve_target() if addr is None else None
        env_ca = os.environ.get("KILN_CA")
        self.addr = target.addr if target is not None else (addr or None)
        self.source = target.source if target is not None else "KILN_ADDR"
        """Where the address came from, for messages: ``KILN_ADDR`` or ``context NAME``."""
        if token is None:
            token = target.token if target is not None else os.environ.get("KILN_TOKEN")
        self.token = token
        if ca is None:
            ca = target.ca if target is not None else Path(env_ca) if env_ca else None
        self.ca = ca
        self.where = self.addr or str(self.socket)
        self._http: httpx.Client | None = None

    def _client(self) -> httpx.Client:
        if self._http is None:
            import httpx

            if self.addr is None:
                self._http = httpx.Client(
                    transport=httpx.HTTPTransport(uds=str(self.socket)),
                    base_url="http://kiln-agent",
                    timeout=self.timeout,
                )
            else:
                self._http = self._remote_client()
        return self._http

    def _remote_client(self) -> httpx.Client:
        """HTTPS only, the certificate always verified: a bearer token never travels in
        clear, nor to an agent that is not the one meant."""
        import ssl

        import httpx

        addr = str(self.addr)
        if not addr.startswith("https://"):
            raise KilnError(f"{self.source} {addr!r}: must be https://HOST:PORT")
        if not self.token:
            raise KilnError("KILN_ADDR is set but KILN_TOKEN is not: `kiln token create` makes one")
        if not self.token.isascii() or not self.token.isprintable():
            raise KilnError(f"the token for {self.source}: not a token (printable ASCII only)")
        from kiln.agent.tls import home_ca

        ca = self.ca or (home_ca(self.home) if home_ca(self.home).is_file() else None)
        try:
            context = ssl.create_default_context(cafile=str(ca) if ca else None)
        except (OSError, ssl.SSLError) as e:
            raise KilnError(f"CA file {ca}: unusable ({e})") from None
        return httpx.Client(
            base_url=addr.rstrip("/"),
            verify=context,
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=self.timeout,
        )

    def close(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        params: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> Any:
        import httpx

        try:
            resp = self._client().request(
                method,
                path,
                json=body,
                params=params,
                timeout=timeout if timeout is not None else self.timeout,
            )
        except (
            httpx.ConnectError,
            httpx.ReadError,
            httpx.RemoteProtocolError,
            FileNotFoundError,
            ConnectionRefusedError,
        ) as e:
            raise AgentUnavailable(_unavailable(self.where, self.addr, self.source, e)) from e
        except httpx.TimeoutException as e:
            raise KilnError(f"agent at {self.where}: {method} {path} timed out") from e
        except httpx.HTTPError as e:
            raise KilnError(f"agent at {self.where}: {method} {path}: {e}") from e
        return _decode(resp, method, path)

    def running(self) -> bool:
        try:
            self._request("GET", "/v1/health", timeout=2.0)
        except KilnError:
            return False
        return True

    def health(self) -> dict[str, Any]:
        return dict(self._request("GET", "/v1/health"))

    def status(self) -> dict[str, Any]:
        return dict(self._request("GET", "/v1/status"))

    def plan(
        self,
        *,
        spec_path: str,
        environment: str | None,
        spec_text: str,
        git_commit: str | None,
        digests: dict[str, str],
        services: dict[str, Any],
        project: str | None = None,
        runtime: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Returns ``{"plan": <plan JSON>, "text": <rendered plan>}``."""
        body = {
            "runtime": runtime,
            "project": project,
            "spec_path": spec_path,
            "environment": environment,
            "spec_text": spec_text,
            "git_commit": git_commit,
            "digests": digests,
            "services": services,
        }
        return dict(self._request("POST", "/v1/plan", body))

    def apply(self, plan: dict[str, Any]) -> dict[str, Any]:
        """Returns ``{"deployment": <id>, "services": [...]}``; 409 → KilnError (stale plan)."""
        return dict(self._request("POST", "/v1/apply", {"plan": plan}))

    def deployment(self, deployment_id: str) -> dict[str, Any]:
        return dict(self._request("GET", f"/v1/deployments/{deployment_id}"))

    def wait_deployment(self, deployment_id: str, timeout: float = 600.0) -> dict[str, Any]:
        """Until the deployment leaves ``running``; returns its final record."""
        return self.follow_deployment(deployment_id, timeout=timeout)

    def follow_deployment(
        self,
        deployment_id: str,
        after: int | None = None,
        on_event: Callable[[dict[str, Any]], None] | None = None,
        timeout: float = 600.0,
        on_idle: Callable[[], None] | None = None,
        idle: float = FOLLOW_IDLE,
    ) -> dict[str, Any]:
        """The one way to follow a deployment: every event after ``after`` (default: now)
        goes to ``on_event`` as it happens, until the agent says the deployment finished;
        returns its final record. Woken by the event stream, not by polling; an agent
        restarted meanwhile is waited for and followed again from the same event.
        ``on_idle`` is called after each ``idle`` seconds without an event (to say what
        the deployment waits for)."""
        deadline = time.monotonic() + timeout
        cursor = self.last_event_id() if after is None else after
        gone_since: float | None = None
        while True:
            try:
                record = self.deployment(deployment_id)
                gone_since = None
                if record.get("outcome") != "running":
                    for event in self.events(after=cursor):
                        cursor = max(cursor, int(event["id"]))
                        if on_event is not None:
                            on_event(event)
                    return record
                for event in self.follow_events(cursor, idle=idle):
                    cursor = max(cursor, int(event["id"]))
                    if on_event is not None:
                        on_event(event)
                    data = event.get("data") or {}
                    if event.get("kind") == "deployment.finished" and (
                        data.get("deployment") == deployment_id
                    ):
                        break
                else:
                    if on_idle is not None:
                        on_idle()
            except AgentUnavailable:
                # An agent being restarted: its successor continues the deployment.
                gone_since = gone_since or time.monotonic()
                if time.monotonic() - gone_since > AGENT_GONE:
                    raise
                time.sleep(0.5)
            if time.monotonic() > deadline:
                raise KilnError(f"deployment {deployment_id}: still running after {timeout:.0f}s")

    def scale(self, service: str, replicas: int) -> dict[str, Any]:
        return dict(self._request("POST", "/v1/scale", {"service": service, "replicas": replicas}))

    def rollback(self, service: str, revision: int | None = None) -> dict[str, Any]:
        return dict(
            self._request("POST", "/v1/rollback", {"service": service, "revision": revision})
        )

    def restart(self, service: str) -> dict[str, Any]:
        return dict(self._request("POST", "/v1/restart", {"service": service}))

    def stop_service(self, service: str) -> dict[str, Any]:
        return dict(self._request("POST", "/v1/stop", {"service": service}))

    def start_service(self, service: str) -> dict[str, Any]:
        return dict(self._request("POST", "/v1/start", {"service": service}))

    def burn(self, instance: str, keep_evidence: bool) -> dict[str, Any]:
        body = {"instance": instance, "keep_evidence": keep_evidence}
        return dict(self._request("POST", "/v1/burn", body, timeout=120.0))

    def drift(self, service: str | None, full: bool) -> dict[str, Any]:
        body = {"service": service, "full": full}
        return dict(self._request("POST", "/v1/drift", body, timeout=600.0))

    def promote(self, service: str) -> dict[str, Any]:
        return dict(self._request("POST", "/v1/promote", {"service": service}))

    def abort(self, service: str) -> dict[str, Any]:
        return dict(self._request("POST", "/v1/abort", {"service": service}))

    def exec(self, instance: str, argv: list[str], timeout: float) -> dict[str, Any]:
        body = {"instance": instance, "argv": argv, "timeout": timeout}
        return dict(self._request("POST", "/v1/exec", body, timeout=timeout + 30.0))

    def history(self, service: str) -> dict[str, Any]:
        return dict(self._request("GET", f"/v1/history/{service}"))

    def events(self, after: int = 0, limit: int = 1000) -> list[dict[str, Any]]:
        out = self._request("GET", "/v1/events", params={"after": after, "limit": limit})
        return list(out["events"])

    def last_event_id(self) -> int:
        """The newest event's id: a follower of what happens next starts after it."""
        out = self._request("GET", "/v1/events", params={"limit": 1})
        if "last_id" in out:
            return int(out["last_id"])
        last = 0  # an agent from before ``last_id``: page through, 10000 at a time
        while batch := self.events(after=last, limit=10_000):
            last = max(int(e["id"]) for e in batch)
        return last

    def follow_events(
        self, after: int = 0, idle: float | None = None
    ) -> Generator[dict[str, Any], None, None]:
        """Every event after ``after``, then new ones as they happen (NDJSON stream);
        with ``idle``, the stream ends after that many seconds without an event."""
        import httpx

        try:
            with self._client().stream(
                "GET",
                "/v1/events",
                params={"after": after, "follow": 1},
                timeout=httpx.Timeout(self.timeout, read=idle),
            ) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    _decode(resp, "GET", "/v1/events")
                for line in resp.iter_lines():
                    if line.strip():
                        yield json.loads(line)
        except httpx.ConnectError as e:
            raise AgentUnavailable(_unavailable(self.where, self.addr, self.source, e)) from e
        except (httpx.RemoteProtocolError, httpx.ReadTimeout, httpx.ReadError):
            return

    def down(self) -> dict[str, Any]:
        """Stop every instance and the proxy; the agent exits after answering."""
        return dict(self._request("POST", "/v1/down", timeout=max(self.timeout, 300.0)))


def _unavailable(where: str, addr: str | None, source: str, error: Exception) -> str:
    if addr is None:
        return f"no agent answers on {where}; start one with `kiln agent` or `kiln up`"
    import ssl

    cause: BaseException | None = error
    while cause is not None and not isinstance(cause, ssl.SSLError):
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, ssl.SSLError):
        check = "KILN_CA" if source == "KILN_ADDR" else f"the CA of {source}"
        return f"agent at {where}: TLS failed ({cause.reason or cause}); check {check}"
    return f"no agent answers at {where} ({source})"


def _decode(resp: httpx.Response, method: str, path: str) -> Any:
    try:
        payload = resp.json()
    except ValueError:
        payload = None
    if resp.status_code >= 400:
        detail = payload.get("detail") if isinstance(payload, dict) else None
        if not isinstance(detail, str):
            detail = resp.text.strip() or f"HTTP {resp.status_code}"
        raise KilnError(detail)
    if payload is None:
        raise KilnError(f"agent: {method} {path}: answer is not JSON")
    return payload


def start_background(
    home: Path, timeout: float = 20.0, runtime: RuntimeChoice | None = None
) -> None:
    """Spawn ``kiln agent`` detached (it outlives the CLI) and wait until it answers."""
    home = ensure_home(home)
    client = AgentClient(home)
    try:
        if client.addr is not None:  # a remote agent is started where it runs, not here
            client.health()
            return
        if client.running():
            return
        log_path = home / LOG_NAME
        env = dict(os.environ, KILN_HOME=str(home))
        with os.fdopen(open_private(log_path, os.O_WRONLY | os.O_APPEND), "ab") as log:
            proc = subprocess.Popen(
                agent_command(home, runtime),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=env,
                close_fds=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if client.running():
                return
            if proc.poll() is not None:
                if client.running():
                    return
                break
            time.sleep(0.1)
        raise KilnError(
            f"the agent for {home} did not start; last lines of {log_path}:\n" + _tail(log_path)
        )
    finally:
        client.close()


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"
