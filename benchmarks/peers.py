"""Compare cloudmap with its peers on this machine, and check cloudmap's performance targets.

cloudmap promises that batching items into Dask tasks makes it about as fast as a local
process pool for tiny items, far faster than Dask's one task per item, fully efficient for
CPU-bound tasks, and no slower to start than a Dask LocalCluster. This script measures those
claims against the tools a Jupyter user would otherwise reach for, with the same number of
worker processes (one per core) for every peer:

1. no-op items (``abs`` over ``range(n)``): items/s and the driver's peak memory increase;
2. Monte Carlo numpy tasks of about 50 ms: wall time and parallel efficiency;
3. start to first result: fresh pool or cluster to the result of one trivial call.

This machine's CPU speed drifts (the same task takes 28 or 50 ms, in phases of seconds to
tens of seconds), so peers are measured in rounds, each peer once per workload per round,
and every Monte Carlo run is compared with a serial baseline timed just before it. Medians
over rounds are reported, with the spread of the baselines to show the drift.

Run ``python benchmarks/peers.py`` (``--quick`` for a smoke run, ``--json PATH`` to save the
raw numbers). It prints one Markdown table per workload, ratios to cloudmap, and the targets.
Progress goes to stderr, so stdout is the report alone.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import multiprocessing
import os
import pickle
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import dask
import distributed
import joblib
import numpy as np
from distributed import Client, LocalCluster
from joblib.externals.loky import get_reusable_executor
from machine import OtherLoad, PeakRss
from workloads import calibrate_samples, map_blob, monte_carlo_pi

import cloudmap

Fn = Callable[[Any], Any]

#: The start method of the multiprocessing and ProcessPoolExecutor peers: the platform's.
MP_CONTEXT = multiprocessing.get_context()
MB = 1024 * 1024
#: A run during which other processes used more than this share of the CPUs is disturbed:
#: it is measured again, at most ``Config.retries`` times per run.
DISTURBED = 0.05


# -- measuring ---------------------------------------------------------------------------


class Timed(NamedTuple):
    value: Any
    seconds: float
    peak_mb: float
    other_load: float  # share of the CPUs that other processes used meanwhile


def measure(action: Callable[[], Any]) -> Timed:
    """Run ``action`` once: its value, wall seconds and driver peak memory increase (MB).

    The one timing helper every peer and workload goes through.
    """
    with PeakRss() as rss:
        other_load = OtherLoad()
        start = time.perf_counter()
        value = action()
        seconds = time.perf_counter() - start
        load = other_load.share()
    return Timed(value, seconds, rss.increase_mb, load)


# -- peers -------------------------------------------------------------------------------


class Session(NamedTuple):
    """What the workloads need from a started peer."""

    ready: Callable[[], None]  # block until every worker is up
    map: Callable[[Fn, Sequence[Any]], list[Any]]  # results in input order
    first: Callable[[Fn, Any], Any]  # one call, one result


@dataclass(frozen=True)
class Peer:
    """A tool to compare: ``open(workers)`` starts it and yields a :class:`Session`."""

    name: str
    open: Callable[[int], AbstractContextManager[Session]]
    per_item_tasks: bool = False  # one scheduler task per item: no-op runs on fewer items
    startup: bool = True  # has its own start-to-first-result measurement
    monte_carlo: bool = True  # runs the Monte Carlo workload
    list_input: bool = False  # the no-op items as a list made before timing, not a range


def chunksize(items: int, workers: int) -> int:
    """multiprocessing.Pool.map's own default: about four chunks per worker."""
    return max(1, math.ceil(items / (4 * workers)))


def _nothing() -> None:
    return None


@contextmanager
def cloudmap_session(workers: int) -> Iterator[Session]:
    with cloudmap.Pool(nodes=workers, slots_per_node=1) as pool:
        yield Session(
            ready=pool.wait_for_nodes,
            map=lambda fn, items: pool.map(fn, items, progress=False),
            first=lambda fn, arg: pool.submit(fn, arg).result(),
        )


@contextmanager
def multiprocessing_session(workers: int) -> Iterator[Session]:
    with MP_CONTEXT.Pool(workers) as pool:
        yield Session(
            ready=_nothing,
            map=lambda fn, items: pool.map(fn, items, chunksize(len(items), workers)),
            first=lambda fn, arg: pool.apply(fn, (arg,)),
        )


