"""Measure cloudmap from 16 to 16,000 slots on this machine, with simulated slots.

A pool of 1,000 nodes x 16 slots does not fit on two cores, but its scheduler, client and
engine do: ``Pool("simulated", ...)`` (cloudmap.testing.simulated_provider) is a real pool
whose slots speak Dask's worker protocol and run no code, each task "running" for the time
its items declare (cloudmap.testing.simulated_slots). What it measures is what a real pool
of that size would cost the client and the scheduler, and how well the engine keeps the
slots busy; what it cannot measure is the network between real VMs.

For each size, the script starts the pool (slots register as they would join), then runs:

- ``2,000 x 1 ms per slot``: a map of slots x 2,000 items of 1 ms (two seconds of work per
  slot), consumed with ``imap`` so that results are dropped as they come;
- ``10^7 x 1 ms`` (the largest size only): the map of the issue, 0.625 s of work per slot at
  16,000 slots;
- ``60 s per slot`` (the largest size only): items of 100 ms, 600 per slot, long enough for a
  steady state;

and reports per map: wall time against the ideal (work / slots); slot utilisation over the
whole map and in steady state (from the moment the last slot got its first task to the
moment the first slot ran out of work; "none" when that window is empty); tasks per second
at the scheduler; the client's CPU per item (the scheduler runs in the client's process, so
this includes it); time to the first result; time until the last slot got work; the client's
memory before and at its peak. Per size it also reports how long the slots took to join, one
``pool.nodes()`` and one refresh of the pool widget, and the task budget the pool measured.

Run ``python benchmarks/scale.py`` (16, 160 and 1,600 slots, about 5 minutes), ``--quick``
(16 and 160 slots, under a minute), or ``--sizes 16000`` (1,000 nodes: see docs/
performance.md for what that run gives). Progress goes to stderr, the report (Markdown)
to stdout.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from dataclasses import dataclass

import psutil
from machine import MB, PeakRss

import cloudmap
from cloudmap.providers import register_provider
from cloudmap.testing.simulated_provider import SimulatedProvider
from cloudmap.testing.simulated_slots import DeclaredWork

SLOTS_PER_NODE = 16
FULL_SIZES = (16, 160, 1600)
QUICK_SIZES = (16, 160)


@dataclass(frozen=True)
class Workload:
    name: str
    items: int
    seconds_per_item: float


@dataclass
class MapRow:
    slots: int
    workload: Workload
    wall: float
    utilisation: float
    steady: float | None
    tasks: int
    client_cpu_per_item: float
    first_result: float
    last_slot_busy: float | None
    slots_used: int
    rss_before: float
    rss_peak: float

    @property
    def ideal(self) -> float:
        return self.workload.items * self.workload.seconds_per_item / self.slots


@dataclass
class PoolRow:
    slots: int
    join: float
    nodes_call: float
    widget_refresh: float
    task_rate: float
    task_cost: float


def workloads(slots: int, largest: bool) -> list[Workload]:
    chosen = [Workload("2,000 x 1 ms per slot", slots * 2000, 0.001)]
    if largest:
        chosen.append(Workload("10^7 x 1 ms", 10**7, 0.001))
        chosen.append(Workload("60 s per slot", slots * 600, 0.1))
    return chosen


def run_map(pool: cloudmap.Pool, provider: SimulatedProvider, slots: int, work: Workload) -> MapRow:
    provider.reset_activity()
    cpu = time.process_time()
    started = time.time()
    first_result = None
    count = 0
    with PeakRss() as rss:
        for _ in pool.imap(DeclaredWork(work.seconds_per_item), range(work.items), progress=False):
            if first_result is None:
                first_result = time.time() - started
            count += 1
    ended = time.time()
    cpu = time.process_time() - cpu
    assert count == work.items, f"{count} results for {work.items} items"
    activity = provider.activity()
    intervals = activity.intervals
    firsts = [first for first in activity.first_starts if first is not None]
    lasts = [last for last in activity.last_stops if last is not None]
    return MapRow(
        slots=slots,
        workload=work,
        wall=ended - started,
        utilisation=_busy(intervals, started, ended) / (slots * (ended - started)),
        steady=_steady(intervals, firsts, lasts, slots),
        tasks=len(intervals),
        client_cpu_per_item=cpu / work.items,
        first_result=first_result or 0.0,
        last_slot_busy=(max(firsts) - started) if len(firsts) == slots else None,
        slots_used=len(firsts),
        rss_before=rss.baseline / MB,
        rss_peak=rss.peak / MB,
    )


def _busy(intervals: list[tuple[float, float]], start: float, end: float) -> float:
    return sum(max(0.0, min(b, end) - max(a, start)) for a, b in intervals)


def _steady(
    intervals: list[tuple[float, float]], firsts: list[float], lasts: list[float], slots: int
) -> float | None:
    """Utilisation from when the last slot got work to when the first slot ran dry; None
    when some slot got no work or the window is empty."""
    if len(firsts) < slots:
        return None
    window_start, window_end = max(firsts), min(lasts)
    if window_end <= window_start:
        return None
    return _busy(intervals, window_start, window_end) / (slots * (window_end - window_start))


def measure_pool(
    slots: int, largest: bool, slots_per_node: int = SLOTS_PER_NODE
) -> tuple[PoolRow, list[MapRow]]:
    nodes = max(1, slots // slots_per_node)
    started = time.monotonic()
    with cloudmap.Pool("simulated", nodes=nodes, slots_per_node=slots_per_node) as pool:
        provider = pool._provider()
        assert isinstance(provider, SimulatedProvider)
        provider.wait_registered()
        pool.wait_for_nodes(nodes, timeout=900)
        join = time.monotonic() - started
        say(f"{slots} slots joined in {join:.1f} s")
        t = time.perf_counter()
        listed = pool.nodes()
        nodes_call = time.perf_counter() - t
        assert len(listed) == nodes
        widget = pool.widget()
        t = time.perf_counter()
        widget.refresh()
        widget_refresh = time.perf_counter() - t
        widget.close()
        rows = []
        for work in workloads(slots, largest):
            say(f"  {work.name}: {work.items:,} items")
            rows.append(run_map(pool, provider, slots, work))
            say(f"    {rows[-1].wall:.1f} s (ideal {rows[-1].ideal:.2f} s)")
        budget = pool._cluster.budget
        row = PoolRow(slots, join, nodes_call, widget_refresh, budget.rate, budget.task_cost)
    return row, rows


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def report(pools: list[PoolRow], maps: list[MapRow], join_note: str, slots_per_node: int) -> None:
    print(
        f"Machine: {psutil.cpu_count()} cores, {platform.platform()}, Python "
        f"{platform.python_version()}; cloudmap {cloudmap.__version__}; simulated slots, "
        f"{slots_per_node} per node; join times {join_note}.\n"
    )
    print("### Maps\n")
    print(
        "| slots | map | wall s | ideal s | utilisation | steady state | tasks | tasks/s "
        "| client CPU/item | first result s | last slot busy at s | slots used "
        "| client MB before / peak |"
    )
    print("|" + "---|" * 13)
    for r in maps:
        steady = "none" if r.steady is None else f"{r.steady:.0%}"
        last = "-" if r.last_slot_busy is None else f"{r.last_slot_busy:.2f}"
        print(
            f"| {r.slots:,} | {r.workload.name} | {r.wall:.2f} | {r.ideal:.2f} "
            f"| {r.utilisation:.0%} | {steady} | {r.tasks:,} | {r.tasks / r.wall:,.0f} "
            f"| {r.client_cpu_per_item * 1e6:.1f} us | {r.first_result:.2f} | {last} "
            f"| {r.slots_used:,} | {r.rss_before:.0f} / {r.rss_peak:.0f} |"
        )
    print("\n### Pools\n")
    print(
        "| slots | join s | `pool.nodes()` ms | widget refresh ms | task budget /s | task cost us |"
    )
    print("|---|---|---|---|---|---|")
    for p in pools:
        print(
            f"| {p.slots:,} | {p.join:.1f} | {p.nodes_call * 1e3:.1f} "
            f"| {p.widget_refresh * 1e3:.1f} | {p.task_rate:,.0f} | {p.task_cost * 1e6:.0f} |"
        )


def skip_version_check() -> None:
    """Replace Dask's comparison of package versions as each slot joins, in this process.

    The scheduler compares the joining worker's versions with every other worker's, so a
    pool's join is quadratic in its slots: 1,600 slots joined in 7.5 s here, but 16,000
    took over 13 minutes to reach 13,800. Simulated slots all run this environment, so the
    comparison can only agree; skipping it makes the 16,000-slot run feasible, and changes
    nothing after the join. ``--with-version-check`` keeps it.
    """
    import distributed.versions

    distributed.versions.error_message = lambda *args, **kwargs: {"warning": "", "error": ""}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16 and 160 slots only")
    parser.add_argument("--sizes", help="comma-separated slot counts (multiples of 16)")
    parser.add_argument(
        "--slots-per-node",
        type=int,
        default=SLOTS_PER_NODE,
        help="e.g. 1 with --sizes 1000 for 1,000 nodes' pool.nodes() and widget cheaply",
    )
    parser.add_argument(
        "--with-version-check",
        action="store_true",
        help="keep Dask's version comparison as slots join (quadratic; see skip_version_check)",
    )
    args = parser.parse_args()
    if not args.with_version_check:
        skip_version_check()
    sizes = QUICK_SIZES if args.quick else FULL_SIZES
    if args.sizes:
        sizes = tuple(int(s) for s in args.sizes.split(","))
    register_provider("simulated", "cloudmap.testing.simulated_provider:SimulatedProvider")
    pools, maps = [], []
    for slots in sizes:
        largest = slots == max(sizes) and not args.quick
        pool_row, map_rows = measure_pool(slots, largest, args.slots_per_node)
        pools.append(pool_row)
        maps.extend(map_rows)
    checked = "with" if args.with_version_check else "without"
    report(pools, maps, f"{checked} Dask's version check", args.slots_per_node)


if __name__ == "__main__":
    main()
