"""Shared data: a large array used by every item of a map, via ``pool.share`` or a closure.

Two cases, each on a fresh local pool (``--nodes`` x ``--slots-per-node``, 2 x 2 by
default), both computing the same thing: ``--items`` items (1,000), item ``i`` summing the
strided slice ``array[i::items]`` of a float64 array of ``--mb`` megabytes (200):

- share: ``big = pool.share(array)`` then ``pool.map(lambda i: big[i::n].sum(), range(n))``.
  The array is pickled once, stored on the scheduler, and fetched once per node.
- closure: ``pool.map(lambda i: array[i::n].sum(), range(n))``. The function's pickle holds
  the array, and every task (batch of items) carries the function. cloudmap warns about it
  (``LargeFunctionWarning``); the warning is silenced here.

Reported per case: wall time (for share: the ``pool.share`` call plus the map), the Dask
tasks the map sent, what moved to the nodes (share: the scheduler store's fetch counts,
times the pickle's size; closure: tasks x the function's pickle, each task carrying it),
the bytes that crossed the loopback interface while the case ran (everything here talks
over 127.0.0.1: client, scheduler in the client's process, slots; other processes on the
machine add to it), the increase of the client process's peak RSS (the scheduler runs in
it, so its store and the tasks it holds count), and the peak of the node processes' RSS
summed (agents and slots, sampled every 20 ms).

Method: a pool is started and waited for (not timed); the slots are warmed up with a small
map (imports); the array is made before the timed part. The cases alternate in order round
by round; medians over rounds are printed. The share of the CPUs used by other processes
while a case ran is printed with it: on a busy machine, times are not comparable.

Run ``python benchmarks/shared_data.py`` (one round, about half a minute on 2 cores);
``--rounds``, ``--mb``, ``--items``, ``--nodes``, ``--slots-per-node``, ``--batch-size``.
Progress goes to stderr; stdout is the report.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil

import cloudmap
from cloudmap.payload import LargeFunctionWarning, dump_function

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import MB, OtherLoad, PeakRss

CASES = ("share", "closure")


@dataclass
class Measured:
    case: str
    seconds: float
    share_seconds: float
    tasks: int
    per_node: dict[str, int]  # transfers by node (share), or None-like empty (closure)
    moved_bytes: int
    loopback_bytes: int
    client_peak_mb: float
    nodes_peak_mb: float
    other_load: float


class NodesPeakRss:
    """The peak of the summed RSS of this process's descendants (node agents, slots)."""

    def __init__(self, interval: float = 0.02) -> None:
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="nodes-rss", daemon=True)
        self.peak = 0

    def __enter__(self) -> NodesPeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        me = psutil.Process()
        while not self._stop.wait(self._interval):
            total = 0
            for process in me.children(recursive=True):
                with suppress(psutil.Error):
                    total += process.memory_info().rss
            self.peak = max(self.peak, total)


def loopback_bytes() -> int:
    counters = psutil.net_io_counters(pernic=True).get("lo")
    return counters.bytes_sent if counters is not None else 0


