"""``kiln validate``: every mistake a project holds that kiln would hit later, found now.

Without baking or asking an agent: the file itself (parsed and checked as every
command does, but with every error kept, not only the first), then what it refers
to on this machine — each copy source exists and stays inside the project, each
secret a service mounts is set in the ``KILN_HOME`` that will run it — each error
with its file, line and key, in file order.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["validate_project"]


def validate_project(target: Path | None, env: str | None, home: Path) -> list[str]:
    """Every error found, in file order; empty when the project is ready to bake."""
    from kiln.spec._locate import key_lines, line_of
    from kiln.spec.loader import SpecError, check_spec_file, key_name
    from kiln.spec.models import CopyStep

    spec, problems = check_spec_file(target, env)
    found = [(getattr(e, "line", None) or 0, str(e)) for e in problems]
    if spec is None:
        return [message for _, message in found]
    lines = key_lines(spec.text)

    def error(path: tuple[str | int, ...], message: str) -> None:
        line = line_of(lines, path, spec.environment)
        found.append((line or 0, str(SpecError(spec.path, line, key_name(path), message))))

    root = spec.root.resolve()
    for name, recipe in spec.images.items():
        for index, step in enumerate(recipe.steps):
            if not isinstance(step, CopyStep):
                continue
            path = ("images", name, "steps", index, "copy")
            source = (spec.root / step.copy_).absolute()
            if not os.path.lexists(source):
                error(path, f"{step.copy_} does not exist in {spec.root}")
            elif not source.resolve().is_relative_to(root):
                error(path, f"{step.copy_} is outside the project directory {root}")
    from kiln.deploy.secrets import SecretStore

    stored = {info.name for info in SecretStore(home / "secrets").list()}
    for name, service in spec.services.items():
        for index, secret in enumerate(service.secrets):
            if secret not in stored:
                error(
                    ("services", name, "secrets", index),
                    f"secret {secret} is not set in KILN_HOME {home}; "
                    f"set it with: KILN_HOME={home} kiln secret set {secret}",
                )
    # sorted() is stable: errors on one line keep the order they were found in.
    return [message for _, message in sorted(found, key=lambda item: item[0])]
