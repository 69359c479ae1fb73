"""The demo job: a seeded Monte Carlo price of a European call option on a local pool.

``cloudmap demo`` (and ``make demo``) runs it. Each item simulates a block of terminal
prices with its own generator, so the estimate is the same for any number of nodes.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Option:
    """A European call under Black-Scholes: spot, strike, rate, volatility, years."""

    spot: float = 100.0
    strike: float = 105.0
    rate: float = 0.03
    volatility: float = 0.2
    maturity: float = 1.0

    def black_scholes(self) -> float:
        """The closed-form price, to check the Monte Carlo estimate against."""
        vol_t = self.volatility * math.sqrt(self.maturity)
        d1 = (math.log(self.spot / self.strike) + (self.rate + 0.5 * self.volatility**2)
              * self.maturity) / vol_t  # fmt: skip
        d2 = d1 - vol_t
        cdf = lambda x: 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))  # noqa: E731
        discounted = self.strike * math.exp(-self.rate * self.maturity)
        return self.spot * cdf(d1) - discounted * cdf(d2)


def payoff_block(
    block: int, rng: np.random.Generator, samples: int = 10_000, option: Option = Option()
) -> tuple[float, float, int]:
    """Simulate ``samples`` discounted payoffs; return their sum, sum of squares and count."""
    z = rng.standard_normal(samples)
    drift = (option.rate - 0.5 * option.volatility**2) * option.maturity
    terminal = option.spot * np.exp(drift + option.volatility * math.sqrt(option.maturity) * z)
    payoff = np.maximum(terminal - option.strike, 0.0) * math.exp(-option.rate * option.maturity)
    return float(payoff.sum()), float((payoff**2).sum()), samples


@dataclass(frozen=True)
class Estimate:
    price: float
    standard_error: float
    samples: int


def combine(blocks: list[tuple[float, float, int]]) -> Estimate:
    """Pool the blocks' sums into one estimate with its standard error."""
    total = sum(b[0] for b in blocks)
    squares = sum(b[1] for b in blocks)
    count = sum(b[2] for b in blocks)
    mean = total / count
    variance = max(squares / count - mean**2, 0.0)
    return Estimate(mean, math.sqrt(variance / count), count)


def run_demo(
    nodes: int = 2, slots_per_node: int = 1, samples: int = 2_000_000, seed: int = 7
) -> Estimate:
    """Start a local pool, price the option, print the result and the pool's nodes."""
    from functools import partial

    from .pool import Pool

    block = 10_000
    blocks = max(1, math.ceil(samples / block))
    started = time.perf_counter()
    with Pool(nodes=nodes, slots_per_node=slots_per_node) as pool:
        ready = time.perf_counter()
        results = pool.map(partial(payoff_block, samples=block), range(blocks), seed=seed)
        elapsed = time.perf_counter() - ready
        estimate = combine(results)
        exact = Option().black_scholes()
        rate = estimate.samples / elapsed
        print(f"European call, {estimate.samples:,} samples on {pool!r}")
        print(f"  Monte Carlo price  {estimate.price:.4f} +/- {estimate.standard_error:.4f} (1 se)")
        print(f"  Black-Scholes      {exact:.4f}")
        print(f"  throughput         {rate:,.0f} samples/s ({blocks} items in {elapsed:.2f} s)")
        print(f"  pool start         {ready - started:.2f} s")
        print("  nodes:")
        for node in pool.nodes():
            kind = "dedicated" if node.dedicated else "spot"
            print(f"    {node.id:<8} {node.state!s:<8} {kind:<9} {node.slots} slot(s)")
    return estimate
