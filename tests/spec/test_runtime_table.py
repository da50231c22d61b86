"""``[runtime]``: which runtime a project's instances run on, overridable per
environment. Table-driven: a minimal valid file plus one runtime table, asserting
the exact message (file:line: key: reason)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kiln.spec import SpecError, json_schema, parse_spec

BASE = """\
[project]
name = "shop"

[images.web]
from = "scratch"

[services.web]
image = "web"
"""
FILE = Path("kiln.toml")


def parse(extra: str, env: str | None = None) -> object:
    return parse_spec(BASE + extra, FILE, env=env)


def runtime_of(extra: str, env: str | None = None) -> tuple[str, str | None]:
    spec = parse_spec(BASE + extra, FILE, env=env)
    return spec.runtime.kind, spec.runtime.host


def test_without_a_runtime_table_instances_run_locally() -> None:
    assert runtime_of("") == ("local", None)


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ('[runtime]\nkind = "local"\n', ("local", None)),
        ('[runtime]\nkind = "docker"\n', ("docker", None)),
        (
            '[runtime]\nkind = "docker"\nhost = "unix:///run/docker.sock"\n',
            ("docker", "unix:///run/docker.sock"),
        ),
        (
            '[runtime]\nkind = "docker"\nhost = "tcp://10.0.0.5:2376"\n',
            ("docker", "tcp://10.0.0.5:2376"),
        ),
        (
            '[runtime]\nkind = "swarm"\nhost = "tcp://10.0.0.5:2376"\n'
            'registry = "10.0.0.5:5000/k"\n',
            ("swarm", "tcp://10.0.0.5:2376"),
        ),
    ],
)
def test_valid_runtime_tables(table: str, expected: tuple[str, str | None]) -> None:
    assert runtime_of(table) == expected


LONG = "unix:///" + "a" * 2000


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (
            '[runtime]\nkind = "dockerd"\n',
            "kiln.toml:10: runtime.kind: must be one of 'local', 'docker' or 'swarm'",
        ),
        (
            '[runtime]\nkind = "Docker"\n',
            "kiln.toml:10: runtime.kind: must be one of 'local', 'docker' or 'swarm'",
        ),
        (
            "[runtime]\nkind = 1\n",
            "kiln.toml:10: runtime.kind: must be one of 'local', 'docker' or 'swarm'",
        ),
        (
            '[runtime]\nhost = "unix:///run/docker.sock"\n',
            'kiln.toml:10: runtime.host: is only used with kind = "docker" or '
            '"swarm"; kind is "local"',
        ),
        (
            '[runtime]\nkind = "local"\nhost = "unix:///run/docker.sock"\n',
            'kiln.toml:11: runtime.host: is only used with kind = "docker" or '
            '"swarm"; kind is "local"',
        ),
        (
            '[runtime]\nkind = "docker"\nhost = 2375\n',
            "kiln.toml:11: runtime.host: must be a string",
        ),
        (
            '[runtime]\nkind = "docker"\nhost = ["unix:///a"]\n',
            "kiln.toml:11: runtime.host: must be a string",
        ),
        (
            '[runtime]\nkind = "docker"\nhost = "/run/docker.sock"\n',
            "kiln.toml:11: runtime.host: '/run/docker.sock' is not an engine address such as "
            '"unix:///run/docker.sock" or "tcp://10.0.0.5:2376"',
        ),
        (
            '[runtime]\nkind = "docker"\nhost = "http://10.0.0.5"\n',
            "kiln.toml:11: runtime.host: 'http://10.0.0.5' is not an engine address such as "
            '"unix:///run/docker.sock" or "tcp://10.0.0.5:2376"',
        ),
        (
            '[runtime]\nkind = "docker"\nhost = "unix://run/docker.sock"\n',
            "kiln.toml:11: runtime.host: 'unix://run/docker.sock': a unix socket needs an "
            'absolute path, "unix:///PATH"',
        ),
        (
            '[runtime]\nkind = "docker"\nhost = "tcp://"\n',
            "kiln.toml:11: runtime.host: 'tcp://' names no host",
        ),
        (
            '[runtime]\nkind = "docker"\nhost = "tcp://h:1 --tlsverify"\n',
            "kiln.toml:11: runtime.host: 'tcp://h:1 --tlsverify' contains whitespace or control "
            "characters",
        ),
        (
            '[runtime]\nkind = "docker"\nhost = "tcp://h\\u001b[2J"\n',
            "kiln.toml:11: runtime.host: 'tcp://h\\x1b[2J' contains whitespace or control "
            "characters",
        ),
        (
            f'[runtime]\nkind = "docker"\nhost = "{LONG}"\n',
            "kiln.toml:11: runtime.host: must be at most 1024 characters, not 2008",
        ),
        (
            '[runtime]\nkind = "docker"\nsocket = "unix:///x"\n',
            "kiln.toml:11: runtime.socket: unknown key; known keys: host, kind, nodes, registry",
        ),
        (
            '[runtime]\nkinds = "docker"\n',
            "kiln.toml:10: runtime.kinds: unknown key; did you mean 'kind'?",
        ),
        (
            '[runtime]\nkind = "swarm"\n',
            'kiln.toml:10: runtime.kind: is "swarm", which needs registry = "HOST[:PORT]/PATH" '
            "in [runtime]: every node pulls the images from there",
        ),
        (
            '[runtime]\nkind = "docker"\nregistry = "10.0.0.5:5000/kiln"\n',
            'kiln.toml:11: runtime.registry: is only used with kind = "swarm"; kind is "docker"',
        ),
        (
            '[runtime]\nkind = "swarm"\nregistry = "kiln"\n',
            "kiln.toml:11: runtime.registry: 'kiln' must start with a registry host, e.g. "
            "10.0.0.5:5000/kiln",
        ),
        (
            '[runtime]\nkind = "swarm"\nregistry = "10.0.0.5:5000/Kiln Images"\n',
            "kiln.toml:11: runtime.registry: '10.0.0.5:5000/Kiln Images' is not HOST[:PORT][/PATH] "
            "(path in lower case: a-z 0-9 . _ - /)",
        ),
    ],
)
def test_bad_runtime_tables_give_one_exact_message(table: str, message: str) -> None:
    with pytest.raises(SpecError) as caught:
        parse(table)
    assert str(caught.value) == message
    assert "\n" not in str(caught.value)


def test_the_table_may_be_written_inline_and_must_be_a_table() -> None:
    inline = 'runtime = { kind = "docker", host = "ssh://ops@db1" }\n'
    assert parse_spec(inline + BASE, FILE).runtime.host == "ssh://ops@db1"
    with pytest.raises(SpecError) as caught:
        parse_spec('runtime = "docker"\n' + BASE, FILE)
    assert str(caught.value) == "kiln.toml:1: runtime: must be a table"


OVERLAID = """
[runtime]
kind = "docker"
host = "unix:///run/docker.sock"

