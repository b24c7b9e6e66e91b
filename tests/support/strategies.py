"""hypothesis strategies shared by the sampler tests."""

from __future__ import annotations

import pytest

pytest.importorskip("hypothesis")

from hypothesis import strategies as st

from powersample.backends.toy import ToySpec


@st.composite
def toy_specs(draw):
    """Random tables over 2-3 tokens + EOS, zeros allowed (but every row can emit something)."""
    vocab = draw(st.integers(2, 3))
    eos = vocab

    def row():
        w = draw(st.lists(st.sampled_from([0.0, 0.05, 0.2, 0.5, 1.0, 2.0]), min_size=vocab + 1, max_size=vocab + 1))
        w = [x if sum(w) > 0 else 1.0 for x in w]
        return [x / sum(w) for x in w]

    prefixes = ["", "0", "1", "0,0", "0,1", "1,0", "1,1"]
    nxt = {k: row() for k in prefixes if draw(st.booleans())}
    return ToySpec.from_dict(
        {"vocab": [f"t{i}" for i in range(vocab)] + ["<eos>"], "eos_id": eos, "default": row(), "next": nxt}
    )
