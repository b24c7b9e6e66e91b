"""The Python API: sample a prompt with any method on any backend, get records back."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from powersample.backends import memory
from powersample.backends.base import Backend, PlansMemory, capability, has_chat_template
from powersample.backends.engine import check_fits
from powersample.config import SamplerConfig
from powersample.errors import PowerSampleError
from powersample.io import json_line, notice_once, progress_bar
from powersample.samplers import Chain, ChainResult, Progress, on_engine, programs, registry
from powersample.samplers.chain import Trace
from powersample.samplers.driver import Scheduler, Work, drive


@dataclass(frozen=True)
class SampleRecord:
    """One sample, as written to JSONL. The same shape for every method."""

    prompt: str
    text: str  # decoded generated text, special tokens dropped
    tokens: tuple[int, ...]  # generated ids, including a final EOS
    token_logp: tuple[float, ...]  # base log p of each token (nats)
    logp: float  # sum of token_logp
    finish_reason: str  # "eos" (ended in EOS) or "length" (reached max_new_tokens)
    tokens_generated: int  # every token sampled, rejected proposals included
    proposals: int  # MH proposals made (bon: candidates drawn; 0 for plain methods); see acceptance_rate
    accepted: int  # MH proposals accepted (0 for bon and plain methods)
    wall_seconds: float  # sampling time of the batch this sample was drawn in, model loading excluded
    method: str
    seed: int
    sample_index: int  # which of num_samples
    config: dict  # SamplerConfig.resolved()
    particles: list[dict] | None = None  # power-smc with return_particles: every particle as {"text", "tokens",
    # "logp", "weight"} (weights normalized); None otherwise, and then left out of to_dict()
    replicas: list[dict] | None = None  # power-pt with return_replicas: every replica as {"text", "tokens", "logp",
    # "alpha"}, the flattest first (the last is the sample); None otherwise, and then left out of to_dict()
    swaps: list[list[int]] | None = None  # power-pt: per pair of adjacent rungs, [swaps attempted, accepted], the
    # flattest pair first; None for other methods, and then left out of to_dict()

    @property
    def acceptance_rate(self) -> float | None:
        """accepted / proposals; None where no MH proposal was made (registry.acceptance_rate)."""
        return registry.acceptance_rate(self.method, self.proposals, self.accepted)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["tokens"], out["token_logp"] = list(self.tokens), list(self.token_logp)
        out["acceptance_rate"] = self.acceptance_rate
        for name in ("particles", "replicas", "swaps"):
            if out[name] is None:
                del out[name]  # every other method's record keeps its shape
        return out


def sample(
    backend: Backend,
    prompt: str,
    config: SamplerConfig = SamplerConfig(),
    *,
    seed: int = 0,
    num_samples: int = 1,
    chat: bool = True,
    progress: Progress | None = None,
    return_particles: bool = False,
    trace: ChainTrace | None = None,
    return_replicas: bool = False,
    max_memory: int | None = None,
) -> list[SampleRecord]:
    """Draw `num_samples` independent samples for `prompt` (chains run batched). Same seed => same output.

    `chat`: the prompt goes through the model's chat template; a model without one gets it as plain text
    (chat_prompts, with one notice per process).

    `return_particles` (power-smc only) also returns every particle of each sample with its normalized weight,
    `return_replicas` (power-pt only) every replica's state with its alpha; `trace` collects every chain's events
    (MH steps, extensions, SMC weights, swaps), chain j numbered j. `max_memory`: the most bytes of KV cache the
    chains may hold at once (memory_plan; None = no limit): the rest wait, and the samples are the same."""
    if num_samples < 1:
        raise PowerSampleError(f"num_samples must be >= 1, got {num_samples}")
    check_returns(config, return_particles, return_replicas)
    prompt_ids = encode_prompt(backend, prompt, config, chat_prompts(backend, chat))
    chains = make_chains(seed, num_samples, return_particles, return_replicas)
    if trace is not None:
        trace_chains(trace, chains, prompt, config, seed)
    plan = memory_plan(backend, config, len(prompt_ids), max_memory)
    start = time.perf_counter()
    runs = programs(backend, prompt_ids, config, chains)
    per_chain = plan.per_chain if plan else 0
    results = drive(backend, runs, registry.proposal(config), progress, max_memory, per_chain)
    wall = time.perf_counter() - start
    records = [chain_record(backend, prompt, config, seed, j, r, wall) for j, r in enumerate(results)]
    for j, r in enumerate(records if trace is not None else ()):
        trace.end(j, tokens=list(r.tokens), logp=r.logp, text=r.text)
    return records


@dataclass
class ChainTrace:
    """The events of traced chains (`powersample sample --trace FILE`), JSON-ready, in the order they happened.

    Each event is {"event": kind, "chain": j, ...}: "start" (the prompt, method, seed and config), then the
    sampler's own (power.note_extension, power.note_step, smc's "smc", plain's "draw"), then "end" (the final tokens,
    log p and text). Events that carry token ids ("tokens", or a step's "proposal") also carry "pieces", each id's
    text. With a `sink`, each event goes to it as it happens (from the thread that made it) instead of into
    `events`: the server streams them so (server/live.py)."""

    backend: Backend
    events: list[dict[str, Any]] = field(default_factory=list)
    sink: Callable[[dict[str, Any]], None] | None = None  # gets each event instead of `events`; None = keep them

    def start(self, chain: int, **fields: Any) -> Trace:
        """Record chain j's start; returns the Trace its Chain reports to."""
        self.add(chain, {"event": "start", **fields})
        return lambda event: self.add(chain, event)

    def end(self, chain: int, **fields: Any) -> None:
        self.add(chain, {"event": "end", **fields})

    def add(self, chain: int, event: dict[str, Any]) -> None:
        ids = event.get("tokens", event.get("proposal"))
        pieces = {"pieces": [self.backend.decode((t,)) for t in ids]} if ids is not None else {}
        full = {"event": event["event"], "chain": chain, **event, **pieces}
        if self.sink is None:
            self.events.append(full)
        else:
            self.sink(full)

    def jsonl(self) -> bytes:
        refusal = "not writing the trace: an event holds a non-finite number"
        return "".join(json_line(e, refusal) for e in self.events).encode()


def trace_chains(
    trace: ChainTrace, chains: Sequence[Chain], prompt: str, config: SamplerConfig, seed: int, first: int = 0
) -> None:
    """Trace the chains of one prompt: each records its "start" (the prompt, method, seed, its sample index and the
    config as it runs on the trace's backend) and reports its events to `trace`, chain j numbered first + j."""
    resolved = registry.resolved(on_engine(config, trace.backend))
    for j, chain in enumerate(chains):
        chain.trace = trace.start(
            first + j, prompt=prompt, method=config.method, seed=seed, sample_index=j, config=resolved
        )


def sample_many(
    backend: Backend,
    jobs: Sequence[tuple[str, int]],
    config: SamplerConfig = SamplerConfig(),
    *,
    num_samples: int = 1,
    chat: bool = True,
    progress: Progress | None = None,
    configs: Sequence[SamplerConfig] | None = None,
    max_memory: int | None = None,
) -> list[list[SampleRecord] | PowerSampleError]:
    """Sample many (prompt, seed) jobs with all their chains batched together in one engine run.

    Job j's records are exactly those of sample(backend, prompt_j, config_j, seed=seed_j, num_samples=...): each
    chain draws from its own generator, whatever runs beside it. config_j is configs[j] when given (per-job settings
    such as bon's budget; all must draw from config's proposal, the one of the engine run), else config. A job that
    cannot run (its prompt is empty or too long, or its sampler fails) gets its PowerSampleError in place of its
    records; the other jobs still run. wall_seconds is the time from the start of the run to the job's last chain
    finishing. `max_memory`: as in sample(), over every job's chains (a job whose one chain cannot fit it gets its
    error).
    """
    if num_samples < 1:
        raise PowerSampleError(f"num_samples must be >= 1, got {num_samples}")
    configs = job_configs(config, configs, len(jobs))
    chat = chat_prompts(backend, chat) if jobs else chat
    out: list = [None] * len(jobs)
    work, start = [], time.perf_counter()
    for j, ((prompt, seed), own) in enumerate(zip(jobs, configs)):
        try:
            prompt_ids = encode_prompt(backend, prompt, own, chat)
            chains = make_chains(seed, num_samples)
            plan = memory_plan(backend, own, len(prompt_ids), max_memory)
        except PowerSampleError as error:
            out[j] = error
            continue
        done = _job_done(backend, prompt, own, seed, num_samples, start, lambda recs, j=j: out.__setitem__(j, recs))
        size = plan.per_chain if plan else 0
        work += [Work(p, done(c), size) for c, p in enumerate(programs(backend, prompt_ids, own, chains))]
    Scheduler(backend, registry.proposal(config), progress, budget=max_memory).run(work)
    return out


def memory_plan(backend: Backend, config: SamplerConfig, prompt_tokens: int, budget: int | None) -> memory.Plan | None:
    """What each of config's chains holds on `backend` for a prompt of `prompt_tokens` ids (backends/memory.py),
    refused in one line when one chain cannot fit `budget`; None for a backend that plans no memory (toy, vLLM)."""
    planner = capability(backend, PlansMemory)
    if planner is None:
        return None
    layout = planner.kv_layout()
    plan = memory.plan(layout, prompt_tokens + config.max_new_tokens, registry.members(config), budget)
    plan.check()
    return plan


def job_configs(config: SamplerConfig, configs: Sequence[SamplerConfig] | None, n: int) -> list[SamplerConfig]:
    """Each job's config: configs (one per job, drawing from config's proposal), or config for all."""
    if configs is None:
        return [config] * n
    if len(configs) != n:
        raise PowerSampleError(f"configs holds {len(configs)} configs for {n} jobs")
    shared = registry.proposal(config)
    if any(registry.proposal(c) != shared for c in configs):
        raise PowerSampleError("the jobs' configs must share one proposal (temperature, top-k, top-p)")
    return list(configs)


def _job_done(backend, prompt, config, seed, n, start, finish) -> Callable[[int], Callable]:
    """Callbacks for one job's n chains: once all are back, finish(records) (or finish(the first error))."""
    results: dict[int, ChainResult | BaseException] = {}

    def chain_done(index: int) -> Callable:
        def done(outcome: ChainResult | BaseException) -> None:
            results[index] = outcome
            if len(results) < n:
                return
            wall = time.perf_counter() - start
            errors = [r for r in results.values() if isinstance(r, BaseException)]
            if errors:
                error = errors[0]
                finish(error if isinstance(error, PowerSampleError) else PowerSampleError(f"sampler failed: {error}"))
            else:
                finish([chain_record(backend, prompt, config, seed, c, results[c], wall) for c in range(n)])

        return done

    return chain_done


def make_chains(seed: int, n: int, return_particles: bool = False, return_replicas: bool = False) -> list[Chain]:
    """The n chains of one sample() call: chain j draws from its own generator, seeded by chain_seeds(seed, n)[j]."""
    return [
        Chain(np.random.default_rng(s), slot=j, return_particles=return_particles, return_replicas=return_replicas)
        for j, s in enumerate(chain_seeds(seed, n))
    ]


def check_returns(config: SamplerConfig, return_particles: bool, return_replicas: bool) -> None:
    """A one-line error for asking a method for members it does not have."""
    if return_particles and config.method != "power-smc":
        raise PowerSampleError(f"return_particles needs method power-smc, not {config.method}")
    if return_replicas and config.method != "power-pt":
        raise PowerSampleError(f"return_replicas needs method power-pt, not {config.method}")


def chain_seeds(seed: int, n: int) -> list[np.random.SeedSequence]:
    """Independent seeds per chain; chain j's seed does not depend on n."""
    if not isinstance(seed, int) or seed < 0:
        raise PowerSampleError(f"seed must be an integer >= 0, got {seed!r}")
    return np.random.SeedSequence(seed).spawn(n)


NO_TEMPLATE = "the model has no chat template: chat prompts go to it as plain text, as with --raw"


def chat_prompts(backend: Backend, chat: bool) -> bool:
    """Whether prompts go through the model's chat template: `chat`, unless the model has none. Then they go as plain
    text, as with chat=False (which is what records should say), and one notice per process says so on stderr."""
    if chat and not has_chat_template(backend):
        notice_once(NO_TEMPLATE)
        return False
    return chat


def encode_prompt(backend: Backend, prompt: str, config: SamplerConfig, chat: bool) -> tuple[int, ...]:
    """Prompt ids, checked: not empty, and prompt + max_new_tokens fits the model's context."""
    check_prompt(prompt)
    ids = backend.encode(prompt, chat)
    check_fits(backend.context_length, len(ids), config.max_new_tokens, knob="max_new_tokens")
    return ids


def first_stop(text: str, stops: Sequence[str]) -> int:
    """Where a sample's text is cut for its stop strings: the start of the earliest one found in it; -1 when none is.
    A stop string ends no chain (p^alpha is a law over whole sequences): the finished text is cut instead (the
    server's `stop`, lm-eval's `until`)."""
    return min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)


