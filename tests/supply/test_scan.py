"""Matching an SBOM against OSV advisories: dpkg ordering for Debian source packages
(checked against dpkg itself), PEP 440 for PyPI, OSV range semantics, suppressions that
expire, a database too old to trust, and the scan of a real baked image."""

from __future__ import annotations

import datetime
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from osv_advisories import (
    JINJA_LAST_AFFECTED,
    OPENSSL_DSA,
    REQUESTS_GHSA,
    WITHDRAWN_ZLIB,
    advisory,
    write,
)

from kiln.errors import KilnError
from kiln.supply.osv import OsvDatabase, import_advisories
from kiln.supply.sbom import Component
from kiln.supply.scan import (
    Finding,
    apply_suppressions,
    load_suppressions,
    match_components,
    parse_age,
)

NOW = datetime.datetime(2024, 6, 1, tzinfo=datetime.UTC)


def deb(
    name: str, version: str, source: str = "", source_version: str = "", distro: str = "bookworm"
) -> Component:
    purl = f"pkg:deb/debian/{name}@{version}?arch=amd64" + (f"&distro={distro}" if distro else "")
    return Component("debian", name, version, source or name, source_version or version, purl)


def pypi(name: str, version: str) -> Component:
    return Component("pypi", name, version, name, version, f"pkg:pypi/{name.lower()}@{version}")


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "osv.db"
    write(tmp_path / "osv", OPENSSL_DSA, REQUESTS_GHSA, JINJA_LAST_AFFECTED, WITHDRAWN_ZLIB)
    import_advisories(tmp_path / "osv", path, now=NOW)
    return path


def scan(db: Path, *parts: Component) -> list[Finding]:
    with OsvDatabase(db) as osv:
        return match_components(parts, osv)


def brief(findings: list[Finding]) -> list[tuple[str, str, str, str | None]]:
    return [(f.id, f.package, f.installed, f.fixed) for f in findings]


# -- Debian ---------------------------------------------------------------------------


def test_debian_matches_by_source_package_and_names_the_binaries_and_the_fix(db: Path) -> None:
    findings = scan(
        db,
        deb("libssl3", "3.0.11-1~deb12u1", "openssl", "3.0.11-1~deb12u1"),
        deb("openssl", "3.0.11-1~deb12u1"),
    )
    assert brief(findings) == [("DSA-5532-1", "openssl", "3.0.11-1~deb12u1", "3.0.11-1~deb12u2")]
    assert findings[0].binaries == ["libssl3", "openssl"]
    assert findings[0].severity == "unknown"  # Debian's DSAs carry no CVSS


def test_a_binnmu_of_the_fixed_source_is_clean(db: Path) -> None:
    # The binary's version has +b1, the source's is the fixed one: the source decides.
    assert scan(db, deb("libssl3", "3.0.11-1~deb12u2+b1", "openssl", "3.0.11-1~deb12u2")) == []


def test_tilde_epoch_and_revision_order_as_dpkg_does(tmp_path: Path) -> None:
    item = advisory(OPENSSL_DSA, id="DSA-0001-1")
    item["affected"] = [
        {
            "package": {"ecosystem": "Debian:12", "name": name},
            "ranges": [{"type": "ECOSYSTEM", "events": [{"introduced": "0"}, {"fixed": fixed}]}],
        }
        for name, fixed in (("tilde", "2.0"), ("epoch", "1:1.0-1"), ("rev", "2.0-10"))
    ]
    write(tmp_path / "osv", item)
    db = tmp_path / "osv.db"
    import_advisories(tmp_path / "osv", db, now=NOW)
    affected = {
        ("tilde", "2.0~rc1"),  # ~ sorts before the release
        ("epoch", "9.9-1"),  # epoch 0 < epoch 1, whatever the upstream
        ("rev", "2.0-9"),  # revisions compare numerically: 9 < 10
    }
    clean = {("tilde", "2.0"), ("tilde", "2.0+deb12u1"), ("epoch", "1:1.0-1"), ("rev", "2.0-10")}
    for name, version in affected | clean:
        hits = scan(db, deb(name, version))
        assert bool(hits) == ((name, version) in affected), (name, version)


