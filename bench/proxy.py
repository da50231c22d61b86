"""Kiln's data plane (HAProxy behind ``HAProxyRouter``) against direct and a plain haproxy.

Run: ``.venv/bin/python bench/proxy.py [--duration 5] [--connections 64] [--quick]``.

Two small keep-alive HTTP backends (asyncio Protocols, one process each) are
driven with ``wrk -t2`` in the same run, on the same machine:

* directly (one backend, then both at once with one ``wrk -t1`` each);
* through Kiln's listener: an ``HAProxyRouter`` on a temporary home, bound to
  127.0.0.1, with ``RouterSettings(threads=1)`` and ``threads=2``;
* through a hand-run haproxy with the same settings: a copy of the very
  configuration Kiln rendered (``<home>/haproxy/gen-N.cfg``) where only the
  ``bind fd@N`` line (the socket Kiln's agent holds) becomes ``bind
  127.0.0.1:PORT backlog 4096`` (the backlog Kiln's sockets listen with), and
  the stats socket, chroot and master CLI socket are its own; its access log
  goes through the same ring to the same kind of unix stream socket, drained
  by the same reader class, so logging costs the same.

Then three scenarios on the 2-thread router: route changes under load
(backends swapped through ``router.apply`` and one new generation); SIGKILL of
HAProxy's worker and master under load with this process as the supervisor
(``router.exit_fd()`` then ``router.restart()``), compared with the same kill
of the plain haproxy, restarted as fast as possible; and the idle memory of
Kiln's HAProxy plus the CPU of the agent-side access-log reader.

On a shared 2-core machine wrk, the backends and the proxy compete for CPU, so
the absolute numbers say little; the ratios are the point.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import grp
import logging
import os
import re
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from kiln.traffic import Backend, Route
from kiln.traffic.haproxy import HAProxyRouter, RouterSettings
from kiln.traffic.haproxy.access_log import AccessLog
from kiln.traffic.haproxy.router import haproxy_binary
from kiln.traffic.haproxy.runtime_api import RuntimeAPI

BACKEND = r"""
import asyncio, sys
BODY = b"hello from kiln bench\n"
RESP = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s"
        % (len(BODY), BODY))
class Server(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport
        self.buf = b""
    def data_received(self, data):
        self.buf += data
        while (end := self.buf.find(b"\r\n\r\n")) >= 0:
            self.buf = self.buf[end + 4:]
            self.transport.write(RESP)
async def main():
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Server, "127.0.0.1", int(sys.argv[1]), backlog=1024)
    await server.serve_forever()
asyncio.run(main())
"""

SERVICE = "bench"
WRK_THREADS = 2
PROBE_INTERVAL = 0.005
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- small helpers -------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(port: int, timeout: float = 10.0) -> None:
    """Until ``port`` answers an HTTP request with 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
                if s.recv(64).startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            pass
        time.sleep(0.02)
    raise SystemExit(f"bench: 127.0.0.1:{port} does not answer 200 after {timeout:g}s")


def process_cpu(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    return _stat_cpu(Path(f"/proc/{pid}/stat"))


def thread_cpu(tid: int) -> float:
    """utime + stime of one thread of this process, in seconds."""
    return _stat_cpu(Path(f"/proc/self/task/{tid}/stat"))


def _stat_cpu(path: Path) -> float:
    try:
        fields = path.read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (every thread's list)."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            out += [int(c) for c in (task / "children").read_text().split()]
    return out


def haproxy_pids(master: int | None) -> tuple[int, int]:
    """The master and its (one) worker."""
    if master is None:
        raise SystemExit("bench: haproxy is not running")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        workers = children(master)
        if workers:
            return master, workers[0]
        time.sleep(0.01)
    raise SystemExit(f"bench: haproxy master {master} has no worker")


def memory_kib(pids: list[int]) -> tuple[int, int]:
    """(sum of VmRSS, sum of Pss) of ``pids`` in KiB; Pss splits the pages a forked
    worker shares with its master, so the second figure double-counts nothing."""
    rss = pss = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss += int(line.split()[1])
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    pss += int(line.split()[1])
    return rss, pss


def reader_tid(access_log: AccessLog) -> int | None:
    """The native id of an access-log reader thread (the bench reads its CPU time)."""
    thread = getattr(access_log, "_thread", None)
    return thread.native_id if isinstance(thread, threading.Thread) else None


def config_of(master: int) -> Path:
    """The configuration file a HAProxy master runs (its ``-f``)."""
    argv = Path(f"/proc/{master}/cmdline").read_bytes().split(b"\0")
    return Path(argv[argv.index(b"-f") + 1].decode())


def runtime_api(master: int) -> RuntimeAPI:
    """The stats socket of a running HAProxy, read from its configuration."""
    found = re.search(r"^\s*stats socket (\S+)", config_of(master).read_text(), re.M)
    if found is None:
        raise SystemExit(f"bench: haproxy {master} has no stats socket")
    return RuntimeAPI(Path(found.group(1)))


def dropped_logs(api: RuntimeAPI) -> int:
    """Log lines HAProxy could not send (its ring was full)."""
    found = re.search(r"^DroppedLogs: (\d+)", api.command("show info"), re.M)
    return int(found.group(1)) if found else 0


def pooled_connections(api: RuntimeAPI, service: str) -> int:
    """Idle backend connections HAProxy keeps for reuse (``show servers conn``)."""
    total = 0
    for line in api.command(f"show servers conn {service}").splitlines():
        parts = line.split()
        if line.startswith("#") or len(parts) < 13:
            continue
        with contextlib.suppress(ValueError):
            total += int(parts[12])  # idle_cur
    return total


def poll_readable(fd: int, timeout: float) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(int(timeout * 1000)))


# -- wrk -----------------------------------------------------------------------

_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}
_RUNNING: list[subprocess.Popen[str]] = []
"""Every wrk still running, killed by the cleanup whatever happens."""


