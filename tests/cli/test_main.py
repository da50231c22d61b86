"""The CLI contract: fast --version, one-line errors, exit codes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

KILN = str(Path(sys.executable).parent / "kiln")


def run(*args: str, home: Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, KILN_HOME=str(home))
    return subprocess.run([KILN, *args], env=env, cwd=cwd, text=True, capture_output=True)


def test_version_imports_nothing_heavy() -> None:
    code = (
        "import sys; from kiln.cli.main import main; main(['--version']); "
        "heavy = {'fastapi', 'pydantic', 'cryptography', 'regopy', 'typer', 'httpx', 'rich'}; "
        "print(sorted(heavy & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == ["kiln 0.1.0", "[]"]


def test_bad_spec_is_one_line_and_exit_1(tmp_path: Path) -> None:
    (tmp_path / "kiln.toml").write_text(
        '[project]\nname = "x"\n[images.a]\nfrom = "scratch"\nbogus = 1\n'
    )
    out = run("bake", str(tmp_path), home=tmp_path / "home")
    assert out.returncode == 1
    assert (
        out.stderr.strip()
        == f"error: {tmp_path}/kiln.toml:5: images.a.bogus: unknown key; known keys: "
        + (
            "cmd, entrypoint, env, expose, from, healthcheck, labels, packages, secrets_allow, "
            "steps, tag, user, workdir"
        )
    )


def test_missing_project_file(tmp_path: Path) -> None:
    out = run("bake", str(tmp_path / "nope"), home=tmp_path / "home")
    assert out.returncode == 1
    assert "no such file" in out.stderr


def test_unknown_command_is_a_usage_error(tmp_path: Path) -> None:
    out = run("frobnicate", home=tmp_path)
    assert out.returncode == 2
    assert "No such command" in out.stderr


def test_commands_without_an_agent_say_how_to_start_one(tmp_path: Path) -> None:
    out = run("status", home=tmp_path)
    assert out.returncode == 1
    assert "no agent answers" in out.stderr and "kiln up" in out.stderr


def test_a_malformed_rollback_revision_is_one_clear_error(tmp_path: Path) -> None:
    out = run("rollback", "web", "rx", home=tmp_path)
    assert out.returncode == 1
    assert out.stderr.strip() == "error: rollback: 'rx' is not a revision such as r3"


def test_an_impossible_since_is_one_clear_error(tmp_path: Path) -> None:
    out = run("logs", "web", "--since", "nan", home=tmp_path)
    assert out.returncode == 1
    assert out.stderr.strip() == (
        'error: --since: \'nan\' is not a duration such as "1s", "250ms" or "2m"'
    )


def test_help_shows_environments_and_the_version_flag(tmp_path: Path) -> None:
    """Rich used to eat ``[environments.NAME]``; ``--version`` was missing from the list."""
    up = run("up", "--help", home=tmp_path / "home")
    assert "[environments.NAME]" in up.stdout, up.stdout
    top = run("--help", home=tmp_path / "home")
    assert top.returncode == 0
    assert any(line.split()[1:3] == ["--version", "-V"] for line in top.stdout.splitlines())
    history = run("history", "--help", home=tmp_path / "home")
    assert "newest first" in history.stdout


def _command_paths() -> list[list[str]]:
    """Every command and group of the real app, as the words that invoke it."""
    import typer.main

    from kiln.cli import app as cli

    cli.run(["--help"])  # registers the commands of every module, as `kiln` does
    paths: list[list[str]] = []

    def walk(command: Any, path: list[str]) -> None:
        paths.append(path)
        for name, sub in sorted(getattr(command, "commands", {}).items()):
            walk(sub, [*path, name])

    walk(typer.main.get_command(cli.app), [])
    return paths


def test_no_help_tags_a_flag_bool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A flag takes no value: ``--json <bool>`` (and Typer's own ``--help <bool>``)
    read as if it wanted one."""
    from kiln.cli.main import main

    monkeypatch.setenv("KILN_HOME", str(tmp_path / "home"))
    paths = _command_paths()
    assert ["image", "inspect"] in paths and ["secret", "set"] in paths and len(paths) > 25
    capsys.readouterr()
    for path in paths:
        assert main([*path, "--help"]) == 0, path
        shown = capsys.readouterr().out
        assert "--help" in shown and "<bool>" not in shown, (path, shown)


def test_logs_tail_keeps_the_last_lines(tmp_path: Path) -> None:
    from kiln.observe.logs import LogMeta, LogStore

    home = tmp_path / "home"
    store = LogStore(home / "logs")
    with store.writer(LogMeta("web", "web-1", 1, "sha256:" + "a" * 64, 1.0)) as writer:
        for n in range(10):
            writer.write("stdout", f"line {n}", ts=1000.0 + n)
    tail = run("logs", "web", "--tail", "3", home=home)
    assert tail.returncode == 0, tail.stderr
    assert [line.split()[-1] for line in tail.stdout.splitlines()] == ["7", "8", "9"]
    assert len(run("logs", "web", home=home).stdout.splitlines()) == 10
    bad = run("logs", "web", "--tail", "-1", home=home)
    assert bad.returncode == 1 and "--tail" in bad.stderr
    since = run("logs", "web", "--since", "yesterday", home=home)
    assert since.returncode == 1 and since.stderr.startswith("error: --since:"), since.stderr


