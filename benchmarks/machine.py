"""How busy the machine was during a measurement: shared by every benchmark script.

Numbers are only comparable on an otherwise idle machine, so each script reports the share
of the CPUs that processes other than itself and its descendants (workers, nodes, ranks,
Azurite) used while it measured.
"""

from __future__ import annotations

import time
from contextlib import suppress

import psutil

#: The kernel counts CPU time in 10 ms ticks per process, so this many CPU-seconds are
#: forgiven: a short window is never called busy on rounding alone.
ACCOUNTING_SLACK = 0.1


class OtherLoad:
    """The share of the machine's CPU time used by other processes since creation.

    "Ours" is this process and its descendants, alive or reaped.
    """

    def __init__(self) -> None:
        self._start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float]:
        system = psutil.cpu_times()
        busy = sum(getattr(system, name, 0.0) for name in
                   ("user", "nice", "system", "irq", "softirq", "steal"))  # fmt: skip
        return time.monotonic(), busy, our_cpu_seconds()

    def share(self) -> float:
        (start, busy_start, ours_start), (end, busy, ours) = self._start, self._sample()
        others = (busy - busy_start) - (ours - ours_start) - ACCOUNTING_SLACK
        return max(0.0, others) / ((end - start) * (psutil.cpu_count() or 1))


def our_cpu_seconds() -> float:
    """CPU seconds of this process and its descendants, with their reaped children."""
    me = psutil.Process()
    total = 0.0
    for process in [me, *me.children(recursive=True)]:
        with suppress(psutil.Error):  # user, system, and those of its reaped children
            total += sum(process.cpu_times()[:4])
    return total
