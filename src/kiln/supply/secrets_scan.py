"""Secret scan at bake: a recipe's own layers must not ship keys, credentials or tokens.

Only the layers a recipe's ``copy`` and ``run`` steps add are scanned: a base's layers
are someone else's (Debian ships test keys in its packages) or were scanned when the
``image:`` base was baked. Each layer is read on its own, so a secret deleted by a later
step (a whiteout) still fails: it is in a layer that ships. Not to be confused with
:mod:`kiln.deploy.secrets`, Kiln's own secret store.

The outcome is a referrer of type :data:`SECRET_SCAN_ARTIFACT_TYPE` on the image, which
the policy gate reads as "no secret found".
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import math
import re
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kiln.errors import KilnError
from kiln.image.digest import Descriptor
from kiln.image.store import ImageStore
from kiln.paths import kiln_home
from kiln.supply.store_reads import cache_layer_result, layer_tar, newest_referrer_document

SECRET_SCAN_ARTIFACT_TYPE = "application/vnd.dev.kiln.secret-scan.v1+json"
SECRET_SCAN_MEDIA_TYPE = "application/vnd.dev.kiln.secret-scan.v1+json"
ANNOTATION_SCAN_POLICY = "dev.kiln.secret-scan.policy"
"""A hash of the rules version and the allow-list the scan ran with: a re-bake with the
same ones finds the referrer and does not rescan; a changed allow-list rescans."""
RULES_VERSION = 1
"""Bumped whenever a rule changes, so cached layer results and referrers are redone."""
MAX_FILE_BYTES = 5 << 20
SNIFF_BYTES = 8 << 10
MAX_FINDINGS = 20
"""Findings named in the error; the count covers them all."""
MAX_LAYER_FINDINGS = 1000
_CHUNK = 1 << 20

# -- rules ------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    name: str
    pattern: re.Pattern[str]
    secret_group: int = 0
    """The group holding the secret itself (what is masked in messages)."""
    accept: Callable[[str, str], bool] | None = None
    """Further check of (secret, path): placeholders and low-entropy values are not secrets."""
    config_only: bool = False
    hints: tuple[str, ...] = ()
    """Substrings the text must hold for the pattern to be tried (a fast prefilter)."""
    lower: bool = False
    """The hints are matched against the lowercased text."""
    anchor: re.Pattern[str] | None = None
    """Where in the lowercased text the pattern can match (its key word)."""
    from_line_start: bool = False
    """The pattern is matched from the start of the anchor's line, else from the anchor."""


_B64_RUN = re.compile(r"[A-Za-z0-9+/_=-]{32,}")
_HEX_RUN = re.compile(r"^[0-9a-fA-F]+$")
BASE64_ENTROPY = 4.2
"""bits/char: random base64 of 32+ chars scores ~4.7-5.2; long identifiers and words
(``this_is_a_rather_long_setting_name``) stay under 4."""
HEX_ENTROPY = 3.0
"""bits/char: random hex scores ~3.6-3.9 (at most 4)."""
_PLACEHOLDER = re.compile(
    r"(?i)^(?:[$%<{\[(]|\*+$|x+$|.*(?:example|changeme|change_me|placeholder|your[_-]|"
    r"redacted|dummy|<|\{\{|\$\{))"
)
_CONFIG_SUFFIXES = (
    ".env",
    ".ini",
    ".cfg",
    ".conf",
    ".toml",
    ".yaml",
    ".yml",
    ".properties",
    ".json",
    ".xml",
)


def shannon_entropy(text: str) -> float:
    """Bits per character of ``text``'s own character distribution."""
    if not text:
        return 0.0
    counts = Counter(text)
    size = len(text)
    return -sum(n / size * math.log2(n / size) for n in counts.values())


