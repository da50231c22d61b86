"""``Route`` and ``Backend``: every value that can reach HAProxy's configuration or
runtime API is checked first, and refused with a message naming the key."""

from __future__ import annotations

import json
from typing import Any

import pytest

from kiln.errors import KilnError
from kiln.traffic import Backend, Route, RouteError

pytestmark = pytest.mark.timeout(10)

TRAILING_NEWLINE = "web\n"

HOSTILE_NAMES = [
    "web app",
    TRAILING_NEWLINE,
    "web\nlisten evil",
    "web;rm",
    "web#x",
    "a" * 64,
    "",
    "-web",
    ".web",
    "web/x",
    "web\t",
    "wéb",
    "web\x00",
    "@1",
]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_service_name_is_refused(name: str) -> None:
    with pytest.raises(RouteError, match="name must match"):
        Route(name=name, listen=8080)


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_backend_id_is_refused(name: str) -> None:
    with pytest.raises(RouteError, match="id must match"):
        Backend(id=name, address="127.0.0.1:80")


def test_names_at_the_limits_are_accepted() -> None:
    assert Route(name="a" * 63, listen=1).name == "a" * 63
    assert Backend(id="A-b_c.9", address="127.0.0.1:65535").port == 65535


@pytest.mark.parametrize(
    "address",
    [
        "localhost:80",
        "example.com:80",
        "1.2.3.4",
        "1.2.3.4:",
        ":80",
        "1.2.3.4:0",
        "1.2.3.4:65536",
        "1.2.3.4:080",
        "1.2.3.4:+80",
        "1.2.3.4:-1",
        "1.2.3.4:80\nfoo",
        "1.2.3.4:80 ",
        " 1.2.3.4:80",
        "1.2.3.4:80;x",
        "1.2.3.4:80#x",
        "1.2.3.4 1.2.3.5:80",
        "1.2.3.256:80",
        "[::1:80",
        "[::1]",
        "[not-an-ip]:80",
        "unix@/tmp/x:80",
        "fd@3:80",
        "",
    ],
)
def test_bad_backend_address_is_refused(address: str) -> None:
    with pytest.raises(RouteError, match=r"backend 'b0': address must be 'IP:port'"):
        Backend(id="b0", address=address)


@pytest.mark.parametrize("address", ["10.0.0.1:1", "127.0.0.1:65535", "[::1]:8080"])
def test_ip_addresses_are_accepted(address: str) -> None:
    b = Backend(id="b0", address=address)
    assert f"{b.host}:{b.port}".replace("::1:", "[::1]:") == address


@pytest.mark.parametrize(
    "address",
    [
        "[fe80::1%a\nlisten evil]:80",
        "[fe80::1%a#b]:80",
        "[fe80::1%a b]:80",
        "::1:80",
        "[1.2.3.4]:80",
    ],
)
def test_ipv6_scope_id_cannot_smuggle_characters(address: str) -> None:
    with pytest.raises(RouteError, match="address"):
        Backend(id="b0", address=address)


@pytest.mark.parametrize("weight", [-1, 257, 1000, True, False, 1.5, "100", None])
def test_bad_weight_is_refused(weight: Any) -> None:
    with pytest.raises(RouteError, match=r"backend 'b0': weight must be"):
        Backend(id="b0", address="127.0.0.1:80", weight=weight)


@pytest.mark.parametrize("weight", [0, 1, 256])
def test_weights_in_haproxys_range_are_accepted(weight: int) -> None:
    assert Backend(id="b0", address="127.0.0.1:80", weight=weight).weight == weight


