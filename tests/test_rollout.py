"""power-rollout against exact enumeration on toy models: its M -> infinity limit, its exact law at finite M (every
tuple of rollouts enumerated), the real program's law (traced: every choice enumerated) against it, convergence in
M, EOS, batching."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from exact_laws import empirical, power_target, rollout_law, rollout_limit_law, tv, tv_null_quantile
from support.toy import SPECS, load_spec
from support.tracing import assert_same_law, sampler_law

from powersample import SamplerConfig, sample
from powersample.backends.toy import ToyBackend
from powersample.cli import main
from powersample.samplers import rollout
from powersample.samplers.registry import work_units
from powersample.samplers.rollout import candidate_probs

N = 1500  # samples per statistical test; each is an independent chain


def rollout_config(**knobs) -> SamplerConfig:
    return SamplerConfig(method="power-rollout", **{"alpha": 4.0, **knobs})


def draw(spec_name: str, config: SamplerConfig, n: int = N, seed: int = 0) -> list[tuple[int, ...]]:
    return [r.tokens for r in sample(ToyBackend(load_spec(spec_name)), "x", config, seed=seed, num_samples=n)]


def assert_follows(samples: list[tuple[int, ...]], law: dict) -> None:
    """TV(empirical, law) must be within the 99.9% quantile of the multinomial null for len(samples) draws."""
    have, bound = tv(empirical(samples), law), tv_null_quantile(law, len(samples))
    assert set(empirical(samples)) <= {k for k, v in law.items() if v > 0}, "a sample outside the support"
    assert have <= bound, f"TV {have:.4f} > null 99.9% quantile {bound:.4f}"


# --- the exact limit (M -> infinity), by enumeration --------------------------------------------------------------


@pytest.mark.parametrize("spec_name", ["early_eos", "eos_trap", "no_early_eos", "fidelity_eos"])
@pytest.mark.parametrize("max_len", [3, 4])
@pytest.mark.parametrize("block_size", [None, 2])
def test_limit_is_p_alpha_with_every_candidate_and_a_full_horizon(spec_name, max_len, block_size):
    """Every next token (block) is a candidate and rollouts reach T: the token-level law is p^alpha exactly."""
    spec = load_spec(spec_name)
    config = rollout_config(alpha=3.0, max_new_tokens=max_len, candidates=len(spec.vocab) ** 2, block_size=block_size)
    assert tv(rollout_limit_law(spec, config), power_target(spec, 3.0, max_len)) < 1e-12


@pytest.mark.parametrize(
    "spec_name, knobs",
    [
        ("early_eos", dict(candidates=2, rollout_horizon=1)),
        ("no_early_eos", dict(candidates=1)),
        ("fidelity_eos", dict(candidates=3, rollout_horizon=1)),
    ],
)
def test_few_candidates_or_a_short_horizon_are_approximations(spec_name, knobs):
    config = rollout_config(max_new_tokens=4, **knobs)
    spec = load_spec(spec_name)
    assert tv(rollout_limit_law(spec, config), power_target(spec, 4.0, 4)) > 0.02


# --- the program at finite M: traced against the exact law ---------------------------------------------------

FINITE_M = [
    ("early_eos", dict(max_new_tokens=3, candidates=3, rollouts=1)),  # every token a candidate, full horizon
    ("eos_trap", dict(max_new_tokens=2, candidates=3, rollouts=2)),
    ("eos_trap", dict(max_new_tokens=3, candidates=2, rollouts=2, rollout_horizon=1)),
    ("fidelity_eos", dict(max_new_tokens=2, candidates=2, rollouts=2, rollout_horizon=1)),
    ("no_early_eos", dict(max_new_tokens=3, candidates=2, rollouts=1, block_size=2)),  # blocks, then a token
    ("early_eos", dict(max_new_tokens=3, candidates=3, rollouts=2, rollout_horizon=1, top_k=2)),  # weights p^alpha/q
]


@pytest.mark.parametrize("spec_name, knobs", FINITE_M)
def test_the_program_has_the_exact_finite_m_law(spec_name, knobs):
    spec, config = load_spec(spec_name), rollout_config(**knobs)
    assert_same_law(sampler_law(spec, config), rollout_law(spec, config))


def test_without_the_jackknife_the_program_has_another_law(monkeypatch):
    """Mutant: the plain ratio-of-estimates law P_hat, without the jackknife's bias correction."""
    spec, config = load_spec("eos_trap"), rollout_config(max_new_tokens=2, candidates=3, rollouts=2)
    want = rollout_law(spec, config)
    monkeypatch.setattr(rollout, "candidate_probs", _plain)
    assert tv(sampler_law(spec, config), want) > 0.01


