"""The architectures of the matrix: tiny random-weight versions of the models users run, as transformers configs.

Every model shares one shape (`SHAPE`): the embedded SmolLM2's vocabulary (49152 ids, so that both engines tokenize
with the same tokenizer), hidden size 256 (a multiple of llama.cpp's K-quant block, QK_K = 256, so K-quants apply to
the attention rows), 4 query heads of 64 over 2 KV heads (GQA), and 512 positions. Each `Arch` adds what makes its
architecture itself: a sliding window of 32 (shorter than the checks' sequences) with global layers between, soft
capping, q/k norms, biases, fused projections, experts. Some FFNs are 640 wide: their down projections' rows are not
a multiple of 256, so Q4_K_M and Q6_K fall back to Q5_0 and Q8_0 for them, the mix real files hold (Gemma 3 1B's
hidden size is 1152, Qwen2.5 0.5B's 896).

`init` is the weights' standard deviation: large enough that next-token distributions are peaked (a few nats of
entropy, not the ~10.8 of uniform), so that a wrong conversion or a kernel's rounding shows in log p.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

WINDOW = 32  # tokens a sliding-window layer attends to; the checks' prompts are longer
CONTEXT = 512  # max_position_embeddings: the context both engines get
SHAPE: Mapping[str, Any] = {
    "vocab_size": 49152,  # the embedded SmolLM2 tokenizer's
    "hidden_size": 256,  # = QK_K: K-quants apply to every row of this length
    "num_attention_heads": 4,
    "num_key_value_heads": 2,  # GQA: two query heads per KV head
    "head_dim": 64,
    "max_position_embeddings": CONTEXT,
    "rms_norm_eps": 1e-6,
    "bos_token_id": 1,  # <|im_start|>
    "eos_token_id": 2,  # <|im_end|>
    "pad_token_id": 2,
}


@dataclass(frozen=True)
class Arch:
    """One architecture of the matrix: how transformers builds it, and what llama.cpp needs to run it."""

    name: str  # the matrix's name for it (--archs)
    model_type: str  # transformers' AutoConfig.for_model name
    config: Mapping[str, Any] = field(default_factory=dict)  # the config beyond SHAPE
    init: float = 0.2  # the weights' standard deviation (initializer_range)
    gguf_arch: str | None = None  # gguf.MODEL_ARCH member name; None: no llama.cpp architecture runs it faithfully
    no_gguf: str = ""  # why not, when gguf_arch is None
    interleaved_rope: bool = False  # llama.cpp's "normal" rope rotates pairs (2i, 2i+1), HF halves (i, i + d/2)
    norm_offset: float = 0.0  # gemma's RMSNorm scales by 1 + w, llama.cpp's by w: the GGUF holds w + offset
    note: str = ""  # what this architecture exercises, for the support table

    @property
    def window(self) -> int | None:
        """The sliding window of its sliding layers, or None where every layer attends to the whole context."""
        return self.config.get("sliding_window")


ARCHS: Mapping[str, Arch] = {
    a.name: a
    for a in (
        Arch(
            "llama",
            "llama",
            {"intermediate_size": 512, "num_hidden_layers": 2, "tie_word_embeddings": False},
            gguf_arch="LLAMA",
            interleaved_rope=True,
            note="untied output, q/k rows permuted for llama.cpp's rope",
        ),
        Arch(
            "qwen2",
            "qwen2",
            {"intermediate_size": 640, "num_hidden_layers": 2, "tie_word_embeddings": True},
            gguf_arch="QWEN2",
            note="q/k/v biases; FFN 640 wide (K-quant fallbacks)",
        ),
        Arch(
            "qwen3",
            "qwen3",
            {"intermediate_size": 512, "num_hidden_layers": 2, "tie_word_embeddings": True},
            gguf_arch="QWEN3",
            note="q/k RMS norms",
        ),
        Arch(
            "gemma2",
            "gemma2",
            {
                "intermediate_size": 640,
                "num_hidden_layers": 2,
                "sliding_window": WINDOW,
                "query_pre_attn_scalar": 64,
                "layer_types": ["sliding_attention", "full_attention"],
            },
            init=0.1,
            gguf_arch="GEMMA2",
            norm_offset=1.0,
            note="sliding/global layers alternating, attention and final soft capping, norms + 1",
        ),
        Arch(
            "gemma3",
            "gemma3_text",
            {"intermediate_size": 640, "num_hidden_layers": 6, "sliding_window": WINDOW, "query_pre_attn_scalar": 64},
            init=0.1,
            gguf_arch="GEMMA3",
            norm_offset=1.0,
            note="5 sliding layers then 1 global, local and global rope bases, q/k norms, norms + 1",
        ),
        Arch(
            "mistral",
            "mistral",
            {"intermediate_size": 512, "num_hidden_layers": 2, "sliding_window": WINDOW, "tie_word_embeddings": False},
            no_gguf="llama.cpp runs Mistral as its llama architecture, which has no sliding window: past 32 tokens "
            "it would compute another model",
            note="a sliding window on every layer",
        ),
        Arch(
            "phi3",
            "phi3",
            {"intermediate_size": 512, "num_hidden_layers": 2, "tie_word_embeddings": True},
            gguf_arch="PHI3",
            note="fused qkv and gate/up projections",
        ),
        Arch(
            "qwen3_moe",
            "qwen3_moe",
            {
                "moe_intermediate_size": 256,
                "num_experts": 4,
                "num_experts_per_tok": 2,
                "norm_topk_prob": True,
                "num_hidden_layers": 2,
                "tie_word_embeddings": True,
            },
            gguf_arch="QWEN3MOE",
            note="4 experts, 2 per token (fused expert tensors split for llama.cpp)",
        ),
    )
}


def config_kwargs(arch: Arch) -> dict[str, Any]:
    """Everything AutoConfig.for_model gets for `arch`."""
    return {**SHAPE, **arch.config, "initializer_range": arch.init}