@dataclass(frozen=True)
class WrkResult:
    rps: float
    p99_ms: float
    requests: int
    non2xx: int = 0
    connect: int = 0
    read: int = 0
    write: int = 0
    timeout: int = 0

    @property
    def errors(self) -> int:
        """Failed requests as wrk counts them: non-2xx/3xx answers and socket errors."""
        return self.non2xx + self.connect + self.read + self.write + self.timeout

    @property
    def socket_errors(self) -> str:
        return (
            f"connect {self.connect}, read {self.read}, write {self.write}, timeout {self.timeout}"
        )

    def merge(self, other: WrkResult) -> WrkResult:
        """Two wrk run side by side: throughputs add, p99 is the worse of the two."""
        return WrkResult(
            self.rps + other.rps,
            max(self.p99_ms, other.p99_ms),
            self.requests + other.requests,
            self.non2xx + other.non2xx,
            self.connect + other.connect,
            self.read + other.read,
            self.write + other.write,
            self.timeout + other.timeout,
        )


def parse_wrk(output: str) -> WrkResult:
    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    p99 = re.search(r"^\s+99%\s+([\d.]+)(us|ms|s)\s*$", output, re.M)
    total = re.search(r"(\d+) requests in", output)
    if rps is None or p99 is None or total is None:
        raise SystemExit(f"bench: cannot read wrk output:\n{output}")
    sock = re.search(r"connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    connect, read, write, timeout = (int(n) for n in sock.groups()) if sock else (0, 0, 0, 0)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    return WrkResult(
        float(rps.group(1)),
        float(p99.group(1)) * _UNITS[p99.group(2)],
        int(total.group(1)),
        int(non2xx.group(1)) if non2xx else 0,
        connect,
        read,
        write,
        timeout,
    )


class Wrk:
    """One wrk in the background."""

    def __init__(self, port: int, duration: float, connections: int, threads: int) -> None:
        argv = [
            "wrk",
            f"-t{threads}",
            f"-c{connections}",
            f"-d{max(round(duration), 1)}s",
            "--latency",
            f"http://127.0.0.1:{port}/",
        ]
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        _RUNNING.append(self.proc)

    def running(self) -> bool:
        return self.proc.poll() is None

    def result(self) -> WrkResult:
        out, _ = self.proc.communicate()
        _RUNNING.remove(self.proc)
        if self.proc.returncode != 0:
            raise SystemExit(f"bench: wrk failed ({self.proc.returncode}):\n{out}")
        return parse_wrk(out)


