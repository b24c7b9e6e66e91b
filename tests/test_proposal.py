"""Proposal log-probs: temperature, top-k and top-p against direct formulas, and the inverse-CDF draw."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("hypothesis")

from hypothesis import given, settings
from hypothesis import strategies as st

from powersample.core.numerics import draw, proposal_logprobs
from powersample.core.types import Proposal

probs_strategy = st.lists(st.floats(0.0, 1.0), min_size=2, max_size=12).filter(lambda p: sum(p) > 1e-3)


def _logp(p):
    p = np.asarray(p, dtype=float) / np.sum(p)
    out = np.full(len(p), -np.inf)
    np.log(p, out=out, where=p > 0)
    return out, p


@given(probs_strategy, st.floats(0.05, 5.0))
def test_temperature_is_p_to_the_one_over_tau(p, tau):
    logp, p = _logp(p)
    q = np.exp(proposal_logprobs(logp, Proposal(tau)))
    want = p ** (1 / tau)  # 0 stays 0
    np.testing.assert_allclose(q, want / want.sum(), atol=1e-9)
    assert np.all(q[p == 0] == 0)


@given(probs_strategy, st.integers(1, 12))
def test_top_k_keeps_the_k_likeliest(p, k):
    logp, p = _logp(p)
    q = np.exp(proposal_logprobs(logp, Proposal(1.0, top_k=k)))
    kept = np.flatnonzero(q > 0)
    assert len(kept) <= k
    if kept.size:
        assert p[kept].min() >= np.sort(p)[::-1][min(k, len(p)) - 1] - 1e-12
    np.testing.assert_allclose(q.sum(), 1.0)


@given(probs_strategy, st.floats(0.01, 0.99))
def test_top_p_keeps_the_smallest_set_reaching_p(p, top_p):
    logp, p = _logp(p)
    q = np.exp(proposal_logprobs(logp, Proposal(1.0, top_p=top_p)))
    kept = q > 0
    assert p[kept].sum() >= top_p - 1e-9  # reaches top_p
    # minimal: dropping the least likely kept token falls below top_p
    assert p[kept].sum() - p[kept].min() < top_p + 1e-9
    np.testing.assert_allclose(q[kept], p[kept] / p[kept].sum(), rtol=1e-9)


def test_batched_rows_match_single_rows():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 50))
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    proposal = Proposal(0.5, top_k=10, top_p=0.9)
    batched = proposal_logprobs(logp, proposal)
    for row in range(4):
        np.testing.assert_array_equal(batched[row], proposal_logprobs(logp[row], proposal))


@settings(max_examples=30)
@given(probs_strategy)
def test_draw_never_picks_zero_probability(p):
    logp, p = _logp(p)
    rng = np.random.default_rng(0)
    draws = [draw(logp, rng) for _ in range(200)]
    assert all(p[d] > 0 for d in draws)


def test_draw_frequencies():
    logp, p = _logp([0.1, 0.0, 0.6, 0.3])
    rng = np.random.default_rng(3)
    counts = np.bincount([draw(logp, rng) for _ in range(20000)], minlength=4) / 20000
    np.testing.assert_allclose(counts, p, atol=0.015)
