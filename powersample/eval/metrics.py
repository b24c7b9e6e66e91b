"""Every number the report shows, as small pure functions; and confidence (Eq. 13), which asks the backend."""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np

from powersample.api import SampleRecord
from powersample.backends import Backend
from powersample.backends.base import Confidence, capability
from powersample.samplers.power import eq12_tokens

Z95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson_interval(successes: int, trials: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion; (0, 1) with no trials.

    Unlike the normal interval it stays inside [0, 1] and is sensible at 0/n and n/n, which matters for the small
    per-method samples an evaluation run produces.
    """
    if trials <= 0:
        return 0.0, 1.0
    p = successes / trials
    denom = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al., 2021, the HumanEval paper):

        pass@k = 1 - C(n - c, k) / C(n, k)

    computed as a running product so it never overflows.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def mean_pass_at_k(counts: Iterable[tuple[int, int]], k: int) -> float | None:
    """Mean pass@k over problems given (n, c) per problem; problems with fewer than k samples are left out."""
    values = [pass_at_k(n, c, k) for n, c in counts if n >= k]
    return sum(values) / len(values) if values else None


def estimated_tokens(max_new_tokens: int, block_size: int, mcmc_steps: int, mcmc: bool) -> float:
    """Tokens sampled per sample: the paper's Eq. 12 estimate N_MCMC * T^2 / (4B) + T for an MCMC method (its one
    definition, samplers.power.eq12_tokens), just T without MCMC."""
    return eq12_tokens(max_new_tokens, block_size, mcmc_steps) if mcmc else float(max_new_tokens)


def mean(values: Sequence[float | None]) -> float | None:
    """Mean of the values that are not None (None when there are none)."""
    present = [v for v in values if v is not None]
    return math.fsum(present) / len(present) if present else None


def per_token(logp: float, length: int) -> float | None:
    """Log-likelihood per token (nats), the quantity of the paper's Fig. 4; None for an empty completion."""
    return logp / length if length else None


def percentiles(values: Sequence[float], qs: Sequence[float]) -> list[float]:
    """The qs-th percentiles (0 to 100) of values, interpolated linearly between order statistics (numpy's default
    rule); the values must not be empty."""
    return [float(v) for v in np.percentile(np.asarray(values, dtype=float), qs)]


def confidence(backend: Backend, prompt: str, chat: bool, sampled: SampleRecord) -> float | None:
    """Eq. 13: the mean over generated positions of sum_x p log p of the base next-token distribution.

    None when the backend cannot say (it has no `confidence` method) or nothing was generated.
    """
    scorer = capability(backend, Confidence)
    if scorer is None or not sampled.tokens:
        return None
    return mean(scorer.confidence(backend.encode(prompt, chat), sampled.tokens))
