"""The HAProxy configuration Kiln renders, judged by HAProxy itself (``haproxy -c``
with the listening sockets really inherited), and the runtime API client's guard."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from kiln.errors import KilnError
from kiln.traffic import Backend, Route
from kiln.traffic.haproxy.config import ConfigPaths, RouterSettings, render
from kiln.traffic.haproxy.router import haproxy_binary
from kiln.traffic.haproxy.runtime_api import RuntimeAPI

pytestmark = pytest.mark.timeout(30)


@contextlib.contextmanager
def listeners(count: int) -> Iterator[list[socket.socket]]:
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            s.listen()
            socks.append(s)
        yield socks
    finally:
        for s in socks:
            s.close()


def port_of(s: socket.socket) -> int:
    return int(s.getsockname()[1])


def routes_on(web: int, db: int, empty: int) -> dict[str, Route]:
    return {
        "web": Route(
            name="web",
            listen=web,
            queue_timeout=2.5,
            backends=(
                Backend("b0", "127.0.0.1:8081", 100),
                Backend("b1", "[::1]:8082", 0, "draining"),
                Backend("b2", "10.0.0.3:8083", 256, "maintenance"),
            ),
        ),
        "db": Route(
            name="db", listen=db, protocol="tcp", backends=(Backend("e1", "127.0.0.1:5432", 7),)
        ),
        "empty": Route(name="empty", listen=empty),
    }


def paths(tmp: Path, user: str | None = None) -> ConfigPaths:
    return ConfigPaths(
        stats=tmp / "stats.sock",
        log=str(tmp / "log.sock"),
        chroot=tmp if user else None,
        user=user,
    )


def haproxy_check(config: str, tmp: Path, fds: tuple[int, ...]) -> subprocess.CompletedProcess[str]:
    path = tmp / "gen.cfg"
    path.write_text(config)
    return subprocess.run(
        [haproxy_binary(), "-c", "-f", str(path)],
        pass_fds=fds,
        capture_output=True,
        text=True,
        timeout=20,
    )


def sections(config: str) -> dict[str, list[str]]:
    """Each section's lines (stripped), by its header ("global", "listen web"...)."""
    out: dict[str, list[str]] = {}
    current = ""
    for line in config.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        if not line.startswith(" "):
            current = line.strip()
            out[current] = []
        else:
            out[current].append(line.strip())
    return out


@pytest.mark.parametrize("user", [None, "haproxy"], ids=["plain", "chroot-user"])
def test_rendered_config_passes_haproxy_check(tmp_path: Path, user: str | None) -> None:
    if user is not None:
        try:
            import pwd

            pwd.getpwnam(user)
        except KeyError:
            pytest.skip(f"no {user} user")
    with listeners(3) as socks:
        routes = routes_on(*(port_of(s) for s in socks))
        fds = {port_of(s): s.fileno() for s in socks}
        config = render(routes, fds, RouterSettings(), paths(tmp_path, user), "t0ken", 2)
        result = haproxy_check(config, tmp_path, tuple(fds.values()))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Configuration file is valid" in result.stdout + result.stderr


def test_haproxy_check_really_validates_the_inherited_sockets(tmp_path: Path) -> None:
    """The same file fails when its fd is not a socket: the check above means something."""
    with listeners(3) as (web, db, empty):
        read_end, write_end = os.pipe()
        try:
            routes = routes_on(port_of(web), port_of(db), port_of(empty))
            fds = {
                port_of(web): web.fileno(),
                port_of(db): read_end,
                port_of(empty): empty.fileno(),
            }
            config = render(routes, fds, RouterSettings(), paths(tmp_path), "t0ken", 1)
            result = haproxy_check(config, tmp_path, tuple(fds.values()))
        finally:
            os.close(read_end)
            os.close(write_end)
    assert result.returncode != 0
    assert f"file descriptor '{read_end}'" in result.stderr + result.stdout


