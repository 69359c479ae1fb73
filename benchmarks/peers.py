"""Compare cloudmap with its peers on this machine, and check cloudmap's performance targets.

cloudmap promises that batching items into Dask tasks makes it about as fast as a local
process pool for tiny items, far faster than Dask's one task per item, fully efficient for
CPU-bound tasks, and no slower to start than a Dask LocalCluster. This script measures those
claims against the tools a Jupyter user would otherwise reach for, with the same number of
worker processes (one per core) for every peer:

1. no-op items (``abs`` over ``range(n)``): items/s and the driver's peak memory increase;
2. Monte Carlo numpy tasks of about 50 ms: wall time and parallel efficiency;
3. start to first result: fresh pool or cluster to the result of one trivial call.

Run ``python benchmarks/peers.py`` (``--quick`` for a smoke run, ``--json PATH`` to save the
raw numbers). It prints one Markdown table per workload, ratios to cloudmap, and the targets.
Progress goes to stderr, so stdout is the report alone.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import ctypes
import gc
import json
import math
import multiprocessing
import os
import pickle
import platform
import statistics
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager, suppress
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import dask
import distributed
import joblib
import numpy as np
import psutil
from distributed import Client, LocalCluster
from joblib.externals.loky import get_reusable_executor
from workloads import calibrate_samples, map_blob, monte_carlo_pi

import cloudmap

T = TypeVar("T")
Fn = Callable[[Any], Any]

#: The start method of the multiprocessing and ProcessPoolExecutor peers: the platform's.
MP_CONTEXT = multiprocessing.get_context()
#: How often the driver's memory is sampled during a measurement.
RSS_INTERVAL = 0.003
MB = 1024 * 1024


# -- measuring ---------------------------------------------------------------------------


class PeakRss:
    """The increase of this process's RSS high-water mark over a block, sampled in a thread.

    Before the baseline, garbage is collected and free heap memory returned to the system,
    so that memory left over by an earlier peer neither hides nor inflates the next peak.
    """

    def __init__(self, interval: float = RSS_INTERVAL) -> None:
        self._process = psutil.Process()
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="peak-rss", daemon=True)
        self.baseline = 0
        self.peak = 0

    def __enter__(self) -> PeakRss:
        gc.collect()
        _release_free_memory()
        self.baseline = self.peak = self._process.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self._record()

    @property
    def increase_mb(self) -> float:
        return (self.peak - self.baseline) / MB

    def _sample(self) -> None:
        while not self._stop.wait(self._interval):
            self._record()

    def _record(self) -> None:
        self.peak = max(self.peak, self._process.memory_info().rss)


def _release_free_memory() -> None:
    """Give free malloc memory back to the system (glibc only; elsewhere a no-op)."""
    with suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class Timed(NamedTuple):
    value: Any
    seconds: float
    peak_mb: float


def measure(action: Callable[[], T]) -> Timed:
    """Run ``action`` once: its value, wall seconds and driver peak memory increase (MB).

    The one timing helper every peer and workload goes through.
    """
    with PeakRss() as rss:
        start = time.perf_counter()
        value = action()
        seconds = time.perf_counter() - start
    return Timed(value, seconds, rss.increase_mb)


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
MULTIPROCESSING = "multiprocessing.Pool"
DASK_PER_ITEM = "Dask Client.map, 1 task/item"
DASK_LOCAL_CLUSTER = "Dask LocalCluster"

PEERS = (
    Peer(CLOUDMAP, cloudmap_session),
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
    per_item_noop_items: int
    mc_tasks: int
    mc_task_seconds: float
    startup_runs: int

    @classmethod
    def create(cls, *, quick: bool, workers: int) -> Config:
        if quick:
            return cls(workers, 100_000, 1_000, 16, 0.05, 1)
        return cls(workers, 1_000_000, 10_000, 64, 0.05, 3)


@dataclass
class NoopResult:
    items: int
    seconds: float
    peak_mb: float

    @property
    def rate(self) -> float:
        return self.items / self.seconds


@dataclass
class MonteCarloResult:
    seconds: float
    efficiency: float


@dataclass
class StartupResult:
    runs: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.runs)


@dataclass
class PeerResult:
    noop: NoopResult | None = None
    monte_carlo: MonteCarloResult | None = None
    startup: StartupResult | None = None
    errors: list[str] = field(default_factory=list)


@dataclass
class MonteCarloSetup:
    samples: int
    serial_seconds: float

    def tasks(self, count: int) -> tuple[Fn, range]:
        return partial(monte_carlo_pi, samples=self.samples), range(count)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def check(what: str, value: object, expected: object) -> None:
    if value != expected:
        raise AssertionError(f"{what}: wrong results")


def run_noop(session: Session, peer: Peer, config: Config) -> NoopResult:
    items = range(config.per_item_noop_items if peer.per_item_tasks else config.noop_items)
    timed = measure(lambda: session.map(abs, items))
    check("no-op", timed.value, list(items))
    return NoopResult(len(items), timed.seconds, timed.peak_mb)


def run_monte_carlo(
    session: Session, setup: MonteCarloSetup, expected: list[float], config: Config
) -> MonteCarloResult:
    fn, seeds = setup.tasks(config.mc_tasks)
    timed = measure(lambda: session.map(fn, seeds))
    check("Monte Carlo", timed.value, expected)
    efficiency = setup.serial_seconds / (timed.seconds * config.workers)
    return MonteCarloResult(timed.seconds, efficiency)


def calibrate_monte_carlo(config: Config) -> tuple[MonteCarloSetup, list[float]]:
    """Size one task to ``mc_task_seconds`` here, then time all tasks serially, in this process."""
    samples = calibrate_samples(config.mc_task_seconds)
    setup = MonteCarloSetup(samples, 0.0)
    fn, seeds = setup.tasks(config.mc_tasks)
    timed = measure(lambda: [fn(seed) for seed in seeds])
    setup.serial_seconds = timed.seconds
    return setup, timed.value


def run_steady(
    peer: Peer, config: Config, setup: MonteCarloSetup, expected: list[float], result: PeerResult
) -> None:
    """Workloads 1 and 2 on one started, warmed-up peer."""
    with peer.open(config.workers) as session:
        session.ready()
        session.map(abs, range(1000))  # warm-up: workers up, code paths and imports hot
        log(f"  {peer.name}: no-op")
        result.noop = run_noop(session, peer, config)
        log(f"  {peer.name}: Monte Carlo")
        result.monte_carlo = run_monte_carlo(session, setup, expected, config)


def start_to_first_result(peer: Peer, workers: int) -> float:
    """Seconds from nothing to ``abs(-1)`` computed on a fresh peer; tear-down is not timed."""
    with ExitStack() as stack:

        def first() -> Any:
            return stack.enter_context(peer.open(workers)).first(abs, -1)

        timed = measure(first)
        check("first result", timed.value, 1)
    return timed.seconds


def run_startup(peer: Peer, config: Config, result: PeerResult) -> None:
    runs = []
    for run in range(config.startup_runs):
        log(f"  {startup_name(peer)}: start to first result, run {run + 1}")
        runs.append(start_to_first_result(peer, config.workers))
    result.startup = StartupResult(runs)


def guarded(result: PeerResult, name: str, action: Callable[[], None]) -> None:
    """A failing peer is reported in the tables, not fatal to the others' numbers."""
    try:
        action()
    except Exception as exc:
        log(traceback.format_exc())
        result.errors.append(f"{type(exc).__name__}: {exc}")
        log(f"  {name} FAILED: {result.errors[-1]}")


