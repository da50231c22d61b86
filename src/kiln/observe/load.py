"""A small closed-loop HTTP load generator: the demo and the benchmarks count with it.

Each worker keeps one keep-alive connection and sends requests back to back;
a request fails when it raises or answers anything but the expected status.
"""

from __future__ import annotations

import http.client
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class LoadReport:
    sent: int = 0
    failed: int = 0
    latencies: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    bodies: dict[str, int] = field(default_factory=dict)

    def percentile(self, p: float) -> float:
        if not self.latencies:
            return 0.0
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]

    def summary(self) -> str:
        return (
            f"{self.sent} requests sent, {self.failed} failed, "
            f"p50 {self.percentile(50) * 1000:.1f} ms, p99 {self.percentile(99) * 1000:.1f} ms"
        )


class LoadGenerator:
    """Start it, do something disruptive, stop it, read the report."""

    def __init__(
        self,
        host: str,
        port: int,
        path: str = "/",
        workers: int = 4,
        expect: int = 200,
        pause: float = 0.0,
        classify: Callable[[str], str] | None = None,
    ) -> None:
        self.host, self.port, self.path = host, port, path
        self.workers, self.expect, self.pause = workers, expect, pause
        self.classify = classify
        self.report = LoadReport()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def _record(self, ok: bool, latency: float, error: str | None, body: str | None) -> None:
        with self._lock:
            self.report.sent += 1
            if ok:
                self.report.latencies.append(latency)
                if body is not None:
                    self.report.bodies[body] = self.report.bodies.get(body, 0) + 1
            else:
                self.report.failed += 1
                key = error or "unknown"
                self.report.errors[key] = self.report.errors.get(key, 0) + 1

    def _work(self) -> None:
        conn: http.client.HTTPConnection | None = None
        while not self._stop.is_set():
            live = conn or http.client.HTTPConnection(self.host, self.port, timeout=10)
            conn = live
            start = time.perf_counter()
            try:
                live.request("GET", self.path)
                resp = live.getresponse()
                data = resp.read()
                ok = resp.status == self.expect
                kind = (
                    self.classify(data.decode(errors="replace")) if ok and self.classify else None
                )
                self._record(ok, time.perf_counter() - start, f"HTTP {resp.status}", kind)
                if resp.will_close:
                    live.close()
                    conn = None
            except (OSError, http.client.HTTPException) as e:
                self._record(False, time.perf_counter() - start, type(e).__name__, None)
                live.close()
                conn = None
                time.sleep(0.01)
            if self.pause:
                time.sleep(self.pause)
        if conn is not None:
            conn.close()

    def start(self) -> LoadGenerator:
        for _ in range(self.workers):
            t = threading.Thread(target=self._work, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> LoadReport:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=15)
        return self.report

    def __enter__(self) -> LoadGenerator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
