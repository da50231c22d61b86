"""Read ``kiln.toml`` into a typed ``Spec``; every error names file, line and key."""

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
from kiln.spec._locate import KeyPath, key_lines, line_of
from kiln.spec.models import Recipe, RuntimeTargetOverlay, Service, Spec, shown

_STEP_TAGS = {"copy", "run", "env", "workdir"}


class SpecError(KilnError):
    """A mistake in ``kiln.toml``, located as precisely as the file allows."""

    def __init__(self, file: Path, line: int | None, key: str, message: str) -> None:
        self.file = file
        self.line = line
        self.key = key
        self.detail = message
        where = f"{file}:{line}" if line else str(file)
        super().__init__(f"{where}: {key}: {message}" if key else f"{where}: {message}")


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


def _message(err: Any, path: KeyPath) -> str:
    kind = err["type"]
    ctx = err.get("ctx") or {}
    if kind == "extra_forbidden":
        parent = _model_at(path[:-1])
        hint = ""
        if parent is not None:
            close = difflib.get_close_matches(str(path[-1]), _known_keys(parent), n=1)
            if close:
                hint = f"; did you mean {close[0]!r}?"
            else:
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
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return "must be an integer"
    if kind in ("string_type",):
        return "must be a string"
    if kind in ("bool_type", "bool_parsing"):
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
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"\(at line (\d+), column (\d+)\)", str(e))
        reason = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(e))
        where = f"{path}:{m.group(1)}:{m.group(2)}" if m else str(path)
        raise SpecErrorAt(where, f"malformed TOML: {reason}") from None
    except RecursionError:
        raise SpecErrorAt(str(path), "malformed TOML: nested too deeply") from None
    lines = key_lines(text)
    _check_values(data, path, lines)
    if env is not None:
        _apply_overlay(data, env, path, lines)
    try:
        spec = Spec.model_validate(data)
    except ValidationError as e:
        key_path, message = describe_errors(e.errors(), lines)
        raise SpecError(path, line_of(lines, key_path), key_name(key_path), message) from None
    _check_references(spec, path, lines)
    _check_runtime(spec, path, lines, env)
    spec._path = path
    spec._text = text
    spec._environment = env
    return spec


def describe_errors(
    errors: Sequence[Any], lines: dict[KeyPath, int] | None = None
) -> tuple[KeyPath, str]:
    """The one pydantic error to show (the earliest in the file) as (key path, message).

    Shared with the agent's API, which checks what it is sent with the same
    models and must name the bad key the same way.
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


def _check_values(data: dict[str, Any], path: Path, lines: dict[KeyPath, int]) -> None:
    """Refuse what no model would: absurd nesting and NUL characters (no argv or file
    name can hold one, so it would only fail later, far from the file)."""
    stack: list[tuple[KeyPath, Any]] = [((), data)]
    while stack:
        key, value = stack.pop()
        if len(key) > MAX_DEPTH:
            raise SpecError(
                path, line_of(lines, key), key_name(key[:MAX_DEPTH]), "nested too deeply"
            )
        if isinstance(value, str) and "\0" in value:
            raise SpecError(path, line_of(lines, key), key_name(key), "contains a NUL character")
        if isinstance(value, dict):
            for k, v in value.items():
                if "\0" in k:
                    raise SpecError(
                        path, line_of(lines, key), key_name(key), "a key contains a NUL character"
                    )
                stack.append(((*key, k), v))
        elif isinstance(value, list):
            stack.extend(((*key, i), v) for i, v in enumerate(value))


def _apply_overlay(data: dict[str, Any], env: str, path: Path, lines: dict[KeyPath, int]) -> None:
    """Merge ``[environments.ENV]`` over the base tables, in place."""

    def table(value: Any, key: KeyPath) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise SpecError(path, line_of(lines, key), key_name(key), "must be a table")
        return value

    envs = table(data.get("environments", {}), ("environments",))
    if env not in envs:
        known = ", ".join(key_name((name,)) for name in sorted(envs)) or "none defined"
        raise SpecError(
            path, None, key_name(("environments", env)), f"no such environment ({known})"
        )
    overlay = table(copy.deepcopy(envs[env]), ("environments", env))
    for section in ("services", "images"):
        overlays = table(overlay.get(section, {}), ("environments", env, section))
        for name, changes in overlays.items():
            key = ("environments", env, section, name)
            base = table(data.get(section, {}), (section,))
            if name not in base:
                raise SpecError(
                    path,
                    line_of(lines, key),
                    key_name(key),
                    f"overlays {key_name((section, name))}, which the file does not define",
                )
            base[name] = _deep_merge(table(base[name], (section, name)), table(changes, key))
    if "runtime" in overlay:
        runtime_key: KeyPath = ("environments", env, "runtime")
        runtime = table(overlay["runtime"], runtime_key)
        # Checked before merging: a mistake is reported where the overlay wrote it.
        try:
            RuntimeTargetOverlay.model_validate(runtime)
        except ValidationError as e:
            errors = [{**err, "loc": (*runtime_key, *err["loc"])} for err in e.errors()]
            full, message = describe_errors(errors, lines)
            raise SpecError(path, line_of(lines, full), key_name(full), message) from None
        data["runtime"] = {**table(data.get("runtime", {}), ("runtime",)), **runtime}


class SpecErrorAt(KilnError):
    """Malformed TOML: tomllib knows the line and column but not the key."""

    def __init__(self, where: str, message: str) -> None:
        super().__init__(f"{where}: {message}")


def _check_references(spec: Spec, path: Path, lines: dict[KeyPath, int]) -> None:
    recipes = sorted(spec.images)

    def fail(key: KeyPath, message: str) -> None:
        raise SpecError(path, line_of(lines, key), key_name(key), message)

    def suggest(name: str) -> str:
        close = difflib.get_close_matches(name, recipes, n=1)
        return f"; did you mean {close[0]!r}?" if close else ""

    for name, recipe in spec.images.items():
        _check_recipe(recipe, name, fail, suggest, recipes)
    listens: dict[int, str] = {}
    for name, service in spec.services.items():
        _check_service(service, name, fail, suggest, recipes)
        if service.listen is not None:
            other = listens.get(service.listen)
            if other:
                fail(
                    ("services", name, "listen"),
                    f"port {service.listen} is already the listen port of "
                    f"{key_name(('services', other))}",
                )
            listens[service.listen] = name


def _check_runtime(spec: Spec, path: Path, lines: dict[KeyPath, int], env: str | None) -> None:
    """``host`` names a Docker Engine: it means nothing to the local runtime."""
    runtime = spec.runtime
    if runtime.kind == "docker" or runtime.host is None:
        return

    def where(key: str) -> KeyPath:
        overlaid = ("environments", env, "runtime", key) if env is not None else None
        return overlaid if overlaid is not None and overlaid in lines else ("runtime", key)

    kind_from = where("kind")
    origin = f" ({key_name(kind_from[:-1])} sets kind)" if kind_from[0] == "environments" else ""
    host_key = where("host")
    raise SpecError(
        path,
        line_of(lines, host_key),
        key_name(host_key),
        f'is only used with kind = "docker"; kind is "{runtime.kind}"{origin}',
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
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise SpecError(file, None, "", f"not UTF-8 text ({e.reason})") from None
    except OSError as e:
        raise SpecError(file, None, "", f"cannot read it: {e.strerror or e}") from None
    return parse_spec(text, file, env)


def json_schema() -> dict[str, Any]:
    """The published schema of ``kiln.toml`` (editors use it for completion)."""
    schema = Spec.model_json_schema(by_alias=True, mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "kiln.toml"
    return schema
