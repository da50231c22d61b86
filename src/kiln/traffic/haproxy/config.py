"""The HAProxy configuration of one generation, rendered from Kiln's routes.

Every value that reaches the file has been validated by :mod:`kiln.traffic.routes`
(names and addresses) or is Kiln's own (numbers, paths, the probe token), so
nothing a ``kiln.toml`` says can add a line or a keyword to it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from kiln.traffic.routes import Backend, Route

__all__ = ["ConfigPaths", "RouterSettings", "render", "server_line"]

PROBE_HEADER = "x-kiln-probe"
PROBE_ANSWER = "kiln-router-ok"
LOG_FORMAT = r"%b\t%s\t%ST\t%Ta"
TCP_LOG_FORMAT = r"%b\t%s\t-\t%Tt"
LOG_RING = "kiln_access"
LOG_RING_SIZE = 2 << 20
"""Lines wait here while the agent reads slowly or restarts; the oldest go first."""
CONTROL_CHARACTER = r"[\\x00-\\x08\\x0b\\x0c\\x0e-\\x1f\\x7f]"
r"""A control character other than HTAB in a header block (whose lines end in CRLF).

HAProxy 2.6 rejects CR and LF inside a header value but forwards NUL and the other
controls both ways; RFC 9110 §5.5 forbids passing NUL on (a backend or client that
reads C strings would see another header block than HAProxy did). Requests with one
get a 400, responses a 502. HAProxy's config parser reads ``\\`` as one backslash, so
PCRE2 gets ``\x00``: a raw NUL byte would end the word."""


@dataclass(frozen=True)
class RouterSettings:
    """What a careful operator sets, with the reason in docs/traffic.md."""

    threads: int = 0
    """0: one per core."""
    bind: str = "0.0.0.0"
    maxconn: int = 100_000
    listener_maxconn: int = 25_000
    source_maxconn: int = 1_000
    """Connections one client address may hold on one service (0: no limit)."""
    connect_timeout: float = 1.0
    client_timeout: float = 30.0
    server_timeout: float = 60.0
    http_request_timeout: float = 10.0
    keep_alive_timeout: float = 10.0
    tunnel_timeout: float = 3600.0
    fin_timeout: float = 5.0
    retries: int = 3
    hard_stop_after: float = 60.0


@dataclass(frozen=True)
class ConfigPaths:
    stats: Path
    log: str
    """The access-log socket as HAProxy's worker sees it (inside its chroot)."""
    chroot: Path | None
    user: str | None


def _ms(seconds: float) -> str:
    return f"{max(round(seconds * 1000), 1)}ms"


def server_line(backend: Backend) -> str:
    words = [f"server {backend.id} {backend.address} weight {backend.weight}"]
    if backend.state == "maintenance":
        words.append("disabled")
    return " ".join(words)


def render(
    routes: Mapping[str, Route],
    listeners: Mapping[int, int],
    settings: RouterSettings,
    paths: ConfigPaths,
    token: str,
    threads: int,
) -> str:
    """The whole file; ``listeners`` maps each port to the inherited fd that serves it."""
    out = [
        "# Written by Kiln for one generation of its data plane; do not edit.",
        "global",
        "    master-worker",
        f"    nbthread {threads}",
        f"    maxconn {settings.maxconn}",
        f"    hard-stop-after {_ms(settings.hard_stop_after)}",
        f"    stats socket {paths.stats} mode 600 level admin",
        "    stats timeout 30s",
        f"    log ring@{LOG_RING} local0 info",
        "    strict-limits",
    ]
    if paths.user is not None:
        out += [f"    user {paths.user}", f"    group {paths.user}"]
    if paths.chroot is not None:
        out.append(f"    chroot {paths.chroot}")
    out += [
        "",
        f"ring {LOG_RING}",
        "    format raw",
        "    maxlen 1024",
        f"    size {LOG_RING_SIZE}",
        "    timeout connect 1s",
        "    timeout server 10s",
        f"    server agent unix@{paths.log}",
    ]
    out += [
        "",
        "defaults",
        "    log global",
        "    option dontlognull",
        f"    timeout connect {_ms(settings.connect_timeout)}",
        f"    timeout client {_ms(settings.client_timeout)}",
        f"    timeout server {_ms(settings.server_timeout)}",
        f"    timeout http-request {_ms(settings.http_request_timeout)}",
        f"    timeout http-keep-alive {_ms(settings.keep_alive_timeout)}",
        f"    timeout tunnel {_ms(settings.tunnel_timeout)}",
        f"    timeout client-fin {_ms(settings.fin_timeout)}",
        f"    timeout server-fin {_ms(settings.fin_timeout)}",
        f"    retries {settings.retries}",
        "    option redispatch 1",
    ]
    for name in sorted(routes):
        route = routes[name]
        out += ["", f"listen {name}"]
        out.append(f"    mode {route.protocol}")
        out.append(f"    bind fd@{listeners[route.listen]}")
        out.append(f"    maxconn {settings.listener_maxconn}")
        if settings.source_maxconn:
            # One client address may hold only so many connections of a service: a flood
            # from one source cannot take the slots everyone else needs. The host's own
            # loopback address is exempt (the agent's probe comes from it).
            out += [
                "    stick-table type ipv6 size 200k expire 60s store conn_cur",
                "    tcp-request connection track-sc0 src",
                "    tcp-request connection reject"
                f" if {{ sc0_conn_cur gt {settings.source_maxconn} }} !{{ src 127.0.0.1 }}",
            ]
        out.append(f"    timeout queue {_ms(route.queue_timeout)}")
        out.append(
            "    balance roundrobin" if route.protocol == "http" else "    balance leastconn"
        )
        if route.protocol == "http":
            out += [
                "    option forwardfor",
                "    option idle-close-on-response",
                "    option http-restrict-req-hdr-names delete",
                f"    acl kiln_ctl_req req.hdrs -m reg {CONTROL_CHARACTER}",
                f"    acl kiln_ctl_res res.hdrs -m reg {CONTROL_CHARACTER}",
                "    http-request deny deny_status 400 if kiln_ctl_req",
                "    http-response deny if kiln_ctl_res",
                "    http-request set-header X-Forwarded-Proto http",
                f"    acl kiln_probe req.hdr({PROBE_HEADER}) -m str {token}",
                "    http-request set-log-level silent if kiln_probe",
                "    http-request return status 200 content-type text/plain"
                f' string "{PROBE_ANSWER}" if kiln_probe',
                "    http-request disable-l7-retry unless METH_GET or METH_HEAD or METH_OPTIONS",
                "    retry-on conn-failure empty-response",
                f'    log-format "{LOG_FORMAT}"',
                '    http-error status 503 content-type "text/plain; charset=utf-8" string'
                f' "503 Service Unavailable: kiln service {name} has no ready instance"',
            ]
        else:
            out.append(f'    log-format "{TCP_LOG_FORMAT}"')
        out += [f"    {server_line(b)}" for b in route.backends]
    return "\n".join(out) + "\n"
