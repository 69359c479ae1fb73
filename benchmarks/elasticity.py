"""How cloudmap copes with a pool that changes size: preemption, scale-up and scale-down.

1. Preemption: the same map on 1 dedicated + 3 spot nodes, undisturbed and with one node in
   four (25 %) preempted a third of the way through (without notice, and with a 2 s notice),
   the node not coming back. Target: at most 1.3x the undisturbed time, every result right.
   Items sleep instead of computing, so that each node is as independent as a machine of
   its own (on this 2-core VM, CPU-bound nodes would share two cores, and losing one would
   hide the lost capacity behind the others taking its CPU).
2. Scale-up reaction: a pool at zero nodes with autoscale; one task submitted; seconds until
   a new node runs it. The peer is Dask's ``LocalCluster.adapt`` doing the same.
3. Scale-down: seconds from the end of the work until the pool is back at zero nodes, with
   cloudmap's ``idle_timeout=3`` and Dask's adapt defaults (3 idle checks, 1 s apart).

Runs are interleaved in rounds (the VM's speed drifts) and medians reported. Run
``python benchmarks/elasticity.py`` (``--quick`` for one round, ``--json PATH`` for raw
numbers). Progress goes to stderr; stdout is the report.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

from distributed import Client, LocalCluster

import cloudmap

ITEM_SECONDS = 0.02
ITEMS = 600
NODES = 4  # 1 dedicated + 3 spot
PREEMPT_AT = 1 / 3
NOTICE = 2.0
IDLE_TIMEOUT = 3.0
TARGET_SLOWDOWN = 1.3


def sleepy(x: int, seconds: float = ITEM_SECONDS) -> int:
    time.sleep(seconds)
    return x * x


def started_at() -> float:
    return time.time()


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- 1. preemption ----------------------------------------------------------------------


def timed_map(pool: cloudmap.Pool, preempt_after: float | None, notice: float) -> float:
    """Seconds for the map; preempts one busy spot node ``preempt_after`` seconds in."""
    timer = None
    if preempt_after is not None:
        spot = next(n.id for n in pool.nodes() if n.spot)
        provider: Any = pool.provider
        timer = threading.Timer(preempt_after, provider.preempt, (spot,), {"notice": notice})
    started = time.perf_counter()
    if timer is not None:
        timer.start()
    results = pool.map(sleepy, range(ITEMS), progress=False)
    took = time.perf_counter() - started
    if timer is not None:
        timer.join()
    assert results == [x * x for x in range(ITEMS)], "wrong results"
    return took


def preemption_round(undisturbed_guess: float) -> dict[str, float]:
    times = {}
    for case, notice in (("undisturbed", None), ("preempted", 0.0), ("preempted, notice", NOTICE)):
        with cloudmap.Pool(nodes=1, spot_nodes=NODES - 1) as pool:
            pool.wait_for_nodes()
            pool.map(sleepy, range(NODES * 4), progress=False)  # batch sizes learnt, warm
            after = None if notice is None else undisturbed_guess * PREEMPT_AT
            times[case] = timed_map(pool, after, notice or 0.0)
            if notice is not None:
                assert len(pool.provider.preemptions) == 1  # type: ignore[union-attr]
        log(f"  {case}: {times[case]:.2f} s")
    return times


# -- 2 and 3. autoscale reaction ----------------------------------------------------------


def cloudmap_reaction() -> tuple[float, float]:
    policy = cloudmap.Autoscale(min_nodes=0, max_nodes=2, idle_timeout=IDLE_TIMEOUT)
    with cloudmap.Pool(autoscale=policy) as pool:
        time.sleep(1.5)  # the pool settles at zero nodes
        submitted = time.time()
        up = pool.submit(started_at).result() - submitted
        finished = time.time()
        while pool.nodes():
            time.sleep(0.05)
        down = time.time() - finished
    return up, down


def dask_reaction() -> tuple[float, float]:
    with LocalCluster(
        n_workers=0, threads_per_worker=1, processes=True, dashboard_address=None
    ) as cluster:
        cluster.adapt(minimum=0, maximum=2)
        with Client(cluster) as client:
            time.sleep(1.5)
            submitted = time.time()
            up = client.submit(started_at, pure=False).result() - submitted
            finished = time.time()
            while client.scheduler_info(n_workers=-1)["workers"]:
                time.sleep(0.05)
            down = time.time() - finished
    return up, down


# -- report -------------------------------------------------------------------------------


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one round instead of three")
    parser.add_argument("--json", type=Path, help="also write the raw numbers here")
    args = parser.parse_args()
    rounds = 1 if args.quick else 3
    raw: dict[str, list[float]] = {}

    def add(name: str, value: float) -> None:
        raw.setdefault(name, []).append(value)

    guess = ITEMS * ITEM_SECONDS / NODES
    for number in range(1, rounds + 1):
        log(f"round {number}/{rounds}: preemption")
        for case, seconds in preemption_round(guess).items():
            add(case, seconds)
        guess = median(raw["undisturbed"])
        log(f"round {number}/{rounds}: autoscale reaction")
        for peer, measure in (("cloudmap", cloudmap_reaction), ("dask adapt", dask_reaction)):
            up, down = measure()
            add(f"{peer} up", up)
            add(f"{peer} down", down)
            log(f"  {peer}: up {up:.2f} s, down {down:.2f} s")

    undisturbed = median(raw["undisturbed"])
    print("## Preemption\n")
    print(
        f"{ITEMS} items of {ITEM_SECONDS * 1000:.0f} ms on {NODES} nodes, one spot node "
        f"preempted {PREEMPT_AT:.0%} of the way; medians of {rounds} rounds.\n"
    )
    print("| run | seconds | vs undisturbed |")
    print("|---|---:|---:|")
    for case in ("undisturbed", "preempted", "preempted, notice"):
        seconds = median(raw[case])
        print(f"| {case} | {seconds:.2f} | {seconds / undisturbed:.2f}x |")
    print(
        f"\n(ideal with the node's capacity gone for the rest of the run: "
        f"{PREEMPT_AT + (1 - PREEMPT_AT) * NODES / (NODES - 1):.2f}x)\n"
    )
    print("## Autoscale from zero (max 2 nodes; medians)\n")
    print("| peer | work queued -> a new node runs it | idle -> back to 0 nodes |")
    print("|---|---:|---:|")
    for peer in ("cloudmap", "dask adapt"):
        print(
            f"| {peer} | {median(raw[peer + ' up']):.2f} s | {median(raw[peer + ' down']):.2f} s |"
        )
    print(
        f"\n(cloudmap: Autoscale(interval=1, idle_timeout={IDLE_TIMEOUT:g}); "
        "dask: adapt(minimum=0, maximum=2), defaults interval=1 s, wait_count=3)\n"
    )
    worst = max(median(raw["preempted"]), median(raw["preempted, notice"])) / undisturbed
    verdict = "met" if worst <= TARGET_SLOWDOWN else "MISSED"
    print(f"Target: preempted run <= {TARGET_SLOWDOWN}x undisturbed: {worst:.2f}x, {verdict}")
    if args.json:
        args.json.write_text(json.dumps(raw, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
