"""Hints for failures whose cause is a known pattern, in the words of the fix.

Each hint is matched on what Kiln already has when something fails: the
instance's exit code, the reason it was failed, its last log lines, the
port it was given; or a ``run`` step's exit code and last output lines.
A hint is only a suggestion, so each one says what it saw.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = ["instance_hints", "step_hints"]

_LISTENS_ON = re.compile(
    r"\b(?:listen(?:ing)?|serving|bound|port)\b\D{0,40}?(?:[0-9.]+:)?(\d{2,5})\b",
    re.IGNORECASE,
)
_NO_NETWORK = re.compile(
    r"temporary failure in name resolution|could not resolve|name or service not known|"
    r"network is unreachable|failed to establish a new connection|no address associated",
    re.IGNORECASE,
)
_NOT_FOUND = re.compile(
    r"\bsh: (?:\d+: )?[^:\s]+: not found|: command not found|executable file not found|"
    r"exec(?:ve)?\b[^\n]*: no such file or directory",
    re.IGNORECASE,
)
"""A shell's or an exec's own words for a command that is not there, not an app's 404."""


def instance_hints(
    port: int | None, exit_code: int | None, reason: str, log_lines: Sequence[str]
) -> list[str]:
    """What probably went wrong with an instance that died or never got healthy."""
    logs = "\n".join(log_lines)
    hints: list[str] = []
    if "$PORT" in logs or "${PORT}" in logs:
        hints.append(
            "the app got the text $PORT, not a number: Kiln replaces $PORT and ${PORT} in "
            "cmd and entrypoint arguments, not in files or other env values; read the PORT "
            "environment variable there"
        )
    if "No module named" in logs and "python" in logs.lower():
        hints.append(
            "a Python module is missing: python3-minimal has no http, email, json… modules; "
            "use the python3 package, or add the one that provides the module to packages"
        )
    if exit_code == 127 or (exit_code not in (None, 0) and _NOT_FOUND.search(logs)):
        hints.append(
            "the command was not found in the image: check cmd (an absolute path, or one on "
            "the image's PATH) and add the package that provides it to packages"
        )
    if exit_code == 137 or "out of memory" in reason.lower():
        hints.append(
            "it was killed (SIGKILL, usually out of memory): raise resources.memory or make "
            "the app use less"
        )
    if port is not None and ("connection refused" in reason or "no answer within" in reason):
        seen = {int(m) for m in _LISTENS_ON.findall(logs) if int(m) != port and int(m) > 0}
        where = f"; its log mentions port {min(seen)}" if seen else ""
        hints.append(
            f"nothing answered on port {port}, the one Kiln gave it in $PORT{where}: make the "
            f'app listen on $PORT (e.g. cmd = ["app", "--port", "${{PORT}}"]) on 0.0.0.0'
        )
    if any(
        "permission denied" in line.lower() and re.search(r"\b(?:bind|listen)", line, re.I)
        for line in log_lines
    ):
        hints.append(
            "binding a port was refused: instances run without privileges, so they cannot "
            "bind ports below 1024; listen on $PORT"
        )
    status = re.search(r"HTTP (\d{3})", reason)
    if status and status.group(1) == "404":
        hints.append(
            "the health check's path answered 404: set health.http to a path the app "
            "serves (it must start with /)"
        )
    return hints


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
    if exit_code == 127 or _NOT_FOUND.search(text):
        hints.append(
            "a command the step runs is not in the image: add the package that provides it "
            "to the recipe's packages"
        )
    if re.search(r"apt-get|apt install|dpkg: error", text) and not network:
        hints.append(
            "apt in a run step has no network: list the package in the recipe's packages instead"
        )
    return hints
