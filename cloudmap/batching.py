"""The batching rule: how many items to put in the next task, learned from timings.

Pure logic with plain numbers, no I/O, so it is unit-tested directly. Tiny items are
grouped until a task takes about ``target_seconds`` on a slot; near the end of a known
input, batches shrink (guided self-scheduling) so that every slot stays busy to the last.
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
    _seconds_per_item: float | None = field(default=None, init=False)
    _largest_timed: int = field(default=0, init=False)

    def observe(self, items: int, seconds: float) -> None:
        """Record that a task of ``items`` items computed in ``seconds`` on its slot."""
        if items <= 0:
            return
        per_item = max(seconds, 0.0) / items
        if self._seconds_per_item is None:
            self._seconds_per_item = per_item
        else:  # weight by items so a big batch's timing outweighs a tiny one's noise
            weight = min(0.5, items / (items + self._largest_timed + 1) + 0.1)
            self._seconds_per_item += weight * (per_item - self._seconds_per_item)
        self._largest_timed = max(self._largest_timed, items)

    @property
    def seconds_per_item(self) -> float | None:
        """The current estimate of one item's compute time, or None before any timing."""
        return self._seconds_per_item

    def next_size(self, *, slots: int, remaining: int | None) -> int:
        """Items for the next task, given the slots in the pool and items left (if known)."""
        if self.fixed is not None:
            size = self.fixed
        elif self._seconds_per_item is None:
            size = 1
        else:
            per_item = max(self._seconds_per_item, 1e-9)
            size = int(self.target_seconds / per_item)
            size = min(size, max(1, self._largest_timed) * self.growth, self.max_items)
            if remaining is not None:
                # Guided self-scheduling: never more than a share of what is left, so the
                # last tasks are small and finish together on all slots.
                share = math.ceil(remaining / (2 * max(slots, 1)))
                floor = int(self.tail_fraction * self.target_seconds / per_item)
                size = min(size, max(share, floor))
        if remaining is not None:
            size = min(size, remaining)
        return max(1, size)
