"""Importing OSV advisories: file, directory and zip sources, malformed advisories
skipped with a warning naming file and field, hostile zips refused before anything is
read, and a failed import leaving the previous database exactly as it was."""

from __future__ import annotations

import datetime
import json
import os
import sqlite3
import struct
import zipfile
from pathlib import Path

import pytest
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

NOW = datetime.datetime(2024, 6, 1, 12, 0, tzinfo=datetime.UTC)


def _import(source: Path, db: Path) -> tuple[int, int, list[str]]:
    warnings: list[str] = []
    result = import_advisories(source, db, warn=warnings.append, now=NOW)
    return result.imported, result.skipped, warnings


def _ids(db: Path) -> list[str]:
    with sqlite3.connect(db) as conn:
        return [row[0] for row in conn.execute("SELECT id FROM advisory ORDER BY id")]


def test_a_single_file_imports_and_records_import_time_and_newest_modified(
    tmp_path: Path,
) -> None:
    (path,) = write(tmp_path / "src", OPENSSL_DSA)
    db = tmp_path / "osv.db"
    assert _import(path, db) == (1, 0, [])
    with OsvDatabase(db) as osv:
        info = osv.info()
        assert info.advisories == 1
        assert info.imported_at == NOW
        assert info.newest_modified == datetime.datetime(
            2024, 1, 10, 5, 12, 33, tzinfo=datetime.UTC
        )
        # Debian entries are keyed by source package and release.
        (bookworm,) = osv.candidates("Debian", "openssl", "12")
        assert bookworm.entry.release == "12"
        assert bookworm.entry.ranges[0].events[1].version == "3.0.11-1~deb12u2"
        assert len(osv.candidates("Debian", "openssl", None)) == 2
    assert os.stat(db).st_mode & 0o077 == 0


def test_a_directory_imports_recursively_and_ignores_other_files(tmp_path: Path) -> None:
    source = tmp_path / "osv"
    write(source / "debian", OPENSSL_DSA, WITHDRAWN_ZLIB)
    write(source / "pypi", REQUESTS_GHSA, JINJA_LAST_AFFECTED)
    (source / "README.md").write_text("not an advisory")
    db = tmp_path / "osv.db"
    assert _import(source, db) == (4, 0, [])
    assert _ids(db) == ["DLA-9999-1", "DSA-5532-1", "GHSA-j8r2-6x86-q33q", "PYSEC-2024-9999"]
    with OsvDatabase(db) as osv:
        # PyPI names are PEP 503-normalized on both sides.
        assert [c.entry.advisory for c in osv.candidates("PyPI", "jinja2", None)] == [
            "PYSEC-2024-9999"
        ]
        # A withdrawn advisory is stored but never offered to a scan.
        assert osv.candidates("Debian", "zlib", "12") == []


def test_an_osv_dev_style_all_zip_imports(tmp_path: Path) -> None:
    archive = tmp_path / "all.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for item in (OPENSSL_DSA, REQUESTS_GHSA, JINJA_LAST_AFFECTED):
            zf.writestr(f"{item['id']}.json", json.dumps(item))
    db = tmp_path / "osv.db"
    assert _import(archive, db) == (3, 0, [])
    with OsvDatabase(db) as osv:
        severities = {
            c.entry.advisory: c.severity
            for name in ("requests", "jinja2")
            for c in osv.candidates("PyPI", name, None)
        }
    # CVSS 3.1 base 6.1 → medium (over GitHub's "MODERATE"), CVSS 4.0 9.3 → critical.
    assert severities == {"GHSA-j8r2-6x86-q33q": "medium", "PYSEC-2024-9999": "critical"}


