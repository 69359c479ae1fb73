"""MPI runs on a pool against MPICH's own launcher: launch overhead and allreduce bandwidth.

1. Launch overhead. ``pool.mpi(rank_of, nodes=2, ranks_per_node=2)``, where ``rank_of``
   returns ``comm.rank``, against ``mpiexec -launcher fork -n 4 python -c "from mpi4py
   import MPI; MPI.COMM_WORLD.Barrier()"``; and ``pool.mpi_command("true", nodes=2,
   ranks_per_node=2)`` against ``mpiexec -launcher fork -n 4 true``. Both sides use the
   venv's ``mpiexec`` (the ``mpich`` wheel) and are timed in the driver, from the call to
   its return. What ``pool.mpi`` adds: leasing two whole nodes (drain, check they are
   quiet), the coordination step on each, pickling the call, a ``sh`` wrapper per rank that
   records its exit status, reading every rank's output files, gathering and unpickling the
   return values, and giving the nodes back. Target: at most 0.3 s more than raw mpiexec.
2. Allreduce bandwidth. ``comm.Allreduce`` of float64 arrays (1 MiB and 16 MiB), timed
   inside the ranks (one warm-up call, a barrier, then a fixed number of calls; the slowest
   rank's time counts), on 2 nodes x 2 ranks and 2 nodes x 1 rank, under ``pool.mpi`` and
   under raw ``mpiexec`` running the same function from a script file. Both are the same
   MPICH in the same kind of process, so they should be level. GB/s is the array's size
   over the time of one call. Target: every pool figure within 10 % of the raw one. On a
   2-core machine 4 ranks oversubscribe the cores and MPICH's busy polling makes every
   exchange wait for a time slice, so those figures are low and noisy; 2 ranks do not.

This machine's speed drifts, so the work is done in rounds: each round opens
``Pool(nodes=2)``, waits for both nodes, runs every case once as a warm-up, then times 5
launches of each kind and 3 runs of each bandwidth case, interleaved (the order shifted by
one case per repeat). Medians over all rounds are reported. Run ``python
benchmarks/mpi.py`` (3 rounds, under a minute on 2 cores; ``--quick`` for one short round,
``--json PATH`` for the raw numbers). Progress goes to stderr; stdout is the report.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mpi4py
import numpy as np
from machine import OtherLoad

import cloudmap

MPIEXEC = Path(sys.executable).parent / "mpiexec"  # the venv's, as the nodes use
NODES = 2
RANKS_PER_NODE = 2
RANKS = NODES * RANKS_PER_NODE
LAUNCHES = 5  # timed launches of each kind per round (2 with --quick)
BANDWIDTH_RUNS = 3  # timed runs of each bandwidth case per round (1 with --quick)
#: (array bytes, Allreduce calls timed); about half a second each on 2 cores.
PLAN = [(1 << 20, 100), (16 << 20, 20)]
TARGET_OVERHEAD = 0.3  # seconds pool.mpi may add to a raw mpiexec launch
LEVEL = 0.10  # bandwidths within 10 % count as level


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- what the ranks run -----------------------------------------------------------------


def rank_of(comm: Any) -> int:
    return int(comm.rank)


def allreduce_seconds(comm: Any, plan: list[tuple[int, int]]) -> list[float]:
    """Seconds per ``Allreduce`` for each (bytes, calls) of ``plan``: the slowest rank's."""
    import time

    import numpy as np
    from mpi4py import MPI

    seconds = []
    for nbytes, calls in plan:
        send = np.ones(nbytes // 8)
        receive = np.empty_like(send)
        comm.Allreduce(send, receive, op=MPI.SUM)  # warm-up: buffers, connections
        comm.Barrier()
        started = time.perf_counter()
        for _ in range(calls):
            comm.Allreduce(send, receive, op=MPI.SUM)
        took = comm.allreduce(time.perf_counter() - started, op=MPI.MAX)
        assert receive[0] == comm.size
        seconds.append(took / calls)
    return seconds


SCRIPT = f"""\
from __future__ import annotations

import json
import sys

from mpi4py import MPI


{inspect.getsource(allreduce_seconds)}

if __name__ == "__main__":
    seconds = allreduce_seconds(MPI.COMM_WORLD, json.loads(sys.argv[1]))
    if MPI.COMM_WORLD.rank == 0:
        print(json.dumps(seconds))
"""

BARRIER = "from mpi4py import MPI; MPI.COMM_WORLD.Barrier()"


# -- the cases ----------------------------------------------------------------------------


def mpiexec(ranks: int, *program: str) -> str:
    argv = [str(MPIEXEC), "-launcher", "fork", "-n", str(ranks), *program]
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(argv)} exited with {done.returncode}:\n{done.stderr}")
    return done.stdout


def launch_cases(pool: cloudmap.Pool) -> dict[str, Callable[[], None]]:
    def pool_python() -> None:
        assert pool.mpi(rank_of, nodes=NODES, ranks_per_node=RANKS_PER_NODE) == [0, 1, 2, 3]

    def pool_command() -> None:
        pool.mpi_command("true", nodes=NODES, ranks_per_node=RANKS_PER_NODE)

    def raw_python() -> None:
        mpiexec(RANKS, sys.executable, "-c", BARRIER)

    def raw_true() -> None:
        mpiexec(RANKS, "true")

    return {
        "pool.mpi": pool_python,
        "raw python": raw_python,
        "pool.mpi_command": pool_command,
        "raw true": raw_true,
    }


