"""The public face: ``cloudmap.Pool``, its calls and its lifetime.

A Pool puts the layers together and delegates to them: the options are checked in
:mod:`cloudmap.options`, the Dask scheduler is :mod:`cloudmap.cluster`, the nodes come from
a provider and are seen through :class:`~cloudmap.nodes.NodeView`, the size over time is the
:class:`~cloudmap.scaling.Scaler`'s, maps and submits are :class:`~cloudmap.work.Work`, MPI
runs are :mod:`cloudmap.mpi`'s, and displays are :mod:`cloudmap.widgets`'. It never knows how
a provider makes nodes.
"""

from __future__ import annotations

import concurrent.futures
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from .autoscale import Autoscale
from .cluster import DaskCluster, SchedulerUnreachableError
from .errors import InputError, PoolClosedError, PoolStartError
from .futures import Future, PoolExecutor
from .gang import GangScheduler
from .jobs import Job, JobStep
from .lifetime import ClusterNodeEvents, teardown, wait_for_first_slot
from .mpi import MpiResult, MpiRunner, RunOptions
from .nodes import NodeFiles, NodeInfo, NodeView
from .options import START_TIMEOUT, MapOptions, PoolOptions, autoscale_policy, resize_targets
from .progress import ProgressReporter, in_jupyter_kernel, make_reporter, set_notebook_reporter
from .providers import PoolSpec, Provider
from .providers.base import StartTask
from .record import MapResult, RecordMaker, RunRecord
from .runs import MapRun
from .samples import ScalingSample, TaskCounts
from .scaling import Scaler
from .share import Shared, T, share
from .staging import Output
from .watching import FuturesWatch
from .work import Work

if TYPE_CHECKING:
    from .widgets.pool_widget import PoolWidget

CLOSED = "this pool is closed; create a new cloudmap.Pool(...) to run more work"


