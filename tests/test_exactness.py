"""Samplers against exact enumeration on toy models: have (samples) vs want (exact law)."""

from __future__ import annotations

import functools
import math
from dataclasses import replace

import pytest
from support.toy import load_spec
from exact_laws import (
    algorithm_law,
    apply,
    empirical,
    mh_kernel,
    power_target,
    sequence_law,
    tv,
    tv_null_quantile,
)

from powersample import SamplerConfig, sample
from powersample.backends.toy import ToyBackend, ToySpec
from powersample.core.types import Floor, Proposal
from powersample.samplers import power
from powersample.samplers.chain import Chain

N = 3000  # samples per test; each is an independent chain


def draw(spec_name: str, config: SamplerConfig, n: int = N, seed: int = 0) -> list[tuple[int, ...]]:
    backend = ToyBackend(load_spec(spec_name))
    return [r.tokens for r in sample(backend, "ignored", config, seed=seed, num_samples=n)]


def assert_follows(samples: list[tuple[int, ...]], law: dict) -> None:
    """TV(empirical, law) must be within the 99.9% quantile of the multinomial null for len(samples) draws."""
    have, bound = tv(empirical(samples), law), tv_null_quantile(law, len(samples))
    assert set(empirical(samples)) <= {k for k, v in law.items() if v > 0}, "a sample outside the support"
    assert have <= bound, f"TV {have:.4f} > null 99.9% quantile {bound:.4f}"


# --- the full algorithm, step for step: finite MH steps, stages, early stop at EOS ---------------------------


@pytest.mark.parametrize(
    "spec_name, config",
    [
        ("early_eos", SamplerConfig(alpha=4.0, max_new_tokens=3, block_count=1, mcmc_steps=3)),
        ("early_eos", SamplerConfig(alpha=2.0, max_new_tokens=4, block_size=2, mcmc_steps=2)),
        ("eos_trap", SamplerConfig(alpha=3.0, max_new_tokens=4, block_count=1, mcmc_steps=4)),
        ("eos_trap", SamplerConfig(alpha=3.0, max_new_tokens=4, block_size=1, mcmc_steps=2)),
        ("no_early_eos", SamplerConfig(alpha=4.0, max_new_tokens=3, block_size=1, mcmc_steps=2)),
        ("eos_trap", SamplerConfig(method="max-swap", alpha=2.0, max_new_tokens=3, block_count=1, mcmc_steps=2)),
        ("eos_trap", SamplerConfig(alpha=2.0, max_new_tokens=3, block_count=1, mcmc_steps=3, top_k=2)),
        ("early_eos", SamplerConfig(alpha=2.0, max_new_tokens=3, block_count=1, mcmc_steps=3, top_p=0.8)),
        ("eos_trap", SamplerConfig(alpha=4.0, max_new_tokens=4, block_count=2, mcmc_steps=0)),
    ],
)
@pytest.mark.parametrize("speculate", [0, 2], ids=["", "speculate=2"])
def test_output_follows_exact_law_of_the_algorithm(spec_name, config, speculate):
    """With speculative proposals on, the law is the same: a drafted proposal is exactly q's."""
    config = replace(config, speculate=speculate)
    assert_follows(draw(spec_name, config), algorithm_law(load_spec(spec_name), config))


# --- the target: p^alpha ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec_name, alpha, max_len, steps",
    [("early_eos", 4.0, 3, 150), ("eos_trap", 3.0, 4, 60), ("eos_trap", 0.5, 3, 30), ("no_early_eos", 2.0, 3, 30)],
)
def test_one_block_converges_to_p_alpha(spec_name, alpha, max_len, steps):
    """Early EOS included: complete sequences of every length count with their full probability."""
    spec = load_spec(spec_name)
    config = SamplerConfig(alpha=alpha, max_new_tokens=max_len, block_count=1, mcmc_steps=steps)
    want = power_target(spec, alpha, max_len)
    assert tv(algorithm_law(spec, config), want) < 2e-3  # enough steps: the chain has mixed
    assert_follows(draw(spec_name, config), want)


