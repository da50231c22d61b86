"""The runtime choice carries a swarm's ``[runtime] nodes`` from kiln.toml to the agent
(its command line, its API's plan body, ``runtime.json``) unchanged, and a choice
without nodes is written exactly as before they existed."""

from __future__ import annotations

import json
from pathlib import Path

from kiln.agent.api import PlanRequest
from kiln.agent.client import agent_command
from kiln.runtime.select import Registry, RuntimeChoice, read_choice, write_choice

NODES = (("10.0.0.12", "unix:///run/n2.sock"), ("node-1", "tcp://10.0.0.11:2376"))


def test_a_choice_without_nodes_is_written_as_before() -> None:
    choice = RuntimeChoice("swarm", "tcp://10.0.0.11:2376", Registry("10.0.0.5:5000/k"))
    assert set(choice.to_json()) == {"kind", "host", "registry"}
    old = {"kind": "swarm", "host": "tcp://10.0.0.11:2376", "registry": {"path": "r:5000/k"}}
    assert RuntimeChoice.from_json(old).nodes == ()


def test_nodes_survive_runtime_json_the_agent_command_and_the_plan_body(tmp_path: Path) -> None:
    choice = RuntimeChoice("swarm", "tcp://10.0.0.11:2376", Registry("10.0.0.5:5000/k"), NODES)
    write_choice(tmp_path, choice)
    assert read_choice(tmp_path) == choice
    argv = agent_command(tmp_path, choice)
    assert json.loads(argv[argv.index("--runtime-nodes") + 1]) == dict(NODES)
    body = PlanRequest.model_validate(
        {"runtime": choice.to_json(), "spec_path": "/p/kiln.toml", "services": {}}
    ).model_dump()
    assert RuntimeChoice.from_json(body["runtime"]) == choice
    assert "with the engines of nodes 10.0.0.12, node-1" in choice.describe()
    without = RuntimeChoice("swarm", "tcp://10.0.0.11:2376", Registry("10.0.0.5:5000/k"))
    assert without != choice, "adding nodes is another choice: the agent must be restarted"
