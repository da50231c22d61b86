"""The docs are checked as a stranger would use them: every ```toml block of README.md and
docs/*.md is a ``kiln.toml`` the loader accepts (or refuses with the error it says),
every ``kiln …`` command they show exists with the flags they show, every command
``kiln --help`` lists is in the README's tour, and the README's example is the file
``kiln init`` writes (tests/e2e/test_init_up.py bakes and serves that one).

Conventions, as an HTML comment on the line before a block:

``<!-- snippet: file PATH -->``
    the block is the content of PATH (relative to the repository);
``<!-- snippet: error TEXT -->``
    the loader must refuse the block with a message containing TEXT;
``<!-- snippet: skip REASON -->``
    the block is not checked.

A ```toml block without a ``[project]`` table is a fragment: it is checked with a
``[project]`` table appended (after it, so its line numbers stay its own) and a
``scratch`` recipe for each image its services name but it does not define. A block
with ``[environments.NAME]`` tables is checked under each environment too.
"""

from __future__ import annotations

import atexit
import functools
import importlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from kiln.errors import KilnError
from kiln.spec.loader import parse_spec

REPO = Path(__file__).resolve().parents[2]
KILN = str(Path(sys.executable).parent / "kiln")
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

_FENCE = re.compile(r"^(\s*)```(\S*)\s*$")
_MARKER = re.compile(r"^<!--\s*snippet:\s*(\w+)\s*(.*?)\s*-->$")
_INLINE = re.compile(r"`(kiln [^`]+)`")
_WORD = re.compile(r"^[a-z][a-z0-9-]*$")
_FLAG = re.compile(r"^(--?[A-Za-z][\w-]*)(?:=.*)?$")


@dataclass(frozen=True)
class Block:
    page: Path
    line: int
    """Line of the block's first content line in the page."""
    info: str
    text: str
    marker: tuple[str, str] | None

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """The fenced code blocks of a Markdown page, with the marker before each."""
    found: list[Block] = []
    lines = page.read_text().splitlines()
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, info = opening.groups()
        before = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        marked = _MARKER.match(before)
        end = i + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        body = [line.removeprefix(indent) for line in lines[i + 1 : end]]
        text = "\n".join(body) + "\n"
        marker = (marked.group(1), marked.group(2)) if marked else None
        found.append(Block(page, i + 2, info, text, marker))
        i = end + 1
    return found


ALL_BLOCKS = [block for page in PAGES for block in blocks(page)]
TOML_BLOCKS = [block for block in ALL_BLOCKS if block.info == "toml"]


def as_file(block: Block) -> tuple[str, list[str]]:
    """The text to load (a fragment completed) and the environments it defines."""
    try:
        data = tomllib.loads(block.text)
    except tomllib.TOMLDecodeError:
        return block.text, []  # the loader says what is wrong, with the line
    environments = list(data.get("environments") or {})
    if "project" in data:
        return block.text, environments
    text = block.text + '\n[project]\nname = "snippet"\n'
    images = data.get("images") or {}
    named = {
        service.get("image")
        for service in (data.get("services") or {}).values()
        if isinstance(service, dict)
    }
    for image in sorted(name for name in named if isinstance(name, str) and name not in images):
        text += f'\n[images."{image}"]\nfrom = "scratch"\n'
    return text, environments


def test_the_pages_have_toml_blocks_and_markers() -> None:
    """The conventions are in use, so a broken extractor cannot pass vacuously."""
    kinds = {block.marker[0] for block in ALL_BLOCKS if block.marker}
    assert {"file", "error"} <= kinds
    assert len(TOML_BLOCKS) >= 5
    assert not kinds - {"file", "error", "skip"}, kinds


@pytest.mark.parametrize("block", TOML_BLOCKS, ids=[block.where for block in TOML_BLOCKS])
def test_toml_block_is_a_kiln_toml(block: Block) -> None:
    kind, argument = block.marker or ("", "")
    if kind == "skip":
        assert argument, f"{block.where}: a skipped block says why"
        return
    text, environments = as_file(block)
    if kind == "error":
        with pytest.raises(KilnError) as refused:
            parse_spec(text, Path("kiln.toml"))
        assert argument in str(refused.value), f"{block.where}: {refused.value}"
        return
    if kind == "file":
        assert block.text == (REPO / argument).read_text(), (
            f"{block.where} is not {argument} any more: copy the file into the page"
        )
    try:
        for env in [None, *environments]:
            parse_spec(text, Path("kiln.toml"), env)
    except KilnError as e:
        pytest.fail(f"{block.where}: {e}")


def test_the_readme_example_is_what_kiln_init_writes() -> None:
    from kiln.spec.templates import TEMPLATE_PROJECT, template_files

    (example,) = [
        b
        for b in TOML_BLOCKS
        if b.page.name == "README.md"
        and b.marker == ("file", "src/kiln/spec/templates/python/kiln.toml")
    ]
    assert example.text.encode() == template_files("python", TEMPLATE_PROJECT)["kiln.toml"]


@dataclass(frozen=True)
class Command:
    words: tuple[str, ...]
    """The words after ``kiln`` up to the first placeholder or flag: the command and
    perhaps some of its arguments (``logs web``)."""
    flags: tuple[str, ...]