def run_wrk(ports: list[int], duration: float, connections: int, warmup: float) -> WrkResult:
    """``wrk -t2`` against one port, or one ``wrk -t1`` per port side by side."""
    threads = WRK_THREADS // len(ports)
    share = max(connections // len(ports), threads)
    if warmup > 0:
        for w in [Wrk(p, warmup, share, threads) for p in ports]:
            w.result()
    runs = [Wrk(p, duration, share, threads) for p in ports]
    results = [w.result() for w in runs]
    merged = results[0]
    for r in results[1:]:
        merged = merged.merge(r)
    return merged


# -- a client that opens a new connection every 5 ms ---------------------------


@dataclass(frozen=True)
class Sample:
    start: float
    wait: float
    outcome: str  # ok | refused | reset | timeout | status | error


class Probe:
    """Opens a new connection every ``interval`` and asks for ``/`` (Connection: close),
    however long the earlier ones take: a gap in service shows as a long wait, a closed
    port as ``refused``."""

    REQUEST = b"GET / HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n"

    def __init__(self, port: int, interval: float = PROBE_INTERVAL, timeout: float = 10.0):
        self.port = port
        self.interval = interval
        self.timeout = timeout
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-probe", daemon=True)

    def __enter__(self) -> Probe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(self.timeout + 5)

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        tasks: set[asyncio.Task[None]] = set()
        due = time.monotonic()
        while not self._stop.is_set():
            task = asyncio.create_task(self._one())
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            due += self.interval
            await asyncio.sleep(max(0.0, due - time.monotonic()))
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _one(self) -> None:
        start = time.monotonic()
        outcome = "ok"
        try:
            async with asyncio.timeout(self.timeout):
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                try:
                    writer.write(self.REQUEST)
                    answer = await reader.read()
                finally:
                    writer.close()
            if not answer.startswith(b"HTTP/1.1 200"):
                outcome = "status" if answer else "reset"
        except ConnectionRefusedError:
            outcome = "refused"
        except (ConnectionResetError, BrokenPipeError):
            outcome = "reset"
        except TimeoutError:
            outcome = "timeout"
        except OSError:
            outcome = "error"
        self.samples.append(Sample(start, time.monotonic() - start, outcome))

    def between(self, start: float, end: float) -> list[Sample]:
        return [s for s in self.samples if start <= s.start < end]


# -- the peer: a plain haproxy on a copy of Kiln's configuration ---------------


class Peer:
    """haproxy started by hand from a copy of the configuration Kiln rendered."""

    def __init__(self, kiln_config: Path, workdir: Path, port: int) -> None:
        self.dir = workdir
        self.port = port
        self.dir.mkdir(mode=0o700)
        text = kiln_config.read_text()
        self.stats = self.dir / "stats.sock"
        self.master_cli = self.dir / "master.sock"
        gid = _haproxy_gid()
        changes: list[tuple[str, str]] = []

        def swap(pattern: str, new: str) -> None:
            nonlocal text
            match = re.search(pattern, text, re.M)
            if match is None:
                raise SystemExit(f"bench: no {pattern!r} in {kiln_config}")
            old = match.group(0)
            text = text.replace(old, new, 1)
            changes.append((old.strip(), new.strip()))

        swap(r"^\s*bind fd@\d+\s*$", f"    bind 127.0.0.1:{port} backlog 4096")
        swap(r"^\s*stats socket \S+", f"    stats socket {self.stats}")
        chroot = re.search(r"^\s*chroot \S+", text, re.M)
        if chroot is not None:
            root = self.dir / "root"
            root.mkdir()
            if gid is not None and os.geteuid() == 0:
                os.chown(root, 0, gid)
                root.chmod(0o750)
            swap(r"^\s*chroot \S+", f"    chroot {root}")
            log_path = root / "log.sock"  # the config's "log /log.sock" is inside the chroot
        else:
            log_path = self.dir / "log.sock"
            swap(r"^\s*log /\S+", f"    log {log_path}")
        self.changes = changes
        self.config = self.dir / "haproxy.cfg"
        self.config.write_text(text)
        self.access_log = AccessLog(log_path, gid if os.geteuid() == 0 else None)
        self.logfile = self.dir / "haproxy.log"
        self.argv = [
            haproxy_binary(),
            "-W",
            "-S",
            f"{self.master_cli},mode,600",
            "-f",
            str(self.config),
        ]
        self.proc: subprocess.Popen[bytes] | None = None
        self._old: list[subprocess.Popen[bytes]] = []
        self._pidfd: int | None = None

    def start(self, wait: bool = True) -> None:
        """As Kiln starts it (``-W -S <master socket>``), minus the inherited socket."""
        self.access_log.start()
        argv = self.argv
        with open(self.logfile, "ab") as out:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._close_pidfd()
        self._pidfd = os.pidfd_open(self.proc.pid)
        if wait:
            wait_http(self.port)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def exit_fd(self) -> int:
        assert self._pidfd is not None
        return self._pidfd

    def restart(self) -> None:
        """What a supervisor without the socket can do: start it again at once, and
        (as Kiln's ``restart``) tell a worker the dead master left to finish up."""
        if self.proc is not None:
            self.proc.poll()
            self._signal(signal.SIGUSR1)
            self._old.append(self.proc)
        self.start(wait=False)

    def _signal(self, sig: int, proc: subprocess.Popen[bytes] | None = None) -> None:
        proc = proc or self.proc
        if proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, sig)

    def _close_pidfd(self) -> None:
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None

    def stop(self) -> None:
        if self.proc is not None:
            self._signal(signal.SIGUSR1)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.proc.wait(5)
            self._signal(signal.SIGKILL)  # a worker that outlived its master
            self.proc = None
        for old in self._old:
            self._signal(signal.SIGKILL, old)
            old.wait(5)
        self._old = []
        self._close_pidfd()
        self.access_log.close()