def test_reimporting_an_advisory_replaces_it(tmp_path: Path) -> None:
    db = tmp_path / "osv.db"
    _import(write(tmp_path / "a", OPENSSL_DSA)[0], db)
    newer = advisory(OPENSSL_DSA, modified="2024-05-01T00:00:00Z")
    newer["affected"] = newer["affected"][:1]
    _import(write(tmp_path / "b", newer)[0], db)
    with OsvDatabase(db) as osv:
        assert osv.info().advisories == 1
        assert len(osv.candidates("Debian", "openssl", None)) == 1
        assert osv.info().newest_modified == datetime.datetime(2024, 5, 1, tzinfo=datetime.UTC)


def test_malformed_advisories_are_skipped_with_a_warning_naming_file_and_field(
    tmp_path: Path,
) -> None:
    source = tmp_path / "osv"
    no_id = advisory(REQUESTS_GHSA)
    del no_id["id"]
    bad_event = advisory(REQUESTS_GHSA, id="GHSA-bad-event")
    bad_event["affected"][0]["ranges"][0]["events"][1] = {"fixd": "2.31.0"}
    bad_debian_version = advisory(OPENSSL_DSA, id="DSA-bad-version")
    bad_debian_version["affected"][0]["ranges"][0]["events"][1] = {"fixed": "3.0 11"}
    bad_time = advisory(REQUESTS_GHSA, id="GHSA-bad-time", modified="yesterday")
    bad_cvss = advisory(REQUESTS_GHSA, id="GHSA-bad-cvss")
    bad_cvss["severity"] = [{"type": "CVSS_V3", "score": "CVSS:3.1/AV:Q"}]
    no_ecosystem = advisory(OPENSSL_DSA, id="DSA-no-ecosystem")
    del no_ecosystem["affected"][1]["package"]["ecosystem"]
    write(source, OPENSSL_DSA, bad_event, bad_debian_version, bad_time, bad_cvss, no_ecosystem)
    (source / "no-id.json").write_text(json.dumps(no_id))
    (source / "truncated.json").write_text('{"id": "GHSA-x", "modified": ')
    db = tmp_path / "osv.db"
    imported, skipped, warnings = _import(source, db)
    assert (imported, skipped) == (1, 7)
    assert _ids(db) == ["DSA-5532-1"]
    expected = {
        "DSA-bad-version.json": "affected[0].ranges[0].events[1].fixed: '3.0 11' is not a Debian",
        "DSA-no-ecosystem.json": "affected[1].package.ecosystem: missing",
        "GHSA-bad-cvss.json": "severity[0].score: 'CVSS:3.1/AV:Q' is not a CVSS_V3 vector",
        "GHSA-bad-event.json": "affected[0].ranges[0].events[1]: 'fixd' is not one of",
        "GHSA-bad-time.json": "modified: 'yesterday' is not an RFC 3339 timestamp",
        "no-id.json": "id: missing",
        "truncated.json": "(JSON): not valid JSON",
    }
    assert len(warnings) == len(expected)
    for line in warnings:
        assert line.startswith("warning: ") and line.endswith(": skipped") and "\n" not in line
        (name,) = [n for n in expected if f"/{n}: " in line]
        assert expected[name] in line, line


def _zip_with(archive: Path, members: dict[str, bytes]) -> None:
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)


def _declare_size(archive: Path, member: str, size: int) -> None:
    """Rewrite ``member``'s uncompressed size in the central directory (a lying header)."""
    data = bytearray(archive.read_bytes())
    name = member.encode()
    at = data.find(b"PK\x01\x02")
    while at != -1:
        name_len = struct.unpack_from("<H", data, at + 28)[0]
        if data[at + 46 : at + 46 + name_len] == name:
            struct.pack_into("<I", data, at + 24, size)
            archive.write_bytes(bytes(data))
            return
        at = data.find(b"PK\x01\x02", at + 4)
    raise AssertionError(f"{member} not in {archive}")


@pytest.fixture
def previous_db(tmp_path: Path) -> Path:
    db = tmp_path / "osv.db"
    _import(write(tmp_path / "good", OPENSSL_DSA)[0], db)
    return db


