"""Bake benchmark of the example (`examples/shop`: debian:bookworm + python3-minimal + app).

First bakes in a fresh KILN_HOME, each a median over several runs:

* warm shared base, with the example's kiln.lock: what every new home, and every
  new checkout of a locked project, pays;
* warm shared base, no kiln.lock: a newcomer's first bake (apt resolves the packages);
* shared base off (KILN_BASE_CACHE=off): every bake runs mmdebstrap, as every
  new home did before the base was shared;
* empty shared base cache: the machine's very first bake (builds and keeps the base).

Then a cached re-bake, a re-bake after an app edit and `kiln --version`. The
peer is `docker build` of the equivalent Dockerfile FROM a real, local
`debian:bookworm` (from the host's Docker engine, or `--debian-image` a `docker
save` archive of it), in a private engine; without one the peer does not run.

Run: .venv/bin/python bench/bake.py [--runs N] [--debian-image debian-bookworm.tar]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import docker, median_p95, private_dockerd, timed

REPO = Path(__file__).resolve().parents[1]
KILN = str(Path(sys.executable).parent / "kiln")

DOCKERFILE = """\
FROM debian:bookworm
RUN apt-get update && apt-get install -y --no-install-recommends python3-minimal \\
 && rm -rf /var/lib/apt/lists/*
COPY app/ /srv/app
RUN python3 -m compileall -q /srv/app
ENV PYTHONUNBUFFERED=1
USER 65534:65534
WORKDIR /srv/app
CMD ["python3", "server.py"]
"""


def kiln(home: Path, *args: str, **env: str) -> str:
    full = dict(os.environ, KILN_HOME=str(home), **env)
    out = subprocess.run([KILN, *args], env=full, text=True, capture_output=True)
    if out.returncode != 0:
        raise SystemExit(f"kiln {' '.join(args)} failed:\n{out.stderr}")
    return out.stdout.strip()


def row(label: str, samples: list[float], peer: list[float] | None = None) -> None:
    med, p95 = median_p95(samples)
    text = f"{label:<52} median {med:7.2f} s   p95 {p95:7.2f} s   (n={len(samples)})"
    if peer:
        text += f"   ratio kiln/docker {med / median_p95(peer)[0]:.2f}"
    print(text, flush=True)


def local_debian(archive: Path | None) -> Path | None:
    """A `docker save` archive of a real debian:bookworm: the given one, or one saved from
    the host's engine; None when neither exists (no registry access here)."""
    if archive is not None:
        return archive if archive.is_file() else None
    if shutil.which("docker") is None:
        return None
    probe = subprocess.run(
        ["docker", "image", "inspect", "debian:bookworm"], capture_output=True, timeout=20
    )
    if probe.returncode != 0:
        return None
    saved = Path(tempfile.mkdtemp(prefix="kiln-bench-debian-")) / "debian.tar"
    done = subprocess.run(["docker", "save", "-o", str(saved), "debian:bookworm"], timeout=300)
    return saved if done.returncode == 0 else None


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3, help="runs per first-bake figure")
    parser.add_argument("--debian-image", type=Path, help="docker save archive of debian:bookworm")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kiln-bench-bake-"))
    try:
        project = work / "shop"
        shutil.copytree(REPO / "examples" / "shop", project)
        bases = work / "bases"
        caches = {"KILN_BASE_CACHE": str(bases)}
        warm = work / "home-warm"
        print(f"example: {project}; shared bases: {bases}", flush=True)
        digest = kiln(warm, "bake", str(project), **caches)  # builds the base, writes kiln.lock
        print(f"baked {digest} (the shared base is now warm)", flush=True)
        lock = (project / "kiln.lock").read_text()

        homes = iter(range(10_000))

        def fresh_home() -> Path:
            return work / f"home-{next(homes)}"

        def first_bake(**env: str) -> Callable[[], None]:
            def run() -> None:
                assert kiln(fresh_home(), "bake", str(project), **env) == digest

            return run

        def unlocked_first_bake() -> None:
            (project / "kiln.lock").unlink()
            try:
                assert kiln(fresh_home(), "bake", str(project), **caches) == digest
            finally:
                (project / "kiln.lock").write_text(lock)

        def empty_cache_first_bake() -> None:
            empty = {"KILN_BASE_CACHE": str(work / f"bases-{next(homes)}")}
            assert kiln(fresh_home(), "bake", str(project), **empty) == digest

        warm_first = timed(first_bake(**caches), args.runs * 2)
        newcomer = timed(unlocked_first_bake, args.runs * 2)
        base_off = timed(first_bake(KILN_BASE_CACHE="off"), args.runs)
        base_cold = timed(empty_cache_first_bake, args.runs)
        cached = timed(lambda: kiln(warm, "bake", str(project), **caches), args.runs * 4)
        version = timed(lambda: subprocess.run([KILN, "--version"], capture_output=True), 20)
        server = project / "app" / "server.py"
        edits = iter(range(10_000))

        def edit_app() -> None:
            with server.open("a") as f:
                f.write(f"# edit {next(edits)}\n")

        def kiln_after_edit() -> None:
            edit_app()
            kiln(warm, "bake", str(project), **caches)

        app_edit = timed(kiln_after_edit, args.runs * 2)

        docker_cold: list[float] | None = None
        docker_cached: list[float] | None = None
        docker_edit: list[float] | None = None
        archive = local_debian(args.debian_image)
        if archive is None:
            print(
                "docker: no local debian:bookworm (no engine with it, no --debian-image; the "
                "registry is unreachable here): no peer figures",
                flush=True,
            )
        else:
            with private_dockerd() as host:
                if host is None:
                    print("docker: no engine could start here; no peer figures", flush=True)
                else:
                    docker(host, "load", "-i", str(archive))
                    (project / "Dockerfile").write_text(DOCKERFILE)
                    build = ["build", "--network=host", "-q", "-t", "shop-web", str(project)]
                    docker(host, *build)  # warm apt on the host side as kiln's caches are warm
                    docker_cold = timed(
                        lambda: docker(host, *build[:1], "--no-cache", *build[1:]), args.runs
                    )
                    docker_cached = timed(lambda: docker(host, *build), args.runs * 4)

                    def docker_after_edit() -> None:
                        edit_app()
                        docker(host, *build)

                    docker_edit = timed(docker_after_edit, args.runs * 2)

        print("\nkiln bake of examples/shop (debian:bookworm + python3-minimal + app)")
        row("first bake, fresh home, warm shared base, kiln.lock", warm_first, docker_cold)
        row("first bake, fresh home, warm shared base, no lock", newcomer, docker_cold)
        row("first bake, fresh home, shared base off (mmdebstrap)", base_off, docker_cold)
        row("first bake, empty shared base cache (builds it)", base_cold)
        row("cached re-bake (unchanged tree)", cached, docker_cached)
        row("re-bake after an app edit", app_edit, docker_edit)
        row("kiln --version", version)
        if docker_cold and docker_cached:
            row("docker build --no-cache FROM debian:bookworm", docker_cold)
            row("docker build (cached)", docker_cached)
            row("docker build after an app edit", docker_edit or [])
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