def bandwidth_cases(pool: cloudmap.Pool, script: Path) -> dict[str, Callable[[], list[float]]]:
    cases: dict[str, Callable[[], list[float]]] = {}
    for per_node in (RANKS_PER_NODE, 1):
        ranks = NODES * per_node
        cases[f"pool {ranks}"] = lambda per_node=per_node: pool.mpi(
            allreduce_seconds, PLAN, nodes=NODES, ranks_per_node=per_node, root_only=True
        )
        cases[f"raw {ranks}"] = lambda ranks=ranks: json.loads(
            mpiexec(ranks, sys.executable, str(script), json.dumps(PLAN))
        )
    return cases


def timed(action: Callable[[], Any]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def shifted(names: list[str], by: int) -> list[str]:
    by %= len(names)
    return names[by:] + names[:by]


def one_round(
    number: int, script: Path, launches: int, bandwidth_runs: int, raw: dict[str, list[float]]
) -> None:
    with cloudmap.Pool(nodes=NODES) as pool:
        pool.wait_for_nodes()
        launch = launch_cases(pool)
        bandwidth = bandwidth_cases(pool, script)
        for action in [*launch.values(), *bandwidth.values()]:
            action()  # warm-up: imports in the page cache, the pool's first lease
        for repeat in range(launches):
            for name in shifted(list(launch), repeat):
                raw.setdefault(name, []).append(timed(launch[name]))
        log("  launch: " + ", ".join(f"{n} {statistics.median(raw[n]):.3f} s" for n in launch))
        for repeat in range(bandwidth_runs):
            for name in shifted(list(bandwidth), number + repeat):
                for (nbytes, _), seconds in zip(PLAN, bandwidth[name](), strict=True):
                    raw.setdefault(f"{name} {nbytes >> 20}MiB", []).append(seconds)
        log("  allreduce done")


# -- report -------------------------------------------------------------------------------


def mpich_version() -> str:
    out = subprocess.run([str(MPIEXEC.parent / "mpichversion")], capture_output=True, text=True)
    first = out.stdout.splitlines()[0] if out.stdout else "MPICH ?"
    return first.split(":", 1)[-1].strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one round instead of three")
    parser.add_argument("--json", type=Path, help="also write the raw numbers here")
    args = parser.parse_args()
    rounds, launches, runs = (1, 2, 1) if args.quick else (3, LAUNCHES, BANDWIDTH_RUNS)
    raw: dict[str, list[float]] = {}
    load = OtherLoad()
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "allreduce.py"
        script.write_text(SCRIPT)
        for number in range(1, rounds + 1):
            log(f"round {number}/{rounds}")
            one_round(number, script, launches, runs, raw)
    other = load.share()

    def med(name: str) -> float:
        return statistics.median(raw[name])

    print(
        f"Machine: {os.cpu_count()} cores, {platform.platform()}, Python "
        f"{platform.python_version()}; cloudmap {cloudmap.__version__}, MPICH "
        f"{mpich_version()}, mpi4py {mpi4py.__version__}, numpy {np.__version__}. "
        f"`Pool(nodes={NODES})`, hydra's fork launcher on both sides. {rounds} round(s); "
        f"other processes used {other:.0%} of the CPUs during the run.\n"
    )
    print(f"## Launch overhead ({NODES} nodes x {RANKS_PER_NODE} ranks = {RANKS} ranks)\n")
    print(f"Wall time in the driver, median of {rounds * launches} launches each.\n")
    print("| run | median s | min-max s |")
    print("|---|---:|---:|")
    rows = [
        ("pool.mpi", "`pool.mpi(rank_of, nodes=2, ranks_per_node=2)`"),
        ("raw python", f'`mpiexec -n {RANKS} python -c "...Barrier()"`'),
        ("pool.mpi_command", '`pool.mpi_command("true", nodes=2, ranks_per_node=2)`'),
        ("raw true", f"`mpiexec -n {RANKS} true`"),
    ]
    for name, label in rows:
        print(f"| {label} | {med(name):.3f} | {min(raw[name]):.3f}-{max(raw[name]):.3f} |")
    python_overhead = med("pool.mpi") - med("raw python")
    command_overhead = med("pool.mpi_command") - med("raw true")
    print(
        f"\nAdded by the pool: {python_overhead:+.3f} s in Python mode, "
        f"{command_overhead:+.3f} s in command mode.\n"
    )
    print("## Allreduce bandwidth (float64 arrays, GB/s = array bytes / seconds per call)\n")
    print(
        f"Median of {rounds * runs} runs each; a run's figure is the mean over its "
        f"{' and '.join(str(calls) for _, calls in PLAN)} timed calls.\n"
    )
    print("| ranks | array | pool.mpi GB/s | raw mpiexec GB/s | pool / raw |")
    print("|---|---:|---:|---:|---:|")
    ratios = []
    for per_node in (RANKS_PER_NODE, 1):
        ranks = NODES * per_node
        for nbytes, _ in PLAN:
            size = f"{nbytes >> 20}MiB"
            pool_gbs = nbytes / med(f"pool {ranks} {size}") / 1e9
            raw_gbs = nbytes / med(f"raw {ranks} {size}") / 1e9
            ratios.append(pool_gbs / raw_gbs)
            print(
                f"| {NODES} x {per_node} | {nbytes >> 20} MiB | {pool_gbs:.2f} | {raw_gbs:.2f} "
                f"| {pool_gbs / raw_gbs:.2f}x |"
            )
    print()
    verdict = "met" if python_overhead <= TARGET_OVERHEAD else "MISSED"
    print(
        f"Target: pool.mpi launch <= raw mpiexec + {TARGET_OVERHEAD} s: "
        f"{python_overhead:+.3f} s, {verdict}"
    )
    worst = max(ratios, key=lambda r: abs(r - 1))
    verdict = "met" if abs(worst - 1) <= LEVEL else "MISSED"
    print(f"Target: allreduce bandwidth level with raw mpiexec (within {LEVEL:.0%}): "
          f"furthest {worst:.2f}x, {verdict}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(raw, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
