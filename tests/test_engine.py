"""The map engine (cloudmap.engine.MapEngine) against a scripted fake cluster: no Dask, no
processes, pure logic in seconds (as distributed tests AdaptiveCore with plain numbers).

:class:`FakeCluster` implements exactly the part of :class:`~cloudmap.cluster.DaskCluster`
the engine uses. Its slots run each batch in this process with the real slot code
(:func:`cloudmap.node.runner.run_batch`), so values, per-item errors and seeds are real, and
report ``compute_seconds = items x seconds_per_item`` so that the batching rule sees the
timings a test chooses.

Time is counted in ticks: each time the engine sends a task (``on_result``) or looks at
the pool (calls ``slots()``, when it refills its window or has waited for results) is a
tick, and every task whose time has come then comes back, in submission order. A task comes
back at the first tick after it was sent (so at once, inside ``on_result``) unless its
outcome says ``delay=`` more ticks. What comes back is what the test's script says for that
task: :class:`Finish`, :class:`Lose` (its slot or node died), :class:`Cancel`, :class:`Hang`,
:class:`SchedulerGone`. Every task sent is recorded (:class:`Submitted`), so tests assert on
the sequence of batches.

For the batching rule, :func:`run_map` returns the values and the submitted batch sizes::

    run = run_map(range(100_000), slots=16, seconds_per_item=1e-3)
    run.sizes  # items per task, in submission order
"""

from __future__ import annotations

import concurrent.futures
import itertools
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import pytest

from cloudmap import engine as engine_module
from cloudmap.engine import SKIPPED, UNKNOWN_BACKLOG_TASKS, MapEngine
from cloudmap.errors import (
    InputError,
    PoolClosedError,
    SchedulerLostError,
    TaskError,
    TaskTimeoutError,
    WorkerLostError,
)
from cloudmap.failures import MAX_FREE_REQUEUES, LossCause, TaskLoss
from cloudmap.node.runner import run_batch
from cloudmap.options import MapOptions
from cloudmap.payload import (
    Batch,
    BatchResult,
    RemoteError,
    dump_batch,
    dump_result,
    load_batch,
    load_result,
)
from cloudmap.seeding import item_rng

# -- what a task does, as the script says ------------------------------------------------


@dataclass(frozen=True)
class Finish:
    """The slot runs the batch and sends its result. With ``completed=n`` it stopped after
    ``n`` items (the task was cancelled while it ran), as the slot's runner reports it."""

    delay: int = 0
    completed: int | None = None


@dataclass(frozen=True)
class Lose:
    """The task comes back without a result, for ``cause``. With ``cause=DIED`` and
    ``overran=n``, the slot's timeout watchdog ended it on item ``n`` after sending the
    items before it (the partial result the cluster hands over when the map is timed)."""

    cause: LossCause
    delay: int = 0
    overran: int | None = None


@dataclass(frozen=True)
class Cancel:
    """The cluster cancelled the task; with ``pool_closed``, because the pool was closed."""

    delay: int = 0
    pool_closed: bool = False


@dataclass(frozen=True)
class SchedulerGone:
    """The client lost the scheduler for good while the task was out."""

    delay: int = 0


@dataclass(frozen=True)
class Hang:
    """The task never comes back (until cancelled)."""

    delay: int = 10**9


Outcome = Finish | Lose | Cancel | SchedulerGone | Hang


@dataclass
class Submitted:
    """One task the engine sent, and what became of it."""

    number: int  # in submission order, from 0
    key: str
    indices: list[int]
    slot: str  # the worker name it ran on
    fn_blob: bytes
    batch: Batch
    outcome: Outcome
    due: int  # the tick at which it comes back
    forgotten_before: int  # how many tasks the engine had settled when this one was sent
    kind: str | None = None  # what came back: "ok", "error", "cancelled"; None if nothing

    @property
    def size(self) -> int:
        return len(self.indices)


Script = Callable[[Submitted], Outcome]


def numbered(outcomes: Mapping[int, Outcome], default: Outcome | None = None) -> Script:
    """A script by submission number; tasks not named get ``default`` (finish at once)."""
    other = default or Finish()
    return lambda task: outcomes.get(task.number, other)


