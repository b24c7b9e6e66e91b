"""What the fidelity tool sweeps: each setting is a method plus the knobs it sets, grouped into plot curves.
A method with no registered sampler in this version is skipped and named in the output, never given a number."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from powersample.config import SamplerConfig
from powersample.errors import PowerSampleError
from powersample.samplers.registry import work_units


@dataclass(frozen=True)
class Setting:
    """One configuration to measure: a method, the knobs it sets, and the curve of the plot it belongs to."""

    method: str
    knobs: tuple[tuple[str, Any], ...] = ()  # SamplerConfig fields beyond alpha and T
    curve: str = ""  # plot curve (method plus the knobs held fixed along it); "" = the method
    swept: str | None = None  # the knob that varies along the curve, shown next to its points

    def config(self, alpha: float, max_new_tokens: int) -> SamplerConfig:
        return SamplerConfig(method=self.method, alpha=alpha, max_new_tokens=max_new_tokens, **dict(self.knobs))

    @property
    def knob_text(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.knobs) or "-"

    def same(self, point: dict[str, Any]) -> bool:
        """Whether a result point (to_dict) measured this method with these knobs, whatever its curve."""
        return point["method"] == self.method and point["knobs"] == dict(self.knobs)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "knobs": dict(self.knobs),
            "curve": self.curve or self.method,
            "swept": self.swept,
        }


def sweep(
    method: str, knob: str, values: Iterable[Any], fixed: dict[str, Any] | None = None, curve: str | None = None
) -> list[Setting]:
    """One curve: `knob` over `values` with the `fixed` knobs; `curve` names it (default: method and fixed knobs)."""
    fixed = fixed or {}
    name = curve or " ".join([method, *(f"{k}={v}" for k, v in fixed.items())])
    return [Setting(method, (*fixed.items(), (knob, v)), name, knob) for v in values]


# The pooled importance weighting of issue 26 (arXiv 2608.14420): power-smc that never resamples, so the particles
# are a pool of full samples, one returned in proportion to its weight.
POOLED = {"ess_threshold": 0.0}

# power-pt (parallel power tempering, samplers/tempering.py): K = 2 and 4 replicas on the default geometric ladder
# from 1 to alpha; on the model also a sharper ladder (from 2), whose flat rung wastes fewer tokens.
PT_REPLICAS = (2, 4)
PT_SHARP = {"replicas": 2, "alpha_min": 2.0}

# Where the methods are compared at a matched token budget: the tokens these settings spend per sample (issue 26's
# targets: on the toy traps power with one block and 16 MH steps, on a model power with 4 blocks and 4 steps).
TOY_REFERENCE = Setting("power", (("block_count", 1), ("mcmc_steps", 16)))
MODEL_REFERENCE = Setting("power", (("block_count", 4), ("mcmc_steps", 4)))


def pt_sweep(steps: Iterable[int], blocks: int, name: str) -> list[Setting]:
    """power-pt at K = 2 and 4 replicas (default geometric ladder up to alpha), `steps` MH steps per stage."""
    return [
        s
        for k in PT_REPLICAS
        for s in sweep(
            "power-pt", "mcmc_steps", steps, {"replicas": k, "block_count": blocks}, f"power-pt K={k} {name}"
        )
    ]


def toy_settings(max_new_tokens: int, vocab_size: int, quick: bool) -> list[Setting]:
    """The toy sweeps: plain baselines, MH at several step counts and block counts, and the three new methods."""
    t, v = max_new_tokens, vocab_size
    if quick:
        return [
            Setting("base"),
            Setting("low-temp"),
            *sweep("power", "mcmc_steps", (1, 8), {"block_count": t}, "power blocks=T"),
            *sweep("power", "mcmc_steps", (16,), {"block_count": 1}, "power blocks=1"),  # TOY_REFERENCE
            *sweep("power-cut", "mcmc_steps", (1, 8), {"block_count": t}, "power-cut blocks=T"),
            *sweep("bon", "bon_tokens", (2 * t,)),
            *sweep("power-mtm", "tries", (2, 4), {"mcmc_steps": 1, "block_count": t}, "power-mtm steps=1 blocks=T"),
            *sweep("power-smc", "particles", (4, 16)),
            *sweep("power-smc", "particles", (4, 16), POOLED, "power-smc pooled IW (ess=0)"),
            *sweep("power-rollout", "rollouts", (1, 4), {"candidates": v}, "power-rollout K=vocab"),
            *pt_sweep((1, 8), 1, "blocks=1"),
        ]
    # fmt: off
    return [
        Setting("base"), Setting("low-temp"),
        *sweep("power", "mcmc_steps", (1, 2, 4, 8, 16), {"block_count": t}, "power blocks=T"),
        *sweep("power", "mcmc_steps", (1, 2, 4, 8, 16), {"block_count": 1}, "power blocks=1"),
        *sweep("power-cut", "mcmc_steps", (1, 2, 4, 8, 16), {"block_count": t}, "power-cut blocks=T"),
        *sweep("power-cut", "mcmc_steps", (1, 2, 4, 8, 16), {"block_count": 1}, "power-cut blocks=1"),
        *sweep("power-mtm", "tries", (2, 4, 8), {"mcmc_steps": 1, "block_count": t}, "power-mtm steps=1 blocks=T"),
        *sweep("power-mtm", "tries", (2, 4, 8), {"mcmc_steps": 4, "block_count": t}, "power-mtm steps=4 blocks=T"),
        *sweep("power-smc", "particles", (4, 16, 64, 256)),
        *sweep("power-smc", "particles", (4, 16, 64, 256), {"ess_threshold": 1.0}, "power-smc resample always"),
        *sweep("power-smc", "particles", (4, 16, 64, 256), {"alpha_ramp": max(1, t // 2)}, "power-smc ramp=T/2"),
        *sweep("power-smc", "particles", (4, 16, 64), POOLED, "power-smc pooled IW (ess=0)"),
        *sweep("power-rollout", "rollouts", (1, 4, 16, 64), {"candidates": v}, "power-rollout K=vocab"),
        *sweep("bon", "bon_tokens", (2 * t, 8 * t, 32 * t)),
        *pt_sweep((1, 2, 3, 4, 6, 8, 12, 16), 1, "blocks=1"),  # 3 and 6: K = 4 and 2 near the budget
        *pt_sweep((1, 2, 4, 8), t, "blocks=T"),
    ]
    # fmt: on


def model_settings(max_new_tokens: int, quick: bool) -> list[Setting]:
    """The model comparison: each method at a cheap and a moderate setting (one each with --quick)."""
    horizon = max(1, max_new_tokens // 6)
    rollout = {"candidates": 4, "rollout_horizon": horizon}
    if quick:
        return [
            Setting("base"),
            Setting("low-temp"),
            *sweep("power", "mcmc_steps", (1,), {"block_count": 2}),
            *sweep("power-mtm", "tries", (2,), {"mcmc_steps": 1, "block_count": 2}),
            *sweep("power-smc", "particles", (4,)),
            *sweep("power-smc", "particles", (4,), POOLED, "power-smc pooled IW (ess=0)"),
            *sweep("power-rollout", "rollouts", (1,), rollout),
            *pt_sweep((1,), 2, "blocks=2"),
        ]
    # fmt: off
    return [
        Setting("base"), Setting("low-temp"),
        *sweep("power", "mcmc_steps", (1, 2, 4), {"block_count": 4}),  # 4 steps: MODEL_REFERENCE
        *sweep("power-cut", "mcmc_steps", (1, 2), {"block_count": 4}),
        *sweep("bon", "bon_tokens", (2 * max_new_tokens, 5 * max_new_tokens)),
        *sweep("power-mtm", "tries", (4,), {"mcmc_steps": 1, "block_count": 4}),
        *sweep("power-smc", "particles", (4, 16, 64)),
        # (not 64 pooled particles on a model: ~2600 tokens a sample, 1-2 min on one thread; the toy sweep has them)
        *sweep("power-smc", "particles", (4, 16), POOLED, "power-smc pooled IW (ess=0)"),
        *sweep("power-rollout", "rollouts", (1, 4), rollout),
        *pt_sweep((1, 2), 4, "blocks=4"),
        *sweep("power-pt", "mcmc_steps", (1, 2), {**PT_SHARP, "block_count": 4}, "power-pt K=2 alpha_min=2 blocks=4"),
    ]
    # fmt: on


def registered(method: str) -> bool:
    """Whether this version has a sampler for `method` (the samplers register themselves)."""
    try:
        work_units(SamplerConfig(method=method))
    except PowerSampleError:
        return False
    return True


def split_registered(
    settings: list[Setting], methods: tuple[str, ...] = ()
) -> tuple[list[Setting], list[dict[str, str]]]:
    """(settings to run, one note per method skipped because no sampler is registered for it); only those of
    `methods` when given."""
    settings = [s for s in settings if not methods or s.method in methods]
    run = [s for s in settings if registered(s.method)]
    missing = dict.fromkeys(s.method for s in settings if not registered(s.method))
    notes = [{"method": m, "reason": "no sampler registered in this version; skipped, no number"} for m in missing]
    return run, notes
