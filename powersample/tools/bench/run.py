"""Running the phases: one backend for the first four, a reuse_cache=False copy for scratch-1; every call seeded
with seed + prompt index, and the partial result published after each call."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from powersample.api import sample
from powersample.backends.base import Backend
from powersample.samplers.registry import work_units
from powersample.tools import common
from powersample.tools.bench.options import BenchOptions
from powersample.tools.bench.phases import CallStats, Phase, PhaseResult, phases
from powersample.tools.bench.result import BenchResult
from powersample.tools.common import Update, utc_now
from powersample.tools.machine import device_of, machine_info, peak_rss_kb


def run_bench(
    options: BenchOptions, update: Update | None = None, on_progress: Callable[[BenchResult], None] | None = None
) -> BenchResult:
    """Run every phase; `update` drives a progress bar, `on_progress` sees the partial result after each call."""
    date, load_average = utc_now(), os.getloadavg()
    backend = options.backend.load()
    run = _Run(options, machine_info(load_average), date, update, on_progress, device_of(backend))
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
            self.on_progress(
                BenchResult(self.options, self.machine, self.date, (*self.done, current), False, self.device)
            )

    def result(self, complete: bool) -> BenchResult:
        return BenchResult(self.options, self.machine, self.date, tuple(self.done), complete, self.device)


def run_call(
    backend: Backend,
    options: BenchOptions,
    phase: Phase,
    repeat: int,
    index: int,
    progress: Callable[[int], None] | None,
) -> CallStats:
    """One prompt of one phase: `phase.chains` samples drawn together, seeded with seed + index."""
    config = options.plain_config if phase.plain else replace(options.config, speculate=phase.speculate)
    seed = options.seed + index
    before = engine_counts(backend)
    records = sample(
        backend,
        options.prompts[index],
        config,
        seed=seed,
        num_samples=phase.chains,
        chat=options.chat,
        progress=progress,
    )
    counts = [None if b is None else a - b for a, b in zip(engine_counts(backend), before)]
    return CallStats(
        repeat=repeat,
        prompt_index=index,
        seed=seed,
        wall_seconds=records[0].wall_seconds,
        tokens_generated=tuple(r.tokens_generated for r in records),
        lengths=tuple(len(r.tokens) for r in records),
        finish_reasons=tuple(r.finish_reason for r in records),
        proposals=sum(r.proposals for r in records),
        accepted=sum(r.accepted for r in records),
        forwards=counts[0],
        drafted=counts[1],
        kept_drafts=counts[2],
        digests=tuple(hashlib.sha256(repr(r.tokens).encode()).hexdigest()[:12] for r in records),
    )


COUNTERS = ("forwards", "drafted", "kept_drafts")  # the backends' diagnostics (their `stats`) that bench reads


def engine_counts(backend: Backend) -> tuple[int | None, ...]:
    """The backend's forward and draft counters now (None where it keeps no such counter)."""
    stats = getattr(backend, "stats", None)
    return tuple(getattr(stats, name, None) for name in COUNTERS)


def warm_up(backend: Backend, options: BenchOptions) -> None:
    """The untimed warm-up (tools.common.warm_up) on the first prompt."""
    common.warm_up(backend, options.prompts[0], options.config.max_new_tokens, options.seed, options.chat)


def total_work_units(options: BenchOptions) -> int:
    """Progress units of a whole run (for the progress bar's total)."""
    calls = options.repeats * len(options.prompts)
    plain, power = work_units(options.plain_config), work_units(options.config)  # per chain
    return calls * sum((plain if p.plain else power) * p.chains for p in phases(options))
