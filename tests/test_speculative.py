"""Speculative proposals are exact: a continuation verified against a draft, any draft, follows q.

An engine verifies a draft (the chain's current suffix, then lookups in what the chain drew) several tokens per
forward: each token is drawn as without a draft, and a drafted token d is kept when the draw equals it, which
happens with probability q(d) (core.numerics.verify_draft). Here, on toy models, the law of drafted continuations
(traced: every draw of the real engine walk enumerated, tests/support/tracing.py) is compared with q's exact law over
every continuation, for drafts that the model likes, an impossible token, EOS inside, a draft past max_tokens, drafts
shorter than the continuation (fed whole in one forward) and none, at k = 1, 2, 3 tokens per forward; two mutations
of the rule must fail the same test. A seed draws the same tokens with any draft and any k as with none.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from exact_laws import continuations, empirical, row_logprobs, tv, tv_null_quantile
from support.toy import load_spec
from support.tracing import assert_same_law, trace

from powersample.backends import engine
from powersample.backends.toy import ToyBackend
from powersample.core.drafts import Corpus, Draft
from powersample.core.draws import draw, log_uniform
from powersample.core.numerics import logsumexp, verify_draft
from powersample.core.types import ExtendRequest, Hints, Proposal

N = 4000  # drafted continuations per statistical test
MAX_TOKENS = 3
TRUNCATED = Proposal(0.5, top_k=2)  # one token of three has q = 0 at each position: an impossible draft token


def q_law(spec, proposal: Proposal) -> dict:
    """q's exact law over every continuation of the empty context, until EOS or MAX_TOKENS."""
    return {s: math.exp(lq) for s, lq in continuations(spec, proposal, (), MAX_TOKENS)}


def likeliest(spec, proposal: Proposal, n: int) -> tuple[int, ...]:
    seq: tuple[int, ...] = ()
    for _ in range(n):
        seq += (int(np.argmax(row_logprobs(spec, seq, proposal)[1])),)
    return seq


def drafts(spec, proposal: Proposal) -> dict[str, tuple[int, ...]]:
    first = row_logprobs(spec, (), proposal)[1]
    impossible = int(np.flatnonzero(~np.isfinite(first))[0]) if not np.isfinite(first).all() else None
    best = likeliest(spec, proposal, MAX_TOKENS)
    out = {
        "likeliest": best,
        "eos inside": (best[0], spec.eos_id, best[0]),
        "past max_tokens": best * 3,
        "none": (),
        "one token": best[:1],
        "eos alone": (spec.eos_id,),
        "shorter": best[:2][::-1],
    }  # short: fully fed at once
    if impossible is not None:
        out["impossible token"] = (impossible,) + best[1:]
    return out


def drafted(backend: ToyBackend, proposal: Proposal, draft, k: int, n: int = N, seed: int = 0) -> list[tuple]:
    rng = np.random.default_rng(seed)
    requests = [ExtendRequest((), MAX_TOKENS, rng, hints=Hints(Draft(draft), k)) for _ in range(n)]
    return [c.tokens for c in backend.extend(requests, proposal)]


def drafted_law(backend: ToyBackend, proposal: Proposal, draft: Draft, k: int) -> dict:
    """The exact law of one drafted continuation: the engine's walk traced over every draw."""
    request = lambda source: ExtendRequest((), MAX_TOKENS, source, hints=Hints(draft, k))  # noqa: E731
    return trace(lambda source: backend.extend([request(source)], proposal)[0].tokens)


CASES = [
    (name, proposal, k)
    for name, proposal in (("eos_trap", Proposal(0.5)), ("eos_trap", TRUNCATED), ("early_eos", Proposal(0.25)))
    for k in (1, 2, 3)
]


@pytest.mark.parametrize("spec_name, proposal, k", CASES)
def test_drafted_continuations_follow_q_exactly(spec_name, proposal, k):
    spec = load_spec(spec_name)
    want, backend = q_law(spec, proposal), ToyBackend(spec)
    for what, draft in drafts(spec, proposal).items():
        try:
            assert_same_law(drafted_law(backend, proposal, Draft(draft), k), want)
        except AssertionError as e:
            raise AssertionError(f"{what} draft, k={k}: {e}") from None
    assert "impossible token" in drafts(spec, proposal) or proposal != TRUNCATED


