"""`powersample bench`: how fast power sampling runs next to plain decoding and next to regenerating from scratch.

Phases, in this order, on the same prompts with the same seeds (prompt i uses seed + i everywhere):

    plain-1    method `base`, 1 chain per prompt                    the backend's decoding rate at batch 1
    plain-K    method `base`, K chains per prompt                   ... at batch K: the limit for K chains
    power-K    the MCMC config, K chains per prompt (batched)
    power-1    the MCMC config, 1 chain per prompt
    scratch-1  power-1 on a second backend loaded with reuse_cache=False: every request prefills its whole
               context from an empty cache, one request at a time (the paper's approach)

Rates count every sampled token, rejected proposals included (`SampleRecord.tokens_generated`), over the
sampling wall (`SampleRecord.wall_seconds`: model loading and tokenization excluded). Each backend first samples
a few tokens untimed (warm-up). Over repeats, a phase reports the median wall and the median token count.
Peak RSS is `ru_maxrss` after each phase; the second backend is loaded only after power-1, so the peaks of the
first four phases hold one model.

Eq. 12 of the paper (Karan & Du, 2025): with T tokens, block size B and N MH steps per stage, stage k runs N
proposals that each regenerate on average half of the current kB tokens, so a sample costs about
N * B/2 * sum_k k ~ N T^2 / (4B) sampled tokens, plus the T tokens of the stage extensions.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from powersample.api import sample
from powersample.backends import BackendSpec
from powersample.backends.base import Backend
from powersample.config import SamplerConfig
from powersample.errors import PowerSampleError
from powersample.samplers import registry
from powersample.samplers.registry import MCMC_METHODS, work_units

PROMPTS = (  # built-in prompts: short math and reasoning questions
    "What is 17 * 24? Think step by step, then give the answer.",
    "A train travels 60 km in 45 minutes. What is its average speed in km/h? Explain briefly.",
    "If x + 2x + 3x = 42, what is x? Show your reasoning.",
    "Is 221 a prime number? Explain why or why not.",
    "A rectangle has perimeter 30 and one side of length 6. What is its area? Reason step by step.",
    "Tom is twice as old as Ann. In 5 years their ages will sum to 40. How old is Ann now?",
    "What is the sum of the integers from 1 to 50? Explain how you compute it.",
    "A shirt costs $40 after a 20% discount. What was the original price? Show your work.",
)
WARMUP_TOKENS = 4  # untimed tokens each backend samples first (first-call allocations, lazy initialization)
GIB_KB = 1024 * 1024  # ru_maxrss is in KB on Linux

Update = Callable[[str, int], None]  # (phase label, finished work units): drives a progress bar


@dataclass(frozen=True)
class BenchOptions:
    """One benchmark run. Validated at construction."""

    config: SamplerConfig  # the MCMC config of the power phases (method power or max-swap)
    prompts: tuple[str, ...]  # the same prompts in every phase
    backend: BackendSpec = BackendSpec("hf")  # loaded twice: as is, and with reuse_cache=False (scratch phase)
    chains: int = 8  # K: chains per prompt in the batched phases
    repeats: int = 1  # R: each phase runs R times; medians are reported
    seed: int = 0  # prompt i uses seed + i in every phase and repeat
    chat: bool = True  # apply the chat template
    quick: bool = False  # the tiny CI profile was asked for (recorded only)

    def __post_init__(self) -> None:
        _check(self.config.method in MCMC_METHODS,
               f"bench measures an MCMC method; --method must be one of {', '.join(MCMC_METHODS)}")
        _check(len(self.prompts) >= 1, "bench needs at least one prompt (--prompts must be >= 1)")
        _check(all(p.strip() for p in self.prompts), "bench prompts must not be empty")
        _check(self.chains >= 1, f"chains must be >= 1, got {self.chains}")
        _check(self.repeats >= 1, f"repeats must be >= 1, got {self.repeats}")
        _check(isinstance(self.seed, int) and self.seed >= 0, f"seed must be an integer >= 0, got {self.seed}")

    @property
    def plain_config(self) -> SamplerConfig:
        """The plain-decoding phases: method base (tau = 1) with the same T."""
        return SamplerConfig(method="base", max_new_tokens=self.config.max_new_tokens)


@dataclass(frozen=True)
class Phase:
    """What one phase runs."""

    name: str  # plain-1, plain-K, power-K, power-1, scratch-1
    label: str  # for the table
    chains: int  # chains per prompt (the batch)
    method: str  # "base" (plain decoding) or the MCMC config's method
    reuse_cache: bool  # False: the regenerate-from-scratch backend

    @property
    def plain(self) -> bool:
        return self.method == "base"


def phases(options: BenchOptions) -> tuple[Phase, ...]:
    """The five phases, in the order they run."""
    k, mcmc = options.chains, options.config.method
    return (
        Phase("plain-1", "plain decode, batch 1", 1, "base", True),
        Phase("plain-K", f"plain decode, batch {k}", k, "base", True),
        Phase("power-K", f"{mcmc} sampling, {k} chains", k, mcmc, True),
        Phase("power-1", f"{mcmc} sampling, 1 chain", 1, mcmc, True),
        Phase("scratch-1", "regenerate from scratch, 1 chain", 1, mcmc, False),
    )


@dataclass(frozen=True)
class CallStats:
    """One `sample()` call: one prompt, `chains` samples drawn together."""

    repeat: int
    prompt_index: int
    seed: int
    wall_seconds: float  # sampling wall of the batch (record.wall_seconds)
    tokens_generated: tuple[int, ...]  # per sample: every token sampled, rejected proposals included
    lengths: tuple[int, ...]  # per sample: final length (tokens)
    finish_reasons: tuple[str, ...]  # per sample: eos | length
    proposals: int  # MH proposals, all samples
    accepted: int  # accepted MH proposals, all samples


@dataclass(frozen=True)
class PhaseResult:
    """The calls of one phase and what they add up to (medians over repeats)."""

    phase: Phase
    calls: tuple[CallStats, ...]
    peak_rss_kb: int  # ru_maxrss after the phase (or after its last call so far)
    load_average: tuple[float, ...]  # os.getloadavg() after the phase: other jobs on the machine

    def _per_repeat(self, value: Callable[[CallStats], float]) -> float:
        """Median over repeats of the sum of value(call) over a repeat's calls."""
        repeats = sorted({c.repeat for c in self.calls})
        return statistics.median(sum(value(c) for c in self.calls if c.repeat == r) for r in repeats)

    @property
    def samples(self) -> int:
        """Samples per repeat (prompts done x chains)."""
        return len({c.prompt_index for c in self.calls}) * self.phase.chains

    @property
    def wall_seconds(self) -> float:
        return self._per_repeat(lambda c: c.wall_seconds)

    @property
    def tokens_sampled(self) -> float:
        return self._per_repeat(lambda c: sum(c.tokens_generated))

    @property
    def tokens_per_second(self) -> float:
        return _ratio(self.tokens_sampled, self.wall_seconds)

    @property
    def wall_per_sample(self) -> float:
        return _ratio(self.wall_seconds, self.samples)

    @property
    def acceptance_rate(self) -> float | None:
        proposals = sum(c.proposals for c in self.calls)
        return sum(c.accepted for c in self.calls) / proposals if proposals else None

    def sample_mean(self, value: Callable[[CallStats], tuple]) -> float:
        """Mean over every sample of every repeat of a per-sample tuple field."""
        values = [v for c in self.calls for v in value(c)]
        return sum(values) / len(values)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.phase.name, "label": self.phase.label, "chains": self.phase.chains,
            "method": self.phase.method, "reuse_cache": self.phase.reuse_cache,
            "samples": self.samples, "tokens_sampled": self.tokens_sampled, "wall_seconds": self.wall_seconds,
            "tokens_per_second": self.tokens_per_second, "wall_per_sample": self.wall_per_sample,
            "acceptance_rate": self.acceptance_rate,
            "mean_tokens_sampled_per_sample": self.sample_mean(lambda c: c.tokens_generated),
            "mean_length": self.sample_mean(lambda c: c.lengths),
            "eos_fraction": self.sample_mean(lambda c: tuple(r == "eos" for r in c.finish_reasons)),
            "peak_rss_kb": self.peak_rss_kb, "load_average": list(self.load_average),
            "calls": [_call_dict(c) for c in self.calls],
        }


