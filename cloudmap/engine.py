"""The map engine: items in, tasks out, results back in order, with retries and an error policy.

It pulls items lazily from the input, cuts them into batches whose size the
:class:`~cloudmap.batching.BatchSizer` learns from timings, keeps a bounded window of batches
in flight as Dask tasks, and unpacks results as they return. The scheduler sees tasks,
never items. Items that fail are retried on their own. Items of a task whose slot died
without saying why are re-run in halves, then quarters..., so a crash is charged only to the
item that causes it; items lost with a preempted or removed node are requeued free. It does
not know which provider made the slots.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import partial
from typing import Any

from .batching import FIRST_BYTES, BatchSizer
from .budget import SubmitPace
from .cluster import DaskCluster, TaskHandle
from .errors import (
    InputError,
    PoolClosedError,
    SchedulerLostError,
    SerializationError,
    TaskError,
)
from .failures import MAX_FREE_REQUEUES, Verdict, item_error, verdict
from .options import MapOptions
from .payload import (
    CALL_ONE,
    CALL_STAR,
    Batch,
    BatchResult,
    RemoteError,
    dump_function,
    dump_items_batch,
    item_bytes,
    load_result,
)
from .progress import ProgressCounts, make_reporter, output_writer
from .task_output import TaskOutput

#: Backlog reported for an input of unknown length that is not exhausted: "a lot".
UNKNOWN_BACKLOG_TASKS = 1_000_000
#: With on_error="raise", how long tasks already running may finish after the failure, so
#: that their results come back with the error instead of being thrown away.
DRAIN_SECONDS = 2.0
#: Seconds between recounts of the items in started tasks, for the progress display.
RUNNING_RECOUNT = 0.2
#: Tasks that time the first items on a large pool, before more follow at the scheduler's
#: pace (pools of up to this many slots get one task per slot at once).
RAMP_TASKS = 16


class _Skipped:
    """Marks an item dropped by ``on_error="skip"``."""

    def __repr__(self) -> str:
        return "<skipped>"


SKIPPED: Any = _Skipped()
_MISSING: Any = object()


class _SourceBatch:
    """Consecutive input items, kept until every one has a result (for retries and order)."""

    __slots__ = ("items", "missing", "start", "values")

    def __init__(self, start: int, items: Sequence[Any]) -> None:
        self.start = start
        self.items = items
        self.values: list[Any] = [_MISSING] * len(items)
        self.missing = len(items)

    @property
    def indices(self) -> range:
        return range(self.start, self.start + len(self.items))


class _Task:
    """One Dask task: either a whole source batch, or loose items (retries)."""

    __slots__ = ("batch", "handle", "key", "refs")

    def __init__(self, batch: _SourceBatch | None, refs: list[tuple[_SourceBatch, int]] | None):
        self.batch = batch
        self.refs = refs
        self.handle: TaskHandle | None = None
        self.key = ""

    def release(self) -> None:
        """Let Dask forget the task now: a finished map must hold nothing on the nodes
        (Dask would recompute a held result if its slot died, calling items again)."""
        if self.handle is not None:
            self.handle.release()
            self.handle = None

    def size(self) -> int:
        if self.refs is not None:
            return len(self.refs)
        assert self.batch is not None
        return len(self.batch.items)

    def positions(self) -> list[tuple[_SourceBatch, int]]:
        if self.refs is not None:
            return self.refs
        assert self.batch is not None
        return [(self.batch, p) for p in range(len(self.batch.items))]


Chunk = tuple[range | list[int], list[Any]]


class MapEngine:
    """Runs one map (one Batch job): ``start()`` submits the first window, then iterate.

    ``indices``, when given, is the input index of each item (by default 0, 1, 2...): a map
    that runs only some items of a larger input (the ones ``cache=`` does not hold) gives
    them the seeds, ``{index}``, error indices and chunk indices of that input.
    """

    def __init__(
        self,
        cluster: DaskCluster,
        fn: Callable[..., Any],
        iterables: tuple[Iterable[Any], ...],
        options: MapOptions,
        *,
        slots: Callable[[], int],
        is_closed: Callable[[], bool],
        ordered: bool = True,
        label: str = "map",
        indices: Sequence[int] | None = None,
    ) -> None:
        self._cluster = cluster
        self._fn_blob = dump_function(fn)
        self._call = CALL_ONE if len(iterables) == 1 else CALL_STAR
        self._source, self._total = _open_source(iterables)
        # A range is sliced, never materialised: its batches travel as ranges.
        self._range = iterables[0] if len(iterables) == 1 and type(iterables[0]) is range else None
        self._slots = slots
        self._is_closed = is_closed
        self._seed = options.seed
        self._retries = options.retries
        self._timeout = options.timeout
        self._on_error = options.on_error
        self._ordered = ordered
        self._reporter = make_reporter(options.progress)
        # What the items print, shown from the thread that runs this map (task_output).
        self._output = TaskOutput() if options.capture_output else None
        self._label = label
        self._indices = indices
        self._sizer = BatchSizer(fixed=options.batch_size)
        self._pace = SubmitPace()
        self._started_at = time.monotonic()
        self._done: queue.SimpleQueue[tuple[_Task, str, Any]] = queue.SimpleQueue()
        self._tasks: dict[str, _Task] = {}
        self._open: deque[_SourceBatch] = deque()
        # Items to send again: (batch, position, most items per task; 0 for no limit).
        self._retry: deque[tuple[_SourceBatch, int, int]] = deque()
        self._attempts: dict[int, int] = {}  # failed attempts, by item index
        self._lost: dict[int, int] = {}  # times lost with a slot it only waited on
        self._preempted: dict[int, int] = {}  # times lost with a node taken away
        self._emitted: deque[Chunk] = deque()
        self._next_index = 0
        self._exhausted = False
        self._counts = ProgressCounts(total=self._total)
        self._failure: TaskError | None = None  # raised once in-flight tasks have drained
        self._drain_deadline = 0.0
        self._running_counted = 0.0
        self._cancelled = threading.Event()

    # -- public -----------------------------------------------------------------------

    def start(self) -> None:
        """Submit the first window of tasks, so work begins before anyone iterates."""
        if self._reporter is not None:
            self._reporter.start(self._counts, self._label)
        if self._output is not None:
            self._output.open(output_writer(self._reporter))
        try:
            self._refill()
        except BaseException:
            self._abort(kill_running=False)
            self._close_reporter()
            raise

    def chunks(self, deadline: float | None = None) -> Iterator[Chunk]:
        """Yield (indices, values) as they become ready: in input order if ``ordered``.

        Values of skipped items are :data:`SKIPPED`. On any exception (a failed item with
        ``on_error="raise"``, Ctrl-C, the consumer stopping) the tasks still in flight are
        cancelled; on Ctrl-C the slots running them are restarted so they are free at once.
        """
        try:
            # Not exhausted with nothing in flight: the submit pace held the next task back.
            while self._tasks or self._retry or not self._exhausted:
                if self._cancelled.is_set():
                    raise concurrent.futures.CancelledError("the map was cancelled")
                self._raise_failure_when_drained()
                try:
                    task, kind, payload = self._done.get(timeout=0.1)
                except queue.Empty:
                    self._check_alive(deadline)
                    self._refill()  # slots may have joined (a resize, autoscale)
                    self._report()  # tasks may have started: running, elapsed, ETA move
                    self._show_output()
                    continue
                if self._tasks.pop(task.key, None) is not None:
                    self._handle(task, kind, payload)
                # Take every outcome already back before refilling, so that a busy pool's
                # next tasks go to the scheduler together, in one message; and refill
                # before handing results out, so the slots are fed while the caller works.
                for task, kind, payload in self._more_done():
                    if self._tasks.pop(task.key, None) is not None:
                        self._handle(task, kind, payload)
                self._refill()
                self._show_output()
                yield from self._ready()
                self._report()
            self._raise_failure_when_drained()
            yield from self._ready()
        except (KeyboardInterrupt, concurrent.futures.CancelledError):
            self._abort(kill_running=True)
            raise
        except BaseException:
            self._abort(kill_running=False)
            raise
        finally:
            self._close_reporter()

    def cancel(self) -> None:
        """Stop this map from another thread, as Ctrl-C stops a blocking one: the thread
        iterating :meth:`chunks` raises ``concurrent.futures.CancelledError`` within 0.1 s,
        after dropping what is queued and ending the slot processes that run its tasks."""
        self._cancelled.set()

    def _more_done(self) -> Iterator[tuple[_Task, str, Any]]:
        """Outcomes already waiting, without waiting for more (at most one window's)."""
        for _ in range(max(1, len(self._tasks))):
            try:
                yield self._done.get_nowait()
            except queue.Empty:
                return

    def backlog_tasks(self) -> int:
        """Tasks' worth of work not yet sent: what autoscale sees beyond the scheduler's queue.

        Read from another thread (the pool's scaling loop): plain reads, no locking.
        """
        retry = len(self._retry)
        if self._exhausted or self._failure is not None:
            return retry
        if self._total is None:
            return UNKNOWN_BACKLOG_TASKS
        return retry + self._sizer.tasks_for(self._total - self._next_index)

    def buffered_results(self) -> dict[int, Any]:
        """Results computed but not yet handed out, by item index (attached to errors)."""
        results: dict[int, Any] = {}
        for batch in self._open:
            for index, value in zip(self._input(batch.indices), batch.values, strict=True):
                if value is not _MISSING and value is not SKIPPED:
                    results[index] = value
        for indices, values in self._emitted:
            for index, value in zip(self._input(indices), values, strict=True):
                if value is not SKIPPED:
                    results[index] = value
        return results

    def _input(self, positions: range | list[int]) -> range | list[int]:
        """The input indices of items numbered by their position in this map."""
        if self._indices is None:
            return positions
        return [self._indices[position] for position in positions]

    # -- submitting ---------------------------------------------------------------------

    def _refill(self) -> None:
        if self._failure is not None:
            return  # draining: no new work after a fatal failure
        slots = max(1, self._slots())
        rate = self._cluster.task_rate()
        self._sizer.scale(slots=slots, task_rate=rate)
        if self._sizer.ramping:
            # While batch sizes still grow from timings, at most one task per slot, so that
            # each bigger batch is timed at once instead of waiting behind smaller ones; and
            # on a large pool not one per slot at once either: a few tasks time the items,
            # more follow at the scheduler's pace (one-item tasks to 16,000 slots would
            # cost 16,000 tasks before any batch had its proper size).
            ramp = RAMP_TASKS + int(rate * (time.monotonic() - self._started_at))
            window = min(slots, ramp)
        else:
            window = 2 * slots + 2
        ready: list[tuple[_Task, bytes]] = []  # sent to the scheduler together, at the end
        try:
            self._cut_tasks(slots, rate, window, ready)
        finally:
            self._submit(ready)

    def _cut_tasks(
        self, slots: int, rate: float, window: int, ready: list[tuple[_Task, bytes]]
    ) -> None:
        """Cut tasks (retries first, then new items) into ``ready`` until the window is full."""
        while len(self._tasks) + len(ready) < window:
            # Never faster than the scheduler can take: a first wave of one-item tasks to
            # 16,000 slots would otherwise arrive all at once.
            if not self._pace.take(now=time.monotonic(), rate=rate):
                return
            if self._retry:
                ready.append(self._retry_task(slots))
                continue
            if self._exhausted or (self._ordered and len(self._open) >= 2 * window):
                return
            remaining = None if self._total is None else self._total - self._next_index
            size = self._sizer.next_size(slots=slots, remaining=remaining)
            items: Sequence[Any]
            try:
                if self._range is not None:
                    items = self._range[self._next_index : self._next_index + size]
                elif self._sizer.budget is not None:
                    items = _first_items(self._source, size)
                else:
                    items = list(itertools.islice(self._source, size))
            except ValueError as exc:  # zip(strict=True): iterables of different lengths
                self._exhausted = True
                raise InputError(
                    f"the iterables passed to map have different lengths ({exc}); "
                    "pass iterables of equal length",
                    self.buffered_results(),
                ) from None
            if not items:
                self._exhausted = True
                return
            batch = _SourceBatch(self._next_index, items)
            self._next_index += len(items)
            if self._total is not None and self._next_index >= self._total:
                self._exhausted = True
            self._open.append(batch)
            ready.append(self._packed(_Task(batch, None), batch.indices, items))

    def _retry_task(self, slots: int) -> tuple[_Task, bytes]:
        first_batch, first_position, group = self._retry.popleft()
        refs = [(first_batch, first_position)]
        limit = self._sizer.next_size(slots=slots, remaining=None)
        if group:
            limit = min(limit, group)
        while self._retry and len(refs) < limit and self._retry[0][2] == group:
            batch, position, _ = self._retry.popleft()
            refs.append((batch, position))
        indices = [batch.start + position for batch, position in refs]
        items = [batch.items[position] for batch, position in refs]
        return self._packed(_Task(None, refs), indices, items)

    def _packed(
        self, task: _Task, indices: range | list[int], items: Sequence[Any]
    ) -> tuple[_Task, bytes]:
        batch = Batch(
            self._call,
            self._seed,
            self._timeout,
            self._input(indices),
            items,
            self._sizer.budget,
            None if self._output is None else self._output.tag,
        )
        try:
            return task, dump_items_batch(batch)
        except SerializationError as exc:
            exc.results = self.buffered_results()
            raise

    def _submit(self, ready: list[tuple[_Task, bytes]]) -> None:
        if not ready:
            return
        handles = self._cluster.submit_batches(
            self._fn_blob, [blob for _, blob in ready], self._label
        )
        deliveries = []
        for (task, _), handle in zip(ready, handles, strict=True):
            task.handle = handle
            task.key = handle.key
            self._tasks[task.key] = task
            self._counts.in_flight += task.size()
            deliveries.append((handle, partial(self._on_done, task)))
        self._cluster.on_results(deliveries)

    def _on_done(self, task: _Task, handle: TaskHandle, kind: str, value: Any) -> None:
        """Runs on Dask's event loop: hand the outcome to the engine's thread."""
        self._done.put((task, kind, value))

    # -- receiving ----------------------------------------------------------------------

    def _handle(self, task: _Task, kind: str, payload: Any) -> None:
        self._counts.in_flight -= task.size()
        try:
            if kind == "ok":
                self._take_result(task, load_result(payload))
            elif self._cluster.broken is not None:
                self._raise_scheduler_lost()
            elif self._is_closed():
                raise PoolClosedError("the pool was closed while this map was running")
            else:
                self._take_failure(task, payload)
        finally:
            self._cluster.forget(task.key)
            task.release()

    def _take_failure(self, task: _Task, error: BaseException) -> None:
        """A task produced no result: its slot died (crash, timeout, its node taken away)
        or the cluster gave up on it. What that costs its items is the failure policy's
        (:func:`cloudmap.failures.verdict`)."""
        positions = task.positions()
        loss = self._cluster.loss_of(task.key, error, timed=self._timeout is not None)
        decided = verdict(loss, len(positions))
        if decided is Verdict.RESEND:
            self._counts.requeued += len(positions)
            self._retry.extend((batch, position, 0) for batch, position in positions)
        elif decided is Verdict.REQUEUE_PREEMPTED:
            self._requeue_preempted(positions)
        elif decided is Verdict.REQUEUE_LOST:
            self._requeue_lost(positions)  # it only waited on the slot that died
        elif decided is Verdict.TAKE_PARTIAL:
            assert loss.partial is not None
            self._take_result(task, load_result(loss.partial))  # requeues the rest
        elif decided is Verdict.BISECT:
            # A half that dies again is halved again, down to the one item to blame.
            half = (len(positions) + 1) // 2
            self._counts.requeued += len(positions)
            self._retry.extend((batch, position, half) for batch, position in positions)
        else:
            batch, position = positions[0]
            self._item_failed(batch, position, RemoteError.from_exception(loss.error), loss.slot)

    def _requeue_lost(self, positions: list[tuple[_SourceBatch, int]]) -> None:
        """Send items lost through no fault of their own again, without spending retries;
        after MAX_FREE_REQUEUES such losses an item is run alone, so that a crash it causes
        itself is charged to it (and never loops forever)."""
        self._counts.requeued += len(positions)
        for batch, position in positions:
            index = batch.start + position
            self._lost[index] = self._lost.get(index, 0) + 1
            self._retry.append((batch, position, 1 if self._lost[index] > MAX_FREE_REQUEUES else 0))

    def _requeue_preempted(self, positions: list[tuple[_SourceBatch, int]]) -> None:
        """Send again the items of a task whose node was preempted or removed: the provider
        said so before the kill, so it is never the items' fault and costs no retry."""
        self._counts.requeued += len(positions)
        for batch, position in positions:
            index = batch.start + position
            self._preempted[index] = self._preempted.get(index, 0) + 1
            self._retry.append((batch, position, 0))

    def _take_result(self, task: _Task, result: BatchResult) -> None:
        self._sizer.observe(result.completed, result.compute_seconds)
        batch = task.batch
        if batch is not None and not result.errors and result.completed == len(batch.items):
            batch.values = result.values  # the common case: a whole batch, no failures
            batch.missing = 0
            self._counts.done += len(batch.items)
            if not self._ordered:
                self._emitted.append((batch.indices, result.values))
            return
        for offset, (source, position) in enumerate(task.positions()):
            if offset >= result.completed:
                self._retry.append((source, position, 0))  # cancelled mid-batch
                continue
            error = result.errors.get(offset)
            if error is None:
                self._resolve(source, position, result.values[offset])
                self._counts.done += 1
            else:
                self._item_failed(source, position, error, result.worker)

    def _item_failed(
        self, batch: _SourceBatch, position: int, error: RemoteError, worker: str | None
    ) -> None:
        if self._failure is not None:
            return  # already failing: only the first failure is reported
        index = batch.start + position
        attempts = self._attempts.get(index, 0) + 1
        self._attempts[index] = attempts
        if attempts <= self._retries:
            self._counts.retried += 1
            self._retry.append((batch, position, 0))
            return
        failure = item_error(
            index if self._indices is None else self._indices[index],
            error,
            worker,
            item=batch.items[position],
            attempts=attempts,
            preemptions=self._preempted.get(index, 0),
        )
        self._counts.add_failure(failure)
        if self._on_error == "raise":
            self._failure = failure
            self._drain_deadline = time.monotonic() + DRAIN_SECONDS
            self._retry.clear()
            return
        self._resolve(batch, position, failure if self._on_error == "return" else SKIPPED)

    def _resolve(self, batch: _SourceBatch, position: int, value: Any) -> None:
        batch.values[position] = value
        batch.missing -= 1
        if not self._ordered:
            self._emitted.append(([batch.start + position], [value]))

    def _ready(self) -> Iterator[Chunk]:
        """Hand out what may be handed out now, releasing finished batches."""
        if self._ordered:
            while self._open and self._open[0].missing == 0:
                batch = self._open.popleft()
                yield self._input(batch.indices), batch.values
            return
        while self._open and self._open[0].missing == 0:
            self._open.popleft()
        while self._emitted:
            indices, values = self._emitted.popleft()
            yield self._input(indices), values

    # -- housekeeping ---------------------------------------------------------------------

    def _report(self) -> None:
        if self._reporter is None:
            return
        now = time.monotonic()
        if now - self._running_counted >= RUNNING_RECOUNT:  # a lock per task: not every time
            self._running_counted = now
            self._counts.running = sum(
                task.size() for key, task in list(self._tasks.items()) if self._cluster.started(key)
            )
        self._counts.running = min(self._counts.running, self._counts.in_flight)
        self._reporter.update(self._counts)

    def _raise_failure_when_drained(self) -> None:
        """Raise the first fatal failure once running tasks are back (or took too long)."""
        if self._failure is None:
            return
        if self._tasks and time.monotonic() < self._drain_deadline:
            return
        self._failure.results = self.buffered_results()
        raise self._failure

    def _show_output(self) -> None:
        if self._output is not None and self._output.waiting:
            self._output.show()

    def _close_reporter(self) -> None:
        """Show the items' last lines (and what the rate limit held back), then close the
        progress display, which may be where the lines go."""
        if self._output is not None:
            output, self._output = self._output, None
            output.close()
        if self._reporter is not None:
            self._counts.running = min(self._counts.running, self._counts.in_flight)
            self._reporter.close(self._counts)
            self._reporter = None

    def _check_alive(self, deadline: float | None) -> None:
        """While waiting: stop if the pool closed, lost every node, or the deadline passed."""
        if self._cluster.broken is not None:
            self._raise_scheduler_lost()
        if self._is_closed():
            raise PoolClosedError("the pool was closed while this map was running")
        self._slots()  # raises NoNodesError when no node is left or on its way
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError("the map's results did not all arrive before its timeout")

    def _raise_scheduler_lost(self) -> None:
        try:
            self._cluster.check_usable()
        except SchedulerLostError as exc:
            exc.results = self.buffered_results()
            raise

    def _abort(self, *, kill_running: bool) -> None:
        handles = [task.handle for task in self._tasks.values() if task.handle is not None]
        self._tasks.clear()
        self._retry.clear()
        self._exhausted = True  # a stopped map has no backlog for autoscale to serve
        if not handles or self._is_closed():
            return
        try:
            if kill_running:
                self._cluster.stop_running(handles)
            else:
                self._cluster.cancel(handles)
        except Exception:  # the pool may be shutting down under us; nothing left to free
            pass


def _first_items(source: Iterator[Any], size: int) -> list[Any]:
    """Up to ``size`` items for a first batch, fewer if the first item pickles large."""
    items = list(itertools.islice(source, 1))
    if items:
        size = min(size, max(1, FIRST_BYTES // item_bytes(items[0])))
        items.extend(itertools.islice(source, size - 1))
    return items


def _open_source(iterables: tuple[Iterable[Any], ...]) -> tuple[Iterator[Any], int | None]:
    """One iterator of items (tuples for several iterables) and the length if known."""
    if not iterables:
        raise InputError("map needs at least one iterable of items after the function")
    for number, iterable in enumerate(iterables, start=1):
        try:
            iter(iterable)
        except TypeError:
            raise InputError(
                f"argument {number} after the function (of type {type(iterable).__name__}) is "
                "not iterable; pass a list, range, array or generator of items"
            ) from None
    lengths: list[int | None] = []
    for iterable in iterables:
        try:
            lengths.append(len(iterable))  # type: ignore[arg-type]
        except TypeError:
            lengths.append(None)
    known = [n for n in lengths if n is not None]
    if len(set(known)) > 1:
        raise InputError(
            f"the iterables passed to map have different lengths {known}; "
            "pass iterables of equal length (or use itertools.zip_longest yourself)"
        )
    total = known[0] if len(known) == len(lengths) else None
    if len(iterables) == 1:
        return iter(iterables[0]), total
    return zip(*iterables, strict=True), total
