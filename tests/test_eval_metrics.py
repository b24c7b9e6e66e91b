"""Metrics of the eval report: the unbiased pass@k against brute-force enumeration, the Wilson interval, Eq. 12."""

from __future__ import annotations

import itertools
import math

import pytest

from powersample.eval import metrics


def brute_pass_at_k(outcomes: list[bool], k: int) -> float:
    """The fraction of all k-subsets of the samples that hold at least one correct sample."""
    subsets = list(itertools.combinations(outcomes, k))
    return sum(any(s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", range(1, 9))
def test_pass_at_k_matches_enumeration(n):
    for c in range(n + 1):
        outcomes = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            assert metrics.pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(outcomes, k), abs=1e-12)


def test_pass_at_k_edges_and_large_n():
    assert metrics.pass_at_k(10, 0, 5) == 0.0
    assert metrics.pass_at_k(10, 10, 1) == 1.0
    assert metrics.pass_at_k(10, 3, 1) == pytest.approx(0.3)
    want = 1 - math.comb(180, 50) / math.comb(200, 50)  # no overflow for large n
    assert metrics.pass_at_k(200, 20, 50) == pytest.approx(want, rel=1e-12)
    with pytest.raises(ValueError):
        metrics.pass_at_k(3, 4, 1)
    with pytest.raises(ValueError):
        metrics.pass_at_k(3, 1, 4)


def test_mean_pass_at_k_skips_problems_with_too_few_samples():
    assert metrics.mean_pass_at_k([(4, 1), (4, 0), (2, 2)], 1) == pytest.approx((0.25 + 0 + 1) / 3)
    assert metrics.mean_pass_at_k([(4, 1), (2, 2)], 3) == pytest.approx(metrics.pass_at_k(4, 1, 3))
    assert metrics.mean_pass_at_k([(2, 1)], 3) is None


def test_wilson_interval():
    low, high = metrics.wilson_interval(81, 263)  # a textbook example: 0.2553 .. 0.3662
    assert (low, high) == (pytest.approx(0.2553, abs=1e-4), pytest.approx(0.3662, abs=1e-4))
    assert metrics.wilson_interval(0, 10)[0] == 0.0 and 0 < metrics.wilson_interval(0, 10)[1] < 0.35
    assert metrics.wilson_interval(10, 10)[1] == pytest.approx(1.0) and metrics.wilson_interval(10, 10)[0] > 0.65
    assert metrics.wilson_interval(0, 0) == (0.0, 1.0)


def test_eq12_estimate():
    # N_MCMC T^2 / (4B) + T: the paper's T = 3072, B = 192, N_MCMC = 10
    assert metrics.estimated_tokens(3072, 192, 10, mcmc=True) == pytest.approx(10 * 3072**2 / (4 * 192) + 3072)
    assert metrics.estimated_tokens(3072, 192, 10, mcmc=False) == 3072


def test_mean_and_per_token():
    assert metrics.mean([1.0, None, 3.0]) == 2.0 and metrics.mean([None]) is None
    assert metrics.per_token(-6.0, 3) == -2.0 and metrics.per_token(0.0, 0) is None
