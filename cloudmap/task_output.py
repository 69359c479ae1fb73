"""Output in the cell: what a map's items print, log and warn, shown where the map was run.

A slot that runs a batch with an output tag (``capture_output=True``, the default) sends
the items' lines as Dask events while they run (:mod:`cloudmap.node.runner`); the cluster
glue hands each event to :func:`deliver`, which routes it by tag to its map's
:class:`TaskOutput`. The map engine calls :meth:`TaskOutput.show` from the thread that
runs the map, so the lines land under the cell that ran it (a blocking map runs in the
cell's thread), or go to the progress display when it takes them (a widget's output area,
which stays under its own cell from any thread; a tqdm bar, which must not be broken).

Two rate limits keep a chatty function from flooding anything, both token buckets of
"a burst, then so many lines a second": each slot sends at most :data:`SLOT_LIMIT` (so the
scheduler, which relays every event, is not flooded), and each map shows at most
:data:`MAP_LIMIT`. Lines past them are counted, never queued: one summary line says how many
and where the full output is (every line stays in the slot's log, ``slots/slot-N.log`` in
the node's directory, readable with ``pool.node(node_id).read_file(...)``).
"""

from __future__ import annotations

import sys
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

from .nodes import node_of

#: A map shows at most this many lines at once, then this many a second (the rest is counted).
MAP_LIMIT = (100, 20.0)
#: A slot sends at most this many lines at once, then this many a second (the rest stays
#: in its log only). One bucket per slot process, shared by the batches it runs.
SLOT_LIMIT = (100, 20.0)

#: Writes one or more complete lines of text to "stdout" or "stderr".
Writer = Callable[[str, str], None]


class TokenBucket:
    """A burst of ``burst`` units, then ``rate`` units a second: pure logic, clock given."""

    __slots__ = ("_at", "_tokens", "burst", "rate")

    def __init__(self, burst: int, rate: float) -> None:
        self.burst = burst
        self.rate = rate
        self._tokens = float(burst)
        self._at: float | None = None

    def take(self, now: float) -> bool:
        """Take one unit at time ``now`` (seconds, any monotonic clock); False when none is
        left."""
        if self._at is not None and now > self._at:
            self._tokens = min(float(self.burst), self._tokens + (now - self._at) * self.rate)
        self._at = now if self._at is None else max(now, self._at)
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


_routes: dict[str, Callable[[dict[str, Any]], None]] = {}


def deliver(message: Any) -> None:
    """Hand a slot's output event to the map it belongs to (called on Dask's event loop).

    Events of a map that has finished (or of another client's) are dropped.
    """
    if isinstance(message, dict):
        receive = _routes.get(str(message.get("tag")))
        if receive is not None:
            receive(message)


def print_lines(text: str, stream: str) -> None:
    """The default writer: this process's stdout or stderr, looked up at each call (so a
    notebook's cell or pytest's capture gets it)."""
    out = sys.stderr if stream == "stderr" else sys.stdout
    out.write(text)
    out.flush()


