"""Sampling algorithms. They know the backend seam (`powersample.backends.base`) and nothing of any engine.

Each algorithm is one file holding a per-chain program (see `driver.py`); the driver batches the chains.
"""

from __future__ import annotations

from typing import Sequence

from powersample.backends.base import Backend
from powersample.config import SamplerConfig
from powersample.core.types import Tokens
from powersample.errors import PowerSampleError
from powersample.samplers.chain import Chain, ChainResult, Progress
from powersample.samplers.driver import Program, drive
from powersample.samplers.mtm import mtm_program, mtm_work_units
from powersample.samplers.plain import plain_program, plain_work_units
from powersample.samplers.power import power_program, power_work_units
from powersample.samplers.rollout import rollout_program, rollout_work_units
from powersample.samplers.smc import smc_program, smc_work_units

_SAMPLERS = {
    "power": (power_program, power_work_units),
    "max-swap": (power_program, power_work_units),
    "power-mtm": (mtm_program, mtm_work_units),
    "power-smc": (smc_program, smc_work_units),
    "base": (plain_program, plain_work_units),
    "low-temp": (plain_program, plain_work_units),
    "power-rollout": (rollout_program, rollout_work_units),
}


def run_chains(
    backend: Backend,
    prompt: Tokens,
    config: SamplerConfig,
    chains: Sequence[Chain],
    progress: Progress | None = None,
) -> list[ChainResult]:
    """Run config.method on every chain (all chains share the prompt and are batched together)."""
    return drive(backend, programs(backend, prompt, config, chains), config.proposal, progress)


def programs(backend: Backend, prompt: Tokens, config: SamplerConfig, chains: Sequence[Chain]) -> list[Program]:
    """One config.method program per chain, for callers that drive programs themselves (the server's engine)."""
    program, _ = _sampler(config.method)
    return [program(prompt, config, c, backend.eos_ids) for c in chains]


def work_units(config: SamplerConfig) -> int:
    """Backend requests one chain makes at most (progress units)."""
    return _sampler(config.method)[1](config)


def _sampler(method: str):
    if method not in _SAMPLERS:
        raise PowerSampleError(f"method {method!r} has no sampler in this version")
    return _SAMPLERS[method]


__all__ = ["Chain", "ChainResult", "Program", "Progress", "programs", "run_chains", "work_units"]
