"""Which CPU kernels llama.cpp runs for the llamacpp backend: chosen so that a token's log p does not depend on how
its decode was batched.

llama.cpp quantizes activations to 8 bits, so the tiniest rounding difference anywhere moves a token's log p by up
to ~0.5 nat, and its CPU backend picks kernels by the shape of each micro-batch (llama-cpp-python 0.3.36, read in its
vendored ggml-cpu and measured on a Q4_K_M file):

- repacked weights (the `CPU_REPACK` buffer type: Q4_0, Q4_K, IQ4_NL, ... on AVX2/AVX-512) run a GEMM for
  micro-batches of 4 rows or more and a GEMV below;
- the tiled K-quant matmul (Q2_K ... Q6_K, IQ types) runs from 8 rows (`GGML_CPU_TILED_MM`);
- tinyBLAS (llamafile's sgemm) runs F16, BF16 and F32 weights (and Q8_0, Q5_0, Q4_0) from 2 rows, which for F16
  weights rounds unlike the 1-row kernel;
- flash attention splits a lone token's keys across threads once it sees 512 cells (the split-KV kernel);
- the `AMX` buffer type crashes the process on Sapphire-Rapids-class Xeons (upstream llama.cpp issue 20824).

A Metropolis-Hastings ratio adds log p from forwards of different shapes (drafted verifications, one-token decodes,
prefills), so a shape-dependent log p is a chain whose target is p^alpha of no one function. By default the backend
therefore runs llama.cpp **exactly**:

1. weights stay in the plain CPU layout: no extra buffer types, so no repacking and no AMX (`Placement`);
2. the tiled K-quant matmul is off for the whole process (`GGML_CPU_TILED_MM=0`, set before llama.cpp computes
   anything, unless the user set that variable: then the probe below sees what it does);
3. the decode layout (`Layout`) is "batched" (every live row in one llama_decode, micro-batches of up to 32 tokens)
   when llama.cpp runs one thread, the model is dense, and a probe of the loaded model finds that its kernels give
   every row the same numbers at any row count (probing.py, `rows_disagree`); else "rows": one row per llama_decode
   and one token per micro-batch, so that every matmul and every attention of every decode runs the same one-row
   kernel. A mixture of experts always decodes rows: on the model matrix's qwen3_moe, batched decodes differed from
   lone ones at 1 token in 8 to 16 on 2 quant types of 7 (0.0004 to 0.07 nats; an expert picked on a near-tie),
   which the probe's random ids never met, and the rows layout was bit-equal on all 7.

`POWERSAMPLE_LLAMACPP_NATIVE=1` opts out: llama.cpp's own choice of weight layouts and kernels (AMX included, where
the build has it) with the batched layout. That is faster for K-quants on some CPUs, but log p then depends on the
batch shape (same seed, different samples with and without speculation), and AMX may crash.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

NATIVE_OPT_IN = "POWERSAMPLE_LLAMACPP_NATIVE"  # "1": llama.cpp's own kernels and weight layouts (not batch-invariant)
TILED_MM = "GGML_CPU_TILED_MM"  # ggml-cpu reads it once per process: "0" turns its tiled K-quant matmul off
BATCH_TOKENS = 32  # tokens per micro-batch in the batched layout: below 64, llama.cpp's tiled attention threshold


@dataclass(frozen=True)
class Placement:
    """Where the weights go: llama_model_params.use_extra_bufts."""

    extra_bufts: bool  # False: the plain CPU layout (no repack, no AMX)
    reason: str  # one line, for logs and bench

    @property
    def label(self) -> str:
        return "native" if self.extra_bufts else "plain"


@dataclass(frozen=True)
class Layout:
    """How the rows of one decoding step reach llama.cpp."""

    batched: bool  # True: every live row in one llama_decode; False: one row per llama_decode, one token per
    # micro-batch
    reason: str  # one line, for logs, bench and records

    @property
    def label(self) -> str:
        return "batched" if self.batched else "rows"

    @property
    def micro_batch(self) -> int:
        """llama_context_params.n_ubatch: tokens per physical batch."""
        return BATCH_TOKENS if self.batched else 1


def native_opted_in(environ: Mapping[str, str] = os.environ) -> bool:
    """True when the user set POWERSAMPLE_LLAMACPP_NATIVE=1 (any other value, or none, keeps the exact kernels)."""
    return environ.get(NATIVE_OPT_IN, "").strip() == "1"


def placement(native: bool) -> Placement:
    """The weights' placement (module docstring)."""
    if native:
        return Placement(True, f"{NATIVE_OPT_IN}=1: llama.cpp's own weight layouts (repack, AMX where built)")
    return Placement(False, "plain CPU layout: repacked weights switch kernels at 4 rows, and AMX crashes")


def prepare_process(native: bool, environ: MutableMapping[str, str] = os.environ) -> None:
    """Turn llama.cpp's tiled K-quant matmul off for this process, unless opted out or set by the user. Must run
    before llama.cpp's first matmul in the process (ggml-cpu reads the variable once)."""
    if not native:
        environ.setdefault(TILED_MM, "0")


def choose_layout(native: bool, threads: int, disagreement: str | None, experts: int = 0) -> Layout:
    """The decode layout (module docstring). `disagreement` is the probe's finding: None when every row count gave
    the same numbers, else where they differed; `experts` the model's experts (0: a dense model)."""
    if native:
        return Layout(True, f"{NATIVE_OPT_IN}=1: batched, llama.cpp's own kernels (log p depends on the batch)")
    if experts:
        return Layout(
            False,
            f"a mixture of {experts} experts: batched decodes route rare tokens by other numbers "
            "than lone ones, which no probe can be sure to meet, so one row per decode",
        )
    if threads > 1:
        return Layout(
            False,
            f"{threads} threads: flash attention splits a lone token's keys across threads, so "
            "one token per micro-batch",
        )
    if disagreement is not None:
        return Layout(False, f"this model's kernels round by row count ({disagreement}), so one row per decode")
    return Layout(True, "this model's kernels give every row the same numbers at 1 to 32 rows")


def tiled_setting(environ: Mapping[str, str] = os.environ) -> str:
    """What the process's tiled-matmul variable says (part of the probe's cache key)."""
    return environ.get(TILED_MM, "unset")


def model_params(llama_cpp: Any, where: Placement) -> Any:
    """llama_cpp.llama_model_params carrying `where`."""
    params = llama_cpp.llama_model_default_params()
    params.use_extra_bufts = where.extra_bufts
    return params
