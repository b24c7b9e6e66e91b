"""Drafts of speculative proposals (core.drafts): what a corpus lookup guesses, and what a Draft hands an engine.

A guess never changes a token (tests/test_speculative.py); these tests check that the guesses are the ones the
module promises: the continuation of the longest recent match, within one stored sequence, never past its end.
"""

from __future__ import annotations

from dataclasses import replace

from support.toy import load_spec

from powersample.api import sample
from powersample.backends.toy import ToyBackend
from powersample.config import SamplerConfig
from powersample.core import drafts
from powersample.core.drafts import NO_DRAFT, WINDOW, Corpus, Draft
from powersample.samplers import on_engine


def corpus_of(*sequences: tuple[tuple[int, ...], tuple[int, ...]]) -> Corpus:
    corpus = Corpus()
    for context, new in sequences:
        corpus.add(context, new)
    return corpus


def test_a_lookup_continues_the_longest_match():
    corpus = corpus_of(((), (1, 2, 3, 4, 5)), ((), (9, 3, 7, 8)))  # after 3: "4 5" (in 1 2 3) or "7 8" (in 9 3)
    assert corpus.lookup((2, 3), most=10) == (4, 5)
    assert corpus.lookup((9, 3), most=10) == (7, 8)
    assert corpus.lookup((6, 3), most=10) == (7, 8)  # a tie on "3" alone: the most recent occurrence
    assert corpus.lookup((1, 2, 3), most=1) == (4,)  # at most `most` tokens
    assert corpus.lookup((42,), most=10) == ()  # never seen
    assert corpus.lookup((5,), most=10) == ()  # seen, but nothing followed it
    assert corpus.lookup((), most=10) == ()


def test_a_match_may_start_in_the_context_but_a_guess_stops_at_its_sequence_end():
    corpus = corpus_of(((7, 8), (1, 2)), ((5, 6), (1, 3)))
    assert corpus.lookup((8, 1), most=10) == (2,)  # "8 1" spans the first sequence's context and its own tokens
    assert corpus.lookup((6, 1), most=10) == (3,)
    assert corpus.lookup((7,), most=10) == ()  # context tokens are never guessed: only what the chain drew
    assert corpus.lookup((2,), most=10) == ()  # nothing after the first sequence's end, though the second follows it


def test_a_match_is_compared_over_the_window_and_within_its_own_sequence():
    long = tuple(range(100, 100 + WINDOW + 4))
    corpus = corpus_of(((), long + (1,)), ((), long[-4:] + (2,)))
    assert corpus.lookup(long, most=1) == (1,)  # matches WINDOW tokens: beats the recent one, which matches 4
    corpus = corpus_of(((), (4, 5, 1)), ((), (3, 4, 5, 2)))
    assert corpus.lookup((3, 4, 5), most=1) == (2,)
    assert corpus.lookup((0, 4, 5), most=1) == (2,)  # both match "4 5": the most recent wins


def test_only_the_most_recent_occurrences_are_kept():
    corpus = corpus_of(*[((), (7, j)) for j in range(drafts.RECENT + 5)])
    positions = corpus._index[(7,)]
    assert len(positions) == drafts.RECENT
    assert corpus.lookup((7,), most=1) == (drafts.RECENT + 4,)


def test_a_draft_guesses_first_then_looks_up():
    corpus = corpus_of(((), (1, 2, 3)))
    draft = Draft((1, 2, 9), corpus, (0,))
    assert draft.first(2) == (1, 2)
    assert draft.next((1, 2), 5) == (3,)  # after a replaced 9: what followed "1 2"
    assert Draft((), corpus, (1,)).first(5) == (2, 3)  # no guess: a lookup of the context's tail
    assert Draft((4, 4)).next((4,), 5) == () and NO_DRAFT.first(5) == ()


def chains(method: str, speculate: int) -> tuple[list[tuple], object]:
    """Every seed's samples (tokens, log p, counters) from 6 seeds x 2 chains, and the toy's counters."""
    config = SamplerConfig(
        method=method, alpha=4.0, max_new_tokens=6, block_size=2, mcmc_steps=3, tries=2, speculate=speculate
    )
    backend = ToyBackend(load_spec("no_early_eos"))
    records = [r for seed in range(6) for r in sample(backend, "x", config, seed=seed, num_samples=2)]
    return [(r.tokens, r.token_logp, r.tokens_generated, r.proposals, r.accepted) for r in records], backend.stats


def test_a_chain_draws_the_same_samples_with_speculation_in_fewer_forwards():
    """power, max-swap and power-mtm: the samples and counters of each seed are exactly those without drafts, and
    the drafts, from the chain's own suffix and history, save forwards."""
    for method in ("power", "max-swap", "power-mtm"):
        plain, plain_stats = chains(method, 0)
        drafted, stats = chains(method, 3)
        assert drafted == plain, method
        assert stats.kept_drafts > 0 and stats.forwards < plain_stats.forwards, method


class _Speculating(ToyBackend):
    """A toy that asks for 2 draft tokens per forward when the sampler leaves it to the engine."""

    def default_speculate(self) -> int:
        return 2


def test_speculate_none_is_the_engines_choice_and_records_show_what_ran():
    spec, config = load_spec("no_early_eos"), SamplerConfig(max_new_tokens=4, block_size=2, mcmc_steps=2)
    assert config.speculate is None
    assert on_engine(config, ToyBackend(spec)).speculate == 0  # an engine without the capability: off
    assert on_engine(config, _Speculating(spec)).speculate == 2
    assert on_engine(replace(config, speculate=5), _Speculating(spec)).speculate == 5  # asked for: kept
    engine = _Speculating(spec)
    [record] = sample(engine, "x", config, seed=3)
    assert record.config["speculate"] == 2 and engine.stats.drafted > 0
    [plain] = sample(ToyBackend(spec), "x", config, seed=3)
    assert "speculate" not in plain.config and plain.tokens == record.tokens