def _plain(log_head: np.ndarray, log_w: np.ndarray) -> np.ndarray:
    """P_hat: p^alpha times the mean rollout weight, normalized over the candidates. (K,)"""
    z = log_head + np.log(np.exp(log_w).mean(axis=1))
    return np.exp(z - z.max()) / np.exp(z - z.max()).sum()


def test_the_exact_law_converges_to_p_alpha_as_m_grows():
    """Finite-M weights are ratios of estimates, hence biased: the exact law at M = 1, 2, 3 (every token a
    candidate, rollouts to T) closes in on the limit, here p^alpha, by more than half at each step."""
    spec = load_spec("eos_trap")
    want = power_target(spec, 4.0, 2)
    gaps = [tv(rollout_law(spec, rollout_config(max_new_tokens=2, candidates=3, rollouts=m)), want) for m in (1, 2, 3)]
    assert gaps[0] > 2 * gaps[1] > 4 * gaps[2] > 0.01, gaps


def test_jackknife_reduces_the_bias_of_the_candidate_law():
    """Two candidates whose rollout log weights take two values each: over every tuple of M = 4 rollouts per
    candidate, the mean of the jackknifed law is nearer the truth than the plain ratio of estimates."""
    m, log_head = 4, np.array([0.3, 0.0])
    values = np.array([[-1.0, 1.0], [-0.3, 1.7]])  # (K, 2): each rollout's log weight takes one of these
    probs = np.array([[0.7, 0.3], [0.6, 0.4]])  # (K, 2): with these probabilities
    log_zeta = np.log((probs * np.exp(values)).sum(axis=1))  # (K,): log E[w]
    truth = np.exp(log_head + log_zeta) / np.exp(log_head + log_zeta).sum()
    plain, jack = np.zeros(2), np.zeros(2)
    for picks in itertools.product(range(2), repeat=2 * m):
        idx = np.array(picks).reshape(2, m)  # (K, M)
        weight = float(np.prod(np.take_along_axis(probs, idx, axis=1)))
        log_w = np.take_along_axis(values, idx, axis=1)
        plain += weight * _plain(log_head, log_w)
        jack += weight * candidate_probs(log_head, log_w)
    assert abs(jack[0] - truth[0]) < 0.5 * abs(plain[0] - truth[0])


def test_candidate_law_is_exact_when_the_rollouts_agree():
    log_head, log_w = np.array([-1.0, -2.0, -0.5]), np.tile(np.array([[0.2], [1.5], [-3.0]]), (1, 5))
    want = np.exp(log_head + log_w[:, 0]) / np.exp(log_head + log_w[:, 0]).sum()
    assert candidate_probs(log_head, log_w) == pytest.approx(want, rel=1e-12)
    assert candidate_probs(log_head, log_w[:, :1]) == pytest.approx(want, rel=1e-12)


# --- statistical smoke tests: sampled chains against the limit at large M -------------------------------------


@pytest.mark.statistical
@pytest.mark.parametrize(
    "spec_name, knobs",
    [
        ("early_eos", dict(max_new_tokens=3, candidates=3)),  # = p^alpha
        ("no_early_eos", dict(max_new_tokens=4, candidates=3, block_size=2)),
    ],
)
def test_samples_follow_the_limit_law_at_large_m(spec_name, knobs):
    config = rollout_config(rollouts=16, **knobs)
    assert_follows(draw(spec_name, config), rollout_limit_law(load_spec(spec_name), config))


