"""``python -m kiln.agent --home DIR``: what ``kiln agent`` and ``start_background`` run."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from kiln.errors import KilnError
from kiln.paths import kiln_home


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kiln agent")
    parser.add_argument("--home", type=Path, default=None)
    parser.add_argument("--runtime", choices=("local", "docker", "swarm"), default=None)
    parser.add_argument("--runtime-host", default=None)
    parser.add_argument("--runtime-registry", default=None, help="JSON: path, ca, auth_file")
    parser.add_argument("--runtime-nodes", default=None, help="JSON: swarm node -> its engine")
    args = parser.parse_args(argv)
    from kiln.agent.daemon import run_agent
    from kiln.runtime.select import RuntimeChoice

    choice = None
    if args.runtime:
        registry = json.loads(args.runtime_registry) if args.runtime_registry else None
        nodes = json.loads(args.runtime_nodes) if args.runtime_nodes else None
        choice = RuntimeChoice.from_json(
            {"kind": args.runtime, "host": args.runtime_host, "registry": registry, "nodes": nodes}
        )
    try:
        run_agent(args.home or kiln_home(), choice)
    except KilnError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
