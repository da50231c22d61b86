"""Property tests: whatever ``kiln.toml`` holds, the loader answers with a Spec or one
KilnError naming the file and the line, never a traceback.

Files are generated from valid starting points (the shop example, a minimal and
a full file) and mutated structurally (a value replaced by any TOML value, a key
deleted or added) and textually (a line's value replaced or dropped, random
bytes inserted, the text truncated).
"""

from __future__ import annotations

import datetime
import json
import math
import re
import tempfile
import tomllib
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kiln.errors import KilnError
from kiln.spec import Service, Spec, load_spec, parse_spec

FILE = Path("kiln.toml")
SHOP = (Path(__file__).resolve().parents[2] / "examples" / "shop" / "kiln.toml").read_text()
MINIMAL = '[project]\nname = "a"\n'
FULL = """\
[project]
name = "full"
description = "every key"

[images.base]
from = "scratch"
steps = [
  { copy = "app/", to = "/srv/app", chmod = "0755" },
  { run = ["true"], network = false },
  { env = { A = "1" } },
  { workdir = "/srv" },
]
expose = [8080, "53/udp"]
healthcheck = { http = "/healthz", interval = "1s", timeout = "250ms" }
tag = "v1"

[images.web]
from = "image:base"
cmd = ["/bin/app"]

[services.web]
image = "web"
replicas = 2
port = 8080
listen = 8000
protocol = "http"
env = { GREETING = "hi" }
secrets = ["db"]
volumes = [{ name = "data", path = "/var/lib/app", readonly = false }]
writable = ["/var/cache"]
resources = { memory = "256MiB", cpu = 0.5 }
stop_grace = "5s"
drain_timeout = "2.5s"

[services.web.health]
http = "/healthz"
interval = "1s"
timeout = "1s"
healthy_after = 1
unhealthy_after = 3
start_period = "0s"

[services.web.update]
strategy = "rolling"
max_surge = 1
max_unavailable = 0
min_healthy_time = "1s"
healthy_deadline = "1m"
progress_deadline = "5m"
auto_rollback = true

[services.web.heal]
max_parallel = 4
meltdown_fraction = 0.2
meltdown_window = "10m"
backoff_cap = "60s"

[environments.production.services.web]
replicas = 5
resources = { memory = "1GiB" }
"""
STARTS = [SHOP, MINIMAL, FULL]
FAST = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# -- TOML values of every kind, hostile ones included -----------------------

scalars = st.one_of(
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**200), max_value=2**200),
    st.sampled_from([0, -1, 1, 2**63, -(2**63), 2**64, 10**40, 65535, 65536]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 1e308, 5e-324]),
    st.text(st.characters(exclude_categories=["Cs"]), max_size=20),
    st.sampled_from(
        [
            "",
            "1s",
            "-1s",
            "0s",
            "25h",
            "nan",
            "inf",
            "1e400s",
            "9" * 400 + "h",
            "256MiB",
            "99999999999TiB",
            "0B",
            "scratch",
            "image:web",
            "/abs",
            "\0",
        ]
    ),
    st.dates(),
    st.datetimes(),
    st.datetimes(timezones=st.just(datetime.UTC)),
    st.times(),
)
keys = st.one_of(
    st.sampled_from(["name", "image", "replicas", "interval", "memory", "from", "run", "x"]),
    st.text(st.characters(exclude_categories=["Cs"]), max_size=8),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=4)),
    max_leaves=12,
)


def _string(text: str) -> str:
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _string(key)


def toml_value(value: Any) -> str:
    """One TOML value, inline (tables as ``{ … }``), for any value ``values`` draws."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    assert isinstance(value, dict)
    return "{ " + ", ".join(f"{_key(k)} = {toml_value(v)}" for k, v in value.items()) + " }"


def toml_document(data: dict[str, Any]) -> str:
    return "".join(f"{_key(k)} = {toml_value(v)}\n" for k, v in data.items())


# -- the property -------------------------------------------------------------


def check(text: str, env: str | None = None) -> None:
    """A Spec, or a KilnError whose message names the file and the line (only an --env
    the file does not define may have none); nothing else, ever."""
    try:
        spec = parse_spec(text, FILE, env)
    except KilnError as e:
        every = [str(x) for x in getattr(e, "errors", [e])]
        for message in [str(e), *every]:
            assert "\n" not in message, message
            located = re.match(r"kiln\.toml:\d+(:\d+)?: ", message)
            assert located or ": no such environment (" in message, message
        keys = [message.split(": ")[1] for message in every]
        assert len(keys) == len(set(keys)), every  # one error per key
        return
    _accepted_is_sane(spec)


def test_the_starting_points_are_valid() -> None:
    for text in STARTS:
        _accepted_is_sane(parse_spec(text, FILE))


def _accepted_is_sane(spec: Spec) -> None:
    """What the loader accepts is finite JSON and passes the agent's own check again."""
    for service in spec.services.values():
        dumped = service.model_dump(mode="json", by_alias=True)
        json.dumps(dumped, allow_nan=False)
        assert Service.model_validate(dumped) == service


