"""What a slot does with one task: unpack the batch, call the function per item, pack results.

This module runs inside the slot's worker process. Each item's exception is caught and
sent back on its own, so one bad item never costs its neighbours' results. With a
per-item ``timeout``, a watchdog thread ends the whole slot process when an item overruns
(a Python thread cannot be stopped any other way); before it does, it sends the items
finished so far and the culprit's index to the client as a Dask event, and the node agent
starts a fresh slot process in its place.

When the batch asks for it (``Batch.output``), what the items print on stdout and stderr,
log, and warn is captured line by line, tagged with the item's index, sent to the client
while the batch runs, and still written to the slot's log (see :class:`_Capture`).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import os
import sys
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any, NamedTuple

import cloudpickle

from ..errors import TaskTimeoutError
from ..payload import (
    CALL_ARGS,
    CALL_ONE,
    CALL_STAR,
    OUTPUT_TOPIC,
    STARTED_TOPIC,
    STDERR,
    STDOUT,
    TIMEOUT_TOPIC,
    BatchResult,
    RemoteError,
    dump_result,
    load_batch,
)
from ..task_output import SLOT_LIMIT, TokenBucket

#: Exit status of a slot process ended by the timeout watchdog (the node agent restarts it).
TIMEOUT_EXIT_CODE = 75
#: How often a long batch checks whether its task was cancelled (Ctrl-C on the client).
CANCEL_CHECK_SECONDS = 0.05
#: Under a budget, tiny items are called in runs between clock checks: a run doubles (up to
#: BUDGET_RUN_MAX items) while it takes less than BUDGET_CHECK_SECONDS.
BUDGET_CHECK_SECONDS = 0.001
BUDGET_RUN_MAX = 4096
#: Captured output: lines go to the client at most this often (seconds) per slot...
OUTPUT_FLUSH_SECONDS = 0.2
#: ...each cut to this many characters (the whole line stays in the slot's log)...
OUTPUT_LINE_CHARS = 1000
#: ...and a failing item's error carries the last this-many characters of its output.
ITEM_OUTPUT_CHARS = 64_000

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
    capture = None if batch.output is None else _Capture.begin(batch, context)
    try:
        values, errors, completed = _call_items(fn, batch, context, deadline, capture)
    finally:
        if capture is not None:
            capture.end()
    elapsed = time.perf_counter() - started
    return dump_result(BatchResult(context.worker, elapsed, values, errors, completed))


def _call_items(
    fn: Callable[..., Any],
    batch: Any,
    context: _TaskContext,
    deadline: float | None = None,
    capture: _Capture | None = None,
) -> tuple[list[Any], dict[int, RemoteError], int]:
    """Call ``fn`` on the batch's items: (values, errors by position, items completed).

    Past ``deadline`` (``time.perf_counter``), no new item is started. With ``capture``,
    a failing item's error carries its output.
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
        if capture is not None:
            capture.values = values  # the item running is the next one appended
        try:
            if deadline is None:
                for item in items:
                    append(fn(item))
            else:
                _call_until(fn, items, append, deadline)
        except BaseException as exc:
            position = len(values)
            errors[position] = _item_error(exc, capture, batch.indices[position])
            append(None)
        else:
            return values, errors, len(values)
    if capture is not None:
        capture.values = None  # from here on, _state.index says which item runs
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
            errors[position] = _item_error(exc, capture, batch.indices[position])
        finally:
            if watchdog is not None:
                watchdog.disarm()
    return values, errors, count


def _item_error(exc: BaseException, capture: _Capture | None, index: int) -> RemoteError:
    error = RemoteError.from_exception(exc)
    if capture is not None:
        error.output = capture.output_of(index)
    return error


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


