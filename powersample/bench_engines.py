"""`powersample bench --engines A,B,...`: engine configurations side by side, in one run on one machine.

It answers "which engine is fastest here, and does it run the same model?": besides speed, each candidate's
KL divergence from the first candidate's model is estimated from `score`, so a re-quantized copy shows its cost.

Each candidate is a backend with options, `NAME[:KEY=VALUE...]` with keys threads, dtype, quant and device:
`llamacpp`, `llamacpp:threads=2`, `llamacpp:quant=iq4_nl`, `hf:dtype=bfloat16:threads=1`. Every candidate is loaded
once; then, for each repeat, prompt and phase, the candidates take turns, so that other load on the machine hits them
alike. The phases are bench's plain decoding at batch 1, power sampling with one chain, and with K chains. The
table gives each candidate's rates and its speed relative to the first candidate; `--json` writes every number.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from powersample.api import sample
from powersample.backends import Backend, BackendSpec
from powersample.bench import (
    BenchOptions,
    CallStats,
    Phase,
    PhaseResult,
    Update,
    machine_info,
    options_dict,
    peak_rss_kb,
    phases,
    run_call,
    utc_now,
    warm_up,
)
from powersample.errors import PowerSampleError
from powersample.samplers import registry

ENGINE_PHASES = ("plain-1", "power-1", "power-K")  # bench's phases that tell engines apart
KEYS = ("threads", "dtype", "quant", "device")  # what a candidate may set


@dataclass(frozen=True)
class Candidate:
    """One engine configuration: its spelling on the command line and the backend it loads."""

    spec: str
    choice: BackendSpec


def parse_candidates(text: str, model: str | None) -> tuple[Candidate, ...]:
    """`llamacpp,hf:dtype=bfloat16,...` as candidates on `model` (None = the embedded one); one-line errors."""
    specs = [s.strip() for s in text.split(",") if s.strip()]
    if not specs:
        raise PowerSampleError("--engines needs at least one candidate, e.g. llamacpp,hf")
    if len(set(specs)) != len(specs):
        raise PowerSampleError(f"--engines names a candidate twice: {text}")
    return tuple(Candidate(spec, _choice(spec, model)) for spec in specs)


def _choice(spec: str, model: str | None) -> BackendSpec:
    name, *options = spec.split(":")
    if name not in ("hf", "llamacpp", "vllm"):
        raise PowerSampleError(f"--engines candidate {spec!r}: the backend must be hf, llamacpp or vllm")
    fields: dict[str, Any] = {}
    for option in options:
        key, _, value = option.partition("=")
        if key not in KEYS or not value:
            raise PowerSampleError(f"--engines candidate {spec!r}: options are {', '.join(k + '=' for k in KEYS)}")
        fields[key] = _threads(spec, value) if key == "threads" else value
    return BackendSpec(name, model, None, **fields)


def _threads(spec: str, value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise PowerSampleError(f"--engines candidate {spec!r}: threads must be a whole number >= 1")
    return int(value)


@dataclass(frozen=True)
class EngineRow:
    """One candidate's results so far."""

    candidate: Candidate
    placement: str | None  # llamacpp: where llama.cpp put the weights (llamacpp_placement.Placement.reason)
    phases: tuple[PhaseResult, ...]
    kl: float | None = None  # nats per token, KL(first candidate's model || this one's); None: tokenizers differ

    def phase(self, name: str) -> PhaseResult | None:
        return next((p for p in self.phases if p.phase.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        c = self.candidate.choice
        return {"spec": self.candidate.spec, "backend": c.name, "threads": c.threads, "dtype": c.dtype,
                "quant": c.quant, "placement": self.placement, "kl_from_first": self.kl,
                "phases": {p.phase.name: p.to_dict() for p in self.phases}}


@dataclass(frozen=True)
class EnginesResult:
    """Everything one `bench --engines` run measured; `complete` is False in the partial JSON."""

    options: BenchOptions
    machine: dict[str, Any]
    date: str
    rows: tuple[EngineRow, ...]
    complete: bool

    def to_dict(self) -> dict[str, Any]:
        return {"benchmark": "powersample bench --engines", "complete": self.complete, "date": self.date,
                "machine": self.machine, "config": registry.resolved(self.options.config),
                "options": options_dict(self.options), "engines": [r.to_dict() for r in self.rows]}


def engine_phases(options: BenchOptions) -> tuple[Phase, ...]:
    return tuple(p for p in phases(options) if p.name in ENGINE_PHASES)


def total_units(options: BenchOptions, candidates: Sequence[Candidate]) -> int:
    """Calls of a whole run, for the progress bar."""
    return options.repeats * len(options.prompts) * len(engine_phases(options)) * len(candidates)


def run_engines(
    options: BenchOptions, candidates: Sequence[Candidate], update: Update | None = None,
    on_progress: Callable[[EnginesResult], None] | None = None,
) -> EnginesResult:
    """Load every candidate, then run the phases with the candidates taking turns (module docstring)."""
    date, machine = utc_now(), machine_info(os.getloadavg())
    torch_threads = _torch_threads()
    backends = [_load(c, options, update) for c in candidates]
    calls: list[list[list[CallStats]]] = [[[] for _ in engine_phases(options)] for _ in candidates]
    loads: list[list[tuple[float, ...]]] = [[() for _ in engine_phases(options)] for _ in candidates]  # after each

    def result(complete: bool) -> EnginesResult:
        rows = tuple(EngineRow(c, _placement(b), _phase_results(options, per_phase, per_load), d)
                     for c, b, per_phase, per_load, d in zip(candidates, backends, calls, loads, divergence))
        return EnginesResult(options, machine, date, rows, complete)

    divergence = _divergences(options, backends)
    for repeat in range(options.repeats):
        for index in range(len(options.prompts)):
            for p, phase in enumerate(engine_phases(options)):
                for c, (candidate, backend) in enumerate(zip(candidates, backends)):
                    _use_threads(candidate.choice, torch_threads)
                    calls[c][p].append(run_call(backend, options, phase, repeat, index, None))
                    loads[c][p] = os.getloadavg()
                    if update:
                        update(f"{candidate.spec}: {phase.name}", 1)
                    if on_progress:
                        on_progress(result(False))
    return result(True)


def _divergences(options: BenchOptions, backends: Sequence[Backend]) -> list[float | None]:
    """Per candidate, KL(p_first || p_candidate) in nats per token, estimated on the first candidate's own plain
    samples (one per prompt, seed + i): the mean over their tokens of log p_first - log p_candidate, both from
    `score`. Engines running the same weights give about 0; a re-quantized copy shows how far it moved."""
    first, texts = backends[0], []
    for i, prompt in enumerate(options.prompts):
        [record] = sample(first, prompt, options.plain_config, seed=options.seed + i, chat=options.chat)
        texts.append((prompt, record.tokens, record.token_logp))
    out: list[float | None] = []
    for backend in backends:
        gaps = []
        for prompt, tokens, logp in texts:
            context = backend.encode(prompt, options.chat)
            if context != first.encode(prompt, options.chat):
                gaps = None
                break
            gaps += [a - b for a, b in zip(logp, backend.score(context, tokens))]
        out.append(None if not gaps else sum(gaps) / len(gaps))
    return out


def _load(candidate: Candidate, options: BenchOptions, update: Update | None) -> Backend:
    if update:
        update(f"{candidate.spec}: loading", 0)
    backend = candidate.choice.load()
    warm_up(backend, options)
    return backend


def _phase_results(options: BenchOptions, per_phase: list[list[CallStats]],
                   per_load: list[tuple[float, ...]]) -> tuple[PhaseResult, ...]:
    return tuple(PhaseResult(phase, tuple(calls), peak_rss_kb(), load)
                 for phase, calls, load in zip(engine_phases(options), per_phase, per_load) if calls)


def _placement(backend: Backend) -> str | None:
    weights = getattr(backend, "weights", None)  # the llamacpp backend's loaded GGUF
    return None if weights is None else weights.placement.reason


def _torch_threads() -> int | None:
    """torch's default thread count, read before any candidate changes it (None without torch)."""
    try:
        import torch
    except ModuleNotFoundError:
        return None
    return torch.get_num_threads()


def _use_threads(choice: BackendSpec, default: int | None) -> None:
    """torch's thread count is process-wide (the hf backend sets it at load): set each hf candidate's before its
    turn. llama.cpp's threads belong to each backend's own context."""
    if choice.name == "hf" and default is not None:
        import torch

        torch.set_num_threads(choice.threads or default)


def format_engines(result: EnginesResult) -> str:
    """The side-by-side table: per candidate, tokens/s of each phase (rejected proposals included: comparable across
    engines whose samples differ in length), wall per sample, and power-1 tokens/s relative to the first."""
    o, c = result.options, result.options.config
    state = "" if result.complete else " [PARTIAL]"
    head = (f"powersample bench --engines: {c.method} alpha={c.alpha:g} T={c.max_new_tokens} B={c.block} "
            f"N={c.mcmc_steps}; {len(o.prompts)} prompt(s), K={o.chains}, {o.repeats} repeat(s), "
            f"{result.machine['cpu_count']} CPUs, load average {result.machine['load_average_start'][0]:.1f} at "
            f"start{state}")
    cols = (f"{'engine':<28} {'plain-1 tok/s':>13} {'power-1 tok/s':>13} {'power-K tok/s':>13} "
            f"{'power-1 s/sample':>16} {'vs first':>8} {'KL nats/tok':>11}")
    lines = [head, "", cols]
    first = _rate(result.rows[0], "power-1") if result.rows else None
    for row in result.rows:
        one = _rate(row, "power-1")
        speed = f"{one / first:.2f}x" if first and one else "-"
        lines.append(f"{row.candidate.spec:<28} {_num(_rate(row, 'plain-1')):>13} {_num(one):>13} "
                     f"{_num(_rate(row, 'power-K')):>13} {_num(_wall(row, 'power-1')):>16} {speed:>8} "
                     f"{_num(row.kl, 3):>11}")
    lines += ["", *(f"{r.candidate.spec}: {r.placement}" for r in result.rows if r.placement)]
    return "\n".join(lines)


def _rate(row: EngineRow, name: str) -> float | None:
    phase = row.phase(name)
    return phase.tokens_per_second if phase else None


def _wall(row: EngineRow, name: str) -> float | None:
    phase = row.phase(name)
    return phase.wall_per_sample if phase else None


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"

