"""The batching rule, with plain numbers."""

from __future__ import annotations

import pytest

from cloudmap.batching import FIRST_BUDGET, FIRST_ITEMS, MAX_ITEMS, BatchSizer


def sized(observations: list[tuple[int, float]], **options: object) -> BatchSizer:
    sizer = BatchSizer(**options)  # type: ignore[arg-type]
    for items, seconds in observations:
        sizer.observe(items, seconds)
    return sizer


@pytest.mark.parametrize(
    ("observations", "slots", "remaining", "expected"),
    [
        # Nothing timed yet: a first batch of up to FIRST_ITEMS under a budget (the slot
        # stops starting items after FIRST_BUDGET), at most 1/32 of a slot's share...
        ([], 2, 10_000_000, FIRST_ITEMS),
        ([], 2, 1_000_000, 15_625),
        ([], 2, 64, 1),
        # ...and one item from an iterator, which is read lazily.
        ([], 4, None, 1),
        # 1 ms items: a 0.5 s task would hold 500 items, but one timing allows 32 at most...
        ([(1, 0.001)], 2, 1_000_000, 32),
        # ...and once 32 are timed, the full 500.
        ([(1, 0.001), (32, 0.032)], 2, 1_000_000, 500),
        # Growth is capped relative to the largest batch timed: x32 per step.
        ([(1, 1e-7)], 2, 10**9, 32),
        ([(1, 1e-7), (32, 32e-7)], 2, 10**9, 1024),
        ([(1, 1e-7), (32, 32e-7), (1024, 1024e-7)], 2, 10**9, 32_768),
        ([(1, 1e-7), (32, 32e-7), (32_768, 32_768e-7)], 2, 10**9, MAX_ITEMS),
        # Slow items: one per task.
        ([(1, 2.0)], 8, 1000, 1),
        # Guided tail: at most remaining / (2 * slots)...
        ([(1, 0.001), (200, 0.2)], 2, 400, 100),
        # ...but never below an eighth of the target (62,500 items of 1 us here).
        ([(1, 1e-6), (256, 256e-6), (1000, 1e-3)], 2, 5000, 5000),
        ([(100_000, 0.1)], 2, 200_000, 62_500),
        # Never more than what is left.
        ([(1, 1e-6)], 2, 3, 3),
    ],
)
def test_next_size(
    observations: list[tuple[int, float]], slots: int, remaining: int | None, expected: int
) -> None:
    assert sized(observations).next_size(slots=slots, remaining=remaining) == expected


def test_fixed_batch_size_overrides_timings_but_not_the_end_of_input() -> None:
    sizer = sized([(1, 1e-6)], fixed=7)
    assert sizer.next_size(slots=2, remaining=100) == 7
    assert sizer.next_size(slots=2, remaining=3) == 3


def test_estimate_follows_a_change_in_item_time() -> None:
    sizer = sized([(1, 0.001), (250, 0.25)])
    for _ in range(10):
        sizer.observe(250, 2.5)  # items became ten times slower
    assert sizer.next_size(slots=2, remaining=None) < 80  # 0.5 s of 10 ms items is 50


def test_empty_observation_is_ignored() -> None:
    sizer = sized([(0, 1.0)])
    assert sizer.seconds_per_item is None


@pytest.mark.parametrize(
    ("observations", "fixed", "ramping"),
    [
        ([], None, True),  # nothing timed yet
        ([(1, 1e-7)], None, True),  # tiny items: 32 allowed, far from the 250,000 wanted
        ([(1, 1e-7), (32_768, 32_768e-7)], None, False),  # the cap no longer binds
        ([(1, 0.05)], None, False),  # 50 ms items: 10 per batch, within 32x of 1
        ([], 7, False),  # a fixed size never ramps
    ],
)
def test_ramping(observations: list[tuple[int, float]], fixed: int | None, ramping: bool) -> None:
    assert sized(observations, fixed=fixed).ramping is ramping


# -- batching on pools large enough for the scheduler to set the pace -----------------------


def test_a_small_pool_keeps_half_second_tasks():
    sizer = sized([(1, 0.001), (32, 0.032)])
    sizer.scale(slots=16, task_rate=500.0)
    assert sizer.task_seconds == 0.5
    assert sizer.next_size(slots=16, remaining=10**6) == 500


def test_on_a_large_pool_tasks_last_as_long_as_the_scheduler_needs_to_feed_every_slot():
    # 16,000 slots, a scheduler taking 500 tasks a second: one task per slot every 32 s.
    sizer = sized([(1, 0.001), (32, 0.032), (1024, 1.024)])
    sizer.scale(slots=16_000, task_rate=500.0)
    assert sizer.task_seconds == 32.0
    assert sizer.next_size(slots=16_000, remaining=None) == 32_000


def test_too_little_work_for_the_pool_is_cut_into_fewer_longer_tasks_than_guided():
    # 10^7 items of 1 ms on 16,000 slots at 500 tasks/s: guided self-scheduling would cut
    # tasks of 312 items (32,000 tasks, a minute to hand out); the dispatch-bound size
    # sqrt(remaining / (rate * per_item)) = 4,472 items balances handing out and running.
    sizer = sized([(1, 0.001), (32, 0.032), (1024, 1.024)])
    sizer.scale(slots=16_000, task_rate=500.0)
    assert sizer.next_size(slots=16_000, remaining=10**7) == 4472
    # The same map on 16 slots is not dispatch-bound: half-second tasks.
    sizer.scale(slots=16, task_rate=500.0)
    assert sizer.next_size(slots=16, remaining=10**7) == 500


def test_only_a_batch_whose_size_is_a_guess_runs_under_a_budget() -> None:
    assert sized([]).budget == FIRST_BUDGET
    assert sized([(1, 0.05)]).budget is None
    assert sized([], fixed=7).budget is None
