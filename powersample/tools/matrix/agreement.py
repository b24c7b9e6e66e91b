"""Is a conversion right? llama.cpp's log p of the F32 GGUF against transformers' fp32 log p of the same ids.

A few sequences longer than the sliding window (BOS, then seeded random ids) are scored by both engines at every
position. A right conversion differs only by the engines' rounding (llama.cpp keeps K and V in f16): a few
hundredths of a nat on these peaked models, everywhere. A wrong one (q/k rows not permuted for llama.cpp's rope,
gemma's norms without their + 1, a window llama.cpp does not apply) is off by nats at most positions.

One exception: in a mixture of experts the router picks its top k experts, a discontinuous choice. Where two
experts' router logits nearly tie, the engines' rounding can pick different ones, and that position (and the next
ones, through its keys and values) differs by up to nats: 2 of 285 positions seen on qwen3_moe. So a conversion
agrees when its median gap is tiny and no position is past TOLERANCE, or for an MoE, at most ROUTING_FLIPS of them.
The result is cached beside the model, per llama.cpp version.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from powersample.io import write_json_atomic
from powersample.tools.matrix.archs import WINDOW
from powersample.tools.matrix.models import ArchFiles

TOLERANCE = 0.1  # nats: the largest gap a right conversion may show (0.005-0.064 seen); wrong ones are off by 5-10
MEDIAN_TOLERANCE = 0.01  # nats: the median gap of a right conversion (0.004-0.005 seen)
ROUTING_FLIPS = 0.02  # an MoE: the share of positions that may be past TOLERANCE (near-tied routers, see above)
SEQUENCES = 3  # sequences scored
LENGTH = 3 * WINDOW  # tokens per sequence: three windows, so sliding layers really slide
SEED = 0  # the random ids' generator


@dataclass(frozen=True)
class Agreement:
    """How closely llama.cpp's log p of the F32 GGUF follows transformers' fp32 log p of the same ids."""

    max_gap: float  # nats: max over every scored position of |log p (llama.cpp) - log p (transformers)|
    median_gap: float  # nats: the median of the same
    max_gap_in_window: float  # the max over the first WINDOW positions (where sliding layers see everything)
    past_tolerance: int  # positions whose gap is past TOLERANCE
    allowed: int  # positions that may be: 0, or ROUTING_FLIPS of them for an MoE
    positions: int  # positions scored
    llama_cpp: str  # llama-cpp-python's version

    @property
    def ok(self) -> bool:
        return self.median_gap <= MEDIAN_TOLERANCE and self.past_tolerance <= self.allowed


def agreement(files: ArchFiles) -> Agreement:
    """The conversion's Agreement, measured once per llama.cpp version and cached in the arch's folder."""
    import llama_cpp

    cache = files.folder / "agreement.json"
    found = _read(cache)
    if found is not None and found.llama_cpp == llama_cpp.__version__:
        return found
    result = measure(
        files.hf, files.gguf(), routed=bool(files.arch.config.get("num_experts")), version=llama_cpp.__version__
    )
    write_json_atomic(cache, asdict(result))
    return result


def measure(hf_dir: Path, gguf: Path, routed: bool = False, version: str = "") -> Agreement:
    """Score SEQUENCES sequences of LENGTH ids with both engines (see the module docstring); `routed`: the model
    routes tokens to experts."""
    from powersample.backends.llamacpp import LlamaCppBackend

    ids = sequences()
    want = _transformers_logp(hf_dir, ids)  # (S, LENGTH - 1)
    backend = LlamaCppBackend.load(str(gguf), n_ctx=LENGTH)
    try:
        have = np.array([backend.score(seq[:1], seq[1:]) for seq in ids])  # (S, LENGTH - 1)
    finally:
        backend.close()
    gap = np.abs(have - want)  # (S, LENGTH - 1)
    allowed = int(ROUTING_FLIPS * gap.size) if routed else 0
    return Agreement(
        float(gap.max()),
        float(np.median(gap)),
        float(gap[:, : WINDOW - 1].max()),
        int((gap > TOLERANCE).sum()),
        allowed,
        int(gap.size),
        version,
    )


def sequences() -> list[list[int]]:
    """SEQUENCES lists of LENGTH ids: BOS, then seeded random ids (specials 0-16 left out)."""
    rng = np.random.default_rng(SEED)
    return [[1, *(int(t) for t in rng.integers(17, 49152, LENGTH - 1))] for _ in range(SEQUENCES)]


def _transformers_logp(hf_dir: Path, ids: list[list[int]]) -> np.ndarray:
    """transformers' fp32 log p of every id after the first, one uncached forward per sequence: (S, T - 1)."""
    import torch
    from transformers import AutoModelForCausalLM

    from powersample.backends.embedded import quiet_loading

    with quiet_loading():
        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    tokens = torch.tensor(ids)  # (S, T)
    with torch.inference_mode():
        logp = torch.log_softmax(model(input_ids=tokens, use_cache=False).logits.double(), dim=-1)  # (S, T, V)
    return logp[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0].numpy()


def _read(path: Path) -> Agreement | None:
    """A cached Agreement, or None when there is none (or it is unreadable)."""
    try:
        data: Any = json.loads(path.read_text())
        return Agreement(**data)
    except (OSError, ValueError, TypeError):
        return None
