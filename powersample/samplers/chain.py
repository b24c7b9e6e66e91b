"""State shared by every sampler: one chain's current sequence and its counters."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

from powersample.core.drafts import NO_DRAFT, WINDOW, Corpus, Draft
from powersample.core.draws import Rng, spawn
from powersample.core.types import Continuation, ExtendRequest, Tokens

Progress = Callable[[int], None]  # called with a number of finished work units
Trace = Callable[[dict[str, Any]], None]  # called with each event a chain records (see Chain.note)


@dataclass
class Chain:
    """One chain's current state x (generated ids only) with per-token log p and log q, and its counters."""

    rng: Rng
    slot: int
    tokens: list[int] = field(default_factory=list)
    base_logp: list[float] = field(default_factory=list)  # log p(x_t | x_<t), per token
    proposal_logq: list[float] = field(default_factory=list)  # log q(x_t | x_<t), per token
    entropy: list[float] = field(default_factory=list)  # base entropy before x_t (nats), when the sampler asks for
    # it (Report.entropy); else empty
    tokens_generated: int = 0  # every token drawn, rejected proposals included
    proposals: int = 0
    accepted: int = 0
    return_particles: bool = False  # power-smc: the result also holds every particle with its weight
    return_replicas: bool = False  # power-pt: the result also holds every replica's state with its alpha
    corpus: Corpus | None = None  # what the chain has drawn, for the drafts of its requests (core.drafts); None = no
    # drafts
    trace: Trace | None = None  # gets the chain's events (MH steps, extensions, SMC weights); None = not traced
    on_draw: Callable[[Tokens], None] | None = None  # gets each run of tokens drawn whose text is already final (the
    # plain methods': Report.on_draw), for live text; None = nobody listens

    def note(self, event: str, **fields: Any) -> None:
        """Record one event for the trace, when the chain is traced: {"event": event, **fields}, JSON-ready (a
        non-finite number as None: `json_ready`)."""
        if self.trace is not None:
            self.trace(json_ready({"event": event, **fields}))

    def remember(self, prompt: Tokens) -> None:
        """Keep what the chain draws from now on, starting with `prompt`, for drafts (speculative proposals)."""
        self.corpus = Corpus()
        self.corpus.add((), prompt)

    def draft(self, context: Tokens, guess: Tokens = ()) -> Draft:
        """The draft of a request for `context`: `guess`, then lookups in what the chain has drawn."""
        return NO_DRAFT if self.corpus is None else Draft(guess, self.corpus, context[-WINDOW:])

    def drew(self, request: ExtendRequest, cont: Continuation) -> None:
        """Note a continuation the chain drew (kept or not) for later drafts."""
        if self.corpus is not None:
            self.corpus.add(request.context, cont.tokens)

    def spawn_rngs(self, n: int) -> list[Rng]:
        """n generators seeded from the chain's, one per member of a tuple step: the members' draws then do not
        depend on the order in which the engine serves them, so a seed gives the same sample in any schedule."""
        return spawn(self.rng, n)

    def complete(self, eos_ids: frozenset[int]) -> bool:
        """A state is complete when it ends in EOS (EOS is never inside it)."""
        return bool(self.tokens) and self.tokens[-1] in eos_ids

    def replace_suffix(self, i: int, cont: Continuation) -> None:
        """x <- x_<i + cont."""
        del self.tokens[i:], self.base_logp[i:], self.proposal_logq[i:], self.entropy[i:]
        self.append(cont)

    def append(self, cont: Continuation) -> None:
        self.tokens.extend(cont.tokens)
        self.base_logp.extend(cont.base_logp)
        self.proposal_logq.extend(cont.proposal_logq)
        self.entropy.extend(cont.entropy)

    def result(self) -> ChainResult:
        return ChainResult(
            tokens=tuple(self.tokens),
            token_logp=tuple(self.base_logp),
            tokens_generated=self.tokens_generated,
            proposals=self.proposals,
            accepted=self.accepted,
        )


def json_ready(value: Any) -> Any:
    """`value` with every non-finite float as None, inside dicts, lists and tuples too (a log r of -inf, an SMC log
    weight of -inf): JSON has no infinities."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value


@dataclass(frozen=True)
class ChainResult:
    """What a sampler returns for one chain."""

    tokens: Tokens  # generated ids, ending in EOS when the sample is complete
    token_logp: tuple[float, ...]  # base log p of each token (nats)
    tokens_generated: int  # every token drawn, rejected proposals included
    proposals: int  # MH proposals made (bon: candidates drawn)
    accepted: int  # MH proposals accepted
    particles: tuple[WeightedParticle, ...] | None = None  # power-smc, when asked: every particle; else None
    replicas: tuple[Rung, ...] | None = None  # power-pt, when asked: every replica, the flattest first; else None
    swaps: tuple[tuple[int, int], ...] | None = None  # power-pt: per pair of adjacent rungs, (swaps attempted,
    # accepted), the flattest pair first; None for other methods


@dataclass(frozen=True)
class WeightedParticle:
    """One SMC particle at the end of a run, with its normalized importance weight."""

    tokens: Tokens  # generated ids, ending in EOS when complete
    token_logp: tuple[float, ...]  # base log p of each token (nats)
    weight: float  # normalized: the particles' weights sum to 1


@dataclass(frozen=True)
class Rung:
    """One power-pt replica at the end of a run: its state and the power it targets."""

    tokens: Tokens  # generated ids, ending in EOS when complete
    token_logp: tuple[float, ...]  # base log p of each token (nats)
    alpha: float
