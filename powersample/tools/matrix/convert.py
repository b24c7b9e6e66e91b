"""Our HF -> GGUF writer for the matrix's architectures (the `gguf` package's writer, our own mapping).

    write_gguf(arch, config, tensors, path)   an F32 GGUF that llama.cpp loads as `arch.gguf_arch`

What llama.cpp's loader needs, per architecture (learned from its src/models/*.cpp and llama-model.cpp):
- the shared hyper-parameters: context, widths, layers, heads and KV heads, head size (key/value length), rope
  dimensions and base, the RMS norm's epsilon, the vocabulary size;
- sliding windows (gemma2, gemma3): the window, and which layers slide (an array of bools), plus the sliding layers'
  own rope base where it differs (gemma3: 10k local, 1M global);
- soft capping (gemma2): of attention logits and of the final logits;
- experts (qwen3moe): how many, how many per token, and their FFN width;
- the tokenizer: every `tokenizer.*` key of the embedded SmolLM2 GGUF, copied as it is, so llama.cpp tokenizes as
  transformers does with the same vocabulary.

Weights go through three transforms, each where its architecture needs it:
- rope pairs: HF rotates the halves (i, i + d/2) of a head, llama.cpp's "normal" rope (llama) pairs (2i, 2i + 1), so
  the rows of q and k are reordered within each head;
- norm offset: gemma's RMSNorm multiplies by 1 + w, llama.cpp's by w, so gemma norms are written as w + 1;
- fused experts: transformers keeps each layer's experts' gate and up projections in one (E, 2I, H) tensor,
  llama.cpp wants ffn_gate_exps and ffn_up_exps apart.
HF's fused projections that llama.cpp reads fused too (phi3's qkv_proj and gate_up_proj) are written as they are.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from powersample.errors import PowerSampleError
from powersample.tools.matrix.archs import Arch

TOKENIZER_PREFIX = "tokenizer."  # the keys copied from the embedded GGUF
MODEL_NAME = "powersample matrix"  # general.name; never the arch's: llama.cpp sets token attributes by model name
# (a name containing "phi3" makes it look for phi-3's "</s>", which our vocabulary lacks, and the load fails)


def write_gguf(arch: Arch, config: Any, tensors: Mapping[str, np.ndarray], path: Path, tokenizer_gguf: Path) -> None:
    """Write `tensors` (HF names, float32) of a model with transformers config `config` as an F32 GGUF at `path`,
    with the tokenizer of `tokenizer_gguf`."""
    import gguf

    if arch.gguf_arch is None:
        raise PowerSampleError(f"{arch.name}: no GGUF: {arch.no_gguf}")
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[arch.gguf_arch]])
    try:
        writer.add_name(MODEL_NAME)
        writer.add_type("model")
        writer.add_file_type(gguf.LlamaFileType.ALL_F32)
        _hyperparameters(writer, config)
        _copy_tokenizer(writer, tokenizer_gguf)
        for name, data in gguf_tensors(arch, config, tensors):
            writer.add_tensor(name, data)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


def gguf_tensors(arch: Arch, config: Any, tensors: Mapping[str, np.ndarray]) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array in HF's shape order) of every tensor llama.cpp reads; a tied output is not written
    (llama.cpp then reads the token embedding)."""
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.gguf_arch], config.num_hidden_layers)
    for hf_name, data in tensors.items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        for part_name, part in _unfused(hf_name, data):
            name = names.get_name(part_name, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise PowerSampleError(f"{arch.name}: no GGUF tensor name for {part_name}")
            if not name.endswith((".weight", ".bias")):
                name += ".weight"  # parameters without a suffix (the experts' tensors) are weights
            yield name, _transformed(arch, config, part_name, np.asarray(part, dtype=np.float32))


def rope_interleaved(w: np.ndarray, heads: int) -> np.ndarray:
    """Rows of a q or k projection (or its bias) reordered for llama.cpp's normal rope: within each head of d rows,
    row i of the first half goes to 2i and row i of the second half to 2i + 1. (heads * d, ...) -> same shape."""
    d = w.shape[0] // heads
    return w.reshape(heads, 2, d // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _transformed(arch: Arch, config: Any, name: str, data: np.ndarray) -> np.ndarray:
    """One HF tensor as llama.cpp reads it: rope rows reordered, norms offset (see the module docstring)."""
    if arch.interleaved_rope and name.endswith(("q_proj.weight", "q_proj.bias")):
        data = rope_interleaved(data, config.num_attention_heads)
    elif arch.interleaved_rope and name.endswith(("k_proj.weight", "k_proj.bias")):
        data = rope_interleaved(data, config.num_key_value_heads)
    if arch.norm_offset and name.endswith("norm.weight"):
        data = data + np.float32(arch.norm_offset)
    return data


def _unfused(name: str, data: np.ndarray) -> Iterator[tuple[str, np.ndarray]]:
    """A tensor under the HF names llama.cpp's map knows: the experts' fused (E, 2I, H) gate_up_proj as gate_proj and
    up_proj, (E, I, H) each (gate first, as transformers' forward chunks it); any other tensor as it is."""
    if name.endswith("experts.gate_up_proj"):
        half = data.shape[1] // 2
        stem = name[: -len("gate_up_proj")]
        yield stem + "gate_proj", data[:, :half]
        yield stem + "up_proj", data[:, half:]
    else:
        yield name, data


def _hyperparameters(writer: Any, config: Any) -> None:
    """The architecture's keys from its transformers config (see the module docstring)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    _rope(writer, config, head_dim)
    _sliding(writer, config)
    if getattr(config, "attn_logit_softcapping", None):
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
    if getattr(config, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
    if getattr(config, "num_experts", None):
        writer.add_expert_count(config.num_experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
        writer.add_expert_feed_forward_length(config.moe_intermediate_size)


def _rope(writer: Any, config: Any, head_dim: int) -> None:
    """Rope dimensions and base; where layers of each kind have their own parameters (gemma3), the global layers'
    base is the base and the sliding layers' is the SWA base. Only plain rope (no scaling) is written."""
    params = dict(config.rope_parameters)
    full, sliding = params.get("full_attention", params), params.get("sliding_attention")
    for p in (full, sliding or full):
        if p.get("rope_type", "default") != "default":
            raise PowerSampleError(f"rope scaling {p['rope_type']!r} is not written by the matrix's converter")
    writer.add_rope_dimension_count(int(head_dim * full.get("partial_rotary_factor", 1.0)))
    writer.add_rope_freq_base(full["rope_theta"])
    if sliding is not None:
        writer.add_rope_freq_base_swa(sliding["rope_theta"])


def _sliding(writer: Any, config: Any) -> None:
    """The window and which layers slide, where some layers do."""
    kinds = getattr(config, "layer_types", None) or []
    if "sliding_attention" in kinds and getattr(config, "sliding_window", None):
        writer.add_sliding_window(config.sliding_window)
        writer.add_sliding_window_pattern([kind == "sliding_attention" for kind in kinds])


def _copy_tokenizer(writer: Any, source: Path) -> None:
    """Every tokenizer key of `source`, with its own value type."""
    for key, value, kind, sub in tokenizer_fields(source):
        writer.add_key_value(key, value, kind, sub_type=sub)


@functools.lru_cache(maxsize=2)
def tokenizer_fields(source: Path) -> tuple[tuple[str, Any, Any, Any], ...]:
    """(key, value, value type, array item type or None) of every tokenizer key of a GGUF; read once per process
    (gguf's reader takes about 5 s for a 49k vocabulary)."""
    import gguf

    fields = gguf.GGUFReader(source).fields.items()
    return tuple(
        (key, field.contents(), field.types[0], field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None)
        for key, field in fields
        if key.startswith(TOKENIZER_PREFIX)
    )