def test_a_debian_release_only_matches_its_own_advisories(tmp_path: Path) -> None:
    only_bullseye = advisory(OPENSSL_DSA, id="DLA-3530-1")
    only_bullseye["affected"] = only_bullseye["affected"][1:]  # Debian:11, fixed 1.1.1w-0+deb11u1
    write(tmp_path / "osv", only_bullseye)
    db = tmp_path / "osv.db"
    import_advisories(tmp_path / "osv", db, now=NOW)
    old = "1.1.1n-0+deb11u5"
    assert scan(db, deb("openssl", old, distro="bookworm")) == []
    assert scan(db, deb("openssl", old, distro="debian-12")) == []
    assert brief(scan(db, deb("openssl", old, distro="bullseye"))) == [
        ("DLA-3530-1", "openssl", old, "1.1.1w-0+deb11u1")
    ]
    # An SBOM that does not say which release: every release's advisories apply.
    assert len(scan(db, deb("openssl", old, distro=""))) == 1
    # Ubuntu's packages are not Debian's: Debian advisories do not apply.
    ubuntu = Component("debian", "openssl", old, "openssl", old, f"pkg:deb/ubuntu/openssl@{old}")
    assert scan(db, ubuntu) == []


def test_withdrawn_advisories_never_match(db: Path) -> None:
    assert scan(db, deb("zlib1g", "1:1.2.13.dfsg-1", "zlib", "1:1.2.13.dfsg-1")) == []


def test_versions_lists_and_reintroduced_ranges(tmp_path: Path) -> None:
    item = advisory(OPENSSL_DSA, id="DSA-0002-1")
    item["affected"] = [
        {
            "package": {"ecosystem": "Debian:12", "name": "listed"},
            "versions": ["1.0-1", "1.0-2"],
        },
        {
            "package": {"ecosystem": "Debian:12", "name": "twice"},
            "ranges": [
                {
                    "type": "ECOSYSTEM",
                    "events": [
                        {"introduced": "1.0"},
                        {"fixed": "1.5"},
                        {"introduced": "2.0"},
                        {"fixed": "2.3"},
                    ],
                }
            ],
        },
    ]
    write(tmp_path / "osv", item)
    db = tmp_path / "osv.db"
    import_advisories(tmp_path / "osv", db, now=NOW)
    assert brief(scan(db, deb("listed", "1.0-2"))) == [("DSA-0002-1", "listed", "1.0-2", None)]
    assert scan(db, deb("listed", "1.0-3")) == []
    assert [f.fixed for f in scan(db, deb("twice", "1.2"))] == ["1.5"]
    assert scan(db, deb("twice", "1.7")) == []
    assert [f.fixed for f in scan(db, deb("twice", "2.1"))] == ["2.3"]
    assert scan(db, deb("twice", "0.9")) == []


# -- PyPI -----------------------------------------------------------------------------


def test_pypi_matches_by_pep_440_range(db: Path) -> None:
    assert brief(scan(db, pypi("requests", "2.30.0"))) == [
        ("GHSA-j8r2-6x86-q33q", "requests", "2.30.0", "2.31.0")
    ]
    (finding,) = scan(db, pypi("Requests", "2.31.0rc1"))  # a pre-release sorts before 2.31.0
    assert finding.severity == "medium" and "CVE-2023-32681" in finding.aliases
    for clean in ("2.31.0", "2.2.1", "2.31.0.post1"):
        assert scan(db, pypi("requests", clean)) == [], clean


def test_last_affected_includes_that_version_and_nothing_after(db: Path) -> None:
    assert brief(scan(db, pypi("jinja2", "3.1.2"))) == [
        ("PYSEC-2024-9999", "jinja2", "3.1.2", None)
    ]
    assert scan(db, pypi("Jinja2", "3.1.3")) == []
    assert scan(db, pypi("jinja2", "2.11.3")) == []
    assert scan(db, pypi("jinja2", "not a version")) == []


def test_findings_are_ordered_by_severity(db: Path) -> None:
    findings = scan(db, pypi("requests", "2.30.0"), pypi("jinja2", "3.1.0"))
    assert [f.severity for f in findings] == ["critical", "medium"]


