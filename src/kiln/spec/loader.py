"""Read ``kiln.toml`` into a typed ``Spec``; every error names file, line and key.

All the mistakes of a file are found in one pass, in stages (TOML syntax; values no
model could hold; ``--env`` overlays; the models; references between tables). A
stage works on what the earlier ones accepted, and references are checked only once
the tables are right, so one mistake never shows up twice, as itself and as its
consequence. Commands report the first with a count; ``kiln validate`` every one.
"""

from __future__ import annotations

import copy
import difflib
import re
import tomllib
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from kiln.errors import KilnError
from kiln.spec._locate import KeyPath, key_lines, line_of, nesting_line
from kiln.spec.models import WRITTEN, Recipe, RuntimeTargetOverlay, Service, Spec, shown

_STEP_TAGS = {"copy", "run", "env", "workdir"}


class SpecError(KilnError):
    """A mistake in ``kiln.toml``, located as precisely as the file allows."""

    def __init__(self, file: Path, line: int | None, key: str, message: str) -> None:
        self.file = file
        self.line = line
        self.key = key
        self.path_key: KeyPath | None = None
        self.detail = message
        where = f"{file}:{line}" if line else str(file)
        super().__init__(f"{where}: {key}: {message}" if key else f"{where}: {message}")
        self.errors: list[KilnError] = [self]
        """Every mistake found in the file, this one first, in file order."""


def _reported(errors: list[KilnError], env: str | None) -> KilnError:
    """The first error, with how many more there are and how to see them all."""
    first = errors[0]
    if len(errors) == 1 or not isinstance(first, SpecError):
        return first
    validate = "kiln validate" + (f" --env {env}" if env is not None else "")
    more = f" (and {len(errors) - 1} more; run {validate} to see them all)"
    summary = SpecError(first.file, first.line, first.key, first.detail + more)
    summary.errors = list(errors)
    return summary


class _Found:
    """The errors of one file as they are found: one per key, each with its line."""

    def __init__(self, path: Path, lines: dict[KeyPath, int], env: str | None) -> None:
        self.path = path
        self.lines = lines
        self.env = env
        self.errors: list[SpecError] = []

    def add(self, key: KeyPath, message: str, *, in_file: bool = True, merged: bool = True) -> None:
        """``in_file``: the mistake is in the file, so it has a line even when no part of
        its key is written (a missing ``[project]`` is reported at line 1). ``merged``:
        ``key`` is of the file after ``--env`` merged its overlays, so the overlay's line
        is the one to show when it wrote the key."""
        if any(e.path_key == key for e in self.errors):
            return
        env = self.env if merged else None
        line = line_of(self.lines, key, env) or (1 if in_file else None)
        error = SpecError(self.path, line, key_name(key), message)
        error.path_key = key
        self.errors.append(error)

    def in_file_order(self) -> list[KilnError]:
        """Stable: errors on one line keep the order they were found in."""
        return [*sorted(self.errors, key=lambda e: e.line or 0)]


def key_name(path: KeyPath) -> str:
    """``services.web.health``, ``labels."a.b"``, ``steps[1]``: as TOML would write it,
    escaped so that an error stays on one line whatever the key holds."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            text = part if re.fullmatch(r"[A-Za-z0-9_-]+", part) else _quoted(part)
            out += f".{text}" if out else text
    return out


def _quoted(text: str) -> str:
    def escape(ch: str) -> str:
        if ch in '"\\':
            return "\\" + ch
        if ch.isprintable():
            return ch
        return f"\\u{ord(ch):04x}" if ord(ch) <= 0xFFFF else f"\\U{ord(ch):08x}"

    return '"' + "".join(map(escape, text)) + '"'


def _strip_tags(loc: tuple[str | int, ...]) -> KeyPath:
    """Drop the discriminator tag pydantic puts after a step's index."""
    out: list[str | int] = []
    for i, part in enumerate(loc):
        after_step_index = i >= 2 and isinstance(loc[i - 1], int) and loc[i - 2] == "steps"
        if after_step_index and part in _STEP_TAGS:
            continue
        out.append(part)
    return tuple(out)


