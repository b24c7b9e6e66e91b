"""Where the llamacpp backend asks llama.cpp to put the weights: never in the AMX buffer type (which crashes on
Sapphire-Rapids-class CPUs) unless opted in, keeping the CPU repack where an override can. Pure decision logic and
the GGUF header reader; no llama.cpp needed."""

from __future__ import annotations

import struct

import pytest

from powersample.backends.llamacpp_placement import (
    AMX_OPT_IN,
    Engine,
    Tensor,
    amx_opted_in,
    choose_placement,
    read_tensors,
)
from powersample.errors import PowerSampleError

AMX_BUILD = ("AMX", "CPU_REPACK")  # what llama.cpp built on an AMX Xeon offers
PLAIN_BUILD = ("CPU_REPACK",)  # built elsewhere, or the OS refused AMX tiles
SPR = frozenset({"avx2", "avx512", "amx_int8"})  # Sapphire Rapids
AVX2 = frozenset({"avx2"})


def layer(kind: str, rows: int = 576) -> list[Tensor]:
    """One transformer block: its matrices of type `kind` and its norms in f32."""
    return [Tensor("blk.0.attn_norm.weight", "f32", 1),
            *(Tensor(f"blk.0.{m}.weight", kind, rows) for m in ("attn_q", "attn_k", "ffn_down"))]


SMOLLM2_Q4_1 = [Tensor("token_embd.weight", "q8_0", 49152), *layer("q4_1"), Tensor("output_norm.weight", "f32", 1)]
Q4_0_UNTIED = [Tensor("token_embd.weight", "q4_0", 49152), *layer("q4_0"), Tensor("output.weight", "q4_0", 49152)]
Q4_0_TIED = [Tensor("token_embd.weight", "q4_0", 49152), *layer("q4_0")]
Q4_K_M = [Tensor("token_embd.weight", "q4_K", 32000), *layer("q4_K"), Tensor("output.weight", "q6_K", 32000)]
IQ4_NL = [Tensor("token_embd.weight", "iq4_nl", 49152), *layer("iq4_nl")]


def test_no_amx_buffer_type_means_llamas_own_choice():
    for tensors in (SMOLLM2_Q4_1, Q4_0_TIED, Q4_K_M):
        placement = choose_placement(Engine(PLAIN_BUILD, AVX2), tensors, allow_amx=False)
        assert placement.extra_bufts and placement.repack == () and placement.label == "default"


def test_embedded_q4_1_on_amx_loads_without_extra_buffer_types():
    """x86 has no Q4_1 repack, so no override keeps Q4_1 off AMX: no extra buffer types at all."""
    placement = choose_placement(Engine(AMX_BUILD, SPR), SMOLLM2_Q4_1, allow_amx=False)
    assert not placement.extra_bufts and placement.label == "no-extra-bufts"
    assert "q4_1" in placement.reason


def test_repackable_weights_are_forced_into_cpu_repack_on_amx():
    placement = choose_placement(Engine(AMX_BUILD, SPR), Q4_0_UNTIED, allow_amx=False)
    assert placement.extra_bufts and placement.label == "repack-override"
    # every Q4_0 matrix product goes to CPU_REPACK; the untied embedding is only looked up by row (never AMX's),
    # and overriding it by name would also move that lookup, which a repacked layout cannot serve
    assert set(placement.repack) == {"blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.ffn_down.weight",
                                     "output.weight"}


def test_a_tied_embedding_of_an_amx_type_cannot_be_overridden():
    """Tied: the output matrix product reads token_embd.weight, AMX would take it, and an override by that name
    would break the input lookup: so no extra buffer types."""
    placement = choose_placement(Engine(AMX_BUILD, SPR), Q4_0_TIED, allow_amx=False)
    assert not placement.extra_bufts


def test_one_unrepackable_amx_type_drops_every_extra_buffer_type():
    placement = choose_placement(Engine(AMX_BUILD, SPR), Q4_K_M, allow_amx=False)
    assert not placement.extra_bufts and "q6_K" in placement.reason


