"""Functions the MPI tests run on every rank (importable on the nodes)."""

from __future__ import annotations

import os
import time
from typing import Any


def allreduce_and_environment(comm: Any, offset: int) -> dict[str, Any]:
    names = [
        "CLOUDMAP_HOST_LIST",
        "CLOUDMAP_NODE_LIST",
        "CLOUDMAP_MASTER_NODE",
        "CLOUDMAP_IS_MASTER",
        "CLOUDMAP_TASK_SHARED_DIR",
        "CLOUDMAP_NODE_ID",
        "AZ_BATCH_HOST_LIST",
        "AZ_BATCH_MASTER_NODE",
        "AZ_BATCH_IS_CURRENT_NODE_MASTER",
        "AZ_BATCH_TASK_SHARED_DIR",
    ]
    shared = os.environ["CLOUDMAP_TASK_SHARED_DIR"]
    return {
        "rank": comm.rank,
        "size": comm.size,
        "sum": comm.allreduce(comm.rank + offset),
        "env": {name: os.environ.get(name) for name in names},
        "coordinated": os.path.exists(os.path.join(shared, "coordinated")),
        "cwd": os.getcwd(),
    }


def raise_on_rank(comm: Any, bad: int) -> int:
    if comm.rank == bad:
        raise ValueError(f"rank {bad} refuses")
    comm.Barrier()
    return comm.rank


def window(comm: Any, seconds: float) -> tuple[float, float]:
    """Hold the ranks for a while; return when this rank began and ended."""
    began = time.time()
    comm.Barrier()
    time.sleep(seconds)
    comm.Barrier()
    return began, time.time()


def scaled_sum(comm: Any, factor: int) -> int:
    return int(comm.allreduce(factor * (comm.rank + 1)))


def node_span(x: int, seconds: float) -> tuple[str, float, float]:
    """A map item: which node ran it, and when."""
    began = time.time()
    time.sleep(seconds)
    return os.environ["CLOUDMAP_NODE_ID"], began, time.time()


def mark_coordinated() -> None:
    """A Python coordination step: leaves a file where the node's ranks will look."""
    shared = os.environ["CLOUDMAP_TASK_SHARED_DIR"]
    with open(os.path.join(shared, "coordinated"), "w") as file:
        file.write(os.environ["CLOUDMAP_IS_MASTER"])


def stencil_on_node(comm: Any, n: int) -> dict[str, Any]:
    """A 3-point stencil over ``n`` values split in rank order, with a halo exchange
    (``Sendrecv`` with both neighbours) and an ``allreduce`` of its squares; then where the
    rank ran: its node's variables, its TCP connections (open until MPI finalizes) and its
    ancestors' command lines, up to the process that started the node's slot.

    Compare with :func:`stencil_serial`.
    """
    import numpy as np
    import psutil
    from mpi4py import MPI

    counts = [n // comm.size + (r < n % comm.size) for r in range(comm.size)]
    first = sum(counts[: comm.rank])
    u = np.zeros(counts[comm.rank] + 2)
    u[1:-1] = _values(np.arange(first, first + counts[comm.rank]))
    left = comm.rank - 1 if comm.rank > 0 else MPI.PROC_NULL
    right = comm.rank + 1 if comm.rank < comm.size - 1 else MPI.PROC_NULL
    comm.Sendrecv(u[1:2], dest=left, recvbuf=u[-1:], source=right)
    comm.Sendrecv(u[-2:-1], dest=right, recvbuf=u[:1], source=left)
    block = u[:-2] + u[1:-1] + u[2:]
    total = comm.allreduce(float(block @ block))
    me = psutil.Process()
    connections = [
        (f"{c.laddr.ip}:{c.laddr.port}", f"{c.raddr.ip}:{c.raddr.port}")
        for c in me.net_connections("tcp")
        if c.status == psutil.CONN_ESTABLISHED and c.raddr
    ]
    return {
        "rank": comm.rank,
        "block": block.tolist(),
        "total": total,
        "node_id": os.environ.get("CLOUDMAP_NODE_ID"),
        "batch_node_id": os.environ.get("AZ_BATCH_NODE_ID"),
        "node_host": os.environ.get("CLOUDMAP_NODE_HOST"),
        "node_list": os.environ["CLOUDMAP_NODE_LIST"].split(","),
        "connections": connections,
        "ancestors": [" ".join(p.cmdline()) for p in me.parents()],
    }


def stencil_serial(n: int) -> tuple[list[float], float]:
    """What :func:`stencil_on_node` computes, on one process: the blocks joined, and the
    sum of squares."""
    import numpy as np

    u = np.zeros(n + 2)
    u[1:-1] = _values(np.arange(n))
    whole = u[:-2] + u[1:-1] + u[2:]
    return whole.tolist(), float(whole @ whole)


def _values(index: Any) -> Any:
    import numpy as np

    return np.sin(0.3 * index) + 0.01 * index