@dataclass(frozen=True)
class Target:
    """A number from the issue's targets: numerator / denominator, compared with `target`."""

    name: str
    label: str
    numerator: float
    denominator: float
    target: float
    op: str  # ">=" or "<="

    @property
    def value(self) -> float:
        return _ratio(self.numerator, self.denominator)

    @property
    def met(self) -> bool:
        return self.value >= self.target if self.op == ">=" else self.value <= self.target

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "label": self.label, "numerator": self.numerator,
                "denominator": self.denominator, "value": self.value, "target": self.target, "op": self.op,
                "met": self.met}


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
        """The issue's targets, for the phases that have run."""
        return [t for t in (f(self) for f in _TARGETS) if t is not None]

    def eq12(self) -> dict[str, Any]:
        return eq12_summary(self)

    def to_dict(self) -> dict[str, Any]:
        return {
            "benchmark": "powersample bench", "complete": self.complete, "date": self.date,
            "machine": self.machine, "backend": backend_dict(self.options.backend, self.device),
            "config": registry.resolved(self.options.config), "plain_config": registry.resolved(self.options.plain_config),
            "options": options_dict(self.options),
            "phases": {p.phase.name: p.to_dict() for p in self.phases},
            "eq12": self.eq12(), "targets": {t.name: t.to_dict() for t in self.targets()},
        }


