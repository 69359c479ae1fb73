"""What a slot does with one task: unpack the batch, call the function per item, pack results.

This module runs inside the slot's worker process. Each item's exception is caught and
sent back on its own, so one bad item never costs its neighbours' results. With a
per-item ``timeout``, a watchdog thread ends the whole slot process when an item overruns
(a Python thread cannot be stopped any other way); before it does, it sends the items
finished so far and the culprit's index to the client as a Dask event, and the node agent
starts a fresh slot process in its place.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, NamedTuple

import cloudpickle

from ..errors import TaskTimeoutError
from ..payload import (
    CALL_ARGS,
    CALL_ONE,
    CALL_STAR,
    STARTED_TOPIC,
    TIMEOUT_TOPIC,
    BatchResult,
    RemoteError,
    dump_result,
    load_batch,
)

#: Exit status of a slot process ended by the timeout watchdog (the node agent restarts it).
TIMEOUT_EXIT_CODE = 75
#: How often a long batch checks whether its task was cancelled (Ctrl-C on the client).
CANCEL_CHECK_SECONDS = 0.05
#: Under a budget, tiny items are called in runs between clock checks: a run doubles (up to
#: BUDGET_RUN_MAX items) while it takes less than BUDGET_CHECK_SECONDS.
BUDGET_CHECK_SECONDS = 0.001
BUDGET_RUN_MAX = 4096

_functions: OrderedDict[bytes, Callable[..., Any]] = OrderedDict()
_functions_lock = threading.Lock()


def load_function(fn_blob: bytes) -> Callable[..., Any]:
    """Unpickle a map's function once per slot process, not once per task."""
    digest = hashlib.blake2b(fn_blob, digest_size=16).digest()
    with _functions_lock:
        fn = _functions.get(digest)
        if fn is not None:
            _functions.move_to_end(digest)
            return fn
    fn = cloudpickle.loads(fn_blob)
    with _functions_lock:
        _functions[digest] = fn
        while len(_functions) > 16:
            _functions.popitem(last=False)
    return fn


def run_batch(fn_blob: bytes, batch_blob: bytes) -> bytes:
    """The Dask task of every map, imap and submit: run one batch, return one result blob."""
    started = time.perf_counter()
    context = _TaskContext.current()
    # Before any user code can end the process, the scheduler must know that this task
    # started here (and that the previous one finished): see _TaskContext.send_soon. The
    # event is on its way while the batch is unpickled; it is waited for before the function
    # is loaded and called.
    written = context.send_soon(
        STARTED_TOPIC,
        {"key": str(context.key), "worker": context.address, "run_id": context.run_id()},
    )
    batch = load_batch(batch_blob)
    written.wait()
    try:
        fn = load_function(fn_blob)
    except BaseException as exc:  # the function's module may be missing on the node
        error = RemoteError.from_exception(exc)
        errors = dict.fromkeys(range(len(batch.items)), error)
        values: list[Any] = [None] * len(batch.items)
        return dump_result(BatchResult(context.worker, 0.0, values, errors, len(values)))
    deadline = None if batch.budget is None else started + batch.budget
    values, errors, completed = _call_items(fn, batch, context, deadline)
    elapsed = time.perf_counter() - started
    return dump_result(BatchResult(context.worker, elapsed, values, errors, completed))


