"""Cluster glue: the pool's Dask scheduler and client, and the few questions cloudmap asks them.

The scheduler runs in the client's process, on Dask's event-loop thread; slots (one Dask
worker process with one thread each) connect to it from the nodes. Nothing here knows how
nodes are made.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import dask
from distributed import Client, Future, Scheduler, SchedulerPlugin, Security, SpecCluster
from distributed.core import Status
from distributed.scheduler import KilledWorker

from .dask_config import LOW_OVERHEAD
from .nodes import node_of
from .payload import STARTED_TOPIC, TIMEOUT_TOPIC
from .runner import exit_slot, run_batch


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


class DaskCluster:
    """A scheduler on ``host`` and a client connected to it.

    ``allowed_failures=0``: a task whose slot dies is reported to cloudmap at once, which
    decides between retry (crash), free requeue (a task only queued on the dead slot) and
    timeout, item by item.
    """

    def __init__(self, host: str = "127.0.0.1", *, port: int = 0, tls: bool = False) -> None:
        logging.getLogger("distributed.scheduler").addFilter(_KILLED_WORKER_NOISE)
        #: Per-pool temporary certificates when ``tls``: every connection (client, scheduler,
        #: slots) is TLS, and a peer without them is refused.
        self.security = Security.temporary() if tls else None
        with dask.config.set(LOW_OVERHEAD):
            self._cluster = self._start_scheduler(host, port, self.security)
        # Results come straight from the slots, except over TLS: there, a client connecting
        # to a slot that a crashing task was taking down waited out the whole connect
        # timeout (30 s) about once per three crashes, so results go through the scheduler,
        # which runs in this process anyway. (The scheduler still connects to the slots.)
        self.client = Client(
            self._cluster, direct_to_workers=self.security is None, security=self.security
        )
        self._plugin = _PoolPlugin()
        _shorten_batching_intervals(self.client)
        self._plugin.attach(self._cluster.scheduler)
        self._timeouts: dict[str, bytes] = {}
        self._started: dict[str, set[str]] = {}
        self._events_lock = threading.Lock()
        self.client.subscribe_topic(TIMEOUT_TOPIC, self._on_timeout_event)
        self.client.subscribe_topic(STARTED_TOPIC, self._on_started_event)
        self._slot_count = (0.0, 0)
        self._task_ids = itertools.count()
        self._prefix = uuid.uuid4().hex[:8]
        #: Tasks whose outcome came back (a result or an error), for the pool widget.
        self.finished_tasks = 0
        #: Asks the provider whether a node was taken away (preempted, removed) when a slot
        #: dies without warning: providers that learn of it only afterwards (Batch) set it.
        self.node_taken: Callable[[str], bool] | None = None

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
            "allowed_failures": 0,
            "validate": False,
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
    def scheduler_address(self) -> str:
        return str(self._cluster.scheduler_address)

    @property
    def dashboard_link(self) -> str | None:
        return self._cluster.dashboard_link if self._cluster.scheduler_info else None

    def submit_batch(self, fn_blob: bytes, batch_blob: bytes, label: str) -> Future:
        """Send one batch as one Dask task, never de-duplicated (pure=False, unique key)."""
        key = f"cloudmap-{label}-{self._prefix}-{next(self._task_ids)}"
        return self.client.submit(run_batch, fn_blob, batch_blob, key=key, pure=False)

    def on_result(self, future: Future, deliver: Callable[[Future, str, Any], None]) -> None:
        """Fetch a task's result on the event loop as soon as it is ready, then call
        ``deliver(future, kind, value)`` with kind "ok" (value: the result), "cancelled" or
        "error" (value: the exception). Fetches overlap, unlike blocking ``result()`` calls.
        """
        loop = self.client.loop
        assert loop is not None, "the client has no event loop: is it closed?"
        loop.add_callback(self._fetch, future, deliver)

    async def _fetch(self, future: Future, deliver: Callable[[Future, str, Any], None]) -> None:
        try:
            value = await self.client.gather(future, asynchronous=True)
        except (concurrent.futures.CancelledError, asyncio.CancelledError) as exc:
            deliver(future, "cancelled", exc)
        except BaseException as exc:
            self.finished_tasks += 1
            deliver(future, "error", exc)
        else:
            self.finished_tasks += 1
            deliver(future, "ok", value)

    def loss_cause(self, key: str, error: BaseException) -> str | None:
        """Why a task got no result, when it is not the task's fault; None when it may be.

        ``"evicted"``: its slot's node was preempted or removed (the provider said so first).
        ``"queued"``: a slot that died took down the tasks queued behind it too; only the
        one it was running (it said so in a start event) may be to blame.
        """
        if not isinstance(error, KilledWorker):
            return None
        slot = dead_slot(error)
        address = slot.address
        if address in self._plugin.evicted:
            return "evicted"
        if not _wait_for_event(lambda: self._started_on(key, address)):
            return "queued"
        # It was running there: a crash, unless the node was taken (which some providers
        # learn only afterwards).
        node = node_of(slot.name)
        if node is not None and self.node_taken is not None and self.node_taken(node):
            if address is not None:
                self._plugin.evicted.add(address)
            return "evicted"
        return None

    # -- nodes leaving ----------------------------------------------------------------------

    def mark_lost(self, node_id: str) -> None:
        """Remember the slots of a node about to be killed by its provider, so that the
        tasks they held are known as lost with the node, not as crashes."""
        self._plugin.draining.discard(node_id)
        try:
            addresses = self.client.run_on_scheduler(_node_workers, node_id)
        except Exception:  # the scheduler is closing: no task is waiting for a verdict
            return
        self._plugin.evicted.update(addresses)

    def drain(self, node_id: str) -> None:
        """Give a node's slots no new task and move the tasks queued on them elsewhere;
        the tasks they are running finish (or are lost when the node is killed)."""
        self._plugin.draining.add(node_id)
        self.client.run_on_scheduler(_drain_node, node_id)

    def undrain(self, node_id: str) -> None:
        """Let a drained node's slots take tasks again (an MPI run gave its nodes back)."""
        self._plugin.draining.discard(node_id)
        self.client.run_on_scheduler(_undrain_node, node_id)

    def nodes_quiet(self, node_ids: list[str]) -> bool:
        """Whether no slot of these nodes has a task assigned."""
        return bool(self.client.run_on_scheduler(_nodes_quiet, list(node_ids)))

    def run_on(self, worker: str, coroutine: Callable[..., Any], *args: Any) -> Any:
        """Await ``coroutine(*args)`` in one slot process (out of band, not as a task)."""
        return self.client.run(coroutine, *args, workers=[worker])[worker]

    def rebalance(self) -> int:
        """Move tasks waiting behind a running one on a busy slot to the scheduler's queue
        when some slot is idle; return how many moved.

        Dask queues up to two tasks on a one-thread slot (``worker-saturation`` 1.1, which
        keeps slots fed between short tasks), and with work stealing off a task queued
        there waits even when a new node has joined with idle slots: a long task would
        make the one behind it wait for its whole run. Only tasks that have not started
        (no start event) are moved, so nothing runs twice.
        """
        return int(self.client.run_on_scheduler(_rebalance))

    def work_counts(self) -> tuple[int, int]:
        """(tasks running, tasks waiting for a slot) on the scheduler now."""
        running, waiting = self.client.run_on_scheduler(_work_counts)
        return int(running), int(waiting)

    def timeout_result(self, key: str) -> bytes | None:
        """The partial result a slot sent before its timeout watchdog ended it, if any."""
        return _wait_for_event(lambda: self._pop_timeout_result(key))

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
            count = len(self.client.run_on_scheduler(_worker_addresses))
            self._slot_count = (now, count)
        return count

    def slots_by_node(self) -> dict[str, list[tuple[str, int]]]:
        """Each node's connected slots as (worker address, tasks processing)."""
        view: dict[str, list[tuple[str, int]]] = {}
        for name, address, processing in self.client.run_on_scheduler(_slots_view):
            node = node_of(name)
            if node is not None:
                view.setdefault(node, []).append((address, processing))
        return view

    def stop_running(self, futures: Iterable[Future]) -> None:
        """Cancel tasks and end the slot processes still running them, freeing the slots."""
        futures = list(futures)
        if not futures:
            return
        keys = [f.key for f in futures]
        workers = self.client.run_on_scheduler(_workers_processing, keys)
        self.client.cancel(futures, force=True)
        if workers:
            self.client.run(exit_slot, workers=list(workers), wait=False)
            self._wait_until_gone(workers)

    def _wait_until_gone(self, workers: set[str], timeout: float = 10.0) -> None:
        """Return once the scheduler has dropped the ended slots, so that no new task is
        handed to a slot that is already dead (its replacement joins under the same name)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not workers & set(self.client.run_on_scheduler(_worker_addresses)):
                return
            time.sleep(0.02)

    def close_client(self) -> None:
        """Drop the client (and with it every future) before the nodes go away."""
        self.client.close(timeout=10)

    def close(self) -> None:
        try:
            self.client.close(timeout=10)
        finally:
            self._cluster.close(timeout=10)


#: Dask batches small messages for up to 10 ms (client to scheduler) and 5 ms (scheduler to
#: worker) to save syscalls under heavy load; for cloudmap, whose tasks are already batches,
#: that latency is what a tiny map or a submit() waits for. 1 ms keeps most of the saving.
BATCH_INTERVAL = 0.001


def _shorten_batching_intervals(client: Client) -> None:
    """Lower Dask's client batching delay (a private attribute, so only where present)."""
    stream = getattr(client, "scheduler_comm", None)
    if stream is not None and hasattr(stream, "interval"):
        stream.interval = BATCH_INTERVAL


