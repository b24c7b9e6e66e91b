"""The crash probe's child process (probing.PROBE_CHILD): load a model as the backend does and decode a few tokens
for two batched rows. A crash here is the probe's finding, not the parent's."""

from __future__ import annotations

import numpy as np

from powersample.backends.llamacpp.backend import MIN_ROOM, LlamaCppBackend
from powersample.core.types import ExtendRequest, Proposal


def probe_child(path: str) -> None:
    """Load `path` as the backend does and decode a few tokens for two batched rows."""
    backend = LlamaCppBackend.load(path, n_ctx=MIN_ROOM, max_slots=2)
    context = backend.encode("Hello", chat=False)
    requests = [ExtendRequest(context, 4, np.random.default_rng(seed), slot=seed) for seed in range(2)]
    backend.extend(requests, Proposal(temperature=1.0))
    backend.close()