# --- batching, counters, records ------------------------------------------------------------------------------


class Counting(ToyBackend):
    """A lockstep toy backend that records each call's width and every token it draws."""

    def __init__(self, spec):
        super().__init__(spec)
        self.widths: list[int] = []
        self.alternatives: list[int] = []
        self.drawn = 0

    def extend(self, requests, proposal):
        self.widths.append(len(requests))
        self.alternatives.append(sum(r.report.alternatives > 0 for r in requests))
        out = super().extend(requests, proposal)
        self.drawn += sum(len(c.tokens) for c in out)
        return out


@pytest.mark.parametrize("block_size", [None, 2])
def test_one_backend_call_for_candidates_and_one_for_all_rollouts(block_size):
    """Chains share calls; each step is a candidates call then ONE call with every chain's K*M rollouts (no rollout
    call at the last step, where zeta = 1)."""
    k, m, chains, t = 2, 3, 5, 4
    backend = Counting(load_spec("no_early_eos"))  # no EOS: every chain takes every step
    config = rollout_config(max_new_tokens=t, candidates=k, rollouts=m, block_size=block_size)
    results = sample(backend, "x", config, seed=1, num_samples=chains)
    steps = t // (block_size or 1)
    assert backend.stats.extend_calls == 2 * steps - 1
    if block_size is None:
        assert backend.widths == [chains, chains * k * m] * (steps - 1) + [chains]
        assert backend.alternatives == [chains, 0] * (steps - 1) + [chains]
    else:  # L = K*M candidate blocks per chain, then at most K*M rollouts per chain (fewer when blocks coincide)
        assert backend.widths[0::2] == [chains * k * m] * steps and backend.widths[1] <= chains * k * m
    assert sum(r.tokens_generated for r in results) == backend.drawn
    assert all(len(r.tokens) == t and r.proposals == r.accepted == 0 for r in results)


@pytest.mark.parametrize("spec_name", ["early_eos", "eos_trap"])
def test_records_and_progress(spec_name):
    backend = Counting(load_spec(spec_name))
    config = rollout_config(max_new_tokens=4, candidates=2, rollouts=3, rollout_horizon=2)
    done = []
    records = sample(backend, "x", config, seed=3, num_samples=20, progress=done.append)
    for r in records:
        assert r.tokens and (r.tokens[-1] == backend.spec.eos_id or len(r.tokens) == 4)
        assert list(r.token_logp) == pytest.approx(list(backend.score((), r.tokens)))
        assert math.isclose(r.logp, math.fsum(r.token_logp))
    assert sum(r.tokens_generated for r in records) == backend.drawn
    assert sum(done) <= work_units(config) * 20
    again = sample(Counting(load_spec(spec_name)), "x", config, seed=3, num_samples=20)
    assert [r.tokens for r in again] == [r.tokens for r in records]


# --- command line ---------------------------------------------------------------------------------------------

TOY = [
    "sample",
    "x",
    "--backend",
    "toy",
    "--toy-spec",
    str(SPECS / "eos_trap.json"),
    "--quiet",
    "--method",
    "power-rollout",
    "--max-new-tokens",
    "3",
]


def test_cli_runs_power_rollout(capsys):
    assert main([*TOY, "--candidates", "2", "--rollouts", "2", "--rollout-horizon", "1", "--num-samples", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("method=power-rollout") == 2


@pytest.mark.parametrize(
    "extra, word",
    [
        (["--candidates", "0"], "candidates"),
        (["--rollouts", "0"], "rollouts"),
        (["--rollouts", "-3"], "rollouts"),
        (["--rollout-horizon", "-1"], "rollout_horizon"),
        (["--proposal-temperature", "0.5"], "proposal_temperature"),
    ],
)
def test_cli_bad_knobs_exit_2_with_one_line(extra, word, capsys):
    code = main([*TOY, *extra])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and err.count("\n") == 1 and word in err and err.startswith("powersample: error:")
