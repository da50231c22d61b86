"""Hints for a bake's ``run`` step that failed in a known way, in the words of the fix.

Matched on the step's exit code and last output lines; each hint says what
it saw. (Instances have hints of their own: :mod:`kiln.observe.hints`.)
"""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = ["COMMAND_NOT_FOUND", "step_hints"]

_NO_NETWORK = re.compile(
    r"temporary failure in name resolution|could not resolve|name or service not known|"
    r"network is unreachable|failed to establish a new connection|no address associated|"
    r"bad address",
    re.IGNORECASE,
)
COMMAND_NOT_FOUND = re.compile(
    r"\bsh: (?:\d+: )?[^:\s]+: not found|: command not found|executable file not found|"
    r"exec(?:ve)?\b[^\n]*: no such file or directory",
    re.IGNORECASE,
)
"""A shell's or an exec's own words for a command that is not there, not an app's 404."""


def step_hints(exit_code: int, output: Sequence[str], network: bool) -> list[str]:
    """What probably went wrong with a ``run`` step of a bake."""
    text = "\n".join(output)
    hints: list[str] = []
    if not network and _NO_NETWORK.search(text):
        hints.append(
            "run steps have no network by default: put Debian packages in the recipe's "
            "packages (installed from the lock, no network needed), copy downloads into the "
            "project, or give this step network = true (its output is then not reproducible)"
        )
    if exit_code == 127 or COMMAND_NOT_FOUND.search(text):
        hints.append(
            "a command the step runs is not in the image: add the package that provides it "
            "to the recipe's packages"
        )
    if re.search(r"apt-get|apt install|dpkg: error", text) and not network:
        hints.append(
            "apt in a run step has no network: list the package in the recipe's packages instead"
        )
    return hints
