"""The types of the backend seam: what a sampler asks an engine for, and what it gets back.

Numpy only. Samplers and backends both build on these; see `powersample.backends.base` for the Backend Protocol
that answers them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np

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
    draft: Tokens = ()  # a guess at the continuation (the chain's current suffix), verified token by token against
    # q, so the continuation is exactly q-distributed whatever the draft (see core.numerics.verify_draft)
    speculate: int = 0  # most draft tokens an engine verifies per forward; 0 = no draft, one token per forward


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

