"""Waiting and repeating: :func:`poll_until` for waits with a deadline, :class:`Periodic` for
background threads.

Every wait in cloudmap has a deadline (nothing hangs forever), and every background thread
(the scaler, the pool widget's refresh, the local provider's simulated evictions) must stop
when asked and survive a failed round; these two helpers are the one place that gets both
right. Free of heavy imports: the node agent uses them too.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")


def poll_until(
    check: Callable[[], T],
    timeout: float | None,
    *,
    interval: float = 0.05,
    on_timeout: Callable[[T], BaseException] | None = None,
) -> T:
    """Call ``check()`` every ``interval`` seconds until it returns something true; return it.

    After ``timeout`` seconds (None: no limit) the last value is returned, falsy, or, with
    ``on_timeout``, the exception ``on_timeout(last value)`` is raised. ``check`` may raise
    to give up early (a failure that waiting longer cannot cure).
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if deadline is not None and time.monotonic() > deadline:
            if on_timeout is not None:
                raise on_timeout(value)
            return value
        time.sleep(interval)


class Periodic:
    """A daemon thread that calls ``tick()`` every ``interval`` seconds until :meth:`stop`.

    ``interval`` may be a function, read before each wait (the scaler's changes with its
    policy). :meth:`wake` runs the next round at once. ``tick`` returning False ends the
    thread; an exception of a type in ``stop_on`` ends it quietly; any other exception is
    logged and, with ``keep_going``, the next round comes as usual (a display gives up,
    the scaler carries on). The first round comes after the first wait, or at once with
    :meth:`run_once` before :meth:`start`.
    """

    def __init__(
        self,
        tick: Callable[[], bool | None],
        interval: float | Callable[[], float],
        name: str,
        *,
        keep_going: bool = False,
        stop_on: tuple[type[BaseException], ...] = (),
    ) -> None:
        self._tick = tick
        self._interval = interval
        self._keep_going = keep_going
        self._stop_on = stop_on
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    @property
    def interval(self) -> float:
        return self._interval() if callable(self._interval) else self._interval

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    @property
    def stopping(self) -> bool:
        """True once :meth:`stop` was called (a long round may check it to end early)."""
        return self._stop.is_set()

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        """Run the next round now rather than at the end of the interval."""
        self._wake.set()

    def stop(self, timeout: float = 5.0) -> None:
        """End the thread and wait for it (not from the thread itself), so that it never
        acts on what is being closed."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=timeout)

    def run_once(self) -> bool:
        """One round, in the caller's thread, with the loop's rules for failures; False if
        the loop should end (a caller may take the first round before :meth:`start`, so
        that it has happened once the call returns)."""
        try:
            return self._tick() is not False
        except self._stop_on:
            return False
        except Exception:
            if self._stop.is_set():
                return False
            name = self._thread.name
            if not self._keep_going:  # a display must never take the kernel down
                logger.exception("cloudmap: %s failed and stopped", name)
                return False
            logger.exception("cloudmap: %s failed once; continuing", name)
            return True

    def _run(self) -> None:
        self._pause()
        while not self._stop.is_set() and self.run_once():
            self._pause()

    def _pause(self) -> None:
        self._wake.wait(self.interval)
        self._wake.clear()