def parse_command(line: str) -> Command:
    tokens = line.split(" #")[0].split()
    assert tokens[0] == "kiln", line
    words: list[str] = []
    for token in tokens[1:]:
        if not _WORD.match(token):
            break
        words.append(token)
    flags = []
    for token in tokens[1:]:
        m = _FLAG.match(token.strip("[]().,;…").removesuffix("..."))
        if m:
            flags.append(m.group(1))
    return Command(tuple(words), tuple(flags))


def shown_commands() -> dict[Command, list[str]]:
    """Every ``kiln …`` the pages show: lines of code blocks and inline code."""
    found: dict[Command, list[str]] = {}
    for page in PAGES:
        name = page.relative_to(REPO)
        for block in blocks(page):
            if block.info not in ("", "sh", "shell", "console", "bash"):
                continue
            for offset, line in enumerate(block.text.splitlines()):
                if line.strip().startswith("kiln "):
                    command = parse_command(line.strip())
                    found.setdefault(command, []).append(f"{name}:{block.line + offset}")
        for number, line in enumerate(page.read_text().splitlines(), start=1):
            for span in _INLINE.findall(line):
                found.setdefault(parse_command(span), []).append(f"{name}:{number}")
    return found


HELP_HOME = Path(tempfile.mkdtemp(prefix="kiln-docs-home-"))
"""The ``KILN_HOME`` of the help runs (every command makes its home private first)."""
atexit.register(shutil.rmtree, HELP_HOME, True)


@functools.cache
def kiln(*args: str) -> subprocess.CompletedProcess[str]:
    """The real CLI, run once per distinct argv in a session (help texts do not change)."""
    env = dict(os.environ, KILN_HOME=str(HELP_HOME), COLUMNS="100")
    return subprocess.run([KILN, *args], env=env, text=True, capture_output=True, timeout=60)


def _check(words: tuple[str, ...], flags: set[str]) -> str | None:
    """What is wrong with ``kiln WORDS`` shown with ``flags``, or None."""
    if not words:
        failing = [flag for flag in sorted(flags) if kiln(flag).returncode != 0]
        return f"kiln {failing[0]} fails" if failing else None
    shown = kiln(*words, "--help")
    if shown.returncode != 0:
        return f"kiln {' '.join(words)} --help exits {shown.returncode}: {shown.stderr}"
    usage = re.search(r"Usage: kiln((?: [a-z][\w-]*)*)", shown.stdout)
    path = tuple(usage.group(1).split()) if usage else ()
    if not path or words[: len(path)] != path:
        return f"kiln {' '.join(words)} is not a command (its usage: {path})"
    absent = [
        f
        for f in sorted(flags)
        if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", shown.stdout)
    ]
    return f"kiln {' '.join(path)} has no {', '.join(absent)}" if absent else None


def test_every_kiln_command_shown_exists_with_its_flags() -> None:
    commands = shown_commands()
    assert len(commands) > 30
    by_words: dict[tuple[str, ...], set[str]] = {}
    for command in commands:
        by_words.setdefault(command.words, set()).update(command.flags)
    with ThreadPoolExecutor(4) as pool:
        verdicts = dict(zip(by_words, pool.map(_check, by_words, by_words.values()), strict=True))
    places: dict[tuple[str, ...], list[str]] = {}
    for command, where in commands.items():
        places.setdefault(command.words, []).extend(where)
    wrong = [f"{', '.join(places[words])}: {why}" for words, why in verdicts.items() if why]
    assert not wrong, "\n".join(wrong)


def _listed_commands(help_text: str) -> list[str]:
    """The names in the Commands panel of Rich's help."""
    panel = help_text.split("Commands", 1)[1]
    return re.findall(r"^│ ([a-z][\w-]*)\s", panel, flags=re.M)


def test_the_readme_tour_shows_every_command() -> None:
    """A newcomer finds every command of ``kiln --help`` (and of its groups, such as
    ``kiln image``) in the README's tour."""
    readme = (REPO / "README.md").read_text()
    tour = readme.split("## A tour of the CLI", 1)[1].split("\n## ", 1)[0]
    toured = [parse_command(line).words for line in tour.splitlines() if line.startswith("kiln ")]
    top = _listed_commands(kiln("--help").stdout)
    assert "init" in top and len(top) > 15

    def listed(name: str) -> list[tuple[str, ...]]:
        text = kiln(name, "--help").stdout
        group = _listed_commands(text) if "Commands" in text else []
        return [(name, sub) for sub in group] or [(name,)]

    with ThreadPoolExecutor(4) as pool:
        every = [words for found in pool.map(listed, top) for words in found]
    missing = [
        "kiln " + " ".join(words)
        for words in every
        if not any(shown[: len(words)] == words for shown in toured)
    ]
    assert not missing, f"not in the README's tour: {', '.join(missing)}"


def test_python_imports_in_the_docs_exist() -> None:
    for block in ALL_BLOCKS:
        if block.info != "python":
            continue
        for line in block.text.splitlines():
            m = re.match(r"^from (kiln[\w.]*) import (.+)$", line.strip())
            if not m:
                continue
            module = importlib.import_module(m.group(1))
            for name in (n.strip() for n in m.group(2).split(",")):
                assert hasattr(module, name), f"{block.where}: {m.group(1)} has no {name}"


def test_relative_links_point_at_files() -> None:
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.relative_to(REPO)}: {target}"
