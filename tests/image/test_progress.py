"""What a bake shows: one line per event in a log, a live table on a terminal."""

from __future__ import annotations

import io

from rich.console import Console

from kiln.image.progress import LiveProgress, PlainProgress


def test_plain_output_is_one_line_per_event_and_no_command_chatter() -> None:
    out = io.StringIO()
    progress = PlainProgress(out)
    progress.image_started("web", 2)
    progress.step_started("web", 0, "from debian:bookworm")
    progress.step_output("web", 0, "building the minimal base debian:bookworm/amd64 …")
    for line in ("I: downloading packages with apt...", "Setting up libssl3:amd64 …"):
        progress.step_status("web", 0, line)  # mmdebstrap's and apt's lines: the log's
    progress.step_finished("web", 0, "from debian:bookworm", False, 12.5, 57_000_000)
    progress.image_failed("web", "interrupted")
    assert out.getvalue().splitlines() == [
        "web: baking (2 steps)",
        "web [0] | building the minimal base debian:bookworm/amd64 …",
        "web [0] from debian:bookworm: built 12.50s 54.4 MiB",
        "web: interrupted",
    ]


def test_the_live_table_shows_a_commands_latest_line_verbatim() -> None:
    """Brackets in a label or a line are text, never markup (apt prints ``[amd64]``)."""
    out = io.StringIO()
    progress = LiveProgress(out)
    progress.step_started("web", 0, "run [ -f /x ] || echo [/dim]")
    progress.step_status("web", 0, "Inst libssl3 (3.0.20-1~deb12u2 Debian:12.15 [amd64])")
    console = Console(file=out, width=160, force_terminal=False, color_system=None)
    console.print(progress._render(), markup=False)  # as Live redraws it under a print
    shown = out.getvalue()
    assert "[0] run [ -f /x ] || echo [/dim]" in shown
    assert "Debian:12.15 [amd64])" in shown
    assert "running" in shown and "[yellow]" not in shown
    progress.image_failed("web", "interrupted")
    out.truncate(0)
    console.print(progress._render())
    assert "interrupted" in out.getvalue()
