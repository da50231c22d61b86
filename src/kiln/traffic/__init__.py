"""kiln.traffic — the data plane: a proxy per service, routing only to ready
backends, with weights and connection draining, in its own process.

The agent drives it through ``ProxyClient``; ``proxy_command`` is how the
agent starts it.
"""

from kiln.traffic._routes import Backend, Route, RouteError
from kiln.traffic.client import ProxyClient, proxy_command

__all__ = ["Backend", "ProxyClient", "Route", "RouteError", "proxy_command"]
