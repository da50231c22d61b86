"""``kiln completion bash|zsh|fish``: the script is loaded into the real shell, which is
then asked to complete, and the real command names come back from ``kiln``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def shell_env(tmp_path: Path) -> dict[str, str]:
    """``kiln`` on PATH, and a private HOME so no shell writes into the real one."""
    home = tmp_path / "shell-home"
    home.mkdir(exist_ok=True)
    return dict(
        os.environ,
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        HOME=str(home),
        XDG_CONFIG_HOME=str(home / ".config"),
        XDG_DATA_HOME=str(home / ".local" / "share"),
        KILN_HOME=str(tmp_path / "kiln-home"),
    )


def in_shell(argv: list[str], script: str, tmp_path: Path) -> list[str]:
    out = subprocess.run(
        [*argv, script], env=shell_env(tmp_path), text=True, capture_output=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


BASH = r"""
source <(kiln completion bash)
complete -p kiln
ask() {  # ask "kiln sta": what bash's completion function puts in COMPREPLY
  read -ra COMP_WORDS <<< "$1"
  [[ "$1" == *" " ]] && COMP_WORDS+=("")
  COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 ))
  COMPREPLY=()
  _kiln_completion kiln "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]}"
  echo "$1=> ${COMPREPLY[*]}"
}
ask "kiln sta"
ask "kiln image "
ask "kiln secret l"
ask "kiln up --"
"""


def test_bash_completes_commands_subcommands_and_options(tmp_path: Path) -> None:
    lines = in_shell(["bash", "--norc", "--noprofile", "-c"], BASH, tmp_path)
    assert lines[0] == "complete -o default -F _kiln_completion kiln"
    answers = {q: a.split() for q, _, a in (line.partition("=> ") for line in lines[1:])}
    assert answers == {
        "kiln sta": ["status", "start"],
        "kiln image ": ["inspect", "rm", "gc", "verify", "export", "unpack", "referrers"],
        "kiln secret l": ["list"],
        "kiln up --": ["--env", "--yes", "--help"],
    }


ZSH = r"""
autoload -Uz compinit && compinit -u -d "$HOME/.zcompdump"
eval "$(kiln completion zsh)"
print -r -- "kiln: $_comps[kiln]"
_arguments() { print -r -- "$@" }  # what the completion function hands zsh
words=(kiln sta); CURRENT=2; _kiln_completion
words=(kiln image ""); CURRENT=3; _kiln_completion
"""


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is not installed")
def test_zsh_completes_commands_and_subcommands(tmp_path: Path) -> None:
    registered, commands, image = in_shell(["zsh", "-f", "-c"], ZSH, tmp_path)
    assert registered == "kiln: _kiln_completion"
    assert '"status":' in commands and '"start":' in commands and '"stop"' not in commands
    for sub in ("inspect", "rm", "gc", "verify", "export", "unpack", "referrers"):
        assert f'"{sub}":' in image, image


FISH = """
kiln completion fish | source
complete -C "kiln sta"
echo ==
complete -C "kiln image "
"""


@pytest.mark.skipif(shutil.which("fish") is None, reason="fish is not installed")
def test_fish_completes_commands_and_subcommands(tmp_path: Path) -> None:
    lines = in_shell(["fish", "--no-config", "-c"], FISH, tmp_path)
    split = lines.index("==")
    names = [[line.split("\t")[0] for line in part] for part in (lines[:split], lines[split + 1 :])]
    assert sorted(names[0]) == ["start", "status"]
    assert sorted(names[1]) == [
        "export",
        "gc",
        "inspect",
        "referrers",
        "rm",
        "unpack",
        "verify",
    ]


def test_a_completion_request_stays_light(tmp_path: Path) -> None:
    """Every TAB runs kiln: it must not load the agent's or the crypto stack."""
    code = (
        "import sys; from kiln.cli.main import main; code = main([]); "
        "heavy = {'fastapi', 'cryptography', 'httpx', 'uvicorn', 'regopy'}; "
        "print(code, sorted(heavy & set(sys.modules)), file=sys.stderr)"
    )
    env = dict(shell_env(tmp_path), _KILN_COMPLETE="complete_bash")
    env.update(COMP_WORDS="kiln ima", COMP_CWORD="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, text=True, capture_output=True)
    assert out.stdout.split() == ["images", "image"]
    assert out.stderr.strip() == "0 []"
    assert not (tmp_path / "kiln-home").exists(), "completing must not create KILN_HOME"


def test_an_unknown_shell_is_a_usage_error(tmp_path: Path) -> None:
    out = subprocess.run(
        [str(BIN / "kiln"), "completion", "powershell"],
        env=shell_env(tmp_path),
        text=True,
        capture_output=True,
    )
    assert out.returncode == 2 and "powershell" in out.stderr and out.stdout == ""