def _call_items(
    fn: Callable[..., Any], batch: Any, context: _TaskContext, deadline: float | None = None
) -> tuple[list[Any], dict[int, RemoteError], int]:
    """Call ``fn`` on the batch's items: (values, errors by position, items completed).

    Past ``deadline`` (``time.perf_counter``), no new item is started.
    """
    items = batch.items
    count = len(items)
    values: list[Any] = []
    errors: dict[int, RemoteError] = {}
    indexed = getattr(fn, "needs_index", False)
    if batch.call == CALL_ONE and batch.seed is None and batch.timeout is None and not indexed:
        # Fast path for tiny functions: no per-item bookkeeping. On the first exception,
        # record it and let the careful loop below carry on after that item, so that no
        # item is ever called twice.
        append = values.append
        try:
            if deadline is None:
                for item in items:
                    append(fn(item))
            else:
                _call_until(fn, items, append, deadline)
        except BaseException as exc:
            errors[len(values)] = RemoteError.from_exception(exc)
            append(None)
        else:
            return values, errors, len(values)
    start = len(values)
    values.extend([None] * (count - start))
    rng_for = _rng_factory(batch.seed)
    watchdog = _Watchdog.shared() if batch.timeout is not None else None
    next_cancel_check = time.monotonic() + CANCEL_CHECK_SECONDS
    for position in range(start, count):
        if deadline is not None and position > 0 and time.perf_counter() >= deadline:
            return values, errors, position
        now = time.monotonic()
        if now >= next_cancel_check:
            next_cancel_check = now + CANCEL_CHECK_SECONDS
            if context.cancelled():
                return values, errors, position
        item = items[position]
        _state.index = batch.indices[position]
        kwargs: dict[str, Any] = {}
        if rng_for is not None:
            kwargs["rng"] = rng_for(batch.indices[position])
        if watchdog is not None:
            watchdog.arm(_Armed(context, position, batch.timeout, values, errors))
        try:
            if batch.call == CALL_ONE:
                values[position] = fn(item, **kwargs)
            elif batch.call == CALL_STAR:
                values[position] = fn(*item, **kwargs)
            elif batch.call == CALL_ARGS:
                args, call_kwargs = item
                values[position] = fn(*args, **call_kwargs, **kwargs)
        except BaseException as exc:  # SystemExit from user code must not end the slot
            errors[position] = RemoteError.from_exception(exc)
        finally:
            if watchdog is not None:
                watchdog.disarm()
    return values, errors, count


def _call_until(
    fn: Callable[..., Any], items: Any, append: Callable[[Any], None], deadline: float
) -> None:
    """The fast path under a budget: call ``fn`` on items in runs between clock checks,
    runs that double while they are quick (so tiny items pay for a check per thousands)
    and fall back to one item as soon as a run takes long. At least one item is called."""
    source = iter(items)
    run = 1
    while True:
        began = time.perf_counter()
        called = 0
        for item in itertools.islice(source, run):
            append(fn(item))
            called += 1
        if called < run:
            return  # the items ran out
        now = time.perf_counter()
        if now >= deadline:
            return
        run = min(run * 2, BUDGET_RUN_MAX) if now - began < BUDGET_CHECK_SECONDS else 1


class _SlotState:
    """What the slot is doing now, for code that runs inside an item's call."""

    index: int = -1


_state = _SlotState()


def current_index() -> int:
    """The input index of the item being called in this slot (``{index}`` in templates)."""
    return _state.index


async def exit_slot() -> None:
    """End this slot process at once (run by the client through ``Client.run``).

    A coroutine, because Dask runs only coroutines without waiting for a reply.
    Used to free a slot whose task was cancelled while it runs one long item; the node
    agent starts a fresh slot process in its place.
    """
    os._exit(TIMEOUT_EXIT_CODE)


def _rng_factory(seed: int | None) -> Callable[[int], Any] | None:
    if seed is None:
        return None
    from ..seeding import item_rng

    return lambda index: item_rng(seed, index)


class _TaskContext:
    """Who is running this task: the Dask worker and task key, when inside a worker."""

    def __init__(self, worker: Any, key: Any) -> None:
        self._worker = worker
        self.key = key
        self.worker = str(worker.name) if worker is not None else None
        self.address = str(worker.address) if worker is not None else None

    @classmethod
    def current(cls) -> _TaskContext:
        try:
            from distributed.worker import get_worker, thread_state

            return cls(get_worker(), getattr(thread_state, "key", None))
        except (ImportError, ValueError):
            return cls(None, None)  # called outside a Dask worker (unit tests, debugging)

    def run_id(self) -> int | None:
        """Dask's id of this assignment of the task to this slot (a task moved away and
        given back gets a new one), so a late report of an earlier start is not mistaken
        for this one."""
        if self._worker is None or self.key is None:
            return None
        task = self._worker.state.tasks.get(self.key)
        return None if task is None else int(task.run_id)

    def cancelled(self) -> bool:
        """True once the client has cancelled this task (the slot then stops early)."""
        if self._worker is None or self.key is None:
            return False
        task = self._worker.state.tasks.get(self.key)
        return task is None or task.state in ("cancelled", "released", "forgotten")

    def send_event(self, topic: str, message: dict[str, Any]) -> None:
        if self._worker is not None:
            self._worker.log_event(topic, message)

    def send_soon(self, topic: str, message: dict[str, Any]) -> _Written:
        """Send an event at once; ``wait()`` on the answer until it is written to the socket.

        Dask batches worker messages for a millisecond. A function that ends the process at
        once (a crash, ``os._exit``) would take along the news that the previous task
        finished and that this one started, so the client would blame the wrong item.
        """
        stream = getattr(self._worker, "batched_stream", None)
        written = getattr(stream, "recent_message_log", None)
        if stream is None or written is None:  # not in a worker, or Dask changed
            self.send_event(topic, message)
            return _Written(None, None)
        envelope = {"op": "log-event", "topic": topic, "msg": message}
        self._worker.loop.add_callback(stream.send, envelope)
        return _Written(envelope, written)


