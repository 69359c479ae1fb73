"""What the pool reports about itself over time: scaling samples and task counts.

Plain frozen records with no behaviour, in a module that imports nothing of cloudmap, so
that the scaler that makes them, the pricing that bills them and the widgets that draw
them all depend on it and not on each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True)
class ScalingSample:
    """The pool at one moment: what the widgets draw.

    ``dedicated`` and ``spot`` count the nodes of each kind the pool holds (preempted and
    failed ones included, as Batch's current node counts do; nodes on their way out not);
    ``states`` counts every node by state.
    """

    time: datetime
    target_dedicated: int
    target_spot: int
    dedicated: int
    spot: int
    states: dict[str, int]
    queued_tasks: int
    running_tasks: int
    reason: str = ""


@dataclass(frozen=True)
class TaskCounts:
    """Dask tasks of a pool now (``pool.task_counts()``); ``done`` counts since it started."""

    queued: int
    running: int
    done: int
