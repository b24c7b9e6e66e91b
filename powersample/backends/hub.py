"""What the engines that load transformers checkpoints (hf, vllm) share: hub ids, dtype names and EOS ids.

Imports no engine: hf maps the dtype names onto torch dtypes, vllm hands them to vLLM as they are.
"""

from __future__ import annotations

import re
from typing import Any, Iterable

from powersample.errors import PowerSampleError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # "name" or "org/name"; anything else is only a path
# fmt: off
DTYPES = {  # accepted --dtype spellings -> the dtype's name; "auto" = whatever the checkpoint says
    "float32": "float32", "fp32": "float32", "float": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16",
    "auto": "auto",
}
# fmt: on


def is_hub_id(model: str) -> bool:
    """Whether `model` is spelled like a hub id ("name" or "org/name"); a .gguf name never is."""
    return bool(HUB_ID.match(model)) and not model.endswith(".gguf")


def dtype_name(dtype: str | None, default: str) -> str:
    """The dtype's name (float32, bfloat16, float16, auto) for a --dtype spelling, `default` for None; an unknown
    spelling is a one-line PowerSampleError listing the accepted ones."""
    if dtype is None:
        return default
    try:
        return DTYPES[dtype.lower()]
    except (KeyError, AttributeError):
        raise PowerSampleError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}") from None


def eos_ids(tokenizer_eos: int | None, generation_eos: int | Iterable[int] | None) -> frozenset[int]:
    """The ids a sequence ends at: the tokenizer's EOS plus the generation config's (an int, a list or None)."""
    ids: set[Any] = {tokenizer_eos}
    ids.update(generation_eos if isinstance(generation_eos, (list, tuple)) else [generation_eos])
    return frozenset(int(i) for i in ids if i is not None)