def _haproxy_gid() -> int | None:
    try:
        return grp.getgrnam("haproxy").gr_gid
    except KeyError:
        return None


# -- Kiln's router ---------------------------------------------------------------


def kiln_route(listen: int, backends: list[Backend], name: str = SERVICE) -> Route:
    return Route(name=name, listen=listen, backends=tuple(backends))


@contextlib.contextmanager
def kiln_router(root: Path, threads: int) -> Iterator[HAProxyRouter]:
    home = root / f"home-t{threads}"
    home.mkdir(mode=0o700)
    router = HAProxyRouter(home, RouterSettings(bind="127.0.0.1", threads=threads))
    try:
        router.start()
        yield router
    finally:
        router.stop()


# -- the throughput table -----------------------------------------------------


@dataclass
class Row:
    name: str
    result: WrkResult
    cpu_seconds: float | None = None
    reader_seconds: float | None = None
    log_lines: int | None = None
    dropped_logs: int | None = None
    pooled: int | None = None

    def per_request(self, seconds: float | None) -> str:
        if seconds is None or not self.result.requests:
            return "-"
        return f"{seconds / self.result.requests * 1e6:.1f}"


@dataclass
class Target:
    """Something wrk drives: backends directly, or a HAProxy (whose worker's CPU, log
    reader and dropped log lines are read around the runs)."""

    name: str
    ports: list[int]
    worker: int | None = None
    access_log: AccessLog | None = None
    api: RuntimeAPI | None = None
    service: str = SERVICE

    def snapshot(self) -> tuple[float, float, int, int]:
        tid = reader_tid(self.access_log) if self.access_log is not None else None
        return (
            process_cpu(self.worker) if self.worker is not None else 0.0,
            thread_cpu(tid) if tid is not None else 0.0,
            self.access_log.lines if self.access_log is not None else 0,
            dropped_logs(self.api) if self.api is not None and self.access_log is not None else 0,
        )


def measure(targets: list[Target], slices: int, connections: int, warmup: int) -> list[Row]:
    """``slices`` one-second wrk runs per target, interleaved (A B C, C B A, ...) so
    that the load other programs put on the machine falls on every target alike:
    req/s is the mean over the slices, p99 the median of the slices' p99, errors add."""
    if warmup > 0:
        for target in targets:
            run_wrk(target.ports, warmup, connections, 0)
        time.sleep(0.2)  # the warm-up's last log lines
    before = {t.name: t.snapshot() for t in targets}
    results: dict[str, list[WrkResult]] = {t.name: [] for t in targets}
    for i in range(slices):
        for target in targets if i % 2 == 0 else targets[::-1]:
            results[target.name].append(run_wrk(target.ports, 1, connections, 0))
    pooled = {
        t.name: pooled_connections(t.api, t.service) if t.api is not None else None for t in targets
    }
    time.sleep(0.3)  # the last log lines
    rows = []
    for target in targets:
        runs = results[target.name]
        merged = WrkResult(
            statistics.fmean(r.rps for r in runs),
            statistics.median(r.p99_ms for r in runs),
            sum(r.requests for r in runs),
            sum(r.non2xx for r in runs),
            sum(r.connect for r in runs),
            sum(r.read for r in runs),
            sum(r.write for r in runs),
            sum(r.timeout for r in runs),
        )
        cpu0, reader0, lines0, dropped0 = before[target.name]
        cpu1, reader1, lines1, dropped1 = target.snapshot()
        logs = target.access_log is not None
        rows.append(
            Row(
                target.name,
                merged,
                cpu1 - cpu0 if target.worker is not None else None,
                reader1 - reader0 if logs else None,
                lines1 - lines0 if logs else None,
                dropped1 - dropped0 if logs else None,
                pooled[target.name],
            )
        )
    return rows