def test_a_seed_gives_the_same_continuation_for_any_k_and_fewer_forwards_for_a_good_draft():
    spec, cold, n = load_spec("no_early_eos"), Proposal(0.25), 6
    best = likeliest(spec, cold, n)
    outputs, forwards = [], []
    for k in (1, 2, 3):
        backend = ToyBackend(spec)
        rng = np.random.default_rng(9)
        requests = [ExtendRequest((), n, rng, hints=Hints(Draft(best), k)) for _ in range(300)]
        outputs.append([c.tokens for c in backend.extend(requests, cold)])
        forwards.append(backend.stats.forwards)
    assert outputs[0] == outputs[1] == outputs[2]
    assert forwards[2] < forwards[1] < forwards[0]
    assert backend.stats.kept_drafts > 0.5 * backend.stats.drafted  # the model agrees with its likeliest path


def accept_with_p(logq, d, rng):
    """Mutant: keeps d with probability p(d) (q at tau 0.5 raised back to tau 1) instead of q(d)."""
    finite = np.isfinite(logq)
    if log_uniform(rng) <= 0.5 * logq[d] - float(logsumexp(0.5 * logq[finite])):
        return d
    residual = logq.copy()
    residual[d] = -np.inf
    return draw(residual, rng)


def residual_not_renormalized(logq, d, rng):
    """Mutant: after rejecting d, draws from q itself (d included) instead of q without d."""
    return d if log_uniform(rng) <= logq[d] else draw(logq, rng)


@pytest.mark.parametrize("mutant", [accept_with_p, residual_not_renormalized])
def test_mutations_of_the_rule_fail(mutant, monkeypatch):
    spec, proposal = load_spec("eos_trap"), Proposal(0.5)
    want = q_law(spec, proposal)
    draft = Draft(drafts(spec, proposal)["likeliest"])
    assert_same_law(drafted_law(ToyBackend(spec), proposal, draft, 2), want)
    monkeypatch.setattr(engine, "verify_draft", mutant)
    assert tv(drafted_law(ToyBackend(spec), proposal, draft, 2), want) > 0.01


def test_verify_draft_keeps_d_with_probability_q_d():
    logq = np.array([math.log(0.7), math.log(0.2), math.log(0.1), -np.inf])
    for d in range(4):  # q(d) = 0 for d = 3: never kept
        assert_same_law(trace(lambda source, d=d: verify_draft(logq, d, source)), {0: 0.7, 1: 0.2, 2: 0.1})
    assert trace(lambda source: verify_draft(np.array([0.0, -np.inf]), 0, source)) == {0: 1.0}  # q(d) = 1: kept


def test_a_seed_draws_the_same_tokens_with_any_draft_and_k_as_without():
    """The coupled rule: drafts and k change how many tokens a forward decodes, never which."""
    for spec_name, proposal in (("eos_trap", Proposal(0.5)), ("eos_trap", TRUNCATED), ("early_eos", Proposal(0.25))):
        spec = load_spec(spec_name)
        plain = drafted(ToyBackend(spec), proposal, (), 0, n=300, seed=4)
        for what, draft in drafts(spec, proposal).items():
            for k in (1, 2, 3):
                assert drafted(ToyBackend(spec), proposal, draft, k, n=300, seed=4) == plain, (spec_name, what, k)


def test_corpus_drafts_follow_q_and_change_no_token():
    """Drafts looked up in a corpus (after a replaced guess, or with no guess at all) are as exact as any."""
    spec, proposal = load_spec("eos_trap"), Proposal(0.5)
    corpus = Corpus()
    for seq in ((0, 0, 1), (1, 0, 0), (0, 1, 2)):
        corpus.add((), seq)
    want, plain = q_law(spec, proposal), drafted(ToyBackend(spec), proposal, (), 0, n=300, seed=5)
    for guess in ((), (1, 1, 1)):
        for k in (1, 2, 3):
            assert_same_law(drafted_law(ToyBackend(spec), proposal, Draft(guess, corpus), k), want)
            backend, rng = ToyBackend(spec), np.random.default_rng(5)
            requests = [ExtendRequest((), MAX_TOKENS, rng, hints=Hints(Draft(guess, corpus), k)) for _ in range(300)]
            assert [c.tokens for c in backend.extend(requests, proposal)] == plain
            assert backend.stats.drafted > backend.stats.kept_drafts > 0  # lookups drafted, some kept, some not


@pytest.mark.statistical
def test_sampled_drafted_continuations_follow_q():
    spec, proposal = load_spec("eos_trap"), TRUNCATED
    want = q_law(spec, proposal)
    for draft in drafts(spec, proposal).values():
        have = drafted(ToyBackend(spec), proposal, draft, 2)
        assert tv(empirical(have), want) <= tv_null_quantile(want, N)
