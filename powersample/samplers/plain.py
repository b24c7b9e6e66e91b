"""Plain ancestral sampling: `base` (tau = 1) and `low-temp` (tau = 1/alpha).

Target: the proposal q itself, token by token, up to T tokens or EOS. No MCMC: one request per chain.
"""

from __future__ import annotations

from powersample.config import SamplerConfig
from powersample.core.types import ExtendRequest, Report, Tokens
from powersample.samplers.chain import Chain
from powersample.samplers.driver import Program


def plain_program(prompt: Tokens, config: SamplerConfig, chain: Chain, eos_ids: frozenset[int]) -> Program:
    """One continuation of up to T tokens, drawn at the method's temperature (the registry's). A traced chain notes
    each run of tokens as the engine draws them ("draw" events: what a server streams before the chain ends)."""
    on_draw = None if chain.trace is None else (lambda tokens: chain.note("draw", tokens=list(tokens)))
    cont = yield ExtendRequest(prompt, config.max_new_tokens, chain.rng, chain.slot, Report(on_draw=on_draw))
    chain.append(cont)
    chain.tokens_generated += len(cont.tokens)
    return chain.result()


def plain_work_units(config: SamplerConfig) -> int:
    """Backend requests one chain makes."""
    return 1