def high_entropy(token: str) -> bool:
    """A random-looking run: hex above :data:`HEX_ENTROPY` (with letters and digits), other
    base64 above :data:`BASE64_ENTROPY`."""
    core = token.rstrip("=")
    if len(core) < 32:
        return False
    if _HEX_RUN.match(core):
        has_both = any(c.isdigit() for c in core) and any(c.isalpha() for c in core)
        return has_both and shannon_entropy(core.lower()) >= HEX_ENTROPY
    return shannon_entropy(core) >= BASE64_ENTROPY


def _not_placeholder(secret: str, _path: str) -> bool:
    return len(secret) >= 6 and not _PLACEHOLDER.match(secret)


def _not_example(secret: str, _path: str) -> bool:
    return not secret.endswith("EXAMPLE")


def _random(secret: str, _path: str) -> bool:
    """Random-looking, and not one of the documented examples (AWS's end in ``EXAMPLEKEY``)."""
    return high_entropy(secret) and "EXAMPLE" not in secret


def is_config_file(path: str) -> bool:
    name = path.rpartition("/")[2].lower()
    return name.startswith(".env") or name.endswith(_CONFIG_SUFFIXES)


_SECRET_KEY_WORD = (
    r"(?:secret|token|passw|api[_-]?key|access[_-]?key|private[_-]?key|auth[_-]?key"
    r"|credential|signing[_-]?key|client[_-]?key)"
)

RULES: tuple[Rule, ...] = (
    Rule(
        "private-key",
        re.compile(
            r"-----BEGIN ((?:RSA |DSA |EC |OPENSSH |ENCRYPTED |PGP )?PRIVATE KEY(?: BLOCK)?)-----"
            r"\r?\n(?:[A-Za-z-]+: .*\r?\n)*(?:\r?\n)?[A-Za-z0-9+/=]{20,}"
        ),
        1,
        hints=("PRIVATE KEY-----",),
    ),
    Rule(
        "aws-access-key-id",
        re.compile(r"(?<![A-Za-z0-9])((?:AKIA|ASIA)[A-Z0-9]{16})(?![A-Za-z0-9])"),
        1,
        _not_example,
        hints=("AKIA", "ASIA"),
    ),
    Rule(
        "aws-secret-access-key",
        re.compile(
            r"(?i)aws_?secret_?(?:access_?)?key[\"']?\s*[:=]\s*[\"']?"
            r"([A-Za-z0-9/+=]{40})(?![A-Za-z0-9/+=])"
        ),
        1,
        _random,
        hints=("aws_secret", "awssecret"),
        lower=True,
    ),
    Rule(
        "gcp-service-account-key",
        re.compile(
            r"\"private_key\"\s*:\s*\"(-----BEGIN [A-Z ]*PRIVATE KEY-----\\n[A-Za-z0-9+/]{20,})"
        ),
        1,
        hints=('"private_key"',),
    ),
    Rule(
        "azure-storage-connection-string",
        re.compile(
            r"DefaultEndpointsProtocol=https?;AccountName=[^;\s]+;"
            r"AccountKey=([A-Za-z0-9+/]{40,}={0,2})"
        ),
        1,
        _random,
        hints=("AccountKey=",),
    ),
    Rule(
        "github-token",
        re.compile(
            r"(?<![A-Za-z0-9_])((?:ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{36}"
            r"|github_pat_[A-Za-z0-9]{22}_[A-Za-z0-9]{59})(?![A-Za-z0-9_])"
        ),
        1,
        hints=("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_"),
    ),
    Rule(
        "gitlab-token",
        re.compile(r"(?<![A-Za-z0-9_-])(glpat-[A-Za-z0-9_-]{20})(?![A-Za-z0-9_-])"),
        1,
        hints=("glpat-",),
    ),
    Rule(
        "slack-token",
        re.compile(r"(?<![A-Za-z0-9])(xox[abp]-[0-9]{8,}-[0-9]{8,}-?[A-Za-z0-9-]{0,64})"),
        1,
        hints=("xoxa-", "xoxb-", "xoxp-"),
    ),
    Rule(
        "stripe-secret-key",
        re.compile(r"(?<![A-Za-z0-9_])(sk_live_[0-9A-Za-z]{24,})(?![A-Za-z0-9_])"),
        1,
        hints=("sk_live_",),
    ),
    Rule(
        "password-assignment",
        re.compile(
            r"(?im)^[ \t]*(?:export\s+)?[\"']?[A-Za-z0-9_.-]*(?:password|passwd|pwd)[\"']?"
            r"\s*[:=]\s*(?:\"([^\"\s]*)\"|'([^'\s]*)'|([^\s\"'#,;]+))"
        ),
        -1,
        _not_placeholder,
        config_only=True,
        hints=("pass", "pwd"),
        lower=True,
        anchor=re.compile("passw|pwd"),
        from_line_start=True,
    ),
    Rule(
        "high-entropy-string",
        re.compile(
            rf"(?i){_SECRET_KEY_WORD}[A-Za-z0-9_.-]*(?<![_.-]id)[\"']?\s*[:=]\s*[\"']?"
            r"([A-Za-z0-9+/_=-]{32,})"
        ),
        1,
        _random,
        hints=("secret", "token", "passw", "key", "credential"),
        lower=True,
        anchor=re.compile(_SECRET_KEY_WORD),
    ),
)
RULE_NAMES = frozenset(rule.name for rule in RULES)


