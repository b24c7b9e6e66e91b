"""Log-space numerics shared by samplers and engines: normalization, log-sum-exp, the proposal q from log p,
draws by inverse CDF, and entropy. Numpy only; shapes are (..., V) over a vocabulary of V tokens."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from powersample.core.types import Proposal


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
    """The k likeliest ids of a 1-D log p row with their log p, likeliest first, ties broken by the smaller id."""
    if k <= 0:
        return ()
    order = np.lexsort((np.arange(len(base_logp)), -base_logp))[:k]
    return tuple((int(t), float(base_logp[t])) for t in order)


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


def draw(logq: np.ndarray, rng: np.random.Generator) -> int:
    """One token id from exp(logq) (1-D) by inverse CDF; tokens with q = 0 have zero width and are never drawn."""
    cdf = np.cumsum(np.exp(logq - np.max(logq)))
    u = rng.random() * cdf[-1]
    token = int(np.searchsorted(cdf, u, side="right"))
    if token == len(cdf):  # u rounded up to the total: take the last token with q > 0
        token = int(np.flatnonzero(np.isfinite(logq))[-1])
    return token


def verify_draft(logq: np.ndarray, drafted: int, rng: np.random.Generator) -> int:
    """One token from q (1-D log q) given a drafted guess d: speculative sampling with a deterministic draft.

    d is kept with probability q(d); otherwise the token is drawn from q with d removed and renormalized. So the
    token is exactly q-distributed, whatever d is:

        P(d) = q(d),   P(v) = (1 - q(d)) * q(v) / (1 - q(d)) = q(v)  for v != d.

    One uniform decides, and a rejection draws once more, both from `rng`.
    """
    if rng.random() < math.exp(logq[drafted]):
        return drafted
    residual = logq.copy()
    residual[drafted] = -np.inf
    if not np.isfinite(residual).any():  # q(d) = 1 up to rounding: nothing else can be drawn
        return drafted
    return draw(residual, rng)


def negative_entropy(base_logp: np.ndarray) -> np.ndarray:
    """Sum_x p log p over the last axis, with 0 log 0 = 0. Shapes: (..., V) -> (...)."""
    p = np.exp(base_logp)
    return np.sum(np.where(p > 0, p * np.where(p > 0, base_logp, 0.0), 0.0), axis=-1)

