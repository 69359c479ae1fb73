"""What a live progress display costs a map, measured inside a real Jupyter kernel.

A map in a notebook shows cloudmap's progress widget by default. This measures what that
costs against no display at all and against tqdm's own notebook widget (what
``progress=True`` drew before, through ``tqdm.auto``), on the same pool in the same run:

- tiny: 100,000 no-op items (the engine reports after every batch: the worst case for a
  display's overhead per item);
- moderate: 2,000 items of 5 ms each.

The timing runs inside an ipykernel started with jupyter_client, so every widget update
really goes out on the kernel's IOPub channel as it does in JupyterLab (no browser draws
it; drawing happens in the browser's own process, not the kernel's). Each round times every
variant once, in an order shifted by one each round; medians over rounds are reported.
Targets: the widget adds at most 5 % to the moderate workload, and at most 50 ms to a map
at all (its fixed cost: the widget's models, its display, its last update). Run ``python
benchmarks/widgets.py`` (3 rounds, about a minute on 2 cores; ``--quick`` for one round).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import textwrap
from pathlib import Path

from jupyter_client.manager import start_new_kernel

ROOT = Path(__file__).resolve().parents[1]
TARGET_SHARE = 0.05  # of the moderate workload
TARGET_FIXED = 0.050  # seconds added to any map

SETUP = textwrap.dedent(
    f"""
    import sys, time
    sys.path.insert(0, {str(ROOT)!r})
    import cloudmap
    from cloudmap.progress import TqdmReporter
    pool = cloudmap.Pool(nodes=2, slots_per_node=1)
    pool.wait_for_nodes()

    def noop(x):
        return x

    def five_ms(x):
        time.sleep(0.005)
        return x

    WORKLOADS = {{"tiny": (noop, 100_000), "moderate": (five_ms, 2_000)}}
    DISPLAYS = {{
        "none": lambda: False,
        "cloudmap widget": lambda: cloudmap.ProgressWidget(),
        "tqdm.notebook": lambda: TqdmReporter(),
    }}

    def timed(workload, display):
        fn, n = WORKLOADS[workload]
        started = time.perf_counter()
        pool.map(fn, range(n), progress=DISPLAYS[display]())
        return time.perf_counter() - started

    for workload in WORKLOADS:  # warm up: imports, batch sizes
        timed(workload, "none")
    """
)


def run_in_kernel(client, code: str) -> str:  # type: ignore[no-untyped-def]
    """Execute code in the kernel; return what it printed (raise on an error)."""
    msg_id = client.execute(code)
    printed = []
    while True:
        message = client.get_iopub_msg(timeout=600)
        if message["parent_header"].get("msg_id") != msg_id:
            continue
        kind, content = message["msg_type"], message["content"]
        if kind == "stream" and content["name"] == "stdout":
            printed.append(content["text"])
        elif kind == "error":
            raise RuntimeError("\n".join(content["traceback"]))
        elif kind == "status" and content["execution_state"] == "idle":
            return "".join(printed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one round")
    parser.add_argument("--json", type=Path, help="write the raw timings here")
    args = parser.parse_args()
    rounds = 1 if args.quick else args.rounds
    workloads = ["tiny", "moderate"]
    displays = ["none", "cloudmap widget", "tqdm.notebook"]
    timings: dict[tuple[str, str], list[float]] = {(w, d): [] for w in workloads for d in displays}

    manager, client = start_new_kernel(kernel_name="python3")
    try:
        run_in_kernel(client, SETUP)
        for number in range(rounds):
            order = displays[number % 3 :] + displays[: number % 3]
            for workload in workloads:
                for display in order:
                    out = run_in_kernel(client, f"print(timed({workload!r}, {display!r}))")
                    timings[workload, display].append(float(out.strip()))
                    print(
                        f"round {number + 1} {workload} {display}: {out.strip()} s", file=sys.stderr
                    )
        run_in_kernel(client, "pool.close()")
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=False)

    print(f"Progress displays in a kernel: {platform.node()}, {rounds} round(s), medians")
    print(f"{'workload':<10} {'display':<16} {'seconds':>8} {'added':>9} {'vs none':>8}")
    verdicts = []
    for workload in workloads:
        base = statistics.median(timings[workload, "none"])
        for display in displays:
            median = statistics.median(timings[workload, display])
            added = median - base
            print(
                f"{workload:<10} {display:<16} {median:>8.3f} {added * 1000:>7.1f}ms "
                f"{median / base - 1:>+8.1%}"
            )
            if display == "cloudmap widget":
                verdicts.append(added <= TARGET_FIXED)
                if workload == "moderate":
                    verdicts.append(median / base - 1 <= TARGET_SHARE)
    verdict = "met" if all(verdicts) else "MISSED"
    print(
        f"targets: the widget adds at most {TARGET_FIXED * 1000:.0f} ms to any map and "
        f"{TARGET_SHARE:.0%} to the moderate one: {verdict}"
    )
    if args.json:
        args.json.write_text(json.dumps({f"{w}/{d}": v for (w, d), v in timings.items()}, indent=2))


if __name__ == "__main__":
    main()
