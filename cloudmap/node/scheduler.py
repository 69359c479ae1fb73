"""The pool's Dask scheduler on a pool node, for clients outside the pool's network.

``python -m cloudmap.node.scheduler PORT DIRECTORY``, started by the start task of the one
node that hosts it (Azure's ``scheduler="node"``, decision 0008). It listens at PORT on the
node's own address (every interface on a real VM), TLS only, with the pool's certificate
(TLS_DIR_VARIABLE); the client reaches it through Batch's inbound NAT endpoint, the slots
of the other nodes over the pool's network. Once it listens it writes ``scheduler.json``
(its address) into DIRECTORY, which tells the start task the node is up. cloudmap's part
of it (cloudmap.scheduler_plugin) arrives from the client as a registered plugin.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from .slot import node_host, security

#: The file the scheduler writes once it listens: {"address": ...}.
READY_FILE = "scheduler.json"


async def serve(port: int, directory: Path) -> None:
    import dask
    from distributed import Scheduler

    from ..dask_config import LOW_OVERHEAD, SCHEDULER_OPTIONS

    dask.config.set(LOW_OVERHEAD)
    host = node_host()
    async with Scheduler(
        host=host,
        port=port,
        protocol="tls",
        security=security("scheduler"),
        # Its HTTP server (health routes, no TLS) stays on the node's own address.
        dashboard_address=f"{host or '127.0.0.1'}:0",
        **SCHEDULER_OPTIONS,
    ) as scheduler:
        ready = directory / READY_FILE
        ready.with_suffix(".part").write_text(json.dumps({"address": scheduler.address}))
        ready.with_suffix(".part").replace(ready)
        await scheduler.finished()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1]), Path(sys.argv[2])))
