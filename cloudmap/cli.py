"""The ``cloudmap`` command line (also ``python -m cloudmap``).

- ``demo``: price an option by Monte Carlo on a local pool (what ``make demo`` runs);
- ``plan``: print, as JSON, what a pool would ask its provider for, spending nothing;
- ``pools list`` / ``pools delete``: find and remove Azure Batch pools cloudmap made.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cloudmap", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="price an option by Monte Carlo on a local pool")
    demo.add_argument("--nodes", type=int, default=min(4, os.cpu_count() or 1))
    demo.add_argument("--slots-per-node", type=int, default=1)
    demo.add_argument("--samples", type=int, default=10_000_000)
    demo.add_argument("--seed", type=int, default=7)

    plan = commands.add_parser("plan", help="print the requests a pool would send, as JSON")
    plan.add_argument("--provider", default="local")
    plan.add_argument("--nodes", type=int, default=None)
    plan.add_argument("--spot-nodes", type=int, default=0)
    plan.add_argument("--slots-per-node", type=int, default=1)
    plan.add_argument("--vm-size", default=None)
    plan.add_argument("--account-url", default=None)
    plan.add_argument("--pool-id", default=None)
    plan.add_argument("--start-task", default=None, help="a shell command run on each node")
    plan.add_argument("--package", action="append", default=[], help="pip requirement")
    plan.add_argument("--subnet-id", default=None, help="azure: the nodes' subnet")
    plan.add_argument(
        "--scheduler", choices=("node", "client"), default=None, help="azure: where it runs"
    )
    plan.add_argument(
        "--allow-from", action="append", default=None, help="azure: a CIDR that may connect"
    )
    plan.add_argument("--staging-url", default=None, help="azure: where to ship cloudmap")

    pools = commands.add_parser("pools", help="Azure Batch pools made by cloudmap")
    pool_commands = pools.add_subparsers(dest="pools_command", required=True)
    listing = pool_commands.add_parser("list", help="list pools made by cloudmap")
    listing.add_argument("--account-url", default=None)
    listing.add_argument("--all", action="store_true", help="every pool of the account")
    delete = pool_commands.add_parser("delete", help="delete pools made by cloudmap")
    delete.add_argument("pool_ids", nargs="*")
    delete.add_argument("--account-url", default=None)
    delete.add_argument("--all", action="store_true", help="every pool cloudmap made")
    delete.add_argument("--force", action="store_true", help="also pools cloudmap did not make")

    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            from .demo import run_demo

            run_demo(args.nodes, args.slots_per_node, args.samples, args.seed)
        elif args.command == "plan":
            print(json.dumps(_plan(args), indent=2))
        elif args.command == "pools":
            _pools(args)
    except Exception as exc:  # the message is the point; a traceback would bury it
        from .errors import CloudmapError

        if not isinstance(exc, (CloudmapError, ImportError)):
            raise
        print(f"cloudmap {args.command}: {exc}", file=sys.stderr)
        return 2
    return 0


def _plan(args: argparse.Namespace) -> dict[str, Any]:
    from .pool import Pool

    options: dict[str, Any] = {}
    for name in (
        "vm_size",
        "account_url",
        "pool_id",
        "subnet_id",
        "scheduler",
        "allow_from",
        "staging_url",
    ):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    return Pool.plan(
        args.provider,
        nodes=args.nodes,
        spot_nodes=args.spot_nodes,
        slots_per_node=args.slots_per_node,
        start_task=args.start_task,
        packages=args.package,
        **options,
    )


def _pools(args: argparse.Namespace) -> None:
    from .providers.azure.leftovers import client_for, delete_pools, list_pools

    client = client_for(args.account_url)
    if args.pools_command == "list":
        for record in list_pools(client, everything=args.all):
            print(json.dumps(dataclasses.asdict(record)))
        return
    ids = list(args.pool_ids)
    if args.all:
        ids += [record.id for record in list_pools(client) if record.id not in ids]
    if not ids:
        print("cloudmap pools delete: no pool to delete", file=sys.stderr)
        return
    for pool_id in delete_pools(client, ids, force=args.force):
        print(f"deleted {pool_id}")


if __name__ == "__main__":
    sys.exit(main())
