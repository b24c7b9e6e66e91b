"""Power sampling by rollouts (Ji, Tutunov, Zimmer & Bou Ammar, 2026, "Scalable Power Sampling", arXiv 2601.21590).

Target. The same p^alpha as `power`: sequences of up to T tokens, complete ones (ending in EOS) with their full
probability, EOS-free ones cut at T with their prefix probability. Its next-token law factorizes exactly as

    p^alpha(v | x_<t)  ∝  p(v | x_<t)^alpha * zeta(x_<t v),
    zeta(s) = sum over futures r of s of p(r | s)^alpha = E_{r ~ p(.|s)} [ p(r | s)^(alpha - 1) ],

where the futures r run until EOS or length T (zeta = 1 once s ends in EOS or has T tokens).

Algorithm (token level, the paper's Algorithm 1). At each position: one request reporting `alternatives=K` gives the
K likeliest next tokens v and their log p (it also draws one token, which is ignored but counted). Then ONE tuple step
draws M rollouts after each candidate (K*M requests in flight together; none for an EOS candidate or at the last
position, where zeta = 1), each until EOS, T, or H tokens. The chosen token is drawn among the K candidates with
probability ∝ p(v)^alpha * zeta_hat(v), where, with rollouts r_1..r_M drawn from the proposal q,

    log zeta_hat(v) = logmeanexp_m [ alpha * log p(r_m) - log q(r_m) ]        # paper Eq. 3; q = p gives p^(alpha-1)

(q is the base model here: power-rollout draws at tau = 1. With --top-k / --top-p the importance weight p^alpha/q
keeps the estimate consistent for the mass that q can reach, so the target is p^alpha restricted to it, as for
`power`). The candidate probabilities get the paper's jackknife bias correction (Eq. 5-6), treating the m-th rollout
of every candidate as the m-th observation:

    P_jk = M * P_hat - (M - 1) * mean_m P_hat^(-m),   clipped at 0 and renormalized (plain P_hat when M = 1),

where P_hat^(-m) is the candidate law with rollout m left out. All of this is done in log space up to P_hat.

Block variant (the paper's Appendix B; `block_size` B > 1; the default None = token level). At each block: L = K*M
blocks of up to B tokens (until EOS or T) are drawn from q in one tuple step; the K likeliest distinct ones (by log p,
ties by their ids) are the candidates, weighed by p(block)^alpha * zeta_hat(block) exactly as above, with M rollouts
each in the next tuple step. The paper draws candidate blocks at temperature 1/alpha; here they come from q (tau 1).

Approximations, and the exact limit. For M -> infinity (and, for blocks, L -> infinity) the law of each step is
p(v)^alpha * zeta_H(v) normalized over the K candidates, where zeta_H counts rollouts cut at H tokens with their
prefix probability; the output law is the product of these steps. It equals p^alpha exactly when the candidates are
every possible next token (block) and the horizon reaches T. Top-K restriction and a horizon H < T are the paper's
approximations; finite M adds the bias of a ratio of estimates (O(1/M), O(1/M^2) after the jackknife). Every token drawn
(candidates, blocks, rollouts) counts in tokens_generated; there are no MH proposals. A kept token's proposal_logq is
the log probability with which this sampler chose its token (block), on the block's first token, 0 on the others.

Defaults: K = 8 (`candidates`), M = 4 (`rollouts`), H = 0 = up to T (`rollout_horizon`), token level; see config.py.
Two public reimplementations of the paper use K = 8, M = 8, H = 192 (and B = 192 with 32-64 candidate blocks for
the block variant); we could not check these against the paper's text, so the defaults were left as they were.
"""

from __future__ import annotations

import math
from typing import Generator, Sequence

import numpy as np

from powersample.config import SamplerConfig
from powersample.core.draws import draw
from powersample.core.numerics import logsumexp
from powersample.core.types import Continuation, ExtendRequest, Report, Tokens
from powersample.errors import PowerSampleError
from powersample.samplers.chain import Chain
from powersample.samplers.driver import Program, Reply, Step, ask, ask_all

Weigh = Generator[Step, Reply, None]


def rollout_program(prompt: Tokens, config: SamplerConfig, chain: Chain, eos_ids: frozenset[int]) -> Program:
    """One sample: token (or block) steps until EOS or T tokens."""
    check_config(config)
    rngs = chain.spawn_rngs(config.candidates * config.rollouts)
    while len(chain.tokens) < config.max_new_tokens and not chain.complete(eos_ids):
        step = token_step if _block(config) == 1 else block_step
        yield from step(prompt, config, chain, eos_ids, rngs)
    return chain.result()


def rollout_work_units(config: SamplerConfig) -> int:
    """Backend requests one chain makes at most: per step, K alternatives (or L = K*M blocks) and K*M rollouts."""
    width, b = config.candidates * config.rollouts, _block(config)
    if b == 1:
        return config.max_new_tokens * (1 + width)
    return math.ceil(config.max_new_tokens / b) * 2 * width


def check_config(config: SamplerConfig) -> None:
    """Rollouts follow the base model (it draws at tau = 1); a proposal temperature is refused
    rather than silently ignored."""
    tau = config.proposal_temperature
    if tau is not None and tau != 1.0:
        raise PowerSampleError(
            f"power-rollout draws its rollouts from the base model (tau = 1); proposal_temperature={tau} is not used"
        )


