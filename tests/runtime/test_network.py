"""Each instance has its own network namespace and address on the home's bridge.

What the rules promise, tried with real TCP from inside real instances: the host
reaches every instance (that is how the proxy does it); instances do not reach
one another; the host answers them only on published ports (the proxy's
listeners), never on its loopback or other addresses; and only ``outbound``
instances reach anything beyond the host.
"""

from __future__ import annotations

import ipaddress
import json
import secrets
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from runtime_contract import AppSpec, http_get

from kiln.oci.network import BridgeNetwork
from kiln.runtime import HostResources, InstanceHandle
from kiln.runtime.local import LocalRuntime
from leftovers import veth_name

GREETING = "hello-from-the-host"


class TcpServer:
    """Answers every connection with one line, then closes it."""

    def __init__(self, host: str) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen()
        self.port = int(self.sock.getsockname()[1])
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.sendall(f"{GREETING}\n".encode())

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def tcp_server() -> Iterator[type[TcpServer]]:
    started: list[TcpServer] = []

    class Tracked(TcpServer):
        def __init__(self, host: str) -> None:
            super().__init__(host)
            started.append(self)

    yield Tracked
    for server in started:
        server.close()


def connect(runtime: LocalRuntime, handle: InstanceHandle, host: str, port: int) -> str:
    """What a TCP client inside the instance gets from host:port (1 s connect timeout)."""
    code, output = runtime.exec(
        handle, ["sh", "-c", f"nc -w 1 {host} {port} </dev/null 2>&1 || true"], 10
    )
    assert code == 0, output
    return output.strip()


def reached(output: str) -> bool:
    return output == GREETING


def blocked(output: str) -> bool:
    """Dropped (timed out) or refused: anything but the greeting."""
    return output != GREETING and ("timed out" in output or "can't connect" in output)


def test_each_instance_has_its_own_address_on_the_homes_bridge(
    local_runtime: LocalRuntime, make_spec: AppSpec, home: Path
) -> None:
    network = BridgeNetwork(home)
    specs = [make_spec(["sh", "-c", "exec httpd -f -p $PORT -h /www"]) for _ in range(2)]
    handles = [local_runtime.start(spec) for spec in specs]
    addresses = [h.host for h in handles]
    subnet = network.subnet()
    assert len(set(addresses)) == 2
    assert all(ipaddress.ip_address(a) in subnet for a in addresses)
    assert network.gateway() not in addresses
    for spec, handle in zip(specs, handles, strict=True):
        assert http_get(handle, spec.port) == b"hello from kiln\n"
        code, shown = local_runtime.exec(handle, ["ip", "-4", "-o", "addr", "show", "eth0"], 5)
        assert code == 0 and f"inet {handle.host}/{subnet.prefixlen}" in shown
        veth = Path("/sys/class/net") / veth_name(home, spec.instance_id)
        assert (veth / "master").resolve().name == network.bridge


def test_an_instance_cannot_reach_another_instance_but_the_host_can(
    local_runtime: LocalRuntime, make_spec: AppSpec
) -> None:
    server_spec = make_spec(["sh", "-c", "exec nc -ll -p $PORT -e echo " + GREETING])
    server = local_runtime.start(server_spec)
    client = local_runtime.start(make_spec(["sleep", "30"]))
    deadline = time.monotonic() + 5
    while (got := _host_connect(server.host, server_spec.port)) != GREETING:
        assert time.monotonic() < deadline, got
        time.sleep(0.05)
    assert blocked(connect(local_runtime, client, server.host, server_spec.port))


def _host_connect(host: str, port: int) -> str:
    try:
        with socket.create_connection((host, port), timeout=1) as conn:
            return conn.makefile().readline().strip()
    except OSError as e:
        return str(e)


