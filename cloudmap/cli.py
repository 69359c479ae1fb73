"""The ``cloudmap`` command line: ``cloudmap demo`` runs the demo job on a local pool."""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cloudmap", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="price an option by Monte Carlo on a local pool")
    demo.add_argument("--nodes", type=int, default=min(4, os.cpu_count() or 1))
    demo.add_argument("--slots-per-node", type=int, default=1)
    demo.add_argument("--samples", type=int, default=10_000_000)
    demo.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        run_demo(args.nodes, args.slots_per_node, args.samples, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
