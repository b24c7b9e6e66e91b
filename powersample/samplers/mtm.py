"""Multiple-try Metropolis-Hastings power sampling (`power-mtm`): `power` with k = tries proposals per MH step.

Target. As `power`: stage k targets pi_k(x) ∝ p(x)^alpha over sequences x of length <= kB: complete ones (ending
in EOS) with their full probability, and EOS-free ones of exactly kB tokens with their prefix probability.

Proposal. Same staging as `power`: at the start of each stage an incomplete state is extended with q (the model at
temperature tau) until EOS or the stage cap. Each MH step picks i uniformly from {0, ..., L-1} (L = len(x)) and
draws k suffixes y_1, ..., y_k independently from q(. | x_<i), each until EOS or the cap, in one batched call.

Weights, selection, acceptance. With the common factors p(x_<i)^alpha dropped, each sequence z = x_<i + z_>=i
(a try, or the current state) gets

    log w(z) = alpha * log p(z_>=i | x_<i) - log q(z_>=i | x_<i) - log len(z)

the try J is picked with probability w(y_J) / sum_j w(y_j), and x' = y_J is accepted with probability

    min(1, sum_j w(y_j) / (sum_j w(y_j) - w(y_J) + w(x)))        # the unpicked tries stand in as references

Why this is exact, for any k. Put the index into the state: pi(x, i) = pi(x) / L(x) for i < L(x). Drawing i
given x is a Gibbs step. Given i, the move keeps x_<i and the tries do not depend on the current suffix, so it is
an independence sampler for pi_i(x) ∝ p(x)^alpha / L(x) = w(x) q(x_>=i | x_<i) (up to constants). For
independent proposals, MTM with the unpicked tries as reference points is reversible: for y != x,
pi_i(x) K_i(x, y) = k pi_i(x) pi_i(y) E[min(1 / (w(y) + S), 1 / (w(x) + S))], S the summed weight of k - 1 further
tries, which is symmetric in x and y. Averaging over i (weight 1/L(x) = pi(x, i) / pi(x)) keeps detailed balance
for pi. With k = 1 the ratio is w(y) / w(x): power's r, log L - log L' included.

Counters: one MH step is one proposal (accepted or not); tokens_generated counts every token of every try.

Randomness: i, then the uniform of the test, then the tries, then the pick. With k = 1 the ratio is power's r, so
the one try gets power's early-rejection floor and the chain draws exactly what `power` draws.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from powersample.config import SamplerConfig
from powersample.core.draws import Rng, draw, log_uniform, uniform_index
from powersample.core.numerics import logsumexp
from powersample.core.types import Continuation, Tokens
from powersample.samplers.chain import Chain
from powersample.samplers.driver import Program, ask, ask_all
from powersample.samplers.power import rejection_floor, suffix_request


def mtm_program(prompt: Tokens, config: SamplerConfig, chain: Chain, eos_ids: frozenset[int]) -> Program:
    """Power sampling's stages, each MH step with config.tries tries in one tuple step; returns the final state."""
    rngs = try_rngs(chain, config.tries)
    if config.speculate:
        chain.remember(prompt)
    for cap in config.stage_caps():
        request = suffix_request(prompt, config, chain, len(chain.tokens), cap, chain.rng, 0)
        cont = yield from ask(request)
        chain.drew(request, cont)
        chain.append(cont)
        chain.tokens_generated += len(cont.tokens)
        for _ in range(config.mcmc_steps):
            i = uniform_index(len(chain.tokens), chain.rng)
            log_u = log_uniform(chain.rng)  # drawn first, as `power` does
            floor = rejection_floor(config, config.alpha, chain, i, log_u) if len(rngs) == 1 else None  # one try: r
            requests = tuple(
                suffix_request(prompt, config, chain, i, cap, rng, slot, floor) for slot, rng in enumerate(rngs)
            )
            tries = yield from ask_all(requests)
            for request, cont in zip(requests, tries):
                chain.drew(request, cont)
            mtm_step(chain, i, tries, config.alpha, log_u)
        if chain.complete(eos_ids):
            break
    return chain.result()


def mtm_work_units(config: SamplerConfig) -> int:
    """Backend requests one chain makes at most: an extension and mcmc_steps x tries tries per stage."""
    return len(config.stage_caps()) * (1 + config.mcmc_steps * config.tries)


def try_rngs(chain: Chain, k: int) -> list[Rng]:
    """One generator per try slot: the chain's own for try 0 (so k = 1 draws exactly like `power`), and k - 1
    children seeded from it, so a try's tokens never depend on how the engine interleaves the batch."""
    if k == 1:
        return [chain.rng]
    return [chain.rng] + chain.spawn_rngs(k - 1)


def mtm_step(chain: Chain, i: int, tries: Sequence[Continuation], alpha: float, log_u: float) -> None:
    """Pick one try, accept or reject x' = x_<i + that try (log u <= log of the ratio), and count it."""
    chain.tokens_generated += sum(len(t.tokens) for t in tries)
    chain.proposals += 1
    log_w = [log_weight(alpha, i, t.base_logp, t.proposal_logq) for t in tries]
    j = pick(log_w, chain.rng)
    log_w_current = log_weight(alpha, i, chain.base_logp[i:], chain.proposal_logq[i:])
    if log_u <= log_accept_ratio(log_w, j, log_w_current):
        chain.replace_suffix(i, tries[j])
        chain.accepted += 1


def log_weight(alpha: float, i: int, base_logp: Sequence[float], proposal_logq: Sequence[float]) -> float:
    """log w of x_<i + a suffix with these per-token log p and log q (see the module docstring)."""
    return alpha * math.fsum(base_logp) - math.fsum(proposal_logq) - math.log(i + len(base_logp))


def log_accept_ratio(log_w: Sequence[float], j: int, log_w_current: float) -> float:
    """log of sum_j w(y_j) / (sum_j w(y_j) - w(y_J) + w(x)), the reference sum taken without subtraction."""
    references = [lw for m, lw in enumerate(log_w) if m != j] + [log_w_current]
    return float(logsumexp(log_w) - logsumexp(references))


def pick(log_w: Sequence[float], rng: Rng) -> int:
    """Index J with probability w_J / sum w; no draw when there is one try (so k = 1 draws like `power`)."""
    return 0 if len(log_w) == 1 else draw(np.asarray(log_w), rng)
