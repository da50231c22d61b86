"""``kiln agent``: one asyncio process that owns the state, the instances and the proxy.

Everything that blocks (runtime calls, unpacking, proxy control calls) runs
in a thread pool so health checks and the API stay responsive. The agent is
disposable: instances and the proxy run in their own sessions and outlive
it, and a new agent adopts them from the state store on start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.agent._lock import AgentLock
from kiln.agent.engine import Engine
from kiln.agent.errors import Busy, Conflict
from kiln.errors import KilnError
from kiln.paths import ensure_home
from kiln.runtime.select import RuntimeChoice, read_choice, write_choice

if TYPE_CHECKING:
    from kiln.agent.tls import Listen
    from kiln.traffic.router import BackendCounters

__all__ = ["Agent", "run_agent"]

log = logging.getLogger("kiln.agent")

HOME_WATCH_INTERVAL = 1.0
"""One stat of the home per second: the cost of noticing it was deleted."""
ROUTE_WATCHERS_MAX = 64
"""Held ``GET /v1/routes`` requests at once (one per data-plane node, with room)."""


class Agent:
    """The composition root: lock, state, runtime, router, engine, API server."""

    def __init__(
        self,
        home: Path,
        runtime: Any | None = None,
        router: Any | None = None,
        choice: RuntimeChoice | None = None,
        listen: Listen | None = None,
    ) -> None:
        self.home = home
        self.listen = listen
        self.runtime = runtime
        self.choice = choice or RuntimeChoice()
        self.router = router
        self.stopping = asyncio.Event()
        self.started = time.time()
        self.engine: Engine | None = None
        self._new_event = asyncio.Event()
        self._down = False
        self._route_watchers = 0

    # lifecycle

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="kiln-agent")
        loop.set_default_executor(pool)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        from kiln.deploy.state import StateStore

        state = StateStore(self.home / "state.db")
        if self.runtime is None:
            self.runtime = self.choice.open(self.home)
        from kiln.traffic.haproxy import HAProxyRouter

        router = self.router or HAProxyRouter(self.home)
        engine = Engine(self.home, state, self.runtime, router, on_event=self._new_event.set)
        self.engine = engine
        sock = _bind_socket(self.home / "agent.sock")
        server = None
        remote: Any = None
        tcp = _bind_tcp(self.listen) if self.listen is not None else None
        try:
            await engine.start()
            server = _api_server(self)
            api = asyncio.create_task(server.serve(sockets=[sock]))
            if tcp is not None and self.listen is not None:
                remote = _api_server(self, self.listen)
                served = {api, asyncio.create_task(remote.serve(sockets=[tcp]))}
                log.info("agent API on %s", self.listen.describe())
                if self.listen.ca is not None:
                    log.info(
                        "clients trust the CA %s (KILN_CA, or --ca of kiln context add)",
                        self.listen.ca,
                    )
            else:
                served = {api}
            engine.emit("agent.started", f"agent started (pid {os.getpid()})")
            log.info("agent ready home=%s pid=%d", self.home, os.getpid())
            edges = self._deploy_edges(engine)
            watch = asyncio.create_task(self._watch_home())
            stop = asyncio.create_task(self.stopping.wait())
            await asyncio.wait({*served, stop}, return_when=asyncio.FIRST_COMPLETED)
            server.should_exit = True
            if remote is not None:
                remote.should_exit = True
            if not watch.done():
                watch.cancel()
            if edges is not None and not edges.done():
                edges.cancel()
            await engine.stop()
            engine.emit(
                "agent.stopped",
                "agent stopped; instances and proxy keep running"
                if not self._down
                else "agent stopped after kiln down",
            )
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.gather(*served), 5.0)
        finally:
            if server is not None:
                server.should_exit = True
            if remote is not None:
                remote.should_exit = True
            if tcp is not None:
                tcp.close()
            with contextlib.suppress(FileNotFoundError):
                (self.home / "agent.sock").unlink()
            sock.close()
            state.close()
            pool.shutdown(wait=False, cancel_futures=True)

    def _deploy_edges(self, engine: Engine) -> asyncio.Task[None] | None:
        """On a runtime of several nodes, Kiln's proxy runs on each, fed by this agent."""
        from kiln.runtime import EdgeHost

        if not isinstance(self.runtime, EdgeHost):
            return None
        from kiln.agent.edge import EdgeDeployment

        deployment = EdgeDeployment(engine, self.runtime, self.listen)
        return engine.supervise(deployment.run, "edge deployment")

    # API surface (called by kiln.agent.api)

    def _engine(self) -> Engine:
        if self.engine is None:
            raise KilnError("agent is starting")
        return self.engine

    def health(self) -> dict[str, Any]:
        from kiln import __version__

        return {
            "ok": True,
            "pid": os.getpid(),
            "home": str(self.home),
            "version": __version__,
            "uptime": time.time() - self.started,
            "proxy_pid": self._engine().router.info().get("pid"),
        }

    async def status(self) -> dict[str, Any]:
        return await self._engine().status()

    async def plan(self, body: dict[str, Any]) -> dict[str, Any]:
        wanted = body.get("runtime")
        if wanted is not None:
            check_choice(self.choice, RuntimeChoice.from_json(wanted))
        return await self._engine().plan(body)

    async def apply(self, plan: dict[str, Any]) -> dict[str, Any]:
        return await self._engine().apply(plan)

    async def deployment(self, deployment_id: str) -> dict[str, Any]:
        return await self._engine().deployments.get(deployment_id)

    async def rollback(self, service: str, revision: int | None) -> dict[str, Any]:
        return await self._engine().rollback(service, revision)

    async def scale(self, service: str, replicas: int) -> dict[str, Any]:
        return await self._engine().scale(service, replicas)

    async def restart(self, service: str) -> dict[str, Any]:
        return await self._engine().restart(service)

    async def stop_service(self, service: str) -> dict[str, Any]:
        return await self._engine().stop_service(service)

    async def start_service(self, service: str) -> dict[str, Any]:
        return await self._engine().start_service(service)

    async def exec(self, instance: str, argv: list[str], timeout: float) -> dict[str, Any]:
        return await self._engine().exec(instance, argv, timeout)

    async def burn(self, instance: str, keep_evidence: bool) -> dict[str, Any]:
        return await self._engine().burn(instance, keep_evidence)

    async def drift(self, service: str | None, full: bool) -> dict[str, Any]:
        return await self._engine().drift.check(None if service is None else [service], full=full)

    async def promote(self, service: str) -> dict[str, Any]:
        return await self._engine().promote(service)

    async def abort(self, service: str) -> dict[str, Any]:
        return await self._engine().abort(service)

    async def history(self, service: str) -> dict[str, Any]:
        return await self._engine().history(service)

    async def events(self, after: int, limit: int) -> list[dict[str, Any]]:
        engine = self._engine()
        return [e.to_json() for e in await engine.db(engine.state.events, after, limit)]

    async def last_event_id(self) -> int:
        engine = self._engine()
        return await engine.db(engine.state.last_event_id)

    async def routes(self, after: tuple[str, int] | None, wait: float) -> dict[str, Any]:
        """The served routes under their ``epoch``/``version``; when ``after`` is the
        current pair, held until they change, ``wait`` passes or the agent stops."""
        routing = self._engine().routing
        current = (routing.epoch, routing.version)
        if after == current and wait > 0:
            if self._route_watchers >= ROUTE_WATCHERS_MAX:
                raise Busy(f"{ROUTE_WATCHERS_MAX} route watchers already wait; retry later")
            self._route_watchers += 1
            change = asyncio.create_task(routing.wait_for_change(*current, wait))
            stop = asyncio.create_task(self.stopping.wait())
            try:
                await asyncio.wait({change, stop}, return_when=asyncio.FIRST_COMPLETED)
            finally:  # also when the watcher hung up and its request was cancelled
                change.cancel()
                stop.cancel()
                self._route_watchers -= 1
        return routing.snapshot()

    def edge_counters(
        self, edge: str, generation: str, services: dict[str, dict[str, BackendCounters]]
    ) -> dict[str, Any]:
        """An edge's report: counted for the services under analysis, the rest ignored."""
        return self._engine().edge_counters.record(edge, generation, services)

    async def wait_for_event(self, timeout: float) -> None:
        self._new_event.clear()
        stop = asyncio.create_task(self.stopping.wait())
        new = asyncio.create_task(self._new_event.wait())
        _, pending = await asyncio.wait(
            {stop, new}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
        for task in pending:
            task.cancel()

    async def _watch_home(self) -> None:
        """A home deleted (or replaced) under a running agent leaves nothing able to stop
        what it runs: no socket to reach the agent, no state to adopt. The agent then
        stops everything it started, as ``kiln down`` would, and exits."""
        try:
            first = os.stat(self.home)
        except OSError:
            return
        while not self.stopping.is_set():
            await asyncio.sleep(HOME_WATCH_INTERVAL)
            try:
                now = os.stat(self.home)
                if (now.st_dev, now.st_ino) == (first.st_dev, first.st_ino):
                    continue
            except OSError:
                pass
            log.error("KILN_HOME %s is gone: stopping everything this agent started", self.home)
            self._down = True
            try:
                await self._engine().down_homeless()
            finally:
                self.stopping.set()
            return

    async def down(self) -> dict[str, Any]:
        if self._down:
            raise Conflict("kiln down is already in progress")
        self._down = True
        summary = await self._engine().down()
        asyncio.get_running_loop().call_later(0.2, self.stopping.set)
        return summary


def _bind_socket(path: Path) -> socket.socket:
    """Mode 0600 from the first instant (umask), and a stale socket of a dead agent removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() or path.is_symlink():
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(128)
    sock.setblocking(False)
    return sock


def _bind_tcp(listen: Listen) -> socket.socket:
    """The network listener, bound before the engine starts so a taken port fails at once."""
    try:
        sock = socket.create_server(
            (listen.host, listen.port),
            family=socket.AF_INET6 if ":" in listen.host else socket.AF_INET,
            backlog=128,
        )
    except OSError as e:
        raise KilnError(f"--listen {listen.host}:{listen.port}: {e.strerror or e}") from None
    sock.setblocking(False)
    return sock


def _api_server(agent: Agent, listen: Listen | None = None) -> Any:
    """A uvicorn server of the API: without ``listen`` for the Unix socket, with it for
    the TLS listener, where every request needs a bearer token."""
    import uvicorn

    from kiln.agent.api import build_app, build_remote_app

    class _Server(uvicorn.Server):
        """The agent handles SIGTERM/SIGINT itself; uvicorn must not re-raise them. And
        uvicorn's own loop wakes ten times a second to see whether it should exit: the
        agent tells it instead, so an idle agent does not wake at all."""

        def __init__(self, config: uvicorn.Config) -> None:
            self._exit = asyncio.Event()
            super().__init__(config)

        @property
        def should_exit(self) -> bool:
            return self._exit.is_set()

        @should_exit.setter
        def should_exit(self, value: bool) -> None:
            if value:
                self._exit.set()
            else:
                self._exit.clear()

        async def main_loop(self) -> None:
            await self._exit.wait()

        @contextlib.contextmanager
        def capture_signals(self) -> Any:
            yield

    # No Date header: uvicorn refreshes it on the tick this server does without.
    if listen is None:
        config = uvicorn.Config(
            build_app(agent),
            log_level="warning",
            access_log=False,
            lifespan="off",
            date_header=False,
        )
        return _Server(config)
    from kiln.agent.tokens import TokenStore

    config = uvicorn.Config(
        build_remote_app(agent, TokenStore(agent.home)),
        log_level="warning",
        access_log=False,
        lifespan="off",
        date_header=False,
        server_header=False,
        ssl_certfile=str(listen.cert),
        ssl_keyfile=str(listen.key),
    )
    return _Server(config)


def check_choice(running: RuntimeChoice, wanted: RuntimeChoice) -> None:
    """One runtime per home: a kiln.toml that asks for another is refused, not obeyed
    halfway (instances on two runtimes that one agent would have to adopt)."""
    if running != wanted and running.same_instances(wanted):
        raise KilnError(
            f"this KILN_HOME's agent runs the {running.describe()} runtime, but kiln.toml "
            "gives other [runtime] nodes; restart the agent to use them (SIGTERM to it: its "
            "instances keep running, and kiln up starts it again); nothing was changed"
        )
    if running != wanted:
        raise KilnError(
            f"this KILN_HOME runs its instances on the {running.describe()} runtime, but "
            f"kiln.toml asks for {wanted.describe()}; run kiln down first (or use another "
            "KILN_HOME); nothing was changed"
        )


def choose_runtime(home: Path, asked: RuntimeChoice | None) -> RuntimeChoice:
    """The home's recorded runtime, or the one asked for when nothing runs on the
    recorded one (a home after ``kiln down`` may move to another runtime). The first
    agent records its choice; a home from before the record ran the local runtime."""
    recorded = read_choice(home)
    if asked is None or asked == recorded:
        chosen = recorded or RuntimeChoice()
    else:
        if (home / "state.db").exists():
            from kiln.deploy.state import StateStore

            same = (recorded or RuntimeChoice()).same_instances(asked)
            with StateStore(home / "state.db") as state:
                # Other node engines for the same swarm: the instances stay where they are.
                if state.instances(live_only=True) and not same:
                    check_choice(recorded or RuntimeChoice(), asked)
        chosen = asked
    if chosen != recorded:
        write_choice(home, chosen)
    return chosen


def run_agent(
    home: Path,
    runtime: RuntimeChoice | None = None,
    listen: str | None = None,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
) -> None:
    """Run until SIGTERM/SIGINT (instances and the proxy keep running) or ``POST /v1/down``;
    with ``listen`` (``HOST:PORT``) the API is served over TLS there too."""
    home = ensure_home(home)
    # This process is the home's agent: what it bakes (the Swarm edge image) uses its caches.
    os.environ["KILN_HOME"] = str(home)
    if listen is None and (tls_cert is not None or tls_key is not None):
        raise KilnError("--tls-cert and --tls-key need --listen")
    lock = AgentLock(home)
    lock.acquire()
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO,
            stream=sys.stderr,
            format="%(asctime)s %(levelname)s %(name)s %(message)s",
        )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        remote = _remote_listen(home, listen, tls_cert, tls_key) if listen is not None else None
        choice = choose_runtime(home, runtime)
        asyncio.run(Agent(home, choice=choice, listen=remote).run())
    finally:
        lock.release()


def _remote_listen(home: Path, listen: str, cert: Path | None, key: Path | None) -> Listen:
    """Where and with which certificate to serve the network API (made under the agent's
    lock, so two agents starting at once do not write two CAs)."""
    from kiln.agent.tls import Listen, ensure_server_certificate, home_ca, parse_listen

    host, port = parse_listen(listen)
    own = cert is None and key is None
    cert, key = ensure_server_certificate(home, host, cert, key)
    return Listen(host, port, cert, key, home_ca(home) if own else None)
