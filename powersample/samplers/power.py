"""Block-wise Metropolis-Hastings power sampling (Karan & Du, 2025, Algorithm 1), with exact EOS handling.

Target. Stage k targets pi_k(x) ∝ p(x)^alpha over sequences x of length <= kB: complete ones (ending in EOS) with
their full probability, and EOS-free ones of exactly kB tokens with their prefix probability.

Proposal. At the start of stage k+1 an incomplete state is extended with q (the model at temperature tau) until
EOS or length (k+1)B. Each MH step then picks i uniformly from {0, ..., L-1} (L = len(x)) and proposes
x' = x_<i + (a fresh q-continuation until EOS or (k+1)B).

Acceptance. With both suffixes counted in full, whatever their lengths (L' = len(x')):

    log r = alpha * (log p(x'_>=i | x_<i) - log p(x_>=i | x_<i))
          + log q(x_>=i | x_<i) - log q(x'_>=i | x_<i)
          + log L - log L'                       # the index choice: 1/L forward, 1/L' back

and x' is accepted with probability min(1, r). `max-swap` is alpha = inf: accept iff log p of the suffix strictly
increases. Sampling stops after the stage whose final state is complete, or after the stage that reaches T.

All chains advance in lockstep: every extension and every MH round is one batched backend call.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from powersample.backends.base import Backend, Continuation, ExtendRequest, Proposal, Tokens
from powersample.config import SamplerConfig
from powersample.samplers.chain import Chain, ChainResult, Progress


def sample_power(
    backend: Backend,
    prompt: Tokens,
    config: SamplerConfig,
    chains: Sequence[Chain],
    progress: Progress | None = None,
) -> list[ChainResult]:
    """Run Algorithm 1 on every chain; returns their final states."""
    proposal = Proposal(config.temperature, config.top_k, config.top_p)
    active = list(chains)
    for cap in config.stage_caps():
        _extend(backend, prompt, active, cap, proposal)
        _report(progress)
        for _ in range(config.mcmc_steps):
            _mh_round(backend, prompt, active, cap, proposal, config.target_alpha)
            _report(progress)
        active = [c for c in active if not c.complete(backend.eos_ids)]
        if not active:
            break
    return [c.result() for c in chains]


def power_work_units(config: SamplerConfig) -> int:
    """Progress units sample_power reports at most: one per batched backend call."""
    return len(config.stage_caps()) * (1 + config.mcmc_steps)


def _report(progress: Progress | None) -> None:
    if progress:
        progress(1)


def _extend(backend: Backend, prompt: Tokens, chains: list[Chain], cap: int, proposal: Proposal) -> None:
    """Start of a stage: grow each (incomplete) state with q until EOS or `cap` tokens."""
    requests = [ExtendRequest(prompt + tuple(c.tokens), cap - len(c.tokens), c.rng, c.slot) for c in chains]
    for chain, cont in zip(chains, backend.extend(requests, proposal)):
        chain.append(cont)
        chain.tokens_generated += len(cont.tokens)


def _mh_round(
    backend: Backend, prompt: Tokens, chains: list[Chain], cap: int, proposal: Proposal, alpha: float
) -> None:
    """One MH step for every chain: draw i, propose a new suffix from i, accept or reject."""
    cuts = [int(c.rng.integers(len(c.tokens))) for c in chains]
    requests = [
        ExtendRequest(prompt + tuple(c.tokens[:i]), cap - i, c.rng, c.slot) for c, i in zip(chains, cuts)
    ]
    for chain, i, cont in zip(chains, cuts, backend.extend(requests, proposal)):
        chain.tokens_generated += len(cont.tokens)
        chain.proposals += 1
        if accept(log_accept_ratio(alpha, chain, i, cont), chain.rng):
            chain.replace_suffix(i, cont)
            chain.accepted += 1


def log_accept_ratio(alpha: float, chain: Chain, i: int, proposed: Continuation) -> float:
    """log r for replacing chain.tokens[i:] by `proposed` (see the module docstring)."""
    cur_logp, new_logp = math.fsum(chain.base_logp[i:]), math.fsum(proposed.base_logp)
    if math.isinf(alpha):  # max-swap: accept iff the suffix's log p strictly increases
        return 0.0 if new_logp > cur_logp else -math.inf
    cur_logq, new_logq = math.fsum(chain.proposal_logq[i:]), math.fsum(proposed.proposal_logq)
    cur_len, new_len = len(chain.tokens), i + len(proposed.tokens)
    return (
        alpha * (new_logp - cur_logp)  # target ratio p(x')^alpha / p(x)^alpha
        + (cur_logq - new_logq)  # proposal ratio q(x_>=i) / q(x'_>=i)
        + (math.log(cur_len) - math.log(new_len))  # index choice: (1/L') / (1/L)
    )


def accept(log_r: float, rng: np.random.Generator) -> bool:
    """True with probability min(1, exp(log_r)); u is drawn from (0, 1] so log(u) is finite."""
    u = 1.0 - rng.random()
    return math.log(u) <= log_r
