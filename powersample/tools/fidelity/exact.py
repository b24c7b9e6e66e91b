"""The exact law of p^alpha over an enumerable toy spec, and total-variation distance to it.

Nothing here samples a model: the law is computed over every sequence of at most T tokens (ToySpec.sequences),
in log space. The fidelity tool measures samplers against it, and the tests' exact laws (tests/exact_laws.py)
build on it.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Iterable

import numpy as np

from powersample.backends.toy import ToySpec
from powersample.errors import PowerSampleError

Law = dict[tuple[int, ...], float]  # sequence -> probability
MAX_SEQUENCES = 1_000_000  # refuse to enumerate more (an upper bound from the vocabulary and T)
FLOOR_REPS = 200  # simulated sets of S exact samples behind the TV floor


def check_enumerable(spec: ToySpec, max_new_tokens: int) -> None:
    """Fail fast when the sequences up to T may be too many to enumerate (a bound from the vocabulary)."""
    branching = len(spec.vocab) - 1  # EOS ends a sequence
    bound = sum(branching**k for k in range(max_new_tokens + 1))
    if bound > MAX_SEQUENCES:
        raise PowerSampleError(
            f"a vocabulary of {len(spec.vocab)} with T={max_new_tokens} may have {bound} "
            f"sequences, over {MAX_SEQUENCES} to enumerate; lower --max-new-tokens"
        )


def power_law(spec: ToySpec, alpha: float, max_new_tokens: int) -> Law:
    """The exact p^alpha over every sequence of at most T tokens, normalized in log space.

    Complete sequences (ending in EOS) count with their full probability, EOS-free ones of exactly T tokens
    with their prefix probability: the target of `power` (see samplers/power.py).
    """
    logp = spec.sequences(max_new_tokens)
    return normalize({s: alpha * lp for s, lp in logp.items()})


def normalize(logw: dict) -> dict:
    """Log weights to probabilities: exp(w - max), divided by their (fsum) total."""
    top = max(logw.values())
    z = math.fsum(math.exp(v - top) for v in logw.values())
    return {s: math.exp(v - top) / z for s, v in logw.items()}


def empirical_law(samples: Iterable[tuple[int, ...]]) -> Law:
    """The samples' frequencies."""
    counts: dict[tuple[int, ...], int] = defaultdict(int)
    for s in samples:
        counts[tuple(s)] += 1
    n = sum(counts.values())
    return {s: c / n for s, c in counts.items()}


def tv_distance(a: Law, b: Law) -> float:
    """Total variation: half the L1 distance, over the union of supports."""
    return 0.5 * math.fsum(abs(a.get(k, 0.0) - b.get(k, 0.0)) for k in a.keys() | b.keys())


def null_tvs(law: Law, n: int, seed: int, reps: int) -> np.ndarray:
    """TV(empirical, law) of `reps` simulated sets of n exact samples from law (multinomial). (reps,)"""
    probs = np.fromiter(law.values(), dtype=float)
    probs /= probs.sum()
    counts = np.random.default_rng(seed).multinomial(n, probs, size=reps)  # (reps, support)
    return 0.5 * np.abs(counts / n - probs).sum(axis=1)


def tv_floor(law: Law, n: int, seed: int = 0, reps: int = FLOOR_REPS) -> tuple[float, float]:
    """(mean, 95% quantile) of TV(empirical, law) for n exact samples from law, over `reps` simulated sets.

    The mean is what a perfect sampler scores on average; a TV under the quantile is within sampling noise.
    """
    tvs = null_tvs(law, n, seed, reps)
    return float(tvs.mean()), float(np.quantile(tvs, 0.95))
