"""The agent runs the policy gate itself at apply, on the image it reads from its own
store: a client that calls the API directly, skipping the CLI's gate, is refused and
nothing starts."""

from __future__ import annotations

from pathlib import Path

import pytest
from agent_harness import RunningAgent, plan_request, service_spec

from kiln.errors import KilnError

ENFORCED = '[project]\nname = "t"\n\n[policy]\nenforce = true\n'


def _nothing_ran(agent: RunningAgent) -> None:
    status = agent.client.status()
    services = status.get("services") or {}
    assert all(not (s.get("instances") or []) for s in services.values()), services
    with pytest.raises(KilnError, match="no service 'web'"):
        agent.client.history("web")  # no revision was recorded


def test_the_agent_refuses_an_unsigned_image_when_the_plan_enforces(
    agent: RunningAgent, image: str
) -> None:
    request = {**plan_request(service_spec(image, replicas=1)), "spec_text": ENFORCED}
    planned = agent.client.plan(**request)
    with pytest.raises(KilnError) as refused:
        agent.client.apply(planned["plan"])
    text = str(refused.value)
    assert "nothing was changed" in text
    assert f"deny: web: image {image} is not signed by a trusted key" not in text  # no keys
    assert "deny: web: no trusted key" in text
    assert "deny: web: runs as root (image user unset)" in text
    _nothing_ran(agent)


def test_the_homes_policy_applies_even_when_the_plan_has_none(
    agent: RunningAgent, image: str, kiln_home: Path
) -> None:
    (kiln_home / "policy.toml").write_text("[policy]\nenforce = true\n")
    planned = agent.client.plan(**plan_request(service_spec(image, replicas=1)))
    with pytest.raises(KilnError, match="deny: web: no trusted key"):
        agent.client.apply(planned["plan"])
    _nothing_ran(agent)