@contextmanager
def executor_session(workers: int) -> Iterator[Session]:
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=MP_CONTEXT) as executor:
        yield Session(
            ready=_nothing,
            map=lambda fn, items: list(
                executor.map(fn, items, chunksize=chunksize(len(items), workers))
            ),
            first=lambda fn, arg: executor.submit(fn, arg).result(),
        )


def _joblib_map(workers: int, fn: Fn, items: Sequence[Any]) -> list[Any]:
    parallel = joblib.Parallel(n_jobs=workers, backend="loky", batch_size="auto")
    return list(parallel(joblib.delayed(fn)(item) for item in items))


@contextmanager
def joblib_session(workers: int) -> Iterator[Session]:
    try:
        yield Session(
            ready=_nothing,
            map=partial(_joblib_map, workers),
            first=lambda fn, arg: _joblib_map(workers, fn, [arg])[0],
        )
    finally:  # loky keeps its workers for the next Parallel call: stop them
        get_reusable_executor(max_workers=workers).shutdown(wait=True)


@contextmanager
def dask_client(workers: int) -> Iterator[Client]:
    with (
        LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


def _dask_per_item_map(client: Client, fn: Fn, items: Sequence[Any]) -> list[Any]:
    return list(client.gather(client.map(fn, items, pure=False)))


def _dask_batched_map(client: Client, workers: int, fn: Fn, items: Sequence[Any]) -> list[Any]:
    size = chunksize(len(items), workers)
    blobs = [
        pickle.dumps(list(items[start : start + size]), protocol=pickle.HIGHEST_PROTOCOL)
        for start in range(0, len(items), size)
    ]
    futures = client.map(partial(map_blob, fn), blobs, pure=False)
    return [value for blob in client.gather(futures) for value in pickle.loads(blob)]


@contextmanager
def dask_session(workers: int, *, batched: bool) -> Iterator[Session]:
    with dask_client(workers) as client:
        yield Session(
            ready=lambda: client.wait_for_workers(workers),
            map=partial(_dask_batched_map, client, workers)
            if batched
            else partial(_dask_per_item_map, client),
            first=lambda fn, arg: client.submit(fn, arg).result(),
        )


CLOUDMAP = "cloudmap"
CLOUDMAP_LIST = "cloudmap, items in a list"
MULTIPROCESSING = "multiprocessing.Pool"
DASK_PER_ITEM = "Dask Client.map, 1 task/item"
DASK_LOCAL_CLUSTER = "Dask LocalCluster"

PEERS = (
    Peer(CLOUDMAP, cloudmap_session),
    # The same map over a list of the same numbers: a range input travels in slices (three
    # numbers a batch), a list's items are pickled; this shows the general case.
    Peer(CLOUDMAP_LIST, cloudmap_session, startup=False, monte_carlo=False, list_input=True),
    Peer(MULTIPROCESSING, multiprocessing_session),
    Peer("ProcessPoolExecutor", executor_session),
    Peer("joblib (loky)", joblib_session),
    Peer(DASK_PER_ITEM, partial(dask_session, batched=False), per_item_tasks=True),
    Peer("Dask, hand-made batches", partial(dask_session, batched=True), startup=False),
)


def startup_name(peer: Peer) -> str:
    """In the start-up table the two Dask peers are one: a LocalCluster and its Client."""
    return DASK_LOCAL_CLUSTER if peer.name == DASK_PER_ITEM else peer.name


# -- workloads ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    workers: int
    noop_items: int
    per_item_noop_items: int  # for peers with one scheduler task per item
    mc_tasks: int
    mc_task_seconds: float
    rounds: int  # every peer is measured once per workload per round; medians over rounds
    retries: int  # a run disturbed by other processes is measured again at most this often
    quick: bool = False

    @classmethod
    def create(cls, *, quick: bool, workers: int) -> Config:
        if quick:
            return cls(workers, 100_000, 1_000, 16, 0.05, rounds=2, retries=1, quick=True)
        return cls(workers, 1_000_000, 5_000, 64, 0.05, rounds=5, retries=1)


@dataclass
class Measured:
    """The runs of one measurement, one per round."""

    items: int  # work items per run
    runs: list[float] = field(default_factory=list)  # wall seconds of each run
    peak_mb: float = 0.0  # the largest driver memory increase of any run
    other_load: float = 0.0  # the largest share of the CPUs other processes used during a run

    def add(self, timed: Timed) -> None:
        """Record one more run: its time, and the worst memory and disturbance so far."""
        self.runs.append(timed.seconds)
        self.peak_mb = max(self.peak_mb, timed.peak_mb)
        self.other_load = max(self.other_load, timed.other_load)

    @property
    def seconds(self) -> float:
        return statistics.median(self.runs)

    @property
    def rate(self) -> float:
        return self.items / self.seconds


WORKLOADS = ("noop", "monte_carlo", "startup")


@dataclass
class PeerResult:
    noop: Measured | None = None
    monte_carlo: Measured | None = None
    startup: Measured | None = None
    #: Monte Carlo parallel efficiency of each run, against the serial baseline timed just
    #: before it.
    efficiencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def add(self, workload: str, timed: Timed) -> None:
        """Record one checked run of ``workload``; its value is the list of results."""
        measured = getattr(self, workload) or Measured(items=len(timed.value))
        measured.add(timed)
        setattr(self, workload, measured)


@dataclass
class MonteCarloSetup:
    samples: int
    #: Tasks in a serial baseline: one worker's share, so that the baseline lasts about as
    #: long as the parallel run it is compared with and sees the same phase of the machine.
    serial_tasks: int
    expected: list[float] = field(default_factory=list, repr=False)
    serial_runs: list[float] = field(default_factory=list)  # seconds; one per peer and round

    def tasks(self, count: int) -> tuple[Fn, range]:
        return partial(monte_carlo_pi, samples=self.samples), range(count)

    @property
    def serial_seconds(self) -> float:
        """The median baseline: only reported, as every run has a baseline of its own."""
        return statistics.median(self.serial_runs)

    def efficiency(self, serial: float, wall: float, config: Config) -> float:
        """Parallel efficiency: the baseline's seconds per task x tasks / (wall x workers)."""
        return serial / self.serial_tasks * config.mc_tasks / (wall * config.workers)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def checked_run(
    what: str, config: Config, once: Callable[[], Timed], expected: Sequence[Any]
) -> Timed:
    """Run a measurement once and check its results.

    A run during which other processes used much CPU is measured again, a few times at most.
    """
    for retries_left in range(config.retries, -1, -1):
        timed = once()
        if timed.value != expected:
            raise AssertionError(f"{what}: wrong results")
        if timed.other_load <= DISTURBED or not retries_left:
            break
        log(f"    other processes used {timed.other_load:.0%} of the CPUs: run again")
    return timed


def calibrate_monte_carlo(config: Config) -> MonteCarloSetup:
    """Size one task to ``mc_task_seconds`` here, and compute the expected results."""
    share = math.ceil(config.mc_tasks / config.workers)
    setup = MonteCarloSetup(calibrate_samples(config.mc_task_seconds), share)
    fn, seeds = setup.tasks(config.mc_tasks)
    setup.expected = [fn(seed) for seed in seeds]
    return setup


def time_serial(setup: MonteCarloSetup, config: Config) -> float:
    """A baseline: one worker's share of the Monte Carlo tasks, one by one in this process.

    Timed with no peer open, so that no idle scheduler or worker slows it down.
    """
    fn, seeds = setup.tasks(setup.serial_tasks)
    serial = partial(measure, lambda: [fn(seed) for seed in seeds])
    expected = setup.expected[: setup.serial_tasks]
    seconds = checked_run("serial Monte Carlo", config, serial, expected).seconds
    setup.serial_runs.append(seconds)
    return seconds


def run_steady(
    peer: Peer, config: Config, setup: MonteCarloSetup, serial: float, result: PeerResult
) -> None:
    """One run each of workloads 2 and 1 on a started, warmed-up peer, closed afterwards.

    Monte Carlo comes first, as close as possible to ``serial``, the baseline timed just
    before: the machine's speed drifts, and the efficiency must compare like with like.
    """
    with peer.open(config.workers) as session:
        session.ready()
        if peer.monte_carlo:
            fn, seeds = setup.tasks(config.mc_tasks)
            session.map(partial(monte_carlo_pi, samples=10), range(200))  # warm-up, numpy
            log(f"  {peer.name}: Monte Carlo, no-op")
            monte_carlo = partial(measure, partial(session.map, fn, seeds))
            timed = checked_run("Monte Carlo", config, monte_carlo, setup.expected)
            result.add("monte_carlo", timed)
            result.efficiencies.append(setup.efficiency(serial, timed.seconds, config))
        else:
            session.map(abs, range(200))  # warm-up
            log(f"  {peer.name}: no-op")
        count = config.per_item_noop_items if peer.per_item_tasks else config.noop_items
        items: Sequence[int] = list(range(count)) if peer.list_input else range(count)
        noop = partial(measure, partial(session.map, abs, items))
        result.add("noop", checked_run("no-op", config, noop, list(items)))


def start_to_first_result(peer: Peer, workers: int) -> Timed:
    """From nothing to ``abs(-1)`` computed on a fresh peer; its tear-down is not timed."""
    with ExitStack() as stack:
        return measure(lambda: [stack.enter_context(peer.open(workers)).first(abs, -1)])


def run_peer(peer: Peer, config: Config, setup: MonteCarloSetup, result: PeerResult) -> None:
    """One round of one peer: a serial baseline, then every workload once, back to back."""
    serial = time_serial(setup, config) if peer.monte_carlo else 0.0
    run_steady(peer, config, setup, serial, result)
    if peer.startup:
        log(f"  {startup_name(peer)}: start to first result")
        once = partial(start_to_first_result, peer, config.workers)
        result.add("startup", checked_run("first result", config, once, [1]))


def guarded(result: PeerResult, name: str, action: Callable[[], None]) -> None:
    """A failing peer is reported in the tables, not fatal to the others' numbers."""
    try:
        action()
    except Exception as exc:
        log(traceback.format_exc())
        result.errors.append(f"{type(exc).__name__}: {exc}")
        log(f"  {name} FAILED: {result.errors[-1]}")


def run_round(
    number: int, config: Config, setup: MonteCarloSetup, results: dict[str, PeerResult]
) -> None:
    """Every peer in turn, each opened and closed within the round.

    This VM's CPU speed drifts (up to 2x, in phases of seconds to tens of seconds), so a
    peer measured all at once could be measured all in a slow phase; in rounds, every peer
    is measured across the same phases, and medians over rounds drop the unlucky runs.
    The order turns by one peer per round, so no peer always follows the same one. Only
    one peer is open at a time: all open, the idle ones (Dask's schedulers run in this
    process) took a tenth of the CPUs and slowed the serial baseline by 8 %.
    """
    log(f"round {number + 1} of {config.rounds}")
    turn = number % len(PEERS)
    for peer in (*PEERS[turn:], *PEERS[:turn]):
        result = results[peer.name]
        if not result.errors:  # a failed peer is reported as such, not tried every round
            guarded(result, peer.name, partial(run_peer, peer, config, setup, result))


# -- report ------------------------------------------------------------------------------


@dataclass
class Report:
    config: Config
    setup: MonteCarloSetup
    results: dict[str, PeerResult]
    other_load: float = 0.0  # share of the CPUs other processes used during the run

    def pick(self, workload: str, metric: str) -> dict[str, float | None]:
        """One metric of one workload for every peer (None where the peer failed)."""
        picked = {}
        for name, result in self.results.items():
            measured = getattr(result, workload)
            picked[name] = None if measured is None else getattr(measured, metric)
        return picked

    def efficiencies(self) -> dict[str, float | None]:
        """Median Monte Carlo parallel efficiency over the rounds (None where none ran)."""
        return {
            name: statistics.median(result.efficiencies) if result.efficiencies else None
            for name, result in self.results.items()
        }


def ratio(value: float | None, reference: float | None) -> float | None:
    return None if value is None or not reference else value / reference


def fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def fmt_range(values: Sequence[float], spec: str, suffix: str = "") -> str:
    """Lowest to highest: how far apart the machine's drift put runs of the same thing."""
    return f"{min(values):{spec}}-{max(values):{spec}}{suffix}" if values else "n/a"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def noop_table(report: Report) -> str:
    items = report.pick("noop", "items")
    rates = report.pick("noop", "rate")
    memory = report.pick("noop", "peak_mb")
    rows = []
    for name in report.results:
        count = fmt(items[name], ",.0f")
        if items[name] not in (None, report.config.noop_items):
            count += " (rate only)"
        rows.append([
            name, count,
            fmt(rates[name], ",.0f"), fmt(ratio(rates[name], rates[CLOUDMAP]), ".3g", "x"),
            fmt(memory[name], ".1f"), fmt(ratio(memory[name], memory[CLOUDMAP]), ".3g", "x"),
        ])  # fmt: skip
    headers = ["Peer", "Items", "Items/s", "Rate ratio to cloudmap (>1: peer faster)",
               "Driver peak MB", "Memory ratio to cloudmap (<1: peer leaner)"]  # fmt: skip
    return markdown_table(headers, rows)


def monte_carlo_table(report: Report) -> str:
    seconds = report.pick("monte_carlo", "seconds")
    efficiency = report.efficiencies()
    names = {peer.name for peer in PEERS if peer.monte_carlo}
    rows = [
        [name, fmt(seconds[name], ".2f"), fmt(ratio(seconds[name], seconds[CLOUDMAP]), ".3g", "x"),
         fmt(efficiency[name], ".0%"), fmt_range(result.efficiencies, ".0%")]
        for name, result in report.results.items() if name in names
    ]  # fmt: skip
    headers = ["Peer", "Wall s", "Time ratio to cloudmap (>1: cloudmap faster)",
               "Parallel efficiency", "Efficiency range over rounds"]  # fmt: skip
    return markdown_table(headers, rows)


def startup_table(report: Report) -> str:
    medians = report.pick("startup", "seconds")
    rows = []
    for peer in (peer for peer in PEERS if peer.startup):
        startup = report.results[peer.name].startup
        runs = ", ".join(f"{s:.2f}" for s in startup.runs) if startup else "n/a"
        rows.append([startup_name(peer), fmt(medians[peer.name], ".2f"), runs,
                     fmt(ratio(medians[peer.name], medians[CLOUDMAP]), ".3g", "x")])  # fmt: skip
    headers = ["Peer", "Median s", "Runs s", "Time ratio to cloudmap (>1: cloudmap faster)"]
    return markdown_table(headers, rows)


class Target(NamedTuple):
    text: str
    value: float | None
    met: bool


def targets(report: Report) -> list[Target]:
    rates = report.pick("noop", "rate")
    efficiency = report.efficiencies()[CLOUDMAP]
    startup = report.pick("startup", "seconds")
    checks: list[tuple[str, float | None, Callable[[float], bool]]] = [
        ("no-op rate >= 1.0x multiprocessing.Pool",
         ratio(rates[CLOUDMAP], rates[MULTIPROCESSING]), lambda v: v >= 1.0),
        ("no-op rate >= 50x Dask one task per item",
         ratio(rates[CLOUDMAP], rates[DASK_PER_ITEM]), lambda v: v >= 50),
        ("Monte Carlo efficiency >= 95 %", efficiency, lambda v: v >= 0.95),
        ("start to first result <= 1.5x Dask LocalCluster's",
         ratio(startup[CLOUDMAP], startup[DASK_PER_ITEM]), lambda v: v <= 1.5),
    ]  # fmt: skip
    return [Target(text, value, value is not None and ok(value)) for text, value, ok in checks]


def versions() -> str:
    modules = (cloudmap, dask, distributed, joblib, np)
    return ", ".join(f"{m.__name__} {m.__version__}" for m in modules)


def drift(serial_runs: Sequence[float]) -> float:
    """Slowest over fastest serial baseline: how much the machine's speed moved."""
    return max(serial_runs) / min(serial_runs)


def render(report: Report) -> str:
    config, setup = report.config, report.setup
    lines = [
        f"Machine: {os.cpu_count()} cores, {platform.platform()}, Python "
        f"{platform.python_version()}; {versions()}. Every peer runs {config.workers} worker "
        f"processes (cloudmap: {config.workers} nodes x 1 slot); multiprocessing start method "
        f"{MP_CONTEXT.get_start_method()}. Times are medians over {config.rounds} round(s); "
        "in each round every peer is measured once per workload, one peer after the other "
        "(each opened and closed in turn, the order shifted by one peer per round), so that "
        "all peers see the same phases of this machine's drifting speed. "
        f"Other processes used {report.other_load:.0%} of the CPUs during the run.",
        "",
        f"### 1. No-op items: `abs` over `range({config.noop_items:,})`",
        "",
        f"Timed after a warm-up map. Dask one task per item runs {config.per_item_noop_items:,} "
        "items (its memory is for those items). Driver peak MB: increase of the client "
        "process's RSS high-water mark during a run (largest of the runs).",
        "",
        noop_table(report),
        "",
        f"### 2. Monte Carlo: {config.mc_tasks} numpy tasks of "
        f"~{config.mc_task_seconds * 1000:.0f} ms",
        "",
        f"{setup.samples:,} samples per task. Serial baseline: one worker's share "
        f"({setup.serial_tasks} tasks) one by one in the driver, timed right before each peer "
        f"is opened, in every round: median {setup.serial_seconds:.2f} s, range "
        f"{fmt_range(setup.serial_runs, '.2f', ' s')} over {len(setup.serial_runs)} baselines "
        f"(drift of this machine's speed: {drift(setup.serial_runs):.2f}x). Efficiency of a run "
        f"= its own baseline's time per task x {config.mc_tasks} tasks / (wall x "
        f"{config.workers} workers); median and range over the rounds.",
        "",
        monte_carlo_table(report),
        "",
        "### 3. Start to first result",
        "",
        "Fresh pool or cluster to the result of `abs(-1)`, imports done; tear-down not timed.",
        "",
        startup_table(report),
        "",
        "### Targets",
        "",
    ]
    if config.quick:
        lines += ["A --quick run is too small to judge them (cloudmap learns batch sizes as it "
                  "goes); run without --quick.", ""]  # fmt: skip
    for target in targets(report):
        mark = "met" if target.met else "MISSED"
        lines.append(f"- {target.text}: {fmt(target.value, '.3g')} -> {mark}")
    disturbed = [
        f"{name} ({workload})"
        for name, result in report.results.items()
        for workload in WORKLOADS
        if (measured := getattr(result, workload)) and measured.other_load > DISTURBED
    ]
    if disturbed:
        lines.append(
            f"\nDisturbed by other processes (over {DISTURBED:.0%} of the CPUs) even when "
            f"measured again: {', '.join(disturbed)}."
        )
    errors = [f"- {name}: {e}" for name, r in report.results.items() for e in r.errors]
    if errors:
        lines += ["", "### Errors", "", *errors]
    return "\n".join(lines)


def to_json(report: Report) -> dict[str, Any]:
    efficiencies = report.efficiencies()
    peers: dict[str, dict[str, Any]] = {}
    for name, result in report.results.items():
        peers[name] = {"errors": result.errors}
        for workload in WORKLOADS:
            measured: Measured | None = getattr(result, workload)
            peers[name][workload] = measured and {
                **asdict(measured), "seconds": measured.seconds, "rate": measured.rate
            }  # fmt: skip
        if result.monte_carlo:
            peers[name]["monte_carlo"]["efficiency"] = efficiencies[name]
            peers[name]["monte_carlo"]["efficiencies"] = result.efficiencies
    return {
        "machine": {"cores": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "versions": versions(),
                    "other_load": report.other_load},
        "config": asdict(report.config),
        "monte_carlo": {"samples": report.setup.samples, "serial_tasks": report.setup.serial_tasks,
                        "serial_runs": report.setup.serial_runs,
                        "serial_seconds": report.setup.serial_seconds,
                        "drift": drift(report.setup.serial_runs)},
        "peers": peers,
        "targets": [target._asdict() for target in targets(report)],
    }  # fmt: skip


# -- main --------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller smoke run")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the raw numbers here")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="worker processes per peer (default: one per core)")  # fmt: skip
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    config = Config.create(quick=args.quick, workers=args.workers)
    other_load = OtherLoad()
    log("calibrating the Monte Carlo task")
    setup = calibrate_monte_carlo(config)
    results = {peer.name: PeerResult() for peer in PEERS}
    for number in range(config.rounds):
        run_round(number, config, setup, results)
    report = Report(config, setup, results, other_load.share())
    print(render(report))
    if args.json:
        args.json.write_text(json.dumps(to_json(report), indent=2) + "\n")
    return 1 if any(result.errors for result in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
