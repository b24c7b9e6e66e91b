"""Engines behind the backend seam (`base.py`), one file each; `spec.py` says which one to load.

Optional engines (hf, llamacpp, vllm) are imported lazily, when a BackendSpec loads them (or, for hf,
when `from_transformers` wraps a model the caller holds).
"""

from __future__ import annotations

from typing import Any, Iterable

from powersample.backends.base import Backend
from powersample.backends.spec import BACKENDS, BackendSpec, _import_extra


def load_backend(name: str = "auto", **options) -> Backend:
    """Build a backend by name: `BackendSpec(name, **options).load()` (see BackendSpec for the options).
    `model` None means the embedded SmolLM2-135M-Instruct."""
    return BackendSpec(name, **options).load()


def from_transformers(
    model: Any, tokenizer: Any | None = None, *, eos_ids: Iterable[int] | None = None, reuse_cache: bool = True
) -> Backend:
    """A backend (an hf one) around a transformers causal LM and its tokenizer that you already hold: on any device,
    in any dtype, sharded with `device_map` or not. It never copies, moves or casts the weights, nor changes the
    model's mode (one in training mode is refused: call `model.eval()` first).

    `tokenizer` None serves token ids only (encoding or decoding text is then an error); `eos_ids` None = the
    model's generation config's EOS ids plus the tokenizer's; `reuse_cache` False prefills every request from
    scratch. Bad input is a one-line PowerSampleError."""
    hf = _import_extra("powersample.backends.hf", "hf")
    return hf.from_transformers(model, tokenizer, eos_ids=eos_ids, reuse_cache=reuse_cache)


__all__ = ["BACKENDS", "Backend", "BackendSpec", "from_transformers", "load_backend"]
