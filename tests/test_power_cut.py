"""power-cut (entropy-guided cuts) against exact enumeration: its kernel, its cut distribution, and the law of its real
program (traced: every choice enumerated) against its finite-step law."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

pytest.importorskip("hypothesis")

from exact_laws import algorithm_law, apply, as_chain, mh_kernel, power_target, staged_law, tv
from hypothesis import given, settings
from hypothesis import strategies as st
from support.statistical import assert_follows, draw
from support.strategies import toy_specs
from support.toy import load_spec
from support.tracing import assert_same_law, sampler_law, trace

from powersample import PowerSampleError, SamplerConfig, sample
from powersample.backends.toy import ToyBackend
from powersample.core.types import Continuation, Proposal
from powersample.samplers import power, registry, run_chains
from powersample.samplers.chain import Chain
from powersample.samplers.power_cut import EntropyCuts

CUT = SamplerConfig(method="power-cut", alpha=3.0, max_new_tokens=4, block_count=1, mcmc_steps=3)


def without_cut_term(alpha, chain, i, cont, cuts):
    """Mutant: the Hastings factor c(i | x') / c(i | x) dropped."""
    target, proposal, _ = power.log_ratio_terms(alpha, chain, i, cont, cuts)
    return target + proposal


def with_uniform_term(alpha, chain, i, cont, cuts):
    """Mutant: power's L / L' in place of c(i | x') / c(i | x), as if the cut were uniform."""
    return power.log_accept_ratio(alpha, chain, i, cont)


def assert_reversible(spec, alpha, tau, cap, cuts, rule=power.log_accept_ratio):
    pi = power_target(spec, alpha, cap)
    kernel = mh_kernel(spec, alpha, Proposal(tau), cap, rule, cuts)
    for x in pi:
        assert math.isclose(sum(kernel(x).values()), 1.0, abs_tol=1e-12)
        for y, k in kernel(x).items():
            assert math.isclose(pi[x] * k, pi[y] * kernel(y).get(x, 0.0), rel_tol=1e-9, abs_tol=1e-15), (x, y)
    assert tv(apply(kernel, pi), pi) < 1e-12  # so p^alpha is stationary


# --- the cut distribution -----------------------------------------------------------------------------------------


def test_cuts_follow_the_entropy_jumps_with_a_uniform_floor():
    cuts = EntropyCuts(beta=2.0, floor=0.2)
    entropy = [1.0, 3.0, 2.0, 2.5]  # jumps 1 (from certainty), 2, 0, 0.5: weights 1, 4, 0, 0.25 (sum 5.25)
    want = [0.2 / 4 + 0.8 * w / 5.25 for w in (1.0, 4.0, 0.0, 0.25)]
    assert np.allclose(np.exp(cuts.log_probs(entropy)), want, rtol=1e-12)
    assert math.isclose(float(np.exp(cuts.log_probs(entropy)).sum()), 1.0)
    assert np.allclose(np.exp(cuts.log_probs([0.0, 0.0, 0.0])), 1 / 3)  # no rise anywhere: uniform
    assert np.allclose(np.exp(EntropyCuts(4.0, 1.0).log_probs(entropy)), 1 / 4)  # floor 1: power's cut
    assert np.allclose(
        np.exp(EntropyCuts(0.0, 0.5).log_probs(entropy)), [0.125 + 0.5 / 3] * 2 + [0.125] + [0.125 + 0.5 / 3]
    )  # beta 0: every rise alike
    assert np.allclose(cuts.log_probs([0.7]), [0.0])
    falling = np.exp(cuts.log_probs([2.0, 1.0, 0.5]))  # only the first token "rises" (from certainty)
    assert np.allclose(falling, [0.2 / 3 + 0.8, 0.2 / 3, 0.2 / 3])


def test_the_floor_bounds_every_cut_probability():
    cuts = EntropyCuts(beta=4.0, floor=0.1)
    rng = np.random.default_rng(0)
    for _ in range(200):
        entropy = rng.exponential(size=int(rng.integers(1, 12))).tolist()
        for i, lc in enumerate(cuts.log_probs(entropy)):
            assert lc <= cuts.bound(i) + 1e-12


def test_picks_follow_the_cut_distribution():
    cuts, entropy = EntropyCuts(beta=1.0, floor=0.3), [0.5, 2.0, 1.0, 3.0, 0.1]
    picks = trace(lambda source: cuts.pick(5, entropy, source))
    assert_same_law(picks, dict(enumerate(np.exp(cuts.log_probs(entropy)).tolist())))


# --- the kernel: detailed balance by enumeration ------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec_name, alpha, tau",
    [("early_eos", 4.0, 0.25), ("eos_trap", 2.0, 0.7), ("eos_trap", 3.0, 1 / 3), ("no_early_eos", 2.0, 0.5)],
)
@pytest.mark.parametrize("beta, floor", [(4.0, 0.1), (1.0, 0.5), (0.0, 0.05)])
def test_detailed_balance(spec_name, alpha, tau, beta, floor):
    assert_reversible(load_spec(spec_name), alpha, tau, 4, EntropyCuts(beta, floor))


@settings(max_examples=25, deadline=None)
@given(
    toy_specs(),
    st.sampled_from([0.5, 1.0, 2.0, 4.0]),
    st.sampled_from([0.25, 0.5, 1.0]),
    st.integers(1, 3),
    st.sampled_from([0.0, 1.0, 4.0]),
    st.sampled_from([0.01, 0.1, 0.9]),
)
def test_detailed_balance_on_random_tables(spec, alpha, tau, cap, beta, floor):
    assert_reversible(spec, alpha, tau, cap, EntropyCuts(beta, floor))