def test_the_host_answers_an_instance_only_on_published_ports(
    local_runtime: LocalRuntime, make_spec: AppSpec, home: Path, tcp_server: type[TcpServer]
) -> None:
    """The proxy listens on all addresses; the instance may reach it at the gateway only
    once its port is published. The host's loopback is never the instance's loopback."""
    assert isinstance(local_runtime, HostResources)
    proxy = tcp_server("0.0.0.0")
    loopback_only = tcp_server("127.0.0.1")
    handle = local_runtime.start(make_spec(["sleep", "30"]))
    gateway = BridgeNetwork(home).gateway()

    assert blocked(connect(local_runtime, handle, gateway, proxy.port))
    assert blocked(connect(local_runtime, handle, "127.0.0.1", loopback_only.port))
    local_runtime.publish_ports({proxy.port})
    assert reached(connect(local_runtime, handle, gateway, proxy.port))
    assert blocked(connect(local_runtime, handle, gateway, loopback_only.port))
    local_runtime.publish_ports(set())
    assert blocked(connect(local_runtime, handle, gateway, proxy.port))


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def _host_routes() -> list[ipaddress.IPv4Network]:
    out = subprocess.run(["ip", "-j", "-4", "route"], capture_output=True, text=True).stdout
    return [
        ipaddress.IPv4Network(r["dst"], strict=False)
        for r in json.loads(out or "[]")
        if r.get("dst") not in (None, "default")
    ]


@pytest.fixture
def host_address() -> Iterator[str]:
    """An address of this host on an interface other than loopback (a dummy one if none)."""
    out = subprocess.run(["ip", "-j", "-4", "addr"], capture_output=True, text=True).stdout
    for link in json.loads(out or "[]"):
        name = link.get("ifname", "")
        if name == "lo" or name.startswith(("kiln-", "kv")):
            continue
        for info in link.get("addr_info", []):
            if info.get("scope") == "global":
                yield str(info["local"])
                return
    dummy = "ktd" + secrets.token_hex(4)
    _ip("link", "add", dummy, "type", "dummy")
    try:
        _ip("addr", "add", "198.18.213.1/32", "dev", dummy)
        _ip("link", "set", dummy, "up")
        yield "198.18.213.1"
    finally:
        subprocess.run(["ip", "link", "delete", dummy], capture_output=True)


@pytest.fixture
def outside_peer() -> Iterator[str]:
    """A TCP server beyond this host: in its own network namespace, routed through a veth.

    Reaching it means being forwarded (and masqueraded) by the host, which the rules
    allow only for ``outbound`` instances. Yields ``"address:port"``."""
    taken = _host_routes()
    net = next(
        n
        for n in ipaddress.IPv4Network("198.51.100.0/24").subnets(new_prefix=30)
        if not any(n.overlaps(t) for t in taken)
    )
    host_end, peer_end = (str(h) for h in net.hosts())
    suffix = secrets.token_hex(4)
    namespace, host_if = f"kiltpeer{suffix}", f"ktp{suffix}"
    _ip("netns", "add", namespace)
    server: subprocess.Popen[bytes] | None = None
    try:
        _ip("link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", namespace)
        _ip("addr", "add", f"{host_end}/{net.prefixlen}", "dev", host_if)
        _ip("link", "set", host_if, "up")
        _ip("-n", namespace, "addr", "add", f"{peer_end}/{net.prefixlen}", "dev", "eth0")
        _ip("-n", namespace, "link", "set", "eth0", "up")
        code = (
            "import socket, sys\n"
            "s = socket.socket(); s.bind((sys.argv[1], 0)); s.listen()\n"
            "print(s.getsockname()[1], flush=True)\n"
            "while True:\n"
            "    c, _ = s.accept(); c.sendall(sys.argv[2].encode() + b'\\n'); c.close()\n"
        )
        server = subprocess.Popen(
            ["ip", "netns", "exec", namespace, sys.executable, "-c", code, peer_end, GREETING],
            stdout=subprocess.PIPE,
        )
        assert server.stdout is not None
        port = int(server.stdout.readline())
        yield f"{peer_end}:{port}"
    finally:
        if server is not None:
            server.kill()
            server.wait()
        subprocess.run(["ip", "netns", "delete", namespace], capture_output=True)
        subprocess.run(["ip", "link", "delete", host_if], capture_output=True)


@pytest.mark.parametrize("outbound", [False, True])
def test_only_an_outbound_instance_reaches_beyond_the_host(
    local_runtime: LocalRuntime,
    make_spec: AppSpec,
    outside_peer: str,
    host_address: str,
    tcp_server: type[TcpServer],
    outbound: bool,
) -> None:
    """Outbound or not, the host's own addresses stay closed: they are not "outside"."""
    on_host = tcp_server(host_address)
    handle = local_runtime.start(make_spec(["sleep", "30"], outbound=outbound))
    peer_host, peer_port = outside_peer.split(":")
    beyond = connect(local_runtime, handle, peer_host, int(peer_port))
    assert reached(beyond) if outbound else blocked(beyond), beyond
    assert blocked(connect(local_runtime, handle, host_address, on_host.port))