def test_secret_list_has_a_header(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = dict(os.environ, KILN_HOME=str(home))
    subprocess.run([KILN, "secret", "set", "token"], input="s3cret\n", env=env, text=True,
                   capture_output=True, check=True)  # fmt: skip
    listed = run("secret", "list", home=home)
    assert listed.stdout.splitlines()[0].split() == ["NAME", "VERSION", "UPDATED"]
    assert listed.stdout.splitlines()[1].startswith("token")
    assert "s3cret" not in listed.stdout


def test_status_and_events_read_as_sentences() -> None:
    """A rollout in ``kiln status`` used to be a raw dict; an event without a service
    printed an empty slot."""
    import time

    from kiln.cli.render import _rollout
    from kiln.cli.workflow import format_event

    info = {"target": 3, "kind": "deploy", "started": time.time() - 12, "deployment": "d-1a2b3c4d",
            "step": 2, "healthy": 1, "desired": 3, "new": 2, "old": 2}  # fmt: skip
    assert _rollout(info) == "rollout: deploy to r3, 1/3 healthy, step 2 (d-1a2b3c4d, 12 s)"
    event = {"ts": 0, "kind": "deployment.finished", "service": None, "message": "done"}
    assert format_event(event).endswith(" deployment.finished: done")


def test_validate_reports_every_error_with_its_line_and_touches_nothing(tmp_path: Path) -> None:
    home = tmp_path / "home"
    project = tmp_path / "p"
    project.mkdir()
    (project / "app").mkdir()
    toml = """\
[project]
name = "v"

[images.web]
from = "scratch"
steps = [
  { copy = "app/", to = "/srv/app" },
  { copy = "missing/", to = "/srv/missing" },
  { copy = "../outside", to = "/srv/out" },
]
cmd = ["/srv/app/run"]

[services.web]
image = "web"
secrets = ["api_key"]
"""
    (project / "kiln.toml").write_text(toml)
    (tmp_path / "outside").write_text("not the project's\n")
    checked = run("validate", str(project), home=home)
    assert checked.returncode == 1, checked
    errors = checked.stderr.splitlines()
    assert len(errors) == 3, errors
    assert errors[0].startswith(f"error: {project / 'kiln.toml'}:8: images.web.steps[1].copy: ")
    assert "missing/ does not exist" in errors[0]
    assert ":9: images.web.steps[2].copy: ../outside is outside the project directory" in errors[1]
    assert (
        f":15: services.web.secrets[0]: secret api_key is not set in KILN_HOME {home}"
        in (errors[2])
    )
    assert not list((home / "images").rglob("sha256/*")), "validate baked something"
    assert not (home / "agent.sock").exists() and not (home / "state.db").exists()

    (project / "kiln.toml").write_text(toml.replace("nme", "x").replace('name = "v"', 'nme = "v"'))
    typo = run("validate", str(project), home=home)
    assert typo.returncode == 1 and ":2: project.nme: unknown key" in typo.stderr


MISTAKES = """\
[project]
name = "v"

[image.web]
from = "scratch"

[services.web]
image = "web"
replicas = "2"

[services.web.health]
interval = 1
"""


def test_validate_prints_every_error_and_other_commands_the_first_once(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (tmp_path / "kiln.toml").write_text(MISTAKES)
    spec = tmp_path / "kiln.toml"
    every = [
        f"error: {spec}:4: image: unknown key; did you mean 'images'?",
        f"error: {spec}:9: services.web.replicas: must be an integer: write 2, without quotes",
        f'error: {spec}:12: services.web.health.interval: must be a duration string such as "1s", '
        "not the number 1",
    ]
    checked = run("validate", str(tmp_path), home=home)
    assert (checked.returncode, checked.stderr.splitlines(), checked.stdout) == (1, every, "")
    for command in ("plan", "up", "bake"):
        out = run(command, str(tmp_path), home=home)
        assert out.returncode == 1, (command, out)
        assert out.stderr.splitlines() == [
            every[0] + " (and 2 more; run kiln validate to see them all)"
        ], command
        assert out.stdout == "", command
    assert not (home / "agent.sock").exists() and not (home / "state.db").exists()


def test_validate_reports_references_copy_sources_and_secrets_together(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (tmp_path / "kiln.toml").write_text(
        '[project]\nname = "v"\n\n[images.web]\nfrom = "scratch"\n'
        'steps = [{ copy = "missing/", to = "/srv" }]\n\n'
        '[services.web]\nimage = "wbe"\nsecrets = ["token"]\n'
    )
    checked = run("validate", str(tmp_path), home=home)
    assert checked.returncode == 1
    lines = checked.stderr.splitlines()
    assert [line.split(": ")[1].rsplit(":", 1)[1] for line in lines] == ["6", "9", "10"], lines
    assert "images.web.steps[0].copy: missing/ does not exist" in lines[0]
    assert "services.web.image: no recipe images.wbe in this file; did you mean 'web'?" in lines[1]
    assert "services.web.secrets[0]: secret token is not set in KILN_HOME" in lines[2]
