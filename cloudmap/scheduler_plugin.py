"""cloudmap's part of the Dask scheduler: slot statuses, drains, rebalancing, and what began where.

Everything here runs on the scheduler's event loop, in the client's process or on the pool
node that hosts the scheduler: the :class:`PoolPlugin` that the cluster glue registers
(``Client.register_plugin``, so the same way for both), and the functions it sends with
``run_on_scheduler``. The client never touches the plugin's state directly. With the
slot runner (:mod:`cloudmap.node.runner`) and the cluster glue
(:mod:`cloudmap.cluster`), this is the only code that touches Dask's internals; the ones it
relies on are listed in :data:`cloudmap.dask_config.PRIVATE_DASK_API`.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any

from distributed import Scheduler, SchedulerPlugin, get_worker
from distributed.core import Status
from distributed.protocol import to_serialize
from distributed.utils import sync

from .dask_config import BATCH_INTERVAL
from .nodes import node_of
from .payload import OUTPUT_TOPIC, STARTED_TOPIC, TIMEOUT_TOPIC

#: The scheduler's handlers for ``pool.share`` (:mod:`cloudmap.share`): store, fetch, count.
SHARE_PUT = "cloudmap_share_put"
SHARE_GET = "cloudmap_share_get"
SHARE_TRANSFERS = "cloudmap_share_transfers"


#: cloudmap's own event topics: their subscribers take each event as it happens.
OWN_TOPICS = frozenset({STARTED_TOPIC, OUTPUT_TOPIC, TIMEOUT_TOPIC})
#: Events of each of those topics the scheduler keeps (Dask keeps 100,000 of any topic).
KEPT_EVENTS = 1000


class PoolPlugin(SchedulerPlugin):
    """cloudmap's part of the scheduler, on its event loop.

    As each slot joins: apply BATCH_INTERVAL to its stream, drain it at once if its node is
    draining (a slot restarted on a node under preemption notice), and forget that its
    address belonged to an evicted slot (ports are reused). It also knows which tasks have
    begun where (``began``), and keeps the statuses cloudmap gives slots from being undone
    by stale reports (``screen_status_reports``).
    """

    name = "cloudmap-pool"

    def __init__(self) -> None:
        # All of it is only touched on the scheduler's event loop.
        self.draining: set[str] = set()  # node ids
        self.evicted: set[str] = set()  # addresses of slots killed with their node
        # slot address -> the status cloudmap told it and it has not yet confirmed;
        self.told: dict[str, Status] = {}
        # task key -> (slot address, run id) of its current assignment, once that began.
        self.began: dict[str, tuple[str, int]] = {}
        #: Assignments that ended (finished, failed or moved): the tasks the loop handled.
        self.tasks_done = 0
        #: ``pool.share``'s store: pickled objects by digest, and fetches by digest and node.
        self.shared: dict[str, Any] = {}
        self.shared_transfers: dict[str, dict[str, int]] = {}
        self._trimmed_topics: set[str] = set()
        self._scheduler: Scheduler | None = None

    async def start(self, scheduler: Scheduler) -> None:
        """Called by the scheduler as the plugin is registered, before it is added."""
        self._scheduler = scheduler
        self.screen_status_reports(scheduler)
        self.serve_shared(scheduler)

    def has_begun(self, ts: Any, ws: Any) -> bool:
        """Whether this task, as now assigned to this slot, has started running there.

        Rescheduling a task that has begun would run it twice; one that has not is safe to
        move. The record is the scheduler's, kept in order with the slot's other messages
        and tied to Dask's run id of the assignment: a task moved off a slot and later
        given back to it has not begun again until its new start is reported.
        """
        return self.began.get(str(ts.key)) == (ws.address, ts.run_id)

    def log_event(self, topic: str, msg: Any) -> None:
        if topic in OWN_TOPICS and topic not in self._trimmed_topics:
            self._keep_few_events(topic)
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

    def _keep_few_events(self, topic: str) -> None:
        """Keep the last KEPT_EVENTS of one of cloudmap's topics, not Dask's 100,000.

        The scheduler keeps every topic's recent events for clients that ask later; cloudmap's
        clients take theirs as they happen (subscribed), so a long map's start events and a
        chatty one's output lines would only pile up in the scheduler's memory.
        """
        self._trimmed_topics.add(topic)
        broker = getattr(self._scheduler, "_broker", None)
        kept = getattr(broker, "_topics", {}).get(topic)
        if kept is not None and hasattr(kept, "events"):
            kept.events = deque(kept.events, maxlen=KEPT_EVENTS)

    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        if start == "processing":
            self.began.pop(str(key), None)
            self.tasks_done += 1

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

    async def before_close(self) -> None:
        """Close every slot's stream at once, before Dask does it one slot at a time.

        Dask closes the streams itself, and then handles each closed stream as a slot
        leaving, telling every remaining slot: quadratic, which kept a pool of 1,600 slots
        closing for over ten seconds (16,000: hours). A closing scheduler has nothing to
        tell, so the streams are taken out of its hands first and closed here, as Dask
        would: the slot is told to close, then the stream ends.
        """
        scheduler = self._scheduler
        if scheduler is None:
            return
        streams = list(scheduler.stream_comms.values())
        scheduler.stream_comms.clear()
        for stream in streams:
            if not stream.closed():
                stream.send({"op": "close", "reason": "scheduler-close"})
        await asyncio.gather(*(stream.close() for stream in streams), return_exceptions=True)

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

    def serve_shared(self, scheduler: Scheduler) -> None:
        """Answer ``pool.share``'s calls (:mod:`cloudmap.share`) as scheduler handlers.

        The store is here, not in the client, because nodes only ever reach the scheduler
        (which may run on a pool node, and the client may be behind NAT). The client puts an
        object's pickle once; on each node one slot fetches it (the node's other slots read
        the node's copy); every fetch is counted by node, so a test or benchmark can see how
        often the bytes moved. The store goes with the scheduler when the pool closes.
        """

        def put(digest: str, payload: Any = None) -> bool:
            """Store ``payload`` unless stored; say whether ``digest`` is stored now."""
            if payload is not None:
                self.shared.setdefault(digest, payload)
            return digest in self.shared

        def get(digest: str, worker: str) -> dict[str, Any]:
            payload = self.shared.get(digest)
            if payload is None:
                return {"status": "missing"}
            counts = self.shared_transfers.setdefault(digest, {})
            node = node_of(worker) or worker
            counts[node] = counts.get(node, 0) + 1
            # Its own frame: the comm sends it in shards, without copying it into a message.
            return {"status": "OK", "payload": to_serialize(payload)}

        def transfers(digest: str) -> dict[str, int]:
            return dict(self.shared_transfers.get(digest, {}))

        scheduler.handlers.update({SHARE_PUT: put, SHARE_GET: get, SHARE_TRANSFERS: transfers})


def put_shared(client: Any, digest: str, blob: bytes) -> None:
    """From the client: store a shared object's pickle on the scheduler, unless it is there
    (sharing the same object again sends nothing)."""
    put = getattr(client.scheduler, SHARE_PUT)
    if not client.sync(put, digest=digest):
        client.sync(put, digest=digest, payload=to_serialize(blob))


def shared_transfers(client: Any, digest: str) -> dict[str, int]:
    """From the client: how many times each node fetched the shared object ``digest``."""
    counts = client.sync(getattr(client.scheduler, SHARE_TRANSFERS), digest=digest)
    return dict(counts)


def fetch_shared(digest: str) -> memoryview | None:
    """In a task on a slot: a shared object's pickle from the pool's scheduler (None when
    the scheduler does not hold it), over the slot's own connection to it.

    Raises LookupError outside a task of a Dask worker (no scheduler to ask).
    """
    try:
        worker = get_worker()
    except ValueError as exc:
        raise LookupError(str(exc)) from exc
    get = getattr(worker.scheduler, SHARE_GET)
    reply = sync(worker.loop, get, digest=digest, worker=str(worker.name))
    if reply.get("status") != "OK":
        return None
    return memoryview(reply["payload"])  # bytes as received, not copied


def evict_node(node_id: str, dask_scheduler: Scheduler) -> None:
    """A node is about to be killed by its provider: its slots' tasks are lost with it."""
    plugin = _plugin_of(dask_scheduler)
    plugin.draining.discard(node_id)
    plugin.evicted.update(
        ws.address for ws in dask_scheduler.workers.values() if node_of(ws.name) == node_id
    )


