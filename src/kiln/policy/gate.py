"""The policy gate: Rego policies (the default bundle and the project's own files)
evaluated with regopy over each service's evidence, before a plan is shown or applied.

Evaluation runs in a child process (:mod:`kiln.policy.worker`) with a time and CPU
budget: a policy is code, and one that loops or allocates without end must fail
the plan with its name, not hang the CLI or the agent.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from kiln.errors import KilnError

if TYPE_CHECKING:
    from kiln.image.store import ImageStore
    from kiln.policy.evidence import EvidenceSources
    from kiln.policy.registry_evidence import ImagePublisher
    from kiln.spec.models import PolicySettings

_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")

BUNDLE = Path(__file__).parent / "bundle"
BUNDLE_NAME = "kiln:default"
"""How the shipped bundle's files are named in messages (``kiln:default/kiln.rego``)."""
ALWAYS_ENFORCED = frozenset({"kiln.evidence"})
"""Shipped packages whose denies stay denies without ``[policy] enforce``: evidence lost
on its way to the runtime is a broken delivery, not a rule a project opts into."""
TIMEOUT = 20.0
"""Wall-clock seconds for one evaluation of every service of a plan."""
MAX_FILES = 200
MAX_FILE_BYTES = 1 << 20
MAX_ANSWER_BYTES = 64 << 20

_PACKAGE = re.compile(r"^[ \t]*package[ \t]+([A-Za-z_][A-Za-z0-9_.]*)", re.MULTILINE)
_TEST_RULE = re.compile(r"^(test_[A-Za-z0-9_]*)\b", re.MULTILINE)


class PolicyError(KilnError):
    """A policy that cannot be evaluated: a syntax error, a runaway evaluation."""


@dataclass(frozen=True)
class Module:
    name: str
    """As messages name it: a path relative to the project, or ``kiln:default/…``."""
    source: str
    package: str
    shipped: bool


@dataclass(frozen=True)
class Verdict:
    service: str
    kind: Literal["deny", "warn"]
    message: str
    origin: str
    """The rule file(s) of the package the message came from."""

    def line(self) -> str:
        return f"{self.kind}: {self.service}: {self.message} ({self.origin})"


@dataclass(frozen=True)
class GateResult:
    verdicts: tuple[Verdict, ...]
    seconds: float

    @property
    def denied(self) -> list[Verdict]:
        return [v for v in self.verdicts if v.kind == "deny"]

    @property
    def warnings(self) -> list[Verdict]:
        return [v for v in self.verdicts if v.kind == "warn"]

    def check(self) -> None:
        """Raise with every deny, one line each, when there is any."""
        denied = self.denied
        if denied:
            lines = "\n".join(v.line() for v in denied)
            raise PolicyError(
                f"the policy gate denied {len(denied)} thing(s); nothing was changed:\n{lines}"
            )


def _module(path: Path, name: str, shipped: bool) -> Module:
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise PolicyError(f"{name}: larger than {MAX_FILE_BYTES >> 10} KiB; not a policy")
        source = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise PolicyError(f"{name}: cannot read the policy file ({e})") from None
    found = _PACKAGE.search(source)
    if not found:
        raise PolicyError(
            f"{name}:1: no package declaration (a Rego file starts with: package NAME)"
        )
    return Module(name, source, found.group(1), shipped)


def default_modules() -> list[Module]:
    return [_module(p, f"{BUNDLE_NAME}/{p.name}", True) for p in sorted(BUNDLE.glob("*.rego"))]


def user_modules(patterns: list[str], root: Path) -> list[Module]:
    """The project's files: globs relative to ``root``; a glob matching nothing is an
    error (a typo would silently drop a policy)."""
    out: list[Module] = []
    base = root.resolve()
    for pattern in patterns:
        if Path(pattern).is_absolute() or ".." in Path(pattern).parts:
            raise PolicyError(f"[policy] files: {pattern!r} must stay inside the project")
        matches = sorted(glob.glob(pattern, root_dir=base, recursive=True))
        if not matches:
            raise PolicyError(f"[policy] files: {pattern!r} matches no file under {base}")
        for match in matches:
            path = base / match
            if not path.resolve().is_relative_to(base):
                raise PolicyError(f"[policy] files: {match} leaves the project (a symlink)")
            out.append(_module(path, match, False))
    if len(out) > MAX_FILES:
        raise PolicyError(f"[policy] files: {len(out)} files, more than {MAX_FILES}")
    return out