# -- running -----------------------------------------------------------------------------------------------------


def run_bench(
    options: BenchOptions, update: Update | None = None, on_progress: Callable[[BenchResult], None] | None = None
) -> BenchResult:
    """Run every phase; `update` drives a progress bar, `on_progress` sees the partial result after each call."""
    date, load_average = utc_now(), os.getloadavg()
    backend = options.backend.load()
    run = _Run(options, machine_info(load_average), date, update, on_progress, _device(backend))
    warm_up(backend, options)
    for phase in phases(options):
        if not phase.reuse_cache:
            del backend  # the scratch backend replaces it; ru_maxrss keeps the peak anyway
            run.say(phase.label, 0, "loading")
            backend = replace(options.backend, reuse_cache=False).load()
            warm_up(backend, options)
        run.run_phase(backend, phase)
    return run.result(complete=True)


@dataclass
class _Run:
    """The mutable bookkeeping of run_bench: finished phases, and the calls of the running one."""

    options: BenchOptions
    machine: dict[str, Any]
    date: str
    update: Update | None
    on_progress: Callable[[BenchResult], None] | None
    device: str | None = None
    done: list[PhaseResult] = field(default_factory=list)

    def run_phase(self, backend: Backend, phase: Phase) -> None:
        """Every repeat of every prompt; the phase result is refreshed after each call."""
        calls: list[CallStats] = []
        units = work_units(self.options.plain_config if phase.plain else self.options.config) * phase.chains
        for repeat in range(self.options.repeats):
            for i in range(len(self.options.prompts)):
                reported = [0]  # units the sampler reported; an early stop at EOS reports fewer
                calls.append(run_call(backend, self.options, phase, repeat, i, self._progress(phase, reported)))
                self.say(phase.label, max(0, units - reported[0]), "")
                current = PhaseResult(phase, tuple(calls), peak_rss_kb(), os.getloadavg())
                self._publish(current)
        self.done.append(current)

    def _progress(self, phase: Phase, reported: list[int]) -> Callable[[int], None]:
        def progress(n: int) -> None:
            reported[0] += n
            self.say(phase.label, n, "")
        return progress

    def say(self, label: str, n: int, what: str) -> None:
        """Tell the progress bar: `n` more units done, now in `label` (doing `what`, when not empty)."""
        if self.update:
            self.update(f"{label} ({what})" if what else label, n)

    def _publish(self, current: PhaseResult) -> None:
        if self.on_progress:
            self.on_progress(BenchResult(self.options, self.machine, self.date, (*self.done, current), False,
                                         self.device))

    def result(self, complete: bool) -> BenchResult:
        return BenchResult(self.options, self.machine, self.date, tuple(self.done), complete, self.device)