def _paths(data: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(data, dict):
        for k, v in data.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            out += _paths(v, (*prefix, i))
    return out


@st.composite
def mutated_documents(draw: st.DrawFn) -> str:
    """A valid file with one to three structural mutations, written back as TOML."""
    data = tomllib.loads(draw(st.sampled_from(STARTS)))
    for _ in range(draw(st.integers(1, 3))):
        target = draw(st.sampled_from(_paths(data)))
        if not target:
            continue
        parent: Any = data
        for part in target[:-1]:
            parent = parent[part]
        last = target[-1]
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "replace":
            parent[last] = draw(values)
        elif action == "delete":
            del parent[last]
        elif isinstance(parent[last], dict):
            parent[last][draw(keys)] = draw(values)
        else:
            parent[last] = draw(values)
    return toml_document(data)


@st.composite
def edited_texts(draw: st.DrawFn) -> str:
    """A valid file edited as text: a line's value replaced or the line dropped."""
    lines = draw(st.sampled_from(STARTS)).splitlines(keepends=True)
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(lines) - 1))
        line = lines[i]
        if draw(st.booleans()) and " = " in line:
            key = line.split(" = ", 1)[0]
            lines[i] = f"{key} = {toml_value(draw(values))}\n"
        else:
            del lines[i]
            if not lines:
                break
    return "".join(lines)


@FAST
@given(mutated_documents(), st.sampled_from([None, "production", "staging"]))
def test_structurally_mutated_files(text: str, env: str | None) -> None:
    check(text, env)


@FAST
@given(edited_texts(), st.sampled_from([None, "production"]))
def test_files_edited_line_by_line(text: str, env: str | None) -> None:
    check(text, env)


@FAST
@given(st.dictionaries(keys, values, max_size=5), st.sampled_from([None, "production"]))
def test_random_documents(data: dict[str, Any], env: str | None) -> None:
    check(toml_document(data), env)


@FAST
@given(
    st.sampled_from([s.encode() for s in STARTS]),
    st.lists(st.tuples(st.integers(0, 5000), st.binary(min_size=1, max_size=8)), max_size=3),
    st.integers(0, 5000) | st.none(),
)
def test_random_bytes_and_truncation(
    original: bytes, inserts: list[tuple[int, bytes]], cut: int | None
) -> None:
    """Through ``load_spec``, so invalid UTF-8 takes the real path from disk."""
    data = original
    for at, junk in inserts:
        at %= len(data) + 1
        data = data[:at] + junk + data[at:]
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kiln.toml"
        path.write_bytes(data)
        try:
            spec = load_spec(path)
        except KilnError as e:
            assert re.match(rf"{re.escape(str(path))}:\d+", str(e)), str(e)
            return
        _accepted_is_sane(spec)


def test_toml_nan_and_inf_literals_are_refused_with_the_key() -> None:
    for literal in ("nan", "+nan", "-nan", "inf", "+inf", "-inf"):
        for key, value in (
            ("interval", f"health = {{ interval = {literal} }}"),
            ("stop_grace", f"stop_grace = {literal}"),
            ("cpu", f"resources = {{ cpu = {literal} }}"),
            ("memory", f"resources = {{ memory = {literal} }}"),
            ("replicas", f"replicas = {literal}"),
            ("meltdown_fraction", f"heal = {{ meltdown_fraction = {literal} }}"),
        ):
            text = f'{MINIMAL}[images.w]\nfrom = "scratch"\n[services.w]\nimage = "w"\n{value}\n'
            try:
                parse_spec(text, FILE)
            except KilnError as e:
                assert re.match(rf"kiln\.toml:7: services\.w\.[a-z.]*{key}: ", str(e)), str(e)
            else:
                raise AssertionError(f"{value} was accepted")


def test_deep_nesting_is_an_error_not_a_recursion_crash() -> None:
    for depth in (40, 5000):
        text = MINIMAL + "x = " + "[" * depth + "]" * depth + "\n"
        try:
            parse_spec(text, FILE)
        except KilnError as e:
            assert str(e).startswith("kiln.toml"), str(e)
        else:
            raise AssertionError("accepted")