def holding(index: int, outcome: Outcome, times: int | None = None) -> Script:
    """Every task holding item ``index`` (only the first ``times`` of them, if given) gets
    ``outcome``; other tasks finish at once."""
    seen = Counter[int]()

    def script(task: Submitted) -> Outcome:
        if index not in task.indices:
            return Finish()
        seen[index] += 1
        return outcome if times is None or seen[index] <= times else Finish()

    return script


class FakeHandle:
    """What the engine holds for a task: its key, and the means to let the cluster forget it."""

    __slots__ = ("_cluster", "key")

    def __init__(self, cluster: FakeCluster, key: str) -> None:
        self._cluster = cluster
        self.key = key

    def release(self) -> None:
        self._cluster.released.append(self.key)


class FakeCluster:
    """A scripted stand-in for DaskCluster: exactly what MapEngine calls, deterministic.

    Pass ``cluster.slots`` and ``cluster.is_closed`` as the engine's callables
    (:func:`start_map` does). ``interrupt_at`` raises KeyboardInterrupt (Ctrl-C) in the
    engine's thread on that tick. ``max_tasks`` stops a runaway map (a test bug) instead of
    letting it loop.
    """

    def __init__(
        self,
        script: Script | None = None,
        *,
        slots: int = 2,
        seconds_per_item: float = 0.01,
        max_tasks: int = 100_000,
        task_rate: float = 1e6,
    ) -> None:
        self.script: Script = script or (lambda task: Finish())
        self.rate = task_rate  # what the scheduler can take: no limit unless a test sets one
        self.slot_count = slots
        self.seconds_per_item = seconds_per_item
        self.max_tasks = max_tasks
        self.broken: str | None = None  # read by the engine, as DaskCluster.broken
        self.closed = False
        self.interrupt_at: int | None = None
        self.ticks = 0
        self.submitted: list[Submitted] = []
        self.delivered: list[Submitted] = []  # in the order they came back
        self.forgotten: list[str] = []
        self.released: list[str] = []
        self.cancelled: list[str] = []
        self.stopped: list[str] = []
        self.loss_calls: list[tuple[str, bool]] = []  # (key, timed)
        self._by_key: dict[str, Submitted] = {}
        self._waiting: dict[str, tuple[Submitted, FakeHandle, Callable[..., None]]] = {}
        self._losses: dict[str, TaskLoss] = {}

    # -- the callables the engine is given ------------------------------------------------

    def slots(self) -> int:
        """The pool's slot count; each call is a tick of the fake's clock."""
        self.tick()
        if self.interrupt_at is not None and self.ticks >= self.interrupt_at:
            self.interrupt_at = None
            raise KeyboardInterrupt
        return self.slot_count

    def is_closed(self) -> bool:
        return self.closed

    # -- DaskCluster's surface, as MapEngine uses it ----------------------------------------

    def submit_batch(self, fn_blob: bytes, batch_blob: bytes, label: str) -> FakeHandle:
        number = len(self.submitted)
        assert number < self.max_tasks, "runaway map: more tasks than the test allows"
        batch = load_batch(batch_blob)
        task = Submitted(
            number=number,
            key=f"cloudmap-{label}-fake-{number}",
            indices=list(batch.indices),
            slot=f"node-{number % 3}/slot-{number % max(1, self.slot_count)}",
            fn_blob=fn_blob,
            batch=batch,
            outcome=Finish(),
            due=0,
            forgotten_before=len(self.forgotten),
        )
        task.outcome = self.script(task)
        task.due = self.ticks + 1 + task.outcome.delay
        self.submitted.append(task)
        self._by_key[task.key] = task
        return FakeHandle(self, task.key)

    def on_result(self, handle: FakeHandle, deliver: Callable[..., None]) -> None:
        self._waiting[handle.key] = (self._by_key[handle.key], handle, deliver)
        self.tick()

    def submit_batches(
        self, fn_blob: bytes, batch_blobs: list[bytes], label: str
    ) -> list[FakeHandle]:
        return [self.submit_batch(fn_blob, blob, label) for blob in batch_blobs]

    def on_results(self, tasks: list[tuple[FakeHandle, Callable[..., None]]]) -> None:
        """Tasks sent together: one tick, as one wake-up of the real cluster's loop."""
        for handle, deliver in tasks:
            self._waiting[handle.key] = (self._by_key[handle.key], handle, deliver)
        self.tick()

    def loss_of(self, key: str, error: BaseException, *, timed: bool = False) -> TaskLoss:
        self.loss_calls.append((key, timed))
        loss = self._losses[key]
        if loss.partial is not None and not timed:  # as DaskCluster: only for a timed map
            loss = TaskLoss(loss.cause, loss.slot, loss.error)
        return loss

    def started(self, key: str) -> bool:
        return key in self._waiting

    def task_rate(self) -> float:
        return self.rate

    def forget(self, key: str) -> None:
        self.forgotten.append(key)

    def check_usable(self) -> None:
        if self.broken is not None:
            raise SchedulerLostError(f"{self.broken}; the pool cannot go on")

    def cancel(self, handles: Iterable[FakeHandle]) -> None:
        for handle in handles:
            self.cancelled.append(handle.key)
            self._waiting.pop(handle.key, None)

    def stop_running(self, handles: Iterable[FakeHandle]) -> None:
        for handle in handles:
            self.stopped.append(handle.key)
            self._waiting.pop(handle.key, None)

    # -- the clock ----------------------------------------------------------------------------

    def tick(self) -> None:
        """Advance the clock: every task whose time has come comes back now."""
        self.ticks += 1
        due = [entry for entry in self._waiting.values() if entry[0].due <= self.ticks]
        for task, handle, deliver in due:
            del self._waiting[task.key]
            kind, value = self._come_back(task)
            task.kind = kind
            self.delivered.append(task)
            deliver(handle, kind, value)

    def in_flight(self) -> set[str]:
        """Keys of the tasks sent that the engine has not settled (forgotten)."""
        return {task.key for task in self.submitted} - set(self.forgotten)

    def _come_back(self, task: Submitted) -> tuple[str, Any]:
        outcome = task.outcome
        if isinstance(outcome, Finish):
            count = task.size if outcome.completed is None else outcome.completed
            result = self._run(task, count)
            values = result.values + [None] * (task.size - count)
            return "ok", dump_result(result._replace(values=values))
        if isinstance(outcome, Cancel):
            self.closed = self.closed or outcome.pool_closed
            error: BaseException = concurrent.futures.CancelledError(task.key)
            self._losses[task.key] = TaskLoss(LossCause.FAILED, None, error)
            return "cancelled", error
        if isinstance(outcome, SchedulerGone):
            self.broken = "the connection to the pool's scheduler was lost"
            error = OSError("connection closed")
            self._losses[task.key] = TaskLoss(LossCause.FAILED, None, error)
            return "error", error
        assert isinstance(outcome, Lose), outcome
        error = RuntimeError(f"fake KilledWorker: {task.slot} ({outcome.cause.value})")
        lost = WorkerLostError(f"the slot process running this item died ({error})")
        partial = None
        if outcome.overran is not None:
            partial = self._overran(task, outcome.overran)
        if outcome.cause in (LossCause.QUEUED, LossCause.DIED):
            loss = TaskLoss(outcome.cause, task.slot, lost, partial)
        elif outcome.cause is LossCause.PREEMPTED:
            loss = TaskLoss(outcome.cause, task.slot, error)
        else:
            loss = TaskLoss(outcome.cause, None, error)
        self._losses[task.key] = loss
        return "error", error

    def _run(self, task: Submitted, count: int) -> BatchResult:
        """The first ``count`` items, run by the real slot code in this process (without the
        timeout watchdog, which would end this process)."""
        batch = task.batch
        part = Batch(batch.call, batch.seed, None, batch.indices[:count], batch.items[:count])
        result = load_result(run_batch(task.fn_blob, dump_batch(part)))
        return result._replace(worker=task.slot, compute_seconds=count * self.seconds_per_item)

    def _overran(self, task: Submitted, position: int) -> bytes:
        """What the timeout watchdog sends before ending a slot: items before ``position``,
        then the culprit's timeout error."""
        done = self._run(task, position)
        errors = dict(done.errors)
        errors[position] = RemoteError.from_exception(TaskTimeoutError("the item overran"))
        return dump_result(
            BatchResult(task.slot, done.compute_seconds, [*done.values, None], errors, position + 1)
        )


