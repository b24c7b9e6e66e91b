"""Engines behind the backend seam (`base.py`), one file each; `spec.py` says which one to load.

Optional engines (hf, llamacpp, vllm) are imported lazily, when a BackendSpec loads them.
"""

from __future__ import annotations

from powersample.backends.base import Backend
from powersample.backends.spec import BACKENDS, BackendSpec


def load_backend(name: str = "auto", **options) -> Backend:
    """Build a backend by name: `BackendSpec(name, **options).load()` (see BackendSpec for the options).
    `model` None means the embedded SmolLM2-135M-Instruct."""
    return BackendSpec(name, **options).load()


__all__ = ["BACKENDS", "Backend", "BackendSpec", "load_backend"]
