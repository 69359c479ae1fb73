"""The scheduler's task budget and the submit pace, with plain numbers."""

from __future__ import annotations

import pytest

from cloudmap.budget import LOOP_SHARE, MIN_TASK_COST, PRIOR_TASK_COST, SubmitPace, TaskBudget


def test_before_any_sample_the_budget_is_the_priors():
    assert TaskBudget().rate == pytest.approx(LOOP_SHARE / PRIOR_TASK_COST)


def test_busy_samples_teach_the_cost_of_a_task_and_converge():
    budget = TaskBudget()
    cpu = 0.0
    for second in range(12):  # 400 tasks a second, 0.8 s of loop: 2 ms each
        budget.observe(wall=float(second), cpu=cpu, tasks_done=400 * second)
        cpu += 0.8
    assert budget.task_cost == pytest.approx(0.002, rel=0.01)
    assert budget.rate == pytest.approx(LOOP_SHARE / 0.002, rel=0.01)


def test_an_idle_loop_teaches_nothing_about_tasks():
    budget = TaskBudget()
    for second in range(5):  # heartbeats only: busy, but no task
        budget.observe(wall=float(second), cpu=0.3 * second, tasks_done=0)
    assert budget.task_cost == PRIOR_TASK_COST


def test_samples_with_few_tasks_are_merged_until_they_say_something():
    budget = TaskBudget()
    budget.observe(wall=0.0, cpu=0.0, tasks_done=0)
    budget.observe(wall=1.0, cpu=0.01, tasks_done=5)  # 5 tasks: too few to tell
    assert budget.task_cost == PRIOR_TASK_COST
    budget.observe(wall=2.0, cpu=0.04, tasks_done=20)  # 20 tasks in 2 s, 40 ms: 2 ms each
    assert budget.task_cost == pytest.approx((PRIOR_TASK_COST + 0.002) / 2)


def test_a_new_scheduler_restarts_the_counts_without_a_negative_sample():
    budget = TaskBudget()
    budget.observe(wall=0.0, cpu=5.0, tasks_done=1000)
    budget.observe(wall=1.0, cpu=0.1, tasks_done=3)  # counters went back: a new scheduler
    budget.observe(wall=2.0, cpu=0.2, tasks_done=103)
    assert budget.task_cost == pytest.approx((PRIOR_TASK_COST + 0.001) / 2)


def test_a_task_never_counts_as_free():
    budget = TaskBudget()
    budget.observe(wall=0.0, cpu=0.0, tasks_done=0)
    for second in range(1, 20):
        budget.observe(wall=float(second), cpu=0.0, tasks_done=10_000 * second)
    assert budget.task_cost >= MIN_TASK_COST


def test_the_pace_allows_a_burst_then_twice_the_rate():
    pace = SubmitPace()
    burst = sum(pace.take(now=0.0, rate=200.0) for _ in range(1000))
    assert burst == 200  # half a second at twice the rate
    later = sum(pace.take(now=1.0, rate=200.0) for _ in range(1000))
    assert later == 200  # refilled at 400 a second, capped at the burst


def test_the_pace_always_lets_one_task_through_eventually():
    pace = SubmitPace()
    assert pace.take(now=0.0, rate=0.1)  # a full bucket holds at least one
    assert not pace.take(now=0.0, rate=0.1)
    assert pace.take(now=10.0, rate=0.1)
