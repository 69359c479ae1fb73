"""Cluster glue: the pool's Dask scheduler and client, and the few questions cloudmap asks them.

The scheduler runs in the client's process, on Dask's event-loop thread, or, for clients
outside the pool's network, on a pool node that the client connects out to (decision
0008); slots (one Dask worker process with one thread each) connect to it from the nodes.
Nothing here knows how nodes are made. Above this layer nobody sees Dask: tasks are
:class:`TaskHandle` objects, and a task lost with its slot comes back as a
:class:`~cloudmap.failures.TaskLoss`. The scheduler's side of it is
:mod:`cloudmap.scheduler_plugin`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import resource
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import dask
from distributed import Client, Future, Scheduler, Security, SpecCluster
from distributed.client import FutureCancelledError
from distributed.core import Status
from distributed.scheduler import KilledWorker

from . import scheduler_plugin as on_scheduler
from .budget import TaskBudget
from .dask_config import BATCH_INTERVAL, LOW_OVERHEAD, SCHEDULER_OPTIONS
from .errors import SchedulerLostError, WorkerLostError
from .failures import LossCause, TaskLoss
from .loops import poll_until
from .node.runner import exit_slot, run_batch
from .nodes import node_of
from .payload import OUTPUT_TOPIC, STARTED_TOPIC, TIMEOUT_TOPIC
from .task_output import deliver as deliver_output


class _DropKilledWorkerNoise(logging.Filter):
    """cloudmap handles lost slots and tasks itself (timeouts end slots on purpose); Dask's
    log lines about them would only alarm a notebook user."""

    NOISE = (
        "marked as failed because",
        "caused the cluster to lose already computed task",
        "Couldn't gather keys",
    )

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(part in str(record.msg) for part in self.NOISE)


_KILLED_WORKER_NOISE = _DropKilledWorkerNoise()
#: Dask's own limit on the client's open connections, kept for pools smaller than it.
DEFAULT_CONNECTION_LIMIT = 512
#: Files this process keeps for everything but slot connections (the notebook, logs, ...).
FILES_KEPT_FREE = 1024


class TaskHandle:
    """One task on the pool's cluster, as the map engine and futures see it: a key to ask
    about, and the means to cancel it or let the cluster forget it."""

    __slots__ = ("_future", "key")

    def __init__(self, future: Future) -> None:
        self._future = future
        self.key = str(future.key)

    def cancel(self) -> None:
        self._future.cancel()

    def release(self) -> None:
        """Let Dask forget the task: a held result would be recomputed if its slot died."""
        self._future.release()


Deliver = Callable[[TaskHandle, str, Any], None]


class DaskCluster:
    """The pool's scheduler and a client connected to it.

    By default the scheduler runs here, in this process, on ``host``. :meth:`remote` makes
    one whose scheduler runs elsewhere (on a pool node, decision 0008), which the client
    reaches with :meth:`connect` once the provider has started it; it survives a dropped
    connection for ``reconnect_timeout`` seconds (the tasks the scheduler dropped with it
    are sent again: :attr:`~cloudmap.failures.LossCause.DISCONNECTED`).

    ``allowed_failures=0``: a task whose slot dies is reported to cloudmap at once, which
    decides between retry (crash), free requeue (a task only queued on the dead slot) and
    timeout, item by item.
    """

    _cluster: SpecCluster | None  # the in-process scheduler's, None for a remote one
    _address: str | None

    def __init__(
        self, host: str = "127.0.0.1", *, port: int = 0, tls: bool = False, slots: int = 0
    ) -> None:
        self._prepare(tls)
        with dask.config.set(LOW_OVERHEAD):
            self._cluster = self._start_scheduler(host, port, self.security)
        self._address = str(self._cluster.scheduler_address)
        # Results come straight from the slots, except over TLS: there, a client connecting
        # to a slot that a crashing task was taking down waited out the whole connect
        # timeout (30 s) about once per three crashes, so results go through the scheduler,
        # which runs in this process anyway. (The scheduler still connects to the slots.)
        direct = self.security is None
        client = Client(
            self._cluster,
            direct_to_workers=direct,
            security=self.security,
            connection_limit=connection_limit(slots),
        )
        self._connect(client)

    def _prepare(self, tls: bool) -> None:
        """The state every cluster has, before it has a scheduler and client."""
        #: Per-pool temporary certificates when ``tls``: every connection (client, scheduler,
        #: slots) is TLS, and a peer without them is refused.
        self.security = Security.temporary() if tls else None
        self._cluster = None
        self._address = None
        self.reconnect_timeout = 0.0
        self._events_lock = threading.Lock()
        self._timeouts: dict[str, bytes] = {}
        self._started: dict[str, set[str]] = {}
        self._slot_count = (0.0, 0)
        self._task_ids = itertools.count()
        self._prefix = uuid.uuid4().hex[:8]
        self._comm: object = None
        #: Tasks whose outcome came back (a result or an error), for the pool widget.
        self.finished_tasks = 0
        #: Asks the provider whether a node was taken away (preempted, removed) when a slot
        #: dies without warning: providers that learn of it only afterwards (Batch) set it.
        self.node_taken: Callable[[str], bool] | None = None
        #: Why the cluster cannot go on (its scheduler was lost), once that is known.
        self.broken: str | None = None
        #: The scheduler's task rate budget, sampled with every :meth:`work_counts`.
        self.budget = TaskBudget()
        self._closing = False

    @classmethod
    def remote(cls, *, reconnect_timeout: float) -> DaskCluster:
        """A cluster whose scheduler a provider starts elsewhere: TLS, not connected yet
        (the provider needs :meth:`node_tls` to start the scheduler)."""
        cluster = cls.__new__(cls)
        cluster._prepare(tls=True)
        cluster.reconnect_timeout = reconnect_timeout
        return cluster

    def connect(self, address: str, timeout: float) -> None:
        """Connect to a remote scheduler at ``address``. Results come through the
        scheduler: the slots are on a network this client cannot reach."""
        try:
            client = Client(
                address, security=self.security, direct_to_workers=False, timeout=timeout
            )
        except OSError as exc:
            raise SchedulerUnreachableError(address, exc) from exc
        # Dask's client gives up reconnecting after its connect timeout: once connected,
        # the window is the pool's.
        client._timeout = self.reconnect_timeout or timeout
        self._address = address
        self._connect(client)
        self._watch_reconnects()

    def _connect(self, client: Client) -> None:
        logging.getLogger("distributed.scheduler").addFilter(_KILLED_WORKER_NOISE)
        self.client = client
        self.client.register_plugin(on_scheduler.PoolPlugin())
        self._subscribe()

    def _subscribe(self) -> None:
        """Hear the slots' events, and batch less: again after each reconnection, since
        the scheduler forgets a client's subscriptions when its connection drops."""
        self._comm = self.client.scheduler_comm
        _shorten_batching_interval(self.client)
        self.client.subscribe_topic(TIMEOUT_TOPIC, self._on_timeout_event)
        self.client.subscribe_topic(STARTED_TOPIC, self._on_started_event)
        self.client.subscribe_topic(OUTPUT_TOPIC, _on_output_event)

    def _watch_reconnects(self) -> None:
        async def watch() -> None:
            """Subscribe again after each reconnection; give up, as Dask's client does,
            once it has been cut off for longer than the window (also when its reconnect
            loop died on an error it does not catch)."""
            cut_since: float | None = None
            while self.client.status not in ("closing", "closed"):
                await asyncio.sleep(RECONNECT_CHECK)
                comm = self.client.scheduler_comm
                if self.client.status == "running" and comm is not None:
                    cut_since = None
                    if comm is not self._comm:
                        self._subscribe()
                    continue
                cut_since = cut_since or time.monotonic()
                if time.monotonic() - cut_since > self.reconnect_timeout + RECONNECT_CHECK:
                    break
            if self.broken is None and not self._closing:
                self.broken = (
                    f"the connection to the pool's scheduler at {self._address} was lost for "
                    f"more than {self.reconnect_timeout:g} s"
                )
                await self.client._close()

        loop = self.client.loop
        assert loop is not None
        loop.add_callback(watch)

    @staticmethod
    def _start_scheduler(host: str, port: int, security: Security | None) -> SpecCluster:
        # The scheduler's HTTP server (dashboard when bokeh is installed, health routes
        # always) gets a free port on the scheduler's host, never a fixed public one.
        # A TLS pool's scheduler faces a network of others: its HTTP server (no TLS) stays
        # on loopback.
        dashboard = f"{'127.0.0.1' if security is not None else host}:0"
        options: dict[str, Any] = {
            "host": host,
            "port": port,
            "dashboard_address": dashboard,
            **SCHEDULER_OPTIONS,
        }
        if security is not None:
            options["security"] = security
            options["protocol"] = "tls"
        return SpecCluster(
            scheduler={"cls": Scheduler, "options": options},
            workers={},
            silence_logs=logging.WARNING,
            name="cloudmap",
            security=security,
        )

    def node_tls(self) -> dict[str, str]:
        """What a node's slots need to join a TLS scheduler (PEM texts); empty without TLS.

        Secret: it goes to nodes in their configuration file (mode 0600), never on a
        command line or in a log.
        """
        if self.security is None:
            return {}
        return {
            "ca": str(self.security.tls_ca_file),
            "cert": str(self.security.tls_worker_cert),
            "key": str(self.security.tls_worker_key),
        }

    @property
    def scheduler_address(self) -> str | None:
        """Where the client reaches the scheduler (None before a remote one is connected)."""
        return self._address

    @staticmethod
    def status_for(*, closed: bool) -> Status:
        """Dask's ``Status`` for a pool open or closed (``distributed.Client(pool)`` reads it)."""
        return Status.closed if closed else Status.running

    @property
    def dashboard_link(self) -> str | None:
        """The scheduler's dashboard, when it runs here (a remote one's is not exposed)."""
        if self._cluster is None:
            return None
        return self._cluster.dashboard_link if self._cluster.scheduler_info else None

    def submit_batch(self, fn_blob: bytes, batch_blob: bytes, label: str) -> TaskHandle:
        """Send one batch as one Dask task, never de-duplicated (pure=False, unique key)."""
        future = self.client.submit(
            run_batch, fn_blob, batch_blob, key=self._task_key(label), pure=False
        )
        return TaskHandle(future)

    def submit_batches(
        self, fn_blob: bytes, batch_blobs: list[bytes], label: str
    ) -> list[TaskHandle]:
        """Send batches of one map as tasks in one message to the scheduler (each
        ``submit`` is a message of its own, and each costs the scheduler's loop)."""
        keys = [self._task_key(label) for _ in batch_blobs]
        futures = self.client.map(
            run_batch, [fn_blob] * len(batch_blobs), batch_blobs, key=keys, pure=False
        )
        return [TaskHandle(future) for future in futures]

    def _task_key(self, label: str) -> str:
        return f"cloudmap-{label}-{self._prefix}-{next(self._task_ids)}"

    def on_result(self, task: TaskHandle, deliver: Deliver) -> None:
        """Fetch a task's result on the event loop as soon as it is ready, then call
        ``deliver(task, kind, value)`` with kind "ok" (value: the result), "cancelled" or
        "error" (value: an error to pass to :meth:`loss_of`). Fetches overlap, unlike
        blocking ``result()`` calls. ``deliver`` runs on the event loop: it must not block.
        """
        self.on_results([(task, deliver)])

    def on_results(self, tasks: Sequence[tuple[TaskHandle, Deliver]]) -> None:
        """:meth:`on_result` for several tasks, with one wake-up of the event loop."""
        loop = self.client.loop
        assert loop is not None, "the client has no event loop: is it closed?"

        async def fetch_all() -> None:  # each delivers as its own result arrives
            await asyncio.gather(*(self._fetch(task, deliver) for task, deliver in tasks))

        loop.add_callback(fetch_all)

    async def _fetch(self, task: TaskHandle, deliver: Deliver) -> None:
        try:
            value = await self.client.gather(task._future, asynchronous=True)
        except (concurrent.futures.CancelledError, asyncio.CancelledError) as exc:
            if _dropped_with_connection(exc):
                deliver(task, "error", exc)  # loss_of: DISCONNECTED, sent again
            else:
                deliver(task, "cancelled", exc)
        except OSError as exc:
            if self._cluster is None:
                # A remote scheduler's connection dropped while the result came: it is
                # lost with the connection, not with the task (loss_of: DISCONNECTED).
                dropped = FutureCancelledError(task.key, CONNECTION_LOST, str(exc))
                deliver(task, "error", dropped)
            else:
                self.finished_tasks += 1
                deliver(task, "error", exc)
        except BaseException as exc:
            self.finished_tasks += 1
            deliver(task, "error", exc)
        else:
            self.finished_tasks += 1
            deliver(task, "ok", value)

    def loss_of(self, key: str, error: BaseException, *, timed: bool = False) -> TaskLoss:
        """Why a task got no result, in cloudmap's terms (this may wait up to EVENT_WAIT for
        the slot's last events: call it off the event loop).

        Preempted: its slot's node was preempted or removed (the provider said so first, or,
        for providers that learn it only afterwards, says so now). Queued: a slot that died
        took down the tasks queued behind it too; only the one it was running (it said so
        in a start event) may be to blame. Died: it was running on the slot that died; with
        ``timed`` (the map has a timeout), what the timeout watchdog sent before it ended
        the slot comes along.
        """
        if _dropped_with_connection(error):
            return TaskLoss(LossCause.DISCONNECTED, None, error)
        if not isinstance(error, KilledWorker):
            return TaskLoss(LossCause.FAILED, None, error)
        slot = dead_slot(error)
        if slot.address is not None and self._ask(on_scheduler.is_evicted, slot.address):
            return TaskLoss(LossCause.PREEMPTED, slot.name, error)
        lost = WorkerLostError(
            f"the slot process running this item died ({type(error).__name__}: {error})"
        )
        if not poll_until(lambda: self._started_on(key, slot.address), EVENT_WAIT, interval=0.01):
            return TaskLoss(LossCause.QUEUED, slot.name, lost)
        node = node_of(slot.name)
        if node is not None and self.node_taken is not None and self.node_taken(node):
            if slot.address is not None:
                self._ask(on_scheduler.evict_slot, slot.address)
            return TaskLoss(LossCause.PREEMPTED, slot.name, error)
        partial = self.timeout_result(key) if timed else None
        return TaskLoss(LossCause.DIED, slot.name, lost, partial)

    # -- nodes leaving ----------------------------------------------------------------------

    def mark_lost(self, node_id: str) -> None:
        """Remember the slots of a node about to be killed by its provider, so that the
        tasks they held are known as lost with the node, not as crashes."""
        with contextlib.suppress(Exception):  # closing: no task is waiting for a verdict
            self._ask(on_scheduler.evict_node, node_id)

    def drain(self, node_id: str) -> None:
        """Give a node's slots no new task and move the tasks queued on them elsewhere;
        the tasks they are running finish (or are lost when the node is killed)."""
        self._ask(on_scheduler.drain_node, node_id)

    def undrain(self, node_id: str) -> None:
        """Let a drained node's slots take tasks again (an MPI run gave its nodes back)."""
        self._ask(on_scheduler.undrain_node, node_id)

    def nodes_quiet(self, node_ids: list[str]) -> bool:
        """Whether no slot of these nodes has a task assigned."""
        return bool(self._ask(on_scheduler.nodes_quiet, list(node_ids)))

    def run_on(self, worker: str, coroutine: Callable[..., Any], *args: Any) -> Any:
        """Await ``coroutine(*args)`` in one slot process (out of band, not as a task)."""
        return self.run_on_slots([worker], coroutine, *args)[worker]

    def run_on_slots(
        self, workers: list[str], fn: Callable[..., Any], *args: Any
    ) -> dict[str, Any]:
        """``fn(*args)`` in each of these slot processes at once (out of band), by slot."""
        if not workers:
            return {}
        return dict(self.client.run(fn, *args, workers=list(workers)))

    def rebalance(self) -> int:
        """Move tasks waiting behind a running one on a busy slot to the scheduler's queue
        when some slot is idle; return how many moved.

        Dask queues up to two tasks on a one-thread slot (``worker-saturation`` 1.1, which
        keeps slots fed between short tasks), and with work stealing off a task queued
        there waits even when a new node has joined with idle slots: a long task would
        make the one behind it wait for its whole run. Only tasks that have not started
        (no start event) are moved, so nothing runs twice.
        """
        return int(self._ask(on_scheduler.rebalance))

    def work_counts(self) -> tuple[int, int]:
        """(tasks running, tasks waiting for a slot) on the scheduler now; also samples
        the scheduler's load for the task budget."""
        running, waiting, loop_cpu, tasks_done = self._ask(on_scheduler.work_counts)
        self.budget.observe(wall=time.monotonic(), cpu=loop_cpu, tasks_done=tasks_done)
        return int(running), int(waiting)

    def task_rate(self) -> float:
        """Tasks per second the scheduler can take, as last measured (:mod:`cloudmap.budget`)."""
        return self.budget.rate

    def timeout_result(self, key: str) -> bytes | None:
        """The partial result a slot sent before its timeout watchdog ended it, if any."""
        return poll_until(lambda: self._pop_timeout_result(key), EVENT_WAIT, interval=0.01)

    def _pop_timeout_result(self, key: str) -> bytes | None:
        with self._events_lock:
            return self._timeouts.pop(key, None)

    def _started_on(self, key: str, worker_address: str | None) -> bool:
        with self._events_lock:
            return worker_address in self._started.get(key, ())

    def started(self, key: str) -> bool:
        """Whether the task has begun on some slot (and is not settled yet)."""
        with self._events_lock:
            return bool(self._started.get(key))

    def forget(self, key: str) -> None:
        """Drop what the events said about a task that is settled, and release it."""
        with self._events_lock:
            self._started.pop(key, None)
            self._timeouts.pop(key, None)

    def _on_timeout_event(self, event: tuple[float, dict[str, Any]]) -> None:
        _, message = event
        with self._events_lock:
            self._timeouts[str(message["key"])] = message["result"]

    def _on_started_event(self, event: tuple[float, dict[str, Any]]) -> None:
        _, message = event
        with self._events_lock:
            self._started.setdefault(str(message["key"]), set()).add(str(message["worker"]))

    def slot_count(self, max_age: float = 0.5) -> int:
        """How many slots (workers) are connected; cached for ``max_age`` seconds."""
        checked, count = self._slot_count
        now = time.monotonic()
        if now - checked > max_age:
            count = len(self.addresses())
            self._slot_count = (now, count)
        return count

    def slots_by_node(self) -> dict[str, list[tuple[str, int]]]:
        """Each node's connected slots as (worker address, tasks processing)."""
        view: dict[str, list[tuple[str, int]]] = {}
        for name, address, processing in self._ask(on_scheduler.slots_view):
            node = node_of(name)
            if node is not None:
                view.setdefault(node, []).append((address, processing))
        return view

    def cancel(self, tasks: Iterable[TaskHandle]) -> None:
        """Cancel tasks, queued or running (a running one finishes on its slot unheard)."""
        self.client.cancel([task._future for task in tasks], force=True)

    def stop_running(self, tasks: Iterable[TaskHandle]) -> None:
        """Cancel tasks and end the slot processes still running them, freeing the slots."""
        tasks = list(tasks)
        if not tasks:
            return
        keys = [task.key for task in tasks]
        workers = self._ask(on_scheduler.workers_processing, keys)
        self.cancel(tasks)
        if workers:
            self.client.run(exit_slot, workers=list(workers), wait=False)
            # Return once the scheduler has dropped the ended slots, so that no new task
            # goes to a slot already dead (its replacement joins under the same name).
            poll_until(lambda: not workers & set(self.addresses()), SLOTS_GONE_WAIT, interval=0.02)

    def addresses(self) -> list[str]:
        """The addresses of the connected slots."""
        return list(self._ask(on_scheduler.worker_addresses))

    def _ask(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args, dask_scheduler=...)`` on the scheduler. While the client reconnects
        to a remote scheduler, wait for it (within the reconnect window) and ask again;
        once it is gone for good, raise :class:`~cloudmap.SchedulerLostError`."""
        while True:
            try:
                return self.client.run_on_scheduler(fn, *args)
            except (OSError, asyncio.TimeoutError):
                self.check_usable()
                if self._cluster is not None or self._closing:
                    raise
                if not poll_until(self._reachable, self.reconnect_timeout + 5, interval=0.1):
                    self.check_usable()
                    raise
                self.check_usable()

    def _reachable(self) -> bool:
        """Connected again (True), or never again (True too: the caller checks which)."""
        return self.broken is not None or (
            self.client.status == "running" and self.client.scheduler_comm is not None
        )

    def check_usable(self) -> None:
        """Raise :class:`~cloudmap.SchedulerLostError` once the scheduler is gone for good."""
        if self.broken is not None:
            raise SchedulerLostError(
                f"{self.broken}; the pool cannot go on. Close it and make a new one (a pool "
                "made with keep_pool=True can be attached again with pool_id=)."
            )

    def fail(self, reason: str) -> None:
        """The scheduler is gone for good: record why and drop the client, so that what
        waits on it stops now (the pool raises :class:`~cloudmap.SchedulerLostError`)."""
        if self.broken is None:
            self.broken = reason
        self._closing = True
        client = getattr(self, "client", None)
        if client is not None:
            client.close(timeout=2)

    def close_client(self) -> None:
        """Drop the client (and with it every future) before the nodes go away."""
        self._closing = True
        client = getattr(self, "client", None)
        if client is None:
            return
        if self.broken is None:
            client.close(timeout=10)
            return
        with contextlib.suppress(Exception):  # its scheduler is gone: nothing to tell it
            client.close(timeout=2)

    def close(self) -> None:
        try:
            self.close_client()
        finally:
            if self._cluster is not None:
                self._cluster.close(timeout=10)


#: Seconds to wait for a slot's last events (it started a task; a timeout's partial result):
#: sent before it died, they arrive before Dask reports the death, so the wait only covers
#: event handlers still running on the event loop.
EVENT_WAIT = 1.0
#: Seconds to wait for the scheduler to drop slots that were told to exit.
SLOTS_GONE_WAIT = 10.0
#: Seconds between looks at whether the client reconnected to a remote scheduler.
RECONNECT_CHECK = 0.2
#: Dask's reason for cancelling a client's futures when its connection to the scheduler
#: dropped (the scheduler forgets the tasks of a client that is gone).
CONNECTION_LOST = "scheduler-connection-lost"


def connection_limit(slots: int) -> int:
    """How many connections the client keeps open to fetch results from ``slots`` slots.

    Dask's default, 512, is fine for a small pool; past it every result fetch opens a new
    connection (a quarter of the event loop's time at 1,600 slots). One per slot, then,
    within what this process may open: the in-process scheduler needs one per slot too.
    """
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    spare = soft - slots - FILES_KEPT_FREE
    return max(DEFAULT_CONNECTION_LIMIT, min(slots + 64, spare))


class SchedulerUnreachableError(OSError):
    """The client could not connect to a remote scheduler (the provider explains why)."""

    def __init__(self, address: str, cause: BaseException) -> None:
        super().__init__(f"could not connect to the pool's scheduler at {address}: {cause}")
        self.address = address


def _on_output_event(event: tuple[float, Any]) -> None:
    """What items printed, on its way to their map (:mod:`cloudmap.task_output`)."""
    deliver_output(event[1])


def _dropped_with_connection(error: BaseException) -> bool:
    return getattr(error, "reason", None) == CONNECTION_LOST


def _shorten_batching_interval(client: Client) -> None:
    """Lower Dask's client batching delay (a private attribute, so only where present)."""
    stream = getattr(client, "scheduler_comm", None)
    if stream is not None and hasattr(stream, "interval"):
        stream.interval = BATCH_INTERVAL


class SlotRef(NamedTuple):
    name: str | None
    address: str | None


def dead_slot(error: BaseException) -> SlotRef:
    """The slot a ``KilledWorker`` names as the last to run the task, as far as it says."""
    worker = getattr(error, "last_worker", None)
    name = getattr(worker, "name", None)
    address = getattr(worker, "address", None)
    return SlotRef(None if name is None else str(name), None if address is None else str(address))
