"""kiln.traffic: the data plane behind the ``Router`` boundary.

The engine describes each service as a ``Route`` (listener, backends with
weight and state) and programs a ``Router`` with it; the router that runs
is HAProxy (:mod:`kiln.traffic.haproxy`), fed sockets the agent owns
(:mod:`kiln.traffic.listeners`).
"""

from kiln.traffic.router import BackendCounters, Latency, Router, ServiceCounters
from kiln.traffic.routes import Backend, BackendState, Route, RouteError

__all__ = [
    "Backend",
    "BackendCounters",
    "BackendState",
    "Latency",
    "Route",
    "RouteError",
    "Router",
    "ServiceCounters",
]