# -- running a map ------------------------------------------------------------------------


def start_map(
    fn: Callable[..., Any],
    *iterables: Iterable[Any],
    script: Script | None = None,
    slots: int = 2,
    seconds_per_item: float = 0.01,
    ordered: bool = True,
    task_rate: float = 1e6,
    **options: Any,
) -> tuple[MapEngine, FakeCluster]:
    """A started engine on a fake cluster: the first window is out."""
    cluster = FakeCluster(
        script, slots=slots, seconds_per_item=seconds_per_item, task_rate=task_rate
    )
    engine = MapEngine(
        cluster,  # type: ignore[arg-type]
        fn,
        iterables,
        MapOptions(progress=False, **options),
        slots=cluster.slots,
        is_closed=cluster.is_closed,
        ordered=ordered,
    )
    engine.start()
    return engine, cluster


class MapRun(NamedTuple):
    """A map run to its end on a fake cluster."""

    values: list[Any]  # every value handed out, in the order handed out
    sizes: list[int]  # items per submitted task, in submission order
    chunks: list[tuple[list[int], list[Any]]]  # (indices, values) as handed out
    cluster: FakeCluster


def run_map(items: Iterable[Any], fn: Callable[..., Any] | None = None, **kwargs: Any) -> MapRun:
    """Run ``fn`` (default: doubling) over ``items`` to the end; see :func:`start_map`."""
    engine, cluster = start_map(fn or double, items, **kwargs)
    chunks = [(list(indices), list(values)) for indices, values in engine.chunks()]
    values = [value for _, chunk in chunks for value in chunk]
    return MapRun(values, [task.size for task in cluster.submitted], chunks, cluster)


