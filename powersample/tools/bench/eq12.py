"""Eq. 12 of the paper (Karan & Du, 2025) next to what the power phases actually sampled.

The estimate itself, N T^2 / (4B) + T, is defined once beside the algorithm it estimates
(samplers.power.eq12_tokens). Here: the exact mean when nothing ends at EOS, and the measured tokens per sample.
"""

from __future__ import annotations

from typing import Any

from powersample.config import SamplerConfig
from powersample.samplers.power import eq12_tokens
from powersample.tools.bench.phases import PhaseLookup

# the phases that run the MCMC config
POWER_PHASES = ("power-K", "speculative-K", "power-1", "speculative-1", "scratch-1")


def eq12_tokens_per_sample(config: SamplerConfig) -> float:
    """Eq. 12's estimate for this config (samplers.power.eq12_tokens)."""
    return eq12_tokens(config.max_new_tokens, config.block, config.mcmc_steps)


def expected_tokens_full_length(config: SamplerConfig) -> float:
    """The exact mean when nothing ends at EOS: a stage with length cap L proposes N suffixes of mean (L+1)/2
    (i is uniform on 0..L-1), and the extensions add T."""
    return config.max_new_tokens + config.mcmc_steps * sum((cap + 1) / 2 for cap in config.stage_caps())


def eq12_summary(config: SamplerConfig, phase: PhaseLookup) -> dict[str, Any]:
    """Eq. 12's estimate next to the tokens the power phases (looked up by `phase`) actually sampled per sample."""
    out: dict[str, Any] = {
        "formula": "N*T^2/(4B) + T",
        "estimate_tokens_per_sample": eq12_tokens_per_sample(config),
        "expected_tokens_per_sample_full_length": expected_tokens_full_length(config),
        "note": "actual is lower when samples (or proposals) end early at EOS",
    }
    for name in POWER_PHASES:
        p = phase(name)
        if p is not None:
            means = p.per_sample()
            out[name] = {
                "actual_tokens_per_sample": means["mean_tokens_sampled_per_sample"],
                "mean_length": means["mean_length"],
                "eos_fraction": means["eos_fraction"],
            }
    return out