class _Written:
    """An event on its way out of the slot: ``wait()`` until it is written (or ``timeout``)."""

    __slots__ = ("_envelope", "_log")

    def __init__(self, envelope: dict[str, Any] | None, log: Any) -> None:
        self._envelope = envelope
        self._log = log

    def wait(self, timeout: float = 0.05) -> None:
        if self._envelope is None:
            return
        deadline = time.monotonic() + timeout
        while not _was_written(self._envelope, self._log) and time.monotonic() < deadline:
            time.sleep(0.0002)


def _was_written(envelope: dict[str, Any], written: Any) -> bool:
    """Whether a batch holding ``envelope`` is among the last batches the stream wrote.

    The event loop appends to ``written`` while this thread looks: copy it in one step
    (``tuple`` of a deque runs in C, under the GIL) rather than iterate it in place, which
    raised "deque mutated during iteration" under load.
    """
    recent = tuple(written)[-4:]
    return any(
        isinstance(payload, list) and any(m is envelope for m in payload) for payload in recent
    )


class _Armed(NamedTuple):
    """The item a watchdog guards: where it is, its limit, and the batch's results so far."""

    context: _TaskContext
    position: int
    timeout: float
    values: list[Any]
    errors: dict[int, RemoteError]


class _Watchdog:
    """One thread per slot process that ends the process when an item overruns its timeout."""

    _instance: _Watchdog | None = None
    _instance_lock = threading.Lock()

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._deadline: float | None = None
        self._armed: _Armed | None = None
        threading.Thread(target=self._watch, name="cloudmap-timeout-watchdog", daemon=True).start()

    @classmethod
    def shared(cls) -> _Watchdog:
        with cls._instance_lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def arm(self, armed: _Armed) -> None:
        with self._condition:
            self._armed = armed
            self._deadline = time.monotonic() + armed.timeout
            self._condition.notify()

    def disarm(self) -> None:
        with self._condition:
            self._armed = None
            self._deadline = None

    def _watch(self) -> None:
        while True:
            with self._condition:
                while self._deadline is None:
                    self._condition.wait()
                remaining = self._deadline - time.monotonic()
                if remaining > 0:
                    self._condition.wait(remaining)
                    continue
                armed = self._armed
            if armed is not None:
                self._end_process(*armed)

    @staticmethod
    def _end_process(
        context: _TaskContext,
        position: int,
        timeout: float,
        values: list[Any],
        errors: dict[int, RemoteError],
    ) -> None:
        """Send the items done so far and the culprit's timeout error, then end the slot."""
        overrun = TaskTimeoutError(
            f"the item ran longer than timeout={timeout:g} s; its slot process was ended "
            "and replaced"
        )
        partial_errors = {p: e for p, e in errors.items() if p < position}
        partial_errors[position] = RemoteError.from_exception(overrun)
        partial = BatchResult(
            context.worker, timeout, [*values[:position], None], partial_errors, position + 1
        )
        try:
            context.send_event(
                TIMEOUT_TOPIC, {"key": str(context.key), "result": dump_result(partial)}
            )
            time.sleep(0.3)  # let the batched stream carry the event before the process ends
        finally:
            os._exit(TIMEOUT_EXIT_CODE)
