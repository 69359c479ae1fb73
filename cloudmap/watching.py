"""Progress of submitted futures: ``pool.progress(futures)``.

A map reports its own progress; futures from ``submit`` (or ``executor.submit``) finish
one by one with nobody reporting. A watcher thread counts them every
:data:`WATCH_INTERVAL` seconds and feeds any progress reporter, so the same widget (or
tqdm bar) shows them.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Iterable

from .progress import ProgressCounts, ProgressReporter

WATCH_INTERVAL = 0.2


class FuturesWatch:
    """Counts a fixed set of futures until all are done, reporting to ``reporter``."""

    def __init__(
        self,
        futures: Iterable[concurrent.futures.Future],
        reporter: ProgressReporter,
        description: str = "futures",
    ) -> None:
        self.futures = list(futures)
        self._reporter = reporter
        self._seen_failed: set[int] = set()
        self.counts = ProgressCounts(total=len(self.futures))
        reporter.start(self.counts, description)
        self._thread = threading.Thread(target=self._run, name="cloudmap-watch", daemon=True)
        self._finished = threading.Event()
        self._thread.start()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every future is done (and the display shows it); True if they are."""
        return self._finished.wait(timeout)

    def _run(self) -> None:
        try:
            while not self._count():
                self._reporter.update(self.counts)
                concurrent.futures.wait(
                    self.futures, timeout=WATCH_INTERVAL, return_when="FIRST_COMPLETED"
                )
        finally:
            self._reporter.close(self.counts)
            self._finished.set()

    def _count(self) -> bool:
        """Recount the futures into ``counts``; True once all are done."""
        done = failed = running = requeued = 0
        for position, future in enumerate(self.futures):
            requeued += getattr(future, "preemptions", 0)
            if not future.done():
                running += future.running()
                continue
            error = None if future.cancelled() else future.exception()
            if future.cancelled() or error is not None:
                failed += 1
                if isinstance(error, Exception) and position not in self._seen_failed:
                    self._seen_failed.add(position)
                    self.counts.add_failure(error)
            else:
                done += 1
        self.counts.done, self.counts.failed = done, failed
        self.counts.running = running
        self.counts.in_flight = len(self.futures) - done - failed
        self.counts.requeued = requeued
        return done + failed == len(self.futures)
