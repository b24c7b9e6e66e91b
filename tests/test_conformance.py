"""One conformance suite over every backend: the promises of the seam in `powersample/backends/base.py`.

- `score` agrees with the base log p returned while sampling (batched, ragged contexts);
- rewinding a cache gives the same log-probs as computing from scratch;
- tau = 1 gives log q = log p exactly; a colder proposal gives a different, valid log q;
- score obeys the chain rule; the same generator gives the same continuation; EOS only ever comes last.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import load_spec

from powersample.backends.toy import ToyBackend
from powersample.core.types import ExtendRequest, Proposal

TOLERANCE = 1e-4  # fp32 incremental decoding vs a full forward


def _hf():
    pytest.importorskip("torch")
    from powersample.backends.hf import HFBackend

    return HFBackend.load(None, device="cpu", dtype="float32")


def _llamacpp():
    pytest.importorskip("llama_cpp")
    from powersample.backends.llamacpp import LlamaCppBackend

    return LlamaCppBackend.load(None)


FACTORIES = {
    "toy": lambda: ToyBackend(load_spec("eos_trap")),
    "hf": _hf,
    "llamacpp": _llamacpp,
}


@pytest.fixture(scope="module", params=[
    "toy",
    pytest.param("hf", marks=pytest.mark.slow),
    pytest.param("llamacpp", marks=pytest.mark.slow),
])
def backend(request):
    return FACTORIES[request.param]()


@pytest.fixture(scope="module")
def prompt(backend):
    return backend.encode("Name three primary colors.", chat=True)


def extend(backend, context, n, seed, proposal=Proposal(1.0), slot=0):
    return backend.extend([ExtendRequest(tuple(context), n, np.random.default_rng(seed), slot)], proposal)[0]


def test_score_agrees_with_sampling(backend, prompt):
    proposal = Proposal(0.5)
    first = extend(backend, prompt, 3, seed=1, proposal=proposal, slot=10)
    contexts = [prompt, prompt + first.tokens[:1], prompt + first.tokens[:2]]
    requests = [ExtendRequest(c, 6, np.random.default_rng(j), 20 + j) for j, c in enumerate(contexts)]
    for context, cont in zip(contexts, backend.extend(requests, proposal)):
        assert 1 <= len(cont.tokens) == len(cont.base_logp) == len(cont.proposal_logq) <= 6
        np.testing.assert_allclose(backend.score(context, cont.tokens), cont.base_logp, atol=TOLERANCE, rtol=0)


def test_rewinding_gives_the_same_log_probs_as_recomputing(backend, prompt):
    long = extend(backend, prompt, 8, seed=2, slot=30)
    cut = prompt + long.tokens[: min(2, len(long.tokens) - 1)]
    rewound = extend(backend, cut, 6, seed=3, slot=30)  # same slot: the cache is rewound to `cut`
    np.testing.assert_allclose(backend.score(cut, rewound.tokens), rewound.base_logp, atol=TOLERANCE, rtol=0)
    recomputed = extend(backend, cut, 6, seed=3, slot=31)  # a fresh slot
    assert recomputed.tokens == rewound.tokens
    np.testing.assert_allclose(recomputed.base_logp, rewound.base_logp, atol=TOLERANCE, rtol=0)


def test_tau_one_gives_log_q_equal_to_log_p(backend, prompt):
    cont = extend(backend, prompt, 6, seed=4, slot=40)
    assert cont.proposal_logq == cont.base_logp
    cold = extend(backend, prompt, 6, seed=4, proposal=Proposal(0.25), slot=41)
    assert all(q <= 1e-12 for q in cold.proposal_logq)
    assert cold.proposal_logq != cold.base_logp


def test_score_obeys_the_chain_rule(backend, prompt):
    cont = extend(backend, prompt, 6, seed=5, slot=50)
    a, b = cont.tokens[:2], cont.tokens[2:]
    whole = backend.score(prompt, cont.tokens)
    parts = backend.score(prompt, a) + backend.score(prompt + a, b)
    np.testing.assert_allclose(whole, parts, atol=TOLERANCE, rtol=0)


def test_same_generator_same_continuation_and_eos_only_last(backend, prompt):
    one = extend(backend, prompt, 12, seed=6, proposal=Proposal(1.5), slot=60)
    two = extend(backend, prompt, 12, seed=6, proposal=Proposal(1.5), slot=61)
    assert one.tokens == two.tokens
    assert not set(one.tokens[:-1]) & backend.eos_ids
    assert len(one.tokens) == 12 or one.tokens[-1] in backend.eos_ids


def test_confidence_is_minus_the_entropy_of_the_next_token_distribution(backend, prompt):
    cont = extend(backend, prompt, 4, seed=7, slot=70)
    conf = backend.confidence(prompt, cont.tokens)
    assert len(conf) == len(cont.tokens)
    assert all(c <= 1e-12 for c in conf)  # minus an entropy
    assert backend.confidence(prompt, ()) == ()
    whole = backend.confidence(prompt, cont.tokens)
    parts = backend.confidence(prompt, cont.tokens[:1]) + backend.confidence(prompt + cont.tokens[:1], cont.tokens[1:])
    np.testing.assert_allclose(whole, parts, atol=TOLERANCE, rtol=0)
