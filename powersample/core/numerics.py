"""Log-space numerics shared by samplers and engines: normalization, log-sum-exp, the proposal q from log p, entropy,
and the check of drafted tokens. The draws themselves live in core.draws and are re-exported here. Numpy only;
shapes are (..., V) over a vocabulary of V tokens."""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from powersample.core.draws import cumulative, draw, draw_from_cdf  # noqa: F401 - the engines' token draws, from here
from powersample.core.types import Proposal, Ranked


def proposal_logprobs(base_logp: np.ndarray, proposal: Proposal) -> np.ndarray:
    """log q from log p over the vocabulary (last axis): temperature, then top-k, then top-p, renormalized.

    Removed tokens get -inf; the log of zero is never taken. Shapes: (..., V) -> (..., V).
    """
    if proposal.is_base:
        return base_logp
    logq = log_normalize(base_logp / proposal.temperature)
    if proposal.top_k and proposal.top_k < logq.shape[-1]:
        logq = log_normalize(_keep_top_k(logq, proposal.top_k))
    if proposal.top_p < 1.0:
        logq = log_normalize(_keep_top_p(logq, proposal.top_p))
    return logq


def top_alternatives(base_logp: np.ndarray, k: int) -> tuple[tuple[int, float], ...]:
    """The k likeliest ids of a 1-D log p row with their log p, likeliest first, ties broken by the smaller id.

    Sorts only the ids at or above the k-th largest value (a partition finds it), so a row of V = 50k costs about a
    pass over it, not a full sort; every id tied with the k-th value is among those, so ties still go by id."""
    if k <= 0:
        return ()
    k = min(k, len(base_logp))
    kth = np.partition(base_logp, len(base_logp) - k)[len(base_logp) - k]  # the k-th largest log p
    candidates = np.flatnonzero(base_logp >= kth)
    order = candidates[np.lexsort((candidates, -base_logp[candidates]))][:k]
    return tuple((int(t), float(base_logp[t])) for t in order)


def ranked_rows(rows: Iterable[tuple[np.ndarray, int]], n: int) -> tuple[Ranked, ...]:
    """`Ranking.rank` from (base log p row (V,), the token drawn from it) pairs: each token's log p and its row's n
    likeliest tokens."""
    return tuple(Ranked(float(logp[token]), top_alternatives(logp, n)) for logp, token in rows)


def log_normalize(logits: np.ndarray) -> np.ndarray:
    """logits - logsumexp(logits) along the last axis; -inf entries stay -inf."""
    peak = np.max(logits, axis=-1, keepdims=True)
    total = np.log(np.sum(np.exp(logits - peak), axis=-1, keepdims=True))
    return logits - peak - total


def logsumexp(x: np.ndarray | Sequence[float], axis: int = -1) -> np.ndarray:
    """log sum exp(x) along `axis` (a float for 1-D input); -inf where every entry is -inf."""
    x = np.asarray(x, dtype=float)
    peak = np.max(x, axis=axis, keepdims=True)
    shift = np.where(np.isfinite(peak), peak, 0.0)
    with np.errstate(divide="ignore"):
        total = np.log(np.sum(np.exp(x - shift), axis=axis, keepdims=True))
    return np.squeeze(total + shift, axis=axis)


def _keep_top_k(logq: np.ndarray, k: int) -> np.ndarray:
    drop = np.argpartition(-logq, k - 1, axis=-1)[..., k:]
    out = logq.copy()
    np.put_along_axis(out, drop, -np.inf, axis=-1)
    return out


def _keep_top_p(logq: np.ndarray, top_p: float) -> np.ndarray:
    # Keep the smallest set of likeliest tokens whose mass reaches top_p (the first token always stays).
    order = np.argsort(-logq, axis=-1, kind="stable")
    probs = np.exp(np.take_along_axis(logq, order, axis=-1))
    mass_before = np.cumsum(probs, axis=-1) - probs
    drop_sorted = mass_before >= top_p
    out = logq.copy()
    np.put_along_axis(out, order, np.where(drop_sorted, -np.inf, np.take_along_axis(logq, order, axis=-1)), axis=-1)
    return out


def verify_draft(logq: np.ndarray, drafted: int, rng: np.random.Generator) -> int:
    """One token from q (1-D log q) given a drafted guess d: speculative sampling with a deterministic draft,
    coupled to plain sampling.

    The token is `draw(logq, rng)`, the very draw a request without a draft makes, with the same one uniform; d is
    kept when the draw equals it. So the token is exactly q-distributed whatever d is, d is kept with probability

        P(token = d) = q(d),

    as with the textbook rule (keep d with probability q(d), else draw from q without d, renormalized), which it
    equals in law; and, unlike that rule, a seed draws the same tokens with or without drafts, whatever they are.
    """
    del drafted  # the guess decides only whether the engine's walk goes on (engine.verify_step), never the token
    return draw(logq, rng)


def entropy(base_logp: np.ndarray) -> np.ndarray:
    """-Sum_x p log p over the last axis, in nats, >= 0 (0 log 0 = 0). Shapes: (..., V) -> (...)."""
    return np.maximum(-negative_entropy(base_logp), 0.0)  # rounding can leave -1e-17 for a one-hot row


def negative_entropy(base_logp: np.ndarray) -> np.ndarray:
    """Sum_x p log p over the last axis, with 0 log 0 = 0. Shapes: (..., V) -> (...)."""
    p = np.exp(base_logp)
    return np.sum(np.where(p > 0, p * np.where(p > 0, base_logp, 0.0), 0.0), axis=-1)
