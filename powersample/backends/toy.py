"""`toy`: an exact tabular language model read from a JSON spec, for tests, documentation and demos.

Spec format:

    {"vocab": ["a", "b", "<eos>"], "eos_id": 2,
     "default": [0.34, 0.33, 0.33],
     "next": {"": [0.42, 0.58, 0.0], "0": [0.92, 0.04, 0.04]}}

`next` maps the comma-joined ids generated so far ("" = none) to the next-token distribution; other prefixes use
`default`. The prompt text is ignored. Rows are precomputed once per proposal, so drawing a token is a dict lookup
and a bisection: thousands of MCMC samples per second.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from powersample.backends.engine import Row, verify_step
from powersample.core.draws import cumulative, draw_with_cdf
from powersample.core.numerics import entropy, proposal_logprobs, ranked_rows, top_alternatives
from powersample.core.types import Continuation, ExtendRequest, Proposal, Ranked, Tokens
from powersample.errors import PowerSampleError, is_unicode, parse_json

ROW_TOLERANCE = 1e-6  # how far a row's sum may be from 1


@dataclass(frozen=True)
class ToySpec:
    """A validated toy model: next-token probabilities by generated prefix."""

    vocab: tuple[str, ...]
    eos_id: int
    default: tuple[float, ...]
    next: Mapping[str, tuple[float, ...]]

    @classmethod
    def from_dict(cls, spec: Any) -> ToySpec:
        """Validate a parsed JSON spec; every problem is a one-line PowerSampleError naming the bad key."""
        if not isinstance(spec, dict):
            raise PowerSampleError("toy spec: must be a JSON object")
        vocab = spec.get("vocab")
        if not isinstance(vocab, list) or not vocab or not all(isinstance(v, str) for v in vocab):
            raise PowerSampleError("toy spec: 'vocab' must be a non-empty list of strings")
        if not all(is_unicode(v) for v in vocab):  # "\ud800" is valid JSON, but no text can be printed with it
            raise PowerSampleError("toy spec: 'vocab' holds a string with a lone surrogate (not Unicode text)")
        eos_id = spec.get("eos_id")
        if not isinstance(eos_id, int) or isinstance(eos_id, bool) or not 0 <= eos_id < len(vocab):
            raise PowerSampleError(f"toy spec: 'eos_id' must be an integer in [0, {len(vocab) - 1}], got {eos_id!r}")
        default = _row(spec.get("default"), len(vocab), "'default'")
        nxt = spec.get("next", {})
        if not isinstance(nxt, dict):
            raise PowerSampleError("toy spec: 'next' must be an object mapping prefixes to rows")
        rows = {_prefix_key(k, len(vocab), eos_id): _row(v, len(vocab), f"'next'[{k!r}]") for k, v in nxt.items()}
        return cls(tuple(vocab), eos_id, default, rows)

    @classmethod
    def load(cls, path: str | Path) -> ToySpec:
        """Read and validate a spec file; an unreadable, binary or malformed file is a one-line error."""
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise PowerSampleError(f"toy spec: cannot read {path}: {e.strerror}") from None
        return cls.from_dict(parse_json(data, f"toy spec: {path}"))

    def row(self, generated: Sequence[int]) -> tuple[float, ...]:
        """Next-token probabilities after `generated` (in constant time past the longest prefix in `next`)."""
        if len(generated) > self._longest:
            return self.default
        return self.next.get(",".join(map(str, generated)), self.default)

    @functools.cached_property
    def _longest(self) -> int:
        """Ids in the longest prefix that `next` names."""
        return max((key.count(",") + 1 for key in self.next if key), default=0)

    def sequences(self, max_len: int) -> dict[Tokens, float]:
        """Every sequence the model can emit within max_len tokens, with its probability (exact enumeration).

        A sequence is complete (ends in EOS) or has exactly max_len tokens, which then count with their prefix
        probability; together they form a distribution.
        """
        out: dict[Tokens, float] = {}
        frontier: list[tuple[Tokens, float]] = [((), 0.0)]
        while frontier:
            seq, logp = frontier.pop()
            if len(seq) == max_len or (seq and seq[-1] == self.eos_id):
                out[seq] = logp
                continue
            for tok, p in enumerate(self.row(seq)):
                if p > 0:
                    frontier.append((seq + (tok,), logp + math.log(p)))
        return out


def _prefix_key(key: Any, vocab_size: int, eos_id: int) -> str:
    try:
        ids = [int(x) for x in key.split(",")] if key else []
    except (ValueError, AttributeError):
        raise PowerSampleError(f"toy spec: 'next' key {key!r} must be comma-joined token ids") from None
    if any(not 0 <= i < vocab_size for i in ids):
        raise PowerSampleError(f"toy spec: 'next' key {key!r} holds an id outside the vocabulary")
    if eos_id in ids:
        raise PowerSampleError(f"toy spec: 'next' key {key!r} continues past EOS")
    return ",".join(map(str, ids))


def _row(row: Any, vocab_size: int, name: str) -> tuple[float, ...]:
    if not isinstance(row, list) or len(row) != vocab_size:
        raise PowerSampleError(f"toy spec: {name} must be a list of {vocab_size} probabilities (the vocab's length)")
    if not all(_finite_number(x) for x in row):
        raise PowerSampleError(f"toy spec: {name} must hold only finite numbers")
    if any(x < 0 for x in row):
        raise PowerSampleError(f"toy spec: {name} has a negative entry")
    if abs(math.fsum(row) - 1.0) > ROW_TOLERANCE:
        raise PowerSampleError(f"toy spec: {name} sums to {math.fsum(row):.9g}, not 1")
    return tuple(float(x) for x in row)


def _finite_number(x: Any) -> bool:
    """A JSON number that is a finite float (an integer too large for a float is not)."""
    if not isinstance(x, (int, float)) or isinstance(x, bool):
        return False
    try:
        return math.isfinite(x)
    except OverflowError:
        return False


@dataclass
class ToyStats:
    """Diagnostics (not part of the seam): what the backend has done since it was built."""

    extend_calls: int = 0  # extend() calls: tests count the driver's batched calls, fidelity reports them
    forwards: int = 0  # sequential model evaluations a real engine would make: one per token, or per draft chunk
    drafted: int = 0  # draft tokens verified
    kept_drafts: int = 0  # of those, kept


@dataclass(frozen=True)
class _Table:
    """One row under one proposal: log p, log q and q's cumulative sums for bisection."""

    base_logp: tuple[float, ...]
    proposal_logq: tuple[float, ...]
    cdf: tuple[float, ...]
    entropy: float  # of the base row, nats


