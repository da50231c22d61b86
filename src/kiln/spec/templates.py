"""``kiln init``: a working project (``kiln.toml`` and its app) from a template.

The templates are package data under ``kiln/spec/templates/<name>/``, each a
project that ``kiln up`` bakes and serves as written, with comments that teach
the file. They are written with the project name ``hello``; :func:`write_project`
puts the real name in its place and checks the result with the loader every
command uses, so ``kiln init`` can never leave a file that ``kiln up`` refuses.

Importing it imports :mod:`kiln.spec` (pydantic): the CLI does so only when it runs
``kiln init``, never to build its help.
"""

from __future__ import annotations

import os
import re
import unicodedata
from dataclasses import dataclass
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path

from kiln.errors import KilnError

__all__ = [
    "DEFAULT_TEMPLATE",
    "TEMPLATES",
    "TEMPLATE_PROJECT",
    "InitResult",
    "project_name",
    "template_files",
    "write_project",
]

TEMPLATES = ("python", "static", "redis")
"""The templates, each a directory of package data; ``kiln init --help`` describes them."""
DEFAULT_TEMPLATE = "python"
_TRY_IT = {
    "python": "curl http://127.0.0.1:{listen}/",
    "static": "curl http://127.0.0.1:{listen}/",
    "redis": "redis-cli -p {listen} ping",
}
"""How a newcomer reaches each template's service once ``kiln up`` is done."""
TEMPLATE_PROJECT = "hello"
"""The ``[project] name`` the template files are written with."""
FALLBACK_NAME = "app"
"""The name of a project whose directory name keeps no usable character."""
MAX_NAME = 63

_NAME_LINE = re.compile(rf'^(name\s*=\s*)"{TEMPLATE_PROJECT}"( *)', re.MULTILINE)
_NOT_NAME = re.compile(r"[^a-z0-9_.-]+")
_DASHES = re.compile(r"--+")
_EDGES = "-_."


@dataclass(frozen=True)
class InitResult:
    """What ``kiln init`` wrote, and what the newcomer does next."""

    root: Path
    project: str
    template: str
    files: tuple[str, ...]
    """Paths relative to ``root``, in the order written (``kiln.toml`` first)."""
    service: str
    replicas: int
    listen: int | None
    try_it: str | None
    """A command that reaches the service once ``kiln up`` is done."""


def project_name(text: str) -> str:
    """``text`` (a directory name) made into what ``[project] name`` accepts:
    ASCII lowercase letters, digits, ``.``, ``_`` and ``-``, starting with a letter or
    digit, at most 63 characters; "My Shop!" → "my-shop", "Café" → "cafe"."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    name = _DASHES.sub("-", _NOT_NAME.sub("-", ascii_text.lower())).strip(_EDGES)
    return name[:MAX_NAME].rstrip(_EDGES) or FALLBACK_NAME


def _template_root(template: str) -> Traversable:
    if template not in TEMPLATES:
        raise KilnError(
            f"--template: {template!r} is not a template; choose one of {', '.join(TEMPLATES)}"
        )
    return files("kiln.spec").joinpath("templates", template)


def template_files(template: str, name: str = TEMPLATE_PROJECT) -> dict[str, bytes]:
    """The files of ``template`` (relative POSIX path → bytes), ``kiln.toml`` first, with
    ``name`` as the project name."""
    found: dict[str, bytes] = {}
    pending: list[tuple[str, Traversable]] = [("", _template_root(template))]
    while pending:
        prefix, folder = pending.pop()
        for entry in sorted(folder.iterdir(), key=lambda e: e.name):
            relative = f"{prefix}{entry.name}"
            if entry.is_dir():
                if entry.name != "__pycache__":
                    pending.append((f"{relative}/", entry))
            else:
                found[relative] = entry.read_bytes()
    toml = found.pop("kiln.toml").decode()

    def renamed(m: re.Match[str]) -> str:
        """The new name, with the comment after it kept in its column where it fits."""
        pad = len(m.group(2)) + len(TEMPLATE_PROJECT) - len(name)
        return f'{m.group(1)}"{name}"' + " " * (max(pad, 1) if m.group(2) else 0)

    named, count = _NAME_LINE.subn(renamed, toml, count=1)
    if count != 1:
        raise KilnError(f"template {template}: its kiln.toml has no name = {TEMPLATE_PROJECT!r}")
    return {"kiln.toml": named.encode(), **dict(sorted(found.items()))}


def _check_name(name: str) -> None:
    from pydantic import ValidationError

    from kiln.spec.models import Project

    try:
        Project(name=name)
    except ValidationError:
        raise KilnError(
            f"--name: {name!r} is not a project name (lowercase letters, digits, '.', '_', "
            f"'-', starting with a letter or digit, at most {MAX_NAME}); "
            f"try {project_name(name)!r}"
        ) from None


def write_project(
    directory: Path, template: str = DEFAULT_TEMPLATE, name: str | None = None, force: bool = False
) -> InitResult:
    """Write ``template`` into ``directory`` (made if missing) as project ``name`` (default:
    the directory's name, made valid). Writes nothing when one of its files exists,
    unless ``force``: a newcomer's own ``kiln.toml`` or app is never lost by accident."""
    from kiln.spec.loader import parse_spec

    root = Path(directory)
    if name is None:
        name = project_name(root.absolute().resolve().name)
    else:
        _check_name(name)
    contents = template_files(template, name)
    if root.exists() and not root.is_dir():
        raise KilnError(f"{root}: exists and is not a directory")
    existing = [path for path in contents if os.path.lexists(root / path)]
    if len(existing) == 1 and not force:
        raise KilnError(
            f"{root / existing[0]}: already exists; kiln init wrote nothing (--force overwrites it)"
        )
    if existing and not force:
        raise KilnError(
            f"{root}: {', '.join(existing)} already exist; kiln init wrote nothing "
            "(--force overwrites them)"
        )
    spec = parse_spec(contents["kiln.toml"].decode(), root / "kiln.toml")
    try:
        for path, data in contents.items():
            _write(root / path, data)
    except OSError as e:
        where = e.filename or root
        raise KilnError(f"{where}: cannot write it: {e.strerror or e}") from None
    service_name, service = next(iter(spec.services.items()))
    listen = service.listen
    try_it = _TRY_IT[template].format(listen=listen) if listen is not None else None
    return InitResult(
        root=root,
        project=name,
        template=template,
        files=tuple(contents),
        service=service_name,
        replicas=service.replicas,
        listen=listen,
        try_it=try_it,
    )


def _write(path: Path, data: bytes) -> None:
    """Replace ``path`` whole (a symlink there is replaced, never written through)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.kiln-init-{os.getpid()}")
    try:
        temporary.write_bytes(data)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
