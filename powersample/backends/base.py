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

from typing import Protocol, Sequence

from powersample.core.types import Continuation, ExtendRequest, Proposal, Tokens


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
