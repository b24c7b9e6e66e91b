"""`powersample bench --fidelity`: how close each sampler gets to p^alpha, against what it costs.

Two modes, one list of settings each (a method plus the knobs it sweeps); a method with no registered sampler in
this version is skipped and named in the output, never given a number.

    toy     On exact toy targets. Per spec, the exact law of p^alpha over the sequences of at most T tokens
            (complete ones with their full probability, EOS-free ones cut at T with their prefix probability,
            the target of `power`), enumerated with ToySpec.sequences. Per setting: S samples from one seeded,
            batched sample() call; TV(empirical law, exact law); mean tokens sampled per sample
            (tokens_generated, rejected proposals and discarded particles included); the backend's batched
            extend() calls. The TV floor is the mean TV of S exact samples (simulated), what a perfect sampler
            would score: TVs near it are as good as S samples can tell.
    model   On a real model (the embedded one by default). Per setting, one sample per call (num_samples=1:
            the latency of one sample) for each prompt and seed: mean base log-likelihood per token of the
            outputs, tokens sampled per sample, wall per sample, and that wall over the wall of a plain (`base`)
            sample.

Outputs in the output directory: fidelity_<mode>.json (rewritten atomically after every setting, `complete`
false until the end), fidelity_<mode>.md (the table) and fidelity_<mode>.png. `fidelity_section` renders a
directory's results for `powersample report`.
"""

from __future__ import annotations

import datetime
import io
import json
import math
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from powersample.api import sample
from powersample.backends.toy import ToyBackend, ToySpec
from powersample.config import SamplerConfig
from powersample.errors import PowerSampleError
from powersample.samplers.registry import work_units

SPEC_DIR = Path(__file__).resolve().parent / "toy_specs"
DEFAULT_SPECS = ("fidelity_trap", "fidelity_eos")  # toy targets when --spec is not given
MAX_SEQUENCES = 1_000_000  # refuse to enumerate more (an upper bound from the vocabulary and T)
FLOOR_REPS = 200  # simulated sets of S exact samples behind the TV floor
MODES = ("toy", "model")

Update = Callable[[str, int], None]  # (what runs now, finished units): drives a progress bar
Law = dict[tuple[int, ...], float]


# -- settings ----------------------------------------------------------------------------------------------------


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

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "knobs": dict(self.knobs), "curve": self.curve or self.method,
                "swept": self.swept}


def sweep(method: str, knob: str, values: Iterable[Any], fixed: dict[str, Any] | None = None,
          curve: str | None = None) -> list[Setting]:
    """One curve: `knob` over `values` with the `fixed` knobs; `curve` names it (default: method and fixed knobs)."""
    fixed = fixed or {}
    name = curve or " ".join([method, *(f"{k}={v}" for k, v in fixed.items())])
    return [Setting(method, (*fixed.items(), (knob, v)), name, knob) for v in values]