class TaskOutput:
    """One map's output: lines arrive from the event loop (:meth:`receive`), which keeps
    those within :data:`MAP_LIMIT` (so what waits is bounded however slowly the map's
    consumer pulls), and are shown from the map's thread (:meth:`show`) as
    ``[item 12 node-1] text``; stderr lines on stderr.

    ``tag`` goes into every batch of the map (``Batch.output``). Call :meth:`open` before
    the first batch is sent and :meth:`close` when the map ends: it shows what is left and,
    if lines were held back, the summary.
    """

    def __init__(self, limit: tuple[int, float] = MAP_LIMIT) -> None:
        self.tag = uuid.uuid4().hex
        self.limit = limit
        self._bucket = TokenBucket(*limit)
        self._inbox: deque[list[tuple[str, str]]] = deque()
        self._write: Writer = print_lines
        #: Lines shown; lines held back here (map limit) and on the slots (slot limit).
        self.shown = 0
        self.dropped_here = 0
        self.dropped_on_slots = 0
        #: Lines held back, by slot (its worker name): whose log has them.
        self.dropped_by_slot: dict[str, int] = {}
        self._noticed = False

    def open(self, write: Writer | None = None) -> None:
        """Start taking this map's events; show lines with ``write`` (default: print)."""
        self._write = write or print_lines
        _routes[self.tag] = self.receive

    def receive(self, message: dict[str, Any], now: float | None = None) -> None:
        """An event from a slot (on Dask's event loop): count its lines, and keep those the
        limit lets through, formatted, for :meth:`show`."""
        now = time.monotonic() if now is None else now
        worker = str(message.get("slot") or "?")
        where = node_of(worker) or worker
        held = int(message.get("dropped") or 0)
        if held:
            self.dropped_on_slots += held
            self.dropped_by_slot[worker] = self.dropped_by_slot.get(worker, 0) + held
        kept: list[tuple[str, str]] = []
        for index, stream, text in message.get("lines") or ():
            if self._bucket.take(now):
                kept.append(("stderr" if stream else "stdout", f"[item {index} {where}] {text}\n"))
            else:
                self.dropped_here += 1
                self.dropped_by_slot[worker] = self.dropped_by_slot.get(worker, 0) + 1
        if kept or held:
            self._inbox.append(kept)

    @property
    def waiting(self) -> bool:
        return bool(self._inbox)

    def show(self) -> None:
        """Show the lines that arrived (from the map's thread)."""
        if not self._inbox:
            return
        out: list[tuple[str, str]] = []
        while self._inbox:
            out.extend(self._inbox.popleft())
        self.shown += len(out)
        if (self.dropped_here or self.dropped_on_slots) and not self._noticed:
            self._noticed = True
            out.append(("stderr", self._notice()))
        self._emit(out)

    def close(self) -> None:
        """Stop taking events, show what is left, and sum up what was held back.

        A map's last lines arrive before its last result (a slot sends them first, on the
        same connection), so nothing of a finished map comes after this.
        """
        _routes.pop(self.tag, None)
        self.show()
        if self.dropped_here or self.dropped_on_slots:
            self._emit([("stderr", self.summary())])

    def _notice(self) -> str:
        burst, rate = self.limit
        return (
            f"[cloudmap] output is rate-limited: at most {burst} lines, then {rate:g} a "
            "second per map (and per slot); the rest is counted and stays in the slots' "
            "logs (a summary follows when the map ends)\n"
        )

    def summary(self) -> str:
        """One line: how many lines were not shown, and where all of them are."""
        held = self.dropped_here + self.dropped_on_slots
        counts = dict(self.dropped_by_slot)
        slots = sorted(counts, key=lambda worker: -counts[worker])
        logs = [log_location(worker) for worker in slots[:2]]
        more = f" and {len(slots) - 2} more slots' logs" if len(slots) > 2 else ""
        burst, rate = self.limit
        return (
            f"[cloudmap] {held:,} lines of output were not shown (limit: {burst} lines, then "
            f"{rate:g} a second per map and per slot); every line is in the slots' logs: "
            f"{', '.join(logs)}{more}\n"
        )

    def _emit(self, out: list[tuple[str, str]]) -> None:
        """Write runs of lines of the same stream together (one write per run)."""
        run: list[str] = []
        stream = ""
        for line_stream, text in out:
            if run and line_stream != stream:
                self._write("".join(run), stream)
                run = []
            stream = line_stream
            run.append(text)
        if run:
            self._write("".join(run), stream)


def log_location(worker: str) -> str:
    """How to read a slot's log, e.g. ``pool.node('node-1').read_file('slots/slot-0.log')``."""
    node, sep, slot = worker.rpartition("/slot-")
    if not sep:
        return f"the log of slot {worker}"
    return f"pool.node({node!r}).read_file('slots/slot-{slot}.log')"
