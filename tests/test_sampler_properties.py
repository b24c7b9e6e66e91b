"""Properties of the samplers beyond their laws: detailed balance on random tables, determinism, counters."""

from __future__ import annotations

import math

import numpy as np
import pytest
from exact_laws import apply, mh_kernel, power_target, tv
from support.toy import ContinuousToy, load_spec

pytest.importorskip("hypothesis")

from hypothesis import given, settings
from hypothesis import strategies as st
from support.strategies import toy_specs

from powersample import PowerSampleError, SamplerConfig, sample
from powersample.backends.toy import ToyBackend
from powersample.core.types import Continuation, Proposal
from powersample.samplers import registry
from powersample.samplers.chain import Chain
from powersample.samplers.power import log_accept_ratio


@settings(max_examples=25, deadline=None)
@given(toy_specs(), st.sampled_from([0.5, 1.0, 2.0, 4.0]), st.sampled_from([0.25, 0.5, 1.0, 2.0]), st.integers(1, 3))
def test_detailed_balance_on_random_tables(spec, alpha, tau, cap):
    pi = power_target(spec, alpha, cap)
    kernel = mh_kernel(spec, alpha, Proposal(tau), cap)
    for x in pi:
        for y, k in kernel(x).items():
            assert math.isclose(pi[x] * k, pi[y] * kernel(y).get(x, 0.0), rel_tol=1e-8, abs_tol=1e-14)
    assert tv(apply(kernel, pi), pi) < 1e-10


def test_max_swap_accepts_only_strict_increases():
    chain = Chain(
        rng=np.random.default_rng(0), slot=0, tokens=[0, 1], base_logp=[-1.0, -2.0], proposal_logq=[-1.0, -1.0]
    )
    up = Continuation((2,), (-1.5,), (-9.0,))
    same = Continuation((0,), (-2.0,), (-0.1,))
    down = Continuation((0, 0), (-1.0, -1.5), (-0.1, -0.1))
    assert log_accept_ratio(math.inf, chain, 1, up) == 0.0
    assert log_accept_ratio(math.inf, chain, 1, same) == -math.inf
    assert log_accept_ratio(math.inf, chain, 1, down) == -math.inf


@pytest.mark.parametrize("alpha", [math.inf, 4.0])
def test_proposing_the_current_suffix_again_is_the_current_state(alpha):
    """Its tokens' log p from another forward shape may differ in the last bits (hf fp32: ~1e-6): no step may turn on
    that. max-swap sees no increase; MH's ratio is exactly 1."""
    chain = Chain(
        rng=np.random.default_rng(0),
        slot=0,
        tokens=[0, 1, 1],
        base_logp=[-1.0, -2.0, -0.5],
        proposal_logq=[-0.7, -1.1, -0.2],
    )
    again = Continuation((1, 1), (-2.0 + 3e-6, -0.5 + 1e-6), (-1.1 - 2e-6, -0.2))
    assert log_accept_ratio(alpha, chain, 1, again) == (-math.inf if math.isinf(alpha) else 0.0)


def test_accept_ratio_counts_both_suffixes_in_full_and_the_index_choice():
    chain = Chain(
        rng=np.random.default_rng(0),
        slot=0,
        tokens=[0, 1, 1],
        base_logp=[-1.0, -2.0, -0.5],
        proposal_logq=[-0.7, -1.1, -0.2],
    )
    prop = Continuation((2,), (-0.3,), (-0.4,))  # EOS right away: x' is shorter
    want = 4.0 * (-0.3 - (-2.5)) + (-1.3 - (-0.4)) + math.log(3) - math.log(2)
    assert math.isclose(log_accept_ratio(4.0, chain, 1, prop), want, rel_tol=1e-12)


CONFIGS = [
    SamplerConfig(alpha=4.0, max_new_tokens=4, block_size=2, mcmc_steps=3),
    SamplerConfig(method="max-swap", max_new_tokens=4, block_count=2, mcmc_steps=3),
    SamplerConfig(method="base", max_new_tokens=4),
    SamplerConfig(method="low-temp", max_new_tokens=4),
    SamplerConfig(method="power-mtm", max_new_tokens=4, block_size=2, mcmc_steps=2, tries=3),
    SamplerConfig(method="power-smc", max_new_tokens=4, block_size=2, particles=6, ess_threshold=0.9),
    SamplerConfig(method="power-rollout", max_new_tokens=4, candidates=2, rollouts=3),
    SamplerConfig(method="power-rollout", max_new_tokens=4, block_size=2, candidates=2, rollouts=2),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.method}-{c.block_size}")
def test_same_seed_same_output_and_chains_do_not_depend_on_batch(config):
    backend = ToyBackend(load_spec("eos_trap"))
    eight = sample(backend, "p", config, seed=7, num_samples=8)
    again = sample(backend, "p", config, seed=7, num_samples=8)
    three = sample(backend, "p", config, seed=7, num_samples=3)
    trace = lambda records: [(r.tokens, r.tokens_generated, r.accepted) for r in records]  # noqa: E731
    assert trace(eight) == trace(again)
    assert trace(eight[:3]) == trace(three)
    assert trace(eight) != trace(sample(backend, "p", config, seed=8, num_samples=8))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.method}-{c.block_size}")
