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
