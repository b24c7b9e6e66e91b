"""Helpers shared by the engine backends (hf, llamacpp, vllm): the batch extend on top of a continuous loop, the
rows of a decoding batch and their draws, the cache's common prefix, and the context-length check (which the api
and the server use too)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from powersample.core.numerics import draw, entropy, proposal_logprobs, top_alternatives, verify_draft
from powersample.core.types import Continuation, ExtendRequest, Proposal, Refill
from powersample.errors import PowerSampleError


def extend_in_one_run(
    run: Callable[[dict[int, ExtendRequest], Proposal, Refill], None],
    requests: Sequence[ExtendRequest],
    proposal: Proposal,
) -> list[Continuation]:
    """`extend` for a backend whose continuous loop is `run(requests, proposal, refill)`: every request in one run,
    none refilled; the continuations in request order."""
    results: dict[int, Continuation] = {}

    def collect(key: int, cont: Continuation) -> dict:
        results[key] = cont
        return {}

    run(dict(enumerate(requests)), proposal, collect)
    return [results[j] for j in range(len(requests))]


@dataclass(eq=False)
class Row:
    """One request being decoded: the ids to feed next and what it has drawn. Engines subclass it with where
    the row's cache lives (keyword-only fields).

    With `speculate` = k > 0 (the request's hints), a forward feeds next_id and up to k tokens of the row's current
    guess (its request's `draft`, core.drafts), and `verify_step` walks the logits of every fed id: each token is
    drawn as without a draft (core.numerics.verify_draft), and the walk goes on while the draws equal the guess.
    After a token that differs, the fed ids after it are void and the next guess is looked up from the tokens
    drawn."""

    key: int  # the caller's key for this request (refills of one chain share it)
    request: ExtendRequest
    next_id: int  # token to feed at the next step
    tokens: list[int] = field(default_factory=list)
    base_logp: list[float] = field(default_factory=list)
    proposal_logq: list[float] = field(default_factory=list)
    alternatives: tuple[tuple[int, float], ...] = ()
    entropy: list[float] = field(default_factory=list)  # when the request asks: the base entropy before each token
    logq_under: list[list[float]] = field(default_factory=list)  # when the request asks: per proposal of its
    # Report.logq_under, each token's log q under it
    guess: list[int] = field(default_factory=list)  # the guessed tokens after `tokens`, none verified yet
    drafted: int = 0  # guessed tokens verified (kept or not)
    kept_drafts: int = 0  # of those, kept
    score: float = 0.0  # the request's floor score of the tokens so far (core.types.Floor), without its length term

    def __post_init__(self) -> None:
        if not self.logq_under:
            self.logq_under = [[] for _ in self.request.report.logq_under]
        if self.request.hints.speculate > 0 and not self.tokens:
            self.guess = list(self.request.hints.draft.first(self.request.max_tokens))

    def feed(self, most: int | None = None) -> list[int]:
        """The ids the next forward feeds for this row: next_id, then up to `speculate` guessed tokens (and up to
        `most`, the engine's share for the row this step; never more than the positions left after the next one).
        How many are fed changes no token drawn, only how many one forward can decode."""
        room, k = self.request.max_tokens - len(self.tokens) - 1, self.request.hints.speculate
        n = min(k, room, k if most is None else most)
        return [self.next_id, *self.guess[: max(0, n)]]

    def tally(self, token: int, guessed: int | None) -> None:
        """Count a verified guess (`guessed`: the guess `token` was drawn against, None for none)."""
        if guessed is not None:
            self.drafted += 1
            self.kept_drafts += token == guessed

    def follow(self, token: int, guessed: int | None) -> bool:
        """The draft hint after `token`, once the row goes on: the next guess looked up once the last one was
        replaced or used up. False when the ids fed after the token are void (it is not the guess)."""
        if token != guessed or not self.guess:  # no guess, another token, or the guess used up: look up the next
            self.reguess()
        return guessed is None or token == guessed

    def reguess(self) -> None:
        """The next guess, once the last one was replaced or used up (none when the request does not speculate)."""
        hints = self.request.hints
        if hints.speculate > 0:
            self.guess = list(hints.draft.next(self.tokens, self.request.max_tokens - len(self.tokens)))

    def finished(self, eos_ids: frozenset[int]) -> bool:
        """Whether the row ends after its last token: EOS, max_tokens, or below its floor (the floor hint)."""
        return self.sunk() or self.tokens[-1] in eos_ids or len(self.tokens) == self.request.max_tokens

    def sunk(self) -> bool:
        """Whether the row's tokens fell below its request's floor: its proposal is sure to be rejected."""
        floor = self.request.hints.floor
        if floor is None:
            return False
        self.score = floor.step(self.score, self.base_logp[-1], self.proposal_logq[-1])
        return floor.below(self.score, len(self.tokens))

    def continuation(self) -> Continuation:
        return Continuation(
            tuple(self.tokens),
            tuple(self.base_logp),
            tuple(self.proposal_logq),
            self.alternatives,
            tuple(self.entropy),
            tuple(tuple(lq) for lq in self.logq_under),
        )


def verify_step(
    rows: Sequence[Row], logp: Sequence[np.ndarray], proposal: Proposal, eos_ids: frozenset[int]
) -> tuple[list[int], list[int]]:
    """Draw each row's next tokens from the base log p after each id it fed (`logp[b]`: (len(feed), V)), with its
    request's own generator and from its request's proposal (`proposal` unless it has its own), recording log p and
    log q (and, at a row's first step, the likeliest alternatives; and, when the request asks, the entropy of each
    row of log p and log q under its other proposals), and reporting each row's new tokens to its request's
    `on_draw`.

    Returns the rows now finished (EOS, max_tokens, below their floor, or halted by their caller: ExtendRequest.halt)
    and, per row, how many of the ids it fed
    are still valid (a token that differs from its guess invalidates the fed ids after it: the engine drops them from
    its cache)."""
    done, kept = [], []
    for b, row in enumerate(rows):
        before = len(row.tokens)
        finished, valid = _walk(row, logp[b], row.request.drawn_from(proposal), eos_ids)
        on_draw = row.request.report.on_draw
        if on_draw is not None and len(row.tokens) > before:
            on_draw(tuple(row.tokens[before:]))
        kept.append(valid)
        if finished or row.request.halted():
            done.append(b)
    return done, kept


def _walk(row: Row, logp: np.ndarray, proposal: Proposal, eos_ids: frozenset[int]) -> tuple[bool, int]:
    """One row's tokens from the logits of its fed ids; (finished, fed ids still valid). See verify_step."""
    for j in range(len(logp)):
        _report(row, logp[j])
        guessed = row.guess.pop(0) if row.guess else None
        token = _draw(row, logp[j], proposal, guessed)
        row.tally(token, guessed)
        if row.finished(eos_ids):
            return True, j + 1
        if not row.follow(token, guessed):  # the fed ids after j were guesses that are now void
            return False, j + 1
    return False, len(logp)


def _draw(row: Row, logp: np.ndarray, proposal: Proposal, guessed: int | None) -> int:
    """The row's next token, drawn from q after base log p `logp` (V,) with the request's generator (a guess is
    verified: core.numerics.verify_draft draws the same token), recorded with its log p and log q."""
    logq = proposal_logprobs(logp, proposal)  # (V,): row by row, as the walk often stops before the last
    token = draw(logq, row.request.rng) if guessed is None else verify_draft(logq, guessed, row.request.rng)
    row.tokens.append(token)
    row.base_logp.append(float(logp[token]))
    row.proposal_logq.append(float(logq[token]))
    for under, other in zip(row.logq_under, row.request.report.logq_under):
        under.append(float((logq if other == proposal else proposal_logprobs(logp, other))[token]))
    row.next_id = token
    return token


def _report(row: Row, logp: np.ndarray) -> None:
    """What the request asks reported about the distribution its next token is drawn from (base log p, (V,)): the
    likeliest alternatives before its first token, and every token's entropy."""
    report = row.request.report
    if not row.tokens and report.alternatives:
        row.alternatives = top_alternatives(logp, report.alternatives)
    if report.entropy:
        row.entropy.append(float(entropy(logp)))


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix; the usual case (b extends a) is one C-speed comparison."""
    if len(a) <= len(b) and list(a) == list(b[: len(a)]):
        return len(a)
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def check_fits(context_length: int | None, context: int, new: int, knob: str | None = None) -> None:
    """A one-line PowerSampleError when `context` + `new` tokens exceed the model's context length (None: no limit).

    `knob` names the caller's setting for `new` (max_new_tokens, max_tokens) and makes `context` the prompt: the
    message a user gets before sampling starts, rather than the engine's about one request.
    """
    if context_length is None or context + new <= context_length:
        return
    if knob is not None:
        raise PowerSampleError(
            f"the prompt is {context} tokens; with {knob}={new} it exceeds the model's context of {context_length} "
            "tokens"
        )
    raise PowerSampleError(
        f"{context} context tokens + {new} new tokens exceed the model's context length ({context_length})"
    )
