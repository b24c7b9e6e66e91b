"""`powersample bench --engines A,B,...`: engine configurations side by side, in one run on one machine.

It answers "which engine is fastest here, and does it run the same model?": besides speed, each candidate's
KL divergence from the first candidate's model is estimated from `score`, so a re-quantized copy shows its cost.

Each candidate is a backend with options, `NAME[:KEY=VALUE...]` with keys threads, dtype, quant and device:
`llamacpp`, `llamacpp:threads=2`, `llamacpp:quant=iq4_nl`, `hf:dtype=bfloat16:threads=1`. bench's own --threads,
--dtype and --device apply to every candidate that does not set its own; a candidate that cannot take one (llamacpp
a dtype, vllm threads) is refused in one line before anything loads. Every candidate is loaded
once; then, for each repeat, prompt and phase, the candidates take turns, so that other load on the machine hits them
alike. The phases are bench's plain decoding at batch 1, power sampling with one chain, and with K chains. The
table (tools.bench.table.format_engines) gives each candidate's rates and its speed relative to the first candidate;
`--json` writes every number.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from powersample.api import sample
from powersample.backends import Backend, BackendSpec
from powersample.errors import PowerSampleError
from powersample.samplers import registry
from powersample.tools.bench.options import BenchOptions
from powersample.tools.bench.phases import CallStats, Phase, PhaseResult, phases
from powersample.tools.bench.run import run_call, warm_up
from powersample.tools.common import Update, utc_now
from powersample.tools.machine import machine_info, peak_rss_kb

ENGINE_PHASES = ("plain-1", "power-1", "power-K")  # bench's phases that tell engines apart
KEYS = ("threads", "dtype", "quant", "device")  # what a candidate may set
INHERITED = ("threads", "dtype", "device")  # of those, what bench's own options give a candidate that sets none


@dataclass(frozen=True)
class Candidate:
    """One engine configuration: its spelling on the command line and the backend it loads."""

    spec: str  # NAME[:KEY=VALUE...], as given to --engines
    backend: BackendSpec  # what it loads


def parse_candidates(
    text: str, model: str | None, given: Mapping[str, Any] | None = None, quiet: bool = False
) -> tuple[Candidate, ...]:
    """`llamacpp,hf:dtype=bfloat16,...` as candidates on `model` (None = the embedded one); one-line errors.

    `given`: bench's own --threads, --dtype and --device (None where not given), for every candidate that does not
    set its own; `quiet`: each loads quietly (--quiet)."""
    specs = [s.strip() for s in text.split(",") if s.strip()]
    if not specs:
        raise PowerSampleError("--engines needs at least one candidate, e.g. llamacpp,hf")
    if len(set(specs)) != len(specs):
        raise PowerSampleError(f"--engines names a candidate twice: {text}")
    inherited = {k: v for k, v in (given or {}).items() if k in INHERITED and v is not None}
    return tuple(Candidate(spec, _backend_spec(spec, model, inherited, quiet)) for spec in specs)


def _backend_spec(spec: str, model: str | None, inherited: dict[str, Any], quiet: bool) -> BackendSpec:
    name, *options = spec.split(":")
    if name not in ("hf", "llamacpp", "vllm"):
        raise PowerSampleError(f"--engines candidate {spec!r}: the backend must be hf, llamacpp or vllm")
    fields: dict[str, Any] = {}
    for option in options:
        key, _, value = option.partition("=")
        if key not in KEYS or not value:
            raise PowerSampleError(f"--engines candidate {spec!r}: options are {', '.join(k + '=' for k in KEYS)}")
        fields[key] = _threads(spec, value) if key == "threads" else value
    try:
        own = BackendSpec(name, model, None, quiet=quiet, **fields)
    except PowerSampleError as e:
        raise PowerSampleError(f"--engines candidate {spec!r}: {e}") from None
    return _inherit(spec, own, {k: v for k, v in inherited.items() if k not in fields})


def _inherit(spec: str, own: BackendSpec, inherited: dict[str, Any]) -> BackendSpec:
    """The candidate with bench's own options it does not set; refused in one line when it cannot take them."""
    try:
        return replace(own, **inherited)
    except PowerSampleError as e:
        options = " ".join(f"--{k} {v}" for k, v in inherited.items())
        raise PowerSampleError(
            f"--engines candidate {spec!r} cannot take {options} ({e}): give it to the "
            f"candidates that take it instead, e.g. hf:{next(iter(inherited))}="
            f"{next(iter(inherited.values()))}"
        ) from None


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
        c = self.candidate.backend
        return {
            "spec": self.candidate.spec,
            "backend": c.name,
            "threads": c.threads,
            "dtype": c.dtype,
            "device": c.device,
            "quant": c.quant,
            "placement": self.placement,
            "kl_from_first": self.kl,
            "phases": {p.phase.name: p.to_dict() for p in self.phases},
        }


@dataclass(frozen=True)
class EnginesResult:
    """Everything one `bench --engines` run measured; `complete` is False in the partial JSON."""

    options: BenchOptions
    machine: dict[str, Any]
    date: str
    rows: tuple[EngineRow, ...]
    complete: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "benchmark": "powersample bench --engines",
            "complete": self.complete,
            "date": self.date,
            "machine": self.machine,
            "config": registry.resolved(self.options.config),
            "options": self.options.to_dict(),
            "engines": [r.to_dict() for r in self.rows],
        }


