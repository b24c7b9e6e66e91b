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
from typing import Protocol, Sequence

from powersample.config import SamplerConfig
from powersample.core.draws import Rng, log_uniform, uniform_index
from powersample.core.types import Continuation, ExtendRequest, Floor, Hints, Report, Tokens
from powersample.samplers.chain import Chain
from powersample.samplers.driver import Program, ask


def power_program(prompt: Tokens, config: SamplerConfig, chain: Chain, eos_ids: frozenset[int]) -> Program:
    """Algorithm 1 for one chain, targeting p^alpha: yields each extension and proposal request, returns the final
    state."""
    return mh_program(prompt, config, chain, eos_ids, config.alpha)


def max_swap_program(prompt: Tokens, config: SamplerConfig, chain: Chain, eos_ids: frozenset[int]) -> Program:
    """Algorithm 1 at alpha = infinity (`max-swap`)."""
    return mh_program(prompt, config, chain, eos_ids, math.inf)


class Cuts(Protocol):
    """Where an MH step cuts: a distribution c(i | x) over the indices of the state, and its Hastings factor."""

    entropy: bool  # whether c reads the base entropy before each token (the chain's requests then ask for it)

    def log_prob(self, i: int, length: int, entropy: Sequence[float]) -> float:
        """log c(i | x) for a state x of `length` tokens with these per-token entropies."""
        ...

    def pick(self, length: int, entropy: Sequence[float], rng: Rng) -> int:
        """An index i drawn from c(. | x)."""
        ...

    def bound(self, i: int) -> float | None:
        """An upper bound on log c(i | x') over every state x' longer than i, or None when log c(i | x') is
        exactly -log len(x') (the uniform cut, which the floor's length term follows token by token)."""
        ...


class UniformCuts:
    """The paper's cut: i uniform on {0, ..., L-1}, c(i | x) = 1/L."""

    entropy = False

    def log_prob(self, i: int, length: int, entropy: Sequence[float]) -> float:
        return -math.log(length)

    def pick(self, length: int, entropy: Sequence[float], rng: Rng) -> int:
        return uniform_index(length, rng)

    def bound(self, i: int) -> float | None:
        return None


UNIFORM = UniformCuts()


def mh_program(
    prompt: Tokens, config: SamplerConfig, chain: Chain, eos_ids: frozenset[int], alpha: float, cuts: Cuts = UNIFORM
) -> Program:
    """The stages and MH steps of Algorithm 1 with target exponent `alpha`, cutting where `cuts` says."""
    if config.speculate:
        chain.remember(prompt)
    for stage, cap in enumerate(config.stage_caps(), start=1):
        at = len(chain.tokens)
        request = suffix_request(prompt, config, chain, at, cap, chain.rng, chain.slot, entropy=cuts.entropy)
        cont = yield from ask(request)
        chain.drew(request, cont)
        chain.append(cont)
        chain.tokens_generated += len(cont.tokens)
        note_extension(chain, stage, at, cont)
        for step in range(config.mcmc_steps):
            i = cuts.pick(len(chain.tokens), chain.entropy, chain.rng)
            log_u = log_uniform(chain.rng)  # drawn first, so that a proposal sure to be rejected stops early
            request = suffix_request(
                prompt,
                config,
                chain,
                i,
                cap,
                chain.rng,
                chain.slot,
                rejection_floor(config, alpha, chain, i, log_u, cuts),
                cuts.entropy,
            )
            cont = yield from ask(request)
            chain.drew(request, cont)
            mh_step(chain, i, cont, alpha, log_u, cuts, (stage, step))
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


def suffix_request(
    prompt: Tokens,
    config: SamplerConfig,
    chain: Chain,
    i: int,
    cap: int,
    rng: Rng,
    slot: int,
    floor: Floor | None = None,
    entropy: bool = False,
) -> ExtendRequest:
    """A fresh q-continuation of x_<i until EOS or `cap` tokens (or until it falls below `floor`), drawn with `rng`
    (cache `slot`), with the base entropy before each token when `entropy`: an MH proposal, or with i = len(x) a
    stage's extension. With `speculate` on, its draft guesses the current suffix x_>=i, then what the chain drew
    before (core.drafts); the engine draws the same tokens either way, only in fewer forwards."""
    context = prompt + tuple(chain.tokens[:i])
    hints = Hints(chain.draft(context, tuple(chain.tokens[i:])), config.speculate or 0, floor)
    return ExtendRequest(context, cap - i, rng, slot, Report(entropy=entropy), hints)


