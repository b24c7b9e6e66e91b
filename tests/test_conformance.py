"""The conformance suite (`powersample/backends/conformance.py`) on the toy model, that it fails broken backends,
and the one check of optional capabilities (`base.capability`).

The engines run the same suite on their own module-scoped backends: test_hf_backend.py and test_llamacpp_backend.py.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from support.toy import load_spec, run_check

from powersample.backends import conformance
from powersample.backends.base import ChatMessages, Confidence, ContinuousBatching, Ranking, capability
from powersample.backends.toy import ToyBackend
from powersample.core.types import Continuation, Report


def toy_next_logp(backend: ToyBackend):
    """The toy model's exact next-token log p after a context (its generated ids): its spec's row."""

    def next_logp(context):
        p = np.asarray(backend.spec.row(context))
        logp = np.full(len(p), -np.inf)
        np.log(p, out=logp, where=p > 0)
        return logp

    return next_logp


LONG = (0, 1) * 6  # a long context: the toy has no sliding window, so the long check holds as it does for any


@pytest.fixture(scope="module")
def subject() -> conformance.Subject:
    backend = ToyBackend(load_spec("eos_trap"))
    return conformance.Subject(
        backend,
        backend.encode("Name three primary colors.", chat=True),
        tolerance=1e-12,
        next_logp=toy_next_logp(backend),
        draws_per_forward=True,
        long_prompt=LONG,
    )  # exact


@pytest.mark.parametrize("check", conformance.CHECKS, ids=lambda c: c.__name__)
def test_conformance(subject, check):
    run_check(check, subject)


def test_run_names_the_checks_that_did_not_apply(subject):
    continuous = ["rows_joining_and_leaving_match_single_rows"]  # the plain toy has no extend_continuous
    cache = [
        "a_rewound_cache_feeds_only_the_new_ids",
        "a_cached_prefix_feeds_only_its_last_id",
        "chains_share_the_prompt_prefill",
        "a_rejected_proposal_keeps_the_current_state_cached",
    ]  # nor a cache
    assert conformance.run(subject) == [*continuous, "context_length_is_checked", *cache]  # its context is unbounded
    assert conformance.run(replace(subject, next_logp=None)) == [
        "top_k_draws_only_from_the_top_k",
        *continuous,
        "context_length_is_checked",
        *cache,
    ]
    assert "long_sequences_past_the_window" in conformance.run(replace(subject, long_prompt=()))


def test_the_continuous_checks_pass_a_continuous_backend(subject):
    conformance.rows_joining_and_leaving_match_single_rows(
        replace(subject, backend=ContinuousToy(load_spec("eos_trap")))
    )


# --- the suite fails broken backends ----------------------------------------------------------------------------


class OffScore(ToyBackend):
    """score is off by 0.01 nat per token."""

    def score(self, context, continuation):
        return tuple(x - 0.01 for x in super().score(context, continuation))


class ContextBlind(ToyBackend):
    """score ignores the context."""

    def score(self, context, continuation):
        return super().score((), continuation)


class BatchDependent(ToyBackend):
    """Rows after the first draw with the first row's generator: a chain's draws depend on the batch."""

    def extend(self, requests, proposal):
        return [self._extend_one(replace(r, rng=requests[0].rng), proposal) for r in requests]


class PastEos(ToyBackend):
    """Goes on after EOS."""

    def extend(self, requests, proposal):
        out = []
        for r in requests:
            c = super().extend([r], proposal)[0]
            out.append(Continuation((2,) + c.tokens, (0.0,) + c.base_logp, (0.0,) + c.proposal_logq))
        return out


class Silent(ToyBackend):
    """Never reports its draws."""

    def extend(self, requests, proposal):
        return super().extend([replace(r, report=replace(r.report, on_draw=None)) for r in requests], proposal)


class Misreporting(ToyBackend):
    """Reports each draw twice."""

    def extend(self, requests, proposal):
        twice = [
            replace(r, report=Report(on_draw=lambda t, f=r.report.on_draw: (f(t), f(t)))) if r.report.on_draw else r
            for r in requests
        ]
        return super().extend(twice, proposal)


class AllAtOnce(ToyBackend):
    """Reports a continuation's tokens once, at the end (as vLLM does): conformant, but not per forward."""

    def extend(self, requests, proposal):
        conts = super().extend([replace(r, report=replace(r.report, on_draw=None)) for r in requests], proposal)
        for r, c in zip(requests, conts):
            if r.report.on_draw is not None:
                r.report.on_draw(c.tokens)
        return conts


