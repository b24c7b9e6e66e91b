"""Plain ancestral sampling: `base` (tau = 1) and `low-temp` (tau = 1/alpha).

Target: the proposal q itself, token by token, up to T tokens or EOS. No MCMC: one request per chain.
"""

from __future__ import annotations

from collections.abc import Callable

from powersample.config import SamplerConfig
from powersample.core.types import ExtendRequest, Report, Tokens
from powersample.samplers.chain import Chain
from powersample.samplers.driver import Program, ask


def plain_program(prompt: Tokens, config: SamplerConfig, chain: Chain, eos_ids: frozenset[int]) -> Program:
    """One continuation of up to T tokens, drawn at the method's temperature (the registry's). Each run of tokens the
    engine draws is final text: it goes to the chain's `on_draw` (live text) and, when traced, is noted as a "draw"
    event."""
    report = Report(on_draw=_draws(chain))
    cont = yield from ask(ExtendRequest(prompt, config.max_new_tokens, chain.rng, chain.slot, report))
    chain.append(cont)
    chain.tokens_generated += len(cont.tokens)
    return chain.result()


def _draws(chain: Chain) -> Callable[[Tokens], None] | None:
    """Where the drawn tokens go: the chain's live-text listener and its trace, each when there is one."""
    note = None if chain.trace is None else (lambda tokens: chain.note("draw", tokens=list(tokens)))
    sinks = [sink for sink in (chain.on_draw, note) if sink is not None]
    if not sinks:
        return None

    def draw(tokens: Tokens) -> None:
        for sink in sinks:
            sink(tokens)

    return draw


def plain_work_units(config: SamplerConfig) -> int:
    """Backend requests one chain makes."""
    return 1
