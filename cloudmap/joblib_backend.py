"""joblib's ``"cloudmap"`` backend: ``Parallel`` (and scikit-learn's ``n_jobs``) on a pool.

::

    with cloudmap.Pool(nodes=4) as pool, joblib.parallel_config(backend="cloudmap"):
        results = joblib.Parallel(n_jobs=-1)(joblib.delayed(f)(x) for x in xs)
        GridSearchCV(model, grid, n_jobs=-1).fit(X, y)

How it maps onto the pool, and why:

- **Which pool.** The pool is looked up when a ``Parallel`` call starts, not when
  ``parallel_config`` is entered: the current pool (:func:`cloudmap.current_pool`, the
  innermost ``with pool:``, else the default local pool), or the one given as
  ``parallel_config(backend="cloudmap", pool=pool)`` for a pool used without ``with``.
- **n_jobs.** ``-1`` (and the default, as for Dask's backend) is every slot of the pool;
  ``-2`` all but one, as joblib counts CPUs. A positive ``n_jobs`` is taken as given.
  joblib runs ``n_jobs == 1`` in the calling process, as it does for every backend.
- **Batches.** joblib groups calls into batches (auto-batching, aiming at 0.2-1 s a batch,
  as Dask's backend); each batch is one ``pool.submit``, so one task on one slot.
- **Results and errors.** Each batch's :class:`cloudmap.Future` calls joblib back when it
  settles (joblib's ``submit`` and ``retrieve_result_callback``; joblib before 1.5 calls
  ``submit`` ``apply_async``), so
  ``return_as="generator"`` and ``timeout=`` work. A call that raised on a node raises the
  original exception, with the :class:`cloudmap.TaskError` (node, remote traceback) as its
  cause. On the first error (or a timeout) the batches still queued are cancelled.
- **Nesting.** A slot is one process with one thread, so ``Parallel`` calls made inside a
  task run sequentially there (also when the task asks for ``backend="cloudmap"``): no
  oversubscription, and no pool started on a node.
- **Not supported.** ``require="sharedmem"`` (joblib then uses threads in this process, as
  for any process backend), ``inner_max_num_threads``, joblib's memmapping of large arrays
  (``max_nbytes``, ``mmap_mode``, ``temp_folder`` are ignored: arguments travel pickled
  with each batch that uses them; put large data where the nodes read it). Calls are not
  seeded or retried by cloudmap: joblib hands over opaque batches.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future as StdFuture
from typing import Any

from joblib.parallel import (
    AutoBatchingMixin,
    FallbackToBackend,
    ParallelBackendBase,
    SequentialBackend,
)

from . import current
from .errors import InputError, TaskError
from .module_api import current_pool
from .nodes import NodeState
from .pool import Pool

#: Node states whose slots count for ``n_jobs=-1``: serving, or about to.
_SERVING = {NodeState.CREATING, NodeState.STARTING, NodeState.IDLE, NodeState.RUNNING}


def pool_slots(pool: Pool) -> int:
    """Slots that can run a batch now or soon: those of nodes that serve or are starting;
    with none (an autoscaled pool at zero), one node's worth, as the map engine plans."""
    slots = sum(node.slots for node in pool.nodes() if node.state in _SERVING)
    return slots or pool.spec.slots_per_node


