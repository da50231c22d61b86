"""A real docker-registry on loopback for tests and benches: started with a config of
the caller's, waited for (over TLS when a CA is given), stopped after."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["REGISTRY_BIN", "serve_registry"]

REGISTRY_BIN = Path("/usr/bin/docker-registry")


def _answers(port: int, context: ssl.SSLContext | None) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as raw:
            if context is not None:
                context.wrap_socket(raw, server_hostname="127.0.0.1").close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def serve_registry(
    root: Path, config: dict[str, Any], port: int, ca_file: Path | None = None
) -> Iterator[Path]:
    """Run docker-registry with ``config`` (listening on 127.0.0.1:``port``) until the
    block ends; yields its log, ``root/registry.log``. A registry that exits or does not
    answer within 20 s is a RuntimeError carrying that log."""
    config_path = root / "config.yml"
    config_path.write_text(json.dumps(config))
    log = root / "registry.log"
    with open(log, "wb") as log_out:
        proc = subprocess.Popen(
            [str(REGISTRY_BIN), "serve", str(config_path)],
            stdout=log_out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "OTEL_TRACES_EXPORTER": "none"},
        )
    try:
        context = ssl.create_default_context(cafile=str(ca_file)) if ca_file else None
        deadline = time.monotonic() + 20
        while not _answers(port, context):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"registry did not start: {log.read_text()}")
            time.sleep(0.1)
        yield log
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
