"""power and max-swap against exact enumeration on toy models, with no sampling noise.

Each real program (samplers.run_chains, the driver, the toy backend) is traced: every random choice is
enumerated (tests/support/tracing.py). Its law is compared with the algorithm's exact law (tests/exact_laws.py, built
from the code's kernels) and with p^alpha, to 1e-12 in TV. The statistical smoke tests at the end draw real chains.
"""

from __future__ import annotations

import functools
import math
from dataclasses import replace

import pytest
from exact_laws import (
    algorithm_law,
    apply,
    mh_kernel,
    power_target,
    sequence_law,
    tv,
)
from support.statistical import assert_follows, draw
from support.toy import load_spec
from support.tracing import Merge, TracingBackend, assert_same_law, chain_state, program_law, sampler_law

from powersample import SamplerConfig
from powersample.backends.toy import ToySpec
from powersample.core.types import Floor, Proposal
from powersample.samplers import power
from powersample.samplers.chain import Chain

# --- the full algorithm, step for step: finite MH steps, stages, early stop at EOS ---------------------------

ALGORITHM_CASES = [
    ("early_eos", SamplerConfig(alpha=4.0, max_new_tokens=3, block_count=1, mcmc_steps=2)),
    ("eos_trap", SamplerConfig(alpha=3.0, max_new_tokens=3, block_size=1, mcmc_steps=1)),  # a stage per token
    ("no_early_eos", SamplerConfig(alpha=2.0, max_new_tokens=4, block_size=2, mcmc_steps=1, top_k=2)),
    ("eos_trap", SamplerConfig(method="max-swap", alpha=2.0, max_new_tokens=3, block_count=1, mcmc_steps=2)),
    ("eos_trap", SamplerConfig(alpha=2.0, max_new_tokens=3, block_count=1, mcmc_steps=3, top_k=2)),
    ("early_eos", SamplerConfig(alpha=2.0, max_new_tokens=3, block_count=1, mcmc_steps=3, top_p=0.8)),
    ("early_eos", SamplerConfig(alpha=2.0, max_new_tokens=3, block_count=1, mcmc_steps=2, proposal_temperature=0.25)),
    ("eos_trap", SamplerConfig(alpha=4.0, max_new_tokens=4, block_count=2, mcmc_steps=0)),
]  # every case but the tau = 0.25 one (alpha < 1/tau) cuts its proposals at floors: the early rejection is traced


@pytest.mark.parametrize("spec_name, config", ALGORITHM_CASES)
@pytest.mark.parametrize("speculate", [0, 2], ids=["", "speculate=2"])
def test_the_program_has_the_exact_law_of_the_algorithm(spec_name, config, speculate):
    """With speculative proposals on, the law is the same: a drafted proposal is exactly q's."""
    config = replace(config, speculate=speculate)
    spec = load_spec(spec_name)
    assert_same_law(sampler_law(spec, config), algorithm_law(spec, config))


# --- the target: p^alpha ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec_name, alpha, max_len, steps",
    [("early_eos", 4.0, 3, 150), ("eos_trap", 3.0, 4, 60), ("eos_trap", 0.5, 3, 30), ("no_early_eos", 2.0, 3, 30)],
)
def test_one_block_converges_to_p_alpha(spec_name, alpha, max_len, steps):
    """Early EOS included: complete sequences of every length count with their full probability. (The program has
    the algorithm's law at any number of steps: the traced tests above.)"""
    spec = load_spec(spec_name)
    config = SamplerConfig(alpha=alpha, max_new_tokens=max_len, block_count=1, mcmc_steps=steps)
    assert tv(algorithm_law(spec, config), power_target(spec, alpha, max_len)) < 2e-3  # enough steps: mixed


def test_several_blocks_converge_to_p_alpha_when_eos_cannot_come_early():
    spec = load_spec("no_early_eos")
    config = SamplerConfig(alpha=3.0, max_new_tokens=4, block_size=2, mcmc_steps=80)
    assert tv(algorithm_law(spec, config), power_target(spec, 3.0, 4)) < 2e-3


# --- reductions -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec_name", ["early_eos", "eos_trap"])
def test_alpha_one_with_tau_one_reproduces_base_sampling(spec_name):
    spec = load_spec(spec_name)
    config = SamplerConfig(alpha=1.0, proposal_temperature=1.0, max_new_tokens=3, block_count=1, mcmc_steps=5)
    want = sequence_law(spec, Proposal(1.0), 3)
    assert tv(algorithm_law(spec, config), want) < 1e-12
    assert_same_law(sampler_law(spec, replace(config, mcmc_steps=2)), want)


@pytest.mark.parametrize("method, tau", [("base", 1.0), ("low-temp", 0.25)])
def test_plain_methods_have_their_exact_laws(method, tau):
    config = SamplerConfig(method=method, alpha=4.0, max_new_tokens=4)
    spec = load_spec("eos_trap")
    assert_same_law(sampler_law(spec, config), sequence_law(spec, Proposal(tau), 4))