class _PoolPlugin(SchedulerPlugin):
    """cloudmap's part of the scheduler, on its event loop in the client's process.

    As each slot joins: apply BATCH_INTERVAL to its stream, drain it at once if its node is
    draining (a slot restarted on a node under preemption notice), and forget that its
    address belonged to an evicted slot (ports are reused). It also knows which tasks have
    begun where (``began``), and keeps the statuses cloudmap gives slots from being undone
    by stale reports (``screen_status_reports``).
    """

    name = "cloudmap-pool"

    def __init__(self) -> None:
        # Both are changed from the client's threads too; single set operations are atomic.
        self.draining: set[str] = set()  # node ids
        self.evicted: set[str] = set()  # addresses of slots killed with their node
        # Only touched on the scheduler's event loop:
        # slot address -> the status cloudmap told it and it has not yet confirmed;
        self.told: dict[str, Status] = {}
        # task key -> (slot address, run id) of its current assignment, once that began.
        self.began: dict[str, tuple[str, int]] = {}
        self._scheduler: Scheduler | None = None

    def attach(self, scheduler: Scheduler | None) -> None:
        if scheduler is None or not hasattr(scheduler, "add_plugin"):
            return
        self._scheduler = scheduler
        scheduler.add_plugin(self)
        self.screen_status_reports(scheduler)

    def has_begun(self, ts: Any, ws: Any) -> bool:
        """Whether this task, as now assigned to this slot, has started running there.

        Rescheduling a task that has begun would run it twice; one that has not is safe to
        move. The record is the scheduler's, kept in order with the slot's other messages
        and tied to Dask's run id of the assignment: a task moved off a slot and later
        given back to it has not begun again until its new start is reported.
        """
        return self.began.get(str(ts.key)) == (ws.address, ts.run_id)

    def log_event(self, topic: str, msg: Any) -> None:
        if topic != STARTED_TOPIC or self._scheduler is None or not isinstance(msg, dict):
            return
        key, worker, run_id = str(msg.get("key")), str(msg.get("worker")), msg.get("run_id")
        ts = self._scheduler.tasks.get(key)
        if (
            isinstance(run_id, int)
            and ts is not None
            and ts.state == "processing"
            and ts.processing_on is not None
            and ts.processing_on.address == worker
            and ts.run_id == run_id
        ):
            self.began[key] = (worker, run_id)

    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        if start == "processing":
            self.began.pop(str(key), None)

    def add_worker(self, scheduler: Scheduler, worker: str) -> None:
        self.evicted.discard(worker)
        self.told.pop(worker, None)
        stream = getattr(scheduler, "stream_comms", {}).get(worker)
        if stream is not None and hasattr(stream, "interval"):
            stream.interval = BATCH_INTERVAL
        ws = scheduler.workers.get(worker)
        if ws is not None and node_of(ws.name) in self.draining:
            _set_slot_status(scheduler, ws, Status.closing_gracefully)

    def remove_worker(self, scheduler: Scheduler, worker: str, **kwargs: Any) -> None:
        self.told.pop(worker, None)

    def screen_status_reports(self, scheduler: Scheduler) -> None:
        """Put a filter in front of the scheduler's handler of slots' status reports.

        A slot reports every status it takes, including the ones the scheduler told it to
        take. When an MPI run gives nodes back and the next run takes the same nodes at
        once, the slot's report of "running" (from the release) reaches the scheduler after
        the scheduler has drained it again; Dask would then believe it, hand it queued map
        tasks, and the slot, paused by the drain that follows, would never run them: the
        next run waited forever for those nodes to go quiet. So once cloudmap tells a slot
        a status, the slot's reports are dropped until it confirms that status (the slot
        handles messages in order, so everything it said before is stale), and a slot of a
        draining node that leaves a pause of its own is told to stay drained.
        """
        handle = scheduler.stream_handlers["worker-status-change"]

        def screened(status: str, worker: str, stimulus_id: str, **extra: Any) -> None:
            told = self.told.get(worker)
            if told is not None:
                if Status[status] == told:
                    del self.told[worker]
                return
            ws = scheduler.workers.get(worker)
            reported = Status[status]
            if ws is not None and reported == Status.running and node_of(ws.name) in self.draining:
                _set_slot_status(scheduler, ws, Status.closing_gracefully)
                return
            handle(status=status, worker=worker, stimulus_id=stimulus_id, **extra)

        scheduler.stream_handlers["worker-status-change"] = screened


