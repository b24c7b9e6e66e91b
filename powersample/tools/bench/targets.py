"""The numbers a bench run is judged by: each a ratio of two measured numbers, compared with a fixed bound.

MCMC tokens/s at least 0.85 of plain decoding at the same batch; regenerating from scratch at least 5x slower per
sample than ours; speculative proposals at least 1.5x faster per sample than plain ones (one chain); K chains at most a quarter of the wall per sample of one; peak RSS at most 2 GiB with K chains.
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
        return {"name": self.name, "label": self.label, "numerator": self.numerator,
                "denominator": self.denominator, "value": self.value, "target": self.target, "op": self.op,
                "met": self.met}


def targets(phase: PhaseLookup) -> list[Target]:
    """The targets of the phases that have run (`phase` looks a run's phases up by name)."""
    return [t for t in (f(phase) for f in TARGETS) if t is not None]


def _rate_target(power: str, plain: str, label: str) -> Callable[[PhaseLookup], Target | None]:
    """MCMC tokens/s over plain tokens/s at the same batch."""
    def make(phase: PhaseLookup) -> Target | None:
        a, b = phase(power), phase(plain)
        if a is None or b is None:
            return None
        return Target(f"rate_{power}_vs_{plain}", label, a.tokens_per_second, b.tokens_per_second, 0.85, ">=")
    return make


def _scratch_target(phase: PhaseLookup) -> Target | None:
    a, b = phase("scratch-1"), phase("power-1")
    if a is None or b is None:
        return None
    return Target("scratch_vs_ours_1", "regenerate-from-scratch wall / ours, 1 chain", a.wall_per_sample,
                  b.wall_per_sample, 5.0, ">=")


def _speculative_target(phase: PhaseLookup) -> Target | None:
    a, b = phase("power-1"), phase("speculative-1")
    if a is None or b is None:
        return None
    return Target("speculative_vs_plain_proposals_1", f"wall/sample, 1 chain, no / k={b.phase.speculate} speculation",
                  a.wall_per_sample, b.wall_per_sample, 1.5, ">=")


def _batch_target(phase: PhaseLookup) -> Target | None:
    a, b = phase("power-K"), phase("power-1")
    if a is None or b is None:
        return None
    return Target("wall_per_sample_K_vs_1", f"wall per sample, {a.phase.chains} chains / 1 chain",
                  a.wall_per_sample, b.wall_per_sample, 0.25, "<=")


def _rss_target(phase: PhaseLookup) -> Target | None:
    a = phase("power-K")
    if a is None:
        return None
    return Target("peak_rss_gib_K", f"peak RSS (GiB) after {a.phase.chains} chains", a.peak_rss_kb, GIB_KB,
                  2.0, "<=")


TARGETS = (
    _rate_target("power-K", "plain-K", "MCMC / plain tokens/s, K chains (batch K)"),
    _rate_target("power-1", "plain-1", "MCMC / plain tokens/s, 1 chain (batch 1)"),
    _scratch_target,
    _speculative_target,
    _batch_target,
    _rss_target,
)
