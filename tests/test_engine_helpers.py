"""The helpers the engines share: the row/draw step (engine.py), the context check, and hub ids, dtypes and EOS ids
(hub.py). Numpy only: no engine is loaded."""

from __future__ import annotations

import numpy as np
import pytest

from powersample.backends import hub
from powersample.backends.engine import Row, check_fits, verify_step
from powersample.core.numerics import draw, log_normalize, proposal_logprobs, top_alternatives
from powersample.core.types import ExtendRequest, Proposal, Report
from powersample.errors import PowerSampleError

EOS = 3


def log(p) -> np.ndarray:
    """log of a probability table, -inf for zeros (no divide warning)."""
    p = np.asarray(p, dtype=float)
    out = np.full(p.shape, -np.inf)
    return np.log(p, out=out, where=p > 0)


def rows(n: int, max_tokens: int, alternatives: int = 0) -> list[Row]:
    return [
        Row(j, ExtendRequest((1,), max_tokens, np.random.default_rng(j), report=Report(alternatives)), next_id=1)
        for j in range(n)
    ]


def step(batch: list[Row], logp: np.ndarray, proposal: Proposal) -> list[int]:
    """One decoding step of rows that each fed one id (no draft): logp is (B, V). Returns the rows now finished."""
    done, kept = verify_step(batch, [row[None] for row in logp], proposal, frozenset({EOS}))
    assert kept == [1] * len(batch)  # without a draft the one fed id always stays
    return done


def test_one_step_draws_each_row_from_q_with_its_own_generator():
    logp = log_normalize(log([[0.5, 0.3, 0.2, 0.0], [0.1, 0.2, 0.7, 0.0]]))  # EOS (3) never drawn
    proposal = Proposal(0.5)
    logq = proposal_logprobs(logp, proposal)
    batch = rows(2, max_tokens=5, alternatives=2)
    twins = [np.random.default_rng(j) for j in range(2)]  # the same generators, drawn by hand
    for _ in range(3):
        assert step(batch, logp, proposal) == []
        for b, row in enumerate(batch):
            want = draw(logq[b], twins[b])
            assert row.tokens[-1] == want == row.next_id
            assert row.base_logp[-1] == logp[b, want] and row.proposal_logq[-1] == logq[b, want]
    for b, row in enumerate(batch):
        assert len(row.tokens) == 3 and row.alternatives == top_alternatives(logp[b], 2)
        assert row.continuation().tokens == tuple(row.tokens)


def test_one_step_finishes_rows_at_eos():
    logp = log([[0.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    batch = rows(2, max_tokens=5)
    assert step(batch, logp, Proposal(1.0)) == [0]
    assert batch[0].tokens == [EOS] and batch[1].tokens == [0]


def test_one_step_finishes_rows_at_max_tokens():
    logp = log([[0.5, 0.5, 0.0, 0.0]] * 3)  # never EOS
    batch = rows(3, max_tokens=2)
    assert step(batch, logp, Proposal(1.0)) == []
    assert step(batch, logp, Proposal(1.0)) == [0, 1, 2]
    assert all(r.alternatives == () and r.proposal_logq == r.base_logp for r in batch)


def test_check_fits_speaks_of_the_request_or_of_the_prompt():
    check_fits(None, 10**9, 10**9)
    check_fits(8, 5, 3)
    with pytest.raises(
        PowerSampleError,
        match=r"^5 context tokens \+ 4 new tokens exceed the model's context length "
        r"\(8\)$",
    ):
        check_fits(8, 5, 4)
    with pytest.raises(
        PowerSampleError,
        match=r"^the prompt is 5 tokens; with max_tokens=4 it exceeds the model's "
        r"context of 8 tokens$",
    ):
        check_fits(8, 5, 4, knob="max_tokens")


@pytest.mark.parametrize(
    "spelling, name",
    [
        ("float32", "float32"),
        ("FP32", "float32"),
        ("float", "float32"),
        ("bf16", "bfloat16"),
        ("half", "float16"),
        ("fp16", "float16"),
        ("auto", "auto"),
    ],
)
def test_dtype_spellings(spelling, name):
    assert hub.dtype_name(spelling, "auto") == name


@pytest.mark.parametrize("bad", ["int7", "float64", "", 7])
def test_unknown_dtype_is_one_line(bad):
    with pytest.raises(PowerSampleError, match="unknown dtype") as err:
        hub.dtype_name(bad, "auto")
    assert "\n" not in str(err.value)


def test_dtype_default_and_hub_ids():
    assert hub.dtype_name(None, "bfloat16") == "bfloat16"
    assert hub.is_hub_id("HuggingFaceTB/SmolLM2-135M") and hub.is_hub_id("gpt2")
    assert not any(map(hub.is_hub_id, ["./no/such/folder", "/abs/model", "a/b/c", "model.gguf", "-x"]))


def test_eos_ids_merge_the_tokenizer_and_the_generation_config():
    assert hub.eos_ids(2, None) == frozenset({2})
    assert hub.eos_ids(2, 7) == frozenset({2, 7})
    assert hub.eos_ids(None, [2, 5]) == frozenset({2, 5})
    assert hub.eos_ids(None, None) == frozenset()


def test_top_alternatives_is_a_full_sort_by_log_p_then_id():
    """The partition-first ranking equals sorting the whole row (likeliest first, ties by the smaller id), ties,
    -inf entries and k past the vocabulary included."""
    rng = np.random.default_rng(0)
    for _ in range(500):
        size = int(rng.integers(1, 12))
        with np.errstate(divide="ignore"):  # log 0 = -inf: a token the model never draws
            row = np.log(rng.integers(0, 4, size) / 4) if rng.random() < 0.5 else rng.normal(size=size)  # ties
        k = int(rng.integers(0, size + 3))
        order = np.lexsort((np.arange(size), -row))[:k]
        assert top_alternatives(row, k) == tuple((int(t), float(row[t])) for t in order)
