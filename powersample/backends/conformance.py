"""The backend conformance suite: the promises of the seam (`base.py`) as plain functions, for any backend.

Every engine's tests run it (tests/test_conformance.py on the toy model, test_hf_backend.py, test_llamacpp_backend.py),
and so can a third-party backend's:

    from powersample.backends import conformance

    subject = conformance.Subject(backend, backend.encode("Name three primary colors.", chat=True))
    skipped = conformance.run(subject)  # every check; or each one alone: for check in conformance.CHECKS: ...

A check takes a `Subject` (the backend, a prompt's ids, tolerances, and what else the caller can give) and raises
AssertionError saying what broke, or NotApplicable when the subject lacks what the check needs (an optional
capability, a context length, the full-vocabulary log p). It imports no test framework.

The promises:
- `score` agrees with the base log p returned while sampling (one request, or a batch of ragged contexts);
- rewinding a cache gives the same log-probs as computing from scratch;
- tau = 1 gives log q = log p exactly; a colder proposal gives a different, valid log q (q itself, given next_logp);
- top-k draws only from the k likeliest tokens, and renormalizing only raises q;
- the same generator gives the same continuation, in any slot; other generators give others;
- EOS only ever comes last; a continuation stops at EOS or at max_tokens;
- score obeys the chain rule; an empty continuation scores ();
- confidence (optional) is minus the entropy of each next-token distribution, and obeys the chain rule too;
- rank (optional) gives score's log p and each position's n likeliest tokens, ranked, ties by id (with next_logp:
  the top n of the independent row; n past the vocabulary: all of it);
- vocabulary (optional) covers every id the backend draws, and its last id can be scored and decoded;
- a request that asks for entropies gets one per token, each the entropy of the base next-token distribution
  (= -confidence where the backend has it), and the same tokens and log-probs as without asking, speculated or not;
- a request with `on_draw` reports its tokens as they are drawn (in order, together its continuation's tokens;
  per forward where the backend says so) and draws what it draws without, batched and speculated too;
- a row of a batch gets the same draws and log-probs as the same request alone;
- a continuation verified against a draft (speculative proposals) is like any other: EOS last, log p = score, q's log q;
- log p and log q do not depend on the shape of the forwards: alone, in batches of 2, 4 and 8, drafted at k = 1, 4
  and 8, and prefilled by score, within the subject's tolerance (bit-equal where it is 0);
- past a sliding window (the subject's long_prompt) scoring, drafting, batching and rewinding still agree;
- rows joining and leaving a continuous batch draw what they draw alone;
- each request hint the backend honours (its `HINTS`: base.hints_honoured) costs it fewer forwards and draws the same
  tokens; a hint it does not honour changes nothing (`describe_hints` says which, for the CLI);
- a request past the model's context length is a one-line PowerSampleError;
- an engine's KV cache (optional: the subject's `cache`) feeds only what it lacks: the ids past a rewind, a cached
  prefix's last id, a prompt once for the chains that share it, and nothing of a rejected proposal's current state
  but its last id.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Iterator, Sequence

import numpy as np

from powersample.backends.base import (
    HINTS,
    Backend,
    Confidence,
    ContinuousBatching,
    Ranking,
    Vocabulary,
    capability,
    hints_honoured,
)
from powersample.backends.engine import common_prefix
from powersample.core.drafts import NO_DRAFT, WINDOW, Corpus, Draft
from powersample.core.numerics import negative_entropy, proposal_logprobs, top_alternatives
from powersample.core.types import Continuation, ExtendRequest, Floor, Hints, Proposal, Report, Tokens
from powersample.errors import PowerSampleError

TOLERANCE = 1e-4  # fp32 incremental (cached, batched) decoding vs a full forward
BASE = Proposal(temperature=1.0)
ENTROPY = Report(entropy=True)
NextLogp = Callable[[Tokens], np.ndarray]  # context -> base log p of the next token over the vocabulary, (V,)


class NotApplicable(Exception):
    """The check needs something the subject lacks; nothing was checked."""


@dataclass(frozen=True)
class Cache:
    """An engine's KV cache as the cache checks see it."""

    empty: Callable[[], Backend]  # a new engine on the same model, its caches empty
    fed: Callable[[Backend], int]  # the ids an engine has fed its model so far
    with_draws: bool = False  # fed counts the drawn ids fed back too (a continuation's tokens but its last)

    def context_fed(self, engine: Backend, before: int, *conts: Continuation) -> int:
        """The context ids `engine` has fed since its count was `before`, while drawing `conts` (without drafts)."""
        return self.fed(engine) - before - (sum(len(c.tokens) - 1 for c in conts) if self.with_draws else 0)


@dataclass(frozen=True)
class Subject:
    """A backend under test and what the checks may use besides it."""

    backend: Backend
    prompt: Tokens  # ids to extend; may be () where the backend accepts an empty context (the toy model)
    tolerance: float = TOLERANCE  # how far one token's log p may move between cached, batched and fresh evaluation
    proposal_tolerance: float | None = None  # the same for a cold proposal's log q against next_logp (None: tolerance)
    next_logp: NextLogp | None = None  # the base log p after a context, when the caller can compute it independently
    contexts: tuple[Tokens, ...] = ()  # the batching check's ragged contexts; () = the prompt and sampled extensions
    draws_per_forward: bool = False  # the backend reports Report.on_draw every forward (else: at least once)
    long_prompt: Tokens = ()  # a prompt longer than the model's sliding window (its sliding layers have dropped
    # positions); () = the model has none, or the caller has no such prompt
    cache: Cache | None = None  # the engine's KV cache, for the cache checks; None = it keeps none, or no counter


def extend(
    backend: Backend, context: Sequence[int], n: int, seed: int, proposal: Proposal = BASE, slot: int = 0
) -> Continuation:
    """One request of `n` tokens at most, drawn with a generator seeded by `seed`."""
    return backend.extend([ExtendRequest(tuple(context), n, np.random.default_rng(seed), slot)], proposal)[0]


