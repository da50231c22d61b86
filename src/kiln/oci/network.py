"""The private network of a Kiln home: one bridge, an address per instance.

As Docker's default bridge: each instance has its own network namespace and a
veth on the home's bridge with an address from the home's /24. Unlike
Docker's default, the bridge ports are isolated (instances cannot reach one
another directly), the host answers them only on the proxy's listen ports
(not on its loopback services, not on the agent), and only instances of a
service with ``network = "outbound"`` are masqueraded to the outside.

Rules live in one nftables table per home (``inet kiln_<tag>``); leases in
``KILN_HOME/network/leases.json`` under an flock; subnets are handed out
machine-wide from ``/run/kiln/subnets.json`` so two homes never overlap.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import ipaddress
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kiln.errors import KilnError
from kiln.oci.runc import RUN_ROOT, home_tag
from kiln.paths import write_private

__all__ = ["BridgeNetwork", "Lease", "host_resolv_conf"]

SUBNET_POOL = ipaddress.IPv4Network("10.213.0.0/16")
SUBNETS = tuple(SUBNET_POOL.subnets(new_prefix=24))


class Lease:
    def __init__(
        self, address: str, gateway: str, prefix: int, host_if: str, outbound: bool = False
    ) -> None:
        self.address = address
        self.gateway = gateway
        self.prefix = prefix
        self.host_if = host_if
        self.outbound = outbound

    def to_json(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "gateway": self.gateway,
            "prefix": self.prefix,
            "host_if": self.host_if,
            "outbound": self.outbound,
        }


def _ip(*args: str, stdin: str | None = None, netns_pid: int | None = None) -> None:
    argv = ["ip", *args]
    if netns_pid is not None:
        argv = ["nsenter", f"--net=/proc/{netns_pid}/ns/net", "--", *argv]
    result = subprocess.run(argv, input=stdin, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise KilnError(f"{' '.join(argv[:6])}: {result.stderr.strip() or result.returncode}")


def _nft(script: str) -> None:
    result = subprocess.run(["nft", "-f", "-"], input=script, capture_output=True, text=True)
    if result.returncode != 0:
        raise KilnError(f"nft: {result.stderr.strip()}")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _read(path: Path) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads(path.read_text())
        return data
    except (FileNotFoundError, ValueError):
        return {}


def _write(path: Path, data: dict[str, Any]) -> None:
    write_private(path, json.dumps(data).encode())


def _gateway(net: ipaddress.IPv4Network) -> str:
    """The bridge's own address: the first of the home's /24."""
    return str(next(net.hosts()))


class BridgeNetwork:
    def __init__(self, home: Path) -> None:
        self.home = home.absolute()
        self.tag = home_tag(self.home)
        self.bridge = f"kiln-{self.tag}"
        self.table = f"kiln_{self.tag}"
        self.dir = self.home / "network"
        self.leases_path = self.dir / "leases.json"
        self.registry = RUN_ROOT / "subnets.json"

    # subnet and bridge

    def subnet(self) -> ipaddress.IPv4Network:
        """This home's /24, allocated machine-wide on first use."""
        with _locked(RUN_ROOT / ".subnets.lock"):
            registry = _read(self.registry)
            for key, owner in registry.items():
                if owner == str(self.home):
                    return SUBNETS[int(key)]
            for key, owner in list(registry.items()):
                if not Path(owner).is_dir():
                    _forget_home(Path(owner))
                    del registry[key]
            taken = _host_networks()
            for index, net in enumerate(SUBNETS):
                if str(index) in registry or any(net.overlaps(t) for t in taken):
                    continue
                registry[str(index)] = str(self.home)
                _write(self.registry, registry)
                return net
        raise KilnError(f"no free /24 left in {SUBNET_POOL} for a Kiln bridge")

    def gateway(self) -> str:
        return _gateway(self.subnet())

    def ensure(self) -> None:
        """Create the bridge and its rules if they are missing (idempotent)."""
        if Path(f"/sys/class/net/{self.bridge}").exists():
            return
        net = self.subnet()
        # A fixed address, as docker0 has: a bridge otherwise takes its lowest port's,
        # which changes as instances come and go and leaves their gateway entry stale.
        mac = "02:4b:" + ":".join(self.tag[i : i + 2] for i in range(0, 8, 2))
        with contextlib.suppress(KilnError):
            _ip("link", "add", "name", self.bridge, "address", mac, "type", "bridge")
        with contextlib.suppress(OSError):
            Path(f"/proc/sys/net/ipv6/conf/{self.bridge}/disable_ipv6").write_text("1")
        with contextlib.suppress(KilnError):
            _ip("addr", "add", f"{_gateway(net)}/{net.prefixlen}", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        self._install_rules(net)

    def _install_rules(self, net: ipaddress.IPv4Network) -> None:
        br = self.bridge
        script = f"""
table inet {self.table}
delete table inet {self.table}
table inet {self.table} {{
  set listen {{ type inet_service; }}
  set outbound {{ type ipv4_addr; }}
  chain input {{
    type filter hook input priority -10; policy accept;
    iifname "{br}" ct state established,related accept
    iifname "{br}" ip daddr {_gateway(net)} tcp dport @listen accept
    iifname "{br}" drop
  }}
  chain forward {{
    type filter hook forward priority -10; policy accept;
    oifname "{br}" ct state established,related accept
    iifname "{br}" oifname != "{br}" ip saddr @outbound accept
    iifname "{br}" drop
    oifname "{br}" drop
  }}
  chain postrouting {{
    type nat hook postrouting priority 100; policy accept;
    ip saddr {net} oifname != "{br}" masquerade
  }}
}}
"""
        _nft(script)

    def publish_ports(self, ports: set[int]) -> None:
        """The ports instances may reach on the gateway: the proxy's listeners."""
        if not Path(f"/sys/class/net/{self.bridge}").exists():
            return
        elements = ", ".join(str(p) for p in sorted(ports))
        script = f"flush set inet {self.table} listen\n"
        if elements:
            script += f"add element inet {self.table} listen {{ {elements} }}\n"
        _nft(script)

    # instances

    def attach(self, instance_id: str, pid: int, *, outbound: bool) -> Lease:
        """Give the network namespace of ``pid`` an address on the bridge."""
        self.ensure()
        net = self.subnet()
        host_if = "kv" + hashlib.sha256(f"{self.tag}/{instance_id}".encode()).hexdigest()[:12]
        with _locked(self.dir / ".leases.lock"):
            leases = _read(self.leases_path)
            used = {v["address"] for v in leases.values()}
            hosts = list(net.hosts())[1:]
            address = next((str(h) for h in hosts if str(h) not in used), None)
            if address is None:
                raise KilnError(f"network {net}: no free address for instance {instance_id}")
            lease = Lease(address, _gateway(net), net.prefixlen, host_if, outbound)
            leases[instance_id] = lease.to_json()
            _write(self.leases_path, leases)
        self._forget_neighbour(address)
        try:
            _ip(
                "-batch",
                "-",
                stdin=(
                    f"link add name {host_if} type veth peer name eth0 netns {pid}\n"
                    f"link set {host_if} master {self.bridge} up\n"
                    f"link set dev {host_if} type bridge_slave isolated on\n"
                ),
            )
            _ip(
                "-batch",
                "-",
                stdin=(
                    f"addr add {address}/{net.prefixlen} dev eth0\n"
                    "link set eth0 up\n"
                    f"route add default via {lease.gateway}\n"
                ),
                netns_pid=pid,
            )
            if outbound:
                _enable_forwarding()
                _nft(f"add element inet {self.table} outbound {{ {address} }}\n")
        except KilnError:
            self.detach(instance_id)
            raise
        return lease

    def detach(self, instance_id: str) -> None:
        """Release the address; the veth goes with the namespace, or here if it lingers."""
        with _locked(self.dir / ".leases.lock"):
            leases = _read(self.leases_path)
            lease = leases.pop(instance_id, None)
            if lease is None:
                return
            _write(self.leases_path, leases)
        self._forget_neighbour(lease["address"])
        if lease.get("outbound", True):
            with contextlib.suppress(KilnError):
                _nft(f"delete element inet {self.table} outbound {{ {lease['address']} }}\n")
        if Path(f"/sys/class/net/{lease['host_if']}").exists():
            with contextlib.suppress(KilnError):
                _ip("link", "delete", lease["host_if"])

    def _forget_neighbour(self, address: str) -> None:
        """A reused address must not be sent to the MAC of the veth that held it before."""
        if Path(f"/sys/class/net/{self.bridge}").exists():
            with contextlib.suppress(KilnError):
                _ip("neigh", "flush", "to", address, "dev", self.bridge)

    def leases(self) -> dict[str, dict[str, Any]]:
        return _read(self.leases_path)

    def remove(self) -> None:
        """Bridge, rules and subnet go (``kiln down`` with nothing left running)."""
        for instance_id in list(self.leases()):
            self.detach(instance_id)
        if Path(f"/sys/class/net/{self.bridge}").exists():
            with contextlib.suppress(KilnError):
                _ip("link", "delete", self.bridge)
        with contextlib.suppress(KilnError):
            _nft(f"table inet {self.table}\ndelete table inet {self.table}\n")
        with _locked(RUN_ROOT / ".subnets.lock"):
            registry = _read(self.registry)
            kept = {k: v for k, v in registry.items() if v != str(self.home)}
            if kept != registry:
                _write(self.registry, kept)


def host_resolv_conf() -> Path | None:
    """The resolver list an outbound instance can use: the host's, unless it names
    a loopback resolver (unreachable from a private network), then resolved's own."""
    for candidate in (Path("/etc/resolv.conf"), Path("/run/systemd/resolve/resolv.conf")):
        try:
            text = candidate.read_text()
        except OSError:
            continue
        servers = [line.split()[1] for line in text.splitlines() if line.startswith("nameserver ")]
        if servers and not all(s.startswith("127.") or s == "::1" for s in servers):
            return candidate.resolve()
    return None


def _host_networks() -> list[ipaddress.IPv4Network]:
    """Routes the host already has, so a Kiln subnet never shadows one."""
    result = subprocess.run(["ip", "-j", "-4", "route"], capture_output=True, text=True)
    found = []
    with contextlib.suppress(ValueError):
        for route in json.loads(result.stdout or "[]"):
            dst = route.get("dst")
            if dst and dst != "default":
                with contextlib.suppress(ValueError):
                    found.append(ipaddress.ip_network(dst, strict=False))
    return [n for n in found if isinstance(n, ipaddress.IPv4Network)]


def _forget_home(home: Path) -> None:
    """A home that no longer exists: its bridge and rules go with it."""
    tag = home_tag(home)
    with contextlib.suppress(KilnError):
        _ip("link", "delete", f"kiln-{tag}")
    with contextlib.suppress(KilnError):
        _nft(f"table inet kiln_{tag}\ndelete table inet kiln_{tag}\n")


def _enable_forwarding() -> None:
    path = Path("/proc/sys/net/ipv4/ip_forward")
    if path.read_text().strip() != "1":
        path.write_text("1")