@dataclass
class Memory:
    threads: int
    idle0: tuple[int, int]
    idle2: tuple[int, int]
    loaded: tuple[int, int] = (0, 0)


@dataclass
class ThreadRun:
    threads: int
    direct: Row
    kiln: Row
    peer: Row
    memory: Memory
    changes: list[tuple[str, str]] = field(default_factory=list)
    peer_argv: list[str] = field(default_factory=list)


# -- scenario a: route changes under load --------------------------------------


@dataclass
class ChangeReport:
    configured: Row
    runtime: Row
    during: WrkResult
    applies: list[float]
    swaps: int
    generation_switch: float
    cut: int


def route_changes(
    router: HAProxyRouter,
    port: int,
    addresses: list[str],
    duration: int,
    connections: int,
) -> ChangeReport:
    """Steady state first, on two services of one generation with the same backends:
    one with its servers from the configuration, one whose servers were replaced
    through the runtime API (``add server``), each run interleaved. Then, while wrk
    runs on the second, replace each backend by a new instance (same process, new
    id) again and again, the way a rolling update does; halfway, a third service
    makes a new HAProxy generation."""
    static_port = free_port()
    configured = [Backend(f"b{k}", a) for k, a in enumerate(addresses)]
    router.apply(kiln_route(static_port, configured, f"{SERVICE}-static"))  # new generation
    serial = 1
    current = [Backend(f"i{k}-{serial}", a) for k, a in enumerate(addresses)]
    router.apply(kiln_route(port, current))  # runtime API: add server, del server
    wait_http(port)
    wait_http(static_port)
    api = runtime_api(haproxy_pids(router.pid)[0])
    static_row, runtime_row = measure(
        [
            Target("servers from the config", [static_port], api=api, service=f"{SERVICE}-static"),
            Target("servers added at run time", [port], api=api),
        ],
        duration,
        connections,
        1,
    )

    applies: list[float] = []
    switched = 0.0
    cut = swaps = 0
    other = free_port()

    def apply(backends: list[Backend]) -> None:
        start = time.monotonic()
        router.apply(kiln_route(port, backends))
        applies.append(time.monotonic() - start)

    wrk = Wrk(port, duration, connections, WRK_THREADS)
    started = time.monotonic()
    while wrk.running():
        serial += 1
        for k, address in enumerate(addresses):
            old, new = current[k], Backend(f"i{k}-{serial}", address)
            others = [b for b in current if b is not old]
            apply([*others, old, new])
            apply([*others, Backend(old.id, old.address, state="draining"), new])
            cut += router.drain(SERVICE, old.id, 10.0)
            apply([*others, new])
            current[k] = new
        swaps += 1
        if not switched and time.monotonic() - started > duration / 2:
            start = time.monotonic()
            router.apply(kiln_route(other, current, f"{SERVICE}-2"))
            switched = time.monotonic() - start
    during = wrk.result()
    router.remove(f"{SERVICE}-2")
    router.remove(f"{SERVICE}-static")
    return ChangeReport(static_row, runtime_row, during, applies, swaps, switched, cut)


# -- scenario b: SIGKILL under load ---------------------------------------------


@dataclass
class KillReport:
    what: str
    wrk: WrkResult
    refused: int
    probe_errors: int
    probes: int
    longest_wait: float
    steady_wait: float
    exit_seen: float
    serving_again: float


def kill_under_load(
    what: str,
    port: int,
    victim: int,
    exit_fd: int,
    restart: Callable[[], None],
    duration: float,
    connections: int,
) -> KillReport:
    """wrk and the probe run; ``victim`` gets SIGKILL; this process, as the
    supervisor, waits for the master's pidfd and restarts at once."""
    with Probe(port) as probe:
        wrk = Wrk(port, duration, connections, WRK_THREADS)
        time.sleep(duration * 0.4)
        killed = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        if not poll_readable(exit_fd, 10):
            raise SystemExit(f"bench: {what}: the master did not exit within 10 s")
        seen = time.monotonic()
        restart()
        restarted = time.monotonic()
        result = wrk.result()
    after = probe.between(killed, float("inf"))
    before = probe.between(0.0, killed)
    return KillReport(
        what,
        result,
        sum(s.outcome == "refused" for s in after),
        sum(s.outcome not in ("ok", "refused") for s in after),
        len(after),
        max((s.wait for s in after), default=0.0),
        max((s.wait for s in before), default=0.0),
        seen - killed,
        restarted - killed,
    )