# --- the checks -------------------------------------------------------------------------------------------------


def score_agrees_with_sampling(s: Subject) -> None:
    """score(context, tokens) is the base log p that extend returned with the tokens, at tau = 1 and colder, for one
    request and for a batch of ragged contexts."""
    b = s.backend
    for proposal in (BASE, Proposal(0.5)):
        cont = extend(b, s.prompt, 12, seed=1, proposal=proposal)
        _check(
            len(cont.tokens) == len(cont.base_logp) == len(cont.proposal_logq) >= 1,
            f"a continuation needs one log p and one log q per token, and at least one token: {cont}",
        )
        _close(b.score(s.prompt, cont.tokens), cont.base_logp, s.tolerance, f"score vs extend at {proposal}")
    proposal = Proposal(0.5)
    first = extend(b, s.prompt, 3, seed=1, proposal=proposal, slot=10)
    contexts = [s.prompt, s.prompt + first.tokens[:1], s.prompt + first.tokens[:2]]
    requests = [ExtendRequest(c, 6, np.random.default_rng(j), 20 + j) for j, c in enumerate(contexts)]
    for context, cont in zip(contexts, b.extend(requests, proposal)):
        _check(
            1 <= len(cont.tokens) == len(cont.base_logp) == len(cont.proposal_logq) <= 6,
            f"a batched row of max_tokens=6 returned {len(cont.tokens)} tokens, {len(cont.base_logp)} log p, "
            f"{len(cont.proposal_logq)} log q",
        )
        _close(b.score(context, cont.tokens), cont.base_logp, s.tolerance, "score vs a batched extend")


def rewinding_matches_recomputing(s: Subject) -> None:
    """Extending a slot's cache back at a shorter context gives what a fresh slot computes."""
    b = s.backend
    long = extend(b, s.prompt, 8, seed=2, slot=30)
    cut = s.prompt + long.tokens[: min(2, len(long.tokens) - 1)]
    rewound = extend(b, cut, 6, seed=3, slot=30)  # same slot: the cache is rewound to `cut`
    _close(b.score(cut, rewound.tokens), rewound.base_logp, s.tolerance, "score vs extend from a rewound cache")
    recomputed = extend(b, cut, 6, seed=3, slot=31)  # a fresh slot
    _check(
        recomputed.tokens == rewound.tokens,
        f"a rewound cache drew {rewound.tokens}, a fresh slot {recomputed.tokens}, with the same generator",
    )
    _close(recomputed.base_logp, rewound.base_logp, s.tolerance, "log p from a rewound cache vs a fresh slot")


def tau_one_gives_log_q_equal_to_log_p(s: Subject) -> None:
    """At temperature 1 without truncation q is p: the very same numbers."""
    cont = extend(s.backend, s.prompt, 8, seed=4, slot=40)
    _check(cont.proposal_logq == cont.base_logp, f"tau = 1: log q {cont.proposal_logq} != log p {cont.base_logp}")


def cold_proposal_has_its_own_valid_log_q(s: Subject) -> None:
    """At tau = 0.25 log q is finite, <= 0 and not log p; with next_logp, it is q of the independent row."""
    cold = Proposal(temperature=0.25)
    cont = extend(s.backend, s.prompt, 8, seed=7, proposal=cold, slot=41)
    logq = np.array(cont.proposal_logq)
    _check(bool(np.all(np.isfinite(logq)) and np.all(logq <= 0)), f"log q of drawn tokens must be finite, <= 0: {logq}")
    _check(not np.allclose(logq, cont.base_logp), f"tau = 0.25: log q {logq} is log p")
    if s.next_logp is not None:
        want = [proposal_logprobs(row, cold)[tok] for row, tok in _rows(s, cont.tokens)]
        _close(logq, want, _proposal_tolerance(s), "log q vs q of the independent next_logp rows")


def top_k_draws_only_from_the_top_k(s: Subject) -> None:
    """With top-k, every drawn token is among the k likeliest of its row, and renormalized q >= p. Needs next_logp
    (k = 5, or V - 1 for a vocabulary of at most 5)."""
    if s.next_logp is None:
        raise NotApplicable("top-k needs next_logp, the full-vocabulary log p of a context")
    k = min(5, len(s.next_logp(s.prompt)) - 1)
    cont = extend(s.backend, s.prompt, 12, seed=11, proposal=Proposal(temperature=1.0, top_k=k), slot=42)
    for row, tok in _rows(s, cont.tokens):
        _check(row[tok] >= np.sort(row)[-k], f"top_k={k} drew token {tok}, which is not among its row's top {k}")
    _check(
        all(q >= p for q, p in zip(cont.proposal_logq, cont.base_logp)),
        f"top-k's renormalized log q must be >= log p: {cont.proposal_logq} vs {cont.base_logp}",
    )


def same_generator_same_continuation(s: Subject) -> None:
    """The same seed draws the same tokens and log p from its own slot's cache and from another slot; other seeds
    draw something else."""
    b = s.backend
    one = extend(b, s.prompt, 12, seed=12, slot=5)
    again = extend(b, s.prompt, 12, seed=12, slot=5)  # the same slot: served from its cache
    other_slot = extend(b, s.prompt, 12, seed=12, slot=6)
    _check(
        one.tokens == again.tokens == other_slot.tokens,
        f"one generator, three draws: {one.tokens}, {again.tokens} (same slot), {other_slot.tokens} (other slot)",
    )
    _close(one.base_logp, again.base_logp, s.tolerance, "log p of the same draw from the slot's cache")
    _close(one.base_logp, other_slot.base_logp, s.tolerance, "log p of the same draw in another slot")
    others = [extend(b, s.prompt, 12, seed=seed, slot=7).tokens for seed in (13, 14, 15)]
    _check(any(t != one.tokens for t in others), f"four generators drew the same tokens {one.tokens}")