def evict_slot(address: str, dask_scheduler: Scheduler) -> None:
    """A slot died with its node (the provider said so afterwards)."""
    _plugin_of(dask_scheduler).evicted.add(address)


def is_evicted(address: str, dask_scheduler: Scheduler) -> bool:
    return address in _plugin_of(dask_scheduler).evicted


def drain_node(node_id: str, dask_scheduler: Scheduler) -> None:
    """Stop new work reaching a node's slots; send tasks not yet begun there elsewhere.

    The slots are put in Dask's ``closing_gracefully`` status (as ``retire_workers`` does),
    which keeps the scheduler from choosing them and the workers from starting queued tasks.
    """
    plugin = _plugin_of(dask_scheduler)
    plugin.draining.add(node_id)
    for ws in list(dask_scheduler.workers.values()):
        if node_of(ws.name) != node_id:
            continue
        _set_slot_status(dask_scheduler, ws, Status.closing_gracefully)
        stimulus = f"cloudmap-drain-{time.time()}"
        for ts in list(ws.processing):
            if not plugin.has_begun(ts, ws):
                dask_scheduler._reschedule(ts.key, ws.address, stimulus_id=stimulus)


def rebalance(dask_scheduler: Scheduler) -> int:
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


def nodes_quiet(node_ids: list[str], dask_scheduler: Scheduler) -> bool:
    wanted = set(node_ids)
    return not any(
        ws.processing for ws in dask_scheduler.workers.values() if node_of(ws.name) in wanted
    )