def rejection_floor(
    config: SamplerConfig, alpha: float, chain: Chain, i: int, log_u: float, cuts: Cuts = UNIFORM
) -> Floor | None:
    """Exact early rejection: the proposal from i is accepted iff log u <= log r, that is iff its score

        alpha * log p(x'_>=i | x_<i) - log q(x'_>=i | x_<i) + log c(i | x')  >=  the same of x, + log u

    (max-swap: iff its log p beats the current suffix's). The first two terms never rise as the proposal grows
    (core.types.Floor) when alpha >= 1/tau >= 1; the uniform cut's log c(i | x') = -log L' falls too, and any other
    cut's is at most cuts.bound(i). So once the score is below, the rest need not be drawn. None where it could
    rise."""
    if math.isinf(alpha):
        return Floor(math.fsum(chain.base_logp[i:]), alpha)
    if not (config.tau <= 1.0 and alpha * config.tau >= 1.0 - 1e-15):  # 1e-15: alpha * (1 / alpha) rounds below 1
        return None
    current = (
        alpha * math.fsum(chain.base_logp[i:])
        - math.fsum(chain.proposal_logq[i:])
        + cuts.log_prob(i, len(chain.tokens), chain.entropy)
    )
    bound = cuts.bound(i)
    if bound is None:
        return Floor(current + log_u, alpha, i)
    return Floor(current + log_u - bound, alpha, i, per_length=False)


def mh_step(
    chain: Chain,
    i: int,
    proposed: Continuation,
    alpha: float,
    log_u: float,
    cuts: Cuts = UNIFORM,
    where: tuple[int, int] = (0, 0),
) -> None:
    """Accept or reject x' = x_<i + proposed (a proposal cut short by its floor is always rejected), and count it
    (and trace it: `where` is the (stage, step))."""
    chain.tokens_generated += len(proposed.tokens)
    chain.proposals += 1
    length, terms = len(chain.tokens), log_ratio_terms(alpha, chain, i, proposed, cuts)
    log_r = math.fsum(terms)
    accepted = log_u <= log_r
    if accepted:
        chain.replace_suffix(i, proposed)
        chain.accepted += 1
    note_step(chain, where, i, length, proposed, log_r, terms, log_u, accepted)


def log_accept_ratio(alpha: float, chain: Chain, i: int, proposed: Continuation, cuts: Cuts = UNIFORM) -> float:
    """log r for replacing chain.tokens[i:] by `proposed` (see the module docstring)."""
    return math.fsum(log_ratio_terms(alpha, chain, i, proposed, cuts))


def log_ratio_terms(
    alpha: float, chain: Chain, i: int, proposed: Continuation, cuts: Cuts = UNIFORM
) -> tuple[float, float, float]:
    """The three terms of log r: target, proposal and cut (max-swap: 0 or -inf, then 0, 0). A proposal of the current
    suffix's own tokens is the current state, whatever rounding its forwards had: its ratio is exactly 1 (max-swap: no
    increase), so that an engine's last-bit differences between forward shapes cannot decide a step."""
    if tuple(proposed.tokens) == tuple(chain.tokens[i:]):
        return (-math.inf if math.isinf(alpha) else 0.0), 0.0, 0.0
    cur_logp, new_logp = math.fsum(chain.base_logp[i:]), math.fsum(proposed.base_logp)
    if math.isinf(alpha):  # max-swap: accept iff the suffix's log p strictly increases
        return (0.0 if new_logp > cur_logp else -math.inf), 0.0, 0.0
    cur_logq, new_logq = math.fsum(chain.proposal_logq[i:]), math.fsum(proposed.proposal_logq)
    new_entropy = tuple(chain.entropy[:i]) + proposed.entropy if cuts.entropy else ()
    return (
        alpha * (new_logp - cur_logp),  # target ratio p(x')^alpha / p(x)^alpha
        cur_logq - new_logq,  # proposal ratio q(x_>=i) / q(x'_>=i)
        cuts.log_prob(i, i + len(proposed.tokens), new_entropy)  # the cut: c(i | x') / c(i | x) (uniform: L / L')
        - cuts.log_prob(i, len(chain.tokens), chain.entropy),
    )


def note_extension(chain: Chain, stage: int, at: int, cont: Continuation) -> None:
    """Trace a stage's extension, appended at index `at` (nothing is computed for an untraced chain)."""
    if chain.trace is None:
        return
    chain.note(
        "extend",
        stage=stage,
        at=at,
        tokens=list(cont.tokens),
        base_logp=list(cont.base_logp),
        logp=math.fsum(chain.base_logp),
        length=len(chain.tokens),
    )


def note_step(
    chain: Chain,
    where: tuple[int, int],
    i: int,
    length: int,
    proposed: Continuation,
    log_r: float,
    terms: tuple[float, float, float],
    log_u: float,
    accepted: bool,
) -> None:
    """Trace one MH step (after it moved, or not): a log r or term of -inf is written as None (Chain.note). Nothing is
    computed for an untraced chain."""
    if chain.trace is None:
        return
    stage, step = where
    chain.note(
        "step",
        stage=stage,
        step=step,
        cut=i,
        length=length,
        proposal=list(proposed.tokens),
        proposal_logp=math.fsum(proposed.base_logp),
        log_r=log_r,
        log_u=log_u,
        accepted=accepted,
        terms=dict(zip(("target", "proposal", "cut"), terms)),
        logp=math.fsum(chain.base_logp),
        length_after=len(chain.tokens),
    )