class ToyBackend:
    """Exact sampling and scoring from a ToySpec. The prompt is ignored: contexts are generated ids."""

    context_length = None
    HINTS = frozenset({"speculate", "floor"})  # both walked as the engines walk them (`_extend_walked`)

    def __init__(self, spec: ToySpec):
        self.spec = spec
        self.eos_ids = frozenset({spec.eos_id})
        self._tables: dict[tuple[int, Proposal], _Table] = {}
        self.stats = ToyStats()  # diagnostics, for tests and tools

    def encode(self, prompt: str, chat: bool = True) -> Tokens:
        return ()

    def encode_messages(self, messages: Sequence[Mapping[str, str]]) -> Tokens:
        """A chat conversation's ids: none, like any prompt (the toy model ignores its prompt)."""
        return ()

    def decode(self, tokens: Sequence[int]) -> str:
        return "".join(self.spec.vocab[t] for t in tokens if t not in self.eos_ids)

    def vocab_size(self) -> int:
        return len(self.spec.vocab)

    def token_text(self, token: int) -> str:
        return self.spec.vocab[token]

    def extend(self, requests: Sequence[ExtendRequest], proposal: Proposal) -> list[Continuation]:
        self.stats.extend_calls += 1
        return [self._extend_one(r, r.drawn_from(proposal)) for r in requests]

    def score(self, context: Sequence[int], continuation: Sequence[int]) -> tuple[float, ...]:
        seq = list(context)
        out = []
        for tok in continuation:
            p = self.spec.row(seq)[tok]
            out.append(math.log(p) if p > 0 else -math.inf)
            seq.append(tok)
        return tuple(out)

    def rank(self, context: Sequence[int], continuation: Sequence[int], n: int) -> tuple[Ranked, ...]:
        """Each token's exact log p and its row's n likeliest tokens (the `Ranking` capability)."""
        prefixes = (list(context) + list(continuation[:i]) for i in range(len(continuation)))
        base = Proposal(temperature=1.0)
        return ranked_rows(
            ((np.asarray(self._table(seq, base).base_logp), tok) for seq, tok in zip(prefixes, continuation)), n
        )

    def confidence(self, context: Sequence[int], continuation: Sequence[int]) -> tuple[float, ...]:
        seq = list(context)
        out = []
        for tok in continuation:
            out.append(math.fsum(p * math.log(p) for p in self.spec.row(seq) if p > 0))
            seq.append(tok)
        return tuple(out)

    def _extend_one(self, request: ExtendRequest, proposal: Proposal) -> Continuation:
        """One continuation: drawn token by token (walked as the engines walk when the request has hints), then what
        the request asks reported besides."""
        if request.hints.speculate > 0 or request.hints.floor is not None:
            return self._extend_walked(request, proposal)
        tokens, logp, logq = self._draw(request, proposal)
        alternatives, entropies, under = self._report(request, tokens, proposal)
        return Continuation(tuple(tokens), tuple(logp), tuple(logq), alternatives, entropies, under)

    def _draw(self, request: ExtendRequest, proposal: Proposal) -> tuple[list[int], list[float], list[float]]:
        """(tokens, log p, log q): up to max_tokens drawn from q, one forward each, each handed to the request's
        on_draw as drawn; stopped after EOS or once the request is halted."""
        seq = list(request.context)
        tokens, logp, logq = [], [], []
        on_draw = request.report.on_draw
        for _ in range(request.max_tokens):
            table = self._table(seq, proposal)
            tok = draw_with_cdf(table.cdf, table.proposal_logq, request.rng)  # draws.draw, on the cached CDF
            tokens.append(tok)
            logp.append(table.base_logp[tok])
            logq.append(table.proposal_logq[tok])
            seq.append(tok)
            if on_draw is not None:
                on_draw((tok,))
            if tok == self.spec.eos_id or request.halted():
                break
        self.stats.forwards += len(tokens)  # one per token drawn
        return tokens, logp, logq

    def _report(
        self, request: ExtendRequest, tokens: Sequence[int], proposal: Proposal
    ) -> tuple[tuple[tuple[int, float], ...], tuple[float, ...], tuple[tuple[float, ...], ...]]:
        """(alternatives, entropies, log q under other proposals) as the request asks: its first token's likeliest
        alternatives, the base entropy before each token, and each token's log q under each of its other
        proposals."""
        report, context = request.report, list(request.context)
        alternatives, entropies = (), ()
        if report.alternatives:
            alternatives = top_alternatives(np.asarray(self._table(context, proposal).base_logp), report.alternatives)
        if report.entropy:
            entropies = tuple(self._table(context + list(tokens[:i]), proposal).entropy for i in range(len(tokens)))
        under = tuple(
            tuple(self._table(context + list(tokens[:i]), other).proposal_logq[t] for i, t in enumerate(tokens))
            for other in report.logq_under
        )
        return alternatives, entropies, under

    def _extend_walked(self, request: ExtendRequest, proposal: Proposal) -> Continuation:
        """The engines' walk (backends.engine.verify_step: drafts, floors) on exact rows: each loop is one forward of
        a real engine, feeding the next id and up to `speculate` draft tokens. It draws what _extend_one draws."""
        row = Row(0, request, next_id=-1)  # the toy model reads its rows off the generated ids, not a fed token
        while True:
            fed = row.feed()
            context = list(request.context) + row.tokens
            logp = np.array([self._table(context + fed[1 : j + 1], proposal).base_logp for j in range(len(fed))])
            self.stats.forwards += 1
            done, _ = verify_step([row], [logp], proposal, self.eos_ids)
            if done:
                break
        self.stats.drafted += row.drafted
        self.stats.kept_drafts += row.kept_drafts
        return row.continuation()

    def _table(self, generated: Sequence[int], proposal: Proposal) -> _Table:
        row = self.spec.row(generated)
        key = (id(row), proposal)
        table = self._tables.get(key)
        if table is None:
            probs = np.asarray(row)
            base = np.full(len(row), -np.inf)
            np.log(probs, out=base, where=probs > 0)
            logq = proposal_logprobs(base, proposal)
            cdf = tuple(cumulative(logq).tolist())
            table = _Table(tuple(base.tolist()), tuple(logq.tolist()), cdf, float(entropy(base)))
            self._tables[key] = table
        return table