def eos_comes_only_last(s: Subject) -> None:
    """A continuation stops at its first EOS or at max_tokens (checked at tau = 1.5, where EOS is likelier)."""
    b = s.backend
    hot = Proposal(1.5)
    one = extend(b, s.prompt, 12, seed=6, proposal=hot, slot=60)
    two = extend(b, s.prompt, 12, seed=6, proposal=hot, slot=61)
    _check(one.tokens == two.tokens, f"one generator drew {one.tokens} in one slot, {two.tokens} in another")
    _check(not set(one.tokens[:-1]) & b.eos_ids, f"EOS before the last token: {one.tokens}")
    _check(
        len(one.tokens) == 12 or one.tokens[-1] in b.eos_ids,
        f"stopped after {len(one.tokens)} of 12 tokens without EOS: {one.tokens}",
    )


def score_obeys_the_chain_rule(s: Subject) -> None:
    """score(c, a + b) == score(c, a) + score(c + a, b), for sampled continuations and for encoded text; and an
    empty continuation scores ()."""
    b = s.backend
    conts = [extend(b, s.prompt, 6, seed=seed, slot=50) for seed in (5, 6)]  # two: one may stop at EOS at once
    pairs = [(c.tokens[:2], c.tokens[2:]) for c in conts]
    text = (b.encode(" Red, yellow", chat=False), b.encode(" and blue.", chat=False))
    if all(text):  # a model whose prompts encode to ids (not the toy's)
        pairs.append(text)
    for first, rest in pairs:
        whole = b.score(s.prompt, first + rest)
        _close(whole, b.score(s.prompt, first) + b.score(s.prompt + first, rest), s.tolerance, "the chain rule")
    _check(b.score(s.prompt, ()) == (), "score of an empty continuation must be ()")


def confidence_is_minus_the_entropy(s: Subject) -> None:
    """confidence (optional: `Confidence`) gives one value <= 0 per token, obeys the chain rule, is () for an empty
    continuation, and with next_logp is sum_x p log p of each independent row."""
    scorer = capability(s.backend, Confidence)
    if scorer is None:
        raise NotApplicable("the backend has no confidence method (the optional Confidence capability)")
    cont = extend(s.backend, s.prompt, 6, seed=7, slot=70)
    conf = scorer.confidence(s.prompt, cont.tokens)
    _check(len(conf) == len(cont.tokens), f"{len(conf)} confidences for {len(cont.tokens)} tokens")
    _check(all(c <= 1e-12 for c in conf), f"minus an entropy is <= 0: {conf}")
    _check(scorer.confidence(s.prompt, ()) == (), "confidence of an empty continuation must be ()")
    head = cont.tokens[:1]
    parts = scorer.confidence(s.prompt, head) + scorer.confidence(s.prompt + head, cont.tokens[1:])
    _close(conf, parts, s.tolerance, "confidence and the chain rule")
    if s.next_logp is not None:
        want = [negative_entropy(row) for row, _ in _rows(s, cont.tokens)]
        _check(all(c <= 0 for c in want), f"sum p log p of the next_logp rows must be <= 0: {want}")
        _close(conf, want, s.tolerance, "confidence vs sum p log p of the independent next_logp rows")


def rank_gives_log_p_and_the_likeliest_tokens(s: Subject) -> None:
    """rank (optional: `Ranking`) gives, per continuation token, score's log p and min(n, V) (id, log p), likeliest
    first, ties by the smaller id, the token among them when it is likelier than the last; () for an empty
    continuation; the first position's top n are the alternatives extend reports; with next_logp, each position's
    top n are those of the independent row (n = 3, and n past the vocabulary where it is small)."""
    ranker = capability(s.backend, Ranking)
    if ranker is None:
        raise NotApplicable("the backend has no rank method (the optional Ranking capability)")
    request = ExtendRequest(s.prompt, 6, np.random.default_rng(8), 75, Report(alternatives=3))
    cont = s.backend.extend([request], BASE)[0]
    _check(ranker.rank(s.prompt, (), 3) == (), "rank of an empty continuation must be ()")
    vocab = len(s.next_logp(s.prompt)) if s.next_logp is not None else None
    for n in (0, 1, 3) + ((vocab + 2,) if vocab is not None and vocab <= 64 else ()):
        ranked = ranker.rank(s.prompt, cont.tokens, n)
        _check(len(ranked) == len(cont.tokens), f"{len(ranked)} ranked positions for {len(cont.tokens)} tokens")
        _close([r.base_logp for r in ranked], s.backend.score(s.prompt, cont.tokens), s.tolerance, f"rank {n} vs score")
        for i, (r, token) in enumerate(zip(ranked, cont.tokens)):
            _check_ranking(r.top, n if vocab is None else min(n, vocab), f"position {i}, n = {n}")
            if n and len(r.top) == n and r.base_logp > r.top[-1][1] + s.tolerance:
                _check(
                    token in dict(r.top),
                    f"position {i}: token {token} (log p {r.base_logp}) is likelier than "
                    f"the last of the top {n} {r.top} but not among them",
                )
        if n == 3:
            _check(
                [t for t, _ in ranked[0].top] == [t for t, _ in cont.alternatives] or _near_tie(ranked[0].top),
                f"rank's first top 3 {ranked[0].top} vs extend's alternatives {cont.alternatives}",
            )
            _close(
                [lp for _, lp in ranked[0].top],
                [lp for _, lp in cont.alternatives],
                s.tolerance,
                "rank's first top 3 vs extend's alternatives",
            )
        if s.next_logp is not None:
            for (row, _), r in zip(_rows(s, cont.tokens), ranked):
                want = top_alternatives(row, n)
                _check(
                    [t for t, _ in r.top] == [t for t, _ in want] or _near_tie(want),
                    f"rank's top {n} {r.top} vs the independent row's {want}",
                )
                _close([lp for _, lp in r.top], [lp for _, lp in want], s.tolerance, f"rank's top {n} log p")
                _close([lp for _, lp in r.top], [row[t] for t, _ in r.top], s.tolerance, f"rank's top {n} ids' log p")


