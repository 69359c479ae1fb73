"""How busy the machine was during a measurement, and how much memory it took: shared by
every benchmark script.

Numbers are only comparable on an otherwise idle machine, so each script reports the share
of the CPUs that processes other than itself and its descendants (workers, nodes, ranks,
Azurite) used while it measured.
"""

from __future__ import annotations

import ctypes
import gc
import threading
import time
from contextlib import suppress

import psutil

MB = 1024 * 1024
#: How often the process's memory is sampled during a measurement.
RSS_INTERVAL = 0.003

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


class PeakRss:
    """The increase of this process's RSS high-water mark over a block, sampled in a thread.

    Before the baseline, garbage is collected and free heap memory returned to the system,
    so that memory left over by an earlier peer neither hides nor inflates the next peak.
    """

    def __init__(self, interval: float = RSS_INTERVAL) -> None:
        self._process = psutil.Process()
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="peak-rss", daemon=True)
        self.baseline = 0
        self.peak = 0

    def __enter__(self) -> PeakRss:
        gc.collect()
        _release_free_memory()
        self.baseline = self.peak = self._process.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self._record()

    @property
    def increase_mb(self) -> float:
        return (self.peak - self.baseline) / MB

    def _sample(self) -> None:
        while not self._stop.wait(self._interval):
            self._record()

    def _record(self) -> None:
        self.peak = max(self.peak, self._process.memory_info().rss)


def _release_free_memory() -> None:
    """Give free malloc memory back to the system (glibc only; elsewhere a no-op)."""
    with suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
