"""The six phases of a bench run, and what one phase measured (its calls, and their medians over repeats)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any, Callable

from powersample.samplers import registry
from powersample.tools.bench.options import BenchOptions


@dataclass(frozen=True)
class Phase:
    """What one phase runs."""

    name: str  # plain-1, plain-K, power-K, speculative-K, power-1, speculative-1, scratch-1
    label: str  # for the table
    chains: int  # chains per prompt (the batch)
    method: str  # "base" (plain decoding) or the MCMC config's method
    reuse_cache: bool  # False: the regenerate-from-scratch backend
    speculate: int = 0  # draft tokens verified per forward in the MCMC proposals; 0 = off

    @property
    def plain(self) -> bool:
        return self.method == "base"


def phases(options: BenchOptions) -> tuple[Phase, ...]:
    """The seven phases, in the order they run: power-K and speculative-K, and power-1 and speculative-1, differ
    only in speculation (so each pair draws the same samples)."""
    k, mcmc, spec = options.chains, options.config.method, options.speculate
    return (
        Phase("plain-1", "plain decode, batch 1", 1, "base", True),
        Phase("plain-K", f"plain decode, batch {k}", k, "base", True),
        Phase("power-K", f"{mcmc} sampling, {k} chains", k, mcmc, True),
        Phase("speculative-K", f"{mcmc} sampling, {k} chains, speculate {spec}", k, mcmc, True, spec),
        Phase("power-1", f"{mcmc} sampling, 1 chain", 1, mcmc, True),
        Phase("speculative-1", f"{mcmc} sampling, 1 chain, speculate {spec}", 1, mcmc, True, spec),
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
    forwards: int | None = None  # the engine's sequential decoding forwards during the call (None: not counted)
    drafted: int | None = None  # draft tokens verified (speculation)
    kept_drafts: int | None = None  # of those, kept
    digests: tuple[str, ...] = ()  # per sample: a short hash of its tokens, to tell whether two phases drew the same

    @property
    def ended_at_eos(self) -> tuple[bool, ...]:
        return tuple(r == "eos" for r in self.finish_reasons)

    def to_dict(self) -> dict[str, Any]:
        return {
            "repeat": self.repeat,
            "prompt_index": self.prompt_index,
            "seed": self.seed,
            "wall_seconds": self.wall_seconds,
            "tokens_generated": list(self.tokens_generated),
            "lengths": list(self.lengths),
            "finish_reasons": list(self.finish_reasons),
            "proposals": self.proposals,
            "accepted": self.accepted,
            "forwards": self.forwards,
            "drafted": self.drafted,
            "kept_drafts": self.kept_drafts,
            "digests": list(self.digests),
        }


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
        return ratio(self.tokens_sampled, self.wall_seconds)

    @property
    def wall_per_sample(self) -> float:
        return ratio(self.wall_seconds, self.samples)

    @property
    def acceptance_rate(self) -> float | None:
        proposals, accepted = sum(c.proposals for c in self.calls), sum(c.accepted for c in self.calls)
        return registry.acceptance_rate(self.phase.method, proposals, accepted)

    @property
    def forwards_per_sample(self) -> float | None:
        """Sequential decoding forwards per call, i.e. per sample of one chain (a batch's forward serves all its
        chains)."""
        if any(c.forwards is None for c in self.calls):
            return None
        return ratio(sum(c.forwards for c in self.calls), len(self.calls))

    @property
    def kept_drafts_per_forward(self) -> float | None:
        """Draft tokens kept per forward: what one forward decodes beyond its one token (speculation)."""
        if not self.phase.speculate or any(c.kept_drafts is None for c in self.calls):
            return None
        return ratio(sum(c.kept_drafts for c in self.calls), sum(c.forwards for c in self.calls))

    def sample_mean(self, value: Callable[[CallStats], tuple]) -> float:
        """Mean over every sample of every repeat of a per-sample tuple field."""
        values = [v for c in self.calls for v in value(c)]
        return sum(values) / len(values)

    def per_sample(self) -> dict[str, float]:
        """Means per sample: tokens sampled, final length, and the fraction that ended at EOS."""
        return {
            "mean_tokens_sampled_per_sample": self.sample_mean(lambda c: c.tokens_generated),
            "mean_length": self.sample_mean(lambda c: c.lengths),
            "eos_fraction": self.sample_mean(lambda c: c.ended_at_eos),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.phase.name,
            "label": self.phase.label,
            "chains": self.phase.chains,
            "method": self.phase.method,
            "reuse_cache": self.phase.reuse_cache,
            "samples": self.samples,
            "tokens_sampled": self.tokens_sampled,
            "wall_seconds": self.wall_seconds,
            "tokens_per_second": self.tokens_per_second,
            "wall_per_sample": self.wall_per_sample,
            "acceptance_rate": self.acceptance_rate,
            **self.per_sample(),
            "speculate": self.phase.speculate,
            "forwards_per_sample": self.forwards_per_sample,
            "kept_drafts_per_forward": self.kept_drafts_per_forward,
            "peak_rss_kb": self.peak_rss_kb,
            "load_average": list(self.load_average),
            "calls": [c.to_dict() for c in self.calls],
        }


SPECULATIVE_TWINS = {"speculative-K": "power-K", "speculative-1": "power-1"}  # a speculative phase -> its plain twin


def same_samples(a: PhaseResult, b: PhaseResult) -> tuple[int, int]:
    """(samples of `b` identical to `a`'s for the same prompt, repeat and chain; samples compared)."""
    mine = {(c.repeat, c.prompt_index): c.digests for c in a.calls}
    pairs = [(x, y) for c in b.calls for x, y in zip(mine.get((c.repeat, c.prompt_index), ()), c.digests)]
    return sum(x == y for x, y in pairs), len(pairs)


PhaseLookup = Callable[[str], "PhaseResult | None"]  # a run's result of the phase named, None when it has not run


def ratio(a: float, b: float) -> float:
    """a / b, NaN when b is 0."""
    return a / b if b else float("nan")
