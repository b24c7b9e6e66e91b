"""power-mtm against exact enumeration: the multiple-try kernel keeps p^alpha for any number of tries, the real
program (traced: every choice enumerated) has the algorithm's exact finite-step law, one try is `power`, and all tries
share one engine call."""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("hypothesis")

from exact_laws import algorithm_law, apply, mh_kernel, mtm_algorithm_law, mtm_kernel, power_target, tv
from hypothesis import given, settings
from hypothesis import strategies as st
from support.statistical import assert_follows, draw
from support.strategies import toy_specs
from support.toy import SPECS, load_spec
from support.tracing import assert_same_law, sampler_law

from powersample import SamplerConfig, sample
from powersample.backends.toy import ToyBackend
from powersample.cli import main
from powersample.core.numerics import logsumexp
from powersample.core.types import Proposal
from powersample.samplers import mtm, registry

# --- the kernel: detailed balance for p^alpha, whatever the number of tries ------------------------------------


def assert_detailed_balance(kernel, pi, rel_tol=1e-9):
    for x in pi:
        row = kernel(x)
        assert math.isclose(math.fsum(row.values()), 1.0, abs_tol=1e-12)
        for y, k in row.items():
            assert math.isclose(pi[x] * k, pi[y] * kernel(y).get(x, 0.0), rel_tol=rel_tol, abs_tol=1e-15), (x, y)
    assert tv(apply(kernel, pi), pi) < 1e-12  # so pi is stationary


@pytest.mark.parametrize("tries", [1, 2, 3])
@pytest.mark.parametrize(
    "spec_name, alpha, tau",
    [("early_eos", 4.0, 0.25), ("eos_trap", 2.0, 0.7), ("eos_trap", 3.0, 1.5), ("no_early_eos", 3.0, 1 / 3)],
)
def test_detailed_balance_for_any_number_of_tries(spec_name, alpha, tau, tries):
    spec, cap = load_spec(spec_name), 3
    assert_detailed_balance(mtm_kernel(spec, alpha, Proposal(tau), cap, tries), power_target(spec, alpha, cap))


@settings(max_examples=15, deadline=None)
@given(
    toy_specs(),
    st.sampled_from([0.5, 2.0, 4.0]),
    st.sampled_from([0.25, 1.0, 2.0]),
    st.integers(1, 3),
    st.integers(2, 3),
)
def test_detailed_balance_on_random_tables(spec, alpha, tau, cap, tries):
    pi = power_target(spec, alpha, cap)
    assert_detailed_balance(mtm_kernel(spec, alpha, Proposal(tau), cap, tries), pi, rel_tol=1e-8)


def test_one_try_is_powers_kernel():
    spec, proposal, cap = load_spec("eos_trap"), Proposal(1 / 3), 4
    power, mtm = mh_kernel(spec, 3.0, proposal, cap), mtm_kernel(spec, 3.0, proposal, cap, 1)
    for x in power_target(spec, 3.0, cap):
        assert tv(power(x), mtm(x)) < 1e-12


def test_dropping_the_index_term_breaks_the_target():
    """Mutation check: the 1/L factor of the index choice is needed once EOS makes lengths differ."""

    def no_index_term(alpha, i, base_logp, proposal_logq):
        return alpha * math.fsum(base_logp) - math.fsum(proposal_logq)

    spec, cap = load_spec("eos_trap"), 4
    pi = power_target(spec, 3.0, cap)
    for tries in (1, 3):
        assert tv(apply(mtm_kernel(spec, 3.0, Proposal(1 / 3), cap, tries, no_index_term), pi), pi) > 1e-3


# --- the algorithm, step for step: the traced program vs the exact finite-step law --------------------------------