def engine_phases(options: BenchOptions) -> tuple[Phase, ...]:
    return tuple(p for p in phases(options) if p.name in ENGINE_PHASES)


def total_units(options: BenchOptions, candidates: Sequence[Candidate]) -> int:
    """Calls of a whole run, for the progress bar."""
    return options.repeats * len(options.prompts) * len(engine_phases(options)) * len(candidates)


def run_engines(
    options: BenchOptions,
    candidates: Sequence[Candidate],
    update: Update | None = None,
    on_progress: Callable[[EnginesResult], None] | None = None,
) -> EnginesResult:
    """Load every candidate, then run the phases with the candidates taking turns (module docstring)."""
    date, machine = utc_now(), machine_info(os.getloadavg())
    torch_threads = _torch_threads()
    backends = [_load(c, options, update) for c in candidates]
    run = _EnginesRun(options, tuple(candidates), backends, machine, date, _divergences(options, backends))
    for repeat in range(options.repeats):
        for index in range(len(options.prompts)):
            for p, phase in enumerate(engine_phases(options)):
                for c, candidate in enumerate(candidates):
                    _use_threads(candidate.backend, torch_threads)
                    run.call(c, p, phase, repeat, index)
                    if update:
                        update(f"{candidate.spec}: {phase.name}", 1)
                    if on_progress:
                        on_progress(run.result(False))
    return run.result(True)


class _EnginesRun:
    """The calls so far, per candidate and phase, and the load average after each candidate's latest call."""

    def __init__(
        self,
        options: BenchOptions,
        candidates: tuple[Candidate, ...],
        backends: list[Backend],
        machine: dict[str, Any],
        date: str,
        divergence: list[float | None],
    ) -> None:
        self.options, self.candidates, self.backends = options, candidates, backends
        self.machine, self.date, self.divergence = machine, date, divergence
        n = len(engine_phases(options))
        self.calls: list[list[list[CallStats]]] = [[[] for _ in range(n)] for _ in candidates]
        self.loads: list[list[tuple[float, ...]]] = [[() for _ in range(n)] for _ in candidates]

    def call(self, c: int, p: int, phase: Phase, repeat: int, index: int) -> None:
        """Candidate c's turn at phase p for one prompt."""
        self.calls[c][p].append(run_call(self.backends[c], self.options, phase, repeat, index, None))
        self.loads[c][p] = os.getloadavg()

    def result(self, complete: bool) -> EnginesResult:
        rows = tuple(
            EngineRow(c, _placement(b), self._phase_results(i), d)
            for i, (c, b, d) in enumerate(zip(self.candidates, self.backends, self.divergence))
        )
        return EnginesResult(self.options, self.machine, self.date, rows, complete)

    def _phase_results(self, c: int) -> tuple[PhaseResult, ...]:
        return tuple(
            PhaseResult(phase, tuple(calls), peak_rss_kb(), load)
            for phase, calls, load in zip(engine_phases(self.options), self.calls[c], self.loads[c])
            if calls
        )


def _divergences(options: BenchOptions, backends: Sequence[Backend]) -> list[float | None]:
    """Per candidate, KL(p_first || p_candidate) in nats per token, estimated on the first candidate's own plain
    samples (one per prompt, seed + i): the mean over their tokens of log p_first - log p_candidate, both from
    `score` (the log p a sample was drawn with may differ from its score by the engine's rounding, which is no
    divergence of models). Engines running the same weights give about 0; a re-quantized copy shows how far it
    moved. The first candidate's own is 0 by definition."""
    first, texts = backends[0], []
    for i, prompt in enumerate(options.prompts):
        [record] = sample(first, prompt, options.plain_config, seed=options.seed + i, chat=options.chat)
        texts.append((prompt, record.tokens, first.score(first.encode(prompt, options.chat), record.tokens)))
    return [0.0] + [_divergence(first, backend, texts, options.chat) for backend in backends[1:]]


def _divergence(first: Backend, backend: Backend, texts: list[tuple[str, Any, Any]], chat: bool) -> float | None:
    """The mean log-probability gap over the texts' tokens; None when the two tokenizers encode a prompt apart."""
    gaps: list[float] = []
    for prompt, tokens, logp in texts:
        context = backend.encode(prompt, chat)
        if context != first.encode(prompt, chat):
            return None
        gaps += [a - b for a, b in zip(logp, backend.score(context, tokens))]
    return None if not gaps else sum(gaps) / len(gaps)


def _load(candidate: Candidate, options: BenchOptions, update: Update | None) -> Backend:
    if update:
        update(f"{candidate.spec}: loading", 0)
    backend = candidate.backend.load()
    warm_up(backend, options)
    return backend


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


def _use_threads(spec: BackendSpec, default: int | None) -> None:
    """torch's thread count is process-wide (the hf backend sets it at load): set each hf candidate's before its
    turn. llama.cpp's threads belong to each backend's own context."""
    if spec.name == "hf" and default is not None:
        import torch

        torch.set_num_threads(spec.threads or default)