def submitted_indices(cluster: FakeCluster) -> list[list[int]]:
    return [task.indices for task in cluster.submitted]


def computed(cluster: FakeCluster) -> Counter[int]:
    """How many times each item's value came back in a task's result (whole or cut short)."""
    counts = Counter[int]()
    for task in cluster.delivered:
        if task.kind == "ok":
            counts.update(task.indices[: task.outcome.completed])  # type: ignore[union-attr]
    return counts


# -- the functions mapped (module level: pickled by reference, like a user's module) -------

CALLS = Counter[int]()


@pytest.fixture(autouse=True)
def _fresh_calls() -> Iterator[None]:
    CALLS.clear()
    yield
    CALLS.clear()


def double(x: int) -> int:
    return 2 * x


def add(x: int, y: int) -> int:
    return x + y


def fail_on_3(x: int) -> int:
    if x == 3:
        raise ValueError(f"bad item {x}")
    return 2 * x


def fails_twice_on_3(x: int) -> int:
    CALLS[x] += 1
    if x == 3 and CALLS[x] <= 2:
        raise ValueError(f"flaky item {x}, call {CALLS[x]}")
    return 2 * x


def draw(x: int, rng: Any) -> float:
    return x + float(rng.random())


# -- order -----------------------------------------------------------------------------------

SLOW_FIRST_TASKS = numbered({0: Finish(delay=6), 1: Finish(delay=3)})


def test_results_come_back_in_input_order_when_tasks_finish_out_of_order() -> None:
    """map's list is in input order whichever task finishes first."""
    run = run_map(range(12), batch_size=2, script=SLOW_FIRST_TASKS)
    assert run.values == [2 * i for i in range(12)]
    assert [i for indices, _ in run.chunks for i in indices] == list(range(12))
    came_back = [task.number for task in run.cluster.delivered]
    assert came_back != sorted(came_back)  # the script really did finish them out of order


