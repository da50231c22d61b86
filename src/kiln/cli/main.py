"""The ``kiln`` command: thin commands, each calling one function of a layer.

Imports are lazy on purpose: ``kiln --version`` must not pay for pydantic,
FastAPI or the image code.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args in (["--version"], ["-V"], ["version"]):
        from kiln import __version__

        print(f"kiln {__version__}")
        return 0
    from kiln.cli.app import run

    return run(args)


if __name__ == "__main__":
    sys.exit(main())
