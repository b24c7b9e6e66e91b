"""Every random choice of a sampler or an engine, as a few named primitives.

Randomness is an argument (a seeded numpy Generator), and these are the only places it is read:

    draw / draw_with_cdf   a token (an index) from log weights, by inverse CDF     (engines, MTM's pick, SMC's choice)
    uniform_index          i uniform on {0, ..., n-1}                              (power's cut)
    log_uniform            log u for u uniform on (0, 1]                           (the MH test log u <= log r)
    systematic             N ancestors from one uniform and N evenly spaced points (SMC's resampling)
    spawn                  n child generators seeded from this one                 (tuple steps' members)

Each numpy path is the code the samplers have always run, so a seed gives the same samples.

Tracing. `rng` may instead be any object with the methods of `Source` (below). Each primitive then hands the choice,
by the same name, to that object, which may return any outcome it likes. The test suite's tracer
(tests/support/tracing.py) does this to run a sampler's real program once per path of its choices. This is how it
enumerates the exact law of the output. Nothing else in the package knows about it.
"""

from __future__ import annotations

import bisect
import math
from typing import Protocol, Sequence

import numpy as np


class Source(Protocol):
    """A source of choices other than a numpy Generator (the test suite's tracer): one method per primitive."""

    def token(self, cdf: Sequence[float] | np.ndarray) -> int:
        """The index whose interval of the increasing, unnormalized `cdf` holds a uniform point of [0, cdf[-1])."""
        ...

    def uniform_index(self, n: int) -> int:
        """i uniform on {0, ..., n-1}."""
        ...

    def log_uniform(self) -> float:
        """log u for u uniform on (0, 1]. Callers only add floats to it and compare it with floats. A tracer may
        therefore return a symbolic value that forks at each comparison."""
        ...

    def systematic(self, probs: np.ndarray) -> np.ndarray:
        """What `systematic_picks(probs, u)` gives for u uniform on [0, 1). (N,)"""
        ...

    def spawn(self, n: int) -> list[Source]:
        """n sources whose choices are independent of this one's and of each other's."""
        ...


Rng = np.random.Generator | Source


def draw(logq: np.ndarray, rng: Rng) -> int:
    """One index from exp(logq) (1-D) by inverse CDF. An index with q = 0 has zero width and is never drawn."""
    return draw_with_cdf(cumulative(logq), logq, rng)


def draw_with_cdf(cdf: Sequence[float] | np.ndarray, logq: Sequence[float] | np.ndarray, rng: Rng) -> int:
    """`draw` with the CDF already computed (`cumulative(logq)`, an engine's cached table)."""
    if isinstance(rng, np.random.Generator):
        return draw_from_cdf(cdf, rng.random(), logq)
    return rng.token(cdf)


def uniform_index(n: int, rng: Rng) -> int:
    """i uniform on {0, ..., n-1}."""
    if isinstance(rng, np.random.Generator):
        return int(rng.integers(n))
    return rng.uniform_index(n)


def log_uniform(rng: Rng) -> float:
    """log u for u uniform on (0, 1], so that it is finite."""
    if isinstance(rng, np.random.Generator):
        return math.log(1.0 - rng.random())
    return rng.log_uniform()


def systematic(probs: np.ndarray, rng: Rng) -> np.ndarray:
    """Systematic resampling of N items with these probabilities (summing to 1). One uniform u gives N evenly
    spaced points (u + j) / N, and each point picks the item whose interval of the CDF holds it. (N,) indices."""
    if isinstance(rng, np.random.Generator):
        return systematic_picks(probs, rng.random())
    return np.asarray(rng.systematic(probs))


def systematic_picks(probs: np.ndarray, u: float) -> np.ndarray:
    """The N items that the points (u + j) / N, j = 0..N-1, pick from the CDF of `probs`. (N,)"""
    n = len(probs)
    points = (u + np.arange(n)) / n  # (N,) in [0, 1)
    return np.minimum(np.searchsorted(np.cumsum(probs), points, side="right"), n - 1)


def spawn(rng: Rng, n: int) -> list[Rng]:
    """n generators seeded from `rng`, one per member of a tuple step. The members' draws then do not depend on the
    order in which the engine serves them."""
    if isinstance(rng, np.random.Generator):
        return [np.random.default_rng(int(s)) for s in rng.integers(2**63, size=n)]
    return list(rng.spawn(n))


def cumulative(logq: np.ndarray) -> np.ndarray:
    """The unnormalized CDF that `draw` inverts: cumsum(exp(logq - max)). (V,)"""
    return np.cumsum(np.exp(logq - np.max(logq)))


def draw_from_cdf(cdf: Sequence[float] | np.ndarray, u: float, logq: Sequence[float] | np.ndarray) -> int:
    """The token whose interval of `cdf` (from `cumulative`) holds u * total, for a uniform u in [0, 1)."""
    token = bisect.bisect_right(cdf, u * cdf[-1])  # the first token whose cumulative mass exceeds u * total
    if token == len(cdf):  # u * total rounded up to the total: take the last token with q > 0
        token = int(np.flatnonzero(np.isfinite(logq))[-1])
    return token
