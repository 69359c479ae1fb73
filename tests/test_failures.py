"""The failure policy shared by map and submit (cloudmap.failures), with plain values."""

from __future__ import annotations

import pytest

import cloudmap
from cloudmap.failures import LossCause, TaskLoss, Verdict, item_error, verdict
from cloudmap.payload import RemoteError

LOST = cloudmap.WorkerLostError("the slot process running this item died (KilledWorker: x)")


@pytest.mark.parametrize("items", [1, 7])
def test_losses_with_a_node_or_behind_another_task_are_free(items: int) -> None:
    preempted = TaskLoss(LossCause.PREEMPTED, "node-1/slot-0", LOST)
    queued = TaskLoss(LossCause.QUEUED, "node-1/slot-0", LOST)
    assert verdict(preempted, items) is Verdict.REQUEUE_PREEMPTED
    assert verdict(queued, items) is Verdict.REQUEUE_LOST


@pytest.mark.parametrize("items", [1, 7])
def test_tasks_dropped_with_the_clients_connection_are_sent_again_uncounted(items: int) -> None:
    dropped = TaskLoss(LossCause.DISCONNECTED, None, RuntimeError("connection lost"))
    assert verdict(dropped, items) is Verdict.RESEND


def test_a_slot_that_died_is_charged_to_its_only_item_and_halves_a_batch() -> None:
    died = TaskLoss(LossCause.DIED, "node-1/slot-0", LOST)
    assert verdict(died, 1) is Verdict.CHARGE
    assert verdict(died, 2) is Verdict.BISECT
    other = TaskLoss(LossCause.FAILED, None, RuntimeError("the scheduler gave up"))
    assert verdict(other, 1) is Verdict.CHARGE
    assert verdict(other, 3) is Verdict.BISECT


def test_what_a_timed_out_slot_sent_is_used() -> None:
    timed_out = TaskLoss(LossCause.DIED, "node-1/slot-0", LOST, partial=b"blob")
    assert verdict(timed_out, 1) is Verdict.TAKE_PARTIAL
    assert verdict(timed_out, 9) is Verdict.TAKE_PARTIAL


def test_item_error_names_item_node_worker_attempts_and_cause() -> None:
    remote = RemoteError.from_exception(ValueError("bad item"))
    error = item_error(4, remote, "node-2/slot-1", item="x", attempts=3, preemptions=1)
    assert isinstance(error, cloudmap.TaskError)
    assert (error.index, error.item, error.node, error.worker) == (
        4,
        "x",
        "node-2",
        "node-2/slot-1",
    )
    assert (error.attempts, error.preemptions) == (3, 1)
    assert isinstance(error.exception, ValueError)
    assert "bad item" in error.remote_traceback
    assert item_error(0, remote, None, item=None).node is None