# -- the run -----------------------------------------------------------------


def start_backends(procs: list[subprocess.Popen[bytes]]) -> list[int]:
    ports = [free_port(), free_port()]
    for port in ports:
        procs.append(subprocess.Popen([sys.executable, "-c", BACKEND, str(port)]))
    for port in ports:
        wait_http(port)
    return ports


def settle() -> None:
    time.sleep(0.3)


def throughput_at(
    root: Path,
    threads: int,
    backend_ports: list[int],
    args: argparse.Namespace,
    stack: contextlib.ExitStack,
    scenarios: bool,
) -> tuple[ThreadRun, ChangeReport | None, list[KillReport]]:
    router = stack.enter_context(kiln_router(root, threads))
    settle()
    idle0 = memory_kib(list(haproxy_pids(router.pid)))
    addresses = [f"127.0.0.1:{p}" for p in backend_ports]
    backends = [Backend(f"b{k}", a) for k, a in enumerate(addresses)]
    port, second = free_port(), free_port()
    router.apply(kiln_route(port, backends))
    router.apply(kiln_route(second, backends, f"{SERVICE}-2"))
    wait_http(port)
    settle()
    idle2 = memory_kib(list(haproxy_pids(router.pid)))
    router.remove(f"{SERVICE}-2")
    wait_http(port)
    assert router.pid is not None
    peer = Peer(config_of(router.pid), root / f"peer-t{threads}", free_port())
    stack.callback(peer.stop)
    peer.start()

    d, c = args.duration, args.connections
    master, worker = haproxy_pids(router.pid)
    peer_master, peer_worker = haproxy_pids(peer.pid)
    direct_row, kiln_row, peer_row = measure(
        [
            Target(f"direct b0+b1 @t{threads}", backend_ports),
            Target(f"kiln t{threads}", [port], worker, router.access_log, runtime_api(master)),
            Target(
                f"haproxy t{threads}",
                [peer.port],
                peer_worker,
                peer.access_log,
                runtime_api(peer_master),
            ),
        ],
        d,
        c,
        args.warmup,
    )
    memory = Memory(threads, idle0, idle2, memory_kib(list(haproxy_pids(router.pid))))
    run = ThreadRun(threads, direct_row, kiln_row, peer_row, memory, peer.changes, peer.argv)
    if not scenarios:
        return run, None, []

    print(f"scenario a: route changes under load (threads={threads})", flush=True)
    change = route_changes(router, port, addresses, d, c)
    wait_http(port)

    print("scenario b: SIGKILL under load", flush=True)
    kills: list[KillReport] = []
    for role in ("worker", "master"):
        master, worker = haproxy_pids(router.pid)
        fd = router.exit_fd()
        assert fd is not None
        kills.append(
            kill_under_load(
                f"kiln, {role} killed",
                port,
                worker if role == "worker" else master,
                fd,
                functools.partial(router.restart, f"bench: {role} SIGKILL"),
                d,
                c,
            )
        )
        wait_http(port)
        settle()
    for role in ("worker", "master"):
        master, worker = haproxy_pids(peer.pid)
        kills.append(
            kill_under_load(
                f"haproxy, {role} killed",
                peer.port,
                worker if role == "worker" else master,
                peer.exit_fd(),
                peer.restart,
                d,
                c,
            )
        )
        wait_http(peer.port)
        settle()
    return run, change, kills