def run_call(
    backend: Backend, options: BenchOptions, phase: Phase, repeat: int, index: int,
    progress: Callable[[int], None] | None,
) -> CallStats:
    """One prompt of one phase: `phase.chains` samples drawn together, seeded with seed + index."""
    config = options.plain_config if phase.plain else options.config
    seed = options.seed + index
    records = sample(backend, options.prompts[index], config, seed=seed, num_samples=phase.chains,
                     chat=options.chat, progress=progress)
    return CallStats(
        repeat=repeat, prompt_index=index, seed=seed, wall_seconds=records[0].wall_seconds,
        tokens_generated=tuple(r.tokens_generated for r in records),
        lengths=tuple(len(r.tokens) for r in records),
        finish_reasons=tuple(r.finish_reason for r in records),
        proposals=sum(r.proposals for r in records), accepted=sum(r.accepted for r in records),
    )


def warm_up(backend: Backend, options: BenchOptions) -> None:
    """Sample a few tokens untimed, so that first-call costs (allocations, lazy init) stay out of the timings."""
    tokens = min(WARMUP_TOKENS, options.config.max_new_tokens)
    sample(backend, options.prompts[0], SamplerConfig(method="base", max_new_tokens=tokens),
           seed=options.seed, chat=options.chat)


def total_work_units(options: BenchOptions) -> int:
    """Progress units of a whole run (for the progress bar's total)."""
    calls = options.repeats * len(options.prompts)
    plain, power = work_units(options.plain_config), work_units(options.config)  # per chain
    return calls * sum((plain if p.plain else power) * p.chains for p in phases(options))


# -- summaries ---------------------------------------------------------------------------------------------------


def eq12_tokens_per_sample(config: SamplerConfig) -> float:
    """Eq. 12 of the paper: N T^2 / (4B) tokens sampled by the MH steps, plus the T tokens of the extensions."""
    t, b, n = config.max_new_tokens, config.block, config.mcmc_steps
    return n * t * t / (4 * b) + t


def expected_tokens_full_length(config: SamplerConfig) -> float:
    """The exact mean when nothing ends at EOS: a stage with length cap L proposes N suffixes of mean (L+1)/2
    (i is uniform on 0..L-1), and the extensions add T."""
    return config.max_new_tokens + config.mcmc_steps * sum((cap + 1) / 2 for cap in config.stage_caps())


def eq12_summary(result: BenchResult) -> dict[str, Any]:
    """Eq. 12's estimate next to the tokens the power phases actually sampled per sample."""
    config = result.options.config
    out: dict[str, Any] = {
        "formula": "N*T^2/(4B) + T",
        "estimate_tokens_per_sample": eq12_tokens_per_sample(config),
        "expected_tokens_per_sample_full_length": expected_tokens_full_length(config),
        "note": "actual is lower when samples (or proposals) end early at EOS",
    }
    for name in ("power-K", "power-1", "scratch-1"):
        p = result.phase(name)
        if p is not None:
            out[name] = {"actual_tokens_per_sample": p.sample_mean(lambda c: c.tokens_generated),
                         "mean_length": p.sample_mean(lambda c: c.lengths),
                         "eos_fraction": p.sample_mean(lambda c: tuple(r == "eos" for r in c.finish_reasons))}
    return out