# -- dpkg's own ordering --------------------------------------------------------------

_UPSTREAM_TOKENS = [
    "0",
    "1",
    "2",
    "9",
    "10",
    "01",
    "a",
    "b",
    "z",
    "~",
    "~~",
    "+",
    ".",
    "~rc1",
    "+dfsg",
    ".0",
]
_REVISION_TOKENS = ["0", "1", "2", "10", "~", "+b1", "deb12u1", ".1", "~bpo", "a"]


@st.composite
def dpkg_versions(draw: st.DrawFn) -> str:
    epoch = draw(st.sampled_from(["", "", "0:", "1:", "2:", "10:"]))
    digit = draw(st.sampled_from(["0", "1", "2", "9", "10"]))
    upstream = digit + "".join(draw(st.lists(st.sampled_from(_UPSTREAM_TOKENS), max_size=4)))
    if draw(st.booleans()):
        upstream += draw(st.sampled_from(["", "-1", "-0"]))  # a hyphen inside the upstream
        revision = "".join(
            draw(st.lists(st.sampled_from(_REVISION_TOKENS), min_size=1, max_size=3))
        )
        return f"{epoch}{upstream}-{revision}"
    return epoch + upstream


_NEIGHBOUR_SUFFIXES = ["~", "0", ".0", "+", "a", "~~", "-1", "-0~"]


@st.composite
def version_pairs(draw: st.DrawFn) -> tuple[str, str]:
    """Two independent versions, or a version and a near neighbour of it (``a`` and
    ``a~``, ``a.0``…), where the interesting comparisons are."""
    a = draw(dpkg_versions())
    if draw(st.booleans()):
        return a, a + draw(st.sampled_from(_NEIGHBOUR_SUFFIXES))
    return a, draw(dpkg_versions())


_DPKG_LOOP = """
while read -r a op b; do
  if dpkg --compare-versions "$a" "$op" "$b"; then echo yes; else echo "no:$a:$op:$b"; fi
done
"""
_OPERATORS = {"<": "lt", "=": "eq", ">": "gt"}