def undrain_node(node_id: str, dask_scheduler: Scheduler) -> None:
    _plugin_of(dask_scheduler).draining.discard(node_id)
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


def _plugin_of(dask_scheduler: Scheduler) -> PoolPlugin:
    plugin = dask_scheduler.plugins[PoolPlugin.name]
    assert isinstance(plugin, PoolPlugin)
    return plugin


def work_counts(dask_scheduler: Scheduler) -> tuple[int, int, float, int]:
    """(tasks running, tasks waiting, the loop's CPU seconds, tasks done): the last two
    for the task budget (:mod:`cloudmap.budget`). This runs on the scheduler's event loop,
    so the thread's CPU time is the loop's."""
    running = waiting = 0
    for ws in dask_scheduler.workers.values():
        processing = len(ws.processing)
        busy = min(processing, ws.nthreads)
        running += busy
        waiting += processing - busy
    waiting += len(dask_scheduler.queued) + len(dask_scheduler.unrunnable)
    return running, waiting, time.thread_time(), _plugin_of(dask_scheduler).tasks_done


def slots_view(dask_scheduler: Scheduler) -> list[tuple[str, str, int]]:
    return [
        (str(ws.name), ws.address, len(ws.processing)) for ws in dask_scheduler.workers.values()
    ]


def worker_addresses(dask_scheduler: Scheduler) -> list[str]:
    return list(dask_scheduler.workers)


def workers_processing(keys: list[str], dask_scheduler: Scheduler) -> set[str]:
    workers = set()
    for key in keys:
        task = dask_scheduler.tasks.get(key)
        if task is not None and task.processing_on is not None:
            workers.add(task.processing_on.address)
    return workers
