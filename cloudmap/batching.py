"""The batching rule: how many items to put in the next task, learned from timings.

Pure logic with plain numbers, no I/O, so it is unit-tested directly. Tiny items are
grouped until a task takes about ``target_seconds`` on a slot, or longer on a pool so large
that its scheduler could not take one such task per slot that often (:meth:`BatchSizer.scale`
with the rate of :mod:`cloudmap.budget`); near the end of a known input, batches shrink
(guided self-scheduling) so that every slot stays busy to the last.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

#: A task should take about this long on a slot: long enough to hide Dask's per-task cost
#: (a few milliseconds), short enough to balance load and report progress smoothly.
TARGET_SECONDS = 0.5
#: Upper bound on items per task, so one task's payload stays small in memory.
MAX_ITEMS = 250_000
#: A batch may be at most this many times the largest batch already timed: a function
#: whose first items happened to be quick is never handed a huge batch on that evidence.
GROWTH = 32
#: Weight kept by past timings at each new one (see BatchSizer.observe).
DECAY = 0.7
#: The first batch of a map over an input of known length (a list, a range: items already
#: in memory), before any timing, holds up to this many items, and no more than 1/GROWTH of
#: a slot's share of the input; it runs under a budget of FIRST_BUDGET seconds: the slot
#: starts no item past it and the engine sends the rest again. Tiny items are then timed on
#: thousands at once, and slow items cost no more than the budget (at least one item runs).
#: An iterator's first batch is one item (it is read lazily), as is a short map's.
FIRST_ITEMS = 32_768
FIRST_BUDGET = 0.05
#: The first batch is also cut to about this many bytes of pickled items (from the first).
FIRST_BYTES = 1 << 20
#: Near the end, batches shrink for balance, but never below this fraction of the target:
#: for tiny items, many tiny tail tasks would cost more than the imbalance they avoid.
TAIL_FRACTION = 0.125


@dataclass
class BatchSizer:
    """Chooses batch sizes from observed per-item compute times.

    >>> sizer = BatchSizer()
    >>> sizer.next_size(slots=2, remaining=1000)
    1
    >>> sizer.observe(items=1, seconds=0.001)
    >>> sizer.next_size(slots=2, remaining=1000)
    32
    """

    target_seconds: float = TARGET_SECONDS
    fixed: int | None = None
    max_items: int = MAX_ITEMS
    growth: int = GROWTH
    tail_fraction: float = TAIL_FRACTION
    first_items: int = FIRST_ITEMS
    _target: float | None = field(default=None, init=False)
    _rate: float | None = field(default=None, init=False)
    _timed_seconds: float = field(default=0.0, init=False)
    _timed_items: float = field(default=0.0, init=False)
    _largest_timed: int = field(default=0, init=False)

    def scale(self, *, slots: int, task_rate: float) -> None:
        """Aim tasks at ``slots / task_rate`` seconds when that is longer than the target:
        with one task per slot every that many seconds, the scheduler gets ``task_rate``
        tasks a second, what it can take (:class:`cloudmap.budget.TaskBudget`).

        >>> sizer = BatchSizer()
        >>> sizer.scale(slots=16, task_rate=500.0)
        >>> sizer.task_seconds
        0.5
        >>> sizer.scale(slots=16_000, task_rate=500.0)
        >>> sizer.task_seconds
        32.0
        """
        self._rate = max(task_rate, 1e-9)
        self._target = max(self.target_seconds, slots / self._rate)

    def _dispatch_size(self, remaining: int, per_item: float) -> int:
        """The batch size below which the scheduler, not the slots, would set the pace.

        ``remaining`` items in tasks of ``s`` take about ``remaining / s / rate`` seconds
        to hand out and ``s * per_item`` seconds to run once out: the sum is smallest at
        ``s = sqrt(remaining / (rate * per_item))``. It matters only on pools too large
        for the work left, where guided self-scheduling would cut more tasks than the
        scheduler can hand out before the slots would be done.
        """
        if self._rate is None:
            return 0
        return int(math.sqrt(remaining / (self._rate * per_item)))

    @property
    def task_seconds(self) -> float:
        """How long a task should take on its slot, as last scaled."""
        return self.target_seconds if self._target is None else self._target

    def observe(self, items: int, seconds: float) -> None:
        """Record that a task of ``items`` items computed in ``seconds`` on its slot.

        The estimate is total time over total items, both decayed per observation: a big
        batch outweighs a small one (whose time is mostly overhead and warm-up), and a
        change in item cost shows within a few tasks.
        """
        if items <= 0:
            return
        self._timed_seconds = self._timed_seconds * DECAY + max(seconds, 0.0)
        self._timed_items = self._timed_items * DECAY + items
        self._largest_timed = max(self._largest_timed, items)

    @property
    def seconds_per_item(self) -> float | None:
        """The current estimate of one item's compute time, or None before any timing."""
        if self._timed_items == 0:
            return None
        return self._timed_seconds / self._timed_items

    @property
    def ramping(self) -> bool:
        """True while batches are still capped by what has been timed, not by the target.

        The engine keeps one task per slot in flight then, so that each bigger batch is
        timed as soon as possible instead of queueing behind smaller ones.
        """
        if self.fixed is not None:
            return False
        per_item = self.seconds_per_item
        if per_item is None:
            return True
        return self._ideal_size(per_item) > max(1, self._largest_timed) * self.growth

    @property
    def budget(self) -> float | None:
        """Seconds the next batch may run before its slot stops starting items: set only
        while nothing has been timed (its size is a guess)."""
        if self.fixed is None and self.seconds_per_item is None:
            return FIRST_BUDGET
        return None

    def _ideal_size(self, per_item: float) -> int:
        return min(int(self.task_seconds / max(per_item, 1e-9)), self.max_items)

    def tasks_for(self, items: int) -> int:
        """How many tasks ``items`` more items make at the size batches are heading for."""
        if items <= 0:
            return 0
        if self.fixed is not None:
            size = self.fixed
        elif (per_item := self.seconds_per_item) is None:
            size = 1
        else:
            size = self._ideal_size(max(per_item, 1e-9))
        return -(-items // max(1, size))

    def next_size(self, *, slots: int, remaining: int | None) -> int:
        """Items for the next task, given the slots in the pool and items left (if known)."""
        if self.fixed is not None:
            size = self.fixed
        elif (per_item := self.seconds_per_item) is None:
            # A known length means items already in memory: a first batch of up to
            # FIRST_ITEMS, under a budget, and at most 1/growth of a slot's share, so a
            # short map's first batch is one item as before. An iterator is read lazily:
            # one item.
            size = 1
            if remaining is not None:
                share = math.ceil(remaining / (self.growth * max(slots, 1)))
                size = min(self.first_items, share)
        else:
            per_item = max(per_item, 1e-9)
            size = min(self._ideal_size(per_item), max(1, self._largest_timed) * self.growth)
            if remaining is not None:
                # Guided self-scheduling: never more than a share of what is left, so the
                # last tasks are small and finish together on all slots.
                share = math.ceil(remaining / (2 * max(slots, 1)))
                floor = int(self.tail_fraction * self.target_seconds / per_item)
                size = min(size, max(share, floor, self._dispatch_size(remaining, per_item)))
        if remaining is not None:
            size = min(size, remaining)
        return max(1, size)
