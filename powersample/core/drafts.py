"""Drafts of speculative proposals: guesses at a continuation that an engine verifies several tokens per forward.

A draft never changes what is drawn. Every token is drawn from q with the same uniform as without a draft, and a
drafted token is kept when the draw equals it (core.numerics.verify_draft): the guess only decides how many tokens
one forward can decode. So any guess is exact, and a good one saves forwards.

Where guesses come from. A chain's MH proposal from index i usually rewrites its current suffix x_>=i token for
token until a decision point, where it takes another branch; after that its text is new to the current state, but
often not to the chain: earlier proposals (rejected ones too) took the same branch from the same prefix, or the
prompt and the state hold the same phrase. A `Corpus` keeps everything a chain has produced (prompt, extensions,
proposals), indexed by n-grams, and `Corpus.lookup` continues the longest recent match of the latest tokens.
A `Draft` starts from its own guess (the current suffix, for an MH proposal) and asks the corpus once that guess is
replaced or used up. Measured on power-sampling traces of the embedded model (docs/performance.md), that turns
1.25 tokens per forward (the current suffix alone) into 2.6 at k = 8.

Same output in any schedule. The draft token at each position is a function of the tokens drawn before it (the
guess goes on while its tokens are kept, and the next one is looked up from the tokens alone), never of how many
tokens a forward verified or which rows shared it. The sampler adds to its corpus only between its requests.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Sequence

NGRAM = 4  # longest n-gram indexed: a lookup tries the last 4 tokens, then 3, 2, 1
WINDOW = 16  # tokens of context a match is compared over (the longest match wins; ties go to the most recent)
RECENT = 16  # occurrences kept per n-gram, the most recent


class Corpus:
    """Token sequences a chain has produced, indexed by their n-grams. Each sequence is stored with the last WINDOW
    tokens of its context, so a match can start inside the context; only its own tokens are indexed."""

    def __init__(self) -> None:
        self._flat: list[int] = []  # every stored sequence, one after another
        self._ends: list[int] = []  # where each stored sequence ends in _flat, increasing
        self._index: dict[tuple[int, ...], list[int]] = {}  # n tokens -> positions of the token after them

    def add(self, context: Sequence[int], new: Sequence[int]) -> None:
        """Store `new`, which followed `context`."""
        if not new:
            return
        head = list(context[-WINDOW:])
        start = len(self._flat)
        self._flat += head + list(new)
        self._ends.append(len(self._flat))
        for p in range(start + len(head), len(self._flat)):  # the token at p follows the n tokens before it
            for n in range(1, min(NGRAM, p - start) + 1):
                seen = self._index.setdefault(tuple(self._flat[p - n : p]), [])
                seen.append(p)
                if len(seen) > RECENT:
                    del seen[0]

    def lookup(self, tokens: Sequence[int], most: int) -> tuple[int, ...]:
        """What followed the longest recent match of the last tokens of `tokens`, at most `most` tokens; () when
        not even the last token was seen with a successor."""
        for n in range(min(NGRAM, len(tokens)), 0, -1):
            positions = self._index.get(tuple(tokens[-n:]))
            if positions:
                p = max(positions, key=lambda q: (self._match(q, tokens, n), q))
                end = self._ends[bisect.bisect_right(self._ends, p)]
                return tuple(self._flat[p : min(end, p + most)])
        return ()

    def _match(self, p: int, tokens: Sequence[int], n: int) -> int:
        """How many tokens before position p equal the last ones of `tokens` (n are known to), up to WINDOW, within
        the stored sequence."""
        start = self._ends[bisect.bisect_right(self._ends, p) - 1] if p >= self._ends[0] else 0
        m = n
        while m < min(WINDOW, len(tokens), p - start) and self._flat[p - m - 1] == tokens[-m - 1]:
            m += 1
        return m


@dataclass(frozen=True)
class Draft:
    """Guesses at one request's continuation: `guess` at the start, then lookups in `corpus`."""

    guess: tuple[int, ...] = ()  # the continuation guessed at the start (an MH proposal's: the chain's current suffix)
    corpus: Corpus | None = None  # where the next guess comes from once a guess is replaced or used up; None: none
    tail: tuple[int, ...] = ()  # the request context's last WINDOW tokens, which lookups continue

    def first(self, most: int) -> tuple[int, ...]:
        """The guess before any token is drawn, at most `most` tokens."""
        return self.guess[:most] or self.next((), most)

    def next(self, generated: Sequence[int], most: int) -> tuple[int, ...]:
        """The guess after `generated` (the tokens drawn so far), once the last guess was replaced or used up."""
        if self.corpus is None:
            return ()
        return self.corpus.lookup((*self.tail, *generated[-WINDOW:])[-WINDOW:], most)


NO_DRAFT = Draft()