# -- report ------------------------------------------------------------------------------


def ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or not reference:
        return None
    return value / reference


def fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def noop_table(results: dict[str, PeerResult], config: Config) -> str:
    reference = results[CLOUDMAP].noop
    rows = []
    for name, result in results.items():
        noop = result.noop
        rate = noop.rate if noop else None
        memory = noop.peak_mb if noop else None
        items = f"{noop.items:,}" if noop else "n/a"
        if noop and noop.items != config.noop_items:
            items += " (rate only)"
        rows.append(
            [
                name,
                items,
                fmt(rate, ",.0f"),
                fmt(ratio(rate, reference.rate if reference else None), ".3g", "x"),
                fmt(memory, ".1f"),
                fmt(ratio(memory, reference.peak_mb if reference else None), ".3g", "x"),
            ]
        )
    headers = ["Peer", "Items", "Items/s", "Rate ratio to cloudmap (>1: peer faster)",
               "Driver peak MB", "Memory ratio to cloudmap (<1: peer leaner)"]  # fmt: skip
    return markdown_table(headers, rows)


def monte_carlo_table(results: dict[str, PeerResult]) -> str:
    reference = results[CLOUDMAP].monte_carlo
    rows = []
    for name, result in results.items():
        mc = result.monte_carlo
        seconds = mc.seconds if mc else None
        rows.append(
            [
                name,
                fmt(seconds, ".2f"),
                fmt(ratio(seconds, reference.seconds if reference else None), ".3g", "x"),
                fmt(mc.efficiency * 100 if mc else None, ".0f", " %"),
            ]
        )
    headers = ["Peer", "Wall s", "Time ratio to cloudmap (>1: cloudmap faster)",
               "Parallel efficiency"]  # fmt: skip
    return markdown_table(headers, rows)


