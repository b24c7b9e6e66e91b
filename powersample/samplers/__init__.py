"""Sampling algorithms. They know the backend seam (`powersample.backends.base`) and nothing of any engine."""

from __future__ import annotations

from typing import Sequence

from powersample.backends.base import Backend, Tokens
from powersample.config import SamplerConfig
from powersample.samplers.chain import Chain, ChainResult, Progress
from powersample.samplers.plain import plain_work_units, sample_plain
from powersample.samplers.power import power_work_units, sample_power

_SAMPLERS = {
    "power": (sample_power, power_work_units),
    "max-swap": (sample_power, power_work_units),
    "base": (sample_plain, plain_work_units),
    "low-temp": (sample_plain, plain_work_units),
}


def run_chains(
    backend: Backend,
    prompt: Tokens,
    config: SamplerConfig,
    chains: Sequence[Chain],
    progress: Progress | None = None,
) -> list[ChainResult]:
    """Run config.method on every chain (all chains share the prompt and advance together)."""
    sampler, _ = _SAMPLERS[config.method]
    return sampler(backend, prompt, config, chains, progress)


def work_units(config: SamplerConfig) -> int:
    """How many progress units one run_chains call reports at most."""
    return _SAMPLERS[config.method][1](config)


__all__ = ["Chain", "ChainResult", "run_chains", "work_units"]
