"""Paired comparison of two methods graded on the same (problem, seed) items: the accuracy difference with a
bootstrap interval that resamples problems, and the exact McNemar test.

The seeds of one problem are correlated (an easy problem is easy for every seed), so the bootstrap resamples
problems with all their seeds together (a cluster bootstrap). McNemar's test treats the pairs as independent; with
one seed per problem both agree in spirit, with several the bootstrap is the honest one. Pure functions, numpy only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Hashable, Mapping

import numpy as np

Item = tuple[Hashable, Hashable]  # (cluster, item within it): (problem id, seed)
RESAMPLES = 10_000  # bootstrap resamples: the interval's ends move by < 0.005 between seeds at n in the hundreds
SEED = 0  # fixed, so the same runs always give the same report
_CHUNK = 2_000_000  # cluster draws held at once (16 MB of int64)


@dataclass(frozen=True)
class Paired:
    """Method B against method A on the items both graded."""

    n: int  # paired items
    clusters: int  # distinct problems among them
    accuracy_a: float
    accuracy_b: float
    interval: tuple[float, float]  # 95% paired cluster-bootstrap interval of accuracy_b - accuracy_a
    a_only: int  # discordant: A right, B wrong (McNemar's b)
    b_only: int  # discordant: A wrong, B right (McNemar's c)
    p_value: float  # exact McNemar, two-sided, pairs taken as independent

    @property
    def difference(self) -> float:
        """Accuracy of B minus accuracy of A."""
        return self.accuracy_b - self.accuracy_a


def compare(
    a: Mapping[Item, bool], b: Mapping[Item, bool], resamples: int = RESAMPLES, seed: int = SEED
) -> Paired | None:
    """B against A over the items both have; None when they share none."""
    items = sorted(set(a) & set(b), key=repr)
    if not items:
        return None
    right_a = np.array([a[i] for i in items], dtype=np.int64)  # (n,)
    right_b = np.array([b[i] for i in items], dtype=np.int64)  # (n,)
    _, clusters = np.unique([repr(i[0]) for i in items], return_inverse=True)  # (n,) cluster index
    a_only, b_only = int(np.sum(right_a > right_b)), int(np.sum(right_b > right_a))
    interval = cluster_bootstrap(clusters, right_b - right_a, resamples, np.random.default_rng(seed))
    return Paired(
        len(items),
        int(clusters.max()) + 1,
        float(right_a.mean()),
        float(right_b.mean()),
        interval,
        a_only,
        b_only,
        mcnemar_exact(a_only, b_only),
    )


def cluster_bootstrap(
    clusters: np.ndarray, values: np.ndarray, resamples: int, rng: np.random.Generator
) -> tuple[float, float]:
    """95% percentile interval of the mean of `values`, resampling whole clusters with replacement.

    `clusters` (n,) holds each value's cluster index 0..K-1. A resample draws K clusters and takes the mean over
    all their values (a ratio of sums, so bigger clusters weigh more, as they do in the mean itself).
    """
    sums = np.bincount(clusters, weights=values)  # (K,)
    sizes = np.bincount(clusters).astype(float)  # (K,)
    k = len(sums)
    per_chunk = max(1, _CHUNK // k)
    means = []
    for start in range(0, resamples, per_chunk):
        picks = rng.integers(0, k, size=(min(per_chunk, resamples - start), k))  # (R, K) clusters drawn
        means.append(sums[picks].sum(axis=1) / sizes[picks].sum(axis=1))
    low, high = np.quantile(np.concatenate(means), [0.025, 0.975])
    return float(low), float(high)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: under H0 the discordant pairs split as X ~ Bin(b + c, 1/2), so

        p = min(1, 2 P(X <= min(b, c)))

    with the binomial tail summed in log space (no overflow at any count); 1 with no discordant pairs.
    """
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got b={b}, c={c}")
    n, low = b + c, min(b, c)
    if n == 0:
        return 1.0
    ks = np.arange(1, low + 1)
    log_comb = np.concatenate([[0.0], np.cumsum(np.log(n - ks + 1) - np.log(ks))])  # log C(n, k), k = 0..low
    top = log_comb.max()
    log_tail = top + math.log(np.exp(log_comb - top).sum()) - n * math.log(2)  # log P(X <= low)
    return min(1.0, 2 * math.exp(log_tail))
