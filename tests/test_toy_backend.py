"""The toy backend: spec validation, exact log-probs, and the backend seam's promises."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from support.toy import load_spec

from powersample.backends.toy import ToyBackend, ToySpec
from powersample.core.types import ExtendRequest, Proposal
from powersample.errors import PowerSampleError

GOOD = {"vocab": ["a", "b", "<eos>"], "eos_id": 2, "default": [0.34, 0.33, 0.33], "next": {"": [0.42, 0.58, 0.0]}}


@pytest.mark.parametrize(
    "patch, message",
    [
        ({"vocab": []}, "'vocab'"),
        ({"vocab": "ab"}, "'vocab'"),
        ({"eos_id": 3}, "'eos_id'"),
        ({"eos_id": -1}, "'eos_id'"),
        ({"eos_id": "2"}, "'eos_id'"),
        ({"default": [0.5, 0.5]}, "'default'"),
        ({"default": [0.5, 0.6, -0.1]}, "'default' has a negative entry"),
        ({"default": [0.5, 0.5, 0.1]}, "'default' sums to"),
        ({"next": {"": [1.0, 0.0]}}, "'next'['']"),
        ({"next": {"0": [0.2, 0.2, 0.2]}}, "'next'['0'] sums to"),
        ({"next": {"x": [1.0, 0.0, 0.0]}}, "'next' key 'x'"),
        ({"next": {"0,7": [1.0, 0.0, 0.0]}}, "'next' key '0,7'"),
        ({"next": {"2": [1.0, 0.0, 0.0]}}, "continues past EOS"),
        ({"next": []}, "'next'"),
        ({"default": [0.5, "x", 0.5]}, "'default'"),
    ],
)
def test_bad_specs_name_the_bad_key(patch, message):
    with pytest.raises(PowerSampleError, match=None) as err:
        ToySpec.from_dict({**GOOD, **patch})
    text = str(err.value)
    assert message in text and "\n" not in text


def test_row_tolerance_is_1e_6():
    ToySpec.from_dict({**GOOD, "default": [0.34, 0.33, 0.33 + 5e-7]})
    with pytest.raises(PowerSampleError):
        ToySpec.from_dict({**GOOD, "default": [0.34, 0.33, 0.33 + 5e-6]})


def test_load_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    for path in (bad, tmp_path / "missing.json"):
        with pytest.raises(PowerSampleError) as err:
            ToySpec.load(path)
        assert "\n" not in str(err.value)
    good = tmp_path / "good.json"
    good.write_text(json.dumps(GOOD))
    assert ToySpec.load(good).eos_id == 2


def test_extend_returns_exact_log_probs_and_stops_at_eos():
    backend = ToyBackend(load_spec("early_eos"))
    rng = np.random.default_rng(0)
    proposal = Proposal(0.5)
    for _ in range(200):
        [cont] = backend.extend([ExtendRequest((), 5, rng)], proposal)
        assert 1 <= len(cont.tokens) <= 5
        assert 2 not in cont.tokens[:-1]  # EOS only ever last
        assert len(cont.tokens) == 5 or cont.tokens[-1] == 2
        assert cont.base_logp == backend.score((), cont.tokens)
        for t, tok in enumerate(cont.tokens):
            p = np.array(backend.spec.row(cont.tokens[:t]))
            q = p**2 / np.sum(p**2)
            assert math.isclose(cont.proposal_logq[t], math.log(q[tok]), rel_tol=1e-12)


def test_zero_probability_tokens_are_never_proposed_or_logged():
    backend = ToyBackend(load_spec("no_early_eos"))  # EOS has probability 0 everywhere
    rng = np.random.default_rng(1)
    requests = [ExtendRequest((), 6, rng) for _ in range(300)]
    for cont in backend.extend(requests, Proposal(3.0)):
        assert 3 not in cont.tokens and len(cont.tokens) == 6
        assert all(math.isfinite(x) for x in cont.base_logp + cont.proposal_logq)
    assert backend.score((), (3,)) == (-math.inf,)


def test_tau_one_gives_log_q_equal_log_p():
    backend = ToyBackend(load_spec("eos_trap"))
    [cont] = backend.extend([ExtendRequest((), 4, np.random.default_rng(2))], Proposal(1.0))
    assert cont.proposal_logq == cont.base_logp


def test_same_generator_same_continuation():
    backend = ToyBackend(load_spec("eos_trap"))
    a = backend.extend([ExtendRequest((1,), 3, np.random.default_rng(5))], Proposal(0.7))
    b = backend.extend([ExtendRequest((1,), 3, np.random.default_rng(5))], Proposal(0.7))
    assert a == b


def test_confidence_is_sum_p_log_p_of_each_row():
    backend = ToyBackend(load_spec("eos_trap"))
    want_first = 0.5 * math.log(0.5) + 0.2 * math.log(0.2) + 0.3 * math.log(0.3)
    want_second = 2 * 0.1 * math.log(0.1) + 0.8 * math.log(0.8)  # after token 0
    got = backend.confidence((), (0, 2))
    assert math.isclose(got[0], want_first) and math.isclose(got[1], want_second)
    assert backend.confidence((), ()) == ()
    assert ToyBackend(load_spec("no_early_eos")).confidence((), (0,))[0] <= 0  # zeros count as 0 log 0 = 0