def _rate_target(power: str, plain: str, label: str) -> Callable[[BenchResult], Target | None]:
    """MCMC tokens/s over plain tokens/s at the same batch."""
    def make(r: BenchResult) -> Target | None:
        a, b = r.phase(power), r.phase(plain)
        if a is None or b is None:
            return None
        return Target(f"rate_{power}_vs_{plain}", label, a.tokens_per_second, b.tokens_per_second, 0.85, ">=")
    return make


def _scratch_target(r: BenchResult) -> Target | None:
    a, b = r.phase("scratch-1"), r.phase("power-1")
    if a is None or b is None:
        return None
    return Target("scratch_vs_ours_1", "regenerate-from-scratch wall / ours, 1 chain", a.wall_per_sample,
                  b.wall_per_sample, 5.0, ">=")


def _batch_target(r: BenchResult) -> Target | None:
    a, b = r.phase("power-K"), r.phase("power-1")
    if a is None or b is None:
        return None
    return Target("wall_per_sample_K_vs_1", f"wall per sample, {a.phase.chains} chains / 1 chain",
                  a.wall_per_sample, b.wall_per_sample, 0.25, "<=")


def _rss_target(r: BenchResult) -> Target | None:
    a = r.phase("power-K")
    if a is None:
        return None
    return Target("peak_rss_gib_K", f"peak RSS (GiB) after {a.phase.chains} chains", a.peak_rss_kb, GIB_KB,
                  2.0, "<=")


_TARGETS = (
    _rate_target("power-K", "plain-K", "MCMC / plain tokens/s, K chains (batch K)"),
    _rate_target("power-1", "plain-1", "MCMC / plain tokens/s, 1 chain (batch 1)"),
    _scratch_target,
    _batch_target,
    _rss_target,
)


# -- reporting ---------------------------------------------------------------------------------------------------


def format_table(result: BenchResult) -> str:
    """The human-readable report: phases, Eq. 12, and each target with met / missed."""
    return "\n".join([_header(result), "", *_phase_rows(result), "", *_eq12_lines(result), "",
                      *_target_rows(result)])


def _header(result: BenchResult) -> str:
    o, c = result.options, result.options.config
    state = "" if result.complete else " [PARTIAL: not every phase finished]"
    where = f" on {result.device}" if result.device else ""
    return (f"powersample bench: {o.backend.name} ({o.backend.describe()}){where}, "
            f"{result.machine['cpu_count']} CPUs; {c.method} alpha={c.alpha:g} T={c.max_new_tokens} "
            f"B={c.block} N={c.mcmc_steps}; {len(o.prompts)} prompt(s), K={o.chains}, "
            f"{o.repeats} repeat(s){state}")


def _phase_rows(result: BenchResult) -> list[str]:
    head = (f"{'phase':<34} {'samples':>7} {'tokens':>8} {'wall s':>8} {'tokens/s':>9} {'s/sample':>9} "
            f"{'accept':>7} {'peak RSS MB':>11}")
    rows = [head]
    for p in result.phases:
        acc = "-" if p.acceptance_rate is None else f"{p.acceptance_rate:.2f}"
        rows.append(f"{p.phase.label:<34} {p.samples:>7} {p.tokens_sampled:>8.0f} {p.wall_seconds:>8.1f} "
                    f"{p.tokens_per_second:>9.2f} {p.wall_per_sample:>9.2f} {acc:>7} "
                    f"{p.peak_rss_kb / 1024:>11.0f}")
    return rows


def _eq12_lines(result: BenchResult) -> list[str]:
    e = result.eq12()
    lines = [f"Eq. 12 tokens sampled per sample: N*T^2/(4B) + T = {e['estimate_tokens_per_sample']:.0f} "
             f"(exact mean if nothing ends at EOS: {e['expected_tokens_per_sample_full_length']:.0f})"]
    for name in ("power-K", "power-1", "scratch-1"):
        if name in e:
            a = e[name]
            lines.append(f"  actual, {name}: {a['actual_tokens_per_sample']:.0f} per sample (mean length "
                         f"{a['mean_length']:.0f}, {a['eos_fraction']:.0%} ended at EOS; early EOS lowers it)")
    return lines