def _model_at(path: KeyPath) -> type[BaseModel] | None:
    """The model whose keys live at ``path`` (for 'did you mean' on an unknown key)."""
    current: Any = Spec
    for part in path:
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(str(part))
            if field is None:
                field = next((f for f in current.model_fields.values() if f.alias == part), None)
            if field is None:
                return None
            current = field.annotation
            continue
        origin = typing.get_origin(current)
        args = typing.get_args(current)
        if origin in (dict, list) and args:
            current = args[-1]
        elif args:
            current = next(
                (a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), None
            )
        else:
            return None
    while typing.get_origin(current) is not None and not isinstance(current, type):
        members = [a for a in typing.get_args(current) if a is not type(None)]
        current = members[0] if members else None
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _known_keys(model: type[BaseModel]) -> list[str]:
    return [f.alias or name for name, f in model.model_fields.items()]


def _close_key(path: KeyPath) -> str | None:
    """The known key an unknown ``path[-1]`` is probably a misspelling of."""
    parent = _model_at(path[:-1])
    if parent is None:
        return None
    close = difflib.get_close_matches(str(path[-1]), _known_keys(parent), n=1)
    return close[0] if close else None


def _message(err: Any, path: KeyPath) -> str:
    kind = err["type"]
    ctx = err.get("ctx") or {}
    if kind == "extra_forbidden":
        parent = _model_at(path[:-1])
        hint = ""
        close = _close_key(path)
        if close is not None:
            hint = f"; did you mean {close!r}?"
        elif parent is not None:
            hint = f"; known keys: {', '.join(sorted(_known_keys(parent)))}"
        return f"unknown key{hint}"
    if kind == "missing":
        return "required key is missing"
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        sign = {"greater_than_equal": "≥", "greater_than": ">", "less_than_equal": "≤"}.get(
            kind, "<"
        )
        bound = next(iter(ctx.values()), "")
        return f"must be {sign} {bound}"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected', '')}"
    if kind == "string_pattern_mismatch":
        return f"{shown(err.get('input'))} does not match {ctx.get('pattern')}"
    quoted = err.get("input") if isinstance(err.get("input"), str) else None
    if kind in ("int_type", "int_parsing", "int_from_float"):
        if quoted is not None and re.fullmatch(r"[+-]?\d{1,18}", quoted.strip()):
            return f"must be an integer: write {int(quoted)}, without quotes"
        return "must be an integer"
    if kind in ("string_type",):
        return "must be a string"
    if kind in ("bool_type", "bool_parsing"):
        if quoted is not None and quoted.strip() in ("true", "false"):
            return f"must be true or false: write {quoted.strip()}, without quotes"
        return "must be true or false"
    if kind in ("list_type",):
        return "must be a list"
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return "must be a table"
    if kind in ("float_type", "float_parsing"):
        return "must be a number"
    if kind == "finite_number":
        return "must be a finite number, not NaN or infinity"
    if kind in ("string_too_short", "too_short") and ctx.get("min_length") == 1:
        return "must not be empty"
    msg = str(err.get("msg", "invalid"))
    return msg.removeprefix("Value error, ")


def _deep_merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in overlay.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def find_spec_file(target: Path | None = None) -> Path:
    """A directory means its ``kiln.toml``; nothing means the current directory's."""
    path = Path(target) if target else Path.cwd()
    if path.is_dir():
        path = path / "kiln.toml"
    if not path.is_file():
        raise KilnError(f"{path}: no such file (kiln looks for kiln.toml in the project directory)")
    return path.absolute()


MAX_DEPTH = 32
"""Tables and arrays nested deeper than this are a generated or corrupt file, not a spec."""


def parse_spec(text: str, path: Path, env: str | None = None) -> Spec:
    """The file's ``Spec``, or a ``SpecError`` naming its first mistake and counting the rest."""
    spec, errors = check_spec(text, path, env)
    if errors:
        raise _reported(errors, env)
    assert spec is not None
    return spec


