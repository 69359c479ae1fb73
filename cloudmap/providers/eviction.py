"""Simulated spot evictions for the local provider: a random process that preempts spot nodes.

Real spot capacity is taken back by the cloud when it needs it; testing that a workload
survives it needs evictions on demand (``pool.provider.preempt``) and at random, which is
what this is. Each running spot node is evicted at ``rate_per_node_hour`` on average
(a Poisson process), optionally with a notice.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import InputError
from ..loops import Periodic

#: How often the eviction process draws, in seconds.
TICK = 0.1


@dataclass(frozen=True)
class Eviction:
    """Random evictions of spot nodes, for testing: ``Pool(spot_nodes=4, eviction=...)``.

    Parameters
    ----------
    rate_per_node_hour : float
        Mean evictions per spot node per hour (3600 = one per node per second on average).
    notice : float
        Seconds of warning before each eviction: the node takes no new task meanwhile, and
        what still runs when the notice ends is killed and requeued. 0 evicts at once.
    seed : int, optional
        Makes the sequence of evictions repeatable.
    """

    rate_per_node_hour: float
    notice: float = 0.0
    seed: int | None = None

    def __post_init__(self) -> None:
        rate = self.rate_per_node_hour
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not rate >= 0:
            raise InputError(
                f"rate_per_node_hour={rate!r} is not valid: pass a number of evictions >= 0"
            )
        notice = self.notice
        if isinstance(notice, bool) or not isinstance(notice, (int, float)) or not notice >= 0:
            raise InputError(f"notice={notice!r} is not valid: pass a number of seconds >= 0")

    def probability(self, seconds: float) -> float:
        """Chance that one node is evicted within ``seconds``."""
        return 1.0 - math.exp(-self.rate_per_node_hour * seconds / 3600.0)


class EvictionProcess:
    """A thread that, every TICK, evicts each spot node with the policy's probability."""

    def __init__(
        self,
        policy: Eviction,
        candidates: Callable[[], list[str]],
        evict: Callable[[str, float], None],
    ) -> None:
        self.policy = policy
        self._candidates = candidates
        self._evict = evict
        self._random = random.Random(policy.seed)
        self._chance = policy.probability(TICK)
        self._loop = Periodic(self._round, TICK, "cloudmap-eviction")

    def start(self) -> None:
        self._loop.start()

    def stop(self) -> None:
        self._loop.stop()

    def _round(self) -> None:
        for node_id in self._candidates():
            if self._random.random() < self._chance and not self._loop.stopping:
                # InputError: the node left or was preempted in the meantime.
                with contextlib.suppress(InputError):
                    self._evict(node_id, self.policy.notice)
