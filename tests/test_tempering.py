"""power-pt (parallel power tempering) against exact enumeration on toy models, with no sampling noise.

The real program (registry -> driver -> toy backend) is traced (tests/support/tracing.py) and compared, to 1e-12 in
TV, with the algorithm's exact law (tests/exact_laws.tempering_law, built from the code's MH kernel and swap ratio).
The swap kernel is checked for detailed balance on the product target, the top replica's law for convergence to
p^alpha, and mutants of the maths must fail.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
from exact_laws import algorithm_law, power_target, swap_law, tempering_law, tv
from support.toy import load_spec
from support.tracing import Merge, TracingBackend, assert_same_law, chain_state, program_law

from powersample import SamplerConfig
from powersample.backends.toy import ToyBackend
from powersample.config import LADDER_PATTERN
from powersample.core.draws import uniform_index
from powersample.errors import PowerSampleError
from powersample.samplers import registry, run_chains, tempering
from powersample.samplers.chain import Chain

PT = SamplerConfig(method="power-pt", replicas=2, alpha_min=1.0, alpha=4.0, max_new_tokens=3, block_count=1)


@pytest.fixture
def pt_law(monkeypatch):
    """The traced law of power-pt's real program, its paths merged at each backend call where every replica's
    state (and the requests) are the same: the replicas are what the rest of the program reads."""
    made: dict[int, list] = {}
    real = tempering.make_replicas

    def remembered(chain, *args):
        made[id(chain)] = replicas = real(chain, *args)
        return replicas

    monkeypatch.setattr(tempering, "make_replicas", remembered)

    def state(chain: Chain):
        return tuple((chain_state(r), tuple(map(tuple, r.under))) for r in made.get(id(chain), ()))

    def law(spec_name: str, config: SamplerConfig):
        return program_law(TracingBackend(load_spec(spec_name)), config, merge=Merge(state=state))

    return law


# --- the whole program, step for step ---------------------------------------------------------------------------

CASES = [  # kept small: the replicas' forks multiply within a sweep (the first case traces 4,236 runs)
    ("eos_trap", replace(PT, replicas=3, alpha=3.0, max_new_tokens=1, mcmc_steps=3)),  # both parities of pairs
    ("early_eos", replace(PT, replicas=3, max_new_tokens=1, mcmc_steps=3)),
    ("eos_trap", replace(PT, alpha=3.0, max_new_tokens=2, mcmc_steps=1)),  # EOS early: complete states of any length
    ("eos_trap", replace(PT, alpha=2.0, max_new_tokens=2, block_size=1, mcmc_steps=1)),  # a stage per token
    ("no_early_eos", replace(PT, alpha=2.0, max_new_tokens=2, block_size=1, mcmc_steps=1, top_k=2)),
    ("early_eos", replace(PT, alphas="2.0,4.0", max_new_tokens=2, mcmc_steps=1, proposal_temperature=0.5)),  # one
    # proposal shared by the rungs: no log q under others
]


@pytest.mark.parametrize("spec_name, config", CASES)
def test_the_program_has_the_exact_law_of_the_algorithm(pt_law, spec_name, config):
    assert_same_law(pt_law(spec_name, config), tempering_law(load_spec(spec_name), config))


def test_speculative_proposals_keep_the_law(pt_law):
    config = replace(PT, alpha=3.0, max_new_tokens=2, mcmc_steps=1, speculate=2)
    assert_same_law(pt_law("eos_trap", config), tempering_law(load_spec("eos_trap"), config))


def test_one_replica_is_power_draw_for_draw(pt_law):
    config = replace(PT, replicas=1, mcmc_steps=2)  # (one replica traces as cheaply as power)
    spec = load_spec("early_eos")
    assert_same_law(pt_law("early_eos", config), algorithm_law(spec, replace(config, method="power")))
    power, pt = (
        run_chains(ToyBackend(spec), (), c, [Chain(np.random.default_rng(5), 0)])[0]
        for c in (replace(config, method="power"), config)
    )
    assert (power.tokens, power.tokens_generated, power.accepted) == (pt.tokens, pt.tokens_generated, pt.accepted)


# --- the swap kernel and the limit ------------------------------------------------------------------------------


@pytest.mark.parametrize("spec_name, alphas, cap", [("early_eos", (1.0, 4.0), 3), ("eos_trap", (1.5, 2.5, 3.0), 3)])
def test_swaps_keep_detailed_balance_for_the_product_target(spec_name, alphas, cap):
    spec = load_spec(spec_name)
    config = SamplerConfig(method="power-pt", replicas=len(alphas), alphas=",".join(map(str, alphas)),
                           alpha=alphas[-1], max_new_tokens=cap)  # fmt: skip
    rungs, targets = tempering.rung_configs(config), [power_target(spec, a, cap) for a in alphas]
    product = {(x,): w for x, w in targets[0].items()}
    for target in targets[1:]:
        product = {xs + (y,): w * v for xs, w in product.items() for y, v in target.items()}
    for parity in (0, 1):
        moved = {xs: swap_law(spec, rungs, {xs: 1.0}, parity) for xs in product}
        for xs, row in moved.items():
            assert math.isclose(sum(row.values()), 1.0, abs_tol=1e-12)
            for ys, k in row.items():
                assert math.isclose(product[xs] * k, product[ys] * moved[ys].get(xs, 0.0), rel_tol=1e-9, abs_tol=1e-15)


@pytest.mark.parametrize("spec_name, alpha, steps", [("early_eos", 4.0, 40), ("eos_trap", 3.0, 40)])
def test_the_top_replica_converges_to_p_alpha(spec_name, alpha, steps):
    spec = load_spec(spec_name)
    config = replace(PT, alpha=alpha, mcmc_steps=steps)
    assert tv(tempering_law(spec, config), power_target(spec, alpha, 3)) < 2e-3


def test_tempering_mixes_faster_than_power_on_the_trap():
    """The point of the ladder: on the fidelity trap (a mode power's chain rarely leaves), at the same sweeps the
    top replica is closer to p^alpha than power's one chain."""
    spec = load_spec("fidelity_trap")
    config = SamplerConfig(method="power-pt", replicas=2, alpha=4.0, max_new_tokens=2, block_count=1, mcmc_steps=4)
    target = power_target(spec, 4.0, 2)
    power = tv(algorithm_law(spec, replace(config, method="power")), target)
    assert tv(tempering_law(spec, config), target) < 0.12 < 0.4 < power  # 0.109 against 0.404, exactly


# --- mutants of the maths fail ----------------------------------------------------------------------------------


SWAP_RATIO = tempering.log_swap_ratio  # the code's, before a test replaces it


def wrong_sign(alpha_low, alpha_high, low, high):
    return -SWAP_RATIO(alpha_low, alpha_high, low, high)


def per_token(alpha_low, alpha_high, low, high):
    """Ignores the stage's length rule: compares mean log p per token instead of the states' log p."""
    mean = [math.fsum(c.base_logp) / len(c.base_logp) for c in (low, high)]
    return (alpha_high - alpha_low) * (mean[0] - mean[1])


@pytest.mark.parametrize("mutant", [wrong_sign, per_token])
def test_a_wrong_swap_fails_the_exact_law(pt_law, monkeypatch, mutant):
    config, spec_name = replace(PT, alpha=3.0, max_new_tokens=2, mcmc_steps=1), "eos_trap"  # states of two lengths
    want = tempering_law(load_spec(spec_name), config)
    monkeypatch.setattr(tempering, "log_swap_ratio", mutant)
    with pytest.raises(AssertionError, match="TV"):
        assert_same_law(pt_law(spec_name, config), want)


def test_returning_a_random_replica_fails_the_exact_law(pt_law, monkeypatch):
    config, spec_name = replace(PT, replicas=3, alpha=3.0, max_new_tokens=1, mcmc_steps=3), "eos_trap"
    want = tempering_law(load_spec(spec_name), config)
    real = tempering.tempering_result

    def any_replica(chain, rungs, replicas, swaps):
        pick = uniform_index(len(replicas), chain.rng)
        return real(chain, rungs, [*replicas[:pick], *replicas[pick + 1 :], replicas[pick]], swaps)

    monkeypatch.setattr(tempering, "tempering_result", any_replica)
    with pytest.raises(AssertionError, match="TV"):
        assert_same_law(pt_law(spec_name, config), want)


# --- the ladder, the counters and the refusals ------------------------------------------------------------------


def test_the_default_ladder_is_geometric_and_ends_at_alpha():
    assert tempering.ladder(SamplerConfig(method="power-pt", replicas=3, alpha=4.0)) == (1.0, 2.0, 4.0)
    assert tempering.ladder(SamplerConfig(method="power-pt", replicas=1, alpha=4.0)) == (4.0,)
    assert tempering.ladder(SamplerConfig(method="power-pt", alphas="2.35,2.5,2.7,2.9", alpha=2.9)) == (
        2.35, 2.5, 2.7, 2.9)  # fmt: skip


@pytest.mark.parametrize(
    "knobs, message",
    [
        ({"alphas": "2,3"}, "alphas lists 2 powers but replicas is 4"),
        ({"alphas": "1,2,3,3.5", "alpha": 4.0}, "alphas must end at alpha"),
        ({"alphas": "1,3,2,4"}, "positive and increasing"),
        ({"alphas": "1,x,3,4"}, "numbers separated by commas"),
        ({"alphas": ""}, "numbers separated by commas"),
        ({"alpha_min": 5.0}, "alpha_min must be below alpha"),
    ],
)
def test_a_bad_ladder_is_refused_in_one_line(knobs, message):
    with pytest.raises(PowerSampleError, match=message):
        registry.check(SamplerConfig(method="power-pt", **knobs))  # (the form: when the config is made)


def test_counters_swaps_and_replicas_are_reported():
    spec = load_spec("fidelity_trap")
    config = SamplerConfig(method="power-pt", replicas=3, alpha=4.0, max_new_tokens=6, block_count=2, mcmc_steps=3)
    chain = Chain(np.random.default_rng(1), 0, return_replicas=True)
    [result] = run_chains(ToyBackend(spec), (), config, [chain])
    assert result.proposals == 3 * 3 * 2 and 0 <= result.accepted <= result.proposals  # steps x replicas x stages
    assert len(result.swaps) == 2 and all(0 <= a <= n for n, a in result.swaps)
    assert sum(n for n, _ in result.swaps) == 3 * 2  # one pair per sweep with 3 replicas: 3 sweeps x 2 stages
    assert [r.alpha for r in result.replicas] == [1.0, 2.0, 4.0]
    assert result.replicas[-1].tokens == result.tokens
    assert registry.members(config) == 3


# --- the doors: the server takes power-pt and its knobs from the one declaration ---------------------------------


def test_the_server_serves_power_pt():
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from powersample.backends import load_backend
    from powersample.server.app import Settings, create_app

    spec = str(tempering.__file__).replace("samplers/tempering.py", "toy_specs/fidelity_trap.json")
    app = create_app(load_backend("toy", toy_spec=spec), Settings(allowed_hosts=("testserver",)))
    with TestClient(app) as client:
        body = {"prompt": "x", "method": "power-pt", "max_tokens": 4, "replicas": 3, "alpha_min": 1.5, "seed": 3}
        ok = client.post("/v1/completions", json=body)
        assert ok.status_code == 200, ok.text
        config = ok.json()["power_sampling"]["config"]
        assert (config["method"], config["replicas"], config["alpha_min"]) == ("power-pt", 3, 1.5)
        bad = client.post("/v1/completions", json={**body, "alphas": "1,2"})
        assert bad.status_code == 400 and "alphas lists 2 powers" in bad.json()["error"]["message"]
        bad = client.post("/v1/completions", json={**body, "alphas": "1;2"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "alphas"
        schema = client.get("/openapi.json").json()["components"]["schemas"]["CompletionBody"]["properties"]
        assert schema["alphas"]["anyOf"][0]["pattern"] == LADDER_PATTERN
