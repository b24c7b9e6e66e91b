"""Plain ancestral sampling: `base` (tau = 1) and `low-temp` (tau = 1/alpha).

Target: the proposal q itself, token by token, up to T tokens or EOS. No MCMC; every chain is one engine call.
"""

from __future__ import annotations

from typing import Sequence

from powersample.backends.base import Backend, ExtendRequest, Proposal, Tokens
from powersample.config import SamplerConfig
from powersample.samplers.chain import Chain, ChainResult, Progress


def sample_plain(
    backend: Backend,
    prompt: Tokens,
    config: SamplerConfig,
    chains: Sequence[Chain],
    progress: Progress | None = None,
) -> list[ChainResult]:
    """One continuation of up to T tokens per chain, drawn at config.temperature."""
    proposal = Proposal(config.temperature, config.top_k, config.top_p)
    requests = [ExtendRequest(prompt, config.max_new_tokens, c.rng, c.slot) for c in chains]
    for chain, cont in zip(chains, backend.extend(requests, proposal)):
        chain.append(cont)
        chain.tokens_generated += len(cont.tokens)
    if progress:
        progress(1)
    return [c.result() for c in chains]


def plain_work_units(config: SamplerConfig) -> int:
    """Progress units sample_plain reports."""
    return 1
