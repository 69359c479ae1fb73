"""Maps that run in the background: ``pool.map_async`` and ``pool.run_async`` return a MapRun.

A notebook cell that calls ``map`` is busy until the map ends, and so are the widgets of a
dashboard whose callback called it. A :class:`MapRun` returns at once: the map's engine is
started in the caller's thread (so bad input fails there, before any work), then iterated
by a thread of its own, which collects results as they arrive, in completion order. The
handle is a ``concurrent.futures.Future`` in spirit: ``done()``, ``result(timeout)``,
``exception()``, ``cancel()``, ``add_done_callback()``, and ``await run`` in a kernel's
event loop; and more, for long maps: ``results_so_far()`` and the ``progress`` display.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import threading
from collections.abc import Callable, Generator
from typing import Any

from .engine import SKIPPED, MapEngine
from .errors import InputError, TaskError
from .progress import ProgressReporter
from .record import MapResult, RunRecord

#: Called when a run ends, with its status and the exception that ended it (if any).
Finish = Callable[[str, BaseException | None], RunRecord | None]


class MapRun:
    """A map running in the background (see :meth:`cloudmap.Pool.map_async`).

    >>> run = pool.map_async(simulate, range(1000), seed=7)   # doctest: +SKIP
    >>> run.done(), len(run.results_so_far())                   # doctest: +SKIP
    (False, 212)
    >>> results = run.result()                                  # doctest: +SKIP
    """

    def __init__(
        self,
        engine: MapEngine,
        *,
        progress: ProgressReporter | None,
        skip_failed: bool,
        finish: Finish,
        label: str = "map",
    ) -> None:
        self._engine = engine
        self._skip_failed = skip_failed
        self._finish = finish
        self._label = label
        # Left pending until it ends: a pending Future is the one state cancel() can end.
        self._future: concurrent.futures.Future[MapResult] = concurrent.futures.Future()
        self._results: dict[int, Any] = {}
        self._lock = threading.Lock()
        self._count = 0  # items handed back so far, failed and skipped ones included
        #: The progress display (a :class:`~cloudmap.ProgressWidget` in Jupyter), or None.
        self.progress = progress
        #: The run's :class:`~cloudmap.RunRecord`, once it has ended.
        self.record: RunRecord | None = None
        # The thread runs in a copy of the caller's context: in a Jupyter kernel that holds
        # the cell's parent header, so what the run prints (its items' output, with
        # progress=False) appears under the cell that started it, not under the latest one.
        context = contextvars.copy_context()
        self._thread = threading.Thread(
            target=context.run, args=(self._collect,), name=f"cloudmap-{label}", daemon=True
        )
        self._thread.start()

    # -- the Future's face ----------------------------------------------------------------

    def done(self) -> bool:
        """True once the map finished, failed or was cancelled."""
        return self._future.done()

    def running(self) -> bool:
        return not self._future.done()

    def cancelled(self) -> bool:
        return self._future.cancelled()

    def result(self, timeout: float | None = None) -> MapResult:
        """Every result in input order, as ``map`` returns them; wait up to ``timeout`` s.

        Raises what ``map`` would raise (a :class:`~cloudmap.TaskError` whose ``results``
        hold what finished), ``concurrent.futures.CancelledError`` after :meth:`cancel`,
        and ``TimeoutError`` when the run is still going after ``timeout``.
        """
        return self._future.result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        return self._future.exception(timeout)

    def cancel(self) -> bool:
        """Stop the map: queued items are dropped and the slots running its tasks are
        restarted, as Ctrl-C does to a blocking map. Returns False when it had already
        ended. The results that arrived stay in :meth:`results_so_far`."""
        if self._future.done():
            return False
        self._engine.cancel()
        self._thread.join()
        return self._future.cancelled()

    def add_done_callback(self, fn: Callable[[MapRun], Any]) -> None:
        """Call ``fn(run)`` when the run ends (from the run's thread; at once if ended)."""
        self._future.add_done_callback(lambda _: fn(self))

    def __await__(self) -> Generator[Any, None, MapResult]:
        """``results = await run`` in a kernel's event loop (or any asyncio code)."""
        return asyncio.wrap_future(self._future).__await__()

    # -- beyond a Future ------------------------------------------------------------------

    def results_so_far(self) -> dict[int, Any]:
        """The results that have arrived, by item index (a copy; failed items are absent,
        or their :class:`~cloudmap.TaskError` with ``on_error="return"``)."""
        with self._lock:
            return {i: v for i, v in self._results.items() if v is not SKIPPED}

    @property
    def completed(self) -> int:
        """How many items have come back (failed and skipped ones included)."""
        return self._count

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the run to end; True if it did within ``timeout``."""
        done, _ = concurrent.futures.wait([self._future], timeout)
        return bool(done)

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        """In a notebook, a run shows as its progress display when it has a widget one."""
        shown = getattr(self.progress, "_repr_mimebundle_", None)
        if shown is not None:
            bundle: dict[str, Any] = shown()
            return bundle
        return {"text/plain": repr(self)}

    def __repr__(self) -> str:
        if self._future.cancelled():
            state = "cancelled"
        elif self._future.done():
            state = "failed" if self._future.exception() else "finished"
        else:
            state = "running"
        return f"<cloudmap.MapRun {self._label}: {state}, {self._count} items back>"

    # -- the run's thread ------------------------------------------------------------------

    def _collect(self) -> None:
        try:
            for indices, values in self._engine.chunks():
                with self._lock:
                    self._results.update(zip(indices, values, strict=True))
                    self._count += len(values)
        except concurrent.futures.CancelledError as exc:
            self.record = self._finish("cancelled", exc)
            self._future.cancel()
            return
        except BaseException as exc:
            if isinstance(exc, (TaskError, InputError)):
                with self._lock:
                    done = {i: v for i, v in self._results.items() if v is not SKIPPED}
                exc.results = {**done, **exc.results}
            self.record = self._finish("failed", exc)
            self._future.set_exception(exc)
            return
        with self._lock:
            ordered = [self._results[i] for i in sorted(self._results)]
        if self._skip_failed:
            ordered = [value for value in ordered if value is not SKIPPED]
        result = MapResult(ordered)
        result.record = self.record = self._finish("finished", None)
        self._future.set_result(result)
