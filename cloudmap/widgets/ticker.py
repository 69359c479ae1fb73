"""A daemon thread that refreshes a display every interval.

Jupyter runs a cell on the kernel's main thread; a display fed by that thread would freeze
while another cell blocks. Widget updates sent from this thread go out on the kernel's
IOPub channel at once, whatever the main thread is doing.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

logger = logging.getLogger(__name__)


class Ticker:
    """Call ``tick()`` every ``interval`` seconds until it returns False or ``stop()``."""

    def __init__(self, tick: Callable[[], bool], interval: float, name: str) -> None:
        self._tick = tick
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                if not self._tick():
                    return
            except Exception:  # a display must never take the kernel down; say why it stopped
                logger.exception("cloudmap: a live display failed to refresh and stopped")
                return
