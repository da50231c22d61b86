"""Table-driven: a minimal valid file plus one mistake, asserting the exact message."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kiln.spec import SpecError, json_schema, load_spec, parse_spec
from kiln.spec.models import CopyStep, RunStep, parse_duration, parse_size

VALID = """\
[project]
name = "shop"

[images.web]
from = "debian:bookworm"
packages = ["python3-minimal"]
steps = [
  { copy = "app/", to = "/srv/app" },
  { run = "python3 -m compileall -q /srv/app" },
]
cmd = ["python3", "server.py"]

[services.web]
image = "web"
replicas = 3
listen = 8000
health = { http = "/healthz", interval = "1s", timeout = "1s" }
update = { strategy = "rolling", max_surge = 1, max_unavailable = 0 }

[environments.production.services.web]
replicas = 5
"""


def test_valid_file_parses_into_typed_models() -> None:
    spec = parse_spec(VALID, Path("/p/kiln.toml"))
    web = spec.images["web"]
    assert isinstance(web.steps[0], CopyStep) and web.steps[0].to == "/srv/app"
    assert isinstance(web.steps[1], RunStep) and not web.steps[1].network
    svc = spec.services["web"]
    assert (svc.replicas, svc.health.interval, svc.update.max_surge) == (3, 1.0, 1)
    assert svc.update.auto_rollback is True
    assert spec.root == Path("/p") and spec.text == VALID


def test_environment_overlay_is_merged() -> None:
    spec = parse_spec(VALID, Path("kiln.toml"), env="production")
    assert spec.services["web"].replicas == 5
    assert spec.services["web"].listen == 8000


def test_a_key_found_wrong_after_loading_has_its_line_the_overlays_when_it_has_one() -> None:
    spec = parse_spec(VALID, Path("kiln.toml"))
    assert spec.line("images", "web", "steps", 1) == 9
    assert spec.line("images", "web", "steps", 7) == 7  # not written: its nearest ancestor
    assert spec.line("services", "web", "replicas") == 15
    overlaid = parse_spec(VALID, Path("kiln.toml"), env="production")
    assert overlaid.line("services", "web", "replicas") == 21
    assert overlaid.line("services", "web", "listen") == 16
    assert parse_spec(VALID, Path("kiln.toml")).line("nothing") is None


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        (
            "max_surge = 1",
            "max_surj = 1",
            "kiln.toml:18: services.web.update.max_surj: unknown key; did you mean 'max_surge'?",
        ),
        (
            "max_surge = 1",
            "max_surge = -1",
            "kiln.toml:18: services.web.update.max_surge: must be ≥ 0",
        ),
        (
            "replicas = 3",
            'replicas = "three"',
            "kiln.toml:15: services.web.replicas: must be an integer",
        ),
        (
            'to = "/srv/app"',
            'to = "srv/app"',
            "kiln.toml:8: images.web.steps[0].to: must be an absolute path in the image, "
            "not 'srv/app'",
        ),
        (
            "{ run =",
            "{ runn =",
            "kiln.toml:9: images.web.steps[1]: a step needs exactly one of copy, run, env, workdir",
        ),
        (
            'image = "web"',
            'image = "wbe"',
            "kiln.toml:14: services.web.image: no recipe images.wbe in this file; "
            "did you mean 'web'?",
        ),
        (
            'interval = "1s"',
            'interval = "1 sec"',
            "kiln.toml:17: services.web.health.interval: '1 sec' is not a duration such as "
            '"1s", "250ms" or "2m"',
        ),
        (
            'from = "debian:bookworm"',
            'from = "image:web"',
            "kiln.toml:5: images.web.from: an image cannot be its own base",
        ),
        (
            'from = "debian:bookworm"',
            'from = "ubuntu:24.04"',
            "kiln.toml:5: images.web.from: unknown base 'ubuntu:24.04': use scratch, "
            "debian:SUITE, image:NAME or oci:PATH[:REF]",
        ),
        (
            'strategy = "rolling"',
            'strategy = "yolo"',
            "kiln.toml:18: services.web.update.strategy: must be one of 'rolling', 'canary' or "
            "'blue-green'",
        ),
        (
            'name = "shop"',
            'nme = "shop"',
            "kiln.toml:2: project.nme: unknown key; did you mean 'name'?",
        ),
        # Numbers and durations: wrong types, NaN, infinity, negative, absurd.
        (
            'http = "/healthz"',
            'http = "healthz"',
            "kiln.toml:17: services.web.health: http must be a path starting with /, "
            "such as /healthz",
        ),
        (
            'interval = "1s"',
            "interval = nan",
            'kiln.toml:17: services.web.health.interval: must be a duration string such as "1s" '
            'or "250ms", not NaN',
        ),
        (
            'interval = "1s"',
            'interval = "25h"',
            "kiln.toml:17: services.web.health.interval: must be at most 24h",
        ),
        (
            'interval = "1s"',
            'interval = "0s"',
            "kiln.toml:17: services.web.health.interval: must be > 0",
        ),
        (
            'timeout = "1s"',
            "timeout = true",
            'kiln.toml:17: services.web.health.timeout: must be a duration such as "1s" or '
            '"250ms", not a boolean',
        ),
        (
            "replicas = 3",
            "replicas = 3\ndrain_timeout = {}",
            'kiln.toml:16: services.web.drain_timeout: must be a duration such as "1s" or '
            '"250ms", not a table',
        ),
        (
            "replicas = 3",
            'replicas = 3\nstop_grace = "-1s"',
            "kiln.toml:16: services.web.stop_grace: '-1s' is not a duration such as \"1s\", "
            '"250ms" or "2m"',
        ),
        (
            "replicas = 3",
            'replicas = 3\nstop_grace = "25h"',
            "kiln.toml:16: services.web.stop_grace: must be at most 24h",
        ),
        (
            "replicas = 3",
            "replicas = 3\nstop_grace = 99999999999999999999999",
            'kiln.toml:16: services.web.stop_grace: must be a duration string such as "1s" or '
            '"250ms", not a number',
        ),
        (
            "replicas = 3",
            "replicas = 99999999999999999999",
            "kiln.toml:15: services.web.replicas: must be ≤ 1000",
        ),
        (
            "replicas = 3",
            "replicas = true",
            "kiln.toml:15: services.web.replicas: must be an integer",
        ),
        (
            "replicas = 3",
            "replicas = 3.0",
            "kiln.toml:15: services.web.replicas: must be an integer",
        ),
        (
            "replicas = 3",
            "replicas = [3]",
            "kiln.toml:15: services.web.replicas: must be an integer",
        ),
        (
            "replicas = 3",
            "replicas = 3\nport = 70000",
            "kiln.toml:16: services.web.port: must be ≤ 65535",
        ),
        (
            "max_surge = 1",
            "max_surge = 1e400",
            "kiln.toml:18: services.web.update.max_surge: must be an integer",
        ),
        (
            "replicas = 3",
            "replicas = 3\nresources = { memory = nan }",
            'kiln.toml:16: services.web.resources.memory: must be a size such as "256MiB" or a '
            "number of bytes, not NaN",
        ),
        (
            "replicas = 3",
            'replicas = 3\nresources = { memory = "99999TiB" }',
            "kiln.toml:16: services.web.resources.memory: must be at most 64TiB",
        ),
        (
            "replicas = 3",
            "replicas = 3\nresources = { memory = 0 }",
            "kiln.toml:16: services.web.resources.memory: must be at least 1MiB",
        ),
        (
            "replicas = 3",
            "replicas = 3\nresources = { cpu = inf }",
            "kiln.toml:16: services.web.resources.cpu: must be a finite number, "
            "not NaN or infinity",
        ),
        (
            "replicas = 3",
            "replicas = 3\nresources = { cpu = {} }",
            "kiln.toml:16: services.web.resources.cpu: must be a number",
        ),
        (
            "replicas = 3",
            "replicas = 3\nheal = { meltdown_fraction = nan }",
            "kiln.toml:16: services.web.heal.meltdown_fraction: must be a finite number, "
            "not NaN or infinity",
        ),
        (
            'cmd = ["python3"',
            'expose = [8080, 0]\ncmd = ["python3"',
            "kiln.toml:11: images.web.expose[1]: must be a port between 1 and 65535",
        ),
        (
            '{ run = "python3',
            '{ network = "yes", run = "python3',
            "kiln.toml:9: images.web.steps[1].network: must be true or false",
        ),
        (
            'image = "web"',
            'image = "w\\u0000b"',
            "kiln.toml:14: services.web.image: contains a NUL character",
        ),
    ],
)
def test_one_bad_key_gives_one_exact_message(old: str, new: str, message: str) -> None:
    assert old in VALID
    with pytest.raises(SpecError) as err:
        parse_spec(VALID.replace(old, new, 1), Path("kiln.toml"))
    assert str(err.value).split(" (and ")[0] == message


def test_malformed_toml_names_line_and_column() -> None:
    with pytest.raises(Exception) as err:
        parse_spec(VALID.replace('name = "shop"', "name = shop"), Path("kiln.toml"))
    assert str(err.value) == "kiln.toml:2:8: malformed TOML: Invalid value"


def test_unknown_environment_lists_the_known_ones() -> None:
    with pytest.raises(
        SpecError, match=r"environments.staging: no such environment \(production\)"
    ):
        parse_spec(VALID, Path("kiln.toml"), env="staging")


def test_listen_port_clash_between_services() -> None:
    text = VALID + '\n[services.api]\nimage = "web"\nlisten = 8000\n'
    with pytest.raises(SpecError, match=r"kiln.toml:\d+: services.api.listen: port 8000"):
        parse_spec(text, Path("kiln.toml"))


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="no such file"):
        load_spec(tmp_path)
    (tmp_path / "kiln.toml").write_text(VALID)
    assert load_spec(tmp_path).path == tmp_path / "kiln.toml"


def test_binary_garbage_is_refused(tmp_path: Path) -> None:
    (tmp_path / "kiln.toml").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(SpecError, match="not UTF-8"):
        load_spec(tmp_path)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("1s", 1.0), ("250ms", 0.25), ("2m", 120.0), ("1.5h", 5400.0), (3, 3.0), (0.5, 0.5)],
)
def test_durations(text: str | int, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "value",
    [
        float("nan"),
        float("inf"),
        -1,
        10**400,
        "9" * 400 + "s",
        True,
        {},
        [],
        None,
        "-1s",
        "1 sec",
    ],
)
def test_impossible_durations_are_value_errors(value: object) -> None:
    """ValueError, never AttributeError or OverflowError: callers turn it into a KilnError."""
    with pytest.raises(ValueError):
        parse_duration(value)


def test_duration_cap() -> None:
    assert parse_duration("24h", maximum=86400) == 86400
    with pytest.raises(ValueError, match="at most 24h"):
        parse_duration("1441m", maximum=86400)


def test_sizes() -> None:
    assert parse_size("256MiB") == 256 * 1024**2
    assert parse_size("1G") == 1024**3
    assert parse_size(512) == 512
    for bad in ("lots", "9" * 400 + "G", 1.5, float("nan"), -1, True, {}, None):
        with pytest.raises(ValueError):
            parse_size(bad)
    with pytest.raises(ValueError, match="at most 1GiB"):
        parse_size("2G", maximum=1024**3)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            "[environments]\nproduction = 3\n",
            "kiln.toml:21: environments.production: must be a table",
        ),
        (
            "[environments.staging]\nservices = []\n",
            "kiln.toml:21: environments.staging.services: must be a table",
        ),
        (
            "[environments.staging.services]\nweb = 5\n",
            "kiln.toml:21: environments.staging.services.web: must be a table",
        ),
    ],
)
def test_malformed_overlays_are_errors_not_crashes(extra: str, message: str) -> None:
    text = VALID.replace("[environments.production.services.web]\nreplicas = 5\n", extra)
    env = "production" if "production" in extra else "staging"
    with pytest.raises(SpecError) as err:
        parse_spec(text, Path("kiln.toml"), env=env)
    assert str(err.value) == message


def test_overlay_of_a_service_that_is_not_a_table() -> None:
    text = VALID.replace('[services.web]\nimage = "web"', "[services]\nweb = 1\n[x]\nimage = 1")
    with pytest.raises(SpecError) as err:
        parse_spec(text, Path("kiln.toml"), env="production")
    assert [str(e) for e in err.value.errors] == [
        "kiln.toml:14: services.web: must be a table",
        "kiln.toml:15: x: unknown key; known keys: environments, images, policy, project, "
        "registries, runtime, services",
    ]


def test_schema_is_published_and_describes_the_file() -> None:
    schema = json_schema()
    assert schema["title"] == "kiln.toml"
    assert {"project", "images", "services"} <= set(schema["properties"])
    out = subprocess.run(
        [sys.executable, "-m", "kiln.cli.main", "schema"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(out.stdout)["title"] == "kiln.toml"


def test_example_project_is_valid() -> None:
    root = Path(__file__).resolve().parents[2] / "examples" / "shop"
    spec = load_spec(root)
    assert spec.services["web"].replicas == 3
    assert load_spec(root, env="production").services["web"].replicas == 5


def test_an_error_stays_on_one_line_whatever_the_key_holds() -> None:
    text = VALID.replace("[services.web]\n", '[services.web]\n"a\\nb" = 1\n', 1)
    with pytest.raises(SpecError) as err:
        parse_spec(text, Path("kiln.toml"))
    assert str(err.value).startswith('kiln.toml:14: services.web."a\\u000ab": unknown key; ')
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("check", "message"),
    [
        (
            '{ http = "/ready", exec = ["true"] }',
            "kiln.toml:21: services.web.update.pre_promotion: give one of http (a path) or exec "
            "(a command run in each instance)",
        ),
        (
            '{ timeout = "1s" }',
            "kiln.toml:21: services.web.update.pre_promotion: give one of http (a path) or exec "
            "(a command run in each instance)",
        ),
        (
            "{ exec = [] }",
            "kiln.toml:21: services.web.update.pre_promotion.exec: must not be empty",
        ),
        (
            '{ exec = ["a\\u0000b"] }',
            "kiln.toml:21: services.web.update.pre_promotion.exec[0]: contains a NUL character",
        ),
    ],
)
def test_a_pre_promotion_check_is_one_http_path_or_one_command(check: str, message: str) -> None:
    text = VALID.replace(
        "[environments.production.services.web]",
        f'[services.web.update]\nstrategy = "blue-green"\npre_promotion = {check}\n\n'
        "[environments.production.services.web]",
    ).replace('update = { strategy = "rolling", max_surge = 1, max_unavailable = 0 }\n', "")
    with pytest.raises(SpecError) as err:
        parse_spec(text, Path("kiln.toml"))
    assert str(err.value) == message


def test_exec_checks_are_refused_on_swarm_at_plan_time() -> None:
    text = (
        VALID.replace(
            'health = { http = "/healthz", interval = "1s", timeout = "1s" }',
            'health = { exec = ["/bin/true"] }',
        )
        + '\n[runtime]\nkind = "swarm"\nregistry = "127.0.0.1:5000/kiln"\n'
    )
    with pytest.raises(SpecError) as err:
        parse_spec(text, Path("kiln.toml"))
    assert 'services.web.health.exec: cannot run on kind = "swarm"' in str(err.value)
    assert "use http or tcp" in str(err.value)


def test_a_canary_is_planned_on_swarm() -> None:
    """The edges post their counters while a canary is judged: nothing to refuse."""
    text = (
        VALID.replace(
            'strategy = "rolling"', 'strategy = "canary", steps = [{ weight = 10, pause = "1m" }]'
        )
        + '\n[runtime]\nkind = "swarm"\nregistry = "127.0.0.1:5000/kiln"\n'
    )
    spec = parse_spec(text, Path("kiln.toml"))
    assert spec.services["web"].update.strategy == "canary"
