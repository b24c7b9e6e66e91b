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

Early rejection (exact). The uniform u of the test log u <= log r is drawn before the proposal. The proposal's side
of log r only falls as tokens are added (every token adds alpha log p - log q <= 0 when alpha >= 1/tau >= 1, and
-log L' falls), so the engine stops drawing once it is below the current side + log u (`rejection_floor`): the
test would reject it whatever came next. The chain moves exactly as without the stop; it draws fewer tokens.
"""

from __future__ import annotations

import math

import numpy as np

from powersample.config import SamplerConfig
from powersample.core.types import Continuation, ExtendRequest, Floor, Tokens
from powersample.samplers.chain import Chain
from powersample.samplers.driver import Program


def power_program(prompt: Tokens, config: SamplerConfig, chain: Chain, eos_ids: frozenset[int]) -> Program:
    """Algorithm 1 for one chain, targeting p^alpha: yields each extension and proposal request, returns the final
    state."""
    return mh_program(prompt, config, chain, eos_ids, config.alpha)


def max_swap_program(prompt: Tokens, config: SamplerConfig, chain: Chain, eos_ids: frozenset[int]) -> Program:
    """Algorithm 1 at alpha = infinity (`max-swap`)."""
    return mh_program(prompt, config, chain, eos_ids, math.inf)


def mh_program(prompt: Tokens, config: SamplerConfig, chain: Chain, eos_ids: frozenset[int], alpha: float) -> Program:
    """The stages and MH steps of Algorithm 1 with target exponent `alpha`."""
    if config.speculate:
        chain.remember(prompt)
    for cap in config.stage_caps():
        request = suffix_request(prompt, config, chain, len(chain.tokens), cap, chain.rng, chain.slot)
        cont = yield request
        chain.drew(request, cont)
        chain.append(cont)
        chain.tokens_generated += len(cont.tokens)
        for _ in range(config.mcmc_steps):
            i = int(chain.rng.integers(len(chain.tokens)))
            log_u = log_uniform(chain.rng)  # drawn first, so that a proposal sure to be rejected stops early
            request = suffix_request(prompt, config, chain, i, cap, chain.rng, chain.slot,
                                     rejection_floor(config, alpha, chain, i, log_u))  # fmt: skip
            cont = yield request
            chain.drew(request, cont)
            mh_step(chain, i, cont, alpha, log_u)
        if chain.complete(eos_ids):
            break
    return chain.result()


def power_work_units(config: SamplerConfig) -> int:
    """Backend requests one chain makes at most: an extension and mcmc_steps proposals per stage."""
    return len(config.stage_caps()) * (1 + config.mcmc_steps)


def eq12_tokens(max_new_tokens: int, block_size: int, mcmc_steps: int) -> float:
    """Eq. 12 of the paper: the tokens one sample costs, N T^2 / (4B) sampled by the MH steps plus the T of the
    extensions. Stage k makes N proposals that each regenerate on average half of the current kB tokens, so the MH
    steps sample about N * B/2 * sum_k k ~ N T^2 / (4B) tokens (bench's table, the report's Eq. 12 column)."""
    t, b, n = max_new_tokens, block_size, mcmc_steps
    return n * t * t / (4 * b) + t


def suffix_request(prompt: Tokens, config: SamplerConfig, chain: Chain, i: int, cap: int,
                   rng: np.random.Generator, slot: int, floor: Floor | None = None) -> ExtendRequest:  # fmt: skip
    """A fresh q-continuation of x_<i until EOS or `cap` tokens (or until it falls below `floor`), drawn with `rng`
    (cache `slot`): an MH proposal, or with i = len(x) a stage's extension. With `speculate` on, its draft guesses
    the current suffix x_>=i, then what the chain drew before (core.drafts); the engine draws the same tokens
    either way, only in fewer forwards."""
    context = prompt + tuple(chain.tokens[:i])
    return ExtendRequest(context, cap - i, rng, slot, draft=chain.draft(context, tuple(chain.tokens[i:])),
                         speculate=config.speculate, floor=floor)  # fmt: skip


def rejection_floor(config: SamplerConfig, alpha: float, chain: Chain, i: int, log_u: float) -> Floor | None:
    """Exact early rejection: the proposal from i is accepted iff log u <= log r, that is iff its score

        alpha * log p(x'_>=i | x_<i) - log q(x'_>=i | x_<i) - log L'  >=  the same of x, + log u

    (max-swap: iff its log p beats the current suffix's). The score never rises as the proposal grows (core.types.
    Floor) when alpha >= 1/tau >= 1, so once it is below, the rest need not be drawn. None where it could rise."""
    if math.isinf(alpha):
        return Floor(math.fsum(chain.base_logp[i:]), alpha)
    if not (config.tau <= 1.0 and alpha * config.tau >= 1.0 - 1e-15):  # 1e-15: alpha * (1 / alpha) rounds below 1
        return None
    current = alpha * math.fsum(chain.base_logp[i:]) - math.fsum(chain.proposal_logq[i:]) - math.log(len(chain.tokens))
    return Floor(current + log_u, alpha, i)


def mh_step(chain: Chain, i: int, proposed: Continuation, alpha: float, log_u: float) -> None:
    """Accept or reject x' = x_<i + proposed (a proposal cut short by its floor is always rejected), and count it."""
    chain.tokens_generated += len(proposed.tokens)
    chain.proposals += 1
    if log_u <= log_accept_ratio(alpha, chain, i, proposed):
        chain.replace_suffix(i, proposed)
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


def log_uniform(rng: np.random.Generator) -> float:
    """log u for u uniform on (0, 1], so that it is finite."""
    return math.log(1.0 - rng.random())