def test_several_blocks_converge_to_p_alpha_when_eos_cannot_come_early():
    spec = load_spec("no_early_eos")
    config = SamplerConfig(alpha=3.0, max_new_tokens=4, block_size=2, mcmc_steps=80)
    want = power_target(spec, 3.0, 4)
    assert tv(algorithm_law(spec, config), want) < 2e-3
    assert_follows(draw("no_early_eos", config), want)


# --- reductions -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec_name", ["early_eos", "eos_trap"])
def test_alpha_one_with_tau_one_reproduces_base_sampling(spec_name):
    config = SamplerConfig(alpha=1.0, proposal_temperature=1.0, max_new_tokens=3, block_count=1, mcmc_steps=5)
    want = sequence_law(load_spec(spec_name), Proposal(1.0), 3)
    assert tv(algorithm_law(load_spec(spec_name), config), want) < 1e-12
    assert_follows(draw(spec_name, config), want)


@pytest.mark.parametrize("method, tau", [("base", 1.0), ("low-temp", 0.25)])
def test_plain_methods_follow_their_exact_laws(method, tau):
    config = SamplerConfig(method=method, alpha=4.0, max_new_tokens=4)
    want = sequence_law(load_spec("eos_trap"), Proposal(tau), 4)
    assert_follows(draw("eos_trap", config), want)


def test_low_temperature_is_not_the_power_distribution():
    """The paper's point: token-wise tempering != p^alpha over sequences. Our toy spec shows it plainly."""
    spec = load_spec("eos_trap")
    assert tv(sequence_law(spec, Proposal(1 / 3.0), 4), power_target(spec, 3.0, 4)) > 0.1


# --- the MH kernel itself ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec_name, alpha, tau", [("early_eos", 4.0, 0.25), ("eos_trap", 2.0, 0.7), ("eos_trap", 3.0, 1.5)])
def test_detailed_balance(spec_name, alpha, tau):
    spec, cap = load_spec(spec_name), 4
    pi = power_target(spec, alpha, cap)
    kernel = mh_kernel(spec, alpha, Proposal(tau), cap)
    rows = {x: kernel(x) for x in pi}
    for x in pi:
        assert math.isclose(sum(rows[x].values()), 1.0, abs_tol=1e-12)
        for y, k in rows[x].items():
            assert math.isclose(pi[x] * k, pi[y] * rows[y].get(x, 0.0), rel_tol=1e-9, abs_tol=1e-15), (x, y)
    assert tv(apply(kernel, pi), pi) < 1e-12  # so pi is stationary


def test_the_papers_acceptance_rule_is_biased_when_eos_comes_early():
    """The public code caps proposals at the current length and cuts the current suffix's sums to the proposal's
    length (no index correction). Its stationary law is far from p^alpha here; ours is p^alpha to 1e-12."""
    from powersample.samplers.power import log_accept_ratio

    spec, alpha, tau, cap = load_spec("eos_trap"), 3.0, 1 / 3.0, 4
    pi = power_target(spec, alpha, cap)
    ours = mh_kernel(spec, alpha, Proposal(tau), cap, log_accept_ratio)
    papers = _papers_kernel(spec, alpha, Proposal(tau), cap)
    law_ours, law_papers = dict(pi), dict(pi)
    for _ in range(200):
        law_ours, law_papers = apply(ours, law_ours), apply(papers, law_papers)
    assert tv(law_ours, pi) < 1e-12
    assert tv(law_papers, pi) > 0.05


def _papers_kernel(spec, alpha, proposal, cap):
    """The paper's code: proposals capped at len(x), current sums cut to the proposal's length, no log L term."""
    from exact_laws import _continuation, as_chain, continuations

    @functools.cache
    def kernel(x):
        chain, out = as_chain(spec, x, proposal), {}
        for i in range(len(x)):
            for suffix, logq in continuations(spec, proposal, x[:i], len(x)):
                cont = _continuation(spec, x[:i], suffix, proposal)
                n = len(suffix)
                cur_p, cur_q = sum(chain.base_logp[i : i + n]), sum(chain.proposal_logq[i : i + n])
                log_r = alpha * (sum(cont.base_logp) - cur_p) + cur_q - sum(cont.proposal_logq)
                y = x[:i] + suffix
                out[y] = out.get(y, 0.0) + math.exp(logq) / len(x) * min(1.0, math.exp(min(0.0, log_r)))
        out[x] = 1.0 - sum(v for k, v in out.items() if k != x)
        return out

    return kernel


