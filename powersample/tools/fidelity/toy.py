"""Toy mode: every registered setting on exact toy targets, TV to p^alpha against tokens sampled.

Per spec, the exact law (exact.power_law). Per setting: S samples from one seeded, batched sample() call;
TV(empirical law, exact law); mean tokens sampled per sample (tokens_generated, rejected proposals and discarded
particles included); the backend's batched extend() calls. Per target, every curve at the token budget of power
with one block and 16 steps (budget.py). The TV floor is the mean TV of S exact samples
(simulated), what a perfect sampler would score: TVs near it are as good as S samples can tell.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from powersample.api import sample
from powersample.backends.toy import ToyBackend, ToySpec
from powersample.tools.common import Update, tick
from powersample.tools.fidelity.budget import matched_budget
from powersample.tools.fidelity.exact import Law, check_enumerable, empirical_law, power_law, tv_distance, tv_floor
from powersample.tools.fidelity.options import FidelityOptions, ToyTarget
from powersample.tools.fidelity.settings import TOY_REFERENCE, Setting, split_registered, toy_settings


@dataclass(frozen=True)
class ToyPoint:
    """One setting on one toy target."""

    setting: Setting
    tv: float  # TV(empirical law of the S samples, exact p^alpha)
    tokens_per_sample: float  # mean tokens_generated
    calls: int | None  # backend extend() calls of the batched sample() call
    mean_length: float  # mean tokens in the outputs
    wall_seconds: float  # sampling wall of the batch (toy: Python overhead, not a model's cost)

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.setting.to_dict(),
            "tv": self.tv,
            "tokens_per_sample": self.tokens_per_sample,
            "calls": self.calls,
            "mean_length": self.mean_length,
            "wall_seconds": self.wall_seconds,
        }


def toy_point(backend: ToyBackend, law: Law, setting: Setting, options: FidelityOptions, t: int) -> ToyPoint:
    """S samples of one setting in one seeded, batched call, against the exact law."""
    config = setting.config(options.alpha, t)
    calls = backend.stats.extend_calls
    records = sample(backend, "fidelity", config, seed=options.seed, num_samples=options.samples, chat=False)
    n = len(records)
    return ToyPoint(
        setting,
        tv_distance(empirical_law(r.tokens for r in records), law),
        sum(r.tokens_generated for r in records) / n,
        backend.stats.extend_calls - calls,
        sum(len(r.tokens) for r in records) / n,
        records[0].wall_seconds,
    )


def run_toy(
    options: FidelityOptions, update: Update | None = None, on_progress: Callable[[dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    """Every registered setting on every target; returns the JSON-ready result."""
    specs = [ToySpec.load(t.path) for t in options.targets]
    out = options.header() | {"targets": [], "skipped": []}
    for spec, target in zip(specs, options.targets, strict=True):
        settings, out["skipped"] = _settings(target, spec, options)
        check_enumerable(spec, target.max_new_tokens)
        law = power_law(spec, options.alpha, target.max_new_tokens)
        entry = _target_entry(law, target, options)
        out["targets"].append(entry)
        backend = ToyBackend(spec)
        for setting in settings:
            entry["points"].append(toy_point(backend, law, setting, options, target.max_new_tokens).to_dict())
            entry["matched"] = matched_budget(entry["points"], TOY_REFERENCE, "toy")
            tick(update, f"{target.name}: {setting.method} {setting.knob_text}")
            if on_progress:
                on_progress(out)
    return out | {"complete": True}


def _settings(target: ToyTarget, spec: ToySpec, options: FidelityOptions) -> tuple[list[Setting], list[dict[str, str]]]:
    """The target's registered settings (of options.methods, when given), and the notes on the skipped methods."""
    return split_registered(toy_settings(target.max_new_tokens, len(spec.vocab), options.quick), options.methods)


def _target_entry(law: Law, target: ToyTarget, options: FidelityOptions) -> dict[str, Any]:
    """A target's JSON entry before its points: the exact law's support and the TV floor of S exact samples."""
    floor, floor_q95 = tv_floor(law, options.samples, options.seed)
    return {
        "spec": target.name,
        "path": target.path,
        "max_new_tokens": target.max_new_tokens,
        "support": len(law),
        "floor": floor,
        "floor_q95": floor_q95,
        "points": [],
        "matched": None,  # every curve at the tokens of settings.TOY_REFERENCE (budget.py)
    }


def toy_units(options: FidelityOptions) -> int:
    """Progress units of a toy run: one per (target, registered setting)."""
    return sum(len(_settings(t, ToySpec.load(t.path), options)[0]) for t in options.targets)
