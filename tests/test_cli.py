"""``cloudmap demo``: what ``make demo`` runs."""

from __future__ import annotations

import re
import subprocess
import sys


def test_demo_prints_the_estimate_throughput_and_nodes() -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "cloudmap", "demo", "--nodes", "2", "--samples", "1000000"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    out = completed.stdout
    price = re.search(r"Monte Carlo price\s+([\d.]+) \+/- ([\d.]+)", out)
    exact = re.search(r"Black-Scholes\s+([\d.]+)", out)
    assert price and exact, out
    estimate, error, reference = float(price[1]), float(price[2]), float(exact[1])
    assert abs(estimate - reference) < 5 * error
    assert "samples/s" in out
    assert "node-0" in out and "node-1" in out
