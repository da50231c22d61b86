"""Supply chain: figures for issue 11, one section per function.

Run: ``.venv/bin/python bench/supply.py [--only scan] [--runs 5] [--advisories 40000]``.

* ``scan``: import of a generated OSV ``all.zip`` of ``--advisories`` advisories (three
  quarters Debian:12 over 3,000 source packages, a quarter PyPI over 2,000 projects,
  shaped as osv.dev's), then the match of an image of a few hundred packages (350
  Debian binary packages from 200 source packages, 50 Python distributions) against
  it. The import is one transaction into an empty database; the scan reads the
  database as ``kiln scan`` does (the SBOM itself is given, not read from a store).

Other sections (SBOM, sign and verify, policy) are functions beside ``scan_section``,
added to ``SECTIONS``. On a shared 2-core machine, the ratios matter more than the
absolute figures.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import median_p95, timed

from kiln.supply.osv import OsvDatabase, import_advisories
from kiln.supply.scan import match_components

DEBIAN_SOURCES = 3000
PYPI_PROJECTS = 2000


def row(label: str, samples: list[float], note: str = "") -> None:
    med, p95 = median_p95(samples)
    print(
        f"{label:<44} median {med:7.3f} s  p95 {p95:7.3f} s  (n={len(samples)}) {note}", flush=True
    )


@dataclass(frozen=True)
class Part:
    ecosystem: str
    name: str
    version: str
    source_name: str
    source_version: str
    purl: str


def _debian_advisory(rng: random.Random, number: int) -> dict[str, object]:
    source = f"src{rng.randrange(DEBIAN_SOURCES)}"
    upstream = f"{rng.randrange(1, 5)}.{rng.randrange(10)}.{rng.randrange(10)}"
    fixed = f"{upstream}-{rng.randrange(1, 4)}~deb12u{rng.randrange(1, 3)}"
    return {
        "id": f"DEBIAN-CVE-2024-{number:05d}",
        "aliases": [f"CVE-2024-{number:05d}"],
        "summary": f"{source}: generated advisory",
        "modified": f"2024-05-{1 + number % 28:02d}T00:00:00Z",
        "affected": [
            {
                "package": {"ecosystem": "Debian:12", "name": source},
                "ranges": [
                    {"type": "ECOSYSTEM", "events": [{"introduced": "0"}, {"fixed": fixed}]}
                ],
            }
        ],
    }


def _pypi_advisory(rng: random.Random, number: int) -> dict[str, object]:
    project = f"project-{rng.randrange(PYPI_PROJECTS)}"
    low = rng.randrange(0, 4)
    return {
        "id": f"GHSA-gen-{number:05d}",
        "aliases": [f"CVE-2023-{number:05d}"],
        "summary": f"{project}: generated advisory",
        "modified": f"2024-04-{1 + number % 28:02d}T00:00:00Z",
        "database_specific": {"severity": rng.choice(["LOW", "MODERATE", "HIGH", "CRITICAL"])},
        "severity": [{"type": "CVSS_V3", "score": "CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:N/A:N"}],
        "affected": [
            {
                "package": {"ecosystem": "PyPI", "name": project},
                "ranges": [
                    {
                        "type": "ECOSYSTEM",
                        "events": [{"introduced": f"{low}.0"}, {"fixed": f"{low + 1}.2.0"}],
                    }
                ],
            }
        ],
    }


def generated_zip(path: Path, count: int, seed: int = 11) -> None:
    rng = random.Random(seed)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for number in range(count):
            make = _debian_advisory if number % 4 else _pypi_advisory
            item = make(rng, number)
            zf.writestr(f"{item['id']}.json", json.dumps(item))


def generated_image(seed: int = 5) -> list[Part]:
    rng = random.Random(seed)
    parts = []
    for index in range(350):
        source = f"src{rng.randrange(DEBIAN_SOURCES) if index % 2 else index % 200}"
        version = f"{rng.randrange(1, 5)}.{rng.randrange(10)}.{rng.randrange(10)}-1~deb12u1"
        name = f"lib{source}-{index}"
        purl = f"pkg:deb/debian/{name}@{version}?arch=amd64&distro=bookworm"
        parts.append(Part("debian", name, version, source, version, purl))
    for _ in range(50):
        project = f"project-{rng.randrange(PYPI_PROJECTS)}"
        version = f"{rng.randrange(0, 5)}.{rng.randrange(10)}.0"
        parts.append(
            Part("pypi", project, version, project, version, f"pkg:pypi/{project}@{version}")
        )
    return parts


def scan_section(runs: int, advisories: int) -> None:
    with tempfile.TemporaryDirectory(prefix="kiln-bench-scan-") as tmp:
        archive = Path(tmp) / "all.zip"
        generated_zip(archive, advisories)
        size = archive.stat().st_size / 2**20
        imports = []
        for run in range(runs):
            db = Path(tmp) / f"osv-{run}.db"
            started = time.perf_counter()
            import_advisories(archive, db)
            imports.append(time.perf_counter() - started)
        row(f"import {advisories} advisories ({size:.1f} MiB zip)", imports)
        parts = generated_image()
        findings: list[int] = []

        def scan_once() -> None:
            with OsvDatabase(Path(tmp) / "osv-0.db") as osv:
                findings.append(len(match_components(parts, osv)))

        row(f"scan {len(parts)} packages", timed(scan_once, runs), f"{findings[-1]} findings")


SECTIONS: dict[str, Callable[[argparse.Namespace], None]] = {
    "scan": lambda args: scan_section(args.runs, args.advisories),
}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", action="append", choices=sorted(SECTIONS), help="a section")
    parser.add_argument("--runs", type=int, default=5, help="runs per figure")
    parser.add_argument("--advisories", type=int, default=40_000, help="scan: database size")
    args = parser.parse_args()
    for name in args.only or list(SECTIONS):
        print(f"== {name}", flush=True)
        SECTIONS[name](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
