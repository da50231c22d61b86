"""HAProxy's runtime API (the stats socket): one command per connection."""

from __future__ import annotations

import csv
import socket
from dataclasses import dataclass
from pathlib import Path

from kiln.errors import KilnError

__all__ = ["RuntimeAPI", "ServerState"]

MAX_ANSWER = 64 << 20

# srv_admin_state bits (HAProxy's SRV_ADMF_*)
_MAINT = 0x01 | 0x02 | 0x04 | 0x20 | 0x40
_DRAIN = 0x08 | 0x10


@dataclass(frozen=True)
class ServerState:
    name: str
    address: str
    weight: int
    state: str


class RuntimeAPI:
    def __init__(self, path: Path, timeout: float = 5.0, prefix: str = "") -> None:
        self.path = path
        self.timeout = timeout
        self.prefix = prefix
        """Kiln's own routing prefix on a master CLI (``@1 ``), never a caller's."""

    def command(self, line: str, timeout: float | None = None) -> str:
        if "\n" in line or ";" in line:
            raise KilnError(f"refusing a runtime API command with a separator: {line!r}")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(self.timeout if timeout is None else timeout)
                s.connect(str(self.path))
                s.sendall(self.prefix.encode() + line.encode() + b"\n")
                s.shutdown(socket.SHUT_WR)
                chunks = []
                size = 0
                while True:
                    piece = s.recv(65536)
                    if not piece:
                        break
                    size += len(piece)
                    if size > MAX_ANSWER:
                        raise KilnError(f"haproxy runtime API: answer to {line!r} too large")
                    chunks.append(piece)
        except OSError as e:
            raise KilnError(f"haproxy runtime API {self.path}: {line!r}: {e}") from e
        return b"".join(chunks).decode(errors="replace")

    def expect(self, line: str, *ok: str) -> None:
        """Run ``line``; its answer must be empty or start with one of ``ok``."""
        answer = self.command(line).strip()
        if answer and not any(answer.startswith(o) for o in ok):
            raise KilnError(f"haproxy: {line}: {answer.splitlines()[0]}")

    def stat(self) -> list[dict[str, str]]:
        text = self.command("show stat")
        lines = text.splitlines()
        if not lines or not lines[0].startswith("# "):
            raise KilnError(f"haproxy: show stat: unexpected answer {text[:80]!r}")
        lines[0] = lines[0][2:]
        return [dict(row) for row in csv.DictReader(line for line in lines if line)]

    def servers(self, backend: str) -> list[ServerState]:
        text = self.command(f"show servers state {backend}")
        out = []
        for line in text.splitlines():
            parts = line.split()
            if len(parts) < 19 or line.startswith("#") or parts[1] != backend:
                continue
            admin = int(parts[6])
            state = "maintenance" if admin & _MAINT else "draining" if admin & _DRAIN else "ready"
            address = parts[4]
            if ":" in address:
                address = f"[{address}]"
            out.append(ServerState(parts[3], f"{address}:{parts[18]}", int(parts[7]), state))
        return out