def check_prompt(prompt: str) -> None:
    if not isinstance(prompt, str) or not prompt.strip():
        raise PowerSampleError("the prompt is empty")


def chain_record(
    backend: Backend, prompt: str, config: SamplerConfig, seed: int, index: int, r: ChainResult, wall: float
) -> SampleRecord:
    """The SampleRecord of one chain's result (also for callers that run chains themselves: the server)."""
    ended = bool(r.tokens) and r.tokens[-1] in backend.eos_ids
    return SampleRecord(
        prompt=prompt,
        text=backend.decode(r.tokens),
        tokens=r.tokens,
        token_logp=r.token_logp,
        logp=float(np.sum(r.token_logp)) if r.token_logp else 0.0,
        finish_reason="eos" if ended else "length",
        tokens_generated=r.tokens_generated,
        proposals=r.proposals,
        accepted=r.accepted,
        wall_seconds=wall,
        method=config.method,
        seed=seed,
        sample_index=index,
        config=registry.resolved(on_engine(config, backend)),
        particles=_particles(backend, r),
        replicas=_replicas(backend, r),
        swaps=[list(pair) for pair in r.swaps] if r.swaps is not None else None,
    )


def _particles(backend: Backend, r: ChainResult) -> list[dict] | None:
    if r.particles is None:
        return None
    return [
        {
            "text": backend.decode(p.tokens),
            "tokens": list(p.tokens),
            "logp": math.fsum(p.token_logp),
            "weight": p.weight,
        }
        for p in r.particles
    ]


def _replicas(backend: Backend, r: ChainResult) -> list[dict] | None:
    if r.replicas is None:
        return None
    return [
        {"text": backend.decode(m.tokens), "tokens": list(m.tokens), "logp": math.fsum(m.token_logp), "alpha": m.alpha}
        for m in r.replicas
    ]


@contextlib.contextmanager
def sampling_bar(
    config: SamplerConfig, quiet: bool = False, desc: str = "sampling", chains: int = 1
) -> Iterator[Progress | None]:
    """A progress bar over the backend requests of `chains` chains; yields its update function (None when quiet)."""
    with progress_bar(registry.work_units(config) * chains, desc, "req", quiet=quiet) as bar:
        if bar is None:
            yield None
            return
        yield bar.update
        bar.update(bar.total - bar.n)  # chains that stop early at EOS finish the bar