def check_spec(
    text: str, path: Path, env: str | None = None
) -> tuple[Spec | None, list[KilnError]]:
    """Every mistake of the file in file order, and the ``Spec`` when the models accept it
    (even if references between its tables are wrong): what ``kiln validate`` needs."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        return None, [_malformed(text, path, str(e))]
    except RecursionError:
        line = nesting_line(text, MAX_DEPTH)
        return None, [
            SpecErrorAt(
                f"{path}:{line}" if line else str(path), "malformed TOML: nested too deeply"
            )
        ]
    found = _Found(path, key_lines(text), env)
    _check_values(data, found)
    if found.errors:
        return None, found.in_file_order()
    if env is not None:
        _apply_overlay(data, env, found)
    try:
        spec = Spec.model_validate(data, context=WRITTEN)
    except ValidationError as e:
        for key, message in _model_errors(e.errors(), data):
            found.add(key, message)
        return None, found.in_file_order()
    _check_references(spec, found)
    _check_runtime(spec, found)
    _check_registries(spec, found)
    spec._path = path
    spec._text = text
    spec._environment = env
    return spec, found.in_file_order()


def _malformed(text: str, path: Path, reason: str) -> SpecErrorAt:
    """tomllib's reason with the line and column it gives, also "at end of document"."""
    m = re.search(r"\(at line (\d+), column (\d+)\)", reason)
    if m:
        where = f"{path}:{m.group(1)}:{m.group(2)}"
    elif "(at end of document)" in reason:
        last = text.split("\n")[-1]
        where = f"{path}:{text.count(chr(10)) + 1}:{len(last) + 1}"
    else:
        where = str(path)
    reason = re.sub(r"\s*\(at (line \d+, column \d+|end of document)\)", "", reason)
    return SpecErrorAt(where, f"malformed TOML: {reason}")


def describe_errors(
    errors: Sequence[Any], lines: dict[KeyPath, int] | None = None
) -> tuple[KeyPath, str]:
    """The one pydantic error to show (the earliest in the file) as (key path, message).

    Used by the agent's API, which checks what it is sent with the same models and
    must name the bad key the same way.
    """
    where = lines or {}

    def order(err: Any) -> tuple[bool, int, bool]:
        """A misspelt key explains the 'missing' one it causes, so it goes first."""
        line = line_of(where, _strip_tags(tuple(err["loc"]))) or 0
        return (err["type"] == "missing", line, err["type"] != "extra_forbidden")

    first = min(errors, key=order)
    key_path = _strip_tags(tuple(first["loc"]))
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return key_path, _message(first, key_path) + more


def _written_path(loc: KeyPath, data: Any, missing: bool) -> tuple[KeyPath, KeyPath | None]:
    """``loc`` as keys of the file, and the union it went through, if any.

    pydantic names a union's alternatives in ``loc`` (``run.str``, ``run.list[str]``):
    those parts are no key of the file, so they are dropped, and the path up to them
    (the union's key) is returned second.
    """
    out: list[str | int] = []
    union: KeyPath | None = None
    node = data
    for i, part in enumerate(loc):
        in_list = isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)
        if in_list or (isinstance(node, dict) and part in node):
            node = node[part]
        elif missing and i == len(loc) - 1:
            node = None
        else:
            union = union or tuple(out)
            continue
        out.append(part)
    return tuple(out), union


def _model_errors(errors: Sequence[Any], data: Any) -> list[tuple[KeyPath, str]]:
    """pydantic's errors as (key path, message), one per key: a union's alternatives are
    merged ("must be a string or a list") unless one of them got further into the value
    (then its error is the one that explains), and a "required key is missing" goes when
    an unknown key beside it is a misspelling of it (one mistake, one error)."""
    found: list[tuple[KeyPath, KeyPath | None, str, str]] = []
    for err in errors:
        key, union = _written_path(_strip_tags(tuple(err["loc"])), data, err["type"] == "missing")
        found.append((key, union, err["type"], _message(err, key)))
    deeper = {u for key, u, _, _ in found if u is not None and len(key) > len(u)}
    misspelt = {
        (*key[:-1], close)
        for key, _, kind, _ in found
        if kind == "extra_forbidden" and (close := _close_key(key)) is not None
    }
    messages: dict[KeyPath, list[str]] = {}
    for key, union, kind, message in found:
        if (union in deeper and key == union) or (kind == "missing" and key in misspelt):
            continue
        if message not in messages.setdefault(key, []):
            messages[key].append(message)
    return [(key, _either(texts)) for key, texts in messages.items()]


def _either(messages: list[str]) -> str:
    if len(messages) > 1 and all(m.startswith("must be ") for m in messages):
        return "must be " + " or ".join(m.removeprefix("must be ") for m in messages)
    return messages[0]


def _check_values(data: dict[str, Any], found: _Found) -> None:
    """Refuse what no model would: absurd nesting and NUL characters (no argv or file
    name can hold one, so it would only fail later, far from the file)."""
    stack: list[tuple[KeyPath, Any]] = [((), data)]
    while stack:
        key, value = stack.pop()
        if len(key) > MAX_DEPTH:
            found.add(key[:MAX_DEPTH], "nested too deeply")
        elif isinstance(value, str) and "\0" in value:
            found.add(key, "contains a NUL character")
        elif isinstance(value, dict):
            for k, v in value.items():
                if "\0" in k:
                    found.add(key, "a key contains a NUL character")
                else:
                    stack.append(((*key, k), v))
        elif isinstance(value, list):
            stack.extend(((*key, i), v) for i, v in enumerate(value))


