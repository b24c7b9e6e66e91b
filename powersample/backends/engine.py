"""Helpers shared by the engine backends (hf, llamacpp, vllm): the batch extend on top of a continuous loop, the
rows of a decoding batch and their draws, the cache's common prefix, and the context-length check (which the api
and the server use too)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from powersample.core.numerics import draw, proposal_logprobs, top_alternatives, verify_draft
from powersample.core.types import Continuation, ExtendRequest, Proposal, Refill
from powersample.errors import PowerSampleError


def extend_in_one_run(
    run: Callable[[dict[int, "ExtendRequest"], "Proposal", Refill], None],
    requests: Sequence["ExtendRequest"],
    proposal: "Proposal",
) -> list["Continuation"]:
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

    With a draft (the request's `draft`, when `speculate` > 0) a forward feeds next_id and up to `speculate` draft
    tokens, and `verify_step` walks the logits of every fed id: each drafted token is kept or replaced exactly as
    `core.numerics.verify_draft` says, so the row's tokens are q-distributed; after a replacement the fed ids
    after it are void and the rest of the draft is re-aligned (`realign`)."""

    key: int  # the caller's key for this request (refills of one chain share it)
    request: ExtendRequest
    next_id: int  # token to feed at the next step
    tokens: list[int] = field(default_factory=list)
    base_logp: list[float] = field(default_factory=list)
    proposal_logq: list[float] = field(default_factory=list)
    alternatives: tuple[tuple[int, float], ...] = ()
    draft: list[int] = field(default_factory=list)  # draft tokens not verified yet (set by start_draft)
    drafted: int = 0  # draft tokens verified (kept or replaced)
    kept_drafts: int = 0  # of those, kept

    def __post_init__(self) -> None:
        if self.request.speculate > 0 and not self.tokens:
            self.draft = list(self.request.draft[: self.request.max_tokens])

    def feed(self) -> list[int]:
        """The ids the next forward feeds for this row: next_id, then up to `speculate` draft tokens (never more
        than the positions left after the next one)."""
        room = self.request.max_tokens - len(self.tokens) - 1
        return [self.next_id, *self.draft[: max(0, min(self.request.speculate, room))]]

    def continuation(self) -> Continuation:
        return Continuation(tuple(self.tokens), tuple(self.base_logp), tuple(self.proposal_logq), self.alternatives)


def verify_step(rows: Sequence[Row], logp: Sequence[np.ndarray], proposal: Proposal,
                eos_ids: frozenset[int]) -> tuple[list[int], list[int]]:  # fmt: skip
    """Draw each row's next tokens from the base log p after each id it fed (`logp[b]`: (len(feed), V)), with its
    request's own generator, recording log p and log q (and, at a row's first step, the likeliest alternatives).

    Returns the rows now finished (EOS or max_tokens) and, per row, how many of the ids it fed are still valid
    (a replaced draft token invalidates the fed ids after it: the engine drops them from its cache)."""
    done, kept = [], []
    for b, row in enumerate(rows):
        finished, valid = _walk(row, logp[b], proposal, eos_ids)
        kept.append(valid)
        if finished:
            done.append(b)
    return done, kept


def _walk(row: Row, logp: np.ndarray, proposal: Proposal, eos_ids: frozenset[int]) -> tuple[bool, int]:
    """One row's tokens from the logits of its fed ids; (finished, fed ids still valid). See verify_step."""
    logq = proposal_logprobs(logp, proposal)  # (n, V)
    for j in range(len(logp)):
        if not row.tokens and row.request.alternatives:
            row.alternatives = top_alternatives(logp[j], row.request.alternatives)
        drafted = row.draft.pop(0) if row.draft else None
        token = draw(logq[j], row.request.rng) if drafted is None else verify_draft(logq[j], drafted, row.request.rng)
        row.tokens.append(token)
        row.base_logp.append(float(logp[j, token]))
        row.proposal_logq.append(float(logq[j, token]))
        row.next_id = token
        if drafted is not None:
            row.drafted += 1
            row.kept_drafts += token == drafted
        if token in eos_ids or len(row.tokens) == row.request.max_tokens:
            return True, j + 1
        if drafted is not None and token != drafted:  # replaced: the fed ids after j are void, and the rest of
            row.draft = realign(row.draft, token)  # the draft is re-aligned to the new token
            return False, j + 1
    return False, len(logp)


REALIGN_WINDOW = 4  # how far ahead in the draft a replaced token is looked for


def realign(rest: list[int], token: int) -> list[int]:
    """The draft after a drafted token was replaced by `token`: if `token` comes up in the next REALIGN_WINDOW
    draft tokens, the draft goes on after it (the new text skipped ahead, as prompt-lookup decoding re-aligns);
    else there is no draft left. Any draft is exact (verify_draft): this only decides what is fed and kept.

    Measured on the embedded model (llamacpp, k = 8): going on with the old draft as a substitution when the token
    is not found kept 4 in 10 of those tokens and, fed for nothing, doubled the wall per token; dropping it is the
    cheaper rule on engines whose forward grows with the tokens fed."""
    ahead = rest[:REALIGN_WINDOW]
    return rest[ahead.index(token) + 1 :] if token in ahead else []


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