def _assert_unchanged(db: Path) -> None:
    assert _ids(db) == ["DSA-5532-1"]
    with OsvDatabase(db) as osv:
        assert osv.info().imported_at == NOW


def test_a_zip_bomb_is_refused_in_one_line_and_the_previous_database_survives(
    tmp_path: Path, previous_db: Path
) -> None:
    bomb = tmp_path / "bomb.zip"
    _zip_with(bomb, {"DLA-1.json": json.dumps(REQUESTS_GHSA).encode(), "x.json": bytes(10 << 20)})
    with pytest.raises(KilnError) as caught:
        import_advisories(bomb, previous_db, now=NOW + datetime.timedelta(days=1))
    message = str(caught.value)
    assert "x.json" in message and "zip bomb" in message and "\n" not in message
    _assert_unchanged(previous_db)


def test_a_member_declaring_2_gb_is_refused_before_it_is_read(
    tmp_path: Path, previous_db: Path
) -> None:
    big = tmp_path / "big.zip"
    _zip_with(big, {"GHSA-a.json": json.dumps(REQUESTS_GHSA).encode(), "huge.json": b"{}"})
    _declare_size(big, "huge.json", 2 * 1024**3)
    with pytest.raises(KilnError, match=r"huge\.json: inflates to 2147483648 bytes.*refused"):
        import_advisories(big, previous_db, now=NOW + datetime.timedelta(days=1))
    _assert_unchanged(previous_db)


def test_a_member_larger_than_its_header_says_fails_the_import(
    tmp_path: Path, previous_db: Path
) -> None:
    liar = tmp_path / "liar.zip"
    _zip_with(liar, {"GHSA-a.json": json.dumps(REQUESTS_GHSA).encode() + b" " * (3 << 20)})
    _declare_size(liar, "GHSA-a.json", 100)
    with pytest.raises(KilnError, match=r"GHSA-a\.json: cannot be read"):
        import_advisories(liar, previous_db, now=NOW + datetime.timedelta(days=1))
    _assert_unchanged(previous_db)


def test_an_oversized_file_is_refused_and_a_failed_first_import_leaves_no_database(
    tmp_path: Path,
) -> None:
    huge = tmp_path / "huge.json"
    with open(huge, "wb") as f:
        f.truncate(17 << 20)
    db = tmp_path / "scan" / "osv.db"
    with pytest.raises(KilnError, match=r"huge\.json: more than 16 MiB: refused"):
        import_advisories(huge, db)
    assert not db.exists()
    with pytest.raises(KilnError, match="no vulnerability database"):
        OsvDatabase(db)


def test_a_file_that_is_not_a_database_is_one_error(tmp_path: Path) -> None:
    db = tmp_path / "osv.db"
    db.write_text("not sqlite")
    with pytest.raises(KilnError, match="not a Kiln vulnerability database"):
        OsvDatabase(db)


def test_the_cli_imports_with_warnings_on_stderr_and_fails_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import kiln.cli.scan_cmd  # noqa: F401  (registers kiln scan until app.run imports it)
    from kiln.cli.app import run

    monkeypatch.setenv("KILN_HOME", str(tmp_path / "home"))
    source = tmp_path / "osv"
    write(source, OPENSSL_DSA, advisory(REQUESTS_GHSA, modified=7))
    assert run(["scan", "db", "import", str(source)]) == 0
    out, err = capsys.readouterr()
    assert "imported 1 advisories (1 skipped)" in out
    assert "GHSA-j8r2-6x86-q33q.json: modified: missing or not an RFC 3339 timestamp" in err
    assert (tmp_path / "home" / "scan" / "osv.db").is_file()
    assert run(["scan", "db", "status"]) == 0
    assert "1 advisories, newest modified 2024-01-10 05:12" in capsys.readouterr().out
    assert run(["scan", "db", "import", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing: No such file or directory" in err