def startup_table(results: dict[str, PeerResult]) -> str:
    reference = results[CLOUDMAP].startup
    rows = []
    for peer in PEERS:
        startup = results[peer.name].startup
        if not peer.startup:
            continue
        median = startup.median if startup else None
        runs = ", ".join(f"{s:.2f}" for s in startup.runs) if startup else "n/a"
        rows.append(
            [
                startup_name(peer),
                fmt(median, ".2f"),
                runs,
                fmt(ratio(median, reference.median if reference else None), ".3g", "x"),
            ]
        )
    headers = ["Peer", "Median s", "Runs s", "Time ratio to cloudmap (>1: cloudmap faster)"]
    return markdown_table(headers, rows)


class Target(NamedTuple):
    text: str
    value: float | None
    met: bool


def targets(results: dict[str, PeerResult]) -> list[Target]:
    def rate(name: str) -> float | None:
        noop = results[name].noop
        return noop.rate if noop else None

    def startup(name: str) -> float | None:
        result = results[name].startup
        return result.median if result else None

    mc = results[CLOUDMAP].monte_carlo
    checks = [
        ("no-op rate >= 0.5x multiprocessing.Pool", ratio(rate(CLOUDMAP), rate(MULTIPROCESSING)),
         lambda v: v >= 0.5),
        ("no-op rate >= 50x Dask one task per item", ratio(rate(CLOUDMAP), rate(DASK_PER_ITEM)),
         lambda v: v >= 50),
        ("Monte Carlo efficiency >= 90 %", mc.efficiency if mc else None, lambda v: v >= 0.9),
        ("start to first result <= 1.5x Dask LocalCluster",
         ratio(startup(CLOUDMAP), startup(DASK_PER_ITEM)), lambda v: v <= 1.5),
    ]  # fmt: skip
    return [Target(text, value, value is not None and ok(value)) for text, value, ok in checks]


def render(results: dict[str, PeerResult], config: Config, setup: MonteCarloSetup) -> str:
    lines = [
        f"Machine: {os.cpu_count()} cores, {platform.platform()}, Python "
        f"{platform.python_version()}; cloudmap {cloudmap.__version__}, dask {dask.__version__}, "
        f"distributed {distributed.__version__}, joblib {joblib.__version__}, numpy "
        f"{np.__version__}. Every peer runs {config.workers} worker processes (cloudmap: "
        f"{config.workers} nodes x 1 slot); multiprocessing start method: "
        f"{MP_CONTEXT.get_start_method()}.",
        "",
        f"### 1. No-op items: `abs` over `range({config.noop_items:,})`",
        "",
        f"Timed after a warm-up. Dask one task per item runs {config.per_item_noop_items:,} "
        "items (rate only; its memory is for those items). Driver peak MB: increase of the "
        "client process's RSS high-water mark during the run.",
        "",
        noop_table(results, config),
        "",
        f"### 2. Monte Carlo: {config.mc_tasks} numpy tasks of ~{config.mc_task_seconds * 1000:.0f}"
        " ms",
        "",
        f"{setup.samples:,} samples per task; serial time in the driver "
        f"{setup.serial_seconds:.2f} s. Efficiency = serial / (wall x {config.workers} "
        "workers).",
        "",
        monte_carlo_table(results),
        "",
        "### 3. Start to first result",
        "",
        f"Fresh pool or cluster to the result of `abs(-1)`, imports done; median of "
        f"{config.startup_runs} run(s), tear-down not timed.",
        "",
        startup_table(results),
        "",
        "### Targets",
        "",
    ]
    for target in targets(results):
        mark = "met" if target.met else "MISSED"
        lines.append(f"- {target.text}: {fmt(target.value, '.3g')} -> {mark}")
    errors = [f"- {name}: {e}" for name, r in results.items() for e in r.errors]
    if errors:
        lines += ["", "### Errors", "", *errors]
    return "\n".join(lines)


def to_json(results: dict[str, PeerResult], config: Config, setup: MonteCarloSetup) -> Any:
    peers = {}
    for name, result in results.items():
        peers[name] = asdict(result)
        if result.noop:
            peers[name]["noop"]["rate"] = result.noop.rate
        if result.startup:
            peers[name]["startup"]["median"] = result.startup.median
    return {
        "machine": {"cores": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "config": asdict(config),
        "monte_carlo": asdict(setup),
        "peers": peers,
        "targets": [target._asdict() for target in targets(results)],
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
    log("calibrating the Monte Carlo task")
    setup, expected = calibrate_monte_carlo(config)
    results = {peer.name: PeerResult() for peer in PEERS}
    log("no-op and Monte Carlo")
    for peer in PEERS:
        result = results[peer.name]
        guarded(result, peer.name, partial(run_steady, peer, config, setup, expected, result))
    log("start to first result")
    for peer in (peer for peer in PEERS if peer.startup):
        result = results[peer.name]
        guarded(result, peer.name, partial(run_startup, peer, config, result))
    print(render(results, config, setup))
    if args.json:
        args.json.write_text(json.dumps(to_json(results, config, setup), indent=2) + "\n")
    return 1 if any(result.errors for result in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
