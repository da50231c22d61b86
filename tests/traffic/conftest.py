"""Fixtures for the traffic tests; the helpers live in traffic_harness."""

from traffic_harness import backends, proxy

__all__ = ["backends", "proxy"]