@pytest.mark.parametrize("mutant", [without_cut_term, with_uniform_term])
def test_a_wrong_cut_correction_breaks_detailed_balance(mutant):
    with pytest.raises(AssertionError):
        assert_reversible(load_spec("eos_trap"), 3.0, 1 / 3, 4, EntropyCuts(4.0, 0.1), mutant)


# --- the sampler: the traced program against its finite-step law ----------------------------------------------


@pytest.mark.parametrize(
    "spec_name, config",
    [
        ("eos_trap", replace(CUT, max_new_tokens=3, mcmc_steps=2)),
        ("eos_trap", replace(CUT, block_size=2, mcmc_steps=1, cut_beta=1.0, cut_floor=0.3, top_k=2)),
        ("early_eos", replace(CUT, alpha=4.0, max_new_tokens=3, mcmc_steps=1)),
        ("no_early_eos", replace(CUT, alpha=2.0, max_new_tokens=3, block_size=1, mcmc_steps=1, top_k=2)),
        ("eos_trap", replace(CUT, proposal_temperature=0.25, max_new_tokens=3, mcmc_steps=2)),  # no floors
    ],
)
@pytest.mark.parametrize("speculate", [0, 2], ids=["", "speculate=2"])
def test_the_program_has_the_exact_law_of_the_algorithm(spec_name, config, speculate):
    config, spec = replace(config, speculate=speculate), load_spec(spec_name)
    assert_same_law(sampler_law(spec, config), algorithm_law(spec, config))


def test_many_steps_converge_to_p_alpha():
    spec, config = load_spec("eos_trap"), replace(CUT, mcmc_steps=150)
    assert tv(algorithm_law(spec, config), power_target(spec, 3.0, 4)) < 2e-3


def test_the_program_without_the_cut_correction_has_the_wrong_law(monkeypatch):
    """The mutant program has exactly the mutant kernel's law, 0.004 in TV from the algorithm's: far below what
    3,000 samples can tell (about 0.03), far above what exact laws can. Floors are off here: a floor derives its
    bound from the honest ratio."""
    spec, config = load_spec("early_eos"), replace(CUT, max_new_tokens=3, mcmc_steps=2)
    want = algorithm_law(spec, config)
    wrong = staged_law(
        spec,
        config,
        lambda cap: mh_kernel(spec, 3.0, registry.proposal(config), cap, without_cut_term, EntropyCuts(4.0, 0.1)),
    )
    honest = power.log_ratio_terms
    monkeypatch.setattr(power, "log_ratio_terms", lambda *a: (*honest(*a)[:2], 0.0))
    monkeypatch.setattr(power, "rejection_floor", lambda *a: None)
    have = sampler_law(spec, config)
    assert_same_law(have, wrong)
    assert tv(have, want) > 1e-3


@pytest.mark.statistical
def test_sampled_chains_follow_the_exact_law_of_the_algorithm():
    config = replace(CUT, mcmc_steps=2)
    assert_follows(draw("eos_trap", config), algorithm_law(load_spec("eos_trap"), config))


# --- plumbing -----------------------------------------------------------------------------------------------------


def test_floor_one_is_powers_law():
    spec = load_spec("early_eos")
    config = replace(CUT, cut_floor=1.0, alpha=4.0, mcmc_steps=4)
    assert tv(algorithm_law(spec, config), algorithm_law(spec, replace(config, method="power"))) < 1e-12


def test_the_ratio_terms_on_a_known_state():
    """x = (0, 1) with entropies (1, 3); the proposal from i = 1 is (1, 1) with entropies (3, 0.5): L = 2, L' = 3.
    Jumps 1, 2 in x and 1, 2, 0 in x', so at beta 4: c(1 | x) = 0.1/2 + 0.9 * 16/17, c(1 | x') = 0.1/3 + 0.9 * 16/17."""
    chain = as_chain(load_spec("eos_trap"), (0, 1), Proposal(1 / 3))
    chain.entropy[:] = [1.0, 3.0]
    cont = Continuation((1, 1), (-0.1, -0.2), (-0.05, -0.1), entropy=(3.0, 0.5))
    target, proposal, cut = power.log_ratio_terms(3.0, chain, 1, cont, EntropyCuts(4.0, 0.1))
    assert math.isclose(target, 3.0 * (-0.3 - chain.base_logp[1]))
    assert math.isclose(proposal, chain.proposal_logq[1] + 0.15)
    assert math.isclose(cut, math.log(0.1 / 3 + 0.9 * 16 / 17) - math.log(0.1 / 2 + 0.9 * 16 / 17))


def test_a_backend_without_entropies_is_a_one_line_error():
    class NoEntropy(ToyBackend):
        def extend(self, requests, proposal):
            return [replace(c, entropy=()) for c in super().extend(requests, proposal)]

    with pytest.raises(PowerSampleError, match="entropy"):
        sample(NoEntropy(load_spec("eos_trap")), "x", CUT)


def test_the_trace_records_every_step_with_its_cut_term():
    events = []
    backend = ToyBackend(load_spec("eos_trap"))
    chain = Chain(np.random.default_rng(1), 0, trace=events.append)
    [result] = run_chains(backend, (), replace(CUT, mcmc_steps=5), [chain])
    steps = [e for e in events if e["event"] == "step"]
    assert [e["event"] for e in events][:1] == ["extend"] and len(steps) == 5
    assert sum(e["accepted"] for e in steps) == result.accepted
    for e in steps:
        terms = list(e["terms"].values())
        if e["log_r"] is not None and None not in terms:
            assert math.isclose(e["log_r"], math.fsum(terms), abs_tol=1e-12)
        assert 0 <= e["cut"] < e["length"]
    assert steps[-1]["length_after"] == len(result.tokens)
    assert math.isclose(steps[-1]["logp"], math.fsum(result.token_logp))
