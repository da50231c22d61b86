"""ProxyClient, the route model and the proxy's start command."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from traffic_harness import ProxyProcess, free_port

from kiln.errors import KilnError
from kiln.traffic import Backend, ProxyClient, Route, RouteError, proxy_command


def test_proxy_command_is_data() -> None:
    assert proxy_command(Path("/h/proxy.sock"), Path("/h/proxy.json")) == [
        sys.executable,
        "-m",
        "kiln.traffic.proxy",
        "--control",
        "/h/proxy.sock",
        "--state",
        "/h/proxy.json",
    ]


def test_route_json_round_trip() -> None:
    r = Route(
        name="web",
        listen=8000,
        protocol="tcp",
        drain_timeout=2.5,
        backends=(Backend("web-1", "127.0.0.1:41234", 100), Backend("web-2", "[::1]:9", 0)),
    )
    body = r.to_json()
    assert body == {
        "listen": 8000,
        "protocol": "tcp",
        "drain_timeout": 2.5,
        "queue_timeout": 5.0,
        "backends": [
            {"id": "web-1", "address": "127.0.0.1:41234", "weight": 100},
            {"id": "web-2", "address": "[::1]:9", "weight": 0},
        ],
    }
    assert Route.from_json("web", body) == r
    assert r.backends[1].host == "::1" and r.backends[1].port == 9


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"listen": 0}, "services.web.listen: must be a port 1-65535, got 0"),
        ({"listen": 80, "protocol": "udp"}, "services.web.protocol: must be 'http' or 'tcp'"),
        (
            {"listen": 80, "backends": [{"id": "a", "address": "nohost"}]},
            "services.web.backends[0].address: must be 'host:port'",
        ),
        (
            {"listen": 80, "backends": [{"id": "a", "address": "h:1", "weight": -1}]},
            "services.web.backends[0].weight: must be an integer ≥ 0",
        ),
        (
            {
                "listen": 80,
                "backends": [{"id": "a", "address": "h:1"}, {"id": "a", "address": "h:2"}],
            },
            "services.web.backends: duplicate id 'a'",
        ),
        ({"listen": 80, "drain_timeout": "10s"}, "services.web.drain_timeout: must be a number"),
        ({"listen": 80, "colour": "red"}, "services.web.colour: unknown key"),
    ],
)
def test_route_errors_name_the_key(body: dict[str, object], message: str) -> None:
    with pytest.raises(RouteError) as e:
        Route.from_json("web", body)
    assert str(e.value).startswith(message)


def test_client_reports_proxy_errors_and_a_missing_socket(
    proxy: ProxyProcess, tmp_path: Path
) -> None:
    with proxy.client() as c:
        with pytest.raises(KilnError, match=r"services\.web\.backends\[0\]\.address"):
            c.put_service(Route("web", free_port(), backends=(Backend("a", "bad"),)))
        assert c.healthz()["ok"] is True
        assert c.services() == {} and c.stats() == {}
    with (
        ProxyClient(tmp_path / "absent.sock") as c,
        pytest.raises(KilnError, match=r"absent\.sock not ready after 0\.2s"),
    ):
        c.wait_ready(0.2)