[environments.staging.runtime]
host = "tcp://10.0.0.5:2376"

[environments.laptop.runtime]
kind = "local"

[environments.dev.services.web]
replicas = 1
"""


def test_an_environment_overrides_only_the_keys_it_sets() -> None:
    assert runtime_of(OVERLAID) == ("docker", "unix:///run/docker.sock")
    assert runtime_of(OVERLAID, env="staging") == ("docker", "tcp://10.0.0.5:2376")
    assert runtime_of(OVERLAID, env="dev") == ("docker", "unix:///run/docker.sock")


def test_an_environment_switching_to_local_must_not_inherit_a_host() -> None:
    with pytest.raises(SpecError) as caught:
        parse(OVERLAID, env="laptop")
    assert str(caught.value) == (
        'kiln.toml:12: runtime.host: is only used with kind = "docker" or "swarm"; kind is "local" '
        "(environments.laptop.runtime sets kind)"
    )


def test_an_environment_switching_to_docker_runs_there() -> None:
    extra = '[environments.prod.runtime]\nkind = "docker"\nhost = "unix:///srv/docker.sock"\n'
    assert runtime_of(extra) == ("local", None)
    assert runtime_of(extra, env="prod") == ("docker", "unix:///srv/docker.sock")


@pytest.mark.parametrize(
    ("overlay", "message"),
    [
        (
            '[environments.prod.runtime]\nkind = "podman"\n',
            "kiln.toml:10: environments.prod.runtime.kind: must be one of 'local', 'docker' or "
            "'swarm'",
        ),
        (
            '[environments.prod.runtime]\nkind = "docker"\nhost = 7\n',
            "kiln.toml:11: environments.prod.runtime.host: must be a string",
        ),
        (
            '[environments.prod.runtime]\nhost = "unix:///run/docker.sock"\n',
            'kiln.toml:10: environments.prod.runtime.host: is only used with kind = "docker" or '
            '"swarm"; kind is "local"',
        ),
        (
            '[environments.prod]\nruntime = ["docker"]\n',
            "kiln.toml:10: environments.prod.runtime: must be a table",
        ),
        (
            '[environments.prod.runtime]\nengine = "docker"\n',
            "kiln.toml:10: environments.prod.runtime.engine: unknown key; known keys: host, kind, "
            "nodes, registry",
        ),
    ],
)
def test_a_bad_overlay_is_reported_where_the_overlay_wrote_it(overlay: str, message: str) -> None:
    with pytest.raises(SpecError) as caught:
        parse(overlay, env="prod")
    assert str(caught.value) == message


def test_a_bad_overlay_of_an_environment_not_chosen_is_still_an_error() -> None:
    overlay = '[environments.prod.runtime]\nkind = "podman"\n'
    with pytest.raises(SpecError) as caught:
        parse(overlay)
    assert str(caught.value) == (
        "kiln.toml:10: environments.prod.runtime.kind: must be one of 'local', 'docker' or 'swarm'"
    )


def test_the_published_schema_describes_the_runtime_table() -> None:
    schema = json_schema()
    runtime = schema["$defs"]["RuntimeTarget"]["properties"]
    assert runtime["kind"]["enum"] == ["local", "docker", "swarm"]
    assert set(runtime) == {"kind", "host", "registry", "nodes"}


SWARM = '[runtime]\nkind = "swarm"\nregistry = "10.0.0.5:5000/k"\n'


def test_swarm_nodes_map_each_node_to_its_engine() -> None:
    table = SWARM + (
        '[runtime.nodes]\n"node-1" = "tcp://10.0.0.11:2376"\n"10.0.0.12" = "unix:///run/n2.sock"\n'
    )
    spec = parse_spec(BASE + table, FILE)
    assert spec.runtime.nodes == {
        "node-1": "tcp://10.0.0.11:2376",
        "10.0.0.12": "unix:///run/n2.sock",
    }
    assert parse_spec(BASE + SWARM, FILE).runtime.nodes is None
    overlay = table + '[environments.prod.runtime]\nnodes = { "db1" = "ssh://ops@db1" }\n'
    assert parse_spec(BASE + overlay, FILE, env="prod").runtime.nodes == {"db1": "ssh://ops@db1"}


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (
            '[runtime]\nkind = "docker"\nnodes = { "n1" = "tcp://10.0.0.11:2376" }\n',
            'kiln.toml:11: runtime.nodes: is only used with kind = "swarm"; kind is "docker"',
        ),
        (
            SWARM + 'nodes = { "n1" = "http://10.0.0.11" }\n',
            "kiln.toml:12: runtime.nodes.n1: 'http://10.0.0.11' is not an engine address such "
            'as "unix:///run/docker.sock" or "tcp://10.0.0.5:2376"',
        ),
        (
            SWARM + 'nodes = { "n1" = "tcp://h:1 --tlsverify" }\n',
            "kiln.toml:12: runtime.nodes.n1: 'tcp://h:1 --tlsverify' contains whitespace or "
            "control characters",
        ),
        (
            SWARM + 'nodes = { "../n1" = "tcp://10.0.0.11:2376" }\n',
            "kiln.toml:12: runtime.nodes.\"../n1\": '../n1' is not a swarm node's hostname, "
            "node id or address (letters, digits, . _ : -)",
        ),
        (
            SWARM + 'nodes = "tcp://10.0.0.11:2376"\n',
            "kiln.toml:12: runtime.nodes: must be a table",
        ),
    ],
)
def test_bad_swarm_nodes_give_one_exact_message(table: str, message: str) -> None:
    with pytest.raises(SpecError) as caught:
        parse(table)
    assert str(caught.value).startswith(message), str(caught.value)
    assert "\n" not in str(caught.value)


def test_exec_checks_on_swarm_need_nodes() -> None:
    service = '[services.web]\nimage = "web"\nhealth = { exec = ["/bin/true"] }\n'
    text = BASE.replace('[services.web]\nimage = "web"\n', service) + SWARM
    with pytest.raises(SpecError) as caught:
        parse_spec(text, FILE)
    assert "services.web.health.exec: cannot run on kind" in str(caught.value)
    assert "without [runtime] nodes" in str(caught.value)
    nodes = 'nodes = { "n1" = "tcp://10.0.0.11:2376" }\n'
    assert parse_spec(text + nodes, FILE).services["web"].health.exec == ["/bin/true"]
    check = '[services.web.update]\nstrategy = "blue-green"\npre_promotion = { exec = ["true"] }\n'
    text = BASE + check + SWARM
    with pytest.raises(SpecError) as caught:
        parse_spec(text, FILE)
    assert "services.web.update.pre_promotion.exec: cannot run on kind" in str(caught.value)
    assert "without [runtime] nodes" in str(caught.value)
    pre_promotion = parse_spec(text + nodes, FILE).services["web"].update.pre_promotion
    assert pre_promotion is not None and pre_promotion.exec == ["true"]
