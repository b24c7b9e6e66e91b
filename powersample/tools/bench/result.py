"""Everything one bench run measured, and its JSON (`to_dict`): written after every call, `complete` false until
the last phase finished."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from powersample.backends import BackendSpec
from powersample.samplers import registry
from powersample.tools.bench.eq12 import eq12_summary
from powersample.tools.bench.options import BenchOptions
from powersample.tools.bench.phases import SPECULATIVE_TWINS, PhaseResult, same_samples
from powersample.tools.bench.targets import Target, targets


@dataclass(frozen=True)
class BenchResult:
    """Everything one run measured. `complete` is False while phases are still running (partial JSON)."""

    options: BenchOptions
    machine: dict[str, Any]
    date: str  # ISO 8601, UTC, when the run started
    phases: tuple[PhaseResult, ...]
    complete: bool
    device: str | None = None  # where the backend runs (hf), when it says

    def phase(self, name: str) -> PhaseResult | None:
        """The phase's result, or None when it has not started."""
        return next((p for p in self.phases if p.phase.name == name), None)

    def targets(self) -> list[Target]:
        """The targets, for the phases that have run."""
        return targets(self.phase, self.options.config.mcmc_steps)

    def eq12(self) -> dict[str, Any]:
        return eq12_summary(self.options.config, self.phase)

    def to_dict(self) -> dict[str, Any]:
        return {
            "benchmark": "powersample bench",
            "complete": self.complete,
            "date": self.date,
            "machine": self.machine,
            "backend": backend_dict(self.options.backend, self.device),
            "config": registry.resolved(self.options.config),
            "plain_config": registry.resolved(self.options.plain_config),
            "options": self.options.to_dict(),
            "phases": {p.phase.name: p.to_dict() for p in self.phases},
            "eq12": self.eq12(),
            "targets": {t.name: t.to_dict() for t in self.targets()},
            "speculative_same_samples": self.same_samples(),
        }

    def same_samples(self) -> dict[str, dict[str, int]]:
        """Per speculative phase that has run: how many of its samples are those of its plain twin (same prompt,
        repeat and chain)."""
        out = {}
        for drafted, plain in SPECULATIVE_TWINS.items():
            a, b = self.phase(plain), self.phase(drafted)
            if a is not None and b is not None:
                same, total = same_samples(a, b)
                out[drafted] = {"same": same, "compared": total, "of": plain}
        return out


def backend_dict(spec: BackendSpec, device: str | None) -> dict[str, Any]:
    """The backend in the result JSON (bench, bench --fidelity's model mode)."""
    return {
        "name": spec.name,
        "model": spec.describe(),
        "toy_spec": spec.toy_spec,
        "device": device,
        "dtype": spec.dtype,
        "threads": spec.threads,
        "quant": spec.quant,
    }