@pytest.mark.parametrize("state", ["drain", "maint", "READY", "", "ready\n", "up"])
def test_unknown_state_is_refused(state: Any) -> None:
    with pytest.raises(RouteError, match=r"backend 'b0': state must be one of"):
        Backend(id="b0", address="127.0.0.1:80", state=state)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("listen", 0, "listen must be a port"),
        ("listen", 65536, "listen must be a port"),
        ("listen", -80, "listen must be a port"),
        ("listen", True, "listen must be a port"),
        ("listen", "80", "listen must be a port"),
        ("listen", None, "listen must be a port"),
        ("protocol", "udp", "protocol must be"),
        ("protocol", "HTTP", "protocol must be"),
        ("protocol", "http\n", "protocol must be"),
        ("drain_timeout", -1, "drain_timeout must be"),
        ("drain_timeout", True, "drain_timeout must be"),
        ("drain_timeout", "10", "drain_timeout must be"),
        ("queue_timeout", -0.5, "queue_timeout must be"),
        ("queue_timeout", None, "queue_timeout must be"),
    ],
)
def test_bad_route_field_is_refused_naming_the_key(key: str, value: Any, message: str) -> None:
    fields: dict[str, Any] = {"name": "web", "listen": 8080, key: value}
    with pytest.raises(RouteError, match=rf"service 'web': {message}"):
        Route(**fields)


def test_duplicate_backend_ids_are_refused() -> None:
    with pytest.raises(RouteError, match=r"service 'web': duplicate backend id 'b0'"):
        Route(
            name="web",
            listen=8080,
            backends=(
                Backend("b0", "127.0.0.1:81"),
                Backend("b1", "127.0.0.1:82"),
                Backend("b0", "127.0.0.1:83"),
            ),
        )


def test_route_error_is_a_kiln_error() -> None:
    assert issubclass(RouteError, KilnError)


def sample() -> Route:
    return Route(
        name="web",
        listen=8080,
        protocol="http",
        drain_timeout=2.5,
        queue_timeout=0,
        backends=(
            Backend("b0", "127.0.0.1:81", 0, "ready"),
            Backend("b1", "[::1]:82", 256, "draining"),
            Backend("b2", "10.1.2.3:83", 7, "maintenance"),
        ),
    )


def test_json_round_trip() -> None:
    r = sample()
    data = json.loads(json.dumps(r.to_json()))
    assert Route.from_json(data) == r
    assert data["backends"][1] == {
        "id": "b1",
        "address": "[::1]:82",
        "weight": 256,
        "state": "draining",
    }
    tcp = Route(name="db", listen=5432, protocol="tcp", backends=(Backend("e1", "1.2.3.4:5"),))
    assert Route.from_json(json.loads(json.dumps(tcp.to_json()))) == tcp


def test_from_json_defaults() -> None:
    r = Route.from_json(
        {"name": "web", "listen": 80, "backends": [{"id": "b", "address": "1.2.3.4:5"}]}
    )
    assert (r.protocol, r.drain_timeout, r.queue_timeout) == ("http", 10.0, 5.0)
    assert r.backends == (Backend("b", "1.2.3.4:5", 100, "ready"),)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([], r"route: must be an object"),
        ({"name": "web", "listen": 80, "backends": {}}, r"route\.backends: must be a list"),
        ({"name": "web", "listen": 80, "backends": ["b0"]}, r"backends\[0\]: must be an object"),
        (
            {"name": "web", "listen": 80, "backends": [{"id": "ok", "address": "1.2.3.4:5"}, {}]},
            r"backends\[1\]: backend '': id must match",
        ),
        (
            {"name": "web", "listen": 80, "backends": [{"id": "b", "address": "h:5"}]},
            r"backends\[0\]: backend 'b': address",
        ),
        (
            {
                "name": "web",
                "listen": 80,
                "backends": [{"id": "b", "address": "1.2.3.4:5", "weight": "9"}],
            },
            r"backends\[0\]: backend 'b': weight",
        ),
        ({"name": "web evil", "listen": 80}, "name must match"),
        ({"name": "web"}, "listen must be a port"),
        ({"name": "web", "listen": "80"}, "listen must be a port"),
    ],
)
def test_from_json_refuses_hostile_documents(data: Any, message: str) -> None:
    with pytest.raises(RouteError, match=message):
        Route.from_json(data)


def test_same_listener_compares_the_listener_settings() -> None:
    r = sample()
    assert r.same_listener(Route(name="web", listen=8080, drain_timeout=2.5, queue_timeout=0))
    assert not r.same_listener(Route(name="web", listen=8081, drain_timeout=2.5, queue_timeout=0))
    assert not r.same_listener(Route(name="web", listen=8080, drain_timeout=2.5, queue_timeout=1))
    assert r.backend("b2") == Backend("b2", "10.1.2.3:83", 7, "maintenance")
    assert r.backend("nope") is None