def token_step(prompt: Tokens, config: SamplerConfig, chain: Chain, eos_ids: frozenset[int], rngs: list) -> Weigh:
    """The K likeliest next tokens, then one rollout step to weigh them, then one of them."""
    context = prompt + tuple(chain.tokens)
    probe = yield from ask(ExtendRequest(context, 1, chain.rng, slot=0, report=Report(alternatives=config.candidates)))
    chain.tokens_generated += len(probe.tokens)  # drawn, not kept
    units = [Continuation((t,), (lp,), (lp,)) for t, lp in probe.alternatives if lp > -math.inf]
    yield from weigh_and_choose(context, units, config, chain, eos_ids, rngs)


def block_step(prompt: Tokens, config: SamplerConfig, chain: Chain, eos_ids: frozenset[int], rngs: list) -> Weigh:
    """L = K*M candidate blocks drawn at once; the K likeliest distinct ones are weighed like tokens."""
    context = prompt + tuple(chain.tokens)
    size = min(_block(config), config.max_new_tokens - len(chain.tokens))
    pool = config.candidates * config.rollouts
    blocks = yield from ask_all(ExtendRequest(context, size, rngs[j], slot=j) for j in range(pool))
    chain.tokens_generated += sum(len(b.tokens) for b in blocks)
    candidates = likeliest_distinct(blocks, config.candidates)
    yield from weigh_and_choose(context, candidates, config, chain, eos_ids, rngs)


def likeliest_distinct(blocks: Sequence[Continuation], k: int) -> list[Continuation]:
    """The k likeliest distinct blocks by base log p, ties broken by their token ids."""
    distinct = {b.tokens: b for b in blocks}
    return sorted(distinct.values(), key=lambda b: (-math.fsum(b.base_logp), b.tokens))[:k]


def weigh_and_choose(
    context: Tokens,
    units: list[Continuation],
    config: SamplerConfig,
    chain: Chain,
    eos_ids: frozenset[int],
    rngs: list[np.random.Generator],
) -> Weigh:
    """Roll out after every candidate unit (one tuple step), then append one unit drawn ∝ p^alpha * zeta_hat."""
    requests, owners = rollout_requests(context, units, config, len(chain.tokens), eos_ids, rngs)
    rollouts = yield from ask_all(requests)
    chain.tokens_generated += sum(len(r.tokens) for r in rollouts)
    log_w = np.zeros((len(units), config.rollouts))  # (K, M); units without rollouts keep zeta = 1
    for (k, m), r in zip(owners, rollouts):
        log_w[k, m] = config.alpha * math.fsum(r.base_logp) - math.fsum(r.proposal_logq)  # log p^alpha / q
    log_head = np.array([config.alpha * math.fsum(u.base_logp) for u in units])  # (K,)
    probs = candidate_probs(log_head, log_w)
    i = draw(_log(probs), chain.rng)
    chosen = units[i]
    chosen_logq = (float(np.log(probs[i])),) + (0.0,) * (len(chosen.tokens) - 1)  # see the module docstring
    chain.append(Continuation(chosen.tokens, chosen.base_logp, chosen_logq))


def rollout_requests(
    context: Tokens, units: list[Continuation], config: SamplerConfig, done: int, eos_ids: frozenset[int], rngs: list
) -> tuple[list[ExtendRequest], list[tuple[int, int]]]:
    """M rollouts after each unit that neither ends in EOS nor reaches T; with (unit, rollout) of each request."""
    requests: list[ExtendRequest] = []
    owners: list[tuple[int, int]] = []
    for k, unit in enumerate(units):
        rest = config.max_new_tokens - done - len(unit.tokens)
        if unit.tokens[-1] in eos_ids or rest <= 0:
            continue
        n = min(config.rollout_horizon, rest) if config.rollout_horizon else rest
        for m in range(config.rollouts):
            requests.append(ExtendRequest(context + unit.tokens, n, rngs[len(requests)], slot=len(requests)))
            owners.append((k, m))
    return requests, owners


def candidate_probs(log_head: np.ndarray, log_w: np.ndarray) -> np.ndarray:
    """Jackknifed law over K candidates from log p^alpha (K,) and rollout log weights (K, M); see the docstring."""
    m = log_w.shape[1]
    probs = _softmax(log_head + logsumexp(log_w) - math.log(m))  # P_hat, (K,)
    if m == 1:
        return probs
    loo = _leave_one_out_logsumexp(log_w) - math.log(m - 1)  # (K, M): log zeta_hat without rollout m
    probs_loo = _softmax(log_head[:, None] + loo, axis=0)  # (K, M): P_hat^(-m), normalized over candidates
    jack = np.clip(m * probs - (m - 1) * probs_loo.mean(axis=1), 0.0, None)
    total = jack.sum()
    return jack / total if total > 0 else probs


def _leave_one_out_logsumexp(log_w: np.ndarray) -> np.ndarray:
    """(K, M) -> (K, M): logsumexp of each row without its m-th entry, from prefix and suffix sums (no cancellation)."""
    pad = np.full((log_w.shape[0], 1), -np.inf)
    before = np.hstack([pad, np.logaddexp.accumulate(log_w, axis=1)[:, :-1]])
    after = np.hstack([np.logaddexp.accumulate(log_w[:, ::-1], axis=1)[:, ::-1][:, 1:], pad])
    return np.logaddexp(before, after)


def _softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    z = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return z / z.sum(axis=axis, keepdims=True)


def _log(probs: np.ndarray) -> np.ndarray:
    out = np.full(len(probs), -np.inf)
    np.log(probs, out=out, where=probs > 0)
    return out


def _block(config: SamplerConfig) -> int:
    """B: 1 (token level, the paper's main algorithm) unless block_size is set explicitly; block_count is unused."""
    return config.block_size or 1