def test_rendered_config_says_what_kiln_means(tmp_path: Path) -> None:
    settings = RouterSettings(
        maxconn=4000,
        listener_maxconn=1500,
        connect_timeout=2.5,
        client_timeout=31,
        server_timeout=61,
        http_request_timeout=7,
        keep_alive_timeout=3,
        tunnel_timeout=600,
        fin_timeout=4,
        retries=2,
        hard_stop_after=20,
    )
    with listeners(3) as socks:
        web_fd, db_fd, _ = (s.fileno() for s in socks)
        routes = routes_on(*(port_of(s) for s in socks))
        fds = {port_of(s): s.fileno() for s in socks}
        config = render(routes, fds, settings, paths(tmp_path), "t0ken", 3)
        result = haproxy_check(config, tmp_path, tuple(fds.values()))
    assert result.returncode == 0, result.stderr
    s = sections(config)
    assert {"global", "defaults", "listen web", "listen db", "listen empty"} <= set(s)
    glob, defaults, http, tcp = s["global"], s["defaults"], s["listen web"], s["listen db"]
    assert "master-worker" in glob and "nbthread 3" in glob
    assert "maxconn 4000" in glob and "hard-stop-after 20000ms" in glob
    assert f"stats socket {tmp_path / 'stats.sock'} mode 600 level admin" in glob
    for line in [
        "timeout connect 2500ms",
        "timeout client 31000ms",
        "timeout server 61000ms",
        "timeout http-request 7000ms",
        "timeout http-keep-alive 3000ms",
        "timeout tunnel 600000ms",
        "timeout client-fin 4000ms",
        "timeout server-fin 4000ms",
        "retries 2",
    ]:
        assert line in defaults, line
    # HTTP: only safe methods are replayed, on failures where nothing was answered.
    assert f"bind fd@{web_fd}" in http and f"bind fd@{db_fd}" in tcp
    assert "maxconn 1500" in http and "maxconn 1500" in tcp
    assert "timeout queue 2500ms" in http and "timeout queue 5000ms" in tcp
    assert "mode http" in http and "balance roundrobin" in http
    assert "retry-on conn-failure empty-response" in http
    assert "http-request disable-l7-retry unless METH_GET or METH_HEAD or METH_OPTIONS" in http
    assert "option http-restrict-req-hdr-names delete" in http
    assert "option forwardfor" in http
    assert "http-request set-header X-Forwarded-Proto http" in http
    assert any(
        line.startswith("http-error status 503") and "kiln service web " in line for line in http
    )
    assert any("empty" in line for line in s["listen empty"] if line.startswith("http-error"))
    assert any("t0ken" in line for line in http), "the probe answers only the router's token"
    assert "server b0 127.0.0.1:8081 weight 100" in http
    assert any(re.fullmatch(r"server b2 10\.0\.0\.3:8083 weight 256 disabled", x) for x in http)
    # TCP: no HTTP keyword at all.
    assert "mode tcp" in tcp and "balance leastconn" in tcp
    assert "server e1 127.0.0.1:5432 weight 7" in tcp
    assert not [x for x in tcp if x.startswith(("http-", "option forwardfor", "retry-on"))]


@pytest.fixture
def unix_server(tmp_path: Path) -> Iterator[tuple[Path, list[bytes]]]:
    """A stand-in stats socket that records every command it receives."""
    path = tmp_path / "api.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen()
    srv.settimeout(0.1)
    received: list[bytes] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(2)
                data = b""
                while piece := conn.recv(4096):
                    data += piece
                received.append(data)
                conn.sendall(b"ok\n")

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield path, received
    stop.set()
    t.join(5)
    srv.close()


@pytest.mark.parametrize(
    "line",
    [
        "show info\nshutdown sessions server web/b0",
        "show info;disable frontend web",
        "set server web/b0 state ready;del server web/b1",
        "show stat\n",
        "\nshow info",
    ],
)
def test_runtime_api_refuses_command_separators(
    unix_server: tuple[Path, list[bytes]], line: str
) -> None:
    path, received = unix_server
    api = RuntimeAPI(path, timeout=2)
    with pytest.raises(KilnError, match="separator"):
        api.command(line)
    assert api.command("show info") == "ok\n"
    assert received == [b"show info\n"], "the refused command never reached the socket"


def test_runtime_api_prefix_is_kilns_own(unix_server: tuple[Path, list[bytes]]) -> None:
    path, received = unix_server
    api = RuntimeAPI(path, timeout=2, prefix="@1 ")
    api.command("show stat")
    with pytest.raises(KilnError):
        api.command("show stat;@2 show info")
    assert received == [b"@1 show stat\n"]