def leftovers(mark: str) -> list[str]:
    """Live processes whose command line names this run's directory: "pid argv"."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if mark in cmdline and int(proc.name) != os.getpid():
            found.append(f"{proc.name} {cmdline.replace(chr(0), ' ').strip()}")
    return found


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--duration", type=int, default=5, help="seconds per wrk run (wrk takes whole seconds)"
    )
    parser.add_argument("--connections", type=int, default=64, help="wrk connections")
    parser.add_argument("--quick", action="store_true", help="a short smoke run (1 s runs)")
    args = parser.parse_args()
    if args.quick:
        args.duration = 1
    args.duration = max(args.duration, 1)
    args.warmup = 0 if args.quick else 1
    for tool in ("wrk", "haproxy"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            raise SystemExit(f"bench: {tool} is not installed (apt-get install {tool})")
    signal.signal(signal.SIGTERM, _terminate)
    logging.basicConfig(
        level=logging.WARNING, format="  (%(name)s: %(message)s)", stream=sys.stdout
    )

    root = Path(tempfile.mkdtemp(prefix="kiln-bench-proxy-"))
    procs: list[subprocess.Popen[bytes]] = []
    runs: list[ThreadRun] = []
    change: ChangeReport | None = None
    kills: list[KillReport] = []
    try:
        with contextlib.ExitStack() as stack:
            stack.callback(_kill_all, procs)
            backend_ports = start_backends(procs)
            d, c = args.duration, args.connections
            print(f"direct b0: wrk -t2 -c{c} -d{d}s", flush=True)
            direct_one = Row("direct b0", run_wrk(backend_ports[:1], d, c, args.warmup))
            for threads in (1, 2):
                print(f"direct, kiln and haproxy, threads={threads}", flush=True)
                with contextlib.ExitStack() as inner:
                    run, ch, ks = throughput_at(
                        root, threads, backend_ports, args, inner, scenarios=threads == 2
                    )
                runs.append(run)
                if ch is not None:
                    change, kills = ch, ks
    finally:
        for proc in list(_RUNNING):
            proc.kill()
            proc.wait()
        left = leftovers(str(root))
        for entry in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry.split()[0]), signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)
        if left:
            print(f"bench: processes left behind, killed: {left}", file=sys.stderr)

    report(args, direct_one, runs, change, kills)
    return 1 if left else 0


def _kill_all(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- the report ----------------------------------------------------------------


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def report(
    args: argparse.Namespace,
    direct: Row,
    runs: list[ThreadRun],
    change: ChangeReport | None,
    kills: list[KillReport],
) -> None:
    d, c = args.duration, args.connections
    slices = f"{d} one-second run{'s' if d > 1 else ''}"
    print()
    print(
        f"wrk -t2 -c{c}, keep-alive GET /, 22-byte body, 2 backends (one asyncio process each);"
        f"\n  per thread count, direct b0+b1, kiln and haproxy each get {slices}, "
        "interleaved (A B C, C B A, ...),\n  after a "
        f"{args.warmup} s warm-up: req/s is their mean, p99 the median of their p99s"
    )
    print(
        f"  direct b0: wrk -t2 -d{d}s on one backend; direct b0+b1: one wrk -t1 -c{c // 2} "
        "per backend side by side (req/s added, p99 the worse of the two)"
    )
    print(
        "  kiln tN: HAProxyRouter(home, RouterSettings(bind='127.0.0.1', threads=N)), "
        "one service on both backends"
    )
    if runs:
        print(
            "  haproxy tN: a second haproxy, started as Kiln starts its own, on a copy of the "
            "gen-N.cfg Kiln rendered at N threads:\n      " + " ".join(runs[0].peer_argv)
        )
        print("    every line of the copy is Kiln's but:")
        for old, new in runs[0].changes:
            print(f"      {old}  ->  {new}")
        print(
            "    (so the same nbthread, maxconn, timeouts, retries/retry-on, balance, options, "
            "log-format and user/chroot;\n     its log lines go to a second kiln "
            "AccessLog reader in this process, so logging costs the same)"
        )
    print()
    print(
        f"{'target':<17}{'req/s':>9}{'p99 ms':>9}{'errors':>7}{'cpu us/req':>11}"
        f"{'reader us/req':>14}{'log lines/req':>14}{'logs dropped':>13}"
    )
    for row in [direct, *(r for run in runs for r in (run.direct, run.kiln, run.peer))]:
        r = row.result
        lines = f"{row.log_lines / r.requests:.2f}" if row.log_lines and r.requests else "-"
        dropped = "-" if row.dropped_logs is None else str(row.dropped_logs)
        print(
            f"{row.name:<17}{r.rps:>9.0f}{r.p99_ms:>9.2f}{r.errors:>7}"
            f"{row.per_request(row.cpu_seconds):>11}{row.per_request(row.reader_seconds):>14}"
            f"{lines:>14}{dropped:>13}"
        )
    print(
        "  cpu: HAProxy worker (all threads) per request; reader: the agent-side access-log "
        "thread; logs dropped: HAProxy's DroppedLogs"
    )
    for run in runs:
        base, k, p = run.direct.result, run.kiln.result, run.peer.result
        print(
            f"threads={run.threads}: kiln/direct req/s {k.rps / base.rps:.2f}, "
            f"p99 {k.p99_ms / base.p99_ms:.2f}   kiln/haproxy req/s {k.rps / p.rps:.2f}, "
            f"p99 {k.p99_ms / p.p99_ms:.2f}"
        )

    if change is not None:
        w = change.during
        applies = sorted(change.applies)
        print()
        print(
            f"a. route changes under load (kiln, threads=2). Steady state: two services of one "
            f"generation on the same backends,\n   {slices} each, interleaved; one "
            "has its servers from the configuration, the other had them replaced through\n"
            "   router.apply (the runtime API's 'add server' then 'del server')"
        )
        for row in (change.configured, change.runtime):
            r = row.result
            print(
                f"   steady, {row.name:<26}{r.rps:>7.0f} req/s, p99 {r.p99_ms:6.2f} ms, "
                f"failed {r.errors}, idle backend connections kept for reuse: {row.pooled}"
            )
        print(
            f"   while changing (wrk -d{d}s on the second service): {change.swaps} rounds "
            "replacing both backends by new instances\n   (apply new ready, apply old "
            f"draining, drain, apply without old: {len(applies)} router.apply calls) and, "
            "halfway, a new generation (a third service)"
        )
        print(
            f"   while changing:{'':<20}{w.rps:>7.0f} req/s, p99 {w.p99_ms:6.2f} ms, "
            f"failed {w.errors} (non-2xx {w.non2xx}; {w.socket_errors}); target 0"
        )
        if applies:
            print(
                f"   router.apply through the runtime API: median {_ms(statistics.median(applies))}"
                f", max {_ms(applies[-1])}; the new generation: {_ms(change.generation_switch)};"
                f" connections cut by drain: {change.cut}"
            )
        s_, r_ = change.configured.result, change.runtime.result
        print(
            f"   runtime-added/configured servers: req/s {r_.rps / s_.rps:.2f}, "
            f"p99 {r_.p99_ms / s_.p99_ms:.2f}; while changing/steady (runtime-added): "
            f"p99 {w.p99_ms / r_.p99_ms:.2f}"
        )

    if kills:
        print()
        print(
            f"b. SIGKILL under load, wrk -t2 -c{c} -d{d}s, kill at 40 %; this process is the "
            "supervisor (poll() on the master's pidfd,\n   then restart at once); a probe "
            f"opens a new connection every {PROBE_INTERVAL * 1000:g} ms and sends one GET"
        )
        print(
            f"   {'':<24}{'wrk connect':>12}{'read+write':>11}{'timeout':>8}{'non-2xx':>8}"
            f"{'probe refused':>14}{'reset':>6}{'longest wait':>13}{'steady':>9}"
            f"{'exit seen':>10}{'restarted':>10}"
        )
        for kill in kills:
            w = kill.wrk
            print(
                f"   {kill.what:<24}{w.connect:>12}{w.read + w.write:>11}{w.timeout:>8}"
                f"{w.non2xx:>8}{f'{kill.refused}/{kill.probes}':>14}{kill.probe_errors:>6}"
                f"{kill.longest_wait * 1000:>10.1f} ms{kill.steady_wait * 1000:>6.1f} ms"
                f"{kill.exit_seen * 1000:>7.1f} ms{kill.serving_again * 1000:>7.1f} ms"
            )
        print(
            "   probe refused: ECONNREFUSED among the probes started after the kill (target 0 "
            "for kiln); reset: probes cut or\n   answered badly; longest wait: the slowest "
            "probe after the kill (steady: before it); exit seen / restarted: after the kill."
            "\n   wrk 4.1 counts a refused connect as a write error, not a connect error: with "
            f"kiln read+write stays near the\n   {c} connections that had a request in flight "
            "on the killed worker; with a closed port wrk retries in a loop and it climbs."
        )

    if runs:
        print()
        print("c. memory of Kiln's HAProxy, master + worker (sum of VmRSS / sum of Pss, MiB)")
        for run in runs:
            m = run.memory
            print(
                f"   threads={m.threads}: 0 routes {_mib(m.idle0)}, 2 routes {_mib(m.idle2)}, "
                f"1 route after the wrk runs {_mib(m.loaded)}"
            )
        for run in runs:
            row = run.kiln
            if row.reader_seconds is not None:
                print(
                    f"   access-log reader (a thread of this process) during kiln t{run.threads}: "
                    f"{row.reader_seconds:.2f} s CPU in {d} s ({row.reader_seconds / d * 100:.0f} %"
                    f" of a core), {row.per_request(row.reader_seconds)} us/request (HAProxy "
                    f"worker: {row.per_request(row.cpu_seconds)} us/request)"
                )


def _mib(pair: tuple[int, int]) -> str:
    return f"{pair[0] / 1024:.1f}/{pair[1] / 1024:.1f}"


if __name__ == "__main__":
    sys.exit(main())
