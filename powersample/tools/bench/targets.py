"""The numbers a bench run is judged by: each a ratio of two measured numbers, compared with a fixed bound.

MCMC tokens/s at least 0.85 of plain decoding at the same batch; regenerating from scratch at least 5x slower per
sample than ours, and at least 4x slower than ours with speculative proposals; speculative proposals at least 1.5x
faster per sample than plain ones (one chain: the two draw the same samples); with one MH step per stage, a
speculative chain's wall per sample at most 1.3x plain decoding's; K chains at most a quarter of the wall per
sample of one; peak RSS at most 2 GiB with K chains.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from powersample.tools.bench.phases import PhaseLookup, ratio

GIB_KB = 1024 * 1024  # ru_maxrss is in KB on Linux


@dataclass(frozen=True)
class Target:
    """numerator / denominator, compared with `target`."""

    name: str
    label: str
    numerator: float
    denominator: float
    target: float
    op: str  # ">=" or "<="

    @property
    def value(self) -> float:
        return ratio(self.numerator, self.denominator)

    @property
    def met(self) -> bool:
        return self.value >= self.target if self.op == ">=" else self.value <= self.target

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "label": self.label,
            "numerator": self.numerator,
            "denominator": self.denominator,
            "value": self.value,
            "target": self.target,
            "op": self.op,
            "met": self.met,
        }


def targets(phase: PhaseLookup, mcmc_steps: int) -> list[Target]:
    """The targets of the phases that have run (`phase` looks a run's phases up by name); the one for a single MH
    step per stage only when the run has mcmc_steps = 1."""
    made = [f(phase) for f in TARGETS] + ([_one_step_target(phase)] if mcmc_steps == 1 else [])
    return [t for t in made if t is not None]


def _ratio_target(
    name: str, label: str, num: str, den: str, field: str, bound: float, op: str
) -> Callable[[PhaseLookup], Target | None]:
    """The target `field` of phase `num` over `field` of phase `den`, compared with `bound` by `op`; None until
    both phases have run. `label` may name {num_chains}, {num_speculate} and {den_speculate}."""

    def make(phase: PhaseLookup) -> Target | None:
        a, b = phase(num), phase(den)
        if a is None or b is None:
            return None
        text = label.format(num_chains=a.phase.chains, num_speculate=a.phase.speculate, den_speculate=b.phase.speculate)
        return Target(name, text, getattr(a, field), getattr(b, field), bound, op)

    return make


def _rss_target(phase: PhaseLookup) -> Target | None:
    a = phase("power-K")
    if a is None:
        return None
    return Target("peak_rss_gib_K", f"peak RSS (GiB) after {a.phase.chains} chains", a.peak_rss_kb, GIB_KB, 2.0, "<=")


_one_step_target = _ratio_target(
    "one_step_vs_plain_1",
    "1 MH step/stage: wall/sample, k={num_speculate} / plain",
    "speculative-1",
    "plain-1",
    "wall_per_sample",
    1.3,
    "<=",
)

TARGETS = (
    _ratio_target(
        "rate_power-K_vs_plain-K",
        "MCMC / plain tokens/s, K chains (batch K)",
        "power-K",
        "plain-K",
        "tokens_per_second",
        0.85,
        ">=",
    ),
    _ratio_target(
        "rate_power-1_vs_plain-1",
        "MCMC / plain tokens/s, 1 chain (batch 1)",
        "power-1",
        "plain-1",
        "tokens_per_second",
        0.85,
        ">=",
    ),
    _ratio_target(
        "scratch_vs_ours_1",
        "regenerate-from-scratch wall / ours, 1 chain",
        "scratch-1",
        "power-1",
        "wall_per_sample",
        5.0,
        ">=",
    ),
    _ratio_target(
        "scratch_vs_speculative_1",
        "regenerate-from-scratch wall / k={den_speculate}, 1 chain",
        "scratch-1",
        "speculative-1",
        "wall_per_sample",
        4.0,
        ">=",
    ),
    _ratio_target(
        "speculative_vs_plain_proposals_1",
        "wall/sample, 1 chain, no / k={den_speculate} speculation",
        "power-1",
        "speculative-1",
        "wall_per_sample",
        1.5,
        ">=",
    ),
    _ratio_target(
        "wall_per_sample_K_vs_1",
        "wall per sample, {num_chains} chains / 1 chain",
        "power-K",
        "power-1",
        "wall_per_sample",
        0.25,
        "<=",
    ),
    _rss_target,
)