class _Capture:
    """What the items of one batch print, log and warn, as lines tagged with their index.

    Set up once per batch, not per item: ``sys.stdout`` and ``sys.stderr`` become
    :class:`_Tee` streams that write through to the slot's log as before and hand the task
    thread's text here, and a :class:`_LogCapture` handler on the root logger catches
    records that no handler of the user's writes to those streams. Which item wrote a line
    costs nothing per item: in the runner's fast path it is the next to be appended to the
    batch's ``values`` (``len(values)`` when the line is written), elsewhere the item the
    careful loop set in ``_state.index``.

    Lines go to the client under the map's tag (:data:`~cloudmap.payload.OUTPUT_TOPIC`) at
    most every :data:`OUTPUT_FLUSH_SECONDS`, within the slot's own rate limit
    (:data:`~cloudmap.task_output.SLOT_LIMIT`, kept across batches): lines past it are
    only counted, so a chatty function cannot flood the scheduler. The current item's last
    :data:`ITEM_OUTPUT_CHARS` are kept too, for its error if it fails.
    """

    #: The capture of the batch running in this slot process (the watchdog reads it).
    active: _Capture | None = None
    #: The slot's rate limit: one bucket per process, so that many small batches of a
    #: chatty function share it.
    limit = TokenBucket(*SLOT_LIMIT)

    def __init__(self, batch: Any, context: _TaskContext) -> None:
        self.thread = threading.get_ident()
        self.values: list[Any] | None = None
        self._indices = batch.indices
        self._tag = batch.output
        self._context = context
        self._lock = threading.Lock()
        self._pending: list[list[Any]] = []
        self._dropped = 0
        self._flush_due = False
        self._partial: dict[int, tuple[int, str]] = {}  # stream -> (index, unfinished line)
        self._item = -1
        self._item_text: deque[str] = deque()
        self._item_chars = 0
        self._item_cut = 0
        self._restore: list[tuple[str, Any, _Tee]] = []
        self._wrote = False

    @classmethod
    def begin(cls, batch: Any, context: _TaskContext) -> _Capture:
        capture = cls(batch, context)
        for name, stream in (("stdout", STDOUT), ("stderr", STDERR)):
            original = getattr(sys, name)
            if original is None or isinstance(original, _Tee):
                continue  # no stream, or a tee already (it captures for the active batch)
            tee = _Tee(original, stream)
            setattr(sys, name, tee)
            capture._restore.append((name, original, tee))
        _LogCapture.shared().capture = capture
        logging.getLogger().addHandler(_LogCapture.shared())
        cls.active = capture
        return capture

    def end(self) -> None:
        """Put the streams back, finish unterminated lines and send what is pending."""
        if _Capture.active is self:
            _Capture.active = None
        handler = _LogCapture.shared()
        logging.getLogger().removeHandler(handler)
        handler.capture = None
        for name, original, tee in self._restore:
            if getattr(sys, name) is tee:
                setattr(sys, name, original)
            if self._wrote:  # the slot's log is a file: let it show the batch's lines now
                with contextlib.suppress(Exception):
                    original.flush()
        self.finish()

    def finish(self) -> None:
        """Send every line so far now, unterminated ones included (the batch is over, or
        the watchdog is about to end the slot)."""
        with self._lock:
            for stream, (index, text) in self._partial.items():
                if text:
                    self._line(index, stream, text)
            self._partial.clear()
        self.flush()

    def index(self) -> int:
        """The input index of the item running now."""
        values = self.values
        if values is None:
            return _state.index
        position = len(values)
        return self._indices[min(position, len(self._indices) - 1)]

    def write(self, stream: int, text: str) -> None:
        """Text the task thread wrote to ``stream``: complete lines are captured."""
        index = self.index()
        self._wrote = True
        with self._lock:
            held_index, held = self._partial.get(stream, (index, ""))
            if held and held_index != index:  # the last item ended its output without "\n"
                self._line(held_index, stream, held)
                held = ""
            lines = (held + text).split("\n")
            self._partial[stream] = (index, lines.pop())
            for line in lines:
                self._line(index, stream, line)
            self._schedule_flush()

    def _line(self, index: int, stream: int, line: str) -> None:
        """Keep one line for the item's error and send it, if the slot's limit allows."""
        if index != self._item:
            self._item, self._item_chars, self._item_cut = index, 0, 0
            self._item_text.clear()
        kept = line if len(line) < ITEM_OUTPUT_CHARS else "..." + line[-ITEM_OUTPUT_CHARS:]
        self._item_text.append(kept + "\n")
        self._item_chars += len(kept) + 1
        while self._item_chars > ITEM_OUTPUT_CHARS and len(self._item_text) > 1:
            cut = self._item_text.popleft()
            self._item_chars -= len(cut)
            self._item_cut += len(cut)
        if not _Capture.limit.take(time.monotonic()):
            self._dropped += 1
            return
        if len(line) > OUTPUT_LINE_CHARS:
            more = len(line) - OUTPUT_LINE_CHARS
            line = f"{line[:OUTPUT_LINE_CHARS]}... [{more:,} more characters in the slot log]"
        self._pending.append([index, stream, line])

    def output_of(self, index: int) -> str:
        """The last lines item ``index`` wrote (its unterminated last line too)."""
        with self._lock:
            if index != self._item:
                text = ""
            else:
                text = "".join(self._item_text)
                if self._item_cut:
                    text = (
                        f"[... {self._item_cut:,} earlier characters are in the slot log]\n{text}"
                    )
            for held_index, held in self._partial.values():
                if held and held_index == index:
                    text += held + "\n"
            return text

    def _schedule_flush(self) -> None:
        if self._flush_due or not (self._pending or self._dropped):
            return
        self._flush_due = True
        self._context.call_later(OUTPUT_FLUSH_SECONDS, self.flush)

    def flush(self) -> None:
        """Send the pending lines (on the slot's event loop, or from the task thread)."""
        with self._lock:
            lines, dropped = self._pending, self._dropped
            self._pending, self._dropped, self._flush_due = [], 0, False
        if lines or dropped:
            message = {
                "tag": self._tag,
                "key": str(self._context.key),
                "slot": self._context.worker,
                "lines": lines,
                "dropped": dropped,
            }
            self._context.send_event(OUTPUT_TOPIC, message)


