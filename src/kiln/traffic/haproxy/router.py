"""``HAProxyRouter``: HAProxy in master-worker mode, programmed at run time.

* Routine changes (a backend added, re-weighted, drained, removed) go
  through the runtime API: no reload, no connection touched.
* A change to the set of listeners or their settings starts a new
  *generation*: a new HAProxy master on the same inherited sockets plus any
  new one, and once it answers, the old generation is soft-stopped (it
  finishes what it has). HAProxy's own reload keeps the sockets it inherited
  but cannot take a new one, which a new service needs.
* The agent owns every listening socket (:mod:`kiln.traffic.listeners`):
  a HAProxy that dies is restarted on the same sockets, and connections
  made meanwhile wait in the accept queue instead of being refused.
* ``router.json`` records the generation, so a restarted agent adopts the
  running HAProxy and reads its servers back rather than resetting them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import pwd
import re
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from kiln.errors import KilnError
from kiln.oci.runc import RUN_ROOT, home_tag
from kiln.paths import open_private, private_dirs, write_private
from kiln.process import pid_alive, proc_start_time, system_binary
from kiln.traffic.haproxy.access_log import AccessLog
from kiln.traffic.haproxy.config import (
    PROBE_ANSWER,
    PROBE_HEADER,
    ConfigPaths,
    RouterSettings,
    render,
)
from kiln.traffic.haproxy.processes import HAProxyProcess, masters, our_processes
from kiln.traffic.haproxy.runtime_api import RuntimeAPI
from kiln.traffic.listeners import accept_queue, bind_listener, borrow_fd, can_bind, unlisten
from kiln.traffic.router import RESPONSE_CLASSES, BackendCounters, ServiceCounters
from kiln.traffic.routes import Backend, Route, RouteError

__all__ = ["HAProxyRouter"]

log = logging.getLogger("kiln.traffic")

STATE_VERSION = 1
START_TIMEOUT = 10.0
PROBE_TIMEOUT = 1.0
DEL_RETRIES = 40
STOP_GRACE = 2.0
_TOKEN = re.compile(r"[0-9a-f]{32}")
RUNTIME_SERVER_POOL = "pool-max-conn -1 pool-purge-delay 5s"
"""What a configured server has by default and one added at run time does not (HAProxy
2.6 gives it no idle pool): without it every request opens a new backend connection."""


def haproxy_binary() -> str:
    found = system_binary("haproxy")
    if found is None:
        raise KilnError("haproxy not found: install it (Debian: apt-get install haproxy)")
    return found


class Generation:
    """One HAProxy master and its worker, serving one rendered configuration."""

    def __init__(
        self,
        number: int,
        pid: int,
        stats: Path,
        child: subprocess.Popen[bytes] | None,
        master: Path | None = None,
    ):
        self.number = number
        self.pid = pid
        self.api = RuntimeAPI(stats)
        self.worker = RuntimeAPI(master, prefix="@1 ") if master is not None else None
        """The worker through the master's CLI: a soft-stopped worker has closed its
        stats socket with its other listeners, but still answers here."""
        self.child = child
        self.start = proc_start_time(pid)
        """With the pid, names this process for good (a pid is reused once it is gone)."""
        self.retired_at = 0.0
        self.retired = False
        self.seen: dict[str, ServiceCounters] = {}
        """The totals last read from it (already in the router's counters)."""
        self._pidfd: int | None = None

    def stat(self) -> list[dict[str, str]]:
        if self.retired and self.worker is not None:
            return self.worker.stat()
        return self.api.stat()

    def pidfd(self) -> int:
        if self._pidfd is None:
            self._pidfd = os.pidfd_open(self.pid)
        return self._pidfd

    def alive(self) -> bool:
        if self.child is not None:
            return self.child.poll() is None
        return pid_alive(self.pid) and proc_start_time(self.pid) == self.start

    def signal(self, sig: int) -> None:
        """The master's whole process group (it leads one); a process that leads none
        (a worker whose master died) alone."""
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(self.pid, sig)
        except PermissionError:
            pass

    def soft_stop(self) -> None:
        """Stop accepting and finish what it has. The master relays this to its worker;
        only a worker whose master is gone is signalled directly (a worker signalled
        before its handlers are set would die of SIGUSR1 and take the master with it)."""
        if pid_alive(self.pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(self.pid, signal.SIGUSR1)
        else:
            self.signal(signal.SIGUSR1)

    def reap(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.alive():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def close(self) -> None:
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None


class HAProxyRouter:
    """The data plane of one ``KILN_HOME``."""

    def __init__(
        self,
        home: Path,
        settings: RouterSettings | None = None,
        binary: str | None = None,
    ) -> None:
        self.home = Path(home).absolute()
        self.settings = settings or RouterSettings()
        self._binary = binary
        self.dir = self.home / "haproxy"
        self.state_file = self.dir / "router.json"
        self.log_file = self.dir / "haproxy.log"
        self.run_dir = RUN_ROOT / home_tag(self.home) / "haproxy"
        self.chroot = self.run_dir / "root"
        self._user = _haproxy_user()
        self.access_log = AccessLog(self.chroot / "log.sock", self._user[1] if self._user else None)
        self._lock = threading.RLock()
        self._routes: dict[str, Route] = {}
        self._listeners: dict[int, socket.socket] = {}
        self._master_fds: dict[int, int] = {}
        """port → the listener's fd number inside the current master (not this process's
        copy, whose number differs after an adoption): what the next agent borrows."""
        self._current: Generation | None = None
        self._retired: list[Generation] = []
        self._base: dict[str, ServiceCounters] = {}
        """Every total read from any generation (see ``_read_counters``)."""
        self._counting = threading.RLock()
        self._token = ""
        self._number = 0
        self._maxconn = self.settings.maxconn

    # -- lifecycle -------------------------------------------------------

    def start(self) -> str:
        with self._lock:
            private_dirs(self.dir)
            self._maxconn = _fd_budget(self.settings.maxconn)
            self._prepare_run_dir()
            self.access_log.start()
            found = our_processes(self.dir)
            adopted = self._adopt(found)
            self._settle(found)
            if adopted:
                return "adopted"
            if not _TOKEN.fullmatch(self._token):
                self._token = secrets.token_hex(16)
            # Nothing recorded is trusted without its process: the engine pushes every
            # route right after this.
            self._routes = {}
            self._switch({})
            return "started"

    def _settle(self, found: list[HAProxyProcess]) -> None:
        """Every HAProxy of this home but the adopted one: an older generation is
        finishing what it had and is left to; any other (an orphan of an agent killed
        while starting one, or all of them when nothing could be adopted) is killed,
        and waited for, since it holds ports the new generation needs."""
        current = self._current
        doomed = []
        for proc in masters(found):
            if current is not None and proc.pid == current.pid:
                continue
            gen = self._generation(proc.generation, proc.pid)
            if current is not None and proc.generation < current.number:
                gen.retired = True
                gen.retired_at = time.monotonic()
                gen.soft_stop()
                self._retired.append(gen)
            else:
                log.warning(
                    "stopping haproxy pid %s (gen-%s) that nothing adopted",
                    proc.pid,
                    proc.generation,
                )
                gen.signal(signal.SIGKILL)
                doomed.append(proc.pid)
        deadline = time.monotonic() + 5
        while doomed and time.monotonic() < deadline:
            alive = {p.pid for p in our_processes(self.dir)}
            doomed = [pid for pid in doomed if pid in alive]
            if doomed:
                time.sleep(0.02)

    def _prepare_run_dir(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.run_dir, 0o700)
        self.chroot.mkdir(exist_ok=True)
        if self._user is not None and os.geteuid() == 0:
            os.chown(self.chroot, 0, self._user[1])
            os.chmod(self.chroot, 0o750)
        else:
            os.chmod(self.chroot, 0o700)

    def _adopt(self, found: list[HAProxyProcess]) -> bool:
        """Take over the generation a previous agent left serving, sockets included; only
        a process that is this home's HAProxy master, started when the record says."""
        state = _read_state(self.state_file)
        if state is None:
            return False
        self._number = state.generation
        self._token = state.token
        routes = state.routes
        self._routes = routes
        master = next(
            (
                p
                for p in masters(found)
                if p.pid == state.pid
                and p.generation == state.generation
                and (state.start is None or p.start == state.start)
            ),
            None,
        )
        if master is None:
            return False
        gen = self._generation(state.generation, master.pid)
        try:
            gen.api.command("show info", timeout=PROBE_TIMEOUT * 3)
            listeners = {
                port: borrow_fd(master.pid, fd, port) for port, fd in state.listeners.items()
            }
        except KilnError as e:
            log.warning(
                "haproxy pid %s does not answer as recorded (%s); replacing it", master.pid, e
            )
            return False
        self._listeners = listeners
        self._master_fds = dict(state.listeners)
        self._current = gen
        self._routes = {}
        for name, route in routes.items():
            try:
                servers = gen.api.servers(name)
                self._routes[name] = Route(
                    name=route.name,
                    listen=route.listen,
                    protocol=route.protocol,
                    drain_timeout=route.drain_timeout,
                    queue_timeout=route.queue_timeout,
                    backends=tuple(
                        Backend(id=s.name, address=s.address, weight=s.weight, state=s.state)  # type: ignore[arg-type]
                        for s in servers
                    ),
                )
            except KilnError as e:
                log.warning("reading %s back from haproxy: %s", name, e)
                self._routes[name] = route
        return True

    def close(self) -> None:
        """The agent lets go; HAProxy keeps serving on its own copies of the sockets."""
        with self._lock:
            for sock in self._listeners.values():
                sock.close()
            self._listeners = {}
            if self._current is not None:
                self._current.close()
            self.access_log.close()

    def stop(self) -> None:
        """Soft-stop every generation (in-flight requests finish), then close the ports."""
        with self._lock:
            gens = [g for g in (self._current, *self._retired) if g is not None]
            known = {g.pid for g in gens}
            gens += [
                self._generation(p.generation, p.pid)
                for p in masters(our_processes(self.dir))
                if p.pid not in known
            ]
            # The instances were drained before this: a short soft-stop lets the last
            # answers out, then SIGTERM (HAProxy's hard stop) spares idle keep-alives.
            for gen in gens:
                gen.soft_stop()
            for gen in gens:
                for sig in (signal.SIGTERM, signal.SIGKILL):
                    if gen.reap(STOP_GRACE):
                        break
                    gen.signal(sig)
                gen.reap(5)
                gen.close()
            self._current = None
            self._retired = []
            for sock in self._listeners.values():
                unlisten(sock)
            self._listeners = {}
            self._routes = {}
            self.access_log.close()
            self.state_file.unlink(missing_ok=True)
            for cfg in self.dir.glob("gen-*.cfg"):
                cfg.unlink(missing_ok=True)
            shutil.rmtree(self.run_dir, ignore_errors=True)
            with contextlib.suppress(OSError):  # the home's run directory, if now empty
                self.run_dir.parent.rmdir()

    def recorded_alive(self) -> bool:
        """Whether a HAProxy of this home still runs, whoever started it."""
        return bool(our_processes(self.dir))

    def exit_fd(self) -> int | None:
        with self._lock:
            if self._current is None:
                return None
            try:
                return self._current.pidfd()
            except OSError:
                return None

    def info(self) -> dict[str, Any]:
        current = self._current
        return {
            "kind": "haproxy",
            "pid": current.pid if current is not None else None,
            "generation": self._number if current is not None else None,
        }

    @property
    def pid(self) -> int | None:
        current = self._current
        return current.pid if current is not None else None

    def restart(self, reason: str) -> None:
        """A dead master's worker exits with it (HAProxy's worker leaves as soon as the
        master's socket pair closes); what is left of that generation is told to finish
        what it has. A master that lives but stopped answering is killed with its worker."""
        with self._lock:
            old = self._current
            if old is not None:
                log.warning("restarting haproxy (pid %s): %s", old.pid, reason)
                self._snapshot_counters(old)
                if old.alive() and _answers(old):
                    # Alive and answering its runtime API, yet a listener did not answer:
                    # replace it as a configuration change would, without cutting what
                    # it is serving.
                    self._switch(dict(self._routes))
                    return
                if old.alive():
                    old.signal(signal.SIGKILL)
                    old.reap(5)
                else:
                    old.soft_stop()
                    old.retired_at = time.monotonic()
                    old.retired = True
                    self._retired.append(old)
                old.close()
                self._current = None
            self._switch(dict(self._routes))

    # -- routes ----------------------------------------------------------

    def routes(self) -> dict[str, Route]:
        with self._lock:
            return dict(self._routes)

    def check_listen(self, port: int) -> None:
        with self._lock:
            if port in self._listeners:
                return
        can_bind(self.settings.bind, port)

    def apply(self, route: Route) -> bool:
        with self._lock:
            for other in self._routes.values():
                if other.name != route.name and other.listen == route.listen:
                    # Two listen sections on one inherited socket would share its
                    # connections at random.
                    raise RouteError(
                        f"service {route.name!r}: port {route.listen} is already served "
                        f"for service {other.name!r}"
                    )
            current = self._routes.get(route.name)
            if current == route and self._current is not None:
                return False
            if current is not None and current.same_listener(route) and self._current is not None:
                try:
                    self._sync_backends(current, route)
                    self._routes[route.name] = route
                    self._save()
                    return True
                except KilnError as e:
                    log.warning("runtime change of %s failed (%s); reloading", route.name, e)
            self._switch({**self._routes, route.name: route})
            return True

    def remove(self, service: str) -> None:
        with self._lock:
            if service not in self._routes:
                return
            routes = {n: r for n, r in self._routes.items() if n != service}
            self._switch(routes)

    def _sync_backends(self, old: Route, new: Route) -> None:
        """One runtime-API command per change, so their order matters: what gains traffic
        first, what loses it after. A switch of every backend at once (blue/green) then
        never has a moment with none in rotation (a 503)."""
        api = self._api()
        name = new.name

        def gains(b: Backend) -> bool:
            was = old.backend(b.id)
            if was is None:
                return True
            return (b.state == "ready" and was.state != "ready") or b.weight > was.weight

        for b in sorted(new.backends, key=lambda b: 0 if gains(b) else 1):
            was = old.backend(b.id)
            if was is None:
                api.expect(
                    f"add server {name}/{b.id} {b.address} weight {b.weight} {RUNTIME_SERVER_POOL}",
                    "New server registered",
                )
                api.expect(f"set server {name}/{b.id} state {_admin(b.state)}")
                continue
            if was.address != b.address:
                api.expect(
                    f"set server {name}/{b.id} addr {b.host} port {b.port}", "IP changed", "no need"
                )
            if was.weight != b.weight:
                api.expect(f"set server {name}/{b.id} weight {b.weight}")
            if was.state != b.state:
                api.expect(f"set server {name}/{b.id} state {_admin(b.state)}")
        for b in old.backends:
            if new.backend(b.id) is None:
                self._delete_server(name, b.id)

    def _delete_server(self, service: str, server: str) -> None:
        api = self._api()
        api.expect(f"set server {service}/{server} state maint")
        # A request still connecting to a backend that died is retried on another one
        # once its connection fails (``timeout connect``): cutting it would fail it.
        deadline = time.monotonic() + self.settings.connect_timeout + 0.5
        while self._active(service, server) > 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        api.command(f"shutdown sessions server {service}/{server}")
        for _ in range(DEL_RETRIES):
            answer = api.command(f"del server {service}/{server}").strip()
            if answer.startswith("Server deleted") or "No such server" in answer:
                return
            time.sleep(0.05)
        raise KilnError(f"haproxy: del server {service}/{server}: {answer}")

    def drain(self, service: str, backend: str, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while True:
            active = self._active(service, backend)
            if active <= 0:
                return 0
            if time.monotonic() >= deadline:
                with self._lock, contextlib.suppress(KilnError):
                    self._api().command(f"shutdown sessions server {service}/{backend}")
                return active
            time.sleep(0.05)

    def _active(self, service: str, backend: str) -> int:
        with self._lock:
            gens = [g for g in (self._current, *self._retired) if g is not None and g.alive()]
        total = 0
        for gen in gens:
            try:
                rows = gen.stat()
            except KilnError:
                continue
            for row in rows:
                if row.get("pxname") == service and row.get("svname") == backend:
                    total += _int(row.get("scur"))
        return total

    # -- generations -----------------------------------------------------

    def _api(self) -> RuntimeAPI:
        if self._current is None:
            raise KilnError("haproxy is not running")
        return self._current.api

    def _config_path(self, number: int) -> Path:
        return self.dir / f"gen-{number}.cfg"

    def _stats_path(self, number: int) -> Path:
        return self.run_dir / f"stats-{number}.sock"

    def _master_path(self, number: int) -> Path:
        return self.run_dir / f"master-{number}.sock"

    def _generation(
        self, number: int, pid: int, child: subprocess.Popen[bytes] | None = None
    ) -> Generation:
        return Generation(number, pid, self._stats_path(number), child, self._master_path(number))

    def _switch(self, routes: dict[str, Route]) -> None:
        """Start a generation serving ``routes``; once it answers, retire the old one.

        On any failure the old generation keeps serving and nothing is recorded."""
        self._reap_retired()
        fresh: dict[int, socket.socket] = {}
        try:
            for route in routes.values():
                if route.listen not in self._listeners and route.listen not in fresh:
                    fresh[route.listen] = bind_listener(self.settings.bind, route.listen)
            listeners = {**self._listeners, **fresh}
            used = {r.listen for r in routes.values()}
            fds = {port: s.fileno() for port, s in listeners.items() if port in used}
            number = self._number + 1
            gen = self._spawn(number, routes, fds)
        except BaseException:
            for sock in fresh.values():
                sock.close()
            raise
        old = self._current
        self._current = gen
        self._number = number
        self._routes = dict(routes)
        self._listeners = {p: s for p, s in listeners.items() if p in used}
        self._master_fds = dict(fds)
        self._save()
        if old is not None:
            self._snapshot_counters(old)
            old.soft_stop()
            old.retired_at = time.monotonic()
            old.retired = True
            old.close()
            self._retired.append(old)
        for port, sock in listeners.items():
            if port not in used:
                unlisten(sock)
        for cfg in self.dir.glob("gen-*.cfg"):
            if cfg != self._config_path(number) and not any(
                cfg == self._config_path(g.number) for g in self._retired
            ):
                cfg.unlink(missing_ok=True)

    def _spawn(self, number: int, routes: dict[str, Route], fds: dict[int, int]) -> Generation:
        threads = self.settings.threads or os.cpu_count() or 1
        stats = self._stats_path(number)
        stats.unlink(missing_ok=True)
        as_root = os.geteuid() == 0
        paths = ConfigPaths(
            stats=stats,
            log="/log.sock" if as_root else str(self.access_log.path),
            chroot=self.chroot if as_root else None,
            user=self._user[0] if (self._user and as_root) else None,
        )
        settings = self.settings
        if self._maxconn < settings.maxconn:
            # Short of descriptors, one service may still take three quarters of them:
            # a flood on it leaves the others a quarter.
            settings = dataclasses.replace(
                settings,
                maxconn=self._maxconn,
                listener_maxconn=min(settings.listener_maxconn, max(self._maxconn * 3 // 4, 1)),
            )
        text = render(_unroutable_drains(routes), fds, settings, paths, self._token, threads)
        config = self._config_path(number)
        write_private(config, text.encode())
        master = self._master_path(number)
        argv = [
            self._binary or haproxy_binary(),
            "-W",
            "-S",
            f"{master},mode,600",
            "-f",
            str(config),
        ]
        with os.fdopen(open_private(self.log_file, os.O_WRONLY | os.O_APPEND), "ab") as out:
            child = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                pass_fds=tuple(fds.values()),
                start_new_session=True,
            )
        gen = self._generation(number, child.pid, child)
        try:
            return self._await_generation(gen, child, routes)
        except BaseException:
            # Interrupted or refused: a master nobody records would outlive every stop().
            gen.signal(signal.SIGKILL)
            gen.reap(5)
            gen.close()
            raise

    def _await_generation(
        self, gen: Generation, child: subprocess.Popen[bytes], routes: dict[str, Route]
    ) -> Generation:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if child.poll() is not None:
                gen.close()
                raise RouteError(
                    f"haproxy refused the new configuration (exit {child.returncode}): "
                    f"{_last_alert(self.log_file)}"
                )
            try:
                gen.api.command("show info", timeout=PROBE_TIMEOUT)
            except KilnError:
                if time.monotonic() > deadline:
                    gen.signal(signal.SIGKILL)
                    gen.reap(5)
                    gen.close()
                    raise KilnError(
                        f"haproxy did not answer within {START_TIMEOUT:g}s; see {self.log_file}"
                    ) from None
                time.sleep(0.01)
                continue
            _restore_drains(gen.api, routes)  # on failure, _spawn kills the generation
            return gen

    def _reap_retired(self) -> None:
        keep = []
        overdue = self.settings.hard_stop_after + 5
        for gen in self._retired:
            if gen.alive() and time.monotonic() - gen.retired_at > overdue:
                gen.signal(signal.SIGKILL)
            if gen.alive():
                keep.append(gen)
            else:
                gen.close()
                for suffix in ("stats", "master"):
                    (self.run_dir / f"{suffix}-{gen.number}.sock").unlink(missing_ok=True)
        self._retired = keep

    def _save(self) -> None:
        current = self._current
        state: dict[str, Any] = {
            "version": STATE_VERSION,
            "generation": self._number,
            "pid": current.pid if current is not None else None,
            "start": proc_start_time(current.pid) if current is not None else None,
            "stats": str(current.api.path) if current is not None else None,
            "token": self._token,
            "listeners": {str(p): fd for p, fd in self._master_fds.items()},
            "routes": {n: r.to_json() for n, r in self._routes.items()},
        }
        write_private(self.state_file, json.dumps(state, indent=2).encode())

    # -- counters --------------------------------------------------------

    def counters(self) -> dict[str, ServiceCounters]:
        with self._lock:
            gens = [g for g in (self._current, *self._retired) if g is not None and g.alive()]
            routes = list(self._routes)
        gauges: dict[str, ServiceCounters] = {}
        with self._counting:
            for gen in gens:
                rows = self._read_counters(gen)
                if rows is not None:
                    _fold(gauges, rows, gauges_only=True)
            out = {n: _copy(self._base.get(n, ServiceCounters())) for n in routes}
        for name, live in gauges.items():
            into = out.get(name)
            if into is None:
                continue
            for bid, b in live.backends.items():
                into.backends.setdefault(bid, BackendCounters()).active += b.active
        for (service, server), hist in self.access_log.latency().items():
            svc = out.get(service)
            if svc is None:
                continue
            backend = svc.backends.get(server)
            if backend is not None:
                backend.latency = hist
        return out

    def _read_counters(self, gen: Generation) -> list[dict[str, str]] | None:
        """Fold what ``gen`` counted since it was last read into the totals, so they
        only grow and outlive the generation; its ``show stat`` rows, or None."""
        with self._counting:
            try:
                rows = gen.stat()
            except KilnError:
                return None
            totals: dict[str, ServiceCounters] = {}
            _fold(totals, rows, gauges_only=False, with_gauges=False)
            for name, svc in totals.items():
                _grow(self._base.setdefault(name, ServiceCounters()), svc, gen.seen.get(name))
            gen.seen = totals
            return rows

    def _snapshot_counters(self, gen: Generation) -> None:
        """Read a generation's totals before it goes (a soft-stopped one is read again
        through its master for as long as it lives)."""
        self._read_counters(gen)

    # -- health of the data plane itself ---------------------------------

    def check(self) -> list[str]:
        with self._lock:
            current = self._current
            routes = dict(self._routes)
            listeners = dict(self._listeners)
        if current is None or not current.alive():
            return ["haproxy is not running"]
        problems = []
        try:
            current.api.command("show info", timeout=PROBE_TIMEOUT)
        except KilnError as e:
            problems.append(f"runtime API: {e}")
        for name, route in sorted(routes.items()):
            sock = listeners.get(route.listen)
            if sock is None:
                problems.append(f"{name}: no socket for port {route.listen}")
                continue
            problem = (
                self._probe_http(route.listen)
                if route.protocol == "http"
                else _probe_tcp(sock, self._probe_host(), route.listen)
            )
            if problem and not _saturated(current, name):
                problems.append(f"{name} (port {route.listen}): {problem}")
            elif problem:
                log.warning(
                    "%s (port %s) is at its connection limit: %s", name, route.listen, problem
                )
        return problems

    def _probe_host(self) -> str:
        return "127.0.0.1" if self.settings.bind in ("0.0.0.0", "") else self.settings.bind

    def _probe_http(self, port: int) -> str | None:
        request = (
            f"GET / HTTP/1.1\r\nHost: kiln-probe\r\n{PROBE_HEADER}: {self._token}\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
        try:
            with socket.create_connection((self._probe_host(), port), timeout=PROBE_TIMEOUT) as s:
                s.sendall(request)
                answer = b""
                while len(answer) < 4096:
                    piece = s.recv(4096)
                    if not piece:
                        break
                    answer += piece
        except OSError as e:
            return f"no answer ({e})"
        if not answer.startswith(b"HTTP/1.1 200") or PROBE_ANSWER.encode() not in answer:
            return f"unexpected answer {answer[:40]!r}"
        return None


def _answers(gen: Generation) -> bool:
    try:
        gen.api.command("show info", timeout=PROBE_TIMEOUT)
        return True
    except KilnError:
        return False


def _saturated(gen: Generation, service: str) -> bool:
    """A listener that holds as many connections as it may, or a HAProxy that does, is
    busy, not dead: restarting it then would cut every connection and meet the same
    flood again."""
    try:
        info = gen.api.command("show info", timeout=PROBE_TIMEOUT)
        rows = gen.api.stat()
    except KilnError:
        return False
    fields = dict(line.split(": ", 1) for line in info.splitlines() if ": " in line)
    limit = _int(fields.get("Maxconn"))
    if limit > 0 and _int(fields.get("CurrConns")) >= limit * 95 // 100:
        return True
    for row in rows:
        if row.get("pxname") == service and row.get("svname") == "FRONTEND":
            limit = _int(row.get("slim"))
            return limit > 0 and _int(row.get("scur")) >= limit * 95 // 100
    return False


def _probe_tcp(sock: socket.socket, host: str, port: int) -> str | None:
    """A connection that HAProxy accepts leaves the accept queue: watch it go."""
    try:
        probe = socket.create_connection((host, port), timeout=PROBE_TIMEOUT)
    except OSError as e:
        return f"no answer ({e})"
    try:
        deadline = time.monotonic() + PROBE_TIMEOUT
        while accept_queue(sock) > 0:
            if time.monotonic() > deadline:
                return "connections are not being accepted"
            time.sleep(0.01)
        return None
    finally:
        probe.close()


def _unroutable_drains(routes: dict[str, Route]) -> dict[str, Route]:
    """The routes as a new generation's file must say them: a configuration has no
    ``drain`` state, so a draining backend starts at weight 0 (no new request from
    its first instant) until :func:`_restore_drains` sets its state and weight."""
    return {
        name: dataclasses.replace(
            route,
            backends=tuple(
                dataclasses.replace(b, weight=0) if b.state == "draining" else b
                for b in route.backends
            ),
        )
        for name, route in routes.items()
    }


def _restore_drains(api: RuntimeAPI, routes: dict[str, Route]) -> None:
    """Put each draining backend of a new generation in HAProxy's drain state with its
    own weight, as the runtime API left it in the old one (and ``routes()`` reads back)."""
    for route in routes.values():
        for b in route.backends:
            if b.state == "draining":
                api.expect(f"set server {route.name}/{b.id} state drain")
                api.expect(f"set server {route.name}/{b.id} weight {b.weight}")


def _admin(state: str) -> str:
    return {"ready": "ready", "draining": "drain", "maintenance": "maint"}[state]


def _int(value: str | None) -> int:
    return int(value) if value and value.isdigit() else 0


def _copy(c: ServiceCounters) -> ServiceCounters:
    out = ServiceCounters()
    _add_service(out, c)
    return out


def _add_service(into: ServiceCounters, other: ServiceCounters) -> None:
    """``into += other``, totals only (gauges and latency live elsewhere)."""
    into.requests += other.requests
    into.connections += other.connections
    for k, v in other.responses.items():
        into.responses[k] = into.responses.get(k, 0) + v
    for bid, b in other.backends.items():
        _grow_backend(into.backends.setdefault(bid, BackendCounters()), b, None)


def _grow(into: ServiceCounters, now: ServiceCounters, was: ServiceCounters | None) -> None:
    """Add what a generation counted between two reads (``was`` then ``now``). A backend
    gone from ``now`` (deleted) keeps what it had; one whose counters went back (deleted
    and added again in between) starts over from zero."""
    if was is None or now.requests < was.requests or now.connections < was.connections:
        was = ServiceCounters()
    into.requests += now.requests - was.requests
    into.connections += now.connections - was.connections
    for k, v in now.responses.items():
        into.responses[k] = into.responses.get(k, 0) + max(v - was.responses.get(k, 0), 0)
    for bid, b in now.backends.items():
        _grow_backend(into.backends.setdefault(bid, BackendCounters()), b, was.backends.get(bid))


def _grow_backend(into: BackendCounters, now: BackendCounters, was: BackendCounters | None) -> None:
    if was is None or now.requests < was.requests or now.errors < was.errors:
        was = BackendCounters()
    into.requests += now.requests - was.requests
    into.errors += now.errors - was.errors
    for k, v in now.responses.items():
        into.responses[k] = into.responses.get(k, 0) + max(v - was.responses.get(k, 0), 0)


def _fold(
    out: dict[str, ServiceCounters],
    rows: list[dict[str, str]],
    gauges_only: bool,
    with_gauges: bool = True,
) -> None:
    """Add ``show stat`` rows into ``out``: totals unless ``gauges_only``, ``active``
    unless not ``with_gauges``."""
    for row in rows:
        name = row.get("pxname", "")
        kind = row.get("svname", "")
        svc = out.setdefault(name, ServiceCounters())
        if kind == "FRONTEND":
            if not gauges_only:
                svc.requests += _int(row.get("req_tot"))
                svc.connections += _int(row.get("stot"))
                for cls in RESPONSE_CLASSES:
                    svc.responses[cls] += _int(row.get(f"hrsp_{cls}"))
            continue
        if kind == "BACKEND":
            continue
        backend = svc.backends.setdefault(kind, BackendCounters())
        if with_gauges:
            backend.active += _int(row.get("scur"))
        if not gauges_only:
            backend.requests += _int(row.get("req_tot")) or _int(row.get("stot"))
            # A failed attempt HAProxy retried (wretr) or sent elsewhere (wredis) is
            # still a failure of this backend, or a dead one would count none.
            backend.errors += sum(_int(row.get(k)) for k in ("econ", "eresp", "wretr", "wredis"))
            for cls in RESPONSE_CLASSES:
                backend.responses[cls] += _int(row.get(f"hrsp_{cls}"))


def _fd_budget(maxconn: int) -> int:
    """HAProxy needs about two descriptors per connection and will not start short of
    them: raise this process's limit (HAProxy inherits it), or serve fewer connections."""
    need = 2 * maxconn + 1000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= need:
        return maxconn
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, max(hard, need)))
        return maxconn
    except (ValueError, OSError):
        pass
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    fitted = max((soft - 1000) // 2, 100)
    log.info("file descriptor limit %d: haproxy maxconn lowered to %d", soft, fitted)
    return fitted


def _haproxy_user() -> tuple[str, int] | None:
    """Debian's haproxy package makes a ``haproxy`` user; the worker drops to it. Only
    root can drop to another user: an unprivileged router (the Swarm edge) runs as itself."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam("haproxy")
    except KeyError:
        return None
    return "haproxy", entry.pw_gid


def _last_alert(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()[-30:]
    except OSError:
        return "(no log)"
    alerts = [line for line in lines if "ALERT" in line]
    return (alerts or lines or ["(empty log)"])[-1].strip()


@dataclasses.dataclass(frozen=True)
class _State:
    generation: int
    pid: int
    start: int | None
    token: str
    listeners: dict[int, int]
    routes: dict[str, Route]


def _read_state(path: Path) -> _State | None:
    """``router.json``, or None when it is missing or anything in it is not what Kiln
    writes (it is then only a hint: the processes themselves are what counts)."""
    try:
        raw = json.loads(path.read_text())
        if not isinstance(raw, dict) or raw.get("version") != STATE_VERSION:
            return None
        start = raw.get("start")
        token = str(raw.get("token") or "")
        return _State(
            generation=int(raw["generation"]),
            pid=int(raw["pid"]),
            start=int(start) if start is not None else None,
            token=token if _TOKEN.fullmatch(token) else "",
            listeners={int(p): int(fd) for p, fd in dict(raw.get("listeners") or {}).items()},
            routes={n: Route.from_json(r) for n, r in dict(raw.get("routes") or {}).items()},
        )
    except (OSError, ValueError, TypeError, KeyError, AttributeError, KilnError):
        return None
