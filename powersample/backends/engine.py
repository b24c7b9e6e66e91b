"""Helpers shared by the engine backends (hf, llamacpp, vllm): the batch extend on top of a continuous loop, the
rows of a decoding batch and their draws, the cache's common prefix, and the context-length check (which the api
and the server use too)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from powersample.core.numerics import draw, proposal_logprobs, top_alternatives
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
    """One request being decoded: the token to feed next and what it has drawn. Engines subclass it with where
    the row's cache lives (keyword-only fields)."""

    key: int  # the caller's key for this request (refills of one chain share it)
    request: ExtendRequest
    next_id: int  # token to feed at the next step
    tokens: list[int] = field(default_factory=list)
    base_logp: list[float] = field(default_factory=list)
    proposal_logq: list[float] = field(default_factory=list)
    alternatives: tuple[tuple[int, float], ...] = ()

    def continuation(self) -> Continuation:
        return Continuation(tuple(self.tokens), tuple(self.base_logp), tuple(self.proposal_logq), self.alternatives)


def draw_step(rows: Sequence[Row], logp: np.ndarray, proposal: Proposal, eos_ids: frozenset[int]) -> list[int]:
    """One token per row from q, derived from the rows' base log p (B, V), each drawn with its request's own
    generator and recorded with its log p and log q (and, at a row's first step, the likeliest alternatives); the
    token becomes the row's next_id. Returns the indices of the rows now finished (EOS or max_tokens)."""
    logq = proposal_logprobs(logp, proposal)  # (B, V)
    done = []
    for b, row in enumerate(rows):
        if not row.tokens and row.request.alternatives:
            row.alternatives = top_alternatives(logp[b], row.request.alternatives)
        token = draw(logq[b], row.request.rng)
        row.tokens.append(token)
        row.base_logp.append(float(logp[b, token]))
        row.proposal_logq.append(float(logq[b, token]))
        row.next_id = token
        if token in eos_ids or len(row.tokens) == row.request.max_tokens:
            done.append(b)
    return done


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

