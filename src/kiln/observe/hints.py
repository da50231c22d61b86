"""Hints for failures whose cause is a known pattern, in the words of the fix.

Each hint is matched on what Kiln already has when something fails: the
instance's exit code, the reason it was failed, its last log lines, the
port it was given.
A hint is only a suggestion, so each one says what it saw. A bake's ``run``
steps have hints of their own (:mod:`kiln.image.hints`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from kiln.image.hints import COMMAND_NOT_FOUND

__all__ = ["instance_hints"]

_LISTENS_ON = re.compile(
    r"\b(?:listen(?:ing)?|serving|bound|port)\b\D{0,40}?(?:[0-9.]+:)?(\d{2,5})\b",
    re.IGNORECASE,
)


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
    if exit_code == 127 or (exit_code not in (None, 0) and COMMAND_NOT_FOUND.search(logs)):
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
    status = re.search(r"HTTP (\d{3})", reason)
    if status and status.group(1) == "404":
        hints.append(
            "the health check's path answered 404: set health.http to a path the app "
            "serves (it must start with /)"
        )
    return hints