def _run_worker(request: dict[str, Any], timeout: float) -> dict[str, Any]:
    command = [sys.executable, "-m", "kiln.policy.worker", str(int(timeout) + 1)]
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LC_ALL", "PYTHONPATH")}
    try:
        done = subprocess.run(
            command,
            input=json.dumps(request).encode(),
            capture_output=True,
            timeout=timeout,
            env=env,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise PolicyError(
            f"policy evaluation took more than {timeout:g} s and was stopped "
            f"(files: {', '.join(name for name, _ in request['modules'])})"
        ) from None
    if done.returncode != 0 or len(done.stdout) > MAX_ANSWER_BYTES:
        tail = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
        why = tail[0][:300]
        if done.returncode < 0:
            why = f"the evaluator died of signal {-done.returncode} (a crash in regopy, or CPU)"
        raise PolicyError(f"policy evaluation failed (exit {done.returncode}): {why}")
    answer: dict[str, Any] = json.loads(done.stdout)
    error = answer.get("error")
    if error:
        where = f"{error['file']}:{error['line']}: " if error.get("file") else ""
        raise PolicyError(f"policy {where}{error.get('message', 'error')}")
    return answer


def evaluate(
    modules: list[Module],
    inputs: Mapping[str, Mapping[str, Any]],
    enforce: bool,
    timeout: float = TIMEOUT,
) -> GateResult:
    """``deny``/``warn`` of every package for every input (service name → document).
    Unless ``enforce``, the shipped bundle's denies are shown as warnings."""
    started = time.monotonic()
    packages: dict[str, list[Module]] = {}
    for module in modules:
        packages.setdefault(module.package, []).append(module)
    request = {
        "modules": [[m.name, m.source] for m in modules],
        "inputs": dict(inputs),
        "packages": sorted(packages),
    }
    answer = _run_worker(request, timeout) if inputs else {"results": {}}
    verdicts: list[Verdict] = []
    for service, per_package in sorted(answer["results"].items()):
        for package, found in sorted(per_package.items()):
            members = packages[package]
            origin = ", ".join(m.name for m in members)
            shipped = all(m.shipped for m in members) and package not in ALWAYS_ENFORCED
            for kind in ("deny", "warn"):
                shown: Literal["deny", "warn"] = "warn" if shipped and not enforce else kind
                for message in found[kind]:
                    verdicts.append(Verdict(service, shown, str(message), origin))
                if found.get(f"{kind}_truncated"):
                    verdicts.append(Verdict(service, shown, "… more messages cut", origin))
    return GateResult(tuple(verdicts), time.monotonic() - started)


@dataclass(frozen=True)
class GatedService:
    """One service as a plan has it."""

    image_ref: str
    digest: str
    config: Mapping[str, Any]


def gate_services(
    store: ImageStore,
    services: Mapping[str, GatedService],
    settings: PolicySettings,
    root: Path,
    scan_db: Path | None = None,
    timeout: float = TIMEOUT,
    publisher: ImagePublisher | None = None,
) -> GateResult:
    """The gate over a plan's services: evidence from ``store``, the default bundle plus
    ``[policy] files`` (relative to ``root``). With a ``publisher`` (a runtime whose
    nodes pull from a registry) each image is pushed with its referrers first and its
    evidence is read back from the registry (:mod:`kiln.policy.registry_evidence`)."""
    from kiln.policy.evidence import service_evidence, sources_for
    from kiln.policy.registry_evidence import scratch_root

    modules = default_modules() + user_modules(list(settings.files), root)
    sources = sources_for(settings, root, scan_db)
    inputs: dict[str, dict[str, Any]] = {}
    with scratch_root(store) if publisher is not None else contextlib.nullcontext() as scratch:
        for number, (name, s) in enumerate(sorted(services.items())):
            if publisher is None or scratch is None:
                inputs[name] = service_evidence(
                    store, name, s.image_ref, s.digest, s.config, settings, sources
                )
            else:
                inputs[name] = _registry_input(
                    store, publisher, scratch / str(number), name, s, settings, sources
                )
    return evaluate(modules, inputs, settings.enforce, timeout)


def _registry_input(
    store: ImageStore,
    publisher: ImagePublisher,
    scratch: Path,
    name: str,
    service: GatedService,
    settings: PolicySettings,
    sources: EvidenceSources,
) -> dict[str, Any]:
    """One service's input from the registry's copy of its image; what cannot be pushed
    or read back is ``evidence.error``, which the shipped ``kiln.evidence`` rule denies."""
    from kiln.policy.evidence import service_evidence
    from kiln.policy.registry_evidence import read_registry_evidence

    def local(error: str, where: str) -> dict[str, Any]:
        document = service_evidence(
            store, name, service.image_ref, service.digest, service.config, settings, sources
        )
        document["evidence"].update(source="registry", where=where, error=error)
        return document

    if not _DIGEST.match(service.digest):
        return local("", publisher.registry)  # not pinned: kiln.default says so
    try:
        reference = publisher.publish_image(name, service.digest)
    except KilnError as e:
        return local(f"the push failed: {e}", publisher.registry)
    scratch.mkdir(mode=0o700)
    found = read_registry_evidence(store, reference, publisher.registry_options, scratch)
    if found.store is None:
        return local(found.error, reference)
    document = service_evidence(
        found.store, name, service.image_ref, service.digest, service.config, settings, sources
    )
    document["evidence"] = found.as_input()
    return document


@dataclass(frozen=True)
class TestOutcome:
    package: str
    rule: str
    passed: bool
    files: str
    error: str = ""


def run_tests(directory: Path, timeout: float = TIMEOUT) -> list[TestOutcome]:
    """``kiln policy test DIR``: every ``test_`` rule of the ``*.rego`` files under it."""
    paths = sorted(p for p in directory.rglob("*.rego") if p.is_file())
    if not paths:
        raise PolicyError(f"{directory}: no .rego file")
    modules = [_module(p, str(p.relative_to(directory)), False) for p in paths[:MAX_FILES]]
    modules += default_modules()
    tests: dict[tuple[str, str], list[str]] = {}
    for module in modules:
        if module.shipped:
            continue
        for rule in _TEST_RULE.findall(module.source):
            tests.setdefault((module.package, rule), []).append(module.name)
    request = {
        "mode": "test",
        "modules": [[m.name, m.source] for m in modules],
        "tests": [list(key) for key in sorted(tests)],
    }
    answer = _run_worker(request, timeout)
    out = []
    for item in answer["tests"]:
        error = item.get("error") or {}
        where = f"{error['file']}:{error['line']}: " if error.get("file") else ""
        out.append(
            TestOutcome(
                item["package"],
                item["rule"],
                bool(item["passed"]),
                ", ".join(tests[(item["package"], item["rule"])]),
                f"{where}{error['message']}" if error else "",
            )
        )
    return out


HOME_POLICY = "policy.toml"
"""``KILN_HOME/policy.toml``: the operator's ``[policy]``, which the agent applies in
place of the one in the plan's kiln.toml (a client could leave that table out)."""


def policy_settings(
    spec_text: str, spec_path: str, environment: str | None, home: Path
) -> tuple[PolicySettings, Path]:
    """``[policy]`` and the directory its paths are relative to: the home's
    ``policy.toml`` when there is one, else the plan's kiln.toml."""
    import tomllib

    from kiln.spec.loader import parse_spec
    from kiln.spec.models import PolicySettings

    own = home / HOME_POLICY
    if own.is_file():
        try:
            table = tomllib.loads(own.read_text()).get("policy", {})
            return PolicySettings.model_validate(table), home
        except (OSError, ValueError) as e:
            raise PolicyError(f"{own}: not a valid [policy] table ({e})") from None
    if not spec_text.strip():
        return PolicySettings(), home
    path = Path(spec_path or "kiln.toml")
    return parse_spec(spec_text, path, environment).policy, path.parent


def gate_request(
    request: Mapping[str, Any],
    home: Path,
    say: Any = None,
    scan_db: Path | None = None,
    publisher: ImagePublisher | None = None,
) -> GateResult:
    """The gate over a plan request (or a plan's ``desired`` and ``source``): warnings
    go to ``say``; any deny raises :class:`PolicyError` with every message. With a
    ``publisher``, evidence is read back from its registry (:func:`gate_services`)."""
    from kiln.image.store import ImageStore

    desired = request.get("services") or request.get("desired") or {}
    source = request.get("source") or request
    settings, root = policy_settings(
        str(source.get("spec_text") or ""),
        str(source.get("spec_path") or ""),
        source.get("environment"),
        home,
    )
    services = {}
    for name, want in desired.items():
        config = dict(want.get("service_config") or {})
        services[str(name)] = GatedService(
            str(config.get("image", "")), str(want.get("image_digest", "")), config
        )
    result = gate_services(
        ImageStore(home / "images"),
        services,
        settings,
        root,
        scan_db or home / "scan" / "osv.db",
        publisher=publisher,
    )
    if say is not None:
        for verdict in result.warnings:
            say(verdict.line())
    result.check()
    return result