# --- exact early rejection ----------------------------------------------------------------------------------------

# After "a" the model is sure (the state "a a a ..." scores high); after "b" it is not, so a proposal that draws a
# "b" falls below the current state's score within a token or two, and is cut short there.
FLOOR_SPEC = ToySpec.from_dict({"vocab": ["a", "b", "<eos>"], "eos_id": 2, "default": [0.3, 0.4, 0.3],
                                "next": {",".join(["0"] * k): [0.9, 0.05, 0.05] for k in range(1, 6)}
                                | {"": [0.5, 0.45, 0.05]}})  # fmt: skip
FLOORED = SamplerConfig(alpha=2.0, max_new_tokens=5, block_count=1, mcmc_steps=4)


def floored_samples(n: int = N) -> tuple[list[tuple[int, ...]], int]:
    """Samples of FLOORED on FLOOR_SPEC, and the tokens they drew."""
    records = sample(ToyBackend(FLOOR_SPEC), "ignored", FLOORED, seed=1, num_samples=n)
    return [r.tokens for r in records], sum(r.tokens_generated for r in records)


def test_early_rejection_draws_fewer_tokens_for_the_same_law(monkeypatch):
    """Floors are on in every finite-step law test above (each has alpha >= 1/tau >= 1, or is max-swap); here they
    cut proposals short, the law stays exact, and a tau where the score could rise gets no floor."""
    samples, with_floors = floored_samples()
    assert_follows(samples, algorithm_law(FLOOR_SPEC, FLOORED))
    monkeypatch.setattr(power, "rejection_floor", lambda *args: None)
    assert with_floors < 0.97 * floored_samples()[1]
    monkeypatch.undo()
    chain = Chain(None, 0, tokens=[0, 1], base_logp=[-1.0, -2.0], proposal_logq=[-0.5, -0.5])
    floor = power.rejection_floor
    assert floor(replace(FLOORED, proposal_temperature=0.2), 2.0, chain, 0, -1.0) is None  # alpha 2 < 1/tau = 5
    assert floor(replace(FLOORED, proposal_temperature=1.5), 2.0, chain, 0, -1.0) is None  # 1/tau < 1
    assert floor(FLOORED, 2.0, chain, 1, -1.0) == Floor(2 * -2.0 + 0.5 - math.log(2) - 1.0, 2.0, 1)
    assert floor(FLOORED, math.inf, chain, 0, -1.0) == Floor(-3.0, math.inf)  # max-swap: beat log p, no u


def floor_without_u(config, alpha, chain, i, log_u, cuts=power.UNIFORM):
    """Mutant: forgets log u, so it cuts every proposal whose score falls below the current state's."""
    floor = HONEST_FLOOR(config, alpha, chain, i, log_u, cuts)
    return floor and replace(floor, least=floor.least - log_u)


def floor_of_log_p(config, alpha, chain, i, log_u, cuts=power.UNIFORM):
    """Mutant: scores a proposal by its log p alone (the - log q term dropped), which falls faster than its score."""
    floor = HONEST_FLOOR(config, alpha, chain, i, log_u, cuts)
    return floor and replace(floor, weight=math.inf, least=floor.least / alpha)


HONEST_FLOOR = power.rejection_floor


@pytest.mark.parametrize("mutant", [floor_without_u, floor_of_log_p])
def test_a_wrong_floor_fails_the_exact_law(mutant, monkeypatch):
    want = algorithm_law(FLOOR_SPEC, FLOORED)
    monkeypatch.setattr(power, "rejection_floor", mutant)
    samples, _ = floored_samples()
    assert tv(empirical(samples), want) > tv_null_quantile(want, len(samples))
