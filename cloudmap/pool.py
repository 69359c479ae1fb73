"""The public face: ``cloudmap.Pool``, its options, its calls and its lifetime.

A Pool owns a Dask scheduler (cluster glue), a provider that makes the nodes, and hands
each ``map`` to a fresh :class:`~cloudmap.engine.MapEngine`. It never knows how a provider
makes nodes.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import os
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from .autoscale import Autoscale
from .cluster import DaskCluster
from .commands import CommandTask, check_command
from .engine import SKIPPED, MapEngine, MapOptions
from .errors import (
    InputError,
    MpiError,
    MpiTimeoutError,
    NoNodesError,
    PoolClosedError,
    PoolStartError,
    TaskError,
)
from .futures import Future, PoolExecutor
from .gang import GangScheduler
from .jobs import Job, JobStep, JobSteps, release_node
from .mpi import MpiResult, MpiRunner, RunOptions
from .nodes import FINAL_STATES, NodeInfo, NodeState, merged_state
from .payload import CALL_ARGS, Batch, dump_function, dump_items_batch
from .progress import ProgressReporter, in_jupyter_kernel, make_reporter
from .providers import PoolSpec, Provider, get_provider
from .providers.base import NodeEvents, StartTask
from .scaling import Scaler, ScalingSample, TaskCounts
from .staging import Output, StagedCall, as_inputs, as_outputs
from .validation import check_int, check_positive
from .watching import FuturesWatch

if TYPE_CHECKING:
    from .widgets.pool_widget import PoolWidget

_READY = (NodeState.IDLE, NodeState.RUNNING)
#: Seconds a node that has served may be without any slot (its agent restarts slots that
#: die within a few seconds) before it counts as unusable. Local nodes whose agent exits
#: are unusable at once; a Batch node stays "idle" to Batch whatever became of cloudmap on
#: it, so this is how the pool learns that such a VM no longer serves.
SLOTS_LOST_GRACE = 20.0
#: Seconds ``Pool(...)`` waits for its first node before giving up (``start_timeout=``).
START_TIMEOUT = 120.0


class _HybridMethod:
    """A method that does one thing on the class and another on an instance:
    ``Pool.plan("azure", ...)`` plans a new pool, ``pool.plan()`` shows an existing one."""

    def __init__(self, on_class: Callable[..., Any], on_instance: Callable[..., Any]) -> None:
        self._on_class = on_class
        self._on_instance = on_instance

    def __get__(self, instance: Any, owner: type | None = None) -> Callable[..., Any]:
        if instance is None:
            return self._on_class
        return functools.partial(self._on_instance, instance)


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
        provider_class = get_provider(provider)
        self.spec = _pool_spec(
            provider_class,
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
        )
        nodes = self.spec.nodes
        if start_timeout is None:
            start_timeout = provider_class.start_timeout or START_TIMEOUT
        check_positive("start_timeout", start_timeout)
        self._closed = False
        self._close_lock = threading.Lock()
        self._seen: dict[str, tuple[NodeState, datetime]] = {}
        self._served: set[str] = set()  # nodes whose slots have joined at some time
        self._slots_lost: dict[str, datetime] = {}  # served nodes without a slot, since
        self._engines: weakref.WeakSet[MapEngine] = weakref.WeakSet()
        self._widget: PoolWidget | None = None
        self._widget_lock = threading.Lock()
        if tls is not None and not isinstance(tls, bool):
            raise InputError(f"tls={tls!r} is not valid: pass True, False or None")
        host, port = provider_class.listen_address(provider_options)
        self._cluster = DaskCluster(
            host, port=port, tls=provider_class.tls_by_default if tls is None else tls
        )
        self.provider: Provider | None = None
        self._scaler: Scaler | None = None
        try:
            self.provider = provider_class(self.spec, **provider_options)
            self.provider.events = _ClusterNodeEvents(self._cluster)
            self.provider.tls = self._cluster.node_tls()
            self._cluster.node_taken = self.provider.node_taken
            self._scaler = Scaler(
                self.provider,
                self._cluster,
                nodes=_weakly(self, Pool.nodes),
                backlog=_weakly(self, Pool._backlog),
                slots_per_node=slots_per_node,
                targets=(nodes, spot_nodes),
                policy=autoscale,
            )
            self._gang = GangScheduler(
                self._cluster,
                nodes=_weakly(self, Pool.nodes),
                capacity=_weakly(self, Pool._capacity),
                nudge=self._scaler.nudge,
            )
            self._mpi = MpiRunner(self._cluster, self._gang, lambda: self._closed)
            self._finalizer = weakref.finalize(
                self, _teardown, self._scaler, self.provider, self._cluster
            )
            self.provider.start(self._cluster.scheduler_address)
            self._scaler.start()
            if nodes or spot_nodes:
                self._wait_for_first_slot(start_timeout)
        except BaseException:
            self._closed = True
            _teardown(self._scaler, self.provider, self._cluster)
            raise

    @staticmethod
    def _plan_new(
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
        **provider_options: Any,
    ) -> dict[str, Any]:
        """``cloudmap.Pool.plan(provider, ...)``: see :attr:`plan`."""
        provider_class = get_provider(provider)
        spec = _pool_spec(
            provider_class,
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
        )
        return provider_class.plan(spec, **provider_options)

    def _plan_of_this_pool(self) -> dict[str, Any]:
        """``pool.plan()``: what this pool asked its provider for (secrets hidden)."""
        return self._provider().planned()

    plan = _HybridMethod(_plan_new, _plan_of_this_pool)
    """What a pool asks its provider for, as JSON-ready data, secrets hidden.

    ``cloudmap.Pool.plan("azure", vm_size=..., nodes=2, ...)`` takes ``Pool``'s arguments
    and creates nothing, needing no credentials; ``pool.plan()`` on a pool gives what it
    asked for. For Azure: the exact "add pool" body (``vmSize``, ``targetDedicatedNodes``,
    ``targetLowPriorityNodes``, ``taskSlotsPerNode``, ``startTask``, ...).
    ``python -m cloudmap plan`` prints it.
    """

    # -- lifetime -------------------------------------------------------------------------

    def _wait_for_first_slot(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        next_check = time.monotonic() + 1.0
        while self._cluster.slot_count(max_age=0) == 0:
            nodes = self._provider().list_nodes()
            failed = [n for n in nodes if n.state in FINAL_STATES]
            if nodes and len(failed) == len(nodes):
                raise PoolStartError(_start_failure_message(nodes, self.spec), nodes)
            if len(failed) == len(nodes) and time.monotonic() > next_check:
                # Nothing on the way: did the provider say why (quota, allocation timeout)?
                next_check = time.monotonic() + 1.0
                errors = self._provider().allocation_errors()
                if errors:
                    raise PoolStartError(
                        "the provider could not allocate the pool's nodes: "
                        + "; ".join(errors)
                        + ". The pool was removed.",
                        nodes,
                    )
            if time.monotonic() > deadline:
                raise PoolStartError(
                    f"no node of the pool became ready within start_timeout={timeout:g} s "
                    f"(states: {', '.join(f'{n.id}={n.state}' for n in nodes)}); the pool was "
                    "removed. Raise start_timeout= or check the start task.",
                    nodes,
                )
            time.sleep(0.02)

    def close(self) -> None:
        """Remove every node and stop the scheduler. Safe to call twice."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self._finalizer()

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def _provider(self) -> Provider:
        if self._closed or self.provider is None:
            raise PoolClosedError(
                "this pool is closed; create a new cloudmap.Pool(...) to run more work"
            )
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
        dedicated, spot = scaler.targets
        if nodes is not None:
            check_int("nodes", nodes, minimum=0)
            dedicated = nodes
        if spot_nodes is not None:
            check_int("spot_nodes", spot_nodes, minimum=0)
            if spot_nodes:
                _check_spot(type(self._provider()), "pass spot_nodes=0")
            spot = spot_nodes
        scaler.resize(dedicated, spot, deallocation)

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
        if policy is None or policy is False:
            if settings:
                raise InputError("pool.autoscale(None) turns autoscale off; it takes no settings")
            scaler.set_policy(None)
            return None
        if policy is True:
            base = scaler.policy or Autoscale()
        elif isinstance(policy, Autoscale):
            base = policy
        else:
            raise InputError(
                f"autoscale({policy!r}) is not valid: pass cloudmap.Autoscale(...), settings "
                "such as max_nodes=8, or None to turn it off"
            )
        try:
            new = dataclasses.replace(base, **settings)
        except TypeError as exc:
            names = ", ".join(f.name for f in dataclasses.fields(Autoscale))
            raise InputError(f"{exc}; the settings of autoscale are: {names}") from None
        if new.spot:
            _check_spot(type(self._provider()), "pass Autoscale(spot=False)")
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
            queued=waiting + self._backlog(),
            running=running,
            done=self._cluster.finished_tasks,
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

    def _backlog(self) -> int:
        """Tasks' worth of work not sent yet (for autoscale): the maps' unsent input, and
        whole nodes that waiting MPI runs still lack."""
        mpi = self._gang.waiting_nodes() * self.spec.slots_per_node
        return mpi + sum(engine.backlog_tasks() for engine in list(self._engines))

    def _capacity(self) -> int:
        """The most usable nodes this pool can have: autoscale's maximum, or the nodes it
        has that serve or will (failed and for-good preempted nodes do not)."""
        policy = self._scaling().policy
        if policy is not None:
            return policy.max_nodes
        return sum(1 for n in self.nodes() if n.state not in FINAL_STATES or n.restoring)

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
        """The Dask scheduler's address, so that ``distributed.Client(pool)`` works."""
        return self._cluster.scheduler_address

    @property
    def status(self) -> Any:
        """Dask's ``Status`` of the pool, which ``distributed.Client(pool)`` checks."""
        from distributed.core import Status

        return Status.closed if self._closed else Status.running

    @property
    def dashboard_link(self) -> str | None:
        return self._cluster.dashboard_link

    # -- nodes -----------------------------------------------------------------------------

    def nodes(self) -> list[NodeInfo]:
        """Every node with its state: the provider's word, merged with the scheduler's."""
        provider_nodes = self._provider().list_nodes()
        leaving = self._scaling().leaving()
        held = self._gang.held()
        slots = self._cluster.slots_by_node()
        now = datetime.now(timezone.utc)
        infos = []
        for node in provider_nodes:
            joined = slots.get(node.id, [])
            busy = sum(1 for _, processing in joined if processing)
            state = merged_state(node.state, len(joined), busy)
            if node.id in leaving:
                state = NodeState.LEAVING
            elif node.id in held and state in _READY:
                state, busy = NodeState.RUNNING, node.slots  # an MPI run holds it whole
            state = self._unless_slots_lost(node.id, state, now)
            since = node.since
            if node.state == "ready" or node.id in leaving:  # the pool's own observation time
                previous = self._seen.get(node.id)
                since = previous[1] if previous and previous[0] == state else now
            self._seen[node.id] = (state, since)
            infos.append(
                NodeInfo(
                    id=node.id,
                    state=state,
                    dedicated=node.dedicated,
                    slots=node.slots,
                    since=since,
                    busy_slots=busy,
                    workers=tuple(address for address, _ in joined),
                    start_task=node.start_task,
                    restoring=node.restoring,
                )
            )
        return infos

    def _unless_slots_lost(self, node_id: str, state: NodeState, now: datetime) -> NodeState:
        """``unusable`` for a node that has served and has had no slot for
        SLOTS_LOST_GRACE (the provider may still call it ready); else ``state``."""
        if state != NodeState.STARTING or node_id not in self._served:
            if state in _READY:
                self._served.add(node_id)
                self._slots_lost.pop(node_id, None)
            return state
        lost = self._slots_lost.setdefault(node_id, now)
        if (now - lost).total_seconds() > SLOTS_LOST_GRACE:
            return NodeState.UNUSABLE
        return state

    def wait_for_nodes(self, count: int | None = None, timeout: float = START_TIMEOUT) -> None:
        """Block until ``count`` nodes have every slot connected (default: the targets,
        less the nodes that will not serve: failed, or preempted for good).

        ``Pool(...)`` returns as soon as one slot can take work; call this before timing
        something, or to fail early when nodes cannot start.
        """
        deadline = time.monotonic() + timeout
        while True:
            nodes = self.nodes()
            lost = sum(1 for n in nodes if n.state in FINAL_STATES and not n.restoring)
            wanted = max(0, sum(self.targets) - lost) if count is None else count
            ready = [n for n in nodes if n.state in _READY and len(n.workers) >= n.slots]
            if len(ready) >= wanted:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{len(ready)} of {wanted} nodes ready after {timeout:g} s: "
                    + ", ".join(f"{n.id}={n.state}" for n in nodes)
                )
            time.sleep(0.05)

    def _slots(self) -> int:
        """Slots to plan batches for: connected ones, or those on the way while nodes start."""
        self._provider()
        connected = self._cluster.slot_count()
        if connected:
            return connected
        nodes = self.nodes()  # as the pool sees them: a node that lost its slots is unusable
        coming = sum(n.slots for n in nodes if n.state not in FINAL_STATES or n.restoring)
        scaler = self._scaling()
        policy = scaler.policy
        failed = sum(1 for n in nodes if n.state in FINAL_STATES and not n.restoring)
        if not coming and policy is not None and failed < policy.max_nodes:
            scaler.nudge()  # evaluate now rather than at the next interval
            return self.spec.slots_per_node  # the work itself will bring nodes
        if not coming:
            raise NoNodesError(
                "the pool has no usable nodes; see pool.nodes() for why, and create a new pool"
            )
        return coming

    # -- work ------------------------------------------------------------------------------

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        """Run ``fn(*args, **kwargs)`` on a slot; return a ``concurrent.futures.Future``.

        >>> future = pool.submit(pow, 2, 10)    # doctest: +SKIP
        >>> future.result()                     # doctest: +SKIP
        1024
        """
        self._slots()
        fn_blob = dump_function(fn)
        item = (args, kwargs)
        blob = dump_items_batch(Batch(CALL_ARGS, None, None, range(1), [item]))
        return Future(self._cluster, fn_blob, blob, item)

    def node(self, node_id: str) -> NodeFiles:
        """One node's files: ``pool.node("node-0").read_file("startup/stdout.txt")``."""
        if node_id not in {n.id for n in self._provider().list_nodes()}:
            raise InputError(f"there is no node {node_id!r} in this pool; see pool.nodes()")
        return NodeFiles(self._provider(), node_id)

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
    ) -> list[Any]:
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
            None, None, retries, timeout, on_error, progress, inputs, outputs, storage_options
        )
        return self._run(command, items, options, job=None)

    def _run(
        self, command: str, items: Iterable[Any], options: MapOptions, *, job: Job | None
    ) -> list[Any]:
        task = CommandTask(
            check_command(
                command,
                has_inputs=bool(as_inputs(options.inputs)),
                has_outputs=bool(as_outputs(options.outputs)),
            )
        )
        return self._map_all(
            task, (items,), options, label="run", staged=True, outputs_dir="outputs", job=job
        )

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
        return Job(self, prepare, release)

    def _release_job(self, steps: JobSteps) -> dict[str, str]:
        """Run a job's release on every node with a connected slot; failures by node."""
        failures: dict[str, str] = {}
        for node in self.nodes():
            if not node.workers:
                continue
            try:
                error = self._cluster.run_on(node.workers[0], release_node, steps)
            except Exception:  # the node went away meanwhile: nothing left to release
                continue
            if error:
                failures[node.id] = str(error)
        return failures

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
    ) -> list[Any]:
        """Call ``fn`` once per item (or per tuple of items from several iterables).

        Returns the results as a list in input order. Items are sent in batches sized from
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
        )
        return self._map_all(fn, iterables, options, label="map")

    def _map_all(
        self,
        fn: Callable[..., Any],
        iterables: tuple[Iterable[Any], ...],
        options: MapOptions,
        *,
        label: str,
        staged: bool = False,
        outputs_dir: str = "",
        job: Job | None = None,
    ) -> list[Any]:
        engine = self._engine(
            fn,
            iterables,
            options,
            ordered=True,
            label=label,
            staged=staged,
            outputs_dir=outputs_dir,
            job=job,
        )
        results: list[Any] = []
        try:
            engine.start()
            for _, values in engine.chunks():
                results.extend(values)
        except (TaskError, InputError) as exc:
            # Chunks arrive in input order, so results[i] is item i's value.
            done = {i: v for i, v in enumerate(results) if v is not SKIPPED}
            exc.results = {**done, **exc.results}
            raise
        if options.on_error == "skip":
            results = [value for value in results if value is not SKIPPED]
        return results

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
    ) -> Iterator[Any]:
        """Like :meth:`map`, but yield results as they come, holding a bounded window.

        Input is read lazily (an endless generator is fine) and only a few batches per slot
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
        )
        return self._imap(fn, iterables, options, ordered=ordered)

    def _imap(
        self,
        fn: Callable[..., Any],
        iterables: tuple[Iterable[Any], ...],
        options: MapOptions,
        *,
        ordered: bool,
        deadline: float | None = None,
        job: Job | None = None,
    ) -> Iterator[Any]:
        label = "imap" if ordered else "imap-unordered"
        engine = self._engine(fn, iterables, options, ordered=ordered, label=label, job=job)
        engine.start()
        return _values(engine, deadline)

    def executor(self, **map_options: Any) -> PoolExecutor:
        """A ``concurrent.futures.Executor`` backed by this pool (it does not own the pool)."""
        self._provider()
        return PoolExecutor(self, **map_options)

    def _engine(
        self,
        fn: Callable[..., Any],
        iterables: tuple[Iterable[Any], ...],
        options: MapOptions,
        *,
        ordered: bool,
        label: str,
        staged: bool = False,
        outputs_dir: str = "",
        job: Job | None = None,
    ) -> MapEngine:
        self._slots()
        options = options.checked(fn)
        if staged or options.inputs or options.outputs:
            fn = StagedCall(
                fn,
                star=len(iterables) > 1,
                inputs=options.inputs,
                outputs=options.outputs,
                job=f"{label}-{uuid.uuid4().hex[:8]}",
                storage_options=dict(options.storage_options or {}),
                outputs_dir=outputs_dir,
            )
        if job is not None:  # outermost: the node is prepared before inputs download
            fn = job.wrap(fn)
        engine = MapEngine(
            self._cluster,
            fn,
            iterables,
            options,
            slots=self._slots,
            is_closed=lambda: self._closed,
            ordered=ordered,
            label=label,
        )
        self._engines.add(engine)
        return engine

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
        if not isinstance(command, str) or not command.strip():
            raise InputError(f"command={command!r} is not valid: pass a shell command string")
        options = RunOptions(nodes, ranks_per_node, timeout, coordination, env)
        try:
            result, _ = self._mpi.run(options, command=command)
        except MpiError as exc:
            if check or isinstance(exc, MpiTimeoutError) or exc.result is None:
                raise
            result = exc.result
            assert isinstance(result, MpiResult)
            return result
        return result

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
        at_once = max(1, self._capacity() // nodes_per_run)
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
        if self._closed or self.provider is None:
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


def _values(engine: MapEngine, deadline: float | None) -> Iterator[Any]:
    for _, values in engine.chunks(deadline):
        for value in values:
            if value is not SKIPPED:
                yield value


class NodeFiles:
    """Files of one node, read through its provider (``pool.node(node_id)``)."""

    def __init__(self, provider: Provider, node_id: str) -> None:
        self._provider = provider
        self.id = node_id

    def read_file(self, path: str, *, binary: bool = False) -> Any:
        """A file under the node's root directory, e.g. ``"startup/stdout.txt"`` or a task's
        ``"tasks/run-.../item-0-.../stderr.txt"`` (text unless ``binary=True``)."""
        data = self._provider.read_file(self.id, path)
        return data if binary else data.decode(errors="replace")

    def __repr__(self) -> str:
        return f"<cloudmap node {self.id}>"


def _pool_spec(
    provider_class: type[Provider],
    *,
    nodes: int | None,
    spot_nodes: int,
    autoscale: Autoscale | None,
    slots_per_node: int,
    start_task: StartTask,
    start_task_timeout: float | None,
    env: dict[str, str] | None,
    resource_files: Sequence[str | tuple[str, str]],
    packages: Sequence[str],
    storage_options: dict[str, Any] | None,
) -> PoolSpec:
    """Check the pool's provider-independent arguments and make its :class:`PoolSpec`
    (shared by ``Pool(...)`` and ``Pool.plan(...)``, so both refuse the same input)."""
    check_int("slots_per_node", slots_per_node, minimum=1)
    if autoscale is not None and not isinstance(autoscale, Autoscale):
        raise InputError(f"autoscale={autoscale!r} is not valid: pass cloudmap.Autoscale(...)")
    if nodes is None and provider_class.default_nodes is not None:
        nodes = 0 if autoscale else provider_class.default_nodes
    if nodes is None:
        nodes = 0 if autoscale else max(1, (os.cpu_count() or 1) // slots_per_node)
    check_int("nodes", nodes, minimum=0)
    check_int("spot_nodes", spot_nodes, minimum=0)
    if start_task_timeout is not None:
        check_positive("start_task_timeout", start_task_timeout)
    if start_task is not None and not (isinstance(start_task, str) or callable(start_task)):
        raise InputError(
            f"start_task={start_task!r} is neither a shell command string nor a callable"
        )
    if spot_nodes:
        _check_spot(provider_class, "pass spot_nodes=0")
    if autoscale and autoscale.spot:
        _check_spot(provider_class, "pass Autoscale(spot=False)")
    return PoolSpec(
        nodes,
        slots_per_node,
        start_task,
        start_task_timeout,
        {str(k): str(v) for k, v in (env or {}).items()},
        spot_nodes=spot_nodes,
        resource_files=_resource_files(resource_files),
        packages=_packages(packages),
        storage_options=_storage_options(storage_options),
    )


def _resource_files(files: Sequence[str | tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    pairs = []
    for entry in [files] if isinstance(files, str) else files:
        pair = (entry, "") if isinstance(entry, str) else entry
        if not (
            isinstance(pair, (tuple, list))
            and len(pair) == 2
            and all(isinstance(part, str) for part in pair)
            and pair[0]
        ):
            raise InputError(
                f"resource_files entry {entry!r} is not valid: pass URLs, or (url, path) pairs"
            )
        url, path = pair
        path = path or url.rstrip("/").rsplit("/", 1)[-1]
        if path.startswith("/") or ".." in path.split("/"):
            raise InputError(f"resource file path {path!r} must stay inside the shared directory")
        pairs.append((url, path))
    return tuple(pairs)


def _packages(packages: Sequence[str]) -> tuple[str, ...]:
    listed = [packages] if isinstance(packages, str) else list(packages)
    for package in listed:
        if not isinstance(package, str) or not package.strip():
            raise InputError(f"packages entry {package!r} is not a pip requirement string")
    return tuple(listed)


def _storage_options(options: dict[str, Any] | None) -> dict[str, Any]:
    if options is not None and not isinstance(options, dict):
        raise InputError("storage_options must be a dict of fsspec options")
    return dict(options or {})


def _check_spot(provider_class: type[Provider], fix: str) -> None:
    if not provider_class.supports_spot:
        raise InputError(
            f"the {provider_class.name!r} provider has no spot nodes; {fix}, "
            "or use a provider with spot capacity"
        )


class _ClusterNodeEvents(NodeEvents):
    """Passes a provider's word about departing nodes to the scheduler (see NodeEvents)."""

    def __init__(self, cluster: DaskCluster) -> None:
        self._cluster = cluster

    def draining(self, node_id: str) -> None:
        with contextlib.suppress(Exception):  # a closing pool schedules nothing anyway
            self._cluster.drain(node_id)

    def lost(self, node_id: str) -> None:
        self._cluster.mark_lost(node_id)


def _weakly(pool: Pool, method: Callable[[Pool], Any]) -> Callable[[], Any]:
    """``method`` bound to ``pool`` without keeping the pool alive (for the scaling thread),
    so that a pool nobody holds is still collected and torn down."""
    ref = weakref.ref(pool)

    def call() -> Any:
        target = ref()
        if target is None:
            raise PoolClosedError("the pool is gone")
        return method(target)

    return call


def _teardown(scaler: Scaler | None, provider: Provider | None, cluster: DaskCluster) -> None:
    try:
        if scaler is not None:
            scaler.stop()
        if provider is not None:
            provider.events = NodeEvents()  # nobody to tell: every task is being dropped
        cluster.close_client()  # first, so no future holds results on nodes being removed
        if provider is not None:
            provider.close()
    finally:
        cluster.close()


def _start_failure_message(nodes: list[Any], spec: PoolSpec) -> str:
    first = nodes[0]
    step = "start task"
    if spec.resource_files or spec.packages:
        setup = "node setup (resource files, packages)"
        step = f"{step} or {setup}" if spec.start_task is not None else setup
    message = f"no node of the pool could start: {len(nodes)} node(s) {first.state}."
    if first.start_task is not None:
        message += f" The {step} of {first.id} exited with {first.start_task.exit_code}"
        for stream in ("stdout", "stderr"):
            tail = getattr(first.start_task, stream).strip()[-1500:]
            if tail:
                message += f"\n--- {stream} (end) ---\n{tail}"
        message += f"\nFix the {step} and create the pool again."
    elif first.reason:
        message += f" {first.id}: {first.reason}\nThe pool was removed."
    else:
        message += " Check the node logs; the pool was removed."
    return message
