"""Compute-matched best-of-N (`bon`): the verifier-free baseline beside MH power sampling.

Target. None: this is a selection rule, not a sampler of p^alpha. It answers "what does the compute of a power run
buy if spent on independent samples instead?".

Draws. Candidates are full continuations of the prompt (up to T tokens, or until EOS), each drawn independently
from q: the base model at temperature `bon_temperature`, then top-k and top-p. They are drawn until the tokens of
all candidates reach the budget `bon_tokens` (0 = the Eq. 12 cost of this config's power run, ceil(N T^2 / (4B) +
T), power.eq12_tokens); the candidate that crosses the budget is drawn in full and kept, so there is at least one.

Returns the candidate with the highest mean base log p per token (ties: the earliest drawn). Counters:
tokens_generated = every token of every candidate; proposals = candidates drawn; accepted = 0 (nothing is accepted
or rejected; the record's acceptance rate is None, as for the plain methods).

Batching. Each round yields one tuple of k = ceil(remaining / T) requests: a candidate holds at most T tokens, so the
first k - 1 cannot reach the budget and all k are needed before it can be crossed; no candidate is drawn in vain.
k is capped at MAX_ROUND per round (memory: a round's rows are in the engine's batch at once); `registry.members`
still counts a bon chain as one sequence. Candidate 0 of a round draws from the chain's own generator and the
others from generators spawned from it, so a seed gives the same output however the engine schedules the rows (and
with a budget of one token, at temperature 1, bon returns exactly what `base` draws).
"""

from __future__ import annotations

import math
from typing import Sequence

from powersample.config import SamplerConfig
from powersample.core.types import Continuation, ExtendRequest, Tokens
from powersample.errors import PowerSampleError
from powersample.samplers.chain import Chain
from powersample.samplers.driver import Program, ask_all
from powersample.samplers.mtm import try_rngs
from powersample.samplers.power import eq12_tokens

MAX_ROUND = 64  # most candidates one chain draws in one round (one tuple step)


def bon_program(prompt: Tokens, config: SamplerConfig, chain: Chain, eos_ids: frozenset[int]) -> Program:
    """Candidates in rounds until the budget is crossed; returns the best one (highest mean base log p)."""
    budget, best = bon_budget(config), None
    while chain.tokens_generated < budget:
        k = round_size(budget - chain.tokens_generated, config.max_new_tokens)
        requests = tuple(
            ExtendRequest(prompt, config.max_new_tokens, rng, slot) for slot, rng in enumerate(try_rngs(chain, k))
        )
        candidates = yield from ask_all(requests)
        best = keep_best(best, candidates)
        drawn = sum(len(c.tokens) for c in candidates)
        if drawn == 0:
            raise PowerSampleError("bon: the engine returned empty candidates")
        chain.tokens_generated += drawn
        chain.proposals += k
    assert best is not None  # the budget is >= 1 token, so at least one round ran
    chain.append(best)
    return chain.result()


def bon_work_units(config: SamplerConfig) -> int:
    """Backend requests one chain makes at most: one per candidate, and a candidate has at least one token."""
    return bon_budget(config)


def bon_budget(config: SamplerConfig) -> int:
    """The tokens to draw: bon_tokens, or the Eq. 12 cost of this config's power run, rounded up."""
    if config.bon_tokens:
        return config.bon_tokens
    return math.ceil(eq12_tokens(config.max_new_tokens, config.block, config.mcmc_steps))


def bon_temperature(config: SamplerConfig) -> float:
    """What candidates are drawn at (the registry's `temperature` hook)."""
    return config.bon_temperature


def round_size(remaining: int, max_new_tokens: int) -> int:
    """Candidates of the next round: ceil(remaining / T) (all needed before the budget can be crossed), at most
    MAX_ROUND."""
    return min(MAX_ROUND, -(-remaining // max_new_tokens))


def keep_best(best: Continuation | None, candidates: Sequence[Continuation]) -> Continuation | None:
    """The candidate with the highest mean base log p among `best` (drawn earlier) and `candidates` (in draw order);
    on a tie the earlier one stays."""
    for cand in candidates:
        if best is None or mean_logp(cand) > mean_logp(best):
            best = cand
    return best


def mean_logp(cont: Continuation) -> float:
    """Mean base log p per token (nats); -inf for an empty continuation."""
    return math.fsum(cont.base_logp) / len(cont.base_logp) if cont.base_logp else -math.inf
