"""docs/spec.md documents every key the models accept, and no key they refuse: the
models are walked, table by table, against the doc's ``### `[TABLE]``` sections."""

from __future__ import annotations

import re
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from kiln.spec.models import Spec

DOC = Path(__file__).resolve().parents[2] / "docs" / "spec.md"


def _models_in(annotation: Any) -> tuple[list[type[BaseModel]], str]:
    """The models a field holds, and how: a table (``""``), an array of tables
    (``"[]"``) or tables under names (``".NAME"``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation], ""
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin is list and args:
        return _models_in(args[0])[0], "[]"
    if origin is dict and args:
        return _models_in(args[-1])[0], ".NAME"
    models: list[type[BaseModel]] = []
    for arg in args:  # a union, or Annotated[X, …]
        models += _models_in(arg)[0]
    return models, ""


def accepted(model: type[BaseModel] = Spec, table: str = "") -> dict[str, set[str]]:
    """Table (``services.NAME.health``, ``images.NAME.steps[]``) → the keys it accepts."""
    out: dict[str, set[str]] = {table: set()}
    for name, field in model.model_fields.items():
        key = field.alias or name
        out[table].add(key)
        models, how = _models_in(field.annotation)
        for inner in models:
            for sub, keys in accepted(inner, f"{table}.{key}{how}".lstrip(".")).items():
                out.setdefault(sub, set()).update(keys)
    return out


def documented() -> dict[str, set[str]]:
    """``### `[TABLE]``` (``[[TABLE]]`` for an array) → the keys its rows name."""
    out: dict[str, set[str]] = {}
    table = None
    for line in DOC.read_text().splitlines():
        if line.startswith("#"):
            m = re.fullmatch(r"### `(\[\[?)([A-Za-z0-9_.]+)\]\]?`", line)
            table = None
            if m:
                table = m.group(2) + ("[]" if m.group(1) == "[[" else "")
                out[table] = set()
        elif table is not None and line.startswith("| `"):
            first_cell = line.split("|")[1]
            out[table].update(re.findall(r"`([A-Za-z0-9_]+)`", first_cell))
    return out


def test_every_table_and_key_the_models_accept_is_documented() -> None:
    models, doc = accepted(), documented()
    top = models.pop("")
    assert top == {t.split(".")[0] for t in models}, "every top-level key is a table"
    missing = {t: sorted(keys - doc.get(t, set())) for t, keys in models.items()}
    assert {t: k for t, k in missing.items() if k or t not in doc} == {}


def test_nothing_is_documented_that_the_models_refuse() -> None:
    models, doc = accepted(), documented()
    assert set(doc) <= set(models), sorted(set(doc) - set(models))
    extra = {t: sorted(keys - models[t]) for t, keys in doc.items()}
    assert {t: k for t, k in extra.items() if k} == {}


def test_the_walk_sees_the_keys_that_were_once_undocumented() -> None:
    """Guards the walk itself: an empty walk would pass the two tests above."""
    doc = documented()
    assert "description" in accepted()["project"] and "description" in doc["project"]
    assert "readonly" in accepted()["services.NAME.volumes[]"]
    assert "readonly" in doc["services.NAME.volumes[]"]
    assert {"copy", "run", "env", "workdir", "network"} <= doc["images.NAME.steps[]"]
    assert len(accepted()) >= 14  # the top level and 13 tables today