def mask(secret: str) -> str:
    """Enough of a secret to find it again, never the secret: ``AKIA…XYZ``."""
    if len(secret) < 12:
        return secret[:2] + "…"
    return f"{secret[:4]}…{secret[-3:]}"


@dataclass(frozen=True)
class Finding:
    path: str
    """In the image, absolute."""
    line: int
    rule: str
    masked: str

    def describe(self) -> str:
        return f"{self.path}:{self.line}: {self.rule} ({self.masked})"


def scan_text(path: str, text: str) -> list[Finding]:
    """Every secret in one file's text, one finding per line (rules go from specific to
    generic, so an AWS secret is not also reported as a high-entropy string)."""
    out: list[Finding] = []
    seen: set[int] = set()
    config = is_config_file(path)
    line_starts: list[int] | None = None
    lowered: str | None = None
    for rule in RULES:
        if rule.config_only and not config:
            continue
        if rule.lower and lowered is None:
            lowered = text.lower()
        haystack = lowered if rule.lower and lowered is not None else text
        if rule.hints and not any(hint in haystack for hint in rule.hints):
            continue
        for match in _matches(rule, text, lowered):
            if rule.secret_group >= 0:
                secret = match.group(rule.secret_group)
            else:
                secret = next((g for g in match.groups() if g is not None), "")
            if rule.accept is not None and not rule.accept(secret, path):
                continue
            if line_starts is None:
                line_starts = [0, *(m.end() for m in re.finditer("\n", text))]
            line = _line_of(
                line_starts, match.start(rule.secret_group if rule.secret_group >= 0 else 0)
            )
            if line in seen:
                continue  # the first, most specific rule names the line
            seen.add(line)
            shown = secret if rule.name == "private-key" else mask(secret)
            out.append(Finding(path, line, rule.name, shown))
    return sorted(out, key=lambda f: (f.line, f.rule))


def _matches(rule: Rule, text: str, lowered: str | None) -> Iterator[re.Match[str]]:
    """The rule's matches; with an ``anchor``, tried only where the anchor occurs in the
    lowercased text (many times faster than a case-insensitive scan of every offset)."""
    if rule.anchor is None or lowered is None or len(lowered) != len(text):
        yield from rule.pattern.finditer(text)
        return
    for hit in rule.anchor.finditer(lowered):
        start = hit.start()
        if rule.from_line_start:
            start = text.rfind("\n", 0, start) + 1
        end = text.find("\n", hit.end())
        match = rule.pattern.match(text, start, len(text) if end < 0 else end)
        if match is not None:
            yield match


