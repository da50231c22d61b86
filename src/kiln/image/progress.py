"""Where a bake reports what it does: the bake executor itself prints nothing.

:class:`BakeProgress` is the one boundary. The CLI picks :class:`LiveProgress`
(a rich live table) on a terminal and :class:`PlainProgress` (one line per
event, fit for CI logs) otherwise; library callers and tests pass
:class:`SilentProgress` or record the calls.

Every method may be called from several bake threads at once; the
implementations here serialise their output with a lock.
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TextIO

if TYPE_CHECKING:
    from rich.live import Live


class BakeProgress(Protocol):
    """Events of a bake, in order per image; images may interleave.

    ``image_started`` once per image with its number of steps (the base counts
    as step 0); then per step ``step_started``, any number of ``step_output``
    lines (a run step's output; what a Debian base does, one line per phase)
    and ``step_status`` texts (what a long build command is doing now: its
    latest output line, which goes to a log file, not to ``step_output``), and
    ``step_finished`` with whether the layer came from the cache, the seconds
    spent and the layer size in bytes (``None`` when the step made no layer,
    the sum of both layers for a Debian base). Finally ``image_finished`` with
    the manifest digest, or ``image_failed`` with the error message
    (``"interrupted"`` after Ctrl-C).
    """

    def image_started(self, image: str, steps: int) -> None: ...
    def step_started(self, image: str, index: int, label: str) -> None: ...
    def step_output(self, image: str, index: int, line: str) -> None: ...
    def step_status(self, image: str, index: int, text: str) -> None: ...
    def step_finished(
        self, image: str, index: int, label: str, cached: bool, seconds: float, size: int | None
    ) -> None: ...
    def image_finished(self, image: str, digest: str, seconds: float) -> None: ...
    def image_failed(self, image: str, message: str) -> None: ...


def human_size(size: int | None) -> str:
    if size is None:
        return "-"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


class SilentProgress:
    def image_started(self, image: str, steps: int) -> None:
        pass

    def step_started(self, image: str, index: int, label: str) -> None:
        pass

    def step_output(self, image: str, index: int, line: str) -> None:
        pass

    def step_status(self, image: str, index: int, text: str) -> None:
        pass

    def step_finished(
        self, image: str, index: int, label: str, cached: bool, seconds: float, size: int | None
    ) -> None:
        pass

    def image_finished(self, image: str, digest: str, seconds: float) -> None:
        pass

    def image_failed(self, image: str, message: str) -> None:
        pass


class PlainProgress:
    """One line per event on ``stream`` (stderr by default): what CI logs want."""

    def __init__(self, stream: TextIO | None = None, *, show_output: bool = True) -> None:
        self.stream = stream or sys.stderr
        self.show_output = show_output
        self._lock = threading.Lock()

    def _line(self, text: str) -> None:
        with self._lock:
            self.stream.write(text + "\n")
            self.stream.flush()

    def image_started(self, image: str, steps: int) -> None:
        self._line(f"{image}: baking ({steps} steps)")

    def step_started(self, image: str, index: int, label: str) -> None:
        pass

    def step_output(self, image: str, index: int, line: str) -> None:
        if self.show_output:
            self._line(f"{image} [{index}] | {line}")

    def step_status(self, image: str, index: int, text: str) -> None:
        pass  # one line per event: a command's own lines are in its log

    def step_finished(
        self, image: str, index: int, label: str, cached: bool, seconds: float, size: int | None
    ) -> None:
        state = "cached" if cached else "built"
        self._line(f"{image} [{index}] {label}: {state} {seconds:.2f}s {human_size(size)}")

    def image_finished(self, image: str, digest: str, seconds: float) -> None:
        self._line(f"{image}: {digest} in {seconds:.2f}s")

    def image_failed(self, image: str, message: str) -> None:
        if message == "interrupted":
            self._line(f"{image}: interrupted")
        else:
            self._line(f"{image}: failed: {message.splitlines()[0] if message else ''}")


@dataclass
class _Row:
    image: str
    index: int
    label: str
    state: str = "running"
    seconds: float | None = None
    size: int | None = None
    last_line: str = ""


@dataclass
class _Board:
    rows: list[_Row] = field(default_factory=list)

    def row(self, image: str, index: int) -> _Row | None:
        for row in reversed(self.rows):
            if row.image == image and row.index == index:
                return row
        return None


class LiveProgress:
    """A rich live table on a terminal: one row per step, output lines scroll above it."""

    def __init__(self, stream: TextIO | None = None) -> None:
        from rich.console import Console
        from rich.live import Live

        self.console = Console(file=stream or sys.stderr)
        self._board = _Board()
        self._lock = threading.RLock()
        self._live: Live = Live(
            self._render(), console=self.console, refresh_per_second=8, transient=False
        )

    def __enter__(self) -> LiveProgress:
        self._live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._live.update(self._render(), refresh=True)
        self._live.stop()

    def _render(self) -> Any:
        """The table, its cells as ``Text`` (never markup): a step's label or a command's
        line may hold brackets (``[amd64]``), and a line printed above the live table
        renders it with markup off."""
        from rich.table import Table
        from rich.text import Text

        table = Table(box=None, show_header=False, pad_edge=False)
        for column in ("image", "step", "state", "time", "size"):
            table.add_column(column, no_wrap=column != "step")
        styles = {
            "cached": "green",
            "built": "cyan",
            "running": "yellow",
            "failed": "red",
            "interrupted": "red",
        }
        for row in self._board.rows:
            time = "" if row.seconds is None else f"{row.seconds:.2f}s"
            step = Text(f"[{row.index}] {row.label}")
            if row.state == "running" and row.last_line:
                step.append(f"  {row.last_line[-60:]}", style="dim")
            table.add_row(
                Text(row.image),
                step,
                Text(row.state, style=styles.get(row.state, "white")),
                Text(time),
                Text(human_size(row.size) if row.state != "running" else ""),
            )
        return table

    def _refresh(self) -> None:
        self._live.update(self._render())

    def image_started(self, image: str, steps: int) -> None:
        pass

    def step_started(self, image: str, index: int, label: str) -> None:
        with self._lock:
            self._board.rows.append(_Row(image, index, label))
            self._refresh()

    def step_output(self, image: str, index: int, line: str) -> None:
        with self._lock:
            row = self._board.row(image, index)
            if row is not None:
                row.last_line = line
            self.console.print(
                f"{image} [{index}] | {line}", markup=False, highlight=False, style="dim"
            )
            self._refresh()

    def step_status(self, image: str, index: int, text: str) -> None:
        with self._lock:
            row = self._board.row(image, index)
            if row is not None and text.strip():
                row.last_line = text
                self._refresh()

    def step_finished(
        self, image: str, index: int, label: str, cached: bool, seconds: float, size: int | None
    ) -> None:
        with self._lock:
            row = self._board.row(image, index)
            if row is None:
                row = _Row(image, index, label)
                self._board.rows.append(row)
            row.state = "cached" if cached else "built"
            row.seconds, row.size = seconds, size
            self._refresh()

    def image_finished(self, image: str, digest: str, seconds: float) -> None:
        pass

    def image_failed(self, image: str, message: str) -> None:
        state = "interrupted" if message == "interrupted" else "failed"
        with self._lock:
            for row in self._board.rows:
                if row.image == image and row.state == "running":
                    row.state = state
            self._refresh()
