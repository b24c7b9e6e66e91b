"""Tiny GGUF models written here, for tests that need what the embedded model lacks: a sliding-window architecture
(gemma2), or no chat template. Random weights, the embedded SmolLM2's real tokenizer; about a second to write."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from powersample.backends.embedded import embedded_gguf_path

EMBD, HEADS, KV_HEADS, HEAD_DIM, FF, LAYERS = 64, 2, 1, 32, 128, 2


def tiny_gemma2(path: Path, *, chat_template: bool, sliding_window: int = 16) -> Path:
    """A 2-layer gemma2 (every other layer attends to the last `sliding_window` positions) at `path`, with the
    embedded model's tokenizer, and its chat template only when asked."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "gemma2")
    writer.add_context_length(512)
    writer.add_embedding_length(EMBD)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FF)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_key_length(HEAD_DIM)
    writer.add_value_length(HEAD_DIM)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_sliding_window(sliding_window)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    vocab = _copy_tokenizer(gguf, writer, chat_template)
    _add_weights(writer, vocab)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _copy_tokenizer(gguf, writer, chat_template: bool) -> int:
    """The embedded GGUF's tokenizer.* fields (its chat template only when asked); returns the vocabulary size."""
    reader = gguf.GGUFReader(str(embedded_gguf_path()))
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer.") or (key == "tokenizer.chat_template" and not chat_template):
            continue
        kind = field.types[0]
        if kind == gguf.GGUFValueType.ARRAY:
            values = [_value(gguf, field, i, field.types[1]) for i in field.data]
            writer.add_key_value(key, values, kind, sub_type=field.types[1])
        else:
            writer.add_key_value(key, _value(gguf, field, field.data[0], kind), kind)
    return len(reader.fields["tokenizer.ggml.tokens"].data)


def _value(gguf, field, index: int, kind):
    part = field.parts[index]
    return bytes(part).decode("utf-8") if kind == gguf.GGUFValueType.STRING else part[0].item()


def _add_weights(writer, vocab: int) -> None:
    rng = np.random.default_rng(0)

    def matrix(name: str, rows: int, cols: int) -> None:
        writer.add_tensor(name, (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32))

    matrix("token_embd.weight", vocab, EMBD)
    writer.add_tensor("output_norm.weight", np.ones(EMBD, np.float32))
    for i in range(LAYERS):
        for norm in ("attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm"):
            writer.add_tensor(f"blk.{i}.{norm}.weight", np.ones(EMBD, np.float32))
        matrix(f"blk.{i}.attn_q.weight", HEADS * HEAD_DIM, EMBD)
        matrix(f"blk.{i}.attn_k.weight", KV_HEADS * HEAD_DIM, EMBD)
        matrix(f"blk.{i}.attn_v.weight", KV_HEADS * HEAD_DIM, EMBD)
        matrix(f"blk.{i}.attn_output.weight", EMBD, HEADS * HEAD_DIM)
        matrix(f"blk.{i}.ffn_gate.weight", FF, EMBD)
        matrix(f"blk.{i}.ffn_up.weight", FF, EMBD)
        matrix(f"blk.{i}.ffn_down.weight", EMBD, FF)