class SlotRef(NamedTuple):
    name: str | None
    address: str | None


def dead_slot(error: BaseException) -> SlotRef:
    """The slot a ``KilledWorker`` names as the last to run the task, as far as it says."""
    worker = getattr(error, "last_worker", None)
    name = getattr(worker, "name", None)
    address = getattr(worker, "address", None)
    return SlotRef(None if name is None else str(name), None if address is None else str(address))


def _wait_for_event(check: Callable[[], Any], seconds: float = 1.0) -> Any:
    """Events a slot sent just before dying arrive before Dask reports the death; the
    short wait only covers event handlers still running on the event loop."""
    deadline = time.monotonic() + seconds
    while True:
        found = check()
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.01)


def _node_workers(node_id: str, dask_scheduler: Scheduler) -> list[str]:
    return [ws.address for ws in dask_scheduler.workers.values() if node_of(ws.name) == node_id]


def _drain_node(node_id: str, dask_scheduler: Scheduler) -> None:
    """Stop new work reaching a node's slots; send tasks not yet begun there elsewhere.

    The slots are put in Dask's ``closing_gracefully`` status (as ``retire_workers`` does),
    which keeps the scheduler from choosing them and the workers from starting queued tasks.
    """
    plugin = _plugin_of(dask_scheduler)
    for ws in list(dask_scheduler.workers.values()):
        if node_of(ws.name) != node_id:
            continue
        _set_slot_status(dask_scheduler, ws, Status.closing_gracefully)
        stimulus = f"cloudmap-drain-{time.time()}"
        for ts in list(ws.processing):
            if not plugin.has_begun(ts, ws):
                dask_scheduler._reschedule(ts.key, ws.address, stimulus_id=stimulus)