class _Tee:
    """``sys.stdout`` or ``sys.stderr`` while a batch captures: writes go on to the slot's
    log, and the task thread's also to the batch's capture. Anything else is the original's.

    A tee outlives its batch where the function kept it (a logging handler made during the
    batch holds ``sys.stderr``): it then writes through, and captures for whichever batch
    is capturing, so such a handler's lines are captured in later batches too.
    """

    def __init__(self, original: Any, stream: int) -> None:
        self.original = original
        self.stream = stream

    def write(self, text: str) -> int:
        written = self.original.write(text)
        capture = _Capture.active
        if capture is not None and threading.get_ident() == capture.thread and text:
            capture.write(self.stream, str(text))
        return written

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        self.original.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.original, name)


class _LogCapture(logging.Handler):
    """Catches the task thread's log records that would not otherwise reach a captured
    stream: with no handler of the user's, Python shows WARNING and above on stderr (its
    "last resort"); this does the same, through the captured stderr. Records the user's
    handlers write to ``sys.stdout`` or ``sys.stderr`` are captured there, not twice."""

    _instance: _LogCapture | None = None

    def __init__(self) -> None:
        super().__init__()
        self.capture: _Capture | None = None
        self.setFormatter(logging.Formatter(logging.BASIC_FORMAT))

    @classmethod
    def shared(cls) -> _LogCapture:
        """One handler per slot process, added to the root logger for each batch."""
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    def emit(self, record: logging.LogRecord) -> None:
        capture = self.capture
        if capture is None or threading.get_ident() != capture.thread:
            return
        others, teed = _handlers_of(record, self)
        if teed:
            return  # a handler of the user's writes it to a captured stream
        last_resort = logging.lastResort
        if not others and (last_resort is None or record.levelno < last_resort.level):
            return  # Python would not show it either
        try:
            text = self.format(record) + "\n"
        except Exception:
            self.handleError(record)
            return
        if others:
            capture.write(STDERR, text)  # it went elsewhere (a file): shown, not teed
        else:
            sys.stderr.write(text)  # in Python's place: to the slot's log, and captured


def _handlers_of(record: logging.LogRecord, own: logging.Handler) -> tuple[bool, bool]:
    """(whether other handlers take ``record``, whether one writes to a captured stream),
    following the logger hierarchy as ``Logger.callHandlers`` does."""
    logger: logging.Logger | None = logging.getLogger(record.name)
    if record.name == "root":
        logger = logging.getLogger()
    others = teed = False
    while logger is not None:
        for handler in logger.handlers:
            if handler is own or record.levelno < handler.level:
                continue
            others = True
            if isinstance(getattr(handler, "stream", None), _Tee):
                teed = True
        if not logger.propagate:
            break
        logger = logger.parent
    return others, teed


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

    def call_later(self, delay: float, callback: Callable[[], None]) -> None:
        """Run ``callback`` on the slot's event loop in ``delay`` seconds (from any thread).

        Outside a worker there is no loop: nothing is scheduled (the end of the batch
        sends what is left).
        """
        loop = getattr(self._worker, "loop", None)
        if loop is not None:
            loop.add_callback(loop.call_later, delay, callback)

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
        capture = _Capture.active
        if capture is not None:
            partial_errors[position].output = capture.output_of(_state.index)
            capture.finish()  # the culprit's last lines go out before the slot ends
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
