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

from .errors import PoolClosedError, TaskError, WorkerLostError
from .nodes import node_of
from .payload import load_result

if TYPE_CHECKING:
    import distributed

    from .pool import Pool


class Future(concurrent.futures.Future[Any]):
    """The result of ``pool.submit``: a standard Future backed by one task on the pool.

    Its exception, when the function raised, is a :class:`cloudmap.TaskError` whose
    ``exception`` is the original error and ``remote_traceback`` the traceback on the node.
    """

    def __init__(self, dask_future: distributed.Future, item: Any) -> None:
        super().__init__()
        self.dask_future = dask_future
        self._item = item
        dask_future.add_done_callback(self._settle)

    @property
    def key(self) -> str:
        """The Dask task key, to find the task on the Dask dashboard."""
        return str(self.dask_future.key)

    def cancel(self) -> bool:
        """Cancel on the pool too. False if the task already finished (as in concurrent.futures)."""
        if self.done():
            return self.cancelled()
        self.dask_future.cancel()
        return super().cancel()

    def _settle(self, dask_future: distributed.Future) -> None:
        if self.done():
            return
        try:
            status = dask_future.status
            if status == "finished":
                result = load_result(dask_future.result())
                error = result.errors.get(0)
                if error is None:
                    self.set_result(result.values[0])
                else:
                    self.set_exception(
                        TaskError(
                            0,
                            exception=error.exception(),
                            remote_traceback=error.traceback,
                            worker=result.worker,
                            node=node_of(result.worker),
                            item=self._item,
                        )
                    )
            elif status == "cancelled":
                if not super().cancel():
                    self.set_exception(PoolClosedError("the pool closed before this task ran"))
            else:
                exc = dask_future.exception()
                if isinstance(exc, KilledWorker):
                    exc = WorkerLostError(f"the slot process running this task died: {exc}")
                self.set_exception(exc)
        except concurrent.futures.InvalidStateError:
            pass  # cancelled by the user while the result arrived
        except BaseException as exc:
            if not self.done():
                self.set_exception(exc)


class PoolExecutor(concurrent.futures.Executor):
    """A ``concurrent.futures.Executor`` view of a pool (``pool.executor()``).

    ``submit`` returns :class:`Future`; ``map`` streams through the pool's batching engine
    (``chunksize`` is ignored: batches are sized from timings). ``shutdown`` stops this
    executor taking work; it does not close the pool.
    """

    def __init__(self, pool: Pool, **map_options: Any) -> None:
        self._pool = pool
        self._map_options = map_options
        self._shutdown = False
        self._futures: set[concurrent.futures.Future[Any]] = set()
        self._lock = threading.Lock()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
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
        options = {"progress": False, **self._map_options}
        return self._pool._imap(fn, iterables, ordered=True, deadline=deadline, **options)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shutdown = True
            pending = list(self._futures)
        if cancel_futures:
            for future in pending:
                future.cancel()
        if wait:
            concurrent.futures.wait(pending)
