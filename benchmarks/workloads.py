"""Functions the benchmark runs on workers, in an importable module of their own.

Process-based peers (multiprocessing, ProcessPoolExecutor, loky, Dask) pickle functions by
reference, so they must live in a module the worker processes can import, not in the
``__main__`` script that drives the benchmark.
"""

from __future__ import annotations

import pickle
import time
from collections.abc import Callable
from typing import Any

import numpy as np

#: Samples drawn per numpy call: enough to amortise numpy's per-call overhead, and few
#: enough that every array stays under glibc's 128 KiB mmap threshold. Larger arrays are
#: mmap'd and page-faulted afresh on every call wherever ``MALLOC_TRIM_THRESHOLD_`` is set,
#: as Dask's nanny sets it for its workers: that made the same task ~3.5x slower there,
#: which would measure malloc settings instead of scheduling.
BLOCK = 4096


def monte_carlo_pi(seed: int, samples: int) -> float:
    """Estimate pi from ``samples`` random points in the unit square (one CPU-bound task)."""
    rng = np.random.default_rng(seed)
    inside = 0
    for start in range(0, samples, BLOCK):
        points = rng.random((2, min(BLOCK, samples - start)))
        inside += int(np.count_nonzero(points[0] ** 2 + points[1] ** 2 <= 1.0))
    return 4.0 * inside / samples


def calibrate_samples(target_seconds: float, start: int = 100_000) -> int:
    """The sample count for which one ``monte_carlo_pi`` call takes ``target_seconds`` here."""
    samples = start
    for _ in range(8):
        elapsed = min(_time_call(monte_carlo_pi, 0, samples) for _ in range(3))
        if abs(elapsed - target_seconds) < 0.05 * target_seconds:
            break
        samples = max(1, round(samples * target_seconds / elapsed))
    return samples


def _time_call(fn: Callable[..., Any], *args: Any) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def map_blob(fn: Callable[[Any], Any], blob: bytes) -> bytes:
    """Apply ``fn`` to each item of a pickled list; return the pickled list of results.

    One task per batch, and both ways a single ``bytes`` object, so that Dask neither
    walks the items looking for keys nor serialises them one by one.
    """
    items = pickle.loads(blob)
    return pickle.dumps([fn(item) for item in items], protocol=pickle.HIGHEST_PROTOCOL)
