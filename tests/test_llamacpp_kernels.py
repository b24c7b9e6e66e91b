"""Which kernels and decode layout the llamacpp backend asks of llama.cpp (`llamacpp/kernels.py`): pure decision logic,
no llama.cpp needed. The backend's own tests check the probe and the layouts on real models."""

from __future__ import annotations

import pytest

from powersample.backends.llamacpp import kernels


def test_exact_kernels_keep_the_weights_in_the_plain_layout():
    assert not kernels.placement(native=False).extra_bufts and kernels.placement(False).label == "plain"
    assert kernels.placement(native=True).extra_bufts and kernels.placement(True).label == "native"


def test_the_tiled_matmul_is_turned_off_unless_the_user_set_it_or_opted_out():
    environ: dict[str, str] = {}
    kernels.prepare_process(native=False, environ=environ)
    assert environ == {kernels.TILED_MM: "0"} and kernels.tiled_setting(environ) == "0"
    mine = {kernels.TILED_MM: "1"}
    kernels.prepare_process(native=False, environ=mine)
    assert mine == {kernels.TILED_MM: "1"}  # the user's setting stands; the probe then sees what it does
    untouched: dict[str, str] = {}
    kernels.prepare_process(native=True, environ=untouched)
    assert untouched == {} and kernels.tiled_setting(untouched) == "unset"


@pytest.mark.parametrize(
    "native, threads, disagreement, batched, words, experts",
    [
        (False, 1, None, True, "same numbers", 0),
        (False, 1, None, False, "mixture of 4 experts", 4),  # the matrix's qwen3_moe: rare tokens differ batched
        (True, 1, None, True, "llama.cpp's own kernels", 4),
        (False, 1, "2 tokens of one sequence vs 1: max |logit change| 0.03", False, "round by row count", 0),
        (False, 2, None, False, "2 threads", 0),  # a lone token's keys split across threads past 512 cells
        (False, 8, "anything", False, "8 threads", 0),
        (True, 4, "anything", True, "llama.cpp's own kernels", 0),
    ],
)
def test_the_layout(native, threads, disagreement, batched, words, experts):
    layout = kernels.choose_layout(native, threads, disagreement, experts)
    assert layout.batched is batched and words in layout.reason
    assert layout.micro_batch == (kernels.BATCH_TOKENS if batched else 1)
    assert layout.label == ("batched" if batched else "rows")


def test_the_batched_micro_batch_stays_below_the_tiled_attention_threshold():
    assert kernels.BATCH_TOKENS < 64


@pytest.mark.parametrize("value, opted", [("1", True), (" 1 ", True), ("0", False), ("", False), ("yes", False)])
def test_the_opt_out_is_exactly_1(value, opted):
    assert kernels.native_opted_in({kernels.NATIVE_OPT_IN: value}) is opted
    assert kernels.native_opted_in({}) is False
