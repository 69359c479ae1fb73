"""concurrent.futures on a pool: the Future that ``submit`` returns, and ``pool.executor()``.

A cloudmap Future *is* a ``concurrent.futures.Future``, so ``concurrent.futures.wait``,
``as_completed`` and ``asyncio.wrap_future`` work on it; its ``cancel()`` also withdraws
the task from the pool.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

from .cluster import DaskCluster, TaskHandle
from .errors import InputError, PoolClosedError
from .failures import Verdict, item_error, verdict
from .options import MapOptions
from .payload import CALL_ARGS, Batch, BatchResult, dump_function, dump_items_batch, load_result


class Future(concurrent.futures.Future[Any]):
    """The result of ``pool.submit``: a standard Future backed by one task on the pool.

    Its exception, when the function raised, is a :class:`cloudmap.TaskError` whose
    ``exception`` is the original error and ``remote_traceback`` the traceback on the node.
    A task lost only because it waited on a slot that died is sent again, transparently.
    """

    def __init__(
        self, cluster: DaskCluster, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: Any
    ) -> None:
        super().__init__()
        self._cluster = cluster
        self._item = (args, kwargs)
        # The call travels as a one-item batch of the map engine's wire format.
        batch = Batch(CALL_ARGS, None, None, range(1), [self._item])
        self._blobs = (dump_function(fn), dump_items_batch(batch))
        #: Times the task was sent again because its node was preempted or removed.
        self.preemptions = 0
        self._submit_to_pool()

    def _submit_to_pool(self) -> None:
        self._task = self._cluster.submit_batch(*self._blobs, "submit")
        self._cluster.on_result(self._task, self._settle_off_loop)

    def _settle_off_loop(self, task: TaskHandle, kind: str, value: Any) -> None:
        # Never run the user's done-callbacks on Dask's event loop: one that waited on the
        # pool (another result(), say) would block the loop that must answer it.
        _settler().submit(self._settle, task, kind, value)

    @property
    def key(self) -> str:
        """The Dask task key, to find the task on the Dask dashboard."""
        return self._task.key

    def running(self) -> bool:
        """True while a slot runs the call (slots report when they start a task)."""
        return not self.done() and self._cluster.started(self.key)

    def cancel(self) -> bool:
        """Cancel on the pool too. False if the task already finished (as in concurrent.futures)."""
        if not super().cancel():  # first, so the pool's own report cannot beat us to it
            return self.cancelled()
        self._task.cancel()
        return True

    def _settle(self, task: TaskHandle, kind: str, value: Any) -> None:
        """Runs on the settling thread when the task is over, however it ended: the failure
        policy (:func:`cloudmap.failures.verdict`) decides whether a lost task goes again."""
        try:
            if self.done():
                return
            if kind == "ok":
                self._set_outcome(load_result(value))
            elif kind == "cancelled":
                if not super().cancel():
                    self.set_exception(PoolClosedError("the pool closed before this task ran"))
            else:
                loss = self._cluster.loss_of(task.key, value)
                decided = verdict(loss, 1)
                if decided is Verdict.REQUEUE_PREEMPTED:
                    self.preemptions += 1
                    self._submit_to_pool()
                elif decided in (Verdict.REQUEUE_LOST, Verdict.RESEND):
                    self._submit_to_pool()
                else:  # documented: a submitted call's slot death is its own exception
                    self.set_exception(loss.error)
        except concurrent.futures.InvalidStateError:
            pass  # cancelled by the user while the result arrived
        finally:
            self._cluster.forget(task.key)
            task.release()

    def _set_outcome(self, result: BatchResult) -> None:
        error = result.errors.get(0)
        if error is None:
            self.set_result(result.values[0])
            return
        failure = item_error(0, error, result.worker, item=self._item, preemptions=self.preemptions)
        self.set_exception(failure)


_settling_thread: concurrent.futures.ThreadPoolExecutor | None = None
_settling_lock = threading.Lock()


def _settler() -> concurrent.futures.ThreadPoolExecutor:
    """One thread that settles every submitted Future, in order of completion."""
    global _settling_thread
    with _settling_lock:
        if _settling_thread is None:
            _settling_thread = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="cloudmap-settle"
            )
        return _settling_thread


#: As concurrent.futures says it; a PoolClosedError is a RuntimeError too, as there.
_SHUT_DOWN = "cannot schedule new futures after shutdown: this executor was shut down"


class ExecutorBackend(Protocol):
    """What an executor needs of its pool: ``submit``, and streaming maps."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future: ...

    def imap(
        self,
        fn: Callable[..., Any],
        iterables: tuple[Iterable[Any], ...],
        options: MapOptions,
        *,
        ordered: bool,
        deadline: float | None = None,
    ) -> Iterator[Any]: ...


class PoolExecutor(concurrent.futures.Executor):
    """A ``concurrent.futures.Executor`` view of a pool (``pool.executor()``).

    ``submit`` returns :class:`Future`; ``map`` streams through the pool's batching engine
    (``chunksize`` is ignored: batches are sized from timings). ``shutdown`` stops this
    executor taking work; it does not close the pool.
    """

    def __init__(self, backend: ExecutorBackend, **map_options: Any) -> None:
        self._backend = backend
        self._options = MapOptions.from_keywords(map_options, "executor()", progress=False)
        self._shutdown = False
        self._futures: set[concurrent.futures.Future[Any]] = set()
        self._lock = threading.Lock()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        if self._options.inputs or self._options.outputs:
            raise InputError(
                "this executor stages files (inputs=/outputs=), which executor.map does and "
                "submit does not; use executor.map, pool.map or pool.run for staged work, or an "
                "executor without inputs=/outputs= for submit"
            )
        if self._options.cache is not None:
            raise InputError(
                "this executor caches results (cache=), which executor.map does and submit "
                "does not; use executor.map or pool.map for cached work, or an executor "
                "without cache= for submit"
            )
        with self._lock:
            if self._shutdown:
                raise PoolClosedError(_SHUT_DOWN)
            future = self._backend.submit(fn, *args, **kwargs)
            self._futures.add(future)
        future.add_done_callback(self._forget)
        return future

    def _forget(self, future: concurrent.futures.Future[Any]) -> None:
        with self._lock:
            self._futures.discard(future)

    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
        **_: Any,
    ) -> Iterator[Any]:
        if self._shutdown:
            raise PoolClosedError(_SHUT_DOWN)
        deadline = None if timeout is None else time.monotonic() + timeout
        return self._backend.imap(fn, iterables, self._options, ordered=True, deadline=deadline)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shutdown = True
            pending = list(self._futures)
        if cancel_futures:
            for future in pending:
                future.cancel()
        if wait:
            concurrent.futures.wait(pending)