def run_case(case: str, args: argparse.Namespace, array: np.ndarray, root: Path) -> Measured:
    n = args.items
    options = {} if args.batch_size is None else {"batch_size": args.batch_size}
    with cloudmap.Pool(
        nodes=args.nodes, slots_per_node=args.slots_per_node, root=str(root / case)
    ) as pool:
        pool.wait_for_nodes()
        pool.map(abs, range(-4 * args.nodes * args.slots_per_node, 0), batch_size=1)  # warm
        done_before = pool.task_counts().done
        load = OtherLoad()
        lo_before = loopback_bytes()
        with PeakRss() as client_rss, NodesPeakRss() as nodes_rss:
            started = time.perf_counter()
            if case == "share":
                big = pool.share(array)
                shared_at = time.perf_counter()
                fn: Callable[[int], float] = lambda i: float(big[i::n].sum())  # noqa: E731
                out = pool.map(fn, range(n), **options)
            else:
                shared_at = started
                fn = lambda i: float(array[i::n].sum())  # noqa: E731
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", LargeFunctionWarning)
                    # Dask's own word for the same thing, once per message of tasks.
                    warnings.filterwarnings("ignore", "Sending large graph")
                    out = pool.map(fn, range(n), **options)
            ended = time.perf_counter()
        lo_after = loopback_bytes()
        other = load.share()
        tasks = pool.task_counts().done - done_before
        if case == "share":
            per_node = big.transfers()
            moved = sum(per_node.values()) * big.nbytes
        else:
            per_node = {}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", LargeFunctionWarning)
                moved = tasks * len(dump_function(fn))
    expected = [float(array[i::n].sum()) for i in range(0, n, max(1, n // 10))]
    assert [out[i] for i in range(0, n, max(1, n // 10))] == expected, "wrong results"
    return Measured(
        case=case,
        seconds=ended - started,
        share_seconds=shared_at - started,
        tasks=tasks,
        per_node=per_node,
        moved_bytes=moved,
        loopback_bytes=lo_after - lo_before,
        client_peak_mb=client_rss.increase_mb,
        nodes_peak_mb=nodes_rss.peak / MB,
        other_load=other,
    )


def report(args: argparse.Namespace, nbytes: int, results: dict[str, list[Measured]]) -> str:
    def median(case: str, value: Callable[[Measured], float]) -> float:
        return statistics.median(value(m) for m in results[case])

    lines = [
        f"shared data: a {nbytes / 1e6:.0f} MB float64 array, {args.items:,}-item map, "
        f"{args.nodes} nodes x {args.slots_per_node} slots (local), "
        f"batch_size={args.batch_size or 'auto'}, {args.rounds} round(s), medians",
        f"cloudmap {cloudmap.__version__}, Python {platform.python_version()}, "
        f"{psutil.cpu_count()} CPUs",
        "",
        f"{'case':<9} {'wall s':>7} {'of which share s':>16} {'tasks':>6} "
        f"{'moved to nodes MB':>17} {'fetches by node':>20} {'loopback MB':>11} "
        f"{'client peak MB':>14} {'nodes peak MB':>13} {'other load':>10}",
    ]
    for case in CASES:
        last = results[case][-1]
        fetches = (
            ", ".join(f"{k}: {v}" for k, v in sorted(last.per_node.items()))
            if case == "share"
            else f"~{last.tasks / args.nodes:.0f} tasks each"
        )
        lines.append(
            f"{case:<9} {median(case, lambda m: m.seconds):>7.2f} "
            f"{median(case, lambda m: m.share_seconds):>16.2f} "
            f"{median(case, lambda m: m.tasks):>6.0f} "
            f"{median(case, lambda m: m.moved_bytes) / 1e6:>17,.0f} {fetches:>20} "
            f"{median(case, lambda m: m.loopback_bytes) / 1e6:>11,.0f} "
            f"{median(case, lambda m: m.client_peak_mb):>14,.0f} "
            f"{median(case, lambda m: m.nodes_peak_mb):>13,.0f} "
            f"{median(case, lambda m: m.other_load):>10.0%}"
        )
    share, closure = (median(c, lambda m: m.seconds) for c in CASES)
    moved_share, moved_closure = (median(c, lambda m: m.moved_bytes) for c in CASES)
    lines += [
        "",
        f"closure / share: {closure / share:.1f}x the wall time, "
        f"{moved_closure / max(moved_share, 1):.1f}x the bytes moved to the nodes",
        "moved to nodes: share = fetches x pickle size (the scheduler's counts); "
        "closure = tasks x the function's pickle (every task carries it)",
        "loopback: all bytes over 127.0.0.1 while the case ran (client -> scheduler -> slots "
        "counts each hop; other processes on the machine add to it)",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=200.0, help="array size in MB (10^6 B)")
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--slots-per-node", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=None, help="default: cloudmap's")
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()

    array = np.random.default_rng(0).random(int(args.mb * 1e6) // 8)
    results: dict[str, list[Measured]] = {case: [] for case in CASES}
    with tempfile.TemporaryDirectory(prefix="cloudmap-shared-bench-") as temp:
        for round_number in range(args.rounds):
            order = CASES if round_number % 2 == 0 else CASES[::-1]
            for case in order:
                print(f"round {round_number + 1}: {case}...", file=sys.stderr, flush=True)
                root = Path(temp) / f"round-{round_number}"
                measured = run_case(case, args, array, root)
                print(f"  {measured}", file=sys.stderr, flush=True)
                results[case].append(measured)
    print(report(args, array.nbytes, results))


if __name__ == "__main__":
    main()