def _apply_overlay(data: dict[str, Any], env: str, found: _Found) -> None:
    """Merge ``[environments.ENV]`` over the base tables, in place; what cannot be merged
    is an error and stays out."""

    def table(value: Any, key: KeyPath) -> dict[str, Any] | None:
        if isinstance(value, dict):
            return value
        found.add(key, "must be a table", merged=False)
        return None

    envs = table(data.get("environments", {}), ("environments",))
    if envs is None:
        return
    if env not in envs:
        known = ", ".join(key_name((name,)) for name in sorted(envs)) or "none defined"
        # The mistake is the --env given, not a line of the file.
        found.add(
            ("environments", env), f"no such environment ({known})", in_file=False, merged=False
        )
        return
    overlay = table(copy.deepcopy(envs[env]), ("environments", env))
    if overlay is None:
        return
    for section in ("services", "images"):
        overlays = table(overlay.get(section, {}), ("environments", env, section))
        for name, changes in (overlays or {}).items():
            key = ("environments", env, section, name)
            base = table(data.get(section, {}), (section,))
            if base is None:
                break
            if name not in base:
                found.add(
                    key,
                    f"overlays {key_name((section, name))}, which the file does not define",
                    merged=False,
                )
                continue
            base_table = table(base[name], (section, name))
            change_table = table(changes, key)
            if base_table is not None and change_table is not None:
                base[name] = _deep_merge(base_table, change_table)
    if "runtime" in overlay:
        runtime_key: KeyPath = ("environments", env, "runtime")
        runtime = table(overlay["runtime"], runtime_key)
        if runtime is None:
            return
        # Checked before merging: a mistake is reported where the overlay wrote it.
        try:
            RuntimeTargetOverlay.model_validate(runtime, context=WRITTEN)
        except ValidationError as e:
            errors = [{**err, "loc": (*runtime_key, *err["loc"])} for err in e.errors()]
            for bad, message in _model_errors(errors, data):
                found.add(bad, message)
            return
        base_runtime = table(data.get("runtime", {}), ("runtime",))
        if base_runtime is not None:
            data["runtime"] = {**base_runtime, **runtime}


class SpecErrorAt(KilnError):
    """Malformed TOML: tomllib knows the line and column but not the key."""

    def __init__(self, where: str, message: str) -> None:
        super().__init__(f"{where}: {message}")


def _check_references(spec: Spec, found: _Found) -> None:
    recipes = sorted(spec.images)

    def suggest(name: str) -> str:
        close = difflib.get_close_matches(name, recipes, n=1)
        return f"; did you mean {close[0]!r}?" if close else ""

    for name, recipe in spec.images.items():
        _check_recipe(recipe, name, found.add, suggest, recipes)
    listens: dict[int, str] = {}
    for name, service in spec.services.items():
        _check_service(service, name, found.add, suggest, recipes)
        if service.listen is not None:
            other = listens.get(service.listen)
            if other:
                found.add(
                    ("services", name, "listen"),
                    f"port {service.listen} is already the listen port of "
                    f"{key_name(('services', other))}",
                )
            else:
                listens[service.listen] = name