def _line_of(starts: list[int], offset: int) -> int:
    low, high = 0, len(starts)
    while low + 1 < high:
        middle = (low + high) // 2
        if starts[middle] <= offset:
            low = middle
        else:
            high = middle
    return low + 1


# -- layers -----------------------------------------------------------------


@dataclass
class LayerScan:
    """What one layer holds: findings, and what was not read (and why)."""

    findings: list[Finding] = field(default_factory=list)
    files: int = 0
    binary: int = 0
    large: int = 0
    unsafe: int = 0
    truncated: bool = False

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: Any) -> LayerScan | None:
        try:
            return cls(
                [Finding(**f) for f in raw["findings"]],
                int(raw["files"]),
                int(raw["binary"]),
                int(raw["large"]),
                int(raw["unsafe"]),
                bool(raw["truncated"]),
            )
        except (KeyError, TypeError, ValueError):
            return None


def scan_layer(store: ImageStore, layer: Descriptor, cache: Path | None = None) -> LayerScan:
    """One layer blob's findings, streamed in memory the way the SBOM reader streams it
    (hashed as it goes: a tampered blob fails); kept under the layer digest in ``cache``
    (default ``$KILN_HOME/cache/secrets``) so an unchanged layer is read once."""
    cache_dir = cache if cache is not None else kiln_home() / "cache" / "secrets"
    name = f"{layer.digest.removeprefix('sha256:')}-v{RULES_VERSION}.json"
    path = cache_dir / name
    with contextlib.suppress(OSError, ValueError):
        cached = LayerScan.from_json(json.loads(path.read_bytes()))
        if cached is not None:
            return cached
    result = _read_layer(store, layer)
    cache_layer_result(cache_dir, name, result.to_json())
    return result


def _read_layer(store: ImageStore, layer: Descriptor) -> LayerScan:
    from kiln.supply.sbom import _member_path

    source = f"layer {layer.digest[:19]}…"
    result = LayerScan()
    with layer_tar(store, layer, source) as tf:
        for member in tf:
            if not member.isreg():
                continue
            path = _member_path(member.name)
            if path is None:
                result.unsafe += 1
                continue
            result.files += 1
            if member.size > MAX_FILE_BYTES:
                result.large += 1
                continue
            text = _read_text(tf, member)
            if text is None:
                result.binary += 1
                continue
            for finding in scan_text("/" + path, text):
                if len(result.findings) >= MAX_LAYER_FINDINGS:
                    result.truncated = True
                    break
                result.findings.append(finding)
    return result


def _read_text(tf: tarfile.TarFile, member: tarfile.TarInfo) -> str | None:
    """A file's text, or ``None`` for a binary (a NUL in its first 8 KiB)."""
    handle = tf.extractfile(member)
    if handle is None:
        return ""
    with handle:
        head = handle.read(SNIFF_BYTES)
        if b"\0" in head:
            return None
        data = head + handle.read(MAX_FILE_BYTES - len(head))
    return data.decode("utf-8", "replace")


# -- images -----------------------------------------------------------------


@dataclass(frozen=True)
class AllowEntry:
    """An accepted false positive: ``path`` is a glob over the image path (``*`` also
    matches ``/``); ``rule`` one of :data:`RULE_NAMES`, or ``None`` for any rule."""

    path: str
    rule: str | None
    reason: str

    def matches(self, finding: Finding) -> bool:
        rule_ok = self.rule is None or self.rule == finding.rule
        return rule_ok and fnmatch.fnmatchcase(finding.path, self.path)


@dataclass
class SecretScan:
    findings: list[Finding]
    allowed: list[tuple[Finding, AllowEntry]]
    stale: list[AllowEntry]
    """Allow entries that matched nothing: warned about, so the list does not rot."""
    layers: list[str]
    files: int = 0
    binary: int = 0
    large: int = 0
    unsafe: int = 0
    truncated: bool = False

    def document(self) -> dict[str, Any]:
        """The referrer's payload, for the policy gate: ``findings`` is a count."""
        return {
            "findings": len(self.findings),
            "allowed": [
                {"path": f.path, "line": f.line, "rule": f.rule, "reason": entry.reason}
                for f, entry in self.allowed
            ],
            "rules_version": RULES_VERSION,
            "layers": self.layers,
            "skipped": {"binary": self.binary, "large": self.large, "unsafe": self.unsafe},
        }