def _rebalance(dask_scheduler: Scheduler) -> int:
    plugin = _plugin_of(dask_scheduler)
    idle = sum(1 for ws in dask_scheduler.running if not ws.processing)
    moved = 0
    stimulus = f"cloudmap-rebalance-{time.time()}"
    for ws in list(dask_scheduler.running):
        if moved >= idle:
            break
        if len(ws.processing) <= ws.nthreads:
            continue
        for ts in list(ws.processing):
            if moved >= idle or len(ws.processing) <= ws.nthreads:
                break
            if not plugin.has_begun(ts, ws):
                dask_scheduler._reschedule(ts.key, ws.address, stimulus_id=stimulus)
                moved += 1
    return moved


def _nodes_quiet(node_ids: list[str], dask_scheduler: Scheduler) -> bool:
    wanted = set(node_ids)
    return not any(
        ws.processing for ws in dask_scheduler.workers.values() if node_of(ws.name) in wanted
    )


def _undrain_node(node_id: str, dask_scheduler: Scheduler) -> None:
    for ws in list(dask_scheduler.workers.values()):
        if node_of(ws.name) == node_id and ws.status == Status.closing_gracefully:
            _set_slot_status(dask_scheduler, ws, Status.running)


def _set_slot_status(dask_scheduler: Scheduler, ws: Any, status: Status) -> None:
    """Set a slot's status on the scheduler at once (so no task is chosen for a slot being
    drained while the message travels, as ``retire_workers`` does) and tell the slot,
    which pauses or resumes its queue. Its reports are screened until it confirms."""
    stimulus = f"cloudmap-{status.name}-{time.time()}"
    stream = dask_scheduler.stream_comms.get(ws.address)
    if stream is not None:
        _plugin_of(dask_scheduler).told[ws.address] = status
    dask_scheduler.handle_worker_status_change(status, ws, stimulus)
    if stream is not None:
        stream.send({"op": "worker-status-change", "status": status.name, "stimulus_id": stimulus})


def _plugin_of(dask_scheduler: Scheduler) -> _PoolPlugin:
    plugin = dask_scheduler.plugins[_PoolPlugin.name]
    assert isinstance(plugin, _PoolPlugin)
    return plugin


def _work_counts(dask_scheduler: Scheduler) -> tuple[int, int]:
    running = waiting = 0
    for ws in dask_scheduler.workers.values():
        processing = len(ws.processing)
        busy = min(processing, ws.nthreads)
        running += busy
        waiting += processing - busy
    waiting += len(dask_scheduler.queued) + len(dask_scheduler.unrunnable)
    return running, waiting


def _slots_view(dask_scheduler: Scheduler) -> list[tuple[str, str, int]]:
    return [
        (str(ws.name), ws.address, len(ws.processing)) for ws in dask_scheduler.workers.values()
    ]


def _worker_addresses(dask_scheduler: Scheduler) -> list[str]:
    return list(dask_scheduler.workers)


def _workers_processing(keys: list[str], dask_scheduler: Scheduler) -> set[str]:
    workers = set()
    for key in keys:
        task = dask_scheduler.tasks.get(key)
        if task is not None and task.processing_on is not None:
            workers.add(task.processing_on.address)
    return workers
