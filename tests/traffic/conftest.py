"""Fixtures for the traffic tests; the helpers live in traffic_harness."""

from traffic_harness import backends, router

__all__ = ["backends", "router"]
