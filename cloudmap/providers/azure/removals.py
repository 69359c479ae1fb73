"""Removing nodes from a Batch pool: at most 100 node ids a request, one request at a time.

Batch takes at most :data:`MAX_REMOVALS` node ids in one "remove nodes" request, and takes
one only while the pool's allocation state is steady: the removal it starts makes the pool
``resizing`` until those nodes are gone. So removing more nodes than that is a queue. The
first request goes at once, from the caller's thread (its errors reach the caller); the rest
go one after another from a background thread, each once Batch shows the pool steady after
the previous one (the SDK's own poller of the removal, which reads the pool every
:data:`STEADY_POLL` seconds). A removal asked for while one is under way joins the queue
instead of stopping it: stopping a removal halfway would leave nodes that cloudmap already
counts as gone. A request that Batch throttles, or that finds it busy, is sent again after a
backoff; nothing is dropped but what Batch refuses outright, which is logged.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from ...loops import poll_until
from . import bodies
from .throttling import Backoff, transient

logger = logging.getLogger(__name__)

#: Node ids Batch takes in one "remove nodes" request (BatchNodeRemoveOptions.nodeList).
MAX_REMOVALS = 100
#: Seconds between looks at the pool's allocation state while a removal is under way.
STEADY_POLL = 0.5
#: Seconds to wait for Batch to stop a resize that is in the way of a removal.
STOP_TIMEOUT = 60.0


class Removals:
    """The pool's removals: :meth:`remove` queues node ids and sends what it can."""

    def __init__(
        self,
        client: Any,
        pool_id: str,
        *,
        backoff: Backoff,
        deadline: float,
        still_listed: Callable[[list[str]], list[str]],
    ) -> None:
        self._client = client
        self._pool_id = pool_id
        self._backoff = backoff
        self._deadline = deadline  # seconds a removal may take before the next is sent
        self._still_listed = still_listed  # those of these ids Batch still lists
        self._lock = threading.RLock()  # one request at a time
        self._queue: list[str] = []
        self._in_flight: Any = None  # the SDK's poller of the last removal sent
        self._worker: threading.Thread | None = None
        self._stop = threading.Event()
        #: The last requests sent, as their node ids (for diagnostics).
        self.sent: deque[list[str]] = deque(maxlen=100)

    def remove(self, node_ids: Sequence[str]) -> None:
        ids = list(node_ids)
        if not ids or self._stop.is_set():
            return
        with self._lock:
            if self._busy():
                self._queue.extend(ids)
            else:
                first, rest = ids[:MAX_REMOVALS], ids[MAX_REMOVALS:]
                sent = self._send(first)  # Batch's refusal reaches the caller
                self._queue.extend(rest if sent else first + rest)
            if self._queue:
                self._start_worker()

    def idle(self) -> bool:
        """Nothing queued and no removal under way."""
        with self._lock:
            return not self._busy() and not self._queue

    def wait(self, timeout: float) -> bool:
        """Wait until every queued removal is done; whether they were in time."""
        return bool(poll_until(self.idle, timeout, interval=STEADY_POLL))

    def stop(self) -> None:
        """Send nothing more (the pool is being deleted, which removes every node)."""
        self._stop.set()
        with self._lock:
            self._queue.clear()

    # -- inside ----------------------------------------------------------------------

    def _busy(self) -> bool:
        in_flight = self._in_flight is not None and not self._in_flight.done()
        return in_flight or self._worker is not None

    def _start_worker(self) -> None:
        if self._worker is None:
            self._worker = threading.Thread(
                target=self._run, name=f"cloudmap-removals-{self._pool_id}", daemon=True
            )
            self._worker.start()

    def _run(self) -> None:
        while True:
            poller = self._in_flight
            if poller is not None:
                try:
                    poller.result(timeout=self._deadline)
                except Exception:
                    logger.debug("cloudmap: the poller of a removal failed", exc_info=True)
            with self._lock:
                if self._stop.is_set() or not self._queue:
                    self._worker = None
                    return
                chunk = self._queue[:MAX_REMOVALS]
                del self._queue[:MAX_REMOVALS]
                try:
                    sent = self._send(chunk)
                except Exception as exc:
                    logger.error(
                        "cloudmap: Azure Batch refused to remove %d nodes of pool %s (%s); "
                        "they stay in the pool until it is deleted",
                        len(chunk),
                        self._pool_id,
                        exc,
                    )
                    continue
                if not sent:
                    self._queue[:0] = chunk
                    wait = self._backoff.failed()
            if not sent and self._stop.wait(wait):
                with self._lock:
                    self._worker = None
                return

    def _send(self, chunk: list[str]) -> bool:
        """Send one request; False if Batch pushed back (send it again later)."""
        from azure.batch import models

        def send(ids: list[str]) -> None:
            options = models.BatchNodeRemoveOptions(bodies.remove_body(ids))
            self._in_flight = self._client.begin_remove_nodes(
                self._pool_id, options, polling_interval=STEADY_POLL
            )
            self.sent.append(list(ids))

        try:
            try:
                send(chunk)
            except Exception as exc:
                status = getattr(exc, "status_code", None)
                if status == 409:  # Batch removes nodes only from a steady pool: a grow is
                    # under way (cloudmap's own removals wait their turn), so stop it first
                    self._client.begin_stop_pool_resize(
                        self._pool_id, polling_interval=STEADY_POLL
                    ).result(timeout=STOP_TIMEOUT)
                    send(chunk)
                elif status == 404:  # the pool is gone, or some of the nodes already are
                    rest = self._still_listed(chunk)
                    if rest and rest != chunk:
                        send(rest)
                else:
                    raise
        except Exception as exc:
            if transient(exc):
                return False
            if getattr(exc, "status_code", None) == 404:
                return True
            raise
        self._backoff.succeeded()
        return True