def dpkg_confirms(claims: list[tuple[str, str, str]], shells: int = 2) -> list[str]:
    """dpkg's verdict on each ``(a, op, b)`` claim: one ``dpkg --compare-versions`` per
    claim (the relations exclude each other, so one call settles it), in ``shells`` loops
    side by side. ``yes``, or ``no:a:op:b``."""
    chunk = -(-len(claims) // shells)
    batches = [claims[i : i + chunk] for i in range(0, len(claims), chunk)]
    loops = [
        subprocess.Popen(
            ["sh", "-c", _DPKG_LOOP],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in batches
    ]
    verdicts: list[str] = []
    for loop, batch in zip(loops, batches, strict=True):
        lines = "".join(f"{a} {_OPERATORS[op]} {b}\n" for a, op, b in batch)
        out, err = loop.communicate(lines)
        assert loop.returncode == 0 and "warning" not in err, err  # every version is valid
        verdicts.extend(out.split())
    return verdicts


@pytest.mark.skipif(shutil.which("dpkg") is None, reason="dpkg not installed")
@settings(max_examples=15, deadline=None)
@given(st.lists(version_pairs(), min_size=200, max_size=200))
def test_python_debian_orders_versions_as_dpkg_does(pairs: list[tuple[str, str]]) -> None:
    from debian.debian_support import Version

    claims = []
    for a, b in pairs:
        va, vb = Version(a), Version(b)
        claims.append((a, "<" if va < vb else "=" if va == vb else ">", b))
    verdicts = dpkg_confirms(claims)
    assert len(verdicts) == len(claims)
    assert [v for v in verdicts if v != "yes"] == []


@pytest.mark.skipif(shutil.which("dpkg") is None, reason="dpkg not installed")
def test_the_dpkg_oracle_refutes_a_wrong_claim() -> None:
    """The property test would see a disagreement: dpkg says no to a false ordering."""
    assert dpkg_confirms([("1.0~rc1", ">", "1.0"), ("1:0.1", ">", "2.0")]) == [
        "no:1.0~rc1:gt:1.0",
        "yes",
    ]


# -- suppressions ---------------------------------------------------------------------


def _suppressions(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "accepted.toml"
    path.write_text(text)
    return path


def test_a_suppression_hides_its_finding_until_it_expires(db: Path, tmp_path: Path) -> None:
    path = _suppressions(
        tmp_path,
        """
[[suppression]]
id = "CVE-2023-32681"          # an alias is enough
package = "requests"
reason = "no proxies in this service"
expires = 2024-12-31

[[suppression]]
id = "PYSEC-2024-9999"
reason = "sandbox not used"
expires = "2024-01-01"
""",
    )
    accepted = load_suppressions(path)
    findings = scan(db, pypi("requests", "2.30.0"), pypi("jinja2", "3.1.0"))
    shown, hidden = apply_suppressions(findings, accepted, datetime.date(2024, 6, 1))
    assert [f.id for f in hidden] == ["GHSA-j8r2-6x86-q33q"]
    assert hidden[0].suppressed_by is not None
    assert hidden[0].suppressed_by.reason == "no proxies in this service"
    assert [f.id for f in shown] == ["PYSEC-2024-9999"]
    assert shown[0].note == (f"suppression {path}:#2 expired 2024-01-01 (sandbox not used)")
    # The last day of a suppression still counts; the day after, the finding is back.
    findings = scan(db, pypi("requests", "2.30.0"))
    assert apply_suppressions(findings, accepted, datetime.date(2024, 12, 31))[0] == []
    findings = scan(db, pypi("requests", "2.30.0"))
    back, _ = apply_suppressions(findings, accepted, datetime.date(2025, 1, 1))
    assert [f.id for f in back] == ["GHSA-j8r2-6x86-q33q"] and "expired 2024-12-31" in back[0].note


def test_a_suppression_for_another_package_hides_nothing(db: Path, tmp_path: Path) -> None:
    path = _suppressions(
        tmp_path,
        '[[suppression]]\nid = "DSA-5532-1"\npackage = "gnutls28"\nreason = "x"\n'
        "expires = 2030-01-01\n",
    )
    findings = scan(db, deb("libssl3", "3.0.9-1", "openssl", "3.0.9-1"))
    shown, hidden = apply_suppressions(findings, load_suppressions(path), datetime.date(2024, 6, 1))
    assert [f.id for f in shown] == ["DSA-5532-1"] and hidden == []
    # Naming the binary package works as well as the source.
    path.write_text(path.read_text().replace("gnutls28", "libssl3"))
    findings = scan(db, deb("libssl3", "3.0.9-1", "openssl", "3.0.9-1"))
    assert apply_suppressions(findings, load_suppressions(path), datetime.date(2024, 6, 1))[0] == []


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[suppression]]\nid = "X"\nreason = "r"\n', "#1: expires must be a date"),
        ('[[suppression]]\nid = "X"\nexpires = 2030-01-01\n', "#1: reason must be a non-empty"),
        (
            '[[suppression]]\nid = "X"\nreason = "r"\nexpires = 2030-01-01\nowner = "me"\n',
            "#1: unknown key 'owner'",
        ),
        ("[[suppression]\n", "not valid TOML"),
        ('ignore = ["CVE-1"]\n', "unknown key 'ignore'"),
    ],
)
def test_a_bad_suppression_file_is_one_clear_error(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(KilnError, match=message) as caught:
        load_suppressions(_suppressions(tmp_path, text))
    assert "\n" not in str(caught.value).strip() or "TOML" in str(caught.value)


def test_ages_parse_and_bad_ones_are_refused() -> None:
    assert (
        parse_age("7d") == 7 * 86400 and parse_age("12h") == 43200 and parse_age("2w") == 14 * 86400
    )
    with pytest.raises(KilnError, match="--max-db-age: 'seven days'"):
        parse_age("seven days")


# -- the command ----------------------------------------------------------------------


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """In-process ``kiln`` with KILN_HOME in tmp_path (app.run registers ``scan`` once the
    CLI imports kiln.cli.scan_cmd; until then the import here does)."""
    import kiln.cli.scan_cmd  # noqa: F401

    home = tmp_path / "home"
    monkeypatch.setenv("KILN_HOME", str(home))
    return home


def test_a_stale_database_fails_the_scan_in_one_line(
    cli: Path, db: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from kiln.cli.app import run

    # The newest advisory was modified 2024-05-20: months before any machine's today.
    assert run(["scan", "some/image:1", "--db", str(db), "--max-db-age", "7d"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: vulnerability database {db} is ") and err.count("\n") == 1
    assert "more than --max-db-age allows (7 days)" in err
    assert run(["scan", "x", "--db", str(db), "--max-db-age", "soon"]) == 1
    assert "is not an age" in capsys.readouterr().err
    assert run(["scan", "x", "--db", str(cli / "none.db")]) == 1
    assert "run `kiln scan db import PATH` first" in capsys.readouterr().err


# -- a real baked image ---------------------------------------------------------------

SITE_RECIPE = """[project]
name = "scanme"

[images.app]
from = "debian:bookworm"
steps = [{ copy = "site/", to = "/usr/lib/python3/dist-packages" }]
"""


@pytest.mark.e2e
@pytest.mark.timeout(900)
@pytest.mark.skipif(os.geteuid() != 0, reason="a Debian bake needs root (mmdebstrap)")
@pytest.mark.skipif(shutil.which("mmdebstrap") is None, reason="mmdebstrap not installed")
def test_a_baked_debian_image_is_scanned_from_its_sbom(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import kiln.cli.scan_cmd  # noqa: F401
    from kiln.cli.app import run
    from kiln.image.bake import bake_project
    from kiln.image.store import ImageStore
    from kiln.supply.sbom import components, image_sbom

    project = tmp_path / "p"
    metadata = project / "site" / "requests-2.30.0.dist-info" / "METADATA"
    metadata.parent.mkdir(parents=True)
    metadata.write_text("Metadata-Version: 2.1\nName: requests\nVersion: 2.30.0\n")
    (project / "kiln.toml").write_text(SITE_RECIPE)
    monkeypatch.setenv("KILN_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("KILN_CACHE", os.environ.get("KILN_CACHE", "/var/cache/kiln-test"))
    monkeypatch.setenv("KILN_BASE_CACHE", str(tmp_path / "bases"))
    digest = bake_project(project, None)["app"].digest
    ref = "app"

    # The advisory names the image's real source package and version: its own openssl
    # (or, if the image has none, its base-files) "fixed" one revision later.
    parts = components(image_sbom(ImageStore.default(), ref))
    target = next(
        (p for p in parts if p.ecosystem == "debian" and p.source_name == "openssl"),
        next(p for p in parts if p.ecosystem == "debian" and p.name == "base-files"),
    )
    live = advisory(OPENSSL_DSA, modified=datetime.datetime.now(datetime.UTC).isoformat())
    live["affected"] = [
        {
            "package": {"ecosystem": "Debian:12", "name": target.source_name},
            "ranges": [
                {
                    "type": "ECOSYSTEM",
                    "events": [{"introduced": "0"}, {"fixed": target.source_version + "+1"}],
                }
            ],
        }
    ]
    write(tmp_path / "osv", live, REQUESTS_GHSA)
    assert run(["scan", "db", "import", str(tmp_path / "osv")]) == 0
    capsys.readouterr()

    assert run(["scan", ref, "--json", "--max-db-age", "7d"]) == 3
    report = json.loads(capsys.readouterr().out)
    assert report["digest"] == digest and report["components"] > 50
    assert sorted((f["id"], f["package"], f["fixed"]) for f in report["findings"]) == [
        ("DSA-5532-1", target.source_name, target.source_version + "+1"),
        ("GHSA-j8r2-6x86-q33q", "requests", "2.31.0"),
    ]
    accepted = tmp_path / "accepted.toml"
    accepted.write_text(
        "".join(
            f'[[suppression]]\nid = "{i}"\nreason = "accepted in test"\nexpires = 2099-01-01\n'
            for i in ("DSA-5532-1", "CVE-2023-32681")
        )
    )
    assert run(["scan", ref, "--suppressions", str(accepted)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("database: 2 advisories, newest advisory modified ")
    assert "0 finding(s), 2 suppressed" in out