def vocabulary_covers_the_ids(s: Subject) -> None:
    """vocab_size (optional: `Vocabulary`) exceeds every id drawn and every EOS id; its last id scores (log p <= 0),
    decodes, and has a token_text, as EOS does; with next_logp, no row is narrower than the vocabulary."""
    vocab = capability(s.backend, Vocabulary)
    if vocab is None:
        raise NotApplicable("the backend has no vocab_size and token_text (the optional Vocabulary capability)")
    size = vocab.vocab_size()
    cont = extend(s.backend, s.prompt, 8, seed=9, proposal=Proposal(1.5), slot=76)
    _check(
        size >= 1 and all(0 <= t < size for t in (*cont.tokens, *s.backend.eos_ids)),
        f"vocab_size {size} does not cover the drawn ids {cont.tokens} and EOS ids {sorted(s.backend.eos_ids)}",
    )
    [logp] = s.backend.score(s.prompt, (size - 1,))
    _check(logp <= 1e-9, f"the last id {size - 1} scored {logp}")
    _check(isinstance(s.backend.decode([size - 1]), str), f"the last id {size - 1} does not decode to text")
    texts = [vocab.token_text(t) for t in (size - 1, *sorted(s.backend.eos_ids))]
    _check(all(isinstance(t, str) for t in texts) and all(texts[1:]), f"token texts of the last id and EOS: {texts}")
    if s.next_logp is not None:
        _check(len(s.next_logp(s.prompt)) >= size, f"a row of {len(s.next_logp(s.prompt))} for vocab_size {size}")


def entropies_are_reported_when_asked(s: Subject) -> None:
    """Report.entropy = True adds one entropy >= 0 per token (nats): minus the confidence (when the backend
    has it) and -sum p log p of the next_logp rows (when given); and it changes nothing else, batched rows and
    drafts included."""
    asked = [ExtendRequest(s.prompt, 6, np.random.default_rng(seed), 90 + seed, ENTROPY) for seed in (3, 4)]
    drafted = ExtendRequest(s.prompt, 6, np.random.default_rng(3), 92, ENTROPY, Hints(Draft((), Corpus(), ()), 4))
    try:
        conts = s.backend.extend([*asked, drafted], BASE)
    except PowerSampleError as e:
        raise NotApplicable(f"the backend does not report entropies: {e}") from None
    plain = extend(s.backend, s.prompt, 6, seed=3, slot=93)
    for cont in conts:
        _check(len(cont.entropy) == len(cont.tokens), f"{len(cont.entropy)} entropies for {len(cont.tokens)} tokens")
        _check(all(h >= 0 for h in cont.entropy), f"an entropy is >= 0: {cont.entropy}")
    for cont in (conts[0], conts[2]):
        _check(cont.tokens == plain.tokens, f"asking for entropies changed the draw: {cont.tokens} vs {plain.tokens}")
        _close(cont.base_logp, plain.base_logp, s.tolerance, "log p with and without entropies")
    _check(plain.entropy == (), f"entropies came unasked: {plain.entropy}")
    scorer = capability(s.backend, Confidence)
    if scorer is not None:
        _close(
            conts[1].entropy,
            [-c for c in scorer.confidence(s.prompt, conts[1].tokens)],
            s.tolerance,
            "entropy vs -confidence",
        )
    if s.next_logp is not None:
        _close(
            conts[1].entropy,
            [-negative_entropy(row) for row, _ in _rows(s, conts[1].tokens)],
            s.tolerance,
            "entropy vs -sum p log p of the next_logp rows",
        )


def draws_are_reported_as_drawn(s: Subject) -> None:
    """Report.on_draw gets each request's new tokens in order, all of them, before extend returns, and asking
    changes no draw (two rows of a batch, one of them speculating). With draws_per_forward (the subject's backend
    reports every forward), a continuation of n tokens drawn without a draft is reported in n calls of one token."""
    seen: dict[int, list[Tokens]] = {0: [], 1: []}
    cold = Proposal(temperature=0.5)
    draft = Draft((), Corpus(), ())
    requests = [
        ExtendRequest(
            s.prompt, 7, np.random.default_rng(60 + j), 60 + j, Report(on_draw=seen[j].append), Hints(draft, 2 * j)
        )
        for j in (0, 1)
    ]
    conts = s.backend.extend(requests, cold)
    for j, cont in enumerate(conts):
        plain = extend(s.backend, s.prompt, 7, seed=60 + j, proposal=cold, slot=62 + j)
        _check(cont.tokens == plain.tokens, f"row {j}: on_draw changed the draw: {cont.tokens} vs {plain.tokens}")
        reported = tuple(t for run in seen[j] for t in run)
        _check(reported == cont.tokens, f"row {j}: reported {seen[j]} for the tokens {cont.tokens}")
        _check(all(run for run in seen[j]), f"row {j}: an empty report: {seen[j]}")
    if s.draws_per_forward:
        _check(len(seen[0]) == len(conts[0].tokens), f"one report per forward: {seen[0]} for {conts[0].tokens}")


def batched_rows_match_single_rows(s: Subject, alone: Backend | None = None) -> list[Continuation]:
    """Each row of a batch (ragged contexts, q != p) draws the same tokens with the same log p and log q as its
    request alone (on `alone`, default the same backend), and score agrees with it. Returns the batch's
    continuations, for callers that count what the batch cost."""
    b, single = s.backend, alone or s.backend
    proposal = Proposal(temperature=0.5)
    contexts = s.contexts or _ragged(s)
    requests = [ExtendRequest(c, 8, np.random.default_rng(40 + j), 200 + j) for j, c in enumerate(contexts)]
    batched = b.extend(requests, proposal)
    _check(len(batched) == len(requests), f"{len(batched)} continuations for {len(requests)} requests")
    for j, (context, cont) in enumerate(zip(contexts, batched)):
        one = extend(single, context, 8, seed=40 + j, proposal=proposal, slot=300 + j)
        _check(one.tokens == cont.tokens, f"row {j} drew {cont.tokens} in the batch, {one.tokens} alone")
        _close(one.base_logp, cont.base_logp, s.tolerance, f"row {j}'s log p, batched vs alone")
        _close(one.proposal_logq, cont.proposal_logq, s.tolerance, f"row {j}'s log q, batched vs alone")
        _close(single.score(context, cont.tokens), cont.base_logp, s.tolerance, f"score vs batched row {j}")
    return batched