MTM_CASES = [  # (spec, knobs, tries, speculate); top-k 2 keeps the tuples of tries few enough to enumerate
    ("early_eos", {"alpha": 4.0, "max_new_tokens": 2, "block_count": 1, "mcmc_steps": 2}, 1, 0),
    ("early_eos", {"alpha": 4.0, "max_new_tokens": 2, "block_count": 1, "mcmc_steps": 2}, 2, 0),
    ("eos_trap", {"alpha": 3.0, "max_new_tokens": 3, "block_count": 1, "mcmc_steps": 1, "top_k": 2}, 1, 0),
    ("eos_trap", {"alpha": 3.0, "max_new_tokens": 3, "block_count": 1, "mcmc_steps": 1, "top_k": 2}, 2, 2),
    ("eos_trap", {"alpha": 3.0, "max_new_tokens": 3, "block_count": 1, "mcmc_steps": 1, "top_k": 2}, 3, 0),
    ("eos_trap", {"alpha": 3.0, "max_new_tokens": 4, "block_size": 2, "mcmc_steps": 1, "top_k": 2}, 2, 0),
    ("eos_trap", {"alpha": 3.0, "max_new_tokens": 4, "block_size": 2, "mcmc_steps": 1, "top_k": 2}, 2, 2),
]


@pytest.mark.parametrize("spec_name, kwargs, tries, speculate", MTM_CASES)
def test_the_program_has_the_exact_law_of_the_algorithm(spec_name, kwargs, tries, speculate):
    config = SamplerConfig(method="power-mtm", tries=tries, speculate=speculate, **kwargs)
    spec = load_spec(spec_name)
    assert_same_law(sampler_law(spec, config), mtm_algorithm_law(spec, config))


def without_backward_weights(log_w, j, log_w_current):
    """Mutant: plain MH with the picked try, w(y_J) / w(x), as if the unpicked tries did not count."""
    return log_w[j] - log_w_current


def without_current_state(log_w, j, log_w_current):
    """Mutant: the references without the current state, sum_j w(y_j) / (sum_j w(y_j) - w(y_J))."""
    return float(logsumexp(log_w) - logsumexp([lw for m, lw in enumerate(log_w) if m != j]))


@pytest.mark.parametrize("mutant", [without_backward_weights, without_current_state])
def test_a_wrong_acceptance_fails_the_exact_law(mutant, monkeypatch):
    spec_name, kwargs, tries, _ = MTM_CASES[1]
    config, spec = SamplerConfig(method="power-mtm", tries=tries, **kwargs), load_spec(spec_name)
    want = mtm_algorithm_law(spec, config)
    monkeypatch.setattr(mtm, "log_accept_ratio", mutant)
    assert tv(sampler_law(spec, config), want) > 0.01


def test_a_pick_not_by_weight_fails_the_exact_law(monkeypatch):
    """Mutant: the try is picked uniformly, not with probability w_J / sum w."""
    spec_name, kwargs, tries, _ = MTM_CASES[1]
    config, spec = SamplerConfig(method="power-mtm", tries=tries, **kwargs), load_spec(spec_name)
    want = mtm_algorithm_law(spec, config)
    monkeypatch.setattr(mtm, "pick", lambda log_w, rng: mtm.draw(np.zeros(len(log_w)), rng))
    assert tv(sampler_law(spec, config), want) > 0.01


def test_more_tries_mix_faster_and_converge_to_p_alpha():
    spec = load_spec("eos_trap")
    want = power_target(spec, 3.0, 4)
    gaps = [
        tv(
            mtm_algorithm_law(
                spec,
                SamplerConfig(method="power-mtm", alpha=3.0, max_new_tokens=4, block_count=1, mcmc_steps=3, tries=k),
            ),
            want,
        )
        for k in (1, 2, 3)
    ]
    assert gaps[0] > gaps[1] > gaps[2]
    long = SamplerConfig(method="power-mtm", alpha=3.0, max_new_tokens=4, block_count=1, mcmc_steps=40, tries=3)
    assert tv(mtm_algorithm_law(spec, long), want) < 2e-3


def test_one_try_is_power_law_and_draw_for_draw():
    kwargs = {"alpha": 3.0, "max_new_tokens": 4, "block_size": 2, "mcmc_steps": 3}
    spec = load_spec("eos_trap")
    mtm_config = SamplerConfig(method="power-mtm", tries=1, **kwargs)
    assert tv(mtm_algorithm_law(spec, mtm_config), algorithm_law(spec, SamplerConfig(**kwargs))) < 1e-12
    a = sample(ToyBackend(spec), "p", mtm_config, seed=4, num_samples=200)
    b = sample(ToyBackend(spec), "p", SamplerConfig(**kwargs), seed=4, num_samples=200)
    trace = lambda records: [(r.tokens, r.tokens_generated, r.proposals, r.accepted) for r in records]  # noqa: E731
    assert trace(a) == trace(b)


