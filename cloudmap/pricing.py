"""What a pool costs: node prices, the hourly rate of a pool, and the spend so far.

Providers that know their prices (Azure Batch's VM sizes) return :class:`NodePrices`; the
pool widget shows the rate and the spend. Pure arithmetic on the scaling history, so it is
tested with plain numbers.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import InputError
from .samples import ScalingSample


@dataclass(frozen=True)
class NodePrices:
    """The price of one node for one hour, dedicated and spot, in ``currency``;
    ``overhead``, what the pool costs per hour beyond its nodes (an Azure pool whose
    scheduler runs on a VM of its own adds that VM: the provider sets it)."""

    dedicated: float
    spot: float
    currency: str = "USD"
    overhead: float = 0.0

    def __post_init__(self) -> None:
        for name in ("dedicated", "spot", "overhead"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or value < 0
            ):
                raise InputError(f"NodePrices({name}={value!r}) is not valid: pass a price >= 0")

    def per_hour(self, dedicated: int, spot: int) -> float:
        """What ``dedicated`` plus ``spot`` nodes cost for an hour, with the overhead."""
        return dedicated * self.dedicated + spot * self.spot + self.overhead


def spend(history: Sequence[ScalingSample], prices: NodePrices) -> float:
    """Money spent over the history: each sample's nodes, billed until the next sample.

    The last sample is not billed forward (its duration is not known yet). Preempted and
    failed nodes are in the samples' counts, as in Batch's; that overstates the spend a
    little for preempted spot nodes, which Batch does not bill.
    """
    total = 0.0
    for sample, following in itertools.pairwise(history):
        hours = (following.time - sample.time).total_seconds() / 3600
        total += prices.per_hour(sample.dedicated, sample.spot) * max(0.0, hours)
    return total
