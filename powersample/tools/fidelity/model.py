"""Model mode: every registered setting on a real model (the embedded one by default).

Per setting, one sample per call (num_samples=1: the latency of one sample) for each prompt and seed: mean base
log-likelihood per token of the outputs (with its standard error, and its gap to power with 4 blocks and 4 steps,
paired by (prompt, seed), when that was measured), tokens sampled per sample, wall per sample, and
that wall over the wall of a plain (`base`) sample; and every curve at the token budget of power with 4 blocks and
4 steps (budget.py).
"""

from __future__ import annotations

import math
import os
import statistics
from dataclasses import dataclass
from typing import Any, Callable

from powersample.api import sample
from powersample.backends.base import Backend
from powersample.tools.common import Update, tick, warm_up
from powersample.tools.fidelity.budget import matched_budget
from powersample.tools.fidelity.options import FidelityOptions
from powersample.tools.fidelity.settings import MODEL_REFERENCE, Setting, model_settings, split_registered


@dataclass(frozen=True)
class ModelPoint:
    """One setting on the model: averages over every (prompt, seed) sample."""

    setting: Setting
    samples: int
    logp_per_token: float  # mean over samples of (sum of base log p) / length
    logp_per_token_se: float | None  # its standard error (sample sd / sqrt(samples)); None under 2 samples
    mean_length: float
    eos_fraction: float
    tokens_per_sample: float  # mean tokens_generated
    wall_per_sample: float  # mean sampling wall of a one-sample call (s)
    vs_reference: tuple[float, float | None] | None = None  # paired gap to MODEL_REFERENCE: (mean, se)

    def to_dict(self, base_wall: float | None) -> dict[str, Any]:
        ratio = self.wall_per_sample / base_wall if base_wall else None
        return {
            **self.setting.to_dict(),
            "samples": self.samples,
            "logp_per_token": self.logp_per_token,
            "logp_per_token_se": self.logp_per_token_se,
            "mean_length": self.mean_length,
            "eos_fraction": self.eos_fraction,
            "tokens_per_sample": self.tokens_per_sample,
            "wall_per_sample": self.wall_per_sample,
            "wall_vs_base": ratio,
            "vs_reference": None if self.vs_reference is None else dict(zip(("mean", "se"), self.vs_reference)),
        }


def model_point(setting: Setting, records: list[Any], reference: list[Any] | None = None) -> ModelPoint:
    """The averages of one setting's records (SampleRecord) so far; with the reference setting's records of the
    same (prompt, seed) rounds, the paired gap in log-lik per token to it."""
    n = len(records)
    per_token = [_per_token(r) for r in records]
    return ModelPoint(
        setting,
        n,
        *mean_se(per_token),
        sum(len(r.tokens) for r in records) / n,
        sum(r.finish_reason == "eos" for r in records) / n,
        sum(r.tokens_generated for r in records) / n,
        sum(r.wall_seconds for r in records) / n,
        mean_se([a - _per_token(b) for a, b in zip(per_token, reference)]) if reference else None,
    )


def mean_se(values: list[float]) -> tuple[float, float | None]:
    """The mean and its standard error (sample sd / sqrt(n); None for one value)."""
    n = len(values)
    return statistics.fmean(values), statistics.stdev(values) / math.sqrt(n) if n > 1 else None


def _per_token(record: Any) -> float:
    return record.logp / max(1, len(record.tokens))


def run_model(
    options: FidelityOptions,
    backend: Backend,
    describe: dict[str, Any],
    update: Update | None = None,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Every registered setting on the loaded backend; `describe` names it in the JSON.

    The settings take turns within each (prompt, seed) round, so that load from other jobs on a shared machine
    slows them alike rather than whichever setting happened to run at the time.
    """
    settings, skipped = split_registered(model_settings(options.max_new_tokens, options.quick), options.methods)
    out = options.header() | {"backend": describe, "prompts": list(options.prompts), "skipped": skipped}
    out |= {"points": [], "matched": None}
    warm_up(backend, options.prompts[0], options.max_new_tokens, options.seed, options.chat)
    records: dict[Setting, list[Any]] = {s: [] for s in settings}
    for prompt in options.prompts:
        for k in range(options.samples):
            for setting in settings:
                config = setting.config(options.alpha, options.max_new_tokens)
                records[setting] += sample(backend, prompt, config, seed=options.seed + k, chat=options.chat)
                tick(update, f"{setting.method} {setting.knob_text}")
            out["points"] = _model_points(records)
            out["matched"] = matched_budget(out["points"], MODEL_REFERENCE, "model")
            if on_progress:
                on_progress(out)
    return out | {"complete": True, "load_average_end": list(os.getloadavg())}


def _model_points(records: dict[Setting, list[Any]]) -> list[dict[str, Any]]:
    reference = next((rs for s, rs in records.items() if MODEL_REFERENCE.same(s.to_dict())), None)
    points = [model_point(s, rs, reference) for s, rs in records.items() if rs]
    base = next((p.wall_per_sample for p in points if p.setting.method == "base"), None)
    return [p.to_dict(base) for p in points]


def model_units(options: FidelityOptions) -> int:
    """Progress units of a model run: one per sample() call."""
    settings, _ = split_registered(model_settings(options.max_new_tokens, options.quick), options.methods)
    return len(settings) * len(options.prompts) * options.samples