def requests_carry_their_own_proposals(s: Subject) -> None:
    """Requests with proposals of their own (power-pt's rungs) share one call: each draws from its own proposal, not
    the call's: its first token is the one it draws alone at that proposal, and its log q is that proposal's over the
    tokens both drew alike (up to the first that differs: a batch's rounding may move a later draw across a CDF
    boundary on an engine that is not bit-exact; batched_rows_match_single_rows holds those to every token)."""
    b, rungs = s.backend, (Proposal(0.5), BASE, Proposal(1.5))
    requests = [ExtendRequest(s.prompt, 8, np.random.default_rng(120 + j), 120 + j, proposal=q) for j, q in
                enumerate(rungs)]  # fmt: skip
    for j, (q, cont) in enumerate(zip(rungs, b.extend(requests, Proposal(0.25)))):
        one = extend(b, s.prompt, 8, seed=120 + j, proposal=q, slot=130 + j)
        same = common_prefix(one.tokens, cont.tokens)
        _check(same >= 1, f"row {j} at {q} drew {cont.tokens} in the batch, {one.tokens} alone")
        _close(one.proposal_logq[:same], cont.proposal_logq[:same], s.tolerance, f"row {j}'s log q at its proposal")


def log_q_is_reported_under_other_proposals(s: Subject) -> None:
    """Report.logq_under gives each token's log q under each proposal asked for: under the one drawn from, its
    proposal_logq; under another, q's log-prob after the same base log p (next_logp, when the subject has it)."""
    b, drawn, others = s.backend, Proposal(0.5), (Proposal(0.5), BASE, Proposal(0.25, top_k=3))
    request = ExtendRequest(s.prompt, 6, np.random.default_rng(140), 140, Report(logq_under=others))
    try:
        [cont] = b.extend([request], drawn)
    except PowerSampleError as e:
        raise NotApplicable(str(e)) from None
    _check(len(cont.logq_under) == len(others), f"{len(cont.logq_under)} columns of log q for {len(others)} asked")
    _check(all(len(c) == len(cont.tokens) for c in cont.logq_under), "a log q column per token")
    _close(cont.logq_under[0], cont.proposal_logq, s.tolerance, "log q under the drawn proposal")
    _close(cont.logq_under[1], cont.base_logp, s.tolerance, "log q under the base model")
    if s.next_logp is not None:
        context = tuple(s.prompt)
        for t, token in enumerate(cont.tokens):
            want = proposal_logprobs(s.next_logp(context + cont.tokens[:t]), others[2])[token]
            tolerance = s.proposal_tolerance if s.proposal_tolerance is not None else s.tolerance
            _close((cont.logq_under[2][t],), (float(want),), tolerance, f"log q under {others[2]} at token {t}")


def drafted_continuations_are_like_any(s: Subject) -> None:
    """A continuation verified against a draft (speculate = 1, 2, 4; drafts: the model's own likely continuation,
    the same reversed, one longer than max_tokens, one with EOS inside, none, and lookups in a corpus) draws the
    tokens the same seed draws without a draft, stops at EOS or max_tokens, has the base log p that `score` gives
    its tokens, and with next_logp the log q of q at every position. A backend that does not speculate ignores the
    draft, and passes."""
    b, cold = s.backend, Proposal(temperature=0.25)
    guess = extend(b, s.prompt, 10, seed=80, proposal=cold, slot=80).tokens
    eos, corpus = min(b.eos_ids), Corpus()
    corpus.add(s.prompt, guess[:3] + guess[4:])  # a lookup after the 3rd token guesses the 5th: one is replaced
    drafts = [Draft(d) for d in (guess, guess[::-1], guess * 3, guess[:1] + (eos,) + guess[1:], ())]
    drafts.append(Draft((), corpus, s.prompt[-WINDOW:]))
    for j, draft in enumerate(drafts):
        plain = extend(b, s.prompt, 8, seed=81 + j, proposal=cold, slot=81).tokens
        for k in (1, 2, 4):
            request = ExtendRequest(s.prompt, 8, np.random.default_rng(81 + j), 81, hints=Hints(draft, k))
            cont = b.extend([request], cold)[0]
            what = f"draft {j}, speculate {k}"
            _check(cont.tokens == plain, f"{what}: drew {cont.tokens}, without a draft {plain}")
            _check(1 <= len(cont.tokens) <= 8, f"{what}: {len(cont.tokens)} tokens for max_tokens 8")
            _check(not set(cont.tokens[:-1]) & b.eos_ids, f"{what}: EOS before the last token: {cont.tokens}")
            _close(b.score(s.prompt, cont.tokens), cont.base_logp, s.tolerance, f"{what}: score vs log p")
            if s.next_logp is not None:
                want = [float(proposal_logprobs(row, cold)[t]) for row, t in _rows(s, cont.tokens)]
                _close(cont.proposal_logq, want, _proposal_tolerance(s), f"{what}: log q vs q's")


def log_p_is_batch_invariant(s: Subject) -> None:
    """A continuation's tokens, log p and log q do not depend on the shape of the forwards that computed them: the
    same request (q != p, 16 tokens) decoded alone, as one row of batches of 2, 4 and 8 (ragged neighbours),
    verified against drafts with k = 1, 4 and 8 (a draft the model keeps, and one it replaces), and prefilled by
    `score`, agree within the subject's tolerance (0 for a batch-invariant engine: bit-equal)."""
    for what, have, alone in _shapes(s):
        _same(s, have, alone, f"{what} vs alone")