def test_rows_not_a_multiple_of_8_are_not_repacked():
    tensors = [Tensor("blk.0.attn_q.weight", "q4_0", 572), Tensor("output.weight", "q4_0", 32000)]
    assert not choose_placement(Engine(AMX_BUILD, SPR), tensors, allow_amx=False).extra_bufts


def test_repack_needs_the_cpu_feature_its_kernel_uses():
    tensors = [Tensor("blk.0.attn_q.weight", "q4_K", 576)]  # the x86 q4_K repack is an AVX2 kernel
    assert not choose_placement(Engine(AMX_BUILD, frozenset({"amx_int8"})), tensors, False).extra_bufts
    assert choose_placement(Engine(AMX_BUILD, SPR), tensors, False).repack == ("blk.0.attn_q.weight",)


def test_no_cpu_repack_buffer_type_means_no_extra_buffer_types():
    assert not choose_placement(Engine(("AMX",), SPR), Q4_0_UNTIED, allow_amx=False).extra_bufts


def test_types_without_amx_kernels_keep_llamas_own_choice_on_amx():
    """IQ4_NL has no AMX kernel: llama.cpp itself gives it the CPU repack and AMX nothing."""
    placement = choose_placement(Engine(AMX_BUILD, SPR), IQ4_NL, allow_amx=False)
    assert placement.extra_bufts and placement.repack == ()


def test_opting_in_restores_llamas_own_choice_amx_included():
    placement = choose_placement(Engine(AMX_BUILD, SPR), SMOLLM2_Q4_1, allow_amx=True)
    assert placement.extra_bufts and placement.repack == () and AMX_OPT_IN in placement.reason


@pytest.mark.parametrize("value, opted", [("1", True), (" 1 ", True), ("0", False), ("", False), ("yes", False)])
def test_the_opt_in_is_exactly_1(value, opted):
    assert amx_opted_in({AMX_OPT_IN: value}) is opted
    assert amx_opted_in({}) is False


# -- the GGUF header reader ---------------------------------------------------------------------------------------

TYPES = {0: "f32", 2: "q4_0", 3: "q4_1", 8: "q8_0"}


def _string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("<Q", len(data)) + data


def gguf_header(tensors: list[tuple[str, list[int], int]]) -> bytes:
    """A GGUF v3 header with a string, a u32, an array of strings and an array of f32 in its metadata."""
    kv = [
        _string("general.architecture") + struct.pack("<I", 8) + _string("llama"),
        _string("llama.context_length") + struct.pack("<II", 4, 2048),
        _string("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 3) + b"".join(map(_string, ["a", "bc", "<s>"])),
        _string("tokenizer.ggml.scores") + struct.pack("<IIQ", 9, 6, 2) + struct.pack("<ff", 0.5, -1.0),
    ]
    infos = [_string(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
             + struct.pack("<IQ", kind, 0) for name, dims, kind in tensors]
    return b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kv)) + b"".join(kv) + b"".join(infos)


def test_read_tensors_gives_names_types_and_rows(tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(gguf_header([("token_embd.weight", [576, 49152], 8), ("blk.0.attn_norm.weight", [576], 0),
                                  ("blk.0.attn_q.weight", [576, 576], 3)]))
    assert read_tensors(path, TYPES.get) == (Tensor("token_embd.weight", "q8_0", 49152),
                                             Tensor("blk.0.attn_norm.weight", "f32", 1),
                                             Tensor("blk.0.attn_q.weight", "q4_1", 576))


def test_read_tensors_errors_are_one_line(tmp_path):
    whole = gguf_header([("blk.0.attn_q.weight", [576, 576], 3)])
    cases = {"truncated.gguf": whole[:-5], "magic.gguf": b"GGML" + whole[4:], "empty.gguf": b""}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(PowerSampleError, match="cannot load model") as err:
            read_tensors(tmp_path / name, TYPES.get)
        assert "\n" not in str(err.value)
    with pytest.raises(PowerSampleError, match="cannot load model"):
        read_tensors(tmp_path / "missing.gguf", TYPES.get)
