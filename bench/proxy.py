"""Throughput and p99 latency of the Kiln proxy against a direct backend and haproxy.

Run: ``.venv/bin/python bench/proxy.py [--duration 5] [--connections 32]``.

Starts two small keep-alive HTTP backends (asyncio Protocols, one process
each), the Kiln proxy in front of both, and haproxy (one thread, like Kiln's
one event loop) in front of both, then drives each with ``wrk`` in the same
run and prints a table plus the ratios kiln/direct and kiln/haproxy. On a
shared 2-core machine wrk, the backends and the proxy compete for CPU, so
the absolute numbers say little; the ratios are the point.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from kiln.traffic import Backend, ProxyClient, Route, proxy_command

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


@dataclass(frozen=True)
class Result:
    name: str
    rps: float
    p99_ms: float
    errors: int
    requests: int = 0
    cpu_seconds: float | None = None

    @property
    def cpu_us_per_request(self) -> float | None:
        """CPU the proxy process spent per request: steadier than req/s on a shared machine."""
        if self.cpu_seconds is None or not self.requests:
            return None
        return self.cpu_seconds / self.requests * 1e6


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"bench: nothing listens on 127.0.0.1:{port} after {timeout}s")


def wrk_command(url: str, duration: float, connections: int, threads: int) -> list[str]:
    return [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{duration:g}s",
        "--latency",
        url,
    ]


def haproxy_config(listen: int, backends: list[int]) -> str:
    servers = "\n".join(f"    server b{i} 127.0.0.1:{p}" for i, p in enumerate(backends))
    return f"""global
    maxconn 4096
    nbthread 1
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    option http-keep-alive
frontend bench
    bind 127.0.0.1:{listen}
    default_backend pool
backend pool
    balance roundrobin
    http-reuse always
{servers}
"""


def haproxy_command(config: Path) -> list[str]:
    return ["haproxy", "-db", "-f", str(config)]


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def parse_wrk(name: str, output: str) -> Result:
    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    p99 = re.search(r"^\s+99%\s+([\d.]+)(us|ms|s)\s*$", output, re.M)
    if rps is None or p99 is None:
        raise SystemExit(f"bench: cannot read wrk output for {name}:\n{output}")
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", output))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if non2xx:
        errors += int(non2xx.group(1))
    total = re.search(r"(\d+) requests in", output)
    return Result(
        name,
        float(rps.group(1)),
        float(p99.group(1)) * _UNITS[p99.group(2)],
        errors,
        int(total.group(1)) if total else 0,
    )


def run_wrk(
    name: str, port: int, duration: float, connections: int, threads: int, pid: int | None = None
) -> Result:
    url = f"http://127.0.0.1:{port}/"
    subprocess.run(wrk_command(url, 1, connections, threads), capture_output=True, check=True)
    cpu_before = process_cpu_seconds(pid) if pid is not None else 0.0
    out = subprocess.run(
        wrk_command(url, duration, connections, threads),
        capture_output=True,
        text=True,
        check=True,
    )
    result = parse_wrk(name, out.stdout)
    if pid is None:
        return result
    return replace(result, cpu_seconds=process_cpu_seconds(pid) - cpu_before)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--loop",
        choices=("auto", "uvloop", "asyncio"),
        default="auto",
        help="the Kiln proxy's event loop (its --loop)",
    )
    args = parser.parse_args()
    for tool in ("wrk", "haproxy"):
        if shutil.which(tool) is None:
            raise SystemExit(f"bench: {tool} is not installed (apt-get install {tool})")

    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="kiln-bench-") as tmp:
        work = Path(tmp)
        try:
            backend_ports = [free_port(), free_port()]
            for port in backend_ports:
                procs.append(subprocess.Popen([sys.executable, "-c", BACKEND, str(port)]))
            for port in backend_ports:
                wait_port(port)

            control = work / "proxy.sock"
            kiln_port = free_port()
            procs.append(
                subprocess.Popen(
                    [
                        *proxy_command(control, work / "proxy.json"),
                        "--host",
                        "127.0.0.1",
                        "--log-level",
                        "WARNING",
                        "--loop",
                        args.loop,
                    ]
                )
            )
            kiln_pid = procs[-1].pid
            with ProxyClient(control) as client:
                client.wait_ready(10)
                client.put_service(
                    Route(
                        name="bench",
                        listen=kiln_port,
                        backends=tuple(
                            Backend(f"b{i}", f"127.0.0.1:{p}") for i, p in enumerate(backend_ports)
                        ),
                    )
                )
            wait_port(kiln_port)

            haproxy_port = free_port()
            cfg = work / "haproxy.cfg"
            cfg.write_text(haproxy_config(haproxy_port, backend_ports))
            procs.append(subprocess.Popen(haproxy_command(cfg), stdout=subprocess.DEVNULL))
            haproxy_pid = procs[-1].pid
            wait_port(haproxy_port)

            d, c, t = args.duration, args.connections, args.threads
            results = [
                run_wrk("direct", backend_ports[0], d, c, t),
                run_wrk("kiln", kiln_port, d, c, t, kiln_pid),
                run_wrk("haproxy", haproxy_port, d, c, t, haproxy_pid),
            ]
        finally:
            for proc in reversed(procs):
                proc.terminate()
            for proc in procs:
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

    print(
        f"wrk -t{args.threads} -c{args.connections} -d{args.duration:g}s, keep-alive, "
        f"22-byte body, 2 backends, kiln --loop {args.loop}"
    )
    print(f"{'target':<10}{'req/s':>12}{'p99 ms':>10}{'errors':>8}{'cpu us/req':>12}")
    for r in results:
        cpu = r.cpu_us_per_request
        cpu_text = "-" if cpu is None else f"{cpu:.1f}"
        print(f"{r.name:<10}{r.rps:>12.0f}{r.p99_ms:>10.2f}{r.errors:>8}{cpu_text:>12}")
    by = {r.name: r for r in results}
    print(
        f"kiln/direct  req/s {by['kiln'].rps / by['direct'].rps:.2f}   "
        f"p99 {by['kiln'].p99_ms / by['direct'].p99_ms:.2f}"
    )
    print(
        f"kiln/haproxy req/s {by['kiln'].rps / by['haproxy'].rps:.2f}   "
        f"p99 {by['kiln'].p99_ms / by['haproxy'].p99_ms:.2f}"
    )
    kiln_cpu, haproxy_cpu = by["kiln"].cpu_us_per_request, by["haproxy"].cpu_us_per_request
    if kiln_cpu and haproxy_cpu:
        print(f"kiln/haproxy cpu per request {kiln_cpu / haproxy_cpu:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