def batch_invariance_gaps(s: Subject) -> dict[str, dict[str, float]]:
    """What log_p_is_batch_invariant checks, measured: per shape, the largest |change| of log p and of the cold
    proposal's log q against the lone decode, over the tokens both drew alike (up to the first that differs), for
    engines that are not bit-exact. score's prefill has no log q (0)."""
    gaps = {}
    for what, have, alone in _shapes(s):
        same = common_prefix(have.tokens, alone.tokens)
        gaps[what] = {
            name: max(
                (abs(a - b) for a, b in zip(getattr(have, name)[:same], getattr(alone, name)[:same])), default=0.0
            )
            for name in ("base_logp", "proposal_logq")
        }
    return gaps


def _shapes(s: Subject) -> Iterator[tuple[str, Continuation, Continuation]]:
    """(the shape, the continuation it computed, the same request decoded alone) for log_p_is_batch_invariant."""
    b, cold = s.backend, Proposal(temperature=0.25)
    alone = extend(b, s.prompt, 16, seed=95, proposal=cold, slot=95)
    yield "score's prefill", replace(alone, base_logp=b.score(s.prompt, alone.tokens)), alone
    neighbours = [c for c in (*_ragged(s), *(s.prompt[: max(1, len(s.prompt) - j)] for j in (1, 3, 5))) if c]
    for n in (2, 4, 8):
        requests = [ExtendRequest(s.prompt, 16, np.random.default_rng(95), 96)]
        requests += [
            ExtendRequest(c, 4 + j, np.random.default_rng(100 + j), 97 + j)
            for j, c in enumerate((neighbours * 8)[: n - 1])
        ]
        yield f"row 0 of a batch of {n}", b.extend(requests, cold)[0], alone
    replaced = alone.tokens[:2] + tuple(reversed(alone.tokens[2:]))
    for k in (1, 4, 8):
        for j, guess in enumerate((alone.tokens, replaced)):
            request = ExtendRequest(s.prompt, 16, np.random.default_rng(95), 106, hints=Hints(Draft(guess), k))
            yield f"draft {j} at speculate {k}", b.extend([request], cold)[0], alone


def long_sequences_past_the_window(s: Subject) -> None:
    """Past a sliding window (`long_prompt`, longer than the model's window) every promise holds: a continuation
    scores as sampled, agrees with next_logp (an independent evaluation), is the same drafted (k = 8), batched beside
    a short row and rewound from a cache that went further; and it keeps going past the window."""
    if not s.long_prompt:
        raise NotApplicable("no long_prompt: the subject has no sliding window to pass")
    b, cold, long = s.backend, Proposal(temperature=0.5), s.long_prompt
    alone = extend(b, long, 24, seed=110, proposal=cold, slot=110)
    _close(b.score(long, alone.tokens), alone.base_logp, s.tolerance, "score vs extend past the window")
    if s.next_logp is not None:
        want = [float(row[t]) for row, t in _rows(replace(s, prompt=long), alone.tokens)]
        _close(alone.base_logp, want, s.tolerance, "log p past the window vs next_logp")
    drafted = ExtendRequest(long, 24, np.random.default_rng(110), 111, hints=Hints(Draft(alone.tokens[::-1]), 8))
    _same(s, b.extend([drafted], cold)[0], alone, "drafted past the window vs alone")
    batch = [
        ExtendRequest(long, 24, np.random.default_rng(110), 112),
        ExtendRequest(s.prompt, 6, np.random.default_rng(1), 113),
    ]
    _same(s, b.extend(batch, cold)[0], alone, "batched past the window vs alone")
    cut = long[: len(long) - 3]
    rewound = extend(b, cut, 8, seed=114, proposal=cold, slot=110)  # the slot's cache held long + 24 tokens
    fresh = extend(b, cut, 8, seed=114, proposal=cold, slot=115)
    _same(s, rewound, fresh, "rewound past the window vs a fresh slot")


def rows_joining_and_leaving_match_single_rows(s: Subject) -> None:
    """In a continuous batch (optional: `ContinuousBatching`) rows finish at different steps, refills join as rows
    leave (one of them drafted), and a request arrives by poll mid-way; every row draws what it draws alone."""
    looper = capability(s.backend, ContinuousBatching)
    if looper is None:
        raise NotApplicable("the backend has no extend_continuous (the optional ContinuousBatching capability)")
    cold = Proposal(temperature=0.5)

    def request(key: int, slot: int) -> ExtendRequest:  # keys 0-2 start, 10-12 refill them, 20 arrives by poll
        context = s.prompt[: len(s.prompt) - key % 10] or s.prompt
        draft, k = (Draft((), Corpus(), ()), 4) if key == 11 else (NO_DRAFT, 0)
        return ExtendRequest(
            context,
            3 + 4 * (key % 10) if key < 10 else 5,
            np.random.default_rng(120 + key),
            slot,
            hints=Hints(draft, k),
        )

    results: dict[int, Continuation] = {}

    def refill(key: int, cont: Continuation) -> dict[int, ExtendRequest]:
        results[key] = cont
        return {key + 10: request(key + 10, 120 + key)} if key < 10 else {}

    def poll() -> dict[int, ExtendRequest]:
        if results and 20 not in results and not arrived:
            arrived.append(20)
            return {20: request(20, 140)}
        return {}

    arrived: list[int] = []
    looper.extend_continuous({key: request(key, 120 + key) for key in range(3)}, cold, refill, poll)
    keys = [0, 1, 2, 10, 11, 12, 20]
    _check(sorted(results) == keys, f"continuations for keys {sorted(results)}, want {keys}")
    for key in keys:
        one = s.backend.extend([request(key, 150 + key)], cold)[0]
        _same(s, results[key], one, f"request {key} in a continuous batch vs alone")


