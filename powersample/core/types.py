"""The types of the backend seam: what a sampler asks an engine for, and what it gets back.

Numpy only. Samplers and backends both build on these; see `powersample.backends.base` for the Backend Protocol
that answers them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping

from powersample.core.drafts import NO_DRAFT, Draft
from powersample.core.draws import Rng

Tokens = tuple[int, ...]


@dataclass(frozen=True)
class Proposal:
    """The proposal distribution q: the base model at `temperature`, then top-k, then top-p, renormalized."""

    temperature: float  # 1.0 = the base model itself
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off

    @property
    def is_base(self) -> bool:
        """True when q is exactly p, so log q can be the very same numbers as log p."""
        return self.temperature == 1.0 and self.top_k == 0 and self.top_p >= 1.0


@dataclass(frozen=True)
class Floor:
    """A score a continuation must keep reaching, or be cut short: the MH proposal it belongs to is then sure to be
    rejected, so the tokens after that are never drawn.

    The score of the first n tokens is

        weight * sum(log p) - sum(log q) - log(offset + n)       (weight = inf: sum(log p) alone)

    It never rises with n when every token adds weight * log p - log q <= 0: with q = p^(1/tau) / Z (Z <= 1, and
    truncation only lowers Z) that holds for weight >= 1/tau >= 1, and for weight = inf. So once the score falls
    below `least` (by more than SLACK, which absorbs rounding), the finished continuation's score would too."""

    least: float
    weight: float  # alpha, or inf (max-swap)
    offset: int = 0  # tokens before the continuation (i, for a proposal from index i)
    per_length: bool = True  # the score has the -log(offset + n) term (a uniform cut's 1/L'); False: it has none

    SLACK = 1e-6  # a score counts as below `least` only below least - SLACK

    def step(self, score: float, base_logp: float, proposal_logq: float) -> float:
        """The running score (without the length term) after one more token."""
        return score + (base_logp if math.isinf(self.weight) else self.weight * base_logp - proposal_logq)

    def below(self, score: float, n: int) -> bool:
        """True when the running score of n tokens has fallen below `least` for good."""
        length = math.log(self.offset + n) if self.per_length and not math.isinf(self.weight) else 0.0
        return score - length < self.least - self.SLACK


@dataclass(frozen=True)
class Report:
    """What an engine reports beside the tokens and their log-probs. Each is off by default and none changes a draw."""

    alternatives: int = 0  # also report the likeliest this-many next tokens after the context (base log p)
    entropy: bool = False  # also report the base next-token entropy before each token (Continuation.entropy)
    on_draw: Callable[[Tokens], None] | None = None  # called with each run of new tokens as the engine draws them
    # (from the engine's thread, in order, before the Continuation returns; together they are its tokens). How often
    # is the engine's choice: every forward (toy, hf, llamacpp), every engine step (vLLM).
    logq_under: tuple[Proposal, ...] = ()  # also report each token's log q under each of these proposals
    # (Continuation.logq_under): what a state drawn at one temperature needs to move to another (power-pt's swaps)


@dataclass(frozen=True)
class Hints:
    """How an engine may spend its forwards. An engine may ignore any of them (it declares those it honours in its
    `HINTS`, `backends.base.HINTS`): they change how many forwards a continuation costs, never which tokens a seed
    draws (a floor only cuts a continuation its sampler rejects anyway)."""

    draft: Draft = NO_DRAFT  # guesses at the continuation (core.drafts): they decide only how many tokens a forward
    # decodes, never which (core.numerics.verify_draft)
    speculate: int = 0  # most draft tokens an engine verifies per forward; 0 = no draft, one token per forward
    floor: Floor | None = None  # stop early once the score falls below it (the sampler's test rejects such a
    # continuation either way, finished or not)


NO_REPORT, NO_HINTS = Report(), Hints()


@dataclass(frozen=True)
class ExtendRequest:
    """Extend `context` by up to `max_tokens` tokens drawn from the proposal, stopping after an EOS.

    Three groups: what to draw (context, max_tokens, rng, slot), what to report besides (`report`), and hints an
    engine may ignore (`hints`). `halt` stands apart: a stop signal every engine must honour within one forward."""

    context: Tokens  # prompt ids + generated ids so far
    max_tokens: int  # >= 1
    rng: Rng  # the chain's own generator; every draw for this request comes from it
    slot: int = 0  # the chain's cache slot
    report: Report = NO_REPORT
    hints: Hints = NO_HINTS
    proposal: Proposal | None = None  # this request's own proposal (power-pt's rungs, each at its temperature, share
    # one batch); None = the call's (Backend.extend's `proposal`)
    halt: Callable[[], bool] | None = None  # asked after every forward (engine step, for vLLM): once True, the engine
    # stops decoding the request and returns the tokens drawn so far, a cut continuation its caller discards (a server
    # job whose client left or whose deadline passed frees the engine within one forward). It changes no draw. Not a
    # hint: the server counts on every engine to honour it.

    def drawn_from(self, proposal: Proposal) -> Proposal:
        """The proposal this request's tokens are drawn from, in a call made with `proposal`: its own, or the call's."""
        return proposal if self.proposal is None else self.proposal

    def halted(self) -> bool:
        """Whether the request's caller asked the engine to stop decoding it (see `halt`)."""
        return self.halt is not None and self.halt()


@dataclass(frozen=True)
class Continuation:
    """New tokens with their log-probs (natural log), one entry per token."""

    tokens: Tokens  # new ids; the last one is EOS iff the model stopped by itself
    base_logp: tuple[float, ...]  # log p(token | prefix), temperature 1, no truncation
    proposal_logq: tuple[float, ...]  # log q(token | prefix) under the Proposal it was drawn from
    alternatives: tuple[tuple[int, float], ...] = ()  # (id, base log p) of the request's `alternatives` likeliest
    # first tokens, likeliest first (ties by id); empty unless asked for
    entropy: tuple[float, ...] = ()  # nats >= 0: -sum_x p log p of the base next-token distribution each token was
    # drawn after (temperature 1, no truncation); empty unless the request asked (Report.entropy)
    logq_under: tuple[tuple[float, ...], ...] = ()  # per proposal of the request's Report.logq_under, the log q of
    # each token under it (as proposal_logq is under the one drawn from); empty unless asked


# Continuous batching (optional backend method `extend_continuous(requests, proposal, refill, poll=None)`): the
# backend decodes `requests` (a dict key -> ExtendRequest, one slot per request) as one batch that stays full. When a
# row finishes it calls refill(key, continuation), which returns the requests that start now (new keys, possibly
# none); before each decoding step it calls poll(), which returns requests that arrived meanwhile. It returns once
# no row is left and poll() has nothing.
Refill = Callable[[int, "Continuation"], Mapping[int, "ExtendRequest"]]
Poll = Callable[[], Mapping[int, "ExtendRequest"]]


@dataclass(frozen=True)
class Ranked:
    """One token of a scored continuation: its base log p, and the likeliest tokens of the distribution it was drawn
    from (the base next-token distribution after the tokens before it)."""

    base_logp: float  # log p(token | prefix), temperature 1, no truncation: what `score` returns for it
    top: tuple[tuple[int, float], ...]  # (id, base log p) of the n likeliest next tokens, likeliest first, ties by
    # the smaller id (core.numerics.top_alternatives); min(n, V) of them
