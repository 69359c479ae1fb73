"""One slot: a Dask worker process with one thread, named by node and slot.

``python -m cloudmap.node.slot SCHEDULER NAME DIRECTORY``. One thread per process means a
task that overruns its timeout can be stopped by ending this process, and pure-Python
tasks on different slots never share a GIL.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from .layout import JOINED_MARKER

if TYPE_CHECKING:
    from distributed import Security

#: Where the agent put the pool's certificates when the scheduler speaks TLS only.
TLS_DIR_VARIABLE = "CLOUDMAP_TLS_DIR"
#: The one address this node's processes listen on, when the machine has several and only
#: one is the node's (the Batch emulator gives each node a loopback address of its own).
#: Unset on a real VM and locally: Dask then listens on every interface and tells the
#: scheduler the machine's own address.
NODE_HOST_VARIABLE = "CLOUDMAP_NODE_HOST"


def node_host() -> str | None:
    """The node's own address, if it was given one (NODE_HOST_VARIABLE)."""
    return os.environ.get(NODE_HOST_VARIABLE) or None


def write_certificates(root: Path, tls: dict[str, str]) -> Path:
    """Write the pool's certificate files (PEM texts ``ca``, ``cert``, ``key``) under
    ``root``, readable by the node's user only; return their directory."""
    directory = root / "tls"
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    for name in ("ca", "cert", "key"):
        path = directory / f"{name}.pem"
        path.touch(mode=0o600)
        path.write_text(tls[name])
    return directory


def security(role: str = "worker") -> Security | None:
    """The ``distributed.Security`` of a node process in ``role`` (worker, scheduler): the
    pool's certificates (TLS_DIR_VARIABLE), or None without TLS."""
    directory = os.environ.get(TLS_DIR_VARIABLE)
    if not directory:
        return None
    from distributed import Security

    return Security(
        tls_ca_file=os.path.join(directory, "ca.pem"),
        require_encryption=True,
        **{
            f"tls_{role}_cert": os.path.join(directory, "cert.pem"),
            f"tls_{role}_key": os.path.join(directory, "key.pem"),
        },
    )


async def serve(scheduler: str, name: str, directory: str) -> None:
    import dask
    from distributed import Worker

    from ..dask_config import BATCH_INTERVAL, LOW_OVERHEAD

    dask.config.set(LOW_OVERHEAD)
    async with Worker(
        scheduler,
        host=node_host(),  # its HTTP server listens there too
        name=name,
        nthreads=1,
        memory_limit=0,
        local_directory=directory,
        death_timeout=60,
        security=security(),
    ) as worker:
        # Tell the agent this slot joined: a slot that dies after joining was ended by its
        # work (a crash, a timeout) and is simply restarted; one that dies before is broken.
        (Path(directory) / JOINED_MARKER).touch()
        stream = getattr(worker, "batched_stream", None)
        if stream is not None and hasattr(stream, "interval"):
            stream.interval = BATCH_INTERVAL
        await worker.finished()


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1], sys.argv[2], sys.argv[3]))