def test_record_fields_are_consistent(config):
    backend = ToyBackend(load_spec("eos_trap"))
    for r in sample(backend, "p", config, seed=3, num_samples=20):
        assert r.method == config.method and r.config == registry.resolved(config)
        assert 1 <= len(r.tokens) <= 4
        assert r.finish_reason == ("eos" if r.tokens[-1] == 2 else "length")
        assert r.finish_reason == "eos" or len(r.tokens) == 4
        assert r.token_logp == backend.score((), r.tokens)
        assert math.isclose(r.logp, sum(r.token_logp))
        assert r.tokens_generated >= len(r.tokens) and 0 <= r.accepted <= r.proposals
        if config.method in ("base", "low-temp"):
            assert r.proposals == 0 and r.tokens_generated == len(r.tokens)
        d = r.to_dict()
        assert isinstance(d["tokens"], list) and "acceptance_rate" in d


def test_batched_chains_share_one_backend_call_per_round():
    backend = ToyBackend(load_spec("no_early_eos"))  # no early EOS: every chain runs every stage
    config = SamplerConfig(max_new_tokens=6, block_size=2, mcmc_steps=4)
    sample(backend, "p", config, num_samples=16)
    assert backend.stats.extend_calls == 3 * (
        1 + 4
    )  # 3 stages x (extension + 4 MH rounds), whatever the number of chains


def test_finished_chains_stop_costing():
    backend = ToyBackend(load_spec("eos_trap"))
    config = SamplerConfig(max_new_tokens=6, block_size=1, mcmc_steps=2)
    records = sample(backend, "p", config, num_samples=50, seed=1)
    assert all(r.proposals % 2 == 0 and r.proposals <= 6 * 2 for r in records)  # 2 per stage run, 6 stages at most
    # a chain stops after the stage whose final state is complete: most complete within 2 stages here
    assert sum(r.proposals for r in records) < 0.5 * 50 * 6 * 2


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"alpha": 0}, "alpha"),
        ({"alpha": -1.0}, "alpha"),
        ({"alpha": float("nan")}, "alpha"),
        ({"block_size": 0}, "block_size"),
        ({"block_size": 300, "max_new_tokens": 256}, "block_size"),
        ({"mcmc_steps": -1}, "mcmc_steps"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"proposal_temperature": 0.0}, "proposal_temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"method": "greedy"}, "method"),
        ({"block_count": 0}, "block_count"),
    ],
)
def test_bad_configs_are_one_line_errors(kwargs, field):
    """SamplerConfig refuses bad numbers at construction; the registry refuses a method it does not have."""
    with pytest.raises(PowerSampleError, match=field) as err:
        registry.check(SamplerConfig(**kwargs))
    assert "\n" not in str(err.value)


def test_an_unknown_method_is_refused_before_any_engine_call():
    backend = ToyBackend(load_spec("eos_trap"))
    with pytest.raises(PowerSampleError, match="unknown method 'greedy'; choose one of power, max-swap"):
        sample(backend, "x", SamplerConfig(method="greedy"))
    assert backend.stats.extend_calls == 0


def test_stage_caps():
    assert SamplerConfig(max_new_tokens=10, block_size=4).stage_caps() == [4, 8, 10]
    assert SamplerConfig(max_new_tokens=3072).block == 192  # the paper's B = T / 16
    assert SamplerConfig(max_new_tokens=10, block_count=16).stage_caps() == list(range(1, 11))


def test_empty_prompt_and_bad_counts_are_errors():
    backend = ToyBackend(load_spec("eos_trap"))
    for prompt in ("", "   \n"):
        with pytest.raises(PowerSampleError, match="empty"):
            sample(backend, prompt)
    with pytest.raises(PowerSampleError, match="num_samples"):
        sample(backend, "p", num_samples=0)
    with pytest.raises(PowerSampleError, match="seed"):
        sample(backend, "p", seed=-1)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.method}-{c.block_size}")
@pytest.mark.parametrize("spec_name", ["eos_trap", "early_eos", "no_early_eos"])
def test_continuous_schedule_gives_the_same_samples_as_lockstep(config, spec_name):
    spec = load_spec(spec_name)
    lockstep = sample(ToyBackend(spec), "p", config, seed=11, num_samples=12)
    continuous = sample(ContinuousToy(spec), "p", config, seed=11, num_samples=12)
    assert [r.to_dict() | {"wall_seconds": 0} for r in lockstep] == [
        r.to_dict() | {"wall_seconds": 0} for r in continuous
    ]


@pytest.mark.statistical
def test_continuous_schedule_follows_the_exact_law():
    from exact_laws import algorithm_law, empirical, tv_null_quantile

    spec = load_spec("early_eos")
    config = SamplerConfig(alpha=2.0, max_new_tokens=4, block_size=2, mcmc_steps=2)
    samples = [r.tokens for r in sample(ContinuousToy(spec), "p", config, seed=2, num_samples=3000)]
    law = algorithm_law(spec, config)
    assert tv(empirical(samples), law) <= tv_null_quantile(law, len(samples))