def test_unordered_output_hands_out_each_chunk_as_it_arrives_and_every_index_once() -> None:
    """imap(ordered=False) yields a task's results as soon as they arrive, none twice."""
    run = run_map(
        range(12),
        batch_size=2,
        ordered=False,
        script=SLOW_FIRST_TASKS,
    )
    assert [indices for indices, _ in run.chunks] == [t.indices for t in run.cluster.delivered]
    assert run.chunks[0][0] != [0, 1]  # the slow first task did not hold the others back
    by_index = {
        i: v for indices, values in run.chunks for i, v in zip(indices, values, strict=True)
    }
    assert sorted(i for indices, _ in run.chunks for i in indices) == list(range(12))
    assert by_index == {i: 2 * i for i in range(12)}


def test_an_input_of_unknown_length_is_read_to_its_end() -> None:
    """A generator works as input; autoscale sees "a lot" of backlog until it runs out."""
    engine, cluster = start_map(double, (i for i in range(30)))
    assert cluster.submitted, "work begins at start(), before anyone iterates"
    assert engine.backlog_tasks() == UNKNOWN_BACKLOG_TASKS
    values = [v for _, chunk in engine.chunks() for v in chunk]
    assert values == [2 * i for i in range(30)]
    assert sorted(i for task in cluster.submitted for i in task.indices) == list(range(30))
    assert engine.backlog_tasks() == 0


def test_an_endless_input_is_read_only_as_far_as_results_are_taken() -> None:
    """imap over an endless generator keeps memory bounded, and stopping early cancels the
    tasks still out."""
    pulled = itertools.count()

    def endless() -> Iterator[int]:
        for i in itertools.count():
            next(pulled)
            yield i

    engine, cluster = start_map(double, endless(), batch_size=5)
    chunks = engine.chunks()
    taken = list(itertools.islice((v for _, chunk in chunks for v in chunk), 100))
    assert taken == [2 * i for i in range(100)]
    assert next(pulled) < 300  # a bounded window ahead of the consumer, not the whole input
    out = cluster.in_flight()
    assert out
    chunks.close()  # the consumer stops
    assert set(cluster.cancelled) == out


def test_iterables_of_known_different_lengths_are_refused_before_any_work() -> None:
    with pytest.raises(InputError, match="different lengths"):
        start_map(add, range(10), range(7))


def test_iterables_of_different_lengths_found_midway_raise_and_keep_computed_results() -> None:
    """A shorter generator found only while reading raises InputError; what was computed
    before is not lost (handed out already, or in the error's results)."""
    engine, cluster = start_map(add, range(10), (i for i in range(7)), batch_size=1, slots=1)
    handed_out: dict[int, Any] = {}
    with pytest.raises(InputError, match="different lengths") as info:
        for indices, values in engine.chunks():
            handed_out.update(zip(indices, values, strict=True))
    settled = [t for t in cluster.delivered if t.kind == "ok" and t.key in cluster.forgotten]
    assert settled, "the error came after some results"
    kept = {**handed_out, **info.value.results}
    assert kept == {i: 2 * i for task in settled for i in task.indices}
    assert set(cluster.cancelled) == cluster.in_flight()


# -- losses ----------------------------------------------------------------------------------


def test_items_lost_with_a_preempted_node_are_sent_again_without_spending_retries() -> None:
    """Preemption of a spot node requeues its task; retries=0 still gets every result."""
    run = run_map(
        range(8), batch_size=4, retries=0, script=numbered({0: Lose(LossCause.PREEMPTED)})
    )
    assert run.values == [2 * i for i in range(8)]
    assert sorted(map(tuple, submitted_indices(run.cluster))) == [
        (0, 1, 2, 3),
        (0, 1, 2, 3),
        (4, 5, 6, 7),
    ]


def test_an_item_that_fails_after_a_preemption_counts_it_apart_from_its_attempts() -> None:
    run = run_map(
        range(8),
        fail_on_3,
        batch_size=4,
        on_error="return",
        script=numbered({0: Lose(LossCause.PREEMPTED)}),
    )
    error = run.values[3]
    assert isinstance(error, TaskError)
    assert (error.index, error.attempts, error.preemptions) == (3, 1, 1)


