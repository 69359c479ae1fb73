"""poll_until and Periodic (cloudmap.loops): deadlines, early stops, wake-ups, failures."""

from __future__ import annotations

import itertools
import logging
import time

import pytest

from cloudmap.loops import Periodic, poll_until


def test_poll_until_returns_the_first_true_value() -> None:
    counter = itertools.count()
    assert poll_until(lambda: next(counter) >= 3 and "done", 5, interval=0.001) == "done"


def test_poll_until_returns_the_last_value_or_raises_at_its_deadline() -> None:
    assert poll_until(lambda: 0, 0.05, interval=0.01) == 0
    with pytest.raises(TimeoutError, match="still 0"):
        poll_until(lambda: 0, 0.05, interval=0.01, on_timeout=lambda v: TimeoutError(f"still {v}"))


def test_poll_until_lets_the_check_give_up_early() -> None:
    def check() -> bool:
        raise LookupError("cannot get better")

    with pytest.raises(LookupError):
        poll_until(check, None)


def test_periodic_ticks_until_stopped_and_wakes_on_demand() -> None:
    ticks: list[float] = []
    loop = Periodic(lambda: ticks.append(time.monotonic()) or None, 60.0, "test-periodic")
    loop.start()
    loop.wake()
    assert poll_until(lambda: len(ticks) == 1, 5, interval=0.01)
    loop.wake()
    assert poll_until(lambda: len(ticks) == 2, 5, interval=0.01)
    loop.stop()
    assert not loop.running and loop.stopping


def test_periodic_stops_when_its_tick_says_so_or_raises_a_stop_error() -> None:
    finished = Periodic(lambda: False, 0.001, "test-periodic")
    finished.start()
    assert poll_until(lambda: not finished.running, 5, interval=0.01)

    def closed() -> None:
        raise KeyError("closed")

    stopped = Periodic(closed, 0.001, "test-periodic", stop_on=(KeyError,))
    assert stopped.run_once() is False  # the caller's own first round says: stop
    stopped.start()
    assert poll_until(lambda: not stopped.running, 5, interval=0.01)


def test_a_failing_round_is_logged_and_ends_the_loop_unless_told_to_keep_going(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rounds: list[int] = []

    def flaky() -> None:
        rounds.append(len(rounds))
        if len(rounds) == 1:
            raise RuntimeError("once")

    with caplog.at_level(logging.ERROR, logger="cloudmap.loops"):
        keeps = Periodic(flaky, 0.001, "test-keeps", keep_going=True)
        keeps.start()
        assert poll_until(lambda: len(rounds) > 5, 5, interval=0.01)
        assert keeps.running
        keeps.stop()
        gives_up = Periodic(lambda: 1 / 0, 0.001, "test-gives-up")
        gives_up.start()
        assert poll_until(lambda: not gives_up.running, 5, interval=0.01)
    messages = [r.getMessage() for r in caplog.records]
    assert "cloudmap: test-keeps failed once; continuing" in messages
    assert "cloudmap: test-gives-up failed and stopped" in messages
