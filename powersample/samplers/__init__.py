"""Sampling algorithms. They know the backend seam (`powersample.core`, `powersample.backends.base`) and nothing of
any engine.

Each algorithm is one file holding a per-chain program (see `driver.py`); the driver batches the chains, and
`registry.py` is the one table of methods.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

from powersample.backends.base import Backend, Speculation, capability
from powersample.config import SamplerConfig
from powersample.core.types import Tokens
from powersample.samplers import registry
from powersample.samplers.chain import Chain, ChainResult, Progress
from powersample.samplers.driver import Program, drive


def on_engine(config: SamplerConfig, backend: Backend) -> SamplerConfig:
    """The config as it runs on `backend`: a `speculate` left to the engine (None) becomes the engine's choice
    (Speculation.default_speculate; 0 for an engine that does not verify drafts)."""
    if config.speculate is not None:
        return config
    engine = capability(backend, Speculation)
    return replace(config, speculate=engine.default_speculate() if engine is not None else 0)


def run_chains(
    backend: Backend,
    prompt: Tokens,
    config: SamplerConfig,
    chains: Sequence[Chain],
    progress: Progress | None = None,
) -> list[ChainResult]:
    """Run config.method on every chain (all chains share the prompt and are batched together)."""
    return drive(backend, programs(backend, prompt, config, chains), registry.proposal(config), progress)


def programs(backend: Backend, prompt: Tokens, config: SamplerConfig, chains: Sequence[Chain]) -> list[Program]:
    """One config.method program per chain, for callers that drive programs themselves (the server's engine).
    The method's refusals (registry.check) come first."""
    registry.check(config)
    program, config = registry.method(config.method).program, on_engine(config, backend)
    return [program(prompt, config, c, backend.eos_ids) for c in chains]


__all__ = ["Chain", "ChainResult", "Program", "Progress", "on_engine", "programs", "registry", "run_chains"]