def _check_runtime(spec: Spec, found: _Found) -> None:
    """``host`` names a Docker Engine (or a Swarm manager): it means nothing to the local
    runtime; ``registry`` is where a Swarm's nodes pull from, and a Swarm needs one;
    ``nodes`` (each node's engine) is what lets exec reach a Swarm task."""
    runtime = spec.runtime
    env = found.env

    def where(key: str) -> KeyPath:
        overlaid = ("environments", env, "runtime", key) if env is not None else None
        return overlaid if overlaid is not None and overlaid in found.lines else ("runtime", key)

    kind_from = where("kind")
    origin = f" ({key_name(kind_from[:-1])} sets kind)" if kind_from[0] == "environments" else ""
    if runtime.host is not None and runtime.kind == "local":
        found.add(
            where("host"),
            f'is only used with kind = "docker" or "swarm"; kind is "{runtime.kind}"{origin}',
        )
    if runtime.registry is not None and runtime.kind != "swarm":
        found.add(
            where("registry"), f'is only used with kind = "swarm"; kind is "{runtime.kind}"{origin}'
        )
    if runtime.nodes is not None and runtime.kind != "swarm":
        found.add(
            where("nodes"), f'is only used with kind = "swarm"; kind is "{runtime.kind}"{origin}'
        )
    if runtime.kind == "swarm" and runtime.registry is None:
        found.add(
            kind_from,
            'is "swarm", which needs registry = "HOST[:PORT]/PATH" in [runtime]: every node '
            "pulls the images from there",
        )
    if runtime.kind == "swarm":
        for name, service in spec.services.items():
            if service.health.exec is not None and not runtime.nodes:
                found.add(
                    ("services", name, "health", "exec"),
                    f'cannot run on kind = "swarm"{origin} without [runtime] nodes: Swarm '
                    "offers no exec into a task through its manager; give each node's Engine "
                    "API in nodes, or use http or tcp",
                )
            check = service.update.pre_promotion
            if check is not None and check.exec is not None and not runtime.nodes:
                found.add(
                    ("services", name, "update", "pre_promotion", "exec"),
                    f'cannot run on kind = "swarm"{origin} without [runtime] nodes: Swarm '
                    "offers no exec into a task through its manager; give each node's Engine "
                    "API in nodes, or use http",
                )


def _check_registries(spec: Spec, found: _Found) -> None:
    """Plain HTTP sends layers and credentials in the clear: loopback only."""
    from kiln.image.registry import RegistryRef, is_loopback

    for host, access in spec.registries.items():
        if access.plain_http and not is_loopback(RegistryRef(host, "x").hostname):
            found.add(
                ("registries", host, "plain_http"),
                f"is only allowed for a registry on loopback; {host} is not (give its ca)",
            )


def _check_recipe(recipe: Recipe, name: str, fail: Any, suggest: Any, recipes: list[str]) -> None:
    base = recipe.from_
    if base.startswith("image:"):
        other = base.removeprefix("image:")
        if other not in recipes:
            fail(
                ("images", name, "from"), f"no recipe {key_name(('images', other))}{suggest(other)}"
            )
        if other == name:
            fail(("images", name, "from"), "an image cannot be its own base")
    elif base.startswith("registry:"):
        from kiln.image.registry import parse_ref

        try:
            parse_ref(base)
        except KilnError as e:
            fail(("images", name, "from"), str(e))
    elif base != "scratch" and not base.startswith(("debian:", "oci:")):
        fail(
            ("images", name, "from"),
            f"unknown base {base!r}: use scratch, debian:SUITE, image:NAME or oci:PATH[:REF]",
        )
    if recipe.packages and not base.startswith("debian:"):
        fail(("images", name, "packages"), "packages need a debian:SUITE base")


def _check_service(
    service: Service, name: str, fail: Any, suggest: Any, recipes: list[str]
) -> None:
    if service.image not in recipes:
        fail(
            ("services", name, "image"),
            f"no recipe {key_name(('images', service.image))} in this file{suggest(service.image)}",
        )
    for i, vol in enumerate(service.volumes):
        if not vol.path.startswith("/"):
            fail(("services", name, "volumes", i, "path"), "must be an absolute path")
    for i, w in enumerate(service.writable):
        if not w.startswith("/"):
            fail(("services", name, "writable", i), "must be an absolute path")


def load_spec(path: Path | None = None, env: str | None = None) -> Spec:
    """Load ``kiln.toml`` (a file, or a directory holding one), applying ``--env`` overlays."""
    file = find_spec_file(path)
    return parse_spec(_read(file), file, env)


def check_spec_file(
    path: Path | None = None, env: str | None = None
) -> tuple[Spec | None, list[KilnError]]:
    """``check_spec`` of a file (or a directory's ``kiln.toml``): never raises a KilnError."""
    try:
        file = find_spec_file(path)
        text = _read(file)
    except KilnError as e:
        return None, [e]
    return check_spec(text, file, env)


def _read(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = e.object[: e.start].count(b"\n") + 1
        raise SpecError(file, line, "", f"not UTF-8 text ({e.reason})") from None
    except OSError as e:
        raise SpecError(file, None, "", f"cannot read it: {e.strerror or e}") from None


def json_schema() -> dict[str, Any]:
    """The published schema of ``kiln.toml`` (editors use it for completion)."""
    schema = Spec.model_json_schema(by_alias=True, mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "kiln.toml"
    return schema