def test_items_queued_behind_a_dying_slot_are_requeued_free_then_run_alone() -> None:
    """A task that only waited on a slot that died costs its items nothing; after
    MAX_FREE_REQUEUES such losses its items run one per task (so a crash of their own
    would be charged to them, never looping forever)."""
    losses = MAX_FREE_REQUEUES + 1
    run = run_map(
        range(4), batch_size=4, retries=0, script=holding(0, Lose(LossCause.QUEUED), losses)
    )
    assert run.values == [0, 2, 4, 6]
    assert run.sizes == [4] * losses + [1, 1, 1, 1]


def test_tasks_dropped_with_the_connection_are_sent_again_uncounted() -> None:
    run = run_map(
        range(6), batch_size=3, retries=0, script=numbered({1: Lose(LossCause.DISCONNECTED)})
    )
    assert run.values == [2 * i for i in range(6)]
    assert submitted_indices(run.cluster).count([3, 4, 5]) == 2


def test_a_crashed_batch_is_bisected_and_only_the_crashing_item_is_charged() -> None:
    """A batch of 8 whose item 5 kills its slot every time: halves, quarters... find it;
    the other 7 are computed once each with no retry spent, and the error names item 5."""
    run = run_map(
        range(8),
        batch_size=8,
        retries=0,
        on_error="return",
        script=holding(5, Lose(LossCause.DIED)),
    )
    assert sorted(map(tuple, submitted_indices(run.cluster))) == sorted(
        [(0, 1, 2, 3, 4, 5, 6, 7), (0, 1, 2, 3), (4, 5, 6, 7), (4, 5), (6, 7), (4,), (5,)]
    )
    assert computed(run.cluster) == Counter([0, 1, 2, 3, 4, 6, 7])
    assert run.values[:5] == [0, 2, 4, 6, 8] and run.values[6:] == [12, 14]
    error = run.values[5]
    assert isinstance(error, TaskError)
    assert (error.index, error.item, error.attempts) == (5, 5, 1)
    assert isinstance(error.exception, WorkerLostError)
    assert error.worker is not None and error.node == error.worker.split("/slot-")[0]
    assert "item 5 failed" in str(error)


def test_a_crashing_item_spends_its_retries_alone_then_raises_with_the_others_results() -> None:
    engine, cluster = start_map(
        double, range(8), batch_size=8, retries=2, script=holding(5, Lose(LossCause.DIED))
    )
    with pytest.raises(TaskError) as info:
        list(engine.chunks())
    assert (info.value.index, info.value.attempts) == (5, 3)
    assert submitted_indices(cluster).count([5]) == 3
    assert info.value.results == {i: 2 * i for i in range(8) if i != 5}


def test_a_timed_out_task_keeps_what_its_slot_finished_and_resends_the_rest() -> None:
    """With timeout=, a slot ended on item 2 sent items 0-1 first: they are not run again,
    item 2 is charged a TaskTimeoutError, items 3-5 are sent again."""
    run = run_map(
        range(6),
        batch_size=6,
        timeout=30.0,
        on_error="return",
        script=numbered({0: Lose(LossCause.DIED, overran=2)}),
    )
    assert run.cluster.loss_calls == [(run.cluster.submitted[0].key, True)]
    assert submitted_indices(run.cluster) == [[0, 1, 2, 3, 4, 5], [3, 4, 5]]
    assert run.values[:2] == [0, 2] and run.values[3:] == [6, 8, 10]
    error = run.values[2]
    assert isinstance(error, TaskError) and isinstance(error.exception, TaskTimeoutError)
    assert error.index == 2


def test_a_task_cut_short_sends_only_its_unfinished_items_again() -> None:
    run = run_map(range(5), batch_size=5, script=numbered({0: Finish(completed=2)}))
    assert run.values == [0, 2, 4, 6, 8]
    assert submitted_indices(run.cluster) == [[0, 1, 2, 3, 4], [2, 3, 4]]


