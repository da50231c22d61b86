"""Kiln's data plane on every node of a runtime that has nodes (Swarm): the agent bakes
the edge image, gives the edges an edge token and its CA, and asks the runtime to run
them. The edges then pull their routes from this agent's network API, and post their
counters while a canary is judged.

The edge's token is the one token the home keeps in the clear (``edge-token``, 0600):
an edge service that got a new token at every agent restart would be rolled out again
each time. Its role is ``edge``: it reads the routes and posts counters, nothing else
(not even status). An edge token kept from an older agent with the viewer role is
revoked and replaced, which changes the edge service's fingerprint, so the edges roll
onto the new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from kiln.errors import KilnError
from kiln.paths import write_private
from kiln.runtime import EdgeHost

if TYPE_CHECKING:
    from kiln.agent.engine import Engine
    from kiln.agent.tls import Listen

__all__ = ["EDGE_TOKEN_FILE", "RETRY", "EdgeDeployment"]

log = logging.getLogger("kiln.agent")

EDGE_TOKEN_FILE = "edge-token"
EDGE_TOKEN_NAME = "swarm edge"
RETRY = 30.0


class EdgeDeployment:
    """Runs once per agent start; a failure is an event and a retry, never a crash."""

    def __init__(self, engine: Engine, runtime: EdgeHost, listen: Listen | None) -> None:
        self.engine = engine
        self.runtime = runtime
        self.listen = listen
        self.home: Path = engine.home

    async def run(self) -> None:
        while True:
            try:
                changed = await asyncio.to_thread(self.ensure)
            except KilnError as e:
                self.engine.emit(
                    "edge.failed", f"edge proxies not deployed: {e}; retrying in {RETRY:.0f}s"
                )
                await asyncio.sleep(RETRY)
                continue
            message = "edge proxies deployed" if changed else "edge proxies already up to date"
            self.engine.emit("edge.ready", f"{message}; they watch {self.url()}")
            return

    def url(self) -> str:
        return self.listen.describe() if self.listen is not None else ""

    def ensure(self) -> bool:
        listen = self.listen
        if listen is None:
            raise KilnError(
                "the edges pull their routes from the agent's network API: run the agent "
                "with --listen ADDRESS:PORT, an address every node reaches"
            )
        with contextlib.suppress(ValueError):
            if ipaddress.ip_address(listen.host).is_unspecified:
                raise KilnError(
                    f"--listen {listen.host} is every address, so it names none for the "
                    "edges: listen on the address the nodes reach"
                )
        if listen.ca is None:
            raise KilnError(
                "the edges trust Kiln's own CA, and this agent presents an operator's "
                "certificate (--tls-cert): drop --tls-cert/--tls-key to use Kiln's"
            )
        from kiln.traffic.edge_image import bake_edge_image

        digest = bake_edge_image(self.home)
        return self.runtime.ensure_edge(digest, self.url(), self.token(), listen.ca.read_bytes())

    def token(self) -> bytes:
        """The edges' token: the kept one while it is live and of the edge role, else a
        new one (the old one revoked)."""
        from kiln.agent.tokens import EDGE_ROLE, TokenStore

        tokens = TokenStore(self.home)
        path = self.home / EDGE_TOKEN_FILE
        with contextlib.suppress(FileNotFoundError):
            kept = path.read_text().strip()
            record = tokens.check(kept)
            if record is not None and record.role == EDGE_ROLE:
                return kept.encode()
            old = tokens.lookup(kept)
            if old is not None and old.revoked is None:
                tokens.revoke(old.id)
        _, raw = tokens.create(EDGE_ROLE, EDGE_TOKEN_NAME, None)
        write_private(path, raw.encode())
        return raw.encode()
