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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import median_p95, timed

from kiln.image.digest import Descriptor
from kiln.image.store import ImageStore
from kiln.supply.osv import OsvDatabase, import_advisories
from kiln.supply.sbom import Component
from kiln.supply.scan import match_components

DEBIAN_SOURCES = 3000
PYPI_PROJECTS = 2000


def row(label: str, samples: list[float], note: str = "") -> None:
    med, p95 = median_p95(samples)
    print(
        f"{label:<44} median {med:7.3f} s  p95 {p95:7.3f} s  (n={len(samples)}) {note}", flush=True
    )


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


def generated_image(seed: int = 5) -> list[Component]:
    rng = random.Random(seed)
    parts = []
    for index in range(350):
        source = f"src{rng.randrange(DEBIAN_SOURCES) if index % 2 else index % 200}"
        version = f"{rng.randrange(1, 5)}.{rng.randrange(10)}.{rng.randrange(10)}-1~deb12u1"
        name = f"lib{source}-{index}"
        purl = f"pkg:deb/debian/{name}@{version}?arch=amd64&distro=bookworm"
        parts.append(Component("debian", name, version, source, version, purl))
    for _ in range(50):
        project = f"project-{rng.randrange(PYPI_PROJECTS)}"
        version = f"{rng.randrange(0, 5)}.{rng.randrange(10)}.0"
        parts.append(
            Component("pypi", project, version, project, version, f"pkg:pypi/{project}@{version}")
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


def policy_section(runs: int, services: int = 100) -> None:
    """The gate's Rego evaluation for a plan of ``services`` services (the default bundle
    and one user file, in the bounded child process); evidence is given, not collected."""
    from kiln.policy.gate import Module, default_modules, evaluate

    user = Module(
        "policy/team.rego",
        "package team\n\ndeny contains msg if {\n  input.spec.replicas > 50\n"
        '  msg := sprintf("%s: too many replicas", [input.service])\n}\n',
        "team",
        False,
    )
    finding = {"id": "CVE-1", "package": "openssl", "installed": "3.0.1", "fixed": "3.0.2"}
    inputs = {
        f"svc{n}": {
            "service": f"svc{n}",
            "image": {
                "ref": "app",
                "digest": "sha256:" + "a" * 64,
                "pinned": True,
                "base": "debian:bookworm",
                "age_seconds": 3600.0,
                "user": "1000",
            },
            "signature": {"signed": True, "signers": ["k"], "errors": []},
            "scan": {"status": "ok", "findings": [{**finding, "severity": "HIGH"}] * 20},
            "secrets": {"found": False},
            "spec": {"replicas": 3, "health": {"http": "/healthz"}},
            "settings": {
                "keys": ["k.pub"],
                "sources": ["debian:*"],
                "max_image_age": "30d",
                "max_image_age_seconds": 2592000.0,
            },
        }
        for n in range(services)
    }
    modules = [*default_modules(), user]
    outcome: list[int] = []

    def gate_once() -> None:
        outcome.append(len(evaluate(modules, inputs, enforce=True).verdicts))

    row(
        f"policy gate, plan of {services} services",
        timed(gate_once, runs),
        f"{outcome[-1] if outcome else 0} verdicts",
    )


def evidence_section(runs: int) -> None:
    """What the evidence costs a bake of examples/shop: a bake in a fresh home (the
    machine's shared Debian base, and the SBOM parts kept beside it, warm), a cached
    re-bake; then the SBOM with every layer read and as a fresh home makes it, the
    secret scan and the provenance, their sum (what the evidence adds to a fresh-home
    bake; the issue's target is under 1 s), then sign and verify."""
    import os
    import shutil
    import subprocess

    from kiln.supply.signing import generate_key, sign_image, verify_image

    repo = Path(__file__).resolve().parents[1]
    kiln = str(Path(sys.executable).parent / "kiln")
    work = Path(tempfile.mkdtemp(prefix="kiln-evidence-"))
    shutil.copytree(
        repo / "examples" / "shop", work / "shop", ignore=shutil.ignore_patterns("kiln.lock")
    )

    def bake(home: Path) -> tuple[float, str]:
        env = dict(os.environ, KILN_HOME=str(home))
        start = time.perf_counter()
        out = subprocess.run(
            [kiln, "bake", str(work / "shop")], env=env, text=True, capture_output=True
        )
        took = time.perf_counter() - start
        if out.returncode != 0:
            raise SystemExit(f"kiln bake failed: {out.stderr[-2000:]}")
        return took, out.stdout.strip().rpartition("@")[2]

    try:
        bake(work / "warm")  # the shared base and apt cache, and kiln.lock, once
        fresh, cached, digests = [], [], []
        for run in range(runs):
            home = work / f"home-{run}"
            took, digest = bake(home)
            fresh.append(took)
            digests.append(digest)
            cached.append(bake(home)[0])
        row("bake, fresh home, with evidence", fresh)
        row("re-bake, nothing changed", cached)
        home = work / "home-0"
        store = ImageStore(home / "images")
        referrers = store.referrers(digests[0])
        print(f"  referrers attached by the bake: {sorted(d.artifact_type for d in referrers)}")
        from kiln.supply.sbom import build_sbom, read_contents
        from kiln.supply.secrets_scan import scan_layers

        manifest = store.read_json(digests[0])
        layers = [Descriptor.from_json(d) for d in manifest["layers"]]
        caches = work / "caches"

        def cold(action: Callable[[Path], object]) -> list[float]:
            out = []
            for _ in range(runs):
                shutil.rmtree(caches, ignore_errors=True)
                start = time.perf_counter()
                action(caches)
                out.append(time.perf_counter() - start)
            return out

        row(
            "SBOM contents, every layer read (no cache)",
            cold(lambda c: read_contents(store, digests[0], c, shared=False)),
        )
        sbom_every = cold(lambda c: build_sbom(store, digests[0], c, shared=False))
        row("SBOM document, every layer read (no cache)", sbom_every)
        sbom_fresh = cold(lambda c: build_sbom(store, digests[0], c))
        row("SBOM document, fresh home (shared parts)", sbom_fresh)
        row(
            "SBOM document from warm layer results",
            timed(lambda: build_sbom(store, digests[0], caches), runs),
        )
        added = layers[-1:]
        secrets = cold(lambda c: scan_layers(store, added, [], c))
        row("secret scan of the recipe's own layer (cold)", secrets)
        provenance = timed(lambda: _provenance_once(store, digests[0], work / "shop"), runs)
        row("provenance statement + DSSE envelope", provenance)
        added_cost = [
            median_p95(sbom_fresh)[0] + median_p95(secrets)[0] + median_p95(provenance)[0]
        ]
        row("evidence a fresh-home bake adds (sum)", added_cost, "target < 1 s")
        key, pub = generate_key(work / "release")
        row(
            "sign (ECDSA P-256: digest + provenance)",
            timed(lambda: sign_image(store, digests[0], key), 1),
        )
        row(
            "verify (signature, provenance, every blob)",
            timed(lambda: verify_image(store, digests[0], [pub]), runs),
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _provenance_once(store: ImageStore, digest: str, project: Path) -> None:
    """What ``ensure_provenance`` does for a bake, without attaching the referrer."""
    from kiln.supply.provenance import (
        IN_TOTO_PAYLOAD_TYPE,
        BakeFacts,
        envelope_json,
        statement,
        statement_payload,
    )

    manifest = store.read_json(digest)
    facts = BakeFacts(
        image="web",
        recipe={"from": "debian:bookworm"},
        environment=None,
        base="debian:bookworm",
        base_digest=None,
        base_layers=tuple(Descriptor.from_json(d) for d in manifest["layers"][:2]),
        lock_file=project / "kiln.lock",
        commit=None,
        clean=False,
        remote=None,
        epoch=0,
        started=time.time(),
    )
    envelope_json(statement_payload(statement(digest, facts, time.time())), IN_TOTO_PAYLOAD_TYPE)


SECTIONS: dict[str, Callable[[argparse.Namespace], None]] = {
    "evidence": lambda args: evidence_section(args.runs),
    "scan": lambda args: scan_section(args.runs, args.advisories),
    "policy": lambda args: policy_section(args.runs),
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