class RankTiesByLargerId(ToyBackend):
    """rank breaks ties by the larger id."""

    def rank(self, context, continuation, n):
        ranked = super().rank(context, continuation, len(self.spec.vocab))
        return tuple(replace(r, top=tuple(sorted(r.top, key=lambda e: (-e[1], -e[0]))[:n])) for r in ranked)


class RankOneBehind(ToyBackend):
    """rank reports the distribution after each token instead of before it."""

    def rank(self, context, continuation, n):
        ahead = super().rank(context, continuation[1:] + (0,), n)
        return tuple(replace(r, base_logp=b) for r, b in zip(ahead, self.score(context, continuation)))


class Limited(ToyBackend):
    """Claims a context length and never checks it."""

    context_length = 4


class SwitchesKernelAt8Rows(ToyBackend):
    """log p moves once a batch holds 8 rows (llama.cpp's tiled K-quant matmul did)."""

    def extend(self, requests, proposal):
        conts = super().extend(requests, proposal)
        shift = 1e-3 if len(requests) >= 8 else 0.0
        return [replace(c, base_logp=tuple(x + shift for x in c.base_logp)) for c in conts]


class RoundsLongDrafts(ToyBackend):
    """log p moves when a forward verifies 8 guessed tokens."""

    def extend(self, requests, proposal):
        conts = super().extend(requests, proposal)
        return [
            replace(c, base_logp=tuple(x - 1e-9 * (r.hints.speculate >= 8) for x in c.base_logp))
            for r, c in zip(requests, conts)
        ]


class ForgetsPastTheWindow(ToyBackend):
    """Sampling past 8 context ids gives log p unlike scoring (a sliding window kept wrong)."""

    def extend(self, requests, proposal):
        conts = super().extend(requests, proposal)
        return [
            replace(c, base_logp=tuple(x + 0.01 * (len(r.context) > 8) for x in c.base_logp))
            for r, c in zip(requests, conts)
        ]


class IgnoresTheFloorItClaims(ToyBackend):
    """Claims the floor hint (as ToyBackend does) but drops every request's floor."""

    def extend(self, requests, proposal):
        return super().extend([replace(r, hints=replace(r.hints, floor=None)) for r in requests], proposal)


class SpeculatesUnclaimed(ToyBackend):
    """Verifies drafts but claims no hint: its forwards change with a hint it says it ignores."""

    HINTS = frozenset()


class ContinuousToy(ToyBackend):
    """A continuous batch of one row at a time: refills and polled requests run as they come (conformant)."""

    def extend_continuous(self, requests, proposal, refill, poll=None):
        waiting = list(requests.items())
        while True:
            waiting += (poll() if poll else {}).items()
            if not waiting:
                return
            key, request = waiting.pop(0)
            waiting += refill(key, self._decode_one(request, proposal)).items()

    def _decode_one(self, request, proposal):
        return self.extend([request], proposal)[0]


class RefillsReuseAGenerator(ContinuousToy):
    """Every request after the first draws with the first request's generator."""

    first = None

    def _decode_one(self, request, proposal):
        self.first = self.first or request.rng
        return super()._decode_one(replace(request, rng=self.first), proposal)


@pytest.mark.parametrize(
    "broken, check, message",
    [
        (OffScore, conformance.score_agrees_with_sampling, "score vs extend"),
        (ContextBlind, conformance.score_obeys_the_chain_rule, "the chain rule"),
        (BatchDependent, conformance.batched_rows_match_single_rows, "in the batch"),
        (PastEos, conformance.eos_comes_only_last, "EOS before the last token"),
        (Limited, conformance.context_length_is_checked, "passed the context length"),
        (Silent, conformance.draws_are_reported_as_drawn, "reported"),
        (Misreporting, conformance.draws_are_reported_as_drawn, "reported"),
        (RankTiesByLargerId, conformance.rank_gives_log_p_and_the_likeliest_tokens, "ties by the smaller id"),
        (RankOneBehind, conformance.rank_gives_log_p_and_the_likeliest_tokens, "top"),
        (SwitchesKernelAt8Rows, conformance.log_p_is_batch_invariant, "a batch of 8"),
        (RoundsLongDrafts, conformance.log_p_is_batch_invariant, "speculate 8"),
        (ForgetsPastTheWindow, conformance.long_sequences_past_the_window, "past the window"),
        (RefillsReuseAGenerator, conformance.rows_joining_and_leaving_match_single_rows, "continuous batch"),
        (IgnoresTheFloorItClaims, conformance.hints_change_forwards_not_draws, "claims the floor hint"),
        (SpeculatesUnclaimed, conformance.hints_change_forwards_not_draws, "ignores the speculate hint"),
    ],
)
def test_the_suite_fails_a_broken_backend(broken, check, message):
    backend = broken(load_spec("eos_trap"))
    with pytest.raises(AssertionError, match=message):
        check(conformance.Subject(backend, (), tolerance=1e-12, next_logp=toy_next_logp(backend), long_prompt=LONG))


