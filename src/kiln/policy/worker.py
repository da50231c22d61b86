"""The Rego evaluator, run as a child process (``python -m kiln.policy.worker``).

regopy is native code that cannot be interrupted from Python and writes its
diagnostics to stderr, so a policy that loops for minutes or builds a huge set
would take the CLI or the agent down with it. The gate runs this module in a
child with a CPU, memory and output budget and kills it when it overruns.

Protocol: one JSON request on stdin, one JSON answer on stdout.
"""

from __future__ import annotations

import base64
import json
import re
import sys
from typing import Any

MAX_MESSAGES = 100
"""Per service, per rule kind: more is a runaway policy, not a finding."""
MAX_MESSAGE_CHARS = 500

_ERROR = re.compile(r"\(error\s+\d+:([^|\s]*)\|(\d+)\|\d+")
_ERRORMSG = re.compile(r"\(errormsg\s+\d+:([^)\n]*)")


def _line_of(source: str, offset: int) -> int:
    return source.count("\n", 0, max(0, offset)) + 1


def _explain(text: str, sources: dict[str, str]) -> dict[str, Any]:
    """rego-cpp's error tree → file, line and message."""
    where = _ERROR.search(text)
    message = _ERRORMSG.search(text)
    out: dict[str, Any] = {
        "message": (message.group(1).strip() if message else text.strip().splitlines()[0])[:300]
    }
    if where and where.group(1) in sources:
        out["file"] = where.group(1)
        out["line"] = _line_of(sources[where.group(1)], int(where.group(2)))
    return out


def _query(rego: Any, query: str, sources: dict[str, str]) -> Any:
    """The binding ``x`` of ``query``; an evaluation error raises ``_Failed``."""
    from regopy.rego_shared import rego_query

    return _binding(rego_query(rego._impl, query), sources)


def _answer(rego: Any, bundle: Any, sources: dict[str, str]) -> Any:
    """The binding ``x`` of the bundle's query for the current input."""
    from regopy.rego_shared import rego_bundle_query

    return _binding(rego_bundle_query(rego._impl, bundle._impl), sources)


def _binding(impl: Any, sources: dict[str, str]) -> Any:
    from regopy.rego_shared import rego_output_ok, rego_output_string

    text = rego_output_string(impl)
    if not rego_output_ok(impl) or text.lstrip().startswith("("):
        raise _Failed(_explain(text, sources))
    if text.strip() == "undefined":
        return None
    result = json.loads(text)
    return (result.get("bindings") or {}).get("x") if isinstance(result, dict) else None


class _Failed(Exception):
    def __init__(self, detail: dict[str, Any]) -> None:
        super().__init__(detail.get("message", ""))
        self.detail = detail


def _messages(texts: list[str]) -> tuple[list[str], bool]:
    cut = [text[:MAX_MESSAGE_CHARS] for text in sorted(texts)[:MAX_MESSAGES]]
    return cut, len(texts) > MAX_MESSAGES


def evaluate(request: dict[str, Any]) -> dict[str, Any]:
    """Load every module, then answer ``deny``/``warn`` per package per input, or run the
    ``test_`` rules (``mode: test``)."""
    from regopy import Interpreter, RegoError

    sources = {str(name): str(text) for name, text in request["modules"]}
    rego = Interpreter()
    try:
        for name, text in sources.items():
            rego.add_module(name, text)
        if request.get("mode") == "test":
            return {"tests": _tests(rego, request["tests"], sources)}
        # One query for every package's deny and warn, compiled once into a bundle: a
        # query compiled per service costs milliseconds, a bundle run a tenth of that.
        keys = [(p, kind) for p in request["packages"] for kind in ("deny", "warn")]
        parts = [
            f'"k{n}": [base64.encode(m) | some m in data.{p}.{kind}; is_string(m)]'
            for n, (p, kind) in enumerate(keys)
        ]
        bundle = rego.build("x := {" + ", ".join(parts) + "}")
        results: dict[str, Any] = {}
        for name, document in request["inputs"].items():
            rego.set_input(document)
            value = _answer(rego, bundle, sources) or {}
            per_package: dict[str, Any] = {}
            for n, (package, kind) in enumerate(keys):
                decoded = [base64.b64decode(m).decode("utf-8", "replace") for m in value[f"k{n}"]]
                texts, cut = _messages(decoded)
                found = per_package.setdefault(package, {})
                found[kind] = texts
                found[f"{kind}_truncated"] = cut
            results[name] = per_package
        return {"results": results}
    except RegoError as e:
        return {"error": _explain(str(e), sources)}
    except _Failed as e:
        return {"error": e.detail}


def _tests(rego: Any, tests: list[list[str]], sources: dict[str, str]) -> list[dict[str, Any]]:
    out = []
    for package, rule in tests:
        try:
            value = _query(rego, f"x := [1 | data.{package}.{rule} == true]", sources)
            out.append({"package": package, "rule": rule, "passed": bool(value)})
        except _Failed as e:
            out.append({"package": package, "rule": rule, "passed": False, "error": e.detail})
    return out


def _limit(cpu_seconds: int) -> None:
    """Before regopy loads: the kernel stops a runaway policy even if the parent is gone.
    No address-space limit: regopy's allocator (snmalloc) reserves terabytes up front and
    aborts under one; the wall-clock timeout bounds what a policy can allocate."""
    import resource

    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))


def main() -> None:
    if len(sys.argv) == 2:
        _limit(int(sys.argv[1]))
    import os

    # rego-cpp prints its diagnostics on fd 1: the answer goes to a copy of it, and
    # everything else that writes to fd 1 lands on stderr.
    answer_fd = os.dup(1)
    os.dup2(2, 1)
    request = json.loads(sys.stdin.buffer.read())
    with os.fdopen(answer_fd, "w") as answer:
        json.dump(evaluate(request), answer, separators=(",", ":"))


if __name__ == "__main__":
    main()