class Pool:
    """A pool of compute nodes running your Python functions, in the Azure Batch model.

    Parameters
    ----------
    provider : str
        Where nodes live: ``"local"`` (processes on this machine, the default) or another
        registered provider (see ``cloudmap.providers.known_providers()``).
    nodes : int, optional
        Dedicated nodes to start. Default for ``local``: one per CPU core / slots_per_node
        (0 with ``autoscale``).
    spot_nodes : int
        Spot (low-priority) nodes to start: cheaper, but the provider may preempt them; their
        running tasks are then requeued without spending ``retries``.
    autoscale : cloudmap.Autoscale, optional
        Let the pool size itself to the work queued (see :meth:`autoscale`).
    slots_per_node : int
        Task slots per node; each slot is one worker process with one thread.
    start_task : str or callable, optional
        Shell command or Python callable run on each node before its slots join. A node
        whose start task fails is shown as ``start_failed`` with its stdout and stderr.
    start_task_timeout : float, optional
        Seconds after which a start task is killed and its node marked ``start_failed``.
    env : dict, optional
        Environment variables for start tasks and slots.
    resource_files : list, optional
        Files every node downloads into its shared directory (``CLOUDMAP_NODE_SHARED_DIR``)
        as it starts, before the start task: fsspec URLs (kept under their file name) or
        ``(url, path)`` pairs, as Batch's resource files.
    packages : list of str, optional
        pip requirements installed on every node as it starts (into the node's own
        ``packages`` directory, first on the slots' import path). A failure leaves the
        node ``start_failed`` with pip's output.
    storage_options : dict, optional
        fsspec options (credentials) for ``resource_files``; never shown.
    start_timeout : float, optional
        Seconds to wait for the first node; then the pool is torn down and
        :class:`~cloudmap.PoolStartError` raised. Default: 120 s, or the provider's own
        (15 minutes for Azure, whose VMs take minutes to boot).
    tls : bool, optional
        Encrypt and authenticate every connection (client, scheduler, slots) with
        temporary certificates made for this pool; a Dask client or worker without them is
        refused. None takes the provider's default: off for local processes, on for Azure.
    **provider_options
        Passed to the provider (local: ``root=``, ``keep_files=``, ``eviction=``,
        ``restore_after=``).

    Examples
    --------
    >>> import cloudmap
    >>> with cloudmap.Pool(nodes=2) as pool:           # doctest: +SKIP
    ...     squares = pool.map(lambda x: x * x, range(10))
    """

    def __init__(
        self,
        provider: str = "local",
        *,
        nodes: int | None = None,
        spot_nodes: int = 0,
        autoscale: Autoscale | None = None,
        slots_per_node: int = 1,
        start_task: StartTask = None,
        start_task_timeout: float | None = None,
        env: dict[str, str] | None = None,
        resource_files: Sequence[str | tuple[str, str]] = (),
        packages: Sequence[str] = (),
        storage_options: dict[str, Any] | None = None,
        start_timeout: float | None = None,
        tls: bool | None = None,
        **provider_options: Any,
    ) -> None:
        checked = PoolOptions(
            provider,
            nodes=nodes,
            spot_nodes=spot_nodes,
            autoscale=autoscale,
            slots_per_node=slots_per_node,
            start_task=start_task,
            start_task_timeout=start_task_timeout,
            env=env,
            resource_files=resource_files,
            packages=packages,
            storage_options=storage_options,
            start_timeout=start_timeout,
            tls=tls,
            provider_options=provider_options,
        ).checked()
        self.spec = checked.spec
        self._closed = threading.Event()
        self._close_lock = threading.Lock()
        self._widget: PoolWidget | None = None
        self._widget_lock = threading.Lock()
        self.provider: Provider | None = None
        self._scaler: Scaler | None = None
        made = checked.provider_class(self.spec, **provider_options)  # makes nothing yet
        if made.hosts_scheduler:
            self._cluster = DaskCluster.remote(reconnect_timeout=made.reconnect_timeout)
        else:
            host, port = checked.provider_class.listen_address(provider_options)
            slots = (self.spec.nodes + self.spec.spot_nodes) * self.spec.slots_per_node
            self._cluster = DaskCluster(host, port=port, tls=checked.tls, slots=slots)
        try:
            self.provider = made
            parts = _assemble(self._cluster, made, self.spec, autoscale, self._closed)
            self._view, self._scaler, self._gang, self._work, self._mpi, self._backlog = parts
            # Nothing the parts hold refers to the pool: a pool nobody holds is collected,
            # and this finalizer tears it down.
            self._finalizer = weakref.finalize(self, teardown, self._scaler, made, self._cluster)
            made.start(self._cluster.scheduler_address)
            if made.hosts_scheduler:
                _connect_to_hosted_scheduler(self._cluster, made, checked.start_timeout)
            self._scaler.start()
            if self.spec.nodes or self.spec.spot_nodes:
                wait_for_first_slot(self._cluster, made, self.spec, checked.start_timeout)
        except BaseException:
            self._closed.set()
            teardown(self._scaler, made, self._cluster)
            raise

    @classmethod
    def plan(cls, provider: str, /, **options: Any) -> dict[str, Any]:
        """What a new pool would ask its provider for, as JSON-ready data, secrets hidden.

        Takes ``Pool``'s arguments and creates nothing, needing no credentials::

            cloudmap.Pool.plan("azure", vm_size="Standard_D4s_v5", nodes=2, ...)

        For Azure: the exact "add pool" body (``vmSize``, ``targetDedicatedNodes``,
        ``targetLowPriorityNodes``, ``taskSlotsPerNode``, ``startTask``, ...).
        ``python -m cloudmap plan`` prints it; :meth:`planned` shows a live pool's.
        """
        checked = PoolOptions.from_keywords(provider, options).checked()
        return checked.provider_class.plan(checked.spec, **checked.provider_options)

    def planned(self) -> dict[str, Any]:
        """What this pool asked its provider for, as :meth:`plan` shows it (secrets hidden)."""
        return self._provider().planned()

    # -- lifetime -------------------------------------------------------------------------

    def close(self) -> None:
        """Remove every node and stop the scheduler. Safe to call twice."""
        with self._close_lock:
            if self._closed.is_set():
                return
            self._closed.set()
        self._finalizer()

    def __enter__(self) -> Pool:
        """Make this the current pool (``cloudmap.map``, joblib's ``"cloudmap"`` backend)
        until the block ends; the block's end closes it."""
        from . import current

        current.push(self)
        return self

    def __exit__(self, *exc_info: object) -> None:
        from . import current

        current.pop(self)
        self.close()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def _provider(self) -> Provider:
        if self._closed.is_set() or self.provider is None:
            raise PoolClosedError(CLOSED)
        return self.provider

    def _scaling(self) -> Scaler:
        self._provider()
        assert self._scaler is not None
        return self._scaler

    # -- size ------------------------------------------------------------------------------

    def resize(
        self,
        nodes: int | None = None,
        spot_nodes: int | None = None,
        *,
        deallocation: str = "requeue",
    ) -> None:
        """Set the pool's target node counts; nodes are added or removed in the background.

        Parameters
        ----------
        nodes, spot_nodes : int, optional
            New targets for dedicated and spot nodes; None keeps a target as it is. As in
            Batch, preempted and failed nodes count toward them.
        deallocation : {"requeue", "taskcompletion"}
            How removed nodes leave: ``requeue`` stops them at once and sends their running
            tasks back to the queue (without spending retries); ``taskcompletion`` gives
            them no new task and lets them leave when their running tasks finish.

        Nodes that serve nothing go first (preempted, failed, still starting), then the
        longest idle. Call :meth:`wait_for_nodes` to wait for new nodes.
        """
        scaler = self._scaling()
        targets = resize_targets(scaler.targets, nodes, spot_nodes, type(self._provider()))
        scaler.resize(*targets, deallocation)

    def autoscale(
        self, policy: Autoscale | bool | None = True, **settings: Any
    ) -> Autoscale | None:
        """Turn autoscale on, change it, or turn it off, on a live pool; return the policy.

        ``pool.autoscale(cloudmap.Autoscale(max_nodes=16))`` sets a policy;
        ``pool.autoscale(max_nodes=16)`` changes fields of the current one (or of the
        default policy); ``pool.autoscale(None)`` (or ``False``) stops autoscaling and keeps
        the nodes the pool has. The policy adds nodes when tasks are queued, removes nodes
        idle for ``idle_timeout``, and replaces preempted spot nodes.
        """
        scaler = self._scaling()
        new = autoscale_policy(scaler.policy, policy, settings, type(self._provider()))
        scaler.set_policy(new)
        return new

    @property
    def targets(self) -> tuple[int, int]:
        """The (dedicated, spot) node counts the pool is heading for."""
        return self._scaling().targets

    @property
    def autoscaling(self) -> Autoscale | None:
        """The autoscale policy in force, or None when the pool keeps its targets."""
        return self._scaling().policy

    def task_counts(self) -> TaskCounts:
        """Dask tasks of this pool right now: queued (on the scheduler, plus what maps have
        not sent yet), running, and finished since the pool started. A map sends its items
        in batches, so one task may hold many items."""
        self._provider()
        running, waiting = self._cluster.work_counts()
        return TaskCounts(
            queued=waiting + self._backlog(), running=running, done=self._cluster.finished_tasks
        )

    def allocation_errors(self) -> list[str]:
        """Why the pool is short of its targets, in the provider's words, e.g. Batch's
        ``AccountCoreQuotaReached: ...`` when the account's core quota stops a resize.
        Empty when the pool holds its targets, or nothing is known to stand in the way.
        Looked at every few seconds while the pool is short, and logged once as a warning.
        """
        return self._scaling().allocation_errors()

    def scaling_history(self) -> list[ScalingSample]:
        """The pool over time: targets and node counts by kind, nodes by state, tasks queued
        and running, as :class:`~cloudmap.ScalingSample` objects, oldest first.

        A sample is taken at each evaluation: every second (the autoscale ``interval``), and
        at once after a resize, a policy change or work reaching an empty pool. The last
        3,600 are kept, about an hour.
        """
        return self._scaling().history()

    # -- Dask ------------------------------------------------------------------------------

    @property
    def client(self) -> Any:
        """The ``distributed.Client`` of this pool, for using Dask directly."""
        self._provider()
        return self._cluster.client

    @property
    def security(self) -> Any:
        """The ``distributed.Security`` of a TLS pool (None without TLS), which
        ``distributed.Client(pool)`` picks up to connect."""
        return self._cluster.security

    @property
    def scheduler_address(self) -> str:
        """The Dask scheduler's address, so that ``distributed.Client(pool)`` works (for a
        scheduler on a node: its public endpoint)."""
        return str(self._cluster.scheduler_address)

    @property
    def status(self) -> Any:
        """Dask's ``Status`` of the pool, which ``distributed.Client(pool)`` checks."""
        return self._cluster.status_for(closed=self._closed.is_set())

    @property
    def dashboard_link(self) -> str | None:
        return self._cluster.dashboard_link

    # -- nodes -----------------------------------------------------------------------------

    def nodes(self) -> list[NodeInfo]:
        """Every node with its state: the provider's word, merged with the scheduler's."""
        self._provider()
        return self._view.nodes()

    def wait_for_nodes(self, count: int | None = None, timeout: float = START_TIMEOUT) -> None:
        """Block until ``count`` nodes have every slot connected (default: the targets,
        less the nodes that will not serve: failed, or preempted for good).

        ``Pool(...)`` returns as soon as one slot can take work; call this before timing
        something, or to fail early when nodes cannot start.
        """
        self._provider()
        self._view.wait_for(count, lambda: self.targets, timeout)

    def node(self, node_id: str) -> NodeFiles:
        """One node's files: ``pool.node("node-0").read_file("startup/stdout.txt")``."""
        if node_id not in {n.id for n in self._provider().list_nodes()}:
            raise InputError(f"there is no node {node_id!r} in this pool; see pool.nodes()")
        return NodeFiles(self._provider(), node_id)

    # -- work ------------------------------------------------------------------------------

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        """Run ``fn(*args, **kwargs)`` on a slot; return a ``concurrent.futures.Future``.

        >>> future = pool.submit(pow, 2, 10)    # doctest: +SKIP
        >>> future.result()                     # doctest: +SKIP
        1024
        """
        return self._work.submit(fn, *args, **kwargs)

    def share(self, obj: T, /) -> Shared[T]:
        """Send ``obj`` to each node once; tasks that use the handle get the object itself.

        A function that closes over a large object (an array, a model, a table) carries
        it in every task; the handle pickles as a name, and each node fetches the object
        once, when its first task needs it (a node that joins later too). On the client,
        ``handle.result()`` gives the object back; ``handle.transfers()`` counts the fetches
        by node. The object lives until the pool closes; treat it as read-only.

        Raises :class:`~cloudmap.SerializationError` at once if ``obj`` cannot be pickled.

        >>> big = pool.share(np.arange(10_000_000.0))                      # doctest: +SKIP
        >>> sums = pool.map(lambda i: big[i::1000].sum(), range(1000))     # doctest: +SKIP
        """
        self._provider()
        return share(obj, self._cluster.client)

    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        seed: int | None = None,
        batch_size: int | None = None,
        retries: int = 0,
        timeout: float | None = None,
        on_error: str = "raise",
        progress: Any = None,
        inputs: str | Sequence[str] | None = None,
        outputs: str | Output | Sequence[str | Output] | None = None,
        storage_options: dict[str, Any] | None = None,
        capture_output: bool = True,
        cache: Any = None,
    ) -> MapResult:
        """Call ``fn`` once per item (or per tuple of items from several iterables).

        Returns the results as a list in input order, with the run's
        :class:`~cloudmap.RunRecord` as ``.record``. Items are sent in batches sized from
        timings (``batch_size=`` fixes it). With ``seed=``, ``fn`` also gets ``rng=``, a
        ``numpy.random.Generator`` of its own, the same for any node count or batching.

        Parameters
        ----------
        retries : int
            Extra attempts for an item whose call raises or whose slot dies.
        timeout : float, optional
            Seconds one attempt of one item may run; then its slot process is ended (and
            replaced) and the attempt fails with ``TaskTimeoutError``.
        on_error : {"raise", "return", "skip"}
            On an item that failed every attempt: raise its :class:`~cloudmap.TaskError`
            (finished results are in its ``.results``), put the TaskError in its place in
            the list, or leave it out.
        progress : bool or reporter, optional
            A progress bar; by default shown when there is a terminal or a notebook.
        inputs, outputs : str, cloudmap.Output or a list of them, optional
            Files in storage (any fsspec URL: ``file://``, ``abfs://``...), as templates
            filled per item with ``{item}`` and ``{index}``. Inputs are downloaded into a
            fresh working directory for each attempt, where ``fn`` runs; outputs are the
            files named by the URLs' last component, uploaded after the call (on success by
            default; ``cloudmap.Output(url, on="failure" | "always")``).
        storage_options : dict, optional
            Passed to fsspec for every URL (for Azure Blob: ``connection_string=`` or
            ``account_name=`` and ``credential=``); sent to the nodes inside the pickled
            task, never shown.
        capture_output : bool
            Show what the function prints and logs under the cell (or in the terminal),
            each line prefixed by its item's index and node, rate-limited; False leaves it
            in the slots' logs only.
        cache : str, optional
            A folder or fsspec URL where each result is kept as it arrives, under a key of
            the function's code and closure, the item, its index and the seed: running the
            same map again computes only what is missing there.

        >>> pool.map(lambda x, y: x + y, [1, 2], [10, 20])    # doctest: +SKIP
        [11, 22]
        """
        options = MapOptions(
            seed,
            batch_size,
            retries,
            timeout,
            on_error,
            progress,
            inputs,
            outputs,
            storage_options,
            capture_output,
            cache,
        )
        return self._work.map_all(fn, iterables, options)

    def map_async(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        seed: int | None = None,
        batch_size: int | None = None,
        retries: int = 0,
        timeout: float | None = None,
        on_error: str = "raise",
        progress: Any = None,
        inputs: str | Sequence[str] | None = None,
        outputs: str | Output | Sequence[str | Output] | None = None,
        storage_options: dict[str, Any] | None = None,
        capture_output: bool = True,
        cache: Any = None,
    ) -> MapRun:
        """Start :meth:`map` in the background and return a :class:`~cloudmap.MapRun` at once.

        The cell (and a dashboard's widgets) stay free while it runs. The run has
        ``.progress`` (its display; pass ``progress=cloudmap.ProgressWidget(display=False)``
        to place it yourself), ``.done()``, ``.result(timeout)``, ``.results_so_far()``,
        ``.cancel()`` and ``.record``, and ``await run`` gives the results in a kernel's
        event loop. Bad input raises here, before any work. Options are :meth:`map`'s.

        >>> run = pool.map_async(simulate, range(10_000), seed=1)   # doctest: +SKIP
        >>> run.results_so_far()                                      # doctest: +SKIP
        {0: 0.31, 3: 0.97, ...}
        >>> run.cancel()                                              # doctest: +SKIP
        """
        options = MapOptions(
            seed=seed,
            batch_size=batch_size,
            retries=retries,
            timeout=timeout,
            on_error=on_error,
            progress=progress,
            inputs=inputs,
            outputs=outputs,
            storage_options=storage_options,
            capture_output=capture_output,
            cache=cache,
        )
        return self._work.map_async(fn, iterables, options)

    def last_run(self) -> RunRecord | None:
        """The :class:`~cloudmap.RunRecord` of the map (or run) that started last on this
        pool, finished or not; None before the first."""
        return self._work.last_record

    def imap(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        ordered: bool = True,
        seed: int | None = None,
        batch_size: int | None = None,
        retries: int = 0,
        timeout: float | None = None,
        on_error: str = "raise",
        progress: Any = None,
        inputs: str | Sequence[str] | None = None,
        outputs: str | Output | Sequence[str | Output] | None = None,
        storage_options: dict[str, Any] | None = None,
        capture_output: bool = True,
        cache: Any = None,
    ) -> Iterator[Any]:
        """Like :meth:`map`, but yield results as they come, holding a bounded window.

        Input is read lazily (an endless generator is fine, except with ``cache=``, which
        reads the whole input first to look its items up) and only a few batches per slot
        are in flight or buffered at a time. ``ordered=False`` yields in completion order.
        Work starts at the call; stopping the iteration cancels what is still queued.
        """
        options = MapOptions(
            seed,
            batch_size,
            retries,
            timeout,
            on_error,
            progress,
            inputs,
            outputs,
            storage_options,
            capture_output,
            cache,
        )
        return self._work.imap(fn, iterables, options, ordered=ordered)

    def run(
        self,
        command: str,
        items: Iterable[Any],
        *,
        inputs: str | Sequence[str] | None = None,
        outputs: str | Output | Sequence[str | Output] | None = None,
        storage_options: dict[str, Any] | None = None,
        retries: int = 0,
        timeout: float | None = None,
        on_error: str = "raise",
        progress: Any = None,
        capture_output: bool = True,
    ) -> MapResult:
        """Run a shell command once per item; return one :class:`~cloudmap.CommandResult`
        per item, in order.

        ``{item}`` and ``{index}`` in the command are the item and its position, ``{input}``
        and ``{output}`` the local paths of the item's first input and output file
        (``{inputs}``, ``{outputs}``: all of them), quoted for the shell::

            pool.run("tr a-z A-Z < {input} > {output}", ["a", "b"],
                     inputs="file:///data/in/{item}.txt",
                     outputs="file:///data/out/{item}.txt")

        Each item runs in a fresh working directory holding its inputs, with stdout and
        stderr kept there as ``stdout.txt`` and ``stderr.txt``; ``{output}`` paths are in
        its ``outputs/`` subdirectory, so an output may share an input's file name. A
        non-zero exit fails the item with a :class:`~cloudmap.TaskError` whose exception is a
        :class:`~cloudmap.CommandError` carrying the end of stderr. The other options are
        those of :meth:`map`.
        """
        options = MapOptions(
            None,
            None,
            retries,
            timeout,
            on_error,
            progress,
            inputs,
            outputs,
            storage_options,
            capture_output,
        )
        return self._work.run(command, items, options)

    def run_async(
        self,
        command: str,
        items: Iterable[Any],
        *,
        inputs: str | Sequence[str] | None = None,
        outputs: str | Output | Sequence[str | Output] | None = None,
        storage_options: dict[str, Any] | None = None,
        retries: int = 0,
        timeout: float | None = None,
        on_error: str = "raise",
        progress: Any = None,
        capture_output: bool = True,
    ) -> MapRun:
        """Start :meth:`run` in the background; return a :class:`~cloudmap.MapRun` at once
        (see :meth:`map_async`)."""
        options = MapOptions(
            retries=retries,
            timeout=timeout,
            on_error=on_error,
            progress=progress,
            inputs=inputs,
            outputs=outputs,
            storage_options=storage_options,
            capture_output=capture_output,
        )
        return self._work.run_async(command, items, options)

    def job(self, prepare: JobStep = None, release: JobStep = None) -> Job:
        """A job whose ``prepare`` (shell command or callable) runs once on each node before
        that node's first task of the job, and whose ``release`` runs on every node that was
        prepared when the job ends, failure included::

            with pool.job(prepare="tar xf $CLOUDMAP_NODE_SHARED_DIR/app.tar",
                          release="rm -rf scratch") as job:
                results = job.map(simulate, cases)

        Both run in the node's job directory (``CLOUDMAP_JOB_DIR``). A failed preparation
        fails the job's tasks on that node with ``JobPreparationError``.
        """
        self._provider()
        return Job(self._work, prepare, release)

    def executor(self, **map_options: Any) -> PoolExecutor:
        """A ``concurrent.futures.Executor`` backed by this pool (it does not own the pool)."""
        self._provider()
        return PoolExecutor(self._work, **map_options)

    # -- MPI --------------------------------------------------------------------------------

    def mpi(
        self,
        fn: Callable[..., Any],
        /,
        *args: Any,
        nodes: int = 1,
        ranks_per_node: int = 1,
        timeout: float | None = None,
        coordination: str | Callable[[], Any] | None = None,
        root_only: bool = False,
        env: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> Any:
        """Run ``fn(comm, *args, **kwargs)`` on ``nodes x ranks_per_node`` MPI ranks.

        ``comm`` is mpi4py's ``MPI.COMM_WORLD``. Returns every rank's return value in rank
        order (rank 0's alone with ``root_only=True``). The nodes are held whole: no map
        task runs on them meanwhile, and they go back to the pool afterwards.

        ``coordination`` (a shell command or a callable) runs on every node first, as Batch's
        coordination command does. Every rank (and the coordination step) sees
        ``CLOUDMAP_HOST_LIST``, ``CLOUDMAP_NODE_LIST``, ``CLOUDMAP_MASTER_NODE``,
        ``CLOUDMAP_IS_MASTER`` and ``CLOUDMAP_TASK_SHARED_DIR``, plus ``env``.

        A rank that raises or exits non-zero stops every rank and raises
        :class:`~cloudmap.MpiError` naming the rank, its node and its traceback; after
        ``timeout`` seconds every rank is killed (:class:`~cloudmap.MpiTimeoutError`).
        Needs the ``cloudmap[mpi]`` extra (mpi4py and MPICH) where the nodes run.

        >>> pool.mpi(lambda comm: comm.allreduce(comm.rank), nodes=2, ranks_per_node=2)
        ... # doctest: +SKIP
        [6, 6, 6, 6]
        """
        self._provider()
        options = RunOptions(nodes, ranks_per_node, timeout, coordination, env)
        return self._mpi.call(fn, args, kwargs, options, root_only)

    def mpi_command(
        self,
        command: str,
        *,
        nodes: int = 1,
        ranks_per_node: int = 1,
        timeout: float | None = None,
        coordination: str | Callable[[], Any] | None = None,
        env: dict[str, str] | None = None,
        check: bool = True,
    ) -> MpiResult:
        """Run an MPI program (any language) on ``nodes x ranks_per_node`` ranks.

        ``command`` is a shell command each rank runs in its node's task directory, e.g.
        ``"./solver in.dat"``. Returns a :class:`~cloudmap.MpiResult`: the exit code and each
        rank's stdout and stderr. A non-zero exit raises :class:`~cloudmap.MpiError` naming
        the rank, with its stderr (``check=False`` returns the result instead).
        """
        self._provider()
        options = RunOptions(nodes, ranks_per_node, timeout, coordination, env)
        return self._mpi.command(command, options, check=check)

    def mpi_map(
        self,
        fn: Callable[..., Any],
        params: Iterable[Any],
        *,
        nodes_per_run: int = 1,
        ranks_per_node: int = 1,
        timeout: float | None = None,
        coordination: str | Callable[[], Any] | None = None,
        root_only: bool = True,
        env: dict[str, str] | None = None,
        progress: Any = None,
    ) -> list[Any]:
        """One MPI run ``fn(comm, param)`` per parameter, as many at once as the pool holds.

        Returns one entry per parameter, in order: rank 0's return value (every rank's, as a
        list, with ``root_only=False``). The first failed run raises its
        :class:`~cloudmap.MpiError` once the runs in progress end; its ``results`` holds the
        runs that finished, by position.
        """
        self._provider()
        options = RunOptions(nodes_per_run, ranks_per_node, timeout, coordination, env).checked()
        at_once = max(1, self._view.capacity(self._scaling().max_nodes) // nodes_per_run)
        return self._mpi.map(
            fn, params, options, runs_at_once=at_once, root_only=root_only, progress=progress
        )

    # -- display ---------------------------------------------------------------------------

    def widget(self) -> PoolWidget:
        """The live pool widget (one per pool; each display of it is another view).

        Nodes by state, dedicated and spot; targets; a chart of node counts over time; slots
        busy; tasks queued, running and done; the cost where the provider knows prices; and
        controls to resize or set autoscale bounds. It refreshes every second on a thread of
        its own, so it moves while another cell runs.
        """
        self._provider()
        with self._widget_lock:
            if self._widget is None or self._widget.comm is None:  # none yet, or closed
                from .widgets.pool_widget import PoolWidget

                self._widget = PoolWidget(self)
            return self._widget

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        """In Jupyter: the live widget, with a static HTML summary for front ends (GitHub,
        nbviewer, a missing widget extension) that cannot draw it."""
        from .widgets.display import pool_bundle

        return pool_bundle(self)

    def progress(
        self,
        futures: Iterable[concurrent.futures.Future[Any]],
        *,
        wait: bool | None = None,
        description: str = "futures",
        reporter: ProgressReporter | None = None,
    ) -> FuturesWatch:
        """Show the progress of submitted futures, as map shows its own.

        In Jupyter the progress widget appears and this returns at once (``wait=True`` to
        block); elsewhere a tqdm bar is drawn and this blocks until all are done, as Dask's
        ``progress`` does. ``reporter`` replaces the default display (a
        :class:`~cloudmap.ProgressWidget` placed in a dashboard, say). Returns the watch,
        whose ``wait()`` blocks until they are done.
        """
        shown = reporter if reporter is not None else make_reporter(True)
        assert shown is not None
        watch = FuturesWatch(futures, shown, description)
        if wait or (wait is None and not in_jupyter_kernel()):
            watch.wait()
        return watch

    def __repr__(self) -> str:
        if self._closed.is_set() or self.provider is None:
            return "<cloudmap.Pool closed>"
        nodes = self.nodes()
        counts: dict[str, int] = {}
        for node in nodes:
            counts[str(node.state)] = counts.get(str(node.state), 0) + 1
        states = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        slots = sum(len(n.workers) for n in nodes)
        spot = sum(1 for n in nodes if n.spot)
        kinds = f"{len(nodes) - spot} dedicated + {spot} spot" if spot else f"{len(nodes)}"
        scaling = " autoscaling," if self._scaling().policy is not None else ""
        return (
            f"<cloudmap.Pool {self.provider.name}: {kinds} nodes ({states or 'none'}),"
            f"{scaling} {slots} slots connected, scheduler {self.scheduler_address}>"
        )


def _connect_to_hosted_scheduler(cluster: DaskCluster, provider: Provider, timeout: float) -> None:
    """Connect to the scheduler the provider started on a node, or say why not."""
    try:
        cluster.connect(provider.scheduler_endpoint(), min(timeout, SCHEDULER_CONNECT_TIMEOUT))
    except SchedulerUnreachableError as exc:
        raise PoolStartError(
            f"{exc}. {provider.connection_advice()} The pool was removed.", []
        ) from exc


#: Seconds a new pool tries to connect to a scheduler that its provider started on a node.
SCHEDULER_CONNECT_TIMEOUT = 30.0


class _Parts(NamedTuple):
    view: NodeView
    scaler: Scaler
    gang: GangScheduler
    work: Work
    mpi: MpiRunner
    backlog: Callable[[], int]


def _assemble(
    cluster: DaskCluster,
    provider: Provider,
    spec: PoolSpec,
    autoscale: Autoscale | None,
    closed: threading.Event,
) -> _Parts:
    """Connect a pool's parts to each other, and none of them to the Pool itself: the
    scaler's thread reaches all of them, and must not keep a dropped pool alive."""
    provider.events = ClusterNodeEvents(cluster)
    provider.tls = cluster.node_tls()
    cluster.node_taken = provider.node_taken
    view = NodeView(provider, cluster)

    def backlog() -> int:
        """Tasks' worth of work not sent yet (for autoscale): the maps' unsent input, and
        whole nodes that waiting MPI runs still lack."""
        return gang.waiting_nodes() * spec.slots_per_node + work.backlog_tasks()

    scaler = Scaler(
        provider,
        cluster,
        nodes=view,
        backlog=backlog,
        slots_per_node=spec.slots_per_node,
        targets=(spec.nodes, spec.spot_nodes),
        policy=autoscale,
    )
    gang = GangScheduler(
        cluster,
        nodes=view,
        capacity=lambda: view.capacity(scaler.max_nodes),
        nudge=scaler.nudge,
    )

    def slots() -> int:
        """Slots to plan batches for: connected ones, or those on the way while nodes
        start; with none, but autoscale to bring them, one node's worth."""
        if closed.is_set():
            raise PoolClosedError(CLOSED)
        planned = view.slots_to_plan(scaler.max_nodes)
        if planned is None:
            scaler.nudge()  # evaluate now rather than at the next interval
            return spec.slots_per_node
        return planned

    records = RecordMaker(cluster, provider=provider, history=scaler.history)
    work = Work(cluster, slots=slots, nodes=view.nodes, is_closed=closed.is_set, records=records)
    mpi = MpiRunner(cluster, gang, closed.is_set)
    return _Parts(view, scaler, gang, work, mpi, backlog)


def _notebook_progress() -> ProgressReporter:
    """In a Jupyter kernel, progress is cloudmap's progress widget (imported when used)."""
    from .widgets.progress_widget import ProgressWidget

    return ProgressWidget()


set_notebook_reporter(_notebook_progress)