def test_the_suite_says_which_hints_an_engine_honours():
    toy = ToyBackend(load_spec("eos_trap"))
    assert conformance.describe_hints(toy) == "ToyBackend honours the hints: floor, speculate"
    assert conformance.describe_hints(SpeculatesUnclaimed(load_spec("eos_trap"))) == (
        "SpeculatesUnclaimed honours the hints: none; ignores: floor, speculate"
    )


class Cacheless(ToyBackend):
    """Feeds every context id of every request: an engine whose cache never serves."""

    fed = 0

    def extend(self, requests, proposal):
        self.fed += sum(len(r.context) for r in requests)
        return super().extend(requests, proposal)


CACHE_CHECKS = [
    conformance.a_rewound_cache_feeds_only_the_new_ids,
    conformance.a_cached_prefix_feeds_only_its_last_id,
    conformance.chains_share_the_prompt_prefill,
    conformance.a_rejected_proposal_keeps_the_current_state_cached,
]


@pytest.mark.parametrize("check", CACHE_CHECKS, ids=lambda c: c.__name__)
def test_the_cache_checks_fail_an_engine_that_feeds_every_context(check):
    spec = load_spec("no_early_eos")
    cache = conformance.Cache(lambda: Cacheless(spec), lambda engine: engine.fed)
    with pytest.raises(AssertionError, match="fed"):
        check(conformance.Subject(Cacheless(spec), LONG, tolerance=1e-12, cache=cache))


def test_reporting_draws_once_at_the_end_is_conformant_but_not_per_forward():
    backend = AllAtOnce(load_spec("eos_trap"))
    subject = conformance.Subject(backend, (), next_logp=toy_next_logp(backend))
    conformance.draws_are_reported_as_drawn(subject)
    with pytest.raises(AssertionError, match="one report per forward"):
        conformance.draws_are_reported_as_drawn(replace(subject, draws_per_forward=True))


# --- optional capabilities --------------------------------------------------------------------------------------


class Forwarding:
    """A wrapper that forwards every attribute but `confidence` to the backend it wraps."""

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        if name == "confidence":
            raise AttributeError(name)
        return getattr(self._inner, name)


class Continuous(ToyBackend):
    def extend_continuous(self, requests, proposal, refill, poll=None):
        raise NotImplementedError


def test_capability_is_the_backend_when_it_has_the_methods():
    toy = ToyBackend(load_spec("eos_trap"))
    assert capability(toy, ChatMessages) is toy and capability(toy, Confidence) is toy
    assert capability(toy, Ranking) is toy
    assert capability(toy, ContinuousBatching) is None
    continuous = Continuous(load_spec("eos_trap"))
    assert capability(continuous, ContinuousBatching) is continuous


def test_capability_sees_through_forwarding_wrappers():
    wrapped = Forwarding(ToyBackend(load_spec("eos_trap")))
    assert capability(wrapped, ChatMessages) is wrapped  # found with getattr, as the callers did before
    assert capability(wrapped, Confidence) is None and capability(wrapped, ContinuousBatching) is None


def test_a_non_callable_attribute_is_not_a_capability():
    toy = ToyBackend(load_spec("eos_trap"))
    toy.encode_messages = None
    assert capability(toy, ChatMessages) is None


def test_the_gaps_command_measures_a_backend(tmp_path, capsys):
    """`powersample conformance --gaps`: one line, a table of shapes, the JSON; the toy model is exact (0)."""
    import json
    from importlib.resources import files

    from powersample.cli import main

    spec = str(files("powersample") / "toy_specs" / "eos_trap.json")
    out = tmp_path / "gaps.json"
    assert main(["conformance", "--gaps", "--backend", "toy", "--toy-spec", spec, "--json", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("ToyBackend, ") and "| row 0 of a batch of 8 | 0 | 0 |" in printed
    saved = json.loads(out.read_text())
    assert saved["backend"] == "ToyBackend" and len(saved["gaps"]) == 10
    assert {v for g in saved["gaps"].values() for v in g.values()} == {0.0}


def test_the_gaps_measure_what_a_batch_invariant_engine_would_not_show():
    gaps = conformance.batch_invariance_gaps(conformance.Subject(SwitchesKernelAt8Rows(load_spec("eos_trap")), ()))
    assert gaps["row 0 of a batch of 8"]["base_logp"] > 0 and gaps["row 0 of a batch of 2"]["base_logp"] == 0