def test_low_temperature_is_not_the_power_distribution():
    """The paper's point: token-wise tempering != p^alpha over sequences. Our toy spec shows it plainly."""
    spec = load_spec("eos_trap")
    assert tv(sequence_law(spec, Proposal(1 / 3.0), 4), power_target(spec, 3.0, 4)) > 0.1


# --- the MH kernel itself ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec_name, alpha, tau", [("early_eos", 4.0, 0.25), ("eos_trap", 2.0, 0.7), ("eos_trap", 3.0, 1.5)]
)
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


# --- mutations: a wrong term in the MH ratio fails the traced law ------------------------------------------------

MUTANT_CASE = ("eos_trap", SamplerConfig(alpha=3.0, max_new_tokens=3, block_count=1, mcmc_steps=2))
HONEST_TERMS = power.log_ratio_terms


def without_proposal_term(alpha, chain, i, proposed, cuts=power.UNIFORM):
    target, _, cut = HONEST_TERMS(alpha, chain, i, proposed, cuts)
    return target, 0.0, cut


def without_length_term(alpha, chain, i, proposed, cuts=power.UNIFORM):
    target, proposal, _ = HONEST_TERMS(alpha, chain, i, proposed, cuts)
    return target, proposal, 0.0


def with_alpha_one(alpha, chain, i, proposed, cuts=power.UNIFORM):
    target, proposal, cut = HONEST_TERMS(alpha, chain, i, proposed, cuts)
    return target / alpha, proposal, cut


@pytest.mark.parametrize("mutant", [without_proposal_term, without_length_term, with_alpha_one])
def test_a_wrong_ratio_fails_the_exact_law(mutant, monkeypatch):
    spec_name, config = MUTANT_CASE
    spec = load_spec(spec_name)
    want = algorithm_law(spec, config)  # before the mutation: the exact laws are built from the same kernels
    monkeypatch.setattr(power, "log_ratio_terms", mutant)
    assert tv(sampler_law(spec, config), want) > 0.01


# --- exact early rejection ----------------------------------------------------------------------------------------

# After "a" the model is sure (the state "a a a ..." scores high); after "b" it is not, so a proposal that draws a
# "b" falls below the current state's score within a token or two, and is cut short there.
FLOOR_SPEC = ToySpec.from_dict(
    {
        "vocab": ["a", "b", "<eos>"],
        "eos_id": 2,
        "default": [0.3, 0.4, 0.3],
        "next": {",".join(["0"] * k): [0.9, 0.05, 0.05] for k in range(1, 6)} | {"": [0.5, 0.45, 0.05]},
    }
)
FLOORED = SamplerConfig(alpha=2.0, max_new_tokens=4, block_count=1, mcmc_steps=1)
COUNTED = Merge(state=lambda chain: (chain_state(chain), chain.tokens_generated), picks=("uniform_index",))


def floored_law() -> tuple[dict, float]:
    """The exact law of FLOORED's tokens on FLOOR_SPEC, and the tokens it draws on average."""
    law = program_law(TracingBackend(FLOOR_SPEC), FLOORED, lambda r: (r.tokens, r.tokens_generated), COUNTED)
    tokens: dict = {}
    for (x, _), p in law.items():
        tokens[x] = tokens.get(x, 0.0) + p
    return tokens, math.fsum(p * n for (_, n), p in law.items())


def test_early_rejection_draws_fewer_tokens_for_the_same_law(monkeypatch):
    """Floors are on in most finite-step law tests above (alpha >= 1/tau >= 1, or max-swap); here they cut
    proposals short, the law stays exact, the average cost falls, and a tau where the score could rise gets no
    floor."""
    law, with_floors = floored_law()
    assert_same_law(law, algorithm_law(FLOOR_SPEC, FLOORED))
    monkeypatch.setattr(power, "rejection_floor", lambda *args: None)
    assert with_floors < floored_law()[1] - 0.05  # 6.028 against 6.095 tokens
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
    assert tv(sampler_law(FLOOR_SPEC, FLOORED), want) > 0.01  # 0.023 and 0.085


# --- statistical smoke tests: real chains from numpy generators ---------------------------------------------------


@pytest.mark.statistical
@pytest.mark.parametrize("speculate", [0, 2], ids=["", "speculate=2"])
def test_sampled_chains_follow_the_exact_law_of_the_algorithm(speculate):
    config = SamplerConfig(alpha=2.0, max_new_tokens=4, block_size=2, mcmc_steps=2, speculate=speculate)
    assert_follows(draw("early_eos", config), algorithm_law(load_spec("early_eos"), config))


@pytest.mark.statistical
def test_long_sampled_chains_follow_p_alpha():
    config = SamplerConfig(alpha=2.0, max_new_tokens=3, block_count=1, mcmc_steps=30)
    assert_follows(draw("no_early_eos", config), power_target(load_spec("no_early_eos"), 2.0, 3))
