"""The backend seam: the only thing samplers know about an engine.

Of any prefix a backend answers two questions (plus, for evaluation, the confidence of the paper's Eq. 13):

1. `extend`: sample a continuation of up to n tokens from the proposal q (the model at temperature tau, optionally
   truncated by top-k / top-p), stopping early at EOS, and return for every new token both its base log-prob
   log p (temperature 1, no truncation) and its proposal log-prob log q.
2. `score`: the base log-prob log p of every token of a given continuation.

Requests come in batches (one per chain) so that an engine can serve all chains with one forward per step. Each
request carries its chain's random generator, so a chain's draws never depend on the rest of the batch, and a
`slot` naming the cache it may reuse: a backend keeps one cache per slot and reuses its longest common prefix
with the request's context, so correctness never depends on the hint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Protocol, Sequence

import numpy as np

from powersample.errors import PowerSampleError

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
class ExtendRequest:
    """Extend `context` by up to `max_tokens` tokens drawn from the proposal, stopping after an EOS."""

    context: Tokens  # prompt ids + generated ids so far
    max_tokens: int  # >= 1
    rng: np.random.Generator  # the chain's own generator; every draw for this request comes from it
    slot: int = 0  # the chain's cache slot
    alternatives: int = 0  # also report the likeliest this-many next tokens after `context` (base log p)


@dataclass(frozen=True)
class Continuation:
    """New tokens with their log-probs (natural log), one entry per token."""

    tokens: Tokens  # new ids; the last one is EOS iff the model stopped by itself
    base_logp: tuple[float, ...]  # log p(token | prefix), temperature 1, no truncation
    proposal_logq: tuple[float, ...]  # log q(token | prefix) under the Proposal it was drawn from
    alternatives: tuple[tuple[int, float], ...] = ()  # (id, base log p) of the request's `alternatives` likeliest
    # first tokens, likeliest first (ties by id); empty unless asked for


# Continuous batching (optional backend method `extend_continuous(requests, proposal, refill, poll=None)`): the
# backend decodes `requests` (a dict key -> ExtendRequest, one slot per request) as one batch that stays full. When a
# row finishes it calls refill(key, continuation), which returns the requests that start now (new keys, possibly
# none); before each decoding step it calls poll(), which returns requests that arrived meanwhile. It returns once
# no row is left and poll() has nothing.
Refill = Callable[[int, "Continuation"], Mapping[int, "ExtendRequest"]]
Poll = Callable[[], Mapping[int, "ExtendRequest"]]


class Backend(Protocol):
    """What samplers may call. See the module docstring."""

    eos_ids: frozenset[int]  # ids that end a sequence
    context_length: int | None  # most tokens (prompt + generated) the model accepts; None = unbounded

    def encode(self, prompt: str, chat: bool) -> Tokens:
        """Prompt ids; `chat` applies the model's chat template (ignored where there is none)."""
        ...

    def decode(self, tokens: Sequence[int]) -> str:
        """Text of generated ids, special tokens dropped."""
        ...

    def extend(self, requests: Sequence[ExtendRequest], proposal: Proposal) -> list[Continuation]:
        """One continuation per request, in order."""
        ...

    def score(self, context: Sequence[int], continuation: Sequence[int]) -> tuple[float, ...]:
        """log p of each continuation token given context and the tokens before it."""
        ...

    def confidence(self, context: Sequence[int], continuation: Sequence[int]) -> tuple[float, ...]:
        """Sum_x p(x | prefix) log p(x | prefix) (minus the entropy) of the base next-token distribution before
        each continuation token: the per-position confidence of the paper's Eq. 13."""
        ...


def proposal_logprobs(base_logp: np.ndarray, proposal: Proposal) -> np.ndarray:
    """log q from log p over the vocabulary (last axis): temperature, then top-k, then top-p, renormalized.

    Removed tokens get -inf; the log of zero is never taken. Shapes: (..., V) -> (..., V).
    """
    if proposal.is_base:
        return base_logp
    logq = log_normalize(base_logp / proposal.temperature)
    if proposal.top_k and proposal.top_k < logq.shape[-1]:
        logq = log_normalize(_keep_top_k(logq, proposal.top_k))
    if proposal.top_p < 1.0:
        logq = log_normalize(_keep_top_p(logq, proposal.top_p))
    return logq


