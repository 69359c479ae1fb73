"""How many tasks a second the pool's scheduler can take, measured while it works.

Every task costs the scheduler's event loop some CPU (Dask's graph update, the message to
the slot, the finish, the result fetch when the scheduler shares the client's process). A
pool of 16 slots with half-second tasks asks for 32 tasks/s, far below what the loop
manages; 16,000 slots with half-second tasks would ask for 32,000 tasks/s, far above. So the
batching rule (:mod:`cloudmap.batching`) aims tasks at ``slots / rate`` seconds when that
is longer than its half second, and the engine never submits faster than twice ``rate``:
the loop then stays about half busy in steady state, with room for results, heartbeats and
widgets.

``rate`` comes from samples of the loop's CPU time and of the number of tasks that left a
slot (finished, failed or moved), taken once a second with the pool's other counts; a
sample without tasks teaches nothing. Until the first busy sample, the cost is
:data:`PRIOR_TASK_COST`, about what a task costs on a small pool here.

Pure logic on plain numbers, unit-tested directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: Share of the scheduler's event loop that tasks may take in steady state.
LOOP_SHARE = 0.5
#: Loop CPU seconds per task assumed before any is measured.
PRIOR_TASK_COST = 0.001
#: A task never counts as cheaper than this.
MIN_TASK_COST = 50e-6
#: Tasks a sample needs before it says what a task costs; samples with fewer are merged
#: with the next ones.
MIN_TASKS = 20
#: Weight an estimate keeps at each new sample.
DECAY = 0.5
#: The engine may submit in bursts of this many seconds' worth of the rate.
BURST_SECONDS = 0.5


@dataclass
class TaskBudget:
    """The scheduler's task rate budget, from (wall, loop CPU, tasks done) samples.

    All of the loop's busy time while tasks flow is charged to them: the background
    (heartbeats, the pool's own polling) then makes a task look dearer than it is, which
    errs towards fewer, longer tasks, never towards flooding the loop.

    >>> budget = TaskBudget()
    >>> budget.observe(wall=0.0, cpu=0.0, tasks_done=0)
    >>> budget.observe(wall=1.0, cpu=0.25, tasks_done=500)  # 0.5 ms of loop per task ...
    >>> round(budget.task_cost * 1e6)  # ... blended with the prior's 1 ms
    750
    >>> round(budget.rate)  # LOOP_SHARE / 750 us
    667
    """

    task_cost: float = PRIOR_TASK_COST
    _since: tuple[float, float, int] | None = field(default=None, init=False)

    def observe(self, *, wall: float, cpu: float, tasks_done: int) -> None:
        """Take one sample: seconds of wall clock, seconds of loop CPU, tasks done so far
        (all three cumulative, from any origin)."""
        if self._since is None or tasks_done < self._since[2] or cpu < self._since[1]:
            self._since = (wall, cpu, tasks_done)  # the first sample, or a new scheduler
            return
        busy, tasks = cpu - self._since[1], tasks_done - self._since[2]
        if tasks == 0:
            self._since = (wall, cpu, tasks_done)  # idle: nothing to learn about tasks
        elif tasks >= MIN_TASKS:
            self.task_cost = _blend(self.task_cost, max(MIN_TASK_COST, busy / tasks))
            self._since = (wall, cpu, tasks_done)
        # else: too few tasks to tell; keep accumulating

    @property
    def rate(self) -> float:
        """Tasks per second that keep the loop about LOOP_SHARE busy."""
        return LOOP_SHARE / self.task_cost


@dataclass
class SubmitPace:
    """A token bucket: at most twice the budget's rate, in bursts of BURST_SECONDS.

    >>> pace = SubmitPace()
    >>> sum(pace.take(now=0.0, rate=100.0) for _ in range(200))  # a full bucket
    100
    >>> pace.take(now=0.1, rate=100.0)  # 0.1 s later: 20 more tokens
    True
    """

    _tokens: float | None = field(default=None, init=False)
    _at: float = field(default=0.0, init=False)

    def take(self, *, now: float, rate: float) -> bool:
        """Whether one more task may be submitted now (and count it if so)."""
        depth = max(1.0, 2 * rate * BURST_SECONDS)
        if self._tokens is None:
            self._tokens = depth
        else:
            self._tokens = min(depth, self._tokens + 2 * rate * max(0.0, now - self._at))
        self._at = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True


def _blend(old: float, new: float) -> float:
    return old * DECAY + new * (1 - DECAY)
