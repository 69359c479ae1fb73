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
from typing import TYPE_CHECKING, Any

from distributed.scheduler import KilledWorker

from .cluster import DaskCluster
from .engine import MAX_FREE_REQUEUES, MapOptions
from .errors import InputError, PoolClosedError, TaskError, WorkerLostError
from .nodes import node_of
from .payload import BatchResult, load_result

if TYPE_CHECKING:
    import distributed

    from .pool import Pool


class Future(concurrent.futures.Future[Any]):
    """The result of ``pool.submit``: a standard Future backed by one task on the pool.

    Its exception, when the function raised, is a :class:`cloudmap.TaskError` whose
    ``exception`` is the original error and ``remote_traceback`` the traceback on the node.
    A task lost only because it waited on a slot that died is sent again, transparently.
    """

    def __init__(self, cluster: DaskCluster, fn_blob: bytes, batch_blob: bytes, item: Any):
        super().__init__()
        self._cluster = cluster
        self._blobs = (fn_blob, batch_blob)
        self._item = item
        self._free_requeues = MAX_FREE_REQUEUES
        #: Times the task was sent again because its node was preempted or removed.
        self.preemptions = 0
        self._submit_to_pool()

    def _submit_to_pool(self) -> None:
        self.dask_future = self._cluster.submit_batch(*self._blobs, "submit")
        self._cluster.on_result(self.dask_future, self._settle_off_loop)

    def _settle_off_loop(self, dask_future: distributed.Future, kind: str, value: Any) -> None:
        # Never run the user's done-callbacks on Dask's event loop: one that waited on the
        # pool (another result(), say) would block the loop that must answer it.
        _settler().submit(self._settle, dask_future, kind, value)

    @property
    def key(self) -> str:
        """The Dask task key, to find the task on the Dask dashboard."""
        return str(self.dask_future.key)

    def running(self) -> bool:
        """True while a slot runs the call (slots report when they start a task)."""
        return not self.done() and self._cluster.started(self.key)

    def cancel(self) -> bool:
        """Cancel on the pool too. False if the task already finished (as in concurrent.futures)."""
        if not super().cancel():  # first, so the pool's own report cannot beat us to it
            return self.cancelled()
        self.dask_future.cancel()
        return True

    def _settle(self, dask_future: distributed.Future, kind: str, value: Any) -> None:
        """Runs on the settling thread when the task is over, however it ended."""
        key = str(dask_future.key)
        try:
            if self.done():
                return
            if kind == "ok":
                self._set_outcome(load_result(value))
            elif kind == "cancelled":
                if not super().cancel():
                    self.set_exception(PoolClosedError("the pool closed before this task ran"))
            elif (cause := self._cluster.loss_cause(key, value)) == "evicted":
                self.preemptions += 1
                self._submit_to_pool()
            elif cause == "queued" and self._free_requeues > 0:
                self._free_requeues -= 1
                self._submit_to_pool()
            else:
                if isinstance(value, KilledWorker):
                    value = WorkerLostError(f"the slot process running this task died: {value}")
                self.set_exception(value)
        except concurrent.futures.InvalidStateError:
            pass  # cancelled by the user while the result arrived
        finally:
            self._cluster.forget(key)
            dask_future.release()

    def _set_outcome(self, result: BatchResult) -> None:
        error = result.errors.get(0)
        if error is None:
            self.set_result(result.values[0])
            return
        self.set_exception(
            TaskError(
                0,
                exception=error.exception(),
                remote_traceback=error.traceback,
                worker=result.worker,
                node=node_of(result.worker),
                preemptions=self.preemptions,
                item=self._item,
            )
        )


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


class PoolExecutor(concurrent.futures.Executor):
    """A ``concurrent.futures.Executor`` view of a pool (``pool.executor()``).

    ``submit`` returns :class:`Future`; ``map`` streams through the pool's batching engine
    (``chunksize`` is ignored: batches are sized from timings). ``shutdown`` stops this
    executor taking work; it does not close the pool.
    """

    def __init__(self, pool: Pool, **map_options: Any) -> None:
        self._pool = pool
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
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            future = self._pool.submit(fn, *args, **kwargs)
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
            raise RuntimeError("cannot schedule new futures after shutdown")
        deadline = None if timeout is None else time.monotonic() + timeout
        return self._pool._imap(fn, iterables, self._options, ordered=True, deadline=deadline)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shutdown = True
            pending = list(self._futures)
        if cancel_futures:
            for future in pending:
                future.cancel()
        if wait:
            concurrent.futures.wait(pending)
