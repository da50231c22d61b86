"""``python -m kiln.agent --home DIR``: what ``kiln agent`` and ``start_background`` run."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kiln.errors import KilnError
from kiln.paths import kiln_home


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kiln agent")
    parser.add_argument("--home", type=Path, default=None)
    parser.add_argument("--runtime", choices=("local", "docker"), default=None)
    parser.add_argument("--runtime-host", default=None)
    args = parser.parse_args(argv)
    from kiln.agent.daemon import run_agent
    from kiln.runtime.select import RuntimeChoice

    choice = RuntimeChoice(args.runtime, args.runtime_host) if args.runtime else None
    try:
        run_agent(args.home or kiln_home(), choice)
    except KilnError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
