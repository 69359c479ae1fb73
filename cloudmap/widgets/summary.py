"""What the displays show, computed from plain values: no widgets, no HTML.

:class:`ProgressSnapshot` is one moment of a map (or of watched futures) and
:class:`PoolSnapshot` one moment of a pool. Both are frozen, so a display thread can hand
them to the renderer without locks.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..autoscale import Autoscale
from ..errors import PoolClosedError
from ..nodes import NodeInfo, NodeState
from ..pricing import NodePrices, spend
from ..progress import ProgressCounts
from ..providers.base import Provider
from ..samples import ScalingSample, TaskCounts


class PoolSource(Protocol):
    """What the pool displays read and control: the public face of :class:`cloudmap.Pool`
    (named here so that the displays, which the pool shows, never import it)."""

    provider: Provider | None

    @property
    def closed(self) -> bool: ...

    @property
    def targets(self) -> tuple[int, int]: ...

    @property
    def autoscaling(self) -> Autoscale | None: ...

    def nodes(self) -> list[NodeInfo]: ...

    def scaling_history(self) -> list[ScalingSample]: ...

    def task_counts(self) -> TaskCounts: ...

    def allocation_errors(self) -> list[str]: ...

    def resize(self, nodes: int | None = None, spot_nodes: int | None = None) -> None: ...

    def autoscale(self, policy: Any = True, **settings: Any) -> Autoscale | None: ...

    def widget(self) -> Any: ...


def provider_of(pool: PoolSource) -> Provider:
    """The pool's provider; :class:`~cloudmap.PoolClosedError` once the pool is closed."""
    if pool.closed or pool.provider is None:
        raise PoolClosedError("this pool is closed")
    return pool.provider


#: Rows of the node table, always shown (in this order), so a count's place never moves.
TABLE_STATES = (
    NodeState.CREATING,
    NodeState.STARTING,
    NodeState.IDLE,
    NodeState.RUNNING,
    NodeState.PREEMPTED,
    NodeState.LEAVING,
    NodeState.START_FAILED,
)
#: Shown only when some node is in them.
RARE_STATES = (NodeState.UNUSABLE,)
#: Parts of the progress bar, left to right.
SEGMENTS = ("done", "failed", "running", "queued")


@dataclass(frozen=True)
class ProgressSnapshot:
    """A map's items at one moment, with its speed. ``total`` is None while unknown."""

    description: str
    total: int | None
    done: int
    failed: int
    running: int
    queued: int
    retried: int
    requeued: int
    elapsed: float
    rate: float | None
    finished: bool
    failures: tuple[Exception, ...] = ()

    @property
    def percent(self) -> float | None:
        """Share of items finished (done or failed for good), or None if the total is unknown."""
        if self.total is None:
            return None
        if self.total == 0:
            return 100.0
        return 100.0 * (self.done + self.failed) / self.total

    @property
    def eta(self) -> float | None:
        """Seconds left at the recent rate; None while unknown."""
        if self.finished:
            return 0.0
        if self.total is None or not self.rate:
            return None
        return max(0.0, self.total - self.done - self.failed) / self.rate

    def widths(self) -> dict[str, float]:
        """Percent of the bar each segment takes; they add up to 100 (or 0 for no items)."""
        parts = {name: float(getattr(self, name)) for name in SEGMENTS}
        whole = float(self.total) if self.total is not None else sum(parts.values())
        whole = max(whole, sum(parts.values()))
        if whole <= 0:
            return dict.fromkeys(SEGMENTS, 0.0)
        return {name: 100.0 * value / whole for name, value in parts.items()}


def progress_snapshot(
    counts: ProgressCounts,
    description: str,
    *,
    elapsed: float,
    rate: float | None,
    finished: bool,
) -> ProgressSnapshot:
    """Freeze the engine's live counters (which another thread keeps changing)."""
    running = min(counts.running, counts.in_flight) if not finished else 0
    done, failed = counts.done, counts.failed
    if counts.total is None:
        queued = 0 if finished else max(0, counts.in_flight - running)
    else:
        queued = max(0, counts.total - done - failed - running)
    return ProgressSnapshot(
        description=description,
        total=counts.total,
        done=done,
        failed=failed,
        running=running,
        queued=queued,
        retried=counts.retried,
        requeued=counts.requeued,
        elapsed=elapsed,
        rate=rate,
        finished=finished,
        failures=tuple(counts.failures),
    )


class RateMeter:
    """Items finished per second over the last ``window`` seconds.

    A whole-run average hides a slowdown (nodes preempted) and a speed-up (nodes joined);
    a window shows what the pool does now, which is what an ETA needs.
    """

    def __init__(self, window: float = 10.0) -> None:
        self.window = window
        self._samples: deque[tuple[float, int]] = deque()

    def add(self, finished: int, now: float | None = None) -> float | None:
        now = time.monotonic() if now is None else now
        self._samples.append((now, finished))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self.window:
            self._samples.popleft()
        first_time, first_count = self._samples[0]
        if now - first_time < 0.5:  # too short to tell a rate from noise
            return None
        return (finished - first_count) / (now - first_time)


def format_duration(seconds: float | None) -> str:
    """``0:07``, ``12:30``, ``2:03:04``; an em dash when unknown."""
    if seconds is None:
        return "\u2014"
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


@dataclass(frozen=True)
class PoolSnapshot:
    """A pool at one moment: nodes by state and kind, targets, slots, tasks, cost."""

    provider: str
    node_size: str
    #: state -> (dedicated, spot) node counts
    states: dict[str, tuple[int, int]]
    target: tuple[int, int]
    current: tuple[int, int]
    slots_busy: int
    slots_total: int
    tasks: TaskCounts
    autoscale: Autoscale | None
    prices: NodePrices | None
    spent: float | None
    history: Sequence[ScalingSample] = field(default=(), repr=False)
    #: Why the pool is short of its targets, in the provider's words (pool.allocation_errors)
    allocation_errors: tuple[str, ...] = ()

    @property
    def cost_per_hour(self) -> float | None:
        if self.prices is None:
            return None
        return self.prices.per_hour(*self.current)


def node_table(nodes: Sequence[NodeInfo]) -> dict[str, tuple[int, int]]:
    """(dedicated, spot) counts for every state of :data:`TABLE_STATES`, and rare ones seen."""
    table = {str(state): (0, 0) for state in TABLE_STATES}
    for node in nodes:
        dedicated, spot = table.get(str(node.state), (0, 0))
        table[str(node.state)] = (dedicated + 1, spot) if node.dedicated else (dedicated, spot + 1)
    return table


def pool_snapshot(pool: PoolSource) -> PoolSnapshot:
    """Read the pool (raises :class:`~cloudmap.PoolClosedError` once it is closed)."""
    provider = provider_of(pool)
    nodes = pool.nodes()
    history = pool.scaling_history()
    prices = provider.prices()
    present = [n for n in nodes if n.state != NodeState.LEAVING]
    serving = [n for n in nodes if n.state in (NodeState.IDLE, NodeState.RUNNING)]
    return PoolSnapshot(
        provider=provider.name,
        node_size=provider.node_size(),
        states=node_table(nodes),
        target=pool.targets,
        current=(sum(n.dedicated for n in present), sum(n.spot for n in present)),
        slots_busy=sum(min(n.busy_slots, n.slots) for n in serving),
        slots_total=sum(n.slots for n in serving),
        tasks=pool.task_counts(),
        autoscale=pool.autoscaling,
        prices=prices,
        spent=None if prices is None else spend(history, prices),
        history=history,
        allocation_errors=tuple(pool.allocation_errors()),
    )
