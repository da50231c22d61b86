"""Small OSV advisories shaped as osv.dev publishes them (Debian DSA/DLA, GitHub's PyPI
advisories), for the import and scan tests."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

OPENSSL_DSA: dict[str, Any] = {
    "id": "DSA-5532-1",
    "summary": "openssl - security update",
    "details": "Several vulnerabilities were discovered in OpenSSL.",
    "aliases": [],
    "related": ["CVE-2023-5363", "CVE-2023-5678"],
    "modified": "2024-01-10T05:12:33.123456Z",
    "published": "2023-10-24T00:00:00Z",
    "schema_version": "1.6.0",
    "affected": [
        {
            "package": {
                "ecosystem": "Debian:12",
                "name": "openssl",
                "purl": "pkg:deb/debian/openssl?arch=source",
            },
            "ranges": [
                {
                    "type": "ECOSYSTEM",
                    "events": [{"introduced": "0"}, {"fixed": "3.0.11-1~deb12u2"}],
                }
            ],
            "versions": ["3.0.9-1", "3.0.10-1~deb12u1", "3.0.11-1~deb12u1"],
            "database_specific": {"source": "https://security-tracker.debian.org/"},
        },
        {
            "package": {"ecosystem": "Debian:11", "name": "openssl"},
            "ranges": [
                {
                    "type": "ECOSYSTEM",
                    "events": [{"introduced": "0"}, {"fixed": "1.1.1w-0+deb11u1"}],
                }
            ],
        },
    ],
    "references": [{"type": "ADVISORY", "url": "https://www.debian.org/security/2023/dsa-5532"}],
}

REQUESTS_GHSA: dict[str, Any] = {
    "id": "GHSA-j8r2-6x86-q33q",
    "summary": "Unintended leak of Proxy-Authorization header in requests",
    "details": "Requests is a HTTP library...",
    "aliases": ["CVE-2023-32681", "PYSEC-2023-74"],
    "modified": "2024-05-20T17:22:10Z",
    "published": "2023-05-22T20:36:32Z",
    "database_specific": {"severity": "MODERATE", "cwe_ids": ["CWE-200"], "github_reviewed": True},
    "severity": [{"type": "CVSS_V3", "score": "CVSS:3.1/AV:N/AC:H/PR:N/UI:R/S:C/C:H/I:N/A:N"}],
    "affected": [
        {
            "package": {"ecosystem": "PyPI", "name": "requests", "purl": "pkg:pypi/requests"},
            "ranges": [
                {"type": "ECOSYSTEM", "events": [{"introduced": "2.3.0"}, {"fixed": "2.31.0"}]}
            ],
        }
    ],
    "schema_version": "1.6.0",
}

JINJA_LAST_AFFECTED: dict[str, Any] = {
    "id": "PYSEC-2024-9999",
    "summary": "Template sandbox escape in Jinja2",
    "aliases": ["CVE-2024-99999"],
    "modified": "2024-03-01T00:00:00Z",
    "severity": [
        {
            "type": "CVSS_V4",
            "score": "CVSS:4.0/AV:N/AC:L/AT:N/PR:N/UI:N/VC:H/VI:H/VA:H/SC:N/SI:N/SA:N",
        }
    ],
    "affected": [
        {
            "package": {"ecosystem": "PyPI", "name": "Jinja2"},
            "ranges": [
                {
                    "type": "ECOSYSTEM",
                    "events": [{"introduced": "3.0.0"}, {"last_affected": "3.1.2"}],
                }
            ],
        }
    ],
}

WITHDRAWN_ZLIB: dict[str, Any] = {
    "id": "DLA-9999-1",
    "summary": "zlib - withdrawn, published in error",
    "modified": "2024-02-02T00:00:00Z",
    "withdrawn": "2024-02-02T00:00:00Z",
    "affected": [
        {
            "package": {"ecosystem": "Debian:12", "name": "zlib"},
            "ranges": [{"type": "ECOSYSTEM", "events": [{"introduced": "0"}]}],
        }
    ],
}


def advisory(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    out = copy.deepcopy(base)
    out.update(changes)
    return out


def write(directory: Path, *advisories: dict[str, Any]) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for item in advisories:
        path = directory / f"{item.get('id', 'no-id')}.json"
        path.write_text(json.dumps(item, indent=1))
        paths.append(path)
    return paths