def hints_change_forwards_not_draws(s: Subject) -> None:
    """Each hint the backend claims (`HINTS`) shows in its forwards and never in its draws: "speculate" with the
    draw's own tokens as the draft (k = 4) draws them in fewer forwards; "floor", one no token can reach, cuts the
    continuation after its first token, in fewer forwards, the first token as drawn without it. A hint it does not
    claim changes nothing: the same tokens, as many. Forwards are `stats.forwards` where the backend counts them,
    else on_draw's runs (per forward where the subject says so)."""
    b, honoured = s.backend, hints_honoured(s.backend)
    plain = [_costed(s, ExtendRequest(s.prompt, 8, np.random.default_rng(170 + j), 170)) for j in range(3)]
    if sum(len(c.tokens) for c, _ in plain) <= len(plain):
        raise NotApplicable("every continuation ended after one token: no forward left to save")
    for hint, hints in (("speculate", lambda c: Hints(Draft(c.tokens), 4)), ("floor", lambda c: Hints(floor=_SUNK))):
        hinted = [
            _costed(s, ExtendRequest(s.prompt, 8, np.random.default_rng(170 + j), 170, hints=hints(c)))
            for j, (c, _) in enumerate(plain)
        ]
        for (want, _), (have, _) in zip(plain, hinted):
            cut = len(have.tokens) if hint == "floor" and hint in honoured else len(want.tokens)
            _check(
                have.tokens == want.tokens[:cut] and cut >= 1,
                f"the {hint} hint changed the draw: {have.tokens} vs {want.tokens}",
            )
        before, after = sum(n for _, n in plain), sum(n for _, n in hinted)
        if hint in honoured:
            _check(
                after < before,
                f"{type(b).__name__} claims the {hint} hint, but it cost {after} forwards, {before} without",
            )
        else:
            _check(
                after == before,
                f"{type(b).__name__} ignores the {hint} hint, yet its forwards went from {before} to {after}",
            )


def describe_hints(backend: Backend) -> str:
    """One line: the request hints `backend` honours and those it ignores (base.HINTS)."""
    honoured = hints_honoured(backend)
    ignored = sorted(HINTS - honoured)
    return f"{type(backend).__name__} honours the hints: {', '.join(sorted(honoured)) or 'none'}" + (
        f"; ignores: {', '.join(ignored)}" if ignored else ""
    )


def context_length_is_checked(s: Subject) -> None:
    """A request that would pass the model's context length is a one-line PowerSampleError saying so."""
    limit = s.backend.context_length
    if limit is None:
        raise NotApplicable("the backend's context is unbounded")
    try:
        extend(s.backend, s.prompt, limit, seed=0)
    except PowerSampleError as e:
        _check("context length" in str(e) and "\n" not in str(e), f"not a one-line context length error: {e!r}")
    else:
        raise AssertionError(f"extending {len(s.prompt)} prompt tokens by {limit} passed the context length {limit}")


# --- the KV cache: what an engine feeds its model -----------------------------------------------------------------


def a_rewound_cache_feeds_only_the_new_ids(s: Subject) -> None:
    """A slot's cache cut back where a new context diverges feeds only the ids past the divergence, and draws what an
    empty cache draws (which feeds the whole context)."""
    cache = _cache(s)
    b = cache.empty()
    first = extend(b, s.prompt, 12, seed=2, slot=3)
    _check(len(first.tokens) >= 4, f"the check needs a few generated tokens to rewind into: {first.tokens}")
    # The slot caches prompt + first.tokens[:-1]. Diverge after two generated tokens: three new ids.
    ids = [t for t in s.prompt if t not in b.eos_ids]
    context = s.prompt + first.tokens[:2] + (next(t for t in ids if t != first.tokens[2]), *ids[:2])
    before = cache.fed(b)
    rewound = extend(b, context, 8, seed=3, slot=3)
    fed = cache.context_fed(b, before, rewound)
    _check(fed == 3, f"a rewound cache fed {fed} context ids, want the 3 new ones")
    _close(b.score(context, rewound.tokens), rewound.base_logp, s.tolerance, "score vs extend from a rewound cache")
    empty = cache.empty()
    before = cache.fed(empty)
    fresh = extend(empty, context, 8, seed=3, slot=3)
    fed = cache.context_fed(empty, before, fresh)
    _check(fed == len(context), f"an empty cache fed {fed} ids of a {len(context)}-id context, want them all")
    _check(fresh.tokens == rewound.tokens, f"a rewound cache drew {rewound.tokens}, an empty one {fresh.tokens}")
    _close(fresh.base_logp, rewound.base_logp, s.tolerance, "log p from a rewound cache vs an empty one")


def a_cached_prefix_feeds_only_its_last_id(s: Subject) -> None:
    """A context the slot's cache holds wholly feeds only its last id again, for the next token's log p."""
    cache = _cache(s)
    b = cache.empty()
    first = extend(b, s.prompt, 8, seed=4, slot=1)
    _check(len(first.tokens) >= 4, f"the check needs a few generated tokens to cache: {first.tokens}")
    context = s.prompt + first.tokens[:3]  # the slot caches prompt + first.tokens[:-1]
    before = cache.fed(b)
    cont = extend(b, context, 6, seed=5, slot=1)
    fed = cache.context_fed(b, before, cont)
    _check(fed == 1, f"a cached prefix fed {fed} context ids, want 1")
    _close(b.score(context, cont.tokens), cont.base_logp, s.tolerance, "score vs extend from a cached prefix")


def chains_share_the_prompt_prefill(s: Subject) -> None:
    """Four chains of one batch on one prompt feed it once, then one id each for the other chains."""
    cache = _cache(s)
    b = cache.empty()
    before = cache.fed(b)
    conts = b.extend([ExtendRequest(s.prompt, 3, np.random.default_rng(j), j) for j in range(4)], BASE)
    fed = cache.context_fed(b, before, *conts)
    _check(fed == len(s.prompt) + 3, f"4 chains on a {len(s.prompt)}-id prompt fed {fed} ids, want it once and 3 more")