def toy_settings(max_new_tokens: int, vocab_size: int, quick: bool) -> list[Setting]:
    """The toy sweeps: plain baselines, MH at several step counts and block counts, and the three new methods."""
    t, v = max_new_tokens, vocab_size
    if quick:
        return [Setting("base"), Setting("low-temp"),
                *sweep("power", "mcmc_steps", (1, 8), {"block_count": t}, "power blocks=T"),
                *sweep("power-mtm", "tries", (2, 4), {"mcmc_steps": 1, "block_count": t}, "power-mtm steps=1 blocks=T"),
                *sweep("power-smc", "particles", (4, 16)),
                *sweep("power-rollout", "rollouts", (1, 4), {"candidates": v}, "power-rollout K=vocab")]  # fmt: skip
    return [
        Setting("base"), Setting("low-temp"),
        *sweep("power", "mcmc_steps", (1, 2, 4, 8, 16), {"block_count": t}, "power blocks=T"),
        *sweep("power", "mcmc_steps", (1, 2, 4, 8, 16), {"block_count": 1}, "power blocks=1"),
        *sweep("power-mtm", "tries", (2, 4, 8), {"mcmc_steps": 1, "block_count": t}, "power-mtm steps=1 blocks=T"),
        *sweep("power-mtm", "tries", (2, 4, 8), {"mcmc_steps": 4, "block_count": t}, "power-mtm steps=4 blocks=T"),
        *sweep("power-smc", "particles", (4, 16, 64, 256)),
        *sweep("power-smc", "particles", (4, 16, 64, 256), {"ess_threshold": 1.0}, "power-smc resample always"),
        *sweep("power-smc", "particles", (4, 16, 64, 256), {"alpha_ramp": max(1, t // 2)}, "power-smc ramp=T/2"),
        *sweep("power-rollout", "rollouts", (1, 4, 16, 64), {"candidates": v}, "power-rollout K=vocab"),
    ]  # fmt: skip


def model_settings(max_new_tokens: int, quick: bool) -> list[Setting]:
    """The model comparison: each method at a cheap and a moderate setting (one each with --quick)."""
    horizon = max(1, max_new_tokens // 6)
    rollout = {"candidates": 4, "rollout_horizon": horizon}
    if quick:
        return [Setting("base"), Setting("low-temp"), *sweep("power", "mcmc_steps", (1,), {"block_count": 2}),
                *sweep("power-mtm", "tries", (2,), {"mcmc_steps": 1, "block_count": 2}),
                *sweep("power-smc", "particles", (4,)), *sweep("power-rollout", "rollouts", (1,), rollout)]
    return [
        Setting("base"), Setting("low-temp"),
        *sweep("power", "mcmc_steps", (1, 4), {"block_count": 4}),
        *sweep("power-mtm", "tries", (4,), {"mcmc_steps": 1, "block_count": 4}),
        *sweep("power-smc", "particles", (4, 16, 64)),
        *sweep("power-rollout", "rollouts", (1, 4), rollout),
    ]  # fmt: skip


def registered(method: str) -> bool:
    """Whether this version has a sampler for `method` (the samplers register themselves)."""
    try:
        work_units(SamplerConfig(method=method))
    except PowerSampleError:
        return False
    return True


def split_registered(settings: list[Setting]) -> tuple[list[Setting], list[dict[str, str]]]:
    """(settings to run, one note per method skipped because no sampler is registered for it)."""
    run = [s for s in settings if registered(s.method)]
    missing = dict.fromkeys(s.method for s in settings if not registered(s.method))
    notes = [{"method": m, "reason": "no sampler registered in this version; skipped, no number"} for m in missing]
    return run, notes


# -- the exact law -----------------------------------------------------------------------------------------------


def check_enumerable(spec: ToySpec, max_new_tokens: int) -> None:
    """Fail fast when the sequences up to T may be too many to enumerate (a bound from the vocabulary)."""
    branching = len(spec.vocab) - 1  # EOS ends a sequence
    bound = sum(branching**k for k in range(max_new_tokens + 1))
    if bound > MAX_SEQUENCES:
        raise PowerSampleError(f"a vocabulary of {len(spec.vocab)} with T={max_new_tokens} may have {bound} "
                               f"sequences, over {MAX_SEQUENCES} to enumerate; lower --max-new-tokens")  # fmt: skip


def power_law(spec: ToySpec, alpha: float, max_new_tokens: int) -> Law:
    """The exact p^alpha over every sequence of at most T tokens, normalized in log space.

    Complete sequences (ending in EOS) count with their full probability, EOS-free ones of exactly T tokens
    with their prefix probability: the target of `power` (see samplers/power.py).
    """
    logp = spec.sequences(max_new_tokens)
    logw = {s: alpha * lp for s, lp in logp.items()}
    top = max(logw.values())
    z = math.fsum(math.exp(v - top) for v in logw.values())
    return {s: math.exp(v - top) / z for s, v in logw.items()}


def empirical_law(samples: Iterable[tuple[int, ...]]) -> Law:
    counts: dict[tuple[int, ...], int] = defaultdict(int)
    for s in samples:
        counts[tuple(s)] += 1
    n = sum(counts.values())
    return {s: c / n for s, c in counts.items()}


def tv_distance(a: Law, b: Law) -> float:
    """Total variation: half the L1 distance, over the union of supports."""
    return 0.5 * math.fsum(abs(a.get(k, 0.0) - b.get(k, 0.0)) for k in a.keys() | b.keys())


def tv_floor(law: Law, n: int, seed: int = 0, reps: int = FLOOR_REPS) -> tuple[float, float]:
    """(mean, 95% quantile) of TV(empirical, law) for n exact samples from law, over `reps` simulated sets.

    The mean is what a perfect sampler scores on average; a TV under the quantile is within sampling noise.
    """
    probs = np.fromiter(law.values(), dtype=float)
    probs /= probs.sum()
    counts = np.random.default_rng(seed).multinomial(n, probs, size=reps)  # (reps, support)
    tvs = 0.5 * np.abs(counts / n - probs).sum(axis=1)  # (reps,)
    return float(tvs.mean()), float(np.quantile(tvs, 0.95))


# -- toy mode ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToyTarget:
    """One toy spec to measure on."""

    name: str  # the spec's file stem
    path: str
    max_new_tokens: int

    @classmethod
    def resolve(cls, name_or_path: str, max_new_tokens: int) -> ToyTarget:
        """A shipped spec by name (powersample/toy_specs/NAME.json) or a JSON file by path."""
        shipped = SPEC_DIR / f"{name_or_path}.json"
        path = shipped if shipped.is_file() and os.sep not in name_or_path else Path(name_or_path)
        if not path.is_file():
            names = ", ".join(sorted(p.stem for p in SPEC_DIR.glob("*.json")))
            raise PowerSampleError(f"no toy spec {name_or_path!r}: give a JSON file or one of {names}")
        check_enumerable(ToySpec.load(path), max_new_tokens)  # a malformed spec or a too large T fails now
        return cls(path.stem, str(path), max_new_tokens)


@dataclass(frozen=True)
class FidelityOptions:
    """One fidelity run. Validated at construction."""

    mode: str  # toy | model
    alpha: float = 4.0
    max_new_tokens: int = 6  # T
    samples: int = 1000  # toy: S samples per setting; model: samples (seeds) per prompt
    seed: int = 0
    quick: bool = False
    targets: tuple[ToyTarget, ...] = ()  # toy mode
    prompts: tuple[str, ...] = ()  # model mode
    chat: bool = True  # model mode: apply the chat template

    def __post_init__(self) -> None:
        _check(self.mode in MODES, f"fidelity mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        SamplerConfig(alpha=self.alpha, max_new_tokens=self.max_new_tokens)  # validates alpha and T
        _check(self.samples >= 1, f"--samples must be >= 1, got {self.samples}")
        _check(isinstance(self.seed, int) and self.seed >= 0, f"seed must be an integer >= 0, got {self.seed}")
        _check(self.mode != "toy" or bool(self.targets), "toy fidelity needs at least one spec")
        _check(self.mode != "model" or bool(self.prompts), "model fidelity needs at least one prompt")
        _check(all(p.strip() for p in self.prompts), "prompts must not be empty")


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
        return {**self.setting.to_dict(), "tv": self.tv, "tokens_per_sample": self.tokens_per_sample,
                "calls": self.calls, "mean_length": self.mean_length, "wall_seconds": self.wall_seconds}


def toy_point(backend: ToyBackend, law: Law, setting: Setting, options: FidelityOptions, t: int) -> ToyPoint:
    """S samples of one setting in one seeded, batched call, against the exact law."""
    config = setting.config(options.alpha, t)
    calls = backend.stats.extend_calls
    records = sample(backend, "fidelity", config, seed=options.seed, num_samples=options.samples, chat=False)
    n = len(records)
    return ToyPoint(setting, tv_distance(empirical_law(r.tokens for r in records), law),
                    sum(r.tokens_generated for r in records) / n, backend.stats.extend_calls - calls,
                    sum(len(r.tokens) for r in records) / n, records[0].wall_seconds)  # fmt: skip


def run_toy(options: FidelityOptions, update: Update | None = None,
            on_progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Every registered setting on every target; returns the JSON-ready result."""
    specs = [ToySpec.load(t.path) for t in options.targets]
    out = _header(options) | {"targets": [], "skipped": []}
    for spec, target in zip(specs, options.targets, strict=True):
        settings, out["skipped"] = split_registered(toy_settings(target.max_new_tokens, len(spec.vocab),
                                                                 options.quick))
        check_enumerable(spec, target.max_new_tokens)
        law = power_law(spec, options.alpha, target.max_new_tokens)
        floor, floor_q95 = tv_floor(law, options.samples, options.seed)
        entry = {"spec": target.name, "path": target.path, "max_new_tokens": target.max_new_tokens,
                 "support": len(law), "floor": floor, "floor_q95": floor_q95, "points": []}
        out["targets"].append(entry)
        backend = ToyBackend(spec)
        for setting in settings:
            entry["points"].append(toy_point(backend, law, setting, options, target.max_new_tokens).to_dict())
            _tick(update, f"{target.name}: {setting.method} {setting.knob_text}")
            if on_progress:
                on_progress(out)
    return out | {"complete": True}


def toy_units(options: FidelityOptions) -> int:
    """Progress units of a toy run: one per (target, registered setting)."""
    return sum(len(split_registered(toy_settings(t.max_new_tokens, len(ToySpec.load(t.path).vocab),
                                                 options.quick))[0]) for t in options.targets)  # fmt: skip


# -- model mode --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelPoint:
    """One setting on the model: averages over every (prompt, seed) sample."""

    setting: Setting
    samples: int
    logp_per_token: float  # mean over samples of (sum of base log p) / length
    mean_length: float
    eos_fraction: float
    tokens_per_sample: float  # mean tokens_generated
    wall_per_sample: float  # mean sampling wall of a one-sample call (s)

    def to_dict(self, base_wall: float | None) -> dict[str, Any]:
        ratio = self.wall_per_sample / base_wall if base_wall else None
        return {**self.setting.to_dict(), "samples": self.samples, "logp_per_token": self.logp_per_token,
                "mean_length": self.mean_length, "eos_fraction": self.eos_fraction,
                "tokens_per_sample": self.tokens_per_sample, "wall_per_sample": self.wall_per_sample,
                "wall_vs_base": ratio}  # fmt: skip


def model_point(setting: Setting, records: list[Any]) -> ModelPoint:
    """The averages of one setting's records (SampleRecord) so far."""
    n = len(records)
    return ModelPoint(setting, n, sum(r.logp / max(1, len(r.tokens)) for r in records) / n,
                      sum(len(r.tokens) for r in records) / n,
                      sum(r.finish_reason == "eos" for r in records) / n,
                      sum(r.tokens_generated for r in records) / n,
                      sum(r.wall_seconds for r in records) / n)  # fmt: skip


def run_model(options: FidelityOptions, backend: Any, describe: dict[str, Any], update: Update | None = None,
              on_progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Every registered setting on the loaded backend; `describe` names it in the JSON.

    The settings take turns within each (prompt, seed) round, so that load from other jobs on a shared machine
    slows them alike rather than whichever setting happened to run at the time.
    """
    settings, skipped = split_registered(model_settings(options.max_new_tokens, options.quick))
    out = _header(options) | {"backend": describe, "prompts": list(options.prompts), "skipped": skipped,
                              "points": []}
    sample(backend, options.prompts[0], SamplerConfig(method="base", max_new_tokens=min(4, options.max_new_tokens)),
           seed=options.seed, chat=options.chat)  # untimed warm-up: first-call allocations stay out of the walls
    records: dict[Setting, list[Any]] = {s: [] for s in settings}
    for prompt in options.prompts:
        for k in range(options.samples):
            for setting in settings:
                config = setting.config(options.alpha, options.max_new_tokens)
                records[setting] += sample(backend, prompt, config, seed=options.seed + k, chat=options.chat)
                _tick(update, f"{setting.method} {setting.knob_text}")
            out["points"] = _model_points(records)
            if on_progress:
                on_progress(out)
    return out | {"complete": True, "load_average_end": list(os.getloadavg())}


def _model_points(records: dict[Setting, list[Any]]) -> list[dict[str, Any]]:
    points = [model_point(s, rs) for s, rs in records.items() if rs]
    base = next((p.wall_per_sample for p in points if p.setting.method == "base"), None)
    return [p.to_dict(base) for p in points]


def model_units(options: FidelityOptions) -> int:
    """Progress units of a model run: one per sample() call."""
    settings, _ = split_registered(model_settings(options.max_new_tokens, options.quick))
    return len(settings) * len(options.prompts) * options.samples


# -- tables ------------------------------------------------------------------------------------------------------


def toy_table(data: dict[str, Any]) -> str:
    """Markdown: one table per toy target, then the skipped methods."""
    parts = [_title(data)]
    for t in data["targets"]:
        parts += [(f"\n**{t['spec']}** (T={t['max_new_tokens']}, {t['support']} sequences; TV of "
                   f"{data['samples']} exact samples: mean {t['floor']:.4f} = the floor, 95% under "
                   f"{t['floor_q95']:.4f})\n"),
                  "| method | knobs | TV | TV floor | tokens/sample | calls |", "|---|---|---|---|---|---|"]
        parts += [f"| {p['method']} | {_knobs(p)} | {p['tv']:.4f} | {t['floor']:.4f} | "
                  f"{p['tokens_per_sample']:.1f} | {_opt(p['calls'], 'd')} |" for p in t["points"]]
    return "\n".join(parts + _skipped_lines(data))


def model_table(data: dict[str, Any]) -> str:
    """Markdown: one row per setting on the model, then the skipped methods."""
    head = ("| method | knobs | samples | log-lik/token | mean length | EOS | tokens sampled/sample | "
            "wall s/sample | wall / base |")
    rows = [f"| {p['method']} | {_knobs(p)} | {p['samples']} | {p['logp_per_token']:.3f} | "
            f"{p['mean_length']:.1f} | {p['eos_fraction']:.0%} | {p['tokens_per_sample']:.1f} | "
            f"{p['wall_per_sample']:.2f} | {_opt(p['wall_vs_base'], '.2f')}x |" for p in data["points"]]
    return "\n".join([_title(data), "", head, "|" + "---|" * 9, *rows, *_skipped_lines(data)])


def render_table(data: dict[str, Any]) -> str:
    return toy_table(data) if data["mode"] == "toy" else model_table(data)


def _title(data: dict[str, Any]) -> str:
    state = "" if data.get("complete") else " [PARTIAL: not every setting finished]"
    if data["mode"] == "toy":
        return (f"Fidelity per compute on exact toy targets: TV to p^alpha (alpha={data['alpha']:g}) of "
                f"{data['samples']} samples per setting, seed {data['seed']}{state}")
    b = data["backend"]
    return (f"Fidelity per compute on {b['model']} ({b['name']}{', ' + b['device'] if b.get('device') else ''}, "
            f"{data['machine']['cpu_count']} CPUs): alpha={data['alpha']:g}, T={data['max_new_tokens']}, "
            f"{len(data['prompts'])} prompt(s) x {data['samples']} seed(s), one sample per call; load average "
            f"{_load(data['machine'].get('load_average_start'))} at the start, {_load(data.get('load_average_end'))} "
            f"at the end{state}")


def _load(values: list[float] | None) -> str:
    return "-" if not values else f"{values[0]:.1f}"


def _knobs(point: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in point["knobs"].items()) or "-"


def _skipped_lines(data: dict[str, Any]) -> list[str]:
    return [f"\n- {s['method']}: {s['reason']}" for s in data.get("skipped", [])]


def _opt(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


# -- plots -------------------------------------------------------------------------------------------------------


def toy_figure(data: dict[str, Any]) -> Any:
    """TV against tokens per sample (log-log), one panel per target, one curve per method sweep, floor dashed."""
    targets = data["targets"]
    fig = _figure(len(targets), 6.0)
    colors = _colors([p for t in targets for p in t["points"]])
    for ax, t in zip(fig.axes, targets, strict=True):
        for curve, points in _curves(t["points"]).items():
            _plot_curve(ax, points, "tokens_per_sample", "tv", curve, colors[curve])
        ax.axhline(t["floor"], linestyle="--", color="gray", label=f"TV floor: mean of {data['samples']} exact samples")
        ax.set(xscale="log", yscale="log", xlabel="tokens sampled per sample", ylabel="TV to exact p^alpha",
               title=f"{t['spec']} (T={t['max_new_tokens']}, alpha={data['alpha']:g})")
        low, high = ax.get_ylim()
        ax.axhspan(low, t["floor_q95"], color="gray", alpha=0.12, label="within sampling noise (95%)")
        ax.set_ylim(low, high)
        _plain_ticks(ax)
    fig.axes[-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    return fig


def model_figure(data: dict[str, Any]) -> Any:
    """Log-likelihood per token against tokens sampled and against wall per sample, one curve per sweep."""
    fig = _figure(2, 5.0)
    colors = _colors(data["points"])
    for ax, x, label in zip(fig.axes, ("tokens_per_sample", "wall_per_sample"),
                            ("tokens sampled per sample", "wall per sample (s)"), strict=True):
        for curve, points in _curves(data["points"]).items():
            _plot_curve(ax, points, x, "logp_per_token", curve, colors[curve])
        ax.set(xscale="log", xlabel=label, ylabel="base log-likelihood per token")
        _plain_ticks(ax)
    base = next((p["wall_per_sample"] for p in data["points"] if p["method"] == "base"), None)
    if base:
        fig.axes[1].axvline(2 * base, linestyle="--", color="gray", label="2x the wall of a base sample")
    fig.suptitle(f"{data['backend']['model']}, T={data['max_new_tokens']}, alpha={data['alpha']:g}", fontsize=9)
    fig.axes[-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    return fig


def _curves(points: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for p in points:
        out[p["curve"]].append(p)
    return out


def _colors(points: list[dict[str, Any]]) -> dict[str, Any]:
    """One colour per curve, the same in every panel (tab10, or tab20 past ten curves)."""
    from matplotlib import colormaps

    names = list(dict.fromkeys(p["curve"] for p in points))
    cmap = colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {name: cmap(i % cmap.N) for i, name in enumerate(names)}


def _plain_ticks(ax: Any) -> None:
    """Tick labels like 0.03 and 100 rather than 3x10^-2 on the log axes."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    for axis in (ax.xaxis, ax.yaxis):
        if axis.get_scale() == "log":
            axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            axis.set_minor_formatter(NullFormatter())


def _plot_curve(ax: Any, points: list[dict[str, Any]], x: str, y: str, label: str, color: str) -> None:
    """A line through the points in order of x, each annotated with its swept knob's value."""
    points = sorted(points, key=lambda p: p[x])
    ys = [max(p[y], 1e-4) if y == "tv" else p[y] for p in points]  # a TV of 0 would vanish on a log axis
    ax.plot([p[x] for p in points], ys, marker="o", markersize=4, label=label, color=color)
    for p, yv in zip(points, ys, strict=True):
        if p["swept"]:
            ax.annotate(str(p["knobs"][p["swept"]]), (p[x], yv), fontsize=6, xytext=(3, 3),
                        textcoords="offset points", color=color)


def _figure(panels: int, width: float) -> Any:
    try:
        from matplotlib.figure import Figure
    except ModuleNotFoundError:
        raise PowerSampleError("the fidelity plot needs matplotlib: pip install 'powersample[eval]'") from None
    fig = Figure(figsize=(width * panels + 2.5, 4.5), dpi=90)
    for i in range(panels):
        fig.add_subplot(1, panels, i + 1)
    return fig


def _png(fig: Any) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return _palette_png(buffer.getvalue())


def _palette_png(png: bytes) -> bytes:
    """The same image with a 256-colour palette: about 4x smaller, and the plot's few colours survive (octree)."""
    from PIL import Image  # a matplotlib dependency

    image = Image.open(io.BytesIO(png)).convert("RGB")
    buffer = io.BytesIO()
    image.quantize(colors=256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE).save(
        buffer, format="PNG", optimize=True)
    return buffer.getvalue()


# -- files -------------------------------------------------------------------------------------------------------


def paths(out_dir: Path, mode: str) -> dict[str, Path]:
    return {ext: out_dir / f"fidelity_{mode}.{ext}" for ext in ("json", "md", "png")}


def prepare_dir(out_dir: Path) -> None:
    """Create the output directory now, and fail now (not after the run) when it cannot be written."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PowerSampleError(f"cannot create output directory {out_dir}: {e.strerror}") from None
    if not os.access(out_dir, os.W_OK):
        raise PowerSampleError(f"cannot write to output directory {out_dir}")


def write_json(out_dir: Path, data: dict[str, Any]) -> None:
    from powersample.io import write_bytes_atomic

    write_bytes_atomic(paths(out_dir, data["mode"])["json"], (json.dumps(data, indent=2) + "\n").encode())


def write_outputs(out_dir: Path, data: dict[str, Any]) -> list[Path]:
    """The JSON, the markdown table and the PNG; returns their paths."""
    from powersample.io import write_bytes_atomic

    files = paths(out_dir, data["mode"])
    write_json(out_dir, data)
    write_bytes_atomic(files["md"], (render_table(data) + "\n").encode())
    write_bytes_atomic(files["png"], _png(toy_figure(data) if data["mode"] == "toy" else model_figure(data)))
    return list(files.values())


def _header(options: FidelityOptions) -> dict[str, Any]:
    from powersample.bench import machine_info

    return {"benchmark": "powersample bench --fidelity", "mode": options.mode, "complete": False,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine_info(os.getloadavg()), "alpha": options.alpha,
            "max_new_tokens": options.max_new_tokens, "samples": options.samples, "seed": options.seed,
            "quick": options.quick}  # fmt: skip


# -- powersample report ------------------------------------------------------------------------------------------


def has_fidelity(path: Path) -> bool:
    """Whether a directory holds fidelity results (fidelity_toy.json or fidelity_model.json)."""
    return any(paths(path, mode)["json"].is_file() for mode in MODES)


def fidelity_section(path: Path, plot_dir: Path | None) -> tuple[str, list[Path]]:
    """Markdown for `powersample report`: each mode's table and its PNG (copied into plot_dir when given, so the
    report's links resolve next to report.md). Returns the markdown and the PNGs copied."""
    parts, copied = [], []
    for mode in MODES:
        files = paths(path, mode)
        if not files["json"].is_file():
            continue
        data = _read_json(files["json"])
        parts += [f"## Fidelity per compute ({'exact toy targets' if mode == 'toy' else 'model'}): {path}", "",
                  render_table(data), ""]
        if files["png"].is_file():
            parts += [f"![fidelity per compute, {mode}]({_place_png(files['png'], plot_dir, copied)})", ""]
    return "\n".join(parts).rstrip(), copied


def _place_png(png: Path, plot_dir: Path | None, copied: list[Path]) -> str:
    """The link to the PNG: its copy in plot_dir (atomic) when there is one, else the file where it is."""
    from powersample.io import write_bytes_atomic

    if plot_dir is None:
        return str(png)
    target = plot_dir / png.name
    try:
        data = png.read_bytes()
    except OSError as e:
        raise PowerSampleError(f"cannot read {png}: {e.strerror}") from None
    write_bytes_atomic(target, data)
    copied.append(target)
    return target.name


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PowerSampleError(f"cannot read fidelity results {path}: {e}") from None
    if not isinstance(data, dict) or data.get("mode") not in MODES:
        raise PowerSampleError(f"{path} is not a fidelity result (no 'mode' of {', '.join(MODES)})")
    return data


# -- small helpers -----------------------------------------------------------------------------------------------


def _tick(update: Update | None, what: str) -> None:
    if update:
        update(what, 1)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise PowerSampleError(message)


__all__ = ["FidelityOptions", "Setting", "ToyTarget", "fidelity_section", "has_fidelity", "power_law", "run_model",
           "run_toy", "tv_distance", "tv_floor", "write_outputs"]