def test_seeded_results_do_not_depend_on_batch_size_or_losses() -> None:
    """seed= gives each item its own generator: batching, preemption and requeues change
    nothing."""
    expected = [i + float(item_rng(7, i).random()) for i in range(20)]
    plain = run_map(range(20), draw, seed=7, batch_size=1)
    troubled = run_map(
        range(20),
        draw,
        seed=7,
        batch_size=6,
        script=numbered(
            {0: Lose(LossCause.PREEMPTED), 1: Lose(LossCause.QUEUED), 2: Lose(LossCause.DIED)}
        ),
    )
    assert plain.values == expected
    assert troubled.values == expected


# -- errors ------------------------------------------------------------------------------------


def test_on_error_return_puts_the_error_in_the_failed_items_place() -> None:
    run = run_map(range(8), fail_on_3, batch_size=4, on_error="return")
    error = run.values[3]
    assert isinstance(error, TaskError)
    assert (error.index, error.item, error.attempts) == (3, 3, 1)
    assert isinstance(error.exception, ValueError)
    assert "bad item 3" in error.remote_traceback
    assert run.values[:3] + run.values[4:] == [2 * i for i in range(8) if i != 3]


def test_on_error_skip_marks_the_failed_item_skipped_and_keeps_the_rest() -> None:
    run = run_map(range(8), fail_on_3, batch_size=4, on_error="skip")
    assert run.values == [0, 2, 4, SKIPPED, 8, 10, 12, 14]


def test_retries_run_only_the_failed_item_again() -> None:
    run = run_map(range(8), fails_twice_on_3, batch_size=4, retries=2)
    assert run.values == [2 * i for i in range(8)]
    assert Counter({**dict.fromkeys(range(8), 1), 3: 3}) == CALLS
    assert submitted_indices(run.cluster).count([3]) == 2


def test_an_item_that_fails_more_than_its_retries_reports_every_attempt() -> None:
    engine, _ = start_map(fails_twice_on_3, range(8), batch_size=4, retries=1)
    with pytest.raises(TaskError, match="after 2 attempts") as info:
        list(engine.chunks())
    assert (info.value.index, info.value.attempts) == (3, 2)
    assert "flaky item 3, call 2" in str(info.value.exception)


def test_on_error_raise_waits_for_running_tasks_and_hands_over_their_results() -> None:
    """The first failure is raised once the tasks already out have come back: their results
    travel with the error, none is lost, and no new task is sent after the failure."""
    engine, cluster = start_map(
        fail_on_3, range(40), batch_size=2, script=numbered({1: Finish()}, Finish(delay=2))
    )
    handed_out: dict[int, Any] = {}
    with pytest.raises(TaskError) as info:
        for indices, values in engine.chunks():
            handed_out.update(zip(indices, values, strict=True))
    assert info.value.index == 3
    failing = cluster.submitted[1]
    assert failing.indices == [2, 3]
    settled_at = cluster.forgotten.index(failing.key)
    assert cluster.forgotten[settled_at + 1 :], "tasks were still out when item 3 failed"
    assert all(task.forgotten_before <= settled_at for task in cluster.submitted)
    assert not cluster.cancelled  # every task out was waited for
    sent = {i for task in cluster.submitted for i in task.indices}
    assert {**handed_out, **info.value.results} == {i: 2 * i for i in sent - {3}}


