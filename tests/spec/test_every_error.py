"""Every mistake of a file is found, once, with its line; commands show the first and
count the rest, ``kiln validate`` shows them all. Types are strict: what a person
wrote as a string where a number belongs (or a bare number where a duration
belongs) is an error, not a guess."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from kiln.spec import Health, Service, SpecError, parse_spec
from kiln.spec._locate import key_lines
from kiln.spec.loader import check_spec
from kiln.spec.models import Spec, _positive_duration, _spec_duration

FILE = Path("kiln.toml")
BASE = """\
[project]
name = "demo"

[images.web]
from = "scratch"

[services.web]
image = "web"
"""


def errors_of(text: str, env: str | None = None) -> list[str]:
    _, errors = check_spec(text, FILE, env)
    assert errors, "accepted"
    return [str(e) for e in errors]


def test_a_misspelt_table_name_has_the_line_of_its_header() -> None:
    """``[image.web]`` names ``image`` only as a prefix of its header: it used to have
    no line at all."""
    text = BASE.replace("[images.web]", "[image.web]")
    assert errors_of(text) == [
        "kiln.toml:4: image: unknown key; did you mean 'images'?",
        # Not "services.web.image: no recipe images.web": references are checked only
        # in a file whose tables are right, so one mistake gives one error.
    ]


def test_every_prefix_of_a_header_or_a_dotted_key_has_the_line_where_it_first_appears() -> None:
    lines = key_lines("a = 1\n[b.c.d]\ne.f.g = 1\nh = { i.j = 2 }\n[[k.l]]\nm = 3\n[b.c]\n")
    assert lines[("b",)] == lines[("b", "c")] == lines[("b", "c", "d")] == 2
    assert lines[("b", "c", "d", "e")] == lines[("b", "c", "d", "e", "f", "g")] == 3
    assert lines[("b", "c", "d", "h", "i")] == lines[("b", "c", "d", "h", "i", "j")] == 4
    assert lines[("k",)] == lines[("k", "l")] == lines[("k", "l", 0)] == 5
    assert lines[("k", "l", 0, "m")] == 6


def test_a_multiline_string_with_an_escaped_quote_does_not_shift_the_lines() -> None:
    lines = key_lines('a = """one \\""" two\nthree"""\nb = 1\n')
    assert lines[("b",)] == 3


SEVERAL = """\
[project]
name = "demo"

[image.cache]
from = "scratch"

[images.web]
from = "scratch"
steps = [{ run = 5 }, { run = ["make", 5] }, { copy = "a", to = "/b", mode = "0644" }]

[services.web]
imge = "web"
replicas = "2"
listen = "17090"

[services.web.health]
interval = 1
"""


def test_every_error_in_file_order_each_once_and_the_first_counts_the_rest() -> None:
    expected = [
        "kiln.toml:4: image: unknown key; did you mean 'images'?",
        "kiln.toml:9: images.web.steps[0].run: must be a string or a list",
        "kiln.toml:9: images.web.steps[1].run[1]: must be a string",
        "kiln.toml:9: images.web.steps[2].mode: unknown key; did you mean 'chmod'?",
        # The misspelt key explains the missing `image`: no "required key is missing".
        "kiln.toml:12: services.web.imge: unknown key; did you mean 'image'?",
        "kiln.toml:13: services.web.replicas: must be an integer: write 2, without quotes",
        "kiln.toml:14: services.web.listen: must be an integer: write 17090, without quotes",
        'kiln.toml:17: services.web.health.interval: must be a duration string such as "1s", '
        "not the number 1",
    ]
    assert errors_of(SEVERAL) == expected
    with pytest.raises(SpecError) as err:
        parse_spec(SEVERAL, FILE)
    assert str(err.value) == expected[0] + " (and 7 more; run kiln validate to see them all)"
    assert [str(e) for e in err.value.errors] == expected


def test_references_are_all_reported_too() -> None:
    text = (
        BASE.replace('image = "web"', 'image = "wbe"\nlisten = 8000')
        + '[services.api]\nimage = "api"\nlisten = 8000\n'
        + '[images.api]\nfrom = "image:api"\npackages = ["curl"]\n'
    )
    assert errors_of(text) == [
        "kiln.toml:8: services.web.image: no recipe images.wbe in this file; did you mean 'web'?",
        "kiln.toml:12: services.api.listen: port 8000 is already the listen port of services.web",
        "kiln.toml:14: images.api.from: an image cannot be its own base",
        "kiln.toml:15: images.api.packages: packages need a debian:SUITE base",
    ]


def test_a_missing_table_is_reported_at_line_1() -> None:
    assert errors_of('[images.web]\nfrom = "scratch"\n') == [
        "kiln.toml:1: project: required key is missing"
    ]


def test_malformed_toml_at_the_end_of_the_file_names_the_last_line() -> None:
    assert errors_of(BASE + "[services.api\n") == [
        "kiln.toml:9:14: malformed TOML: Expected ']' at the end of a table declaration"
    ]
    assert errors_of(BASE + 'x = "open') == ["kiln.toml:9:10: malformed TOML: Unterminated string"]


def test_nesting_too_deep_for_tomllib_has_its_line() -> None:
    text = BASE + "deep = " + "[" * 5000 + "]" * 5000 + "\n"
    assert errors_of(text) == ["kiln.toml:9: malformed TOML: nested too deeply"]