def top_alternatives(base_logp: np.ndarray, k: int) -> tuple[tuple[int, float], ...]:
    """The k likeliest ids of a 1-D log p row with their log p, likeliest first, ties broken by the smaller id."""
    if k <= 0:
        return ()
    order = np.lexsort((np.arange(len(base_logp)), -base_logp))[:k]
    return tuple((int(t), float(base_logp[t])) for t in order)


def log_normalize(logits: np.ndarray) -> np.ndarray:
    """logits - logsumexp(logits) along the last axis; -inf entries stay -inf."""
    peak = np.max(logits, axis=-1, keepdims=True)
    total = np.log(np.sum(np.exp(logits - peak), axis=-1, keepdims=True))
    return logits - peak - total


def logsumexp(x: np.ndarray | Sequence[float], axis: int = -1) -> np.ndarray:
    """log sum exp(x) along `axis` (a float for 1-D input); -inf where every entry is -inf."""
    x = np.asarray(x, dtype=float)
    peak = np.max(x, axis=axis, keepdims=True)
    shift = np.where(np.isfinite(peak), peak, 0.0)
    with np.errstate(divide="ignore"):
        total = np.log(np.sum(np.exp(x - shift), axis=axis, keepdims=True))
    return np.squeeze(total + shift, axis=axis)


def _keep_top_k(logq: np.ndarray, k: int) -> np.ndarray:
    drop = np.argpartition(-logq, k - 1, axis=-1)[..., k:]
    out = logq.copy()
    np.put_along_axis(out, drop, -np.inf, axis=-1)
    return out


def _keep_top_p(logq: np.ndarray, top_p: float) -> np.ndarray:
    # Keep the smallest set of likeliest tokens whose mass reaches top_p (the first token always stays).
    order = np.argsort(-logq, axis=-1, kind="stable")
    probs = np.exp(np.take_along_axis(logq, order, axis=-1))
    mass_before = np.cumsum(probs, axis=-1) - probs
    drop_sorted = mass_before >= top_p
    out = logq.copy()
    np.put_along_axis(out, order, np.where(drop_sorted, -np.inf, np.take_along_axis(logq, order, axis=-1)), axis=-1)
    return out


def draw(logq: np.ndarray, rng: np.random.Generator) -> int:
    """One token id from exp(logq) (1-D) by inverse CDF; tokens with q = 0 have zero width and are never drawn."""
    cdf = np.cumsum(np.exp(logq - np.max(logq)))
    u = rng.random() * cdf[-1]
    token = int(np.searchsorted(cdf, u, side="right"))
    if token == len(cdf):  # u rounded up to the total: take the last token with q > 0
        token = int(np.flatnonzero(np.isfinite(logq))[-1])
    return token


def negative_entropy(base_logp: np.ndarray) -> np.ndarray:
    """Sum_x p log p over the last axis, with 0 log 0 = 0. Shapes: (..., V) -> (...)."""
    p = np.exp(base_logp)
    return np.sum(np.where(p > 0, p * np.where(p > 0, base_logp, 0.0), 0.0), axis=-1)


# --- helpers shared by the engine backends ---------------------------------------------------------------------


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


def plain_transcript(messages: Sequence[Mapping[str, str]]) -> str:
    """A chat conversation as plain text for models without a chat template: "role: content" per line, then
    "assistant:"."""
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


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


def check_fits(context_length: int | None, context: int, new: int) -> None:
    """A one-line PowerSampleError when `context` + `new` tokens exceed the model's context length."""
    if context_length is not None and context + new > context_length:
        raise PowerSampleError(
            f"{context} context tokens + {new} new tokens exceed the model's context length ({context_length})"
        )


def one_line(error: BaseException) -> str:
    """The first non-empty line of an engine's error message, at most 300 characters."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."