@pytest.mark.statistical
def test_sampled_chains_follow_the_exact_law_of_the_algorithm():
    config = SamplerConfig(method="power-mtm", tries=3, alpha=3.0, max_new_tokens=4, block_size=2, mcmc_steps=2)
    assert_follows(draw("eos_trap", config), mtm_algorithm_law(load_spec("eos_trap"), config))


# --- counters, batching, determinism, bad input -----------------------------------------------------------------


def test_all_tries_of_all_chains_share_one_call_per_round():
    backend = ToyBackend(load_spec("no_early_eos"))  # no early EOS: every chain runs every stage
    config = SamplerConfig(method="power-mtm", max_new_tokens=6, block_size=2, mcmc_steps=4, tries=5)
    records = sample(backend, "p", config, num_samples=7)
    assert backend.stats.extend_calls == 3 * (1 + 4)  # 3 stages x (extension + 4 MH rounds), whatever tries and chains
    for r in records:
        assert r.proposals == 3 * 4 and 0 <= r.accepted <= r.proposals
        assert r.tokens_generated >= 6 + 3 * 4 * 5  # the extensions, and at least a token per try


def test_counters_and_record_shape():
    backend = ToyBackend(load_spec("eos_trap"))
    config = SamplerConfig(method="power-mtm", max_new_tokens=4, block_size=2, mcmc_steps=3, tries=3)
    for r in sample(backend, "p", config, seed=3, num_samples=30):
        assert r.method == "power-mtm" and r.config == registry.resolved(config)
        assert r.token_logp == backend.score((), r.tokens)
        assert r.tokens_generated >= len(r.tokens) + r.proposals * 3  # every try counts, one token at least
        assert "particles" not in r.to_dict()


def test_same_seed_same_output_and_chains_do_not_depend_on_batch():
    config = SamplerConfig(method="power-mtm", max_new_tokens=4, block_size=2, mcmc_steps=3, tries=3)
    backend = ToyBackend(load_spec("eos_trap"))
    trace = lambda records: [(r.tokens, r.tokens_generated, r.accepted) for r in records]  # noqa: E731
    eight = trace(sample(backend, "p", config, seed=7, num_samples=8))
    assert eight == trace(sample(backend, "p", config, seed=7, num_samples=8))
    assert eight[:3] == trace(sample(backend, "p", config, seed=7, num_samples=3))


def test_continuous_schedule_gives_the_same_samples():
    from support.toy import ContinuousToy

    spec = load_spec("early_eos")
    config = SamplerConfig(method="power-mtm", max_new_tokens=4, block_size=2, mcmc_steps=2, tries=3)
    lockstep = sample(ToyBackend(spec), "p", config, seed=11, num_samples=12)
    continuous = sample(ContinuousToy(spec), "p", config, seed=11, num_samples=12)
    assert [r.to_dict() | {"wall_seconds": 0} for r in lockstep] == [
        r.to_dict() | {"wall_seconds": 0} for r in continuous
    ]


@pytest.mark.parametrize("flag, value", [("--tries", "0"), ("--tries", "-3")])
def test_bad_tries_is_a_one_line_error(flag, value, capsys):
    toy = ["--backend", "toy", "--toy-spec", str(SPECS / "early_eos.json"), "--quiet"]
    code = main(["sample", "x", *toy, "--method", "power-mtm", flag, value])
    err = capsys.readouterr().err
    assert code == 2 and "tries must be >= 1" in err and len(err.strip().splitlines()) == 1


def test_cli_runs_power_mtm(capsys):
    toy = ["--backend", "toy", "--toy-spec", str(SPECS / "eos_trap.json"), "--quiet"]
    assert main(["sample", "x", *toy, "--method", "power-mtm", "--tries", "3", "--max-new-tokens", "3"]) == 0
    assert "method=power-mtm" in capsys.readouterr().out
