"""Every number the agent's API takes is bounded: hostile values get a 400 naming the
parameter, never a 422 list or a 500, and the agent keeps serving."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from agent_harness import RunningAgent, plan_request, service_spec

from kiln.errors import KilnError

DIGEST = "sha256:" + "ab" * 32
HOSTILE_QUERY = [
    "99999999999999999999",
    "9" * 5000,
    "9223372036854775808",
    "-1",
    "-99999999999999999999",
    "abc",
    "1.5",
    "1e3",
    "nan",
    "NaN",
    "inf",
    "-inf",
    "",
    "true",
    "0x10",
]
HOSTILE_JSON = [
    "99999999999999999999999",
    "9223372036854775808",
    "-1",
    "1.5",
    "1e400",
    "-1e400",
    "NaN",
    "Infinity",
    "true",
    '"3"',
    '""',
    "{}",
    "[]",
]


@pytest.fixture
def http(agent: RunningAgent) -> Iterator[httpx.Client]:
    transport = httpx.HTTPTransport(uds=str(agent.home / "agent.sock"))
    with httpx.Client(transport=transport, base_url="http://kiln-agent", timeout=10) as client:
        yield client


def post_raw(http: httpx.Client, path: str, body: str) -> httpx.Response:
    """``body`` as written: NaN, Infinity and 1e400 are what a hostile client can send."""
    return http.post(path, content=body.encode(), headers={"content-type": "application/json"})


def assert_400(resp: httpx.Response, parameter: str) -> str:
    assert resp.status_code == 400, (resp.status_code, resp.text)
    detail = resp.json()["detail"]
    assert isinstance(detail, str) and detail.startswith(f"{parameter}: "), detail
    return detail


def assert_serving(agent: RunningAgent, pid: int) -> None:
    assert agent.client.health()["ok"] and agent.pid() == pid


@pytest.mark.parametrize("parameter", ["after", "limit", "follow"])
def test_events_query_parameters_are_bounded(
    agent: RunningAgent, http: httpx.Client, parameter: str
) -> None:
    pid = agent.pid()
    out_of_range = {"after": ["-1"], "limit": ["0", "10001"], "follow": ["2", "-1"]}[parameter]
    for value in HOSTILE_QUERY + out_of_range:
        resp = http.get("/v1/events", params={parameter: value})
        detail = assert_400(resp, parameter)
        assert "must be an integer from" in detail, detail
    assert_serving(agent, pid)


def test_events_bounds_themselves_are_accepted(agent: RunningAgent, http: httpx.Client) -> None:
    for params in (
        {"limit": "1"},
        {"limit": "10000"},
        {"after": "0"},
        {"after": str(2**63 - 1)},
        {"follow": "0"},
    ):
        resp = http.get("/v1/events", params=params)
        assert resp.status_code == 200, (params, resp.text)
        assert isinstance(resp.json()["events"], list)
        assert resp.json()["last_id"] >= 2  # proxy.started, agent.started


def test_the_client_turns_a_400_into_one_clear_error(agent: RunningAgent) -> None:
    with pytest.raises(KilnError, match=r"^limit: must be an integer from 1 to 10000, not "):
        agent.client.events(limit=10**20)
    assert agent.client.last_event_id() == max(e["id"] for e in agent.client.events())


def test_rollback_revision_is_bounded(agent: RunningAgent, http: httpx.Client) -> None:
    pid = agent.pid()
    for value in [*HOSTILE_JSON, "0"]:
        resp = post_raw(http, "/v1/rollback", f'{{"service": "web", "revision": {value}}}')
        assert_400(resp, "revision")
    assert_400(post_raw(http, "/v1/rollback", '{"revision": 1}'), "service")
    for body in ("{", "[]", "", "NaN"):
        assert_400(post_raw(http, "/v1/rollback", body), "body")
    # In range, but no such service: the engine's own answer, not a validation error.
    resp = post_raw(http, "/v1/rollback", f'{{"service": "web", "revision": {2**63 - 1}}}')
    assert resp.status_code == 404, resp.text
    assert_serving(agent, pid)


SERVICE_NUMBERS = [
    ("replicas", ["1001", *HOSTILE_JSON]),
    ("port", ["0", "65536", *HOSTILE_JSON]),
    ("listen", ["0", "70000", *HOSTILE_JSON]),
    ("stop_grace", ["86401", '"25h"', *HOSTILE_JSON]),
    ("drain_timeout", ["86401", *HOSTILE_JSON]),
    ("health.interval", ["0", *HOSTILE_JSON]),
    ("health.timeout", ["0", *HOSTILE_JSON]),
    ("health.unhealthy_after", ["0", *HOSTILE_JSON]),
    ("update.max_surge", ["1001", *HOSTILE_JSON]),
    ("update.progress_deadline", [*HOSTILE_JSON]),
    ("heal.max_parallel", ["0", *HOSTILE_JSON]),
    ("heal.meltdown_fraction", ["0", *HOSTILE_JSON]),
    ("resources.memory", ["0", '"1000TiB"', *HOSTILE_JSON]),
    ("resources.cpu", ["0", "2000", *HOSTILE_JSON]),
]
ACCEPTS_FRACTIONS = {
    "stop_grace",
    "drain_timeout",
    "health.interval",
    "health.timeout",
    "update.progress_deadline",
    "heal.meltdown_fraction",
    "resources.cpu",
}
"""Durations are a number of seconds and cpu a share, so 1.5 is a fine value there."""


def with_value(request: dict[str, Any], dotted: str, raw: str) -> str:
    """The plan request as JSON text with ``service_config.<dotted>`` set to ``raw`` verbatim."""
    changed = copy.deepcopy(request)
    table = changed["services"]["web"]["service_config"]
    *parents, last = dotted.split(".")
    for part in parents:
        table = table[part]
    table[last] = "__HOSTILE__"
    return json.dumps(changed).replace('"__HOSTILE__"', raw)


@pytest.mark.parametrize(("key", "values"), SERVICE_NUMBERS, ids=[k for k, _ in SERVICE_NUMBERS])
def test_plan_checks_every_number_of_a_service(
    agent: RunningAgent, http: httpx.Client, key: str, values: list[str]
) -> None:
    """Replica counts, ports, timeouts, sizes: the same bounds as ``kiln.toml``."""
    pid = agent.pid()
    request = plan_request(service_spec(DIGEST, listen=18000))
    for raw in values:
        if raw == "1.5" and key in ACCEPTS_FRACTIONS:
            continue
        resp = post_raw(http, "/v1/plan", with_value(request, key, raw))
        assert_400(resp, f"services.web.service_config.{key}")
    assert http.post("/v1/plan", json=request).status_code == 200
    assert_serving(agent, pid)


def test_apply_checks_the_numbers_of_a_plan(agent: RunningAgent, http: httpx.Client) -> None:
    """A plan file can be edited by hand before ``kiln apply plan.json``."""
    pid = agent.pid()
    planned = http.post("/v1/plan", json=plan_request(service_spec(DIGEST))).json()["plan"]
    too_many = copy.deepcopy(planned)
    too_many["desired"]["web"]["service_config"]["replicas"] = 10**9
    detail = assert_400(
        http.post("/v1/apply", json={"plan": too_many}), "plan.desired.web.service_config.replicas"
    )
    assert detail.endswith("must be ≤ 1000, not 1000000000")
    for raw in HOSTILE_JSON:
        text = json.dumps({"plan": planned})
        first_revision = '"revision": null'
        assert first_revision in text
        text = text.replace(first_revision, f'"revision": {raw}', 1)
        assert_400(post_raw(http, "/v1/apply", text), "plan.services[0].changes[0].revision")
    assert agent.client.status()["services"] == {}  # nothing was applied
    assert_serving(agent, pid)


def test_unknown_and_hostile_ids_are_404(agent: RunningAgent, http: httpx.Client) -> None:
    pid = agent.pid()
    for deployment in ("d-00000000", "a" * 5000, "%00", "..."):
        resp = http.get(f"/v1/deployments/{deployment}")
        assert resp.status_code == 404, (deployment[:20], resp.status_code, resp.text[:200])
    assert_serving(agent, pid)
