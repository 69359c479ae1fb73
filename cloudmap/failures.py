"""One failure policy for map and submit: what a lost task costs, and the TaskError of an item.

A task can come back without a result for reasons that are not its items' fault: its node
was preempted or removed, or its slot died while it only waited there. The cluster layer
says which in cloudmap's terms (a :class:`TaskLoss`, never a Dask exception), and
:func:`verdict` turns that into what to do; the map engine and ``submit``'s Future both
follow it, and both build the error of an item that failed for good with :func:`item_error`.
See docs/decisions/0003-preemption-is-not-a-crash.md.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from .errors import TaskError
from .nodes import node_of
from .payload import RemoteError

#: An item lost this many times with a slot it did not run on is then run on its own, so
#: that a crash it causes itself is charged to it.
MAX_FREE_REQUEUES = 3


class LossCause(enum.Enum):
    """Why a task produced no result."""

    PREEMPTED = "preempted"  # its node was preempted or removed (the provider said so)
    QUEUED = "queued"  # its slot died while the task only waited there
    DIED = "died"  # its slot died while running it (crash, timeout watchdog, os._exit)
    FAILED = "failed"  # the cluster gave up on it for another reason
    DISCONNECTED = "disconnected"  # the client lost the scheduler, which dropped its tasks


@dataclass(frozen=True)
class TaskLoss:
    """A task that came back without a result, as the cluster layer explains it.

    ``error`` is what a caller shows for it: a :class:`~cloudmap.WorkerLostError` when the
    slot died, else the error as the cluster gave it. ``partial`` is the result blob of the
    items a slot finished before its timeout watchdog ended it, when it sent one.
    """

    cause: LossCause
    slot: str | None
    error: BaseException
    partial: bytes | None = None


class Verdict(enum.Enum):
    """What to do with a task that came back without a result."""

    REQUEUE_PREEMPTED = "requeue-preempted"  # send again; a preemption, not an attempt
    REQUEUE_LOST = "requeue-lost"  # send again free (alone after MAX_FREE_REQUEUES)
    TAKE_PARTIAL = "take-partial"  # use what the timed-out slot finished; requeue the rest
    BISECT = "bisect"  # several items, one killed the slot: re-run in halves, uncharged
    CHARGE = "charge"  # the item's own fault: it spends an attempt
    RESEND = "resend"  # send again, uncounted: the connection failed, not the items


def verdict(loss: TaskLoss, items: int) -> Verdict:
    """The rule, for a task of ``items`` items: losses with the client's connection, with a
    node or behind another task are free; a slot that died running one item is that item's
    attempt; with several items, halving finds the culprit in log2(items) rounds instead of
    charging them all."""
    if loss.cause is LossCause.DISCONNECTED:
        return Verdict.RESEND
    if loss.cause is LossCause.PREEMPTED:
        return Verdict.REQUEUE_PREEMPTED
    if loss.cause is LossCause.QUEUED:
        return Verdict.REQUEUE_LOST
    if loss.partial is not None:
        return Verdict.TAKE_PARTIAL
    if items > 1:
        return Verdict.BISECT
    return Verdict.CHARGE


def item_error(
    index: int,
    error: RemoteError,
    worker: str | None,
    *,
    item: Any,
    attempts: int = 1,
    preemptions: int = 0,
) -> TaskError:
    """The :class:`~cloudmap.TaskError` of an item that failed for good on ``worker``."""
    return TaskError(
        index,
        exception=error.exception(),
        remote_traceback=error.traceback,
        node=node_of(worker) if worker else None,
        worker=worker,
        attempts=attempts,
        preemptions=preemptions,
        item=item,
        output=error.output,
    )
