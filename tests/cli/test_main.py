"""The CLI contract: fast --version, one-line errors, exit codes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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
            "cmd, entrypoint, env, expose, from, healthcheck, labels, packages, steps, tag, "
            "user, workdir"
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