class CloudmapBackend(AutoBatchingMixin, ParallelBackendBase):
    """The joblib backend that sends each batch of calls to a slot of a cloudmap pool.

    Parameters
    ----------
    pool : cloudmap.Pool, optional
        The pool to use; by default the current pool when each ``Parallel`` call starts.

    Examples
    --------
    >>> import joblib, cloudmap                                    # doctest: +SKIP
    >>> with cloudmap.Pool(nodes=2) as pool, joblib.parallel_config(backend="cloudmap"):
    ...     joblib.Parallel(n_jobs=-1)(joblib.delayed(abs)(-i) for i in range(4))
    [0, 1, 2, 3]
    """

    supports_retrieve_callback = True
    supports_sharedmem = False
    uses_threads = False
    default_n_jobs = -1
    MIN_IDEAL_BATCH_DURATION = 0.2
    MAX_IDEAL_BATCH_DURATION = 1.0

    def __init__(
        self,
        nesting_level: int | None = None,
        inner_max_num_threads: int | None = None,
        pool: Pool | None = None,
        **unknown: Any,
    ) -> None:
        if unknown:
            raise InputError(
                f"joblib's cloudmap backend does not take {', '.join(sorted(unknown))}; "
                "its only option is pool= (a cloudmap.Pool), e.g. "
                'joblib.parallel_config(backend="cloudmap", pool=pool)'
            )
        if pool is not None and not isinstance(pool, Pool):
            raise InputError(
                f"pool={pool!r} is not a cloudmap.Pool: pass the pool to run on, or leave it "
                "out to use the current pool (the enclosing `with pool:` block's)"
            )
        super().__init__(nesting_level=nesting_level, inner_max_num_threads=inner_max_num_threads)
        self._given_pool = pool
        self._pool: Pool | None = None
        self._futures: set[StdFuture[Any]] = set()
        self._futures_lock = threading.Lock()

    def __reduce__(self) -> tuple[Any, ...]:
        # A pool does not travel; a copy of the backend picks the current pool where used.
        return (CloudmapBackend, ())

    def _target(self) -> Pool:
        return self._given_pool if self._given_pool is not None else current_pool()

    # -- joblib's calls -------------------------------------------------------------------

    def effective_n_jobs(self, n_jobs: int | None) -> int:
        """How many batches joblib may plan to run at once (``-1``: every slot)."""
        if n_jobs == 0:
            raise InputError(
                "n_jobs=0 asks for no worker at all: pass n_jobs=-1 for every slot of the "
                "pool, or a positive number"
            )
        if current.on_a_node():
            return 1
        if n_jobs is None:
            n_jobs = self.default_n_jobs
        if n_jobs < 0:
            return max(pool_slots(self._target()) + 1 + n_jobs, 1)
        return n_jobs

    def configure(
        self,
        n_jobs: int | None = 1,
        parallel: Any = None,
        prefer: str | None = None,
        require: str | None = None,
        **_ignored: Any,  # joblib's memmapping options: see the module docstring
    ) -> int:
        """Pick the pool for this ``Parallel`` call; inside a task, run sequentially."""
        self.parallel = parallel
        if current.on_a_node():
            raise FallbackToBackend(SequentialBackend(nesting_level=self.nesting_level))
        self._pool = self._target()
        return self.effective_n_jobs(n_jobs)

    def submit(self, func: Any, callback: Any = None) -> StdFuture[Any]:
        """Send one batch of calls to a slot; ``callback`` runs when it settles."""
        pool = self._pool if self._pool is not None else self._target()
        future = pool.submit(func)
        with self._futures_lock:
            self._futures.add(future)
        future.add_done_callback(self._forget)
        if callback is not None:
            future.add_done_callback(callback)
        return future

    def apply_async(self, func: Any, callback: Any = None) -> StdFuture[Any]:
        """:meth:`submit` under the name joblib before 1.5 calls."""
        return self.submit(func, callback)

    def _forget(self, future: StdFuture[Any]) -> None:
        with self._futures_lock:
            self._futures.discard(future)

    def retrieve_result_callback(self, out: StdFuture[Any]) -> Any:
        """The batch's results; a call that raised raises its own exception here."""
        try:
            return out.result()
        except TaskError as error:
            raise error.exception from error

    def abort_everything(self, ensure_ready: bool = True) -> None:
        """Cancel the batches not finished yet (joblib will not use their results)."""
        with self._futures_lock:
            pending = list(self._futures)
            self._futures.clear()
        for future in pending:
            future.cancel()

    def terminate(self) -> None:
        self._pool = None
        self.reset_batch_stats()

    def get_nested_backend(self) -> tuple[ParallelBackendBase, int | None]:
        """``Parallel`` inside a task: sequential in its slot (one process, one thread)."""
        return SequentialBackend(nesting_level=(self.nesting_level or 0) + 1), None
