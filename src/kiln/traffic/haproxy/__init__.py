"""HAProxy as Kiln's data plane: :class:`HAProxyRouter` implements ``Router``."""

from kiln.traffic.haproxy.config import RouterSettings
from kiln.traffic.haproxy.router import HAProxyRouter

__all__ = ["HAProxyRouter", "RouterSettings"]
