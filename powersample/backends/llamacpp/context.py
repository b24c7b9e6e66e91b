"""A llama.cpp context through its C API: creating one (one KV stream per sequence), feeding it one `llama_batch`,
reading its logits, and moving a sequence's cells to another context. The KV cache as `kvcache.Memory`."""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from powersample.backends.llamacpp.files import Weights
from powersample.errors import PowerSampleError

N_BATCH = 512  # most tokens per llama_decode call; longer prefills are fed in chunks

Item = tuple[int, int, int, bool]  # one batch entry: (token id, position, sequence id, compute its logits)


def new_context(lib: Any, weights: Weights, room: int, n_seq: int, micro_batch: int) -> tuple[Any, int]:
    """(a llama.cpp context with a KV stream of `room` tokens for each of n_seq sequences and micro-batches of
    `micro_batch` tokens, the room llama.cpp gave)."""
    params = lib.llama_context_default_params()
    params.n_threads = params.n_threads_batch = weights.threads  # llama.cpp's batch default, every core, spins
    # badly when a core is busy elsewhere
    params.n_ctx, params.n_seq_max, params.kv_unified = room * n_seq, n_seq, False  # a stream per sequence
    params.n_batch, params.n_ubatch = N_BATCH, micro_batch
    params.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_ENABLED  # log p independent of batching (package docstring)
    ctx = lib.llama_init_from_model(weights.model.model, params)
    if ctx is None:
        raise PowerSampleError(f"llama.cpp could not create a KV cache of {n_seq} x {room} tokens (out of memory?)")
    return ctx, int(lib.llama_n_ctx_seq(ctx))


def submit(lib: Any, ctx: Any, batch: Any, items: Sequence[Item]) -> None:
    """One llama_decode of `items` (at most N_BATCH) through `batch`; a failure is a one-line PowerSampleError."""
    batch.n_tokens = len(items)
    for i, (token, pos, seq_id, logits) in enumerate(items):
        batch.token[i] = token
        batch.pos[i] = pos
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = seq_id
        batch.logits[i] = logits
    status = lib.llama_decode(ctx, batch)
    if status != 0:
        why = "no room left in the KV cache" if status == 1 else f"llama_decode returned {status}"
        raise PowerSampleError(f"llama.cpp could not decode {len(items)} tokens ({why})")


def logits(lib: Any, ctx: Any, index: int, n_vocab: int) -> np.ndarray:
    """The raw logits after batch entry `index` of the last decode: (V,) float32, a view of llama.cpp's buffer."""
    return np.ctypeslib.as_array(lib.llama_get_logits_ith(ctx, index), shape=(n_vocab,))


def move_cells(lib: Any, old: Any, new: Any, seq_id: int) -> bool:
    """Copy one sequence's cells (positions, keys, values: the exact bytes) from context `old` to `new`."""
    size = lib.llama_state_seq_get_size(old, seq_id)
    buffer = (ctypes.c_uint8 * size)()
    written = lib.llama_state_seq_get_data(old, buffer, size, seq_id)
    return bool(written) and bool(lib.llama_state_seq_set_data(new, buffer, written, seq_id))


@dataclass(frozen=True)
class LlamaMemory:
    """A context's KV cache (`llama_get_memory`) as the bookkeeping's `kvcache.Memory`."""

    lib: Any
    handle: Any  # llama_memory_t

    def seq_rm(self, seq_id: int, start: int, end: int) -> bool:
        return bool(self.lib.llama_memory_seq_rm(self.handle, seq_id, start, end))

    def seq_cp(self, source: int, target: int) -> None:
        self.lib.llama_memory_seq_cp(self.handle, source, target, -1, -1)

    def clear(self) -> None:
        self.lib.llama_memory_clear(self.handle, True)