def check_allow(allow: Sequence[AllowEntry], where: str) -> None:
    for number, entry in enumerate(allow):
        if entry.rule is not None and entry.rule not in RULE_NAMES:
            known = ", ".join(sorted(RULE_NAMES))
            raise KilnError(
                f"{where}.secrets_allow[{number}].rule: unknown rule {entry.rule!r} "
                f"(rules: {known})"
            )


def scan_layers(
    store: ImageStore,
    layers: Sequence[Descriptor],
    allow: Sequence[AllowEntry] = (),
    cache: Path | None = None,
) -> SecretScan:
    """The findings of ``layers`` (a recipe's own), with the allow-list applied."""
    result = SecretScan([], [], [], [layer.digest for layer in layers])
    used: set[int] = set()
    for layer in layers:
        scanned = scan_layer(store, layer, cache)
        result.files += scanned.files
        result.binary += scanned.binary
        result.large += scanned.large
        result.unsafe += scanned.unsafe
        result.truncated = result.truncated or scanned.truncated
        for finding in scanned.findings:
            hit = next((i for i, entry in enumerate(allow) if entry.matches(finding)), None)
            if hit is None:
                result.findings.append(finding)
            else:
                used.add(hit)
                result.allowed.append((finding, allow[hit]))
    result.stale = [entry for i, entry in enumerate(allow) if i not in used]
    return result


def scan_policy(allow: Sequence[AllowEntry]) -> str:
    """What a scan's outcome depends on besides the layers: the rules and the allow-list."""
    raw = json.dumps([RULES_VERSION, [asdict(entry) for entry in allow]], sort_keys=True)
    return "sha256:" + hashlib.sha256(raw.encode()).hexdigest()


def stored_scan(store: ImageStore, ref: str) -> dict[str, Any] | None:
    """The newest secret-scan referrer of ``ref`` (what the policy gate reads), or ``None``."""
    return newest_referrer_document(store, ref, SECRET_SCAN_ARTIFACT_TYPE, "secret-scan")


def ensure_secret_scan(
    store: ImageStore,
    digest: str,
    layers: Sequence[Descriptor],
    allow: Sequence[AllowEntry],
    where: str,
) -> SecretScan | None:
    """Scan the recipe's ``layers`` of the image ``digest`` and attach the result; a
    finding raises with one line per finding (nothing is attached, so nothing is tagged).

    ``None`` when a scan with the same rules and allow-list is already attached (a cached
    re-bake that changes nothing reads one small index file).
    """
    check_allow(allow, where)
    policy = scan_policy(allow)
    for listed in store.referrers(digest, SECRET_SCAN_ARTIFACT_TYPE):
        if (listed.annotations or {}).get(ANNOTATION_SCAN_POLICY) == policy:
            return None
    result = scan_layers(store, layers, allow)
    if result.findings:
        lines = [f"{where}: secret found: {f.describe()}" for f in result.findings[:MAX_FINDINGS]]
        more = len(result.findings) - len(lines)
        if more > 0:
            lines.append(f"{where}: and {more} more secret findings")
        if result.truncated:
            lines.append(f"{where}: a layer has over {MAX_LAYER_FINDINGS}; the rest are not listed")
        raise KilnError("\n".join(lines))
    payload = json.dumps(result.document(), sort_keys=True, separators=(",", ":")).encode()
    store.put_referrer(
        digest,
        SECRET_SCAN_ARTIFACT_TYPE,
        payload,
        SECRET_SCAN_MEDIA_TYPE,
        {ANNOTATION_SCAN_POLICY: policy},
    )
    return result