def _target_rows(result: BenchResult) -> list[str]:
    rows = [f"{'target':<48} {'value':>8} {'target':>9}  status"]
    for t in result.targets():
        rows.append(f"{t.label:<48} {t.value:>8.3f} {t.op + ' ' + format(t.target, 'g'):>9}  "
                    f"{'met' if t.met else 'MISSED'}")
    return rows


def write_json(path: str, result: BenchResult) -> None:
    """Write the result atomically: a temporary file next to `path`, then os.replace."""
    target = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(result.to_dict(), f, indent=2)
            f.write("\n")
        os.replace(tmp, target)
    except OSError as e:
        raise PowerSampleError(f"cannot write {path}: {e.strerror}") from None


def check_writable(path: str) -> None:
    """Fail now, not after an hour of sampling, when the JSON cannot be written there."""
    parent = Path(path).parent
    if not parent.is_dir() or not os.access(parent, os.W_OK) or Path(path).is_dir():
        raise PowerSampleError(f"cannot write {path}: no such writable directory or it is a directory")


def read_prompts(path: str) -> tuple[str, ...]:
    """One prompt per non-empty line."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise PowerSampleError(f"cannot read prompt file {path}: {e}") from None
    prompts = tuple(line.strip() for line in lines if line.strip())
    _check(bool(prompts), f"prompt file {path} has no prompts (one per line)")
    return prompts


def pick_prompts(available: tuple[str, ...], count: int | None, source: str) -> tuple[str, ...]:
    """The first `count` prompts (all when None)."""
    if count is None:
        return available
    _check(count >= 1, f"prompts must be >= 1, got {count}")
    _check(count <= len(available), f"asked for {count} prompts but {source} has {len(available)}")
    return available[:count]


# -- small helpers -----------------------------------------------------------------------------------------------


def machine_info(load_average: tuple[float, ...]) -> dict[str, Any]:
    """The machine, for the JSON: CPUs, platform, Python, torch (if installed), the load when the run started."""
    return {"cpu_count": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor(),
            "python": platform.python_version(), "torch": _torch_info(), "load_average_start": list(load_average),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}


def _torch_info() -> dict[str, Any] | None:
    from importlib import metadata

    try:
        version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        return None
    torch = sys.modules.get("torch")  # only once a backend imported it: the toy bench never imports torch
    return {"version": version, "threads": torch.get_num_threads() if torch else None}


def backend_dict(spec: BackendSpec, device: str | None) -> dict[str, Any]:
    return {"name": spec.name, "model": spec.describe(), "toy_spec": spec.toy_spec, "device": device,
            "dtype": spec.dtype, "threads": spec.threads, "quant": spec.quant}


def options_dict(o: BenchOptions) -> dict[str, Any]:
    return {"prompts": list(o.prompts), "chains": o.chains, "repeats": o.repeats, "seed": o.seed, "chat": o.chat,
            "quick": o.quick, "warmup_tokens": WARMUP_TOKENS, "seeds": [o.seed + i for i in range(len(o.prompts))]}


def _call_dict(c: CallStats) -> dict[str, Any]:
    return {"repeat": c.repeat, "prompt_index": c.prompt_index, "seed": c.seed, "wall_seconds": c.wall_seconds,
            "tokens_generated": list(c.tokens_generated), "lengths": list(c.lengths),
            "finish_reasons": list(c.finish_reasons), "proposals": c.proposals, "accepted": c.accepted}


def peak_rss_kb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _device(backend: Backend) -> str | None:
    device = getattr(backend, "device", None)  # hf has one; the toy backend does not
    return None if device is None else str(device)


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise PowerSampleError(message)