def a_rejected_proposal_keeps_the_current_state_cached(s: Subject) -> None:
    """MH in one slot: propose from a cut of the current state (whose cache must survive), reject, then extend the
    current state: only its last id, never fed, is fed."""
    cache = _cache(s)
    b = cache.empty()
    current = extend(b, s.prompt, 10, seed=7, slot=0)
    state = s.prompt + current.tokens
    extend(b, s.prompt + current.tokens[:3], 6, seed=8, slot=0)  # the proposal
    before = cache.fed(b)
    following = extend(b, state, 4, seed=9, slot=0)  # rejected: continue from the current state
    fed = cache.context_fed(b, before, following)
    _check(fed == 1, f"the current state fed {fed} context ids after a rejection, want its last one")
    _close(b.score(state, following.tokens), following.base_logp, s.tolerance, "score vs extend after a rejection")


CHECKS: tuple[Callable[[Subject], object], ...] = (
    score_agrees_with_sampling,
    rewinding_matches_recomputing,
    tau_one_gives_log_q_equal_to_log_p,
    cold_proposal_has_its_own_valid_log_q,
    top_k_draws_only_from_the_top_k,
    same_generator_same_continuation,
    eos_comes_only_last,
    score_obeys_the_chain_rule,
    confidence_is_minus_the_entropy,
    rank_gives_log_p_and_the_likeliest_tokens,
    vocabulary_covers_the_ids,
    entropies_are_reported_when_asked,
    draws_are_reported_as_drawn,
    batched_rows_match_single_rows,
    requests_carry_their_own_proposals,
    log_q_is_reported_under_other_proposals,
    drafted_continuations_are_like_any,
    log_p_is_batch_invariant,
    long_sequences_past_the_window,
    rows_joining_and_leaving_match_single_rows,
    hints_change_forwards_not_draws,
    context_length_is_checked,
    a_rewound_cache_feeds_only_the_new_ids,
    a_cached_prefix_feeds_only_its_last_id,
    chains_share_the_prompt_prefill,
    a_rejected_proposal_keeps_the_current_state_cached,
)


def run(subject: Subject) -> list[str]:
    """Every check on `subject`; returns the names of those that did not apply (raises at the first failure)."""
    skipped = []
    for check in CHECKS:
        try:
            check(subject)
        except NotApplicable:
            skipped.append(check.__name__)
    return skipped


# --- helpers ----------------------------------------------------------------------------------------------------


_SUNK = Floor(least=float("inf"), weight=1.0)  # a floor no score reaches: a row that honours it stops at once


def _costed(s: Subject, request: ExtendRequest, proposal: Proposal = BASE) -> tuple[Continuation, int]:
    """(the request's continuation, the forwards it cost): the backend's `stats.forwards` where it counts them,
    else the runs its on_draw got (one per forward where the subject has draws_per_forward)."""
    before = _forwards(s.backend)
    if before is None and not s.draws_per_forward:
        raise NotApplicable("the backend counts no forwards (stats.forwards) and does not report one draw per forward")
    runs: list[Tokens] = []
    [cont] = s.backend.extend([replace(request, report=Report(on_draw=runs.append))], proposal)
    after = _forwards(s.backend)
    return cont, len(runs) if before is None or after is None else after - before


def _forwards(backend: Backend) -> int | None:
    """The backend's count of its forwards so far (`stats.forwards`, a diagnostic), None where it keeps none."""
    return getattr(getattr(backend, "stats", None), "forwards", None)


def _ragged(s: Subject) -> tuple[Tokens, ...]:
    """The prompt, the prompt plus one and two sampled tokens, and the prompt again: a batch of ragged lengths."""
    first = extend(s.backend, s.prompt, 2, seed=39, slot=199)
    return (s.prompt, s.prompt + first.tokens, s.prompt + first.tokens[:1], s.prompt)


def _cache(s: Subject) -> Cache:
    if s.cache is None:
        raise NotApplicable("no cache: the subject keeps no KV cache, or cannot count what it feeds")
    return s.cache


def _rows(s: Subject, tokens: Tokens) -> list[tuple[np.ndarray, int]]:
    """(next_logp row, the token drawn from it) for each token after the prompt."""
    assert s.next_logp is not None
    return [(s.next_logp(s.prompt + tokens[:i]), tok) for i, tok in enumerate(tokens)]


def _check_ranking(top: Sequence[tuple[int, float]], size: int, what: str) -> None:
    """`top` holds `size` distinct ids with log p <= 0, likeliest first, ties by the smaller id."""
    _check(len(top) == size, f"{what}: {len(top)} ranked tokens, want {size}")
    _check(len({t for t, _ in top}) == len(top), f"{what}: an id ranked twice: {top}")
    _check(all(lp <= 1e-9 for _, lp in top), f"{what}: a log p above 0: {top}")
    _check(
        all((-a[1], a[0]) < (-b[1], b[0]) for a, b in zip(top, top[1:])),
        f"{what}: not likeliest first, ties by the smaller id: {top}",
    )


def _near_tie(top: Sequence[tuple[int, float]], gap: float = 1e-3) -> bool:
    """Whether two neighbours of a ranking are so close that another engine's rounding may swap them."""
    return any(abs(a[1] - b[1]) < gap for a, b in zip(top, top[1:]))


def _same(s: Subject, have: Continuation, want: Continuation, what: str) -> None:
    """The same tokens, log p within the subject's tolerance and log q within its proposal tolerance."""
    _check(have.tokens == want.tokens, f"{what}: drew {have.tokens}, want {want.tokens}")
    _close(have.base_logp, want.base_logp, s.tolerance, f"{what}: log p")
    _close(have.proposal_logq, want.proposal_logq, _proposal_tolerance(s), f"{what}: log q")


def _proposal_tolerance(s: Subject) -> float:
    return s.tolerance if s.proposal_tolerance is None else s.proposal_tolerance


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


def _close(have: Sequence[float], want: Sequence[float], tolerance: float, what: str) -> None:
    """|have - want| <= tolerance elementwise (same lengths; -inf matches -inf), else an AssertionError: `what`."""
    np.testing.assert_allclose(
        np.asarray(have, dtype=float), np.asarray(want, dtype=float), atol=tolerance, rtol=0, err_msg=what
    )