def test_on_error_raise_does_not_wait_forever_for_a_task_that_never_returns(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(engine_module, "DRAIN_SECONDS", 0.05)
    engine, cluster = start_map(
        fail_on_3, range(8), batch_size=2, script=numbered({0: Hang(), 1: Finish()})
    )
    with pytest.raises(TaskError) as info:
        list(engine.chunks())
    assert info.value.index == 3
    assert cluster.cancelled == [cluster.submitted[0].key]
    assert 0 not in info.value.results and 1 not in info.value.results


# -- the pool around the map -------------------------------------------------------------------


def test_a_finished_map_holds_nothing_on_the_cluster() -> None:
    """Every task is released and forgotten once its result is in (Dask would recompute a
    held result if its slot died, calling items again)."""
    run = run_map(range(50), script=numbered({3: Lose(LossCause.DIED)}))
    keys = [task.key for task in run.cluster.submitted]
    assert sorted(run.cluster.released) == sorted(keys)
    assert sorted(run.cluster.forgotten) == sorted(keys)
    assert not run.cluster.cancelled and not run.cluster.stopped


def test_ctrl_c_ends_the_slots_running_the_maps_tasks() -> None:
    """On KeyboardInterrupt the tasks out are stopped with their slots (not only cancelled),
    so the slots are free at once; the interrupt reaches the user."""
    engine, cluster = start_map(double, range(100), batch_size=2, script=lambda t: Finish(delay=5))
    cluster.interrupt_at = cluster.ticks + 2
    with pytest.raises(KeyboardInterrupt):
        list(engine.chunks())
    assert cluster.stopped and set(cluster.stopped) == cluster.in_flight()
    assert not cluster.cancelled


def test_cancel_stops_the_map_as_ctrl_c_does_and_leaves_no_backlog() -> None:
    """cancel() (MapRun.cancel, from another thread) ends the iteration with CancelledError,
    stops the tasks out with their slots, and a stopped map asks autoscale for nothing."""
    engine, cluster = start_map(double, range(100), batch_size=2, script=lambda t: Finish(delay=5))
    assert engine.backlog_tasks() > 0
    handed_out = 0
    with pytest.raises(concurrent.futures.CancelledError):
        for _, values in engine.chunks():
            handed_out += len(values)
            engine.cancel()
    assert handed_out > 0
    assert cluster.stopped and set(cluster.stopped) == cluster.in_flight()
    assert engine.backlog_tasks() == 0


def test_a_lost_scheduler_ends_the_map_with_the_results_so_far() -> None:
    engine, cluster = start_map(
        double, range(12), batch_size=2, script=numbered({3: SchedulerGone()})
    )
    handed_out: dict[int, Any] = {}
    with pytest.raises(SchedulerLostError) as info:
        for indices, values in engine.chunks():
            handed_out.update(zip(indices, values, strict=True))
    settled = [t for t in cluster.delivered if t.kind == "ok" and t.key in cluster.forgotten]
    assert {**handed_out, **info.value.results} == {i: 2 * i for t in settled for i in t.indices}


def test_closing_the_pool_under_a_map_raises_pool_closed_not_a_task_error() -> None:
    engine, _ = start_map(
        double, range(12), batch_size=2, retries=5, script=numbered({2: Cancel(pool_closed=True)})
    )
    with pytest.raises(PoolClosedError, match="closed"):
        list(engine.chunks())


# -- the batching ramp -----------------------------------------------------------------------


def test_on_16_slots_the_ramp_times_one_batch_per_slot_then_grows_to_half_second_tasks():
    run = run_map(range(100_000), slots=16, seconds_per_item=0.001, task_rate=500.0)
    assert run.values == [2 * i for i in range(100_000)]
    # One task per slot at once, each of at most 1/32 of a slot's share (under a budget on
    # a real slot; this fake one runs them whole)...
    assert len(run.sizes[:16]) == 16 and all(150 <= size <= 196 for size in run.sizes[:16])
    assert max(run.sizes) == 500  # ...then 0.5 s of 1 ms items


def test_on_16000_slots_the_ramp_does_not_send_one_item_to_every_slot():
    # One-item tasks to every slot would be 16,000 tasks before any batch had its size;
    # a few time the items, then batches sized for a scheduler taking 500 tasks a second.
    run = run_map(range(200_000), slots=16_000, seconds_per_item=0.001, task_rate=500.0)
    assert run.values == [2 * i for i in range(200_000)]
    assert run.sizes.count(1) < 100
    assert len(run.sizes) < 1000
    # sqrt(200,000 / (500 * 0.001)) = 632 items: as long to hand out as to run.
    assert max(run.sizes) >= 600


def test_a_large_pool_is_fed_no_faster_than_the_scheduler_takes_tasks():
    started = time.monotonic()
    run = run_map(range(3000), slots=16_000, seconds_per_item=5.0, task_rate=1000.0)
    elapsed = time.monotonic() - started
    # 5 s items on a pool this large go one per task: a burst of 1,000 tasks (half a
    # second's worth at twice the rate), then 2,000 a second.
    assert run.sizes == [1] * 3000
    assert elapsed > (3000 - 1000) / 2000 * 0.9