def test_a_file_that_is_not_utf8_names_the_line(tmp_path: Path) -> None:
    from kiln.spec import load_spec

    (tmp_path / "kiln.toml").write_bytes(BASE.encode() + b'env = { A = "\xff" }\n')
    with pytest.raises(SpecError, match=r"kiln.toml:9: not UTF-8 text"):
        load_spec(tmp_path)


def test_an_overlay_mistake_is_located_in_the_overlay() -> None:
    text = BASE + '[environments.prod.services.web]\nreplicas = "5"\n'
    assert errors_of(text, env="prod") == [
        "kiln.toml:10: services.web.replicas: must be an integer: write 5, without quotes"
    ]
    assert errors_of(text, env="staging") == [
        "kiln.toml:9: environments.staging: no such environment (prod)"
    ]


def test_a_misspelt_overlay_target_and_a_base_mistake_are_both_reported() -> None:
    text = BASE + "replicas = -1\n[environments.prod.services.wbe]\nreplicas = 5\n"
    assert errors_of(text, env="prod") == [
        "kiln.toml:9: services.web.replicas: must be ≥ 0",
        "kiln.toml:10: environments.prod.services.wbe: overlays services.wbe, which the file "
        "does not define",
    ]
    with pytest.raises(SpecError, match=r"\(and 1 more; run kiln validate --env prod to see"):
        parse_spec(text, FILE, env="prod")


# -- strict types ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('replicas = "2"', "services.web.replicas: must be an integer: write 2, without quotes"),
        (
            'listen = "17090"',
            "services.web.listen: must be an integer: write 17090, without quotes",
        ),
        ('port = "8080"', "services.web.port: must be an integer: write 8080, without quotes"),
        ("replicas = 2.0", "services.web.replicas: must be an integer"),
        ("listen = true", "services.web.listen: must be an integer"),
        (
            "health = { interval = 1 }",
            'services.web.health.interval: must be a duration string such as "1s", '
            "not the number 1",
        ),
        (
            "stop_grace = 2.5",
            'services.web.stop_grace: must be a duration string such as "2.5s", not the number 2.5',
        ),
        (
            'health = { tcp = "true" }',
            "services.web.health.tcp: must be true or false: write true, without quotes",
        ),
        ('resources = { cpu = "0.5" }', "services.web.resources.cpu: must be a number"),
        ("env = { A = 1 }", "services.web.env.A: must be a string"),
    ],
)
def test_no_value_is_coerced(line: str, message: str) -> None:
    assert errors_of(BASE + line + "\n") == [f"kiln.toml:9: {message}"]


def _duration_keys(model: type[BaseModel], prefix: str) -> list[str]:
    """Every key of ``model`` (and of the tables under it) that holds a duration."""
    out = []
    for name, field in model.model_fields.items():
        key = f"{prefix}.{field.alias or name}"
        validators = [getattr(m, "func", None) for m in field.metadata]
        if _spec_duration in validators or _positive_duration in validators:
            out.append(key)
        inner = [a for a in typing.get_args(field.annotation) if a is not type(None)]
        for candidate in [field.annotation, *inner]:
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                out += _duration_keys(candidate, key)
    return out


DURATIONS = [
    *_duration_keys(Service, "services.web"),
    "images.web.healthcheck.interval",
    "images.web.healthcheck.timeout",
]


NEEDS_CONTEXT = {
    # A table under an array of tables, or one whose other keys are required: written
    # with what it needs around it.
    "services.web.update.steps.pause": 'update = {{ strategy = "canary", steps = '
    "[{{ weight = 10, pause = {value} }}] }}",
    "services.web.update.pre_promotion.timeout": 'update = {{ strategy = "blue-green", '
    'pre_promotion = {{ http = "/ready", timeout = {value} }} }}',
}


def test_the_duration_keys_are_all_found() -> None:
    assert len(DURATIONS) == 17, DURATIONS
    assert "services.web.heal.backoff_cap" in DURATIONS


@pytest.mark.parametrize("key", DURATIONS)
def test_every_duration_key_refuses_a_bare_number_and_takes_a_string(key: str) -> None:
    if key in NEEDS_CONTEXT:
        line = NEEDS_CONTEXT[key]
        where = key.replace(".steps.", ".steps[0].")
        assert errors_of(BASE + line.format(value=3) + "\n") == [
            f'kiln.toml:9: {where}: must be a duration string such as "3s", not the number 3'
        ]
        assert isinstance(parse_spec(BASE + line.format(value='"3s"') + "\n", FILE), Spec)
        return
    table, _, leaf = key.rpartition(".")
    header = "" if table == "services.web" else f"[{table}]\n"
    text = BASE + f"{header}{leaf} = 3\n"
    line = 9 if not header else 10
    assert errors_of(text) == [
        f'kiln.toml:{line}: {key}: must be a duration string such as "3s", not the number 3'
    ]
    spec = parse_spec(text.replace(f"{leaf} = 3", f'{leaf} = "3s"'), FILE)
    assert isinstance(spec, Spec)


def test_a_stored_config_with_seconds_as_numbers_still_loads() -> None:
    """The agent re-reads the service configs it stored (durations as numbers of
    seconds): only a written ``kiln.toml`` must spell the unit."""
    spec = parse_spec(BASE + 'stop_grace = "2.5s"\nhealth = { interval = "250ms" }\n', FILE)
    dumped = spec.services["web"].model_dump(mode="json", by_alias=True)
    assert dumped["stop_grace"] == 2.5 and dumped["health"]["interval"] == 0.25
    assert Service.model_validate(dumped) == spec.services["web"]
    assert Health(interval=1).interval == 1.0
