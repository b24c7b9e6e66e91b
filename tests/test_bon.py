"""bon (compute-matched best-of-N) against exact enumeration: the law of its real program (traced: every draw
enumerated, tests/support/tracing.py) against the law derived here from the rule (candidates from q until their
tokens reach the budget, the crossing one kept; the best by mean base log p, ties to the earliest), and not from the
sampler's code. Then its counters, batching and schedule independence, the server, and `eval --bon-match`."""

from __future__ import annotations

import functools
import json
import math
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import pytest
from exact_laws import continuations, sequence_law, tv
from support.eval_toy import eval_argv, write_jsonl, write_spec
from support.statistical import assert_follows, draw
from support.toy import SPECS, load_spec
from support.tracing import assert_same_law, sampler_law

from powersample import SamplerConfig, sample
from powersample.api import sample_many
from powersample.backends.toy import ToyBackend, ToySpec
from powersample.cli import main
from powersample.eval.records import identity_hash, load_records, read_run
from powersample.samplers import bon, registry

# Ties: with powers of two, (eos), (a, b) and (a, eos) share the mean log p log(1/4) exactly, while q draws them
# with different probabilities, so which tied candidate wins changes the law.
TIES = {
    "vocab": ["a", "b", "<eos>"],
    "eos_id": 2,
    "default": [0.5, 0.25, 0.25],
    "next": {"": [0.25, 0.5, 0.25], "0": [0.5, 0.25, 0.25]},
}


# Every candidate ties: all rows uniform, so every token has the same log p. The earliest candidate, the first
# one drawn, is then the output: what `base` draws with the same seed.
ALL_TIES = {"vocab": ["a", "b", "<eos>"], "eos_id": 2, "default": [1 / 3, 1 / 3, 1 / 3]}
OWN_SPECS = {"ties": TIES, "all_ties": ALL_TIES}


def spec_of(name: str) -> ToySpec:
    return ToySpec.from_dict(OWN_SPECS[name]) if name in OWN_SPECS else load_spec(name)


def budget_of(config: SamplerConfig) -> int:
    """The budget, from the knobs: bon_tokens, or ceil(N T^2 / (4B) + T)."""
    t, b, n = config.max_new_tokens, config.block, config.mcmc_steps
    return config.bon_tokens or math.ceil(n * t * t / (4 * b) + t)


def mean_score(logp: list[float]) -> float:
    return math.fsum(logp) / len(logp)


def total_score(logp: list[float]) -> float:
    return math.fsum(logp)


def bon_law(spec: ToySpec, config: SamplerConfig, score=mean_score, crossing: bool = True, earliest: bool = True):
    """Exact law of the output: every sequence of candidates, each from q, until their tokens reach the budget.

    The mutants: `score` = total log p; crossing=False: the candidate that crosses the budget is not considered;
    earliest=False: a tie goes to the later candidate."""
    budget, proposal = budget_of(config), registry.proposal(config)
    cands = [
        (s, math.exp(lq), score([math.log(spec.row(s[:t])[tok]) for t, tok in enumerate(s)]))
        for s, lq in continuations(spec, proposal, (), config.max_new_tokens)
    ]

    def better(new: float, old: float) -> bool:
        return new > old if earliest else new >= old

    @functools.cache
    def after(drawn: int, best: int) -> tuple:  # best: index into cands, -1 = none yet
        out: dict = defaultdict(float)
        for i, (s, q, sc) in enumerate(cands):
            pick = i if best < 0 or better(sc, cands[best][2]) else best
            if drawn + len(s) >= budget:
                out[cands[pick if crossing or best < 0 else best][0]] += q
            else:
                for y, w in after(drawn + len(s), pick):
                    out[y] += q * w
        return tuple(out.items())

    return dict(after(0, -1))


CASES = [
    ("eos_trap", SamplerConfig(method="bon", max_new_tokens=3, bon_tokens=1)),  # one candidate: a base sample
    ("eos_trap", SamplerConfig(method="bon", max_new_tokens=3, bon_tokens=7)),  # EOS at 1, 2 or 3 tokens
    ("early_eos", SamplerConfig(method="bon", max_new_tokens=3, bon_tokens=8)),  # rounds of 3, then of 1
    ("eos_trap", SamplerConfig(method="bon", max_new_tokens=3, mcmc_steps=1)),  # the Eq. 12 budget: 6
    ("eos_trap", SamplerConfig(method="bon", max_new_tokens=2, bon_tokens=5, bon_temperature=2.0, top_k=2)),
    ("ties", SamplerConfig(method="bon", max_new_tokens=2, bon_tokens=4)),
    ("all_ties", SamplerConfig(method="bon", max_new_tokens=3, bon_tokens=3)),  # rounds of one candidate
]


def draw_spec(name: str, config: SamplerConfig, n: int = 3000, seed: int = 0) -> list[tuple[int, ...]]:
    if name not in OWN_SPECS:
        return draw(name, config, n, seed)
    return [r.tokens for r in sample(ToyBackend(spec_of(name)), "x", config, seed=seed, num_samples=n)]


@pytest.mark.parametrize("spec_name, config", CASES)
def test_the_program_has_the_exact_law(spec_name, config):
    assert_same_law(sampler_law(spec_of(spec_name), config), bon_law(spec_of(spec_name), config))


def test_a_budget_below_one_candidate_is_one_base_sample():
    spec = load_spec("eos_trap")
    config = SamplerConfig(method="bon", max_new_tokens=3, bon_tokens=1)
    assert tv(bon_law(spec, config), sequence_law(spec, registry.proposal(config), 3)) < 1e-12
    got = sample(ToyBackend(spec), "x", config, seed=5, num_samples=50)
    want = sample(ToyBackend(spec), "x", SamplerConfig(method="base", max_new_tokens=3), seed=5, num_samples=50)
    assert [(r.tokens, r.tokens_generated) for r in got] == [(r.tokens, r.tokens_generated) for r in want]
    assert all(r.proposals == 1 and r.accepted == 0 for r in got)


@pytest.mark.parametrize(
    "case, mutant", [(1, {"score": total_score}), (2, {"crossing": False}), (6, {"earliest": False})]
)
def test_the_law_tells_the_mutants_apart(case, mutant):
    """The test above fails a sampler that selects by total log p, drops the crossing candidate, or breaks ties
    toward the later one: each mutant's law is far from the rule's."""
    spec_name, config = CASES[case]
    spec = spec_of(spec_name)
    assert tv(bon_law(spec, config, **mutant), bon_law(spec, config)) > 0.01


def test_a_sampler_that_selects_by_total_log_p_has_the_mutant_law(monkeypatch):
    """The mutation, run: the sampler with the total in place of the mean has exactly the mutant's law."""
    monkeypatch.setattr(bon, "mean_logp", lambda cont: math.fsum(cont.base_logp))
    spec_name, config = CASES[1]
    assert_same_law(sampler_law(spec_of(spec_name), config), bon_law(spec_of(spec_name), config, score=total_score))


def test_when_every_candidate_ties_the_first_one_drawn_is_the_output():
    """All candidates tie on ALL_TIES, so bon returns its first candidate. With a budget of T every round holds one
    candidate, drawn with the chain's own generator, so the first is the one `base` draws with the seed."""
    spec_name, config = CASES[6]
    spec = spec_of(spec_name)
    got = sample(ToyBackend(spec), "x", config, seed=9, num_samples=100)
    want = sample(ToyBackend(spec), "x", SamplerConfig(method="base", max_new_tokens=3), seed=9, num_samples=100)
    assert [r.tokens for r in got] == [r.tokens for r in want]
    assert sum(r.proposals > 1 for r in got) > 20  # yet later candidates were drawn


def test_smaller_rounds_draw_the_same_law(monkeypatch):
    """Rounds only batch the draws: one or two candidates per round give the same law (other samples, as the
    generators are spawned per round)."""
    spec_name, config = CASES[2]
    for cap in (1, 2):
        monkeypatch.setattr(bon, "MAX_ROUND", cap)
        assert_same_law(sampler_law(spec_of(spec_name), config), bon_law(spec_of(spec_name), config))


@pytest.mark.statistical
def test_sampled_outputs_follow_the_exact_law():
    spec_name, config = CASES[2]
    assert_follows(draw_spec(spec_name, config), bon_law(spec_of(spec_name), config))


# --- counters, batching, determinism -----------------------------------------------------------------------------


@pytest.mark.parametrize("spec_name, config", CASES)
def test_tokens_reach_the_budget_by_less_than_one_candidate(spec_name, config):
    spec, budget, t = spec_of(spec_name), budget_of(config), config.max_new_tokens
    for r in sample(ToyBackend(spec), "x", config, seed=2, num_samples=200):
        assert budget <= r.tokens_generated < budget + t
        assert 1 <= r.proposals <= r.tokens_generated and r.accepted == 0 and r.acceptance_rate is None
        assert r.config["bon_tokens"] == config.bon_tokens
        assert r.config["proposal_temperature"] == config.bon_temperature
        assert r.token_logp == ToyBackend(spec).score((), r.tokens)


def test_all_candidates_of_all_chains_share_one_call_per_round():
    backend = ToyBackend(load_spec("no_early_eos"))  # no EOS: every candidate has T tokens
    config = SamplerConfig(method="bon", max_new_tokens=3, bon_tokens=10)
    records = sample(backend, "p", config, num_samples=9)
    assert backend.stats.extend_calls == 1  # ceil(10 / 3) = 4 candidates, all in the first round
    assert all(r.proposals == 4 and r.tokens_generated == 12 for r in records)
    many = bon.MAX_ROUND + 5
    backend = ToyBackend(load_spec("no_early_eos"))
    records = sample(backend, "p", replace(config, bon_tokens=3 * many), num_samples=3)
    assert backend.stats.extend_calls == 2 and all(r.proposals == many for r in records)  # the round cap


def test_same_seed_same_output_alone_and_beside_other_jobs():
    spec = load_spec("eos_trap")
    config = SamplerConfig(method="bon", max_new_tokens=3, bon_tokens=7)
    trace = lambda records: [(r.tokens, r.tokens_generated, r.proposals) for r in records]  # noqa: E731
    alone = trace(sample(ToyBackend(spec), "p", config, seed=7, num_samples=4))
    assert alone == trace(sample(ToyBackend(spec), "p", config, seed=7, num_samples=4))
    assert alone[:2] == trace(sample(ToyBackend(spec), "p", config, seed=7, num_samples=2))
    others = [replace(config, bon_tokens=b) for b in (1, 7, 20, 7)]  # other budgets, in one engine run
    beside = sample_many(
        ToyBackend(spec), [("q", 1), ("p", 7), ("r", 2), ("p", 7)], config, num_samples=4, configs=others
    )
    assert trace(beside[1]) == alone and trace(beside[3]) == alone
    assert trace(beside[2]) == trace(sample(ToyBackend(spec), "r", others[2], seed=2, num_samples=4))


def test_continuous_schedule_gives_the_same_samples():
    from support.toy import ContinuousToy

    spec = load_spec("early_eos")
    config = SamplerConfig(method="bon", max_new_tokens=3, bon_tokens=9)
    lockstep = sample(ToyBackend(spec), "p", config, seed=11, num_samples=12)
    continuous = sample(ContinuousToy(spec), "p", config, seed=11, num_samples=12)
    assert [r.to_dict() | {"wall_seconds": 0} for r in lockstep] == [
        r.to_dict() | {"wall_seconds": 0} for r in continuous
    ]


def test_job_configs_must_share_the_proposal():
    config = SamplerConfig(method="bon", max_new_tokens=3)
    with pytest.raises(Exception, match="one proposal"):
        sample_many(
            ToyBackend(load_spec("eos_trap")), [("p", 0)], config, configs=[replace(config, bon_temperature=0.5)]
        )


def test_registry_entry_and_budget():
    entry = registry.method("bon")
    assert entry.family == "bon" and entry.knobs == ("bon_tokens", "bon_temperature")
    config = SamplerConfig(method="bon", max_new_tokens=64, block_count=4, mcmc_steps=3, bon_temperature=0.7)
    assert bon.bon_budget(config) == math.ceil(3 * 64 * 64 / (4 * 16) + 64) == 256
    assert registry.proposal(config).temperature == 0.7 and registry.members(config) == 1
    assert registry.resolved(config)["proposal_temperature"] == 0.7


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--bon-tokens", "-1", "bon_tokens must be >= 0"),
        ("--bon-temperature", "0", "bon_temperature must be between"),
        ("--bon-temperature", "nan", "bon_temperature must be between"),
    ],
)
def test_bad_knobs_are_one_line_errors(flag, value, message, capsys):
    toy = ["--backend", "toy", "--toy-spec", str(SPECS / "eos_trap.json"), "--quiet"]
    assert main(["sample", "x", *toy, "--method", "bon", flag, value]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_cli_names_candidates(capsys):
    toy = ["--backend", "toy", "--toy-spec", str(SPECS / "no_early_eos.json"), "--quiet"]
    assert main(["sample", "x", *toy, "--method", "bon", "--max-new-tokens", "3", "--bon-tokens", "7"]) == 0
    assert "method=bon " in (out := capsys.readouterr().out) and "candidates=3 tokens_sampled=9" in out


def test_served_bon_is_the_api_sample_and_its_budget_is_bounded():
    from fastapi.testclient import TestClient

    from powersample.server.app import Settings, create_app

    spec = load_spec("eos_trap")
    app = create_app(ToyBackend(spec), Settings(allowed_hosts=("testserver",)))
    body = {"prompt": "x", "method": "bon", "max_tokens": 3, "seed": 3, "n": 2, "bon_tokens": 7}
    with TestClient(app) as client:
        reply = client.post("/v1/completions", json=body)
        huge = client.post("/v1/completions", json=body | {"bon_tokens": 10**12})
        steps = client.post("/v1/completions", json=body | {"bon_tokens": 0, "mcmc_steps": 10**6})
        enum = json.dumps(client.get("/openapi.json").json())
    assert reply.status_code == 200, reply.text
    ps = reply.json()["power_sampling"]
    want = sample(
        ToyBackend(spec),
        "x",
        SamplerConfig(method="bon", max_new_tokens=3, bon_tokens=7),
        seed=3,
        num_samples=2,
        chat=False,
    )
    assert ps["tokens_sampled"] == sum(r.tokens_generated for r in want) and ps["acceptance_rate"] is None
    assert [c["proposals"] for c in ps["chains"]] == [r.proposals for r in want]
    assert [c["acceptance_rate"] for c in ps["chains"]] == [None, None]  # candidates are no MH proposals
    assert [c["text"] for c in sorted(reply.json()["choices"], key=lambda c: c["index"])] == [r.text for r in want]
    assert huge.status_code == 400 and huge.json()["error"]["param"] == "bon_tokens"
    assert steps.status_code == 400 and steps.json()["error"]["param"] == "mcmc_steps"
    assert '"bon"' in enum and "bon_temperature" in enum


# --- eval --bon-match --------------------------------------------------------------------------------------------

T = 6  # eval_toy's max_new_tokens


@pytest.fixture
def power_run(tmp_path):
    spec = write_spec(tmp_path)
    rows = [{"problem": f"What is {i}?", "answer": str(i % 2 + 1), "id": f"p{i}"} for i in range(4)]
    data = write_jsonl(tmp_path / "math.jsonl", rows)
    run = tmp_path / "power"
    assert main(eval_argv(spec, data, run, "--seeds", "0-2")) == 0
    return spec, data, run


def bon_argv(spec: Path, data: Path, out: Path, match: Path, *extra: str) -> list[str]:
    return eval_argv(spec, data, out, "--method", "bon", "--bon-match", str(match), *extra)


def test_bon_match_spends_each_pairs_power_cost(power_run, tmp_path, capsys):
    spec, data, run = power_run
    costs = {(r["problem_id"], r["seed"]): r["tokens_generated"] for r in load_records(run)}
    out = {}
    for batch in ("1", "5"):
        out[batch] = tmp_path / f"bon{batch}"
        assert main(bon_argv(spec, data, out[batch], run, "--seeds", "0-2", "--batch", batch)) == 0
    records = load_records(out["5"])
    assert len(records) == 12 and len(set(costs.values())) > 1  # budgets differ per pair
    backend = ToyBackend(ToySpec.load(spec))
    for r in records:
        budget = costs[(r["problem_id"], r["seed"])]
        assert budget <= r["tokens_generated"] < budget + T and r["config"]["bon_tokens"] == budget
        config = SamplerConfig(method="bon", max_new_tokens=T, block_count=2, mcmc_steps=2, bon_tokens=budget)
        [want] = sample(backend, r["prompt"], config, seed=r["seed"])  # what `sample` gives for the pair
        assert r["tokens"] == list(want.tokens) and r["tokens_generated"] == want.tokens_generated
    key = lambda recs: sorted((r["problem_id"], r["seed"], r["tokens"]) for r in recs)  # noqa: E731
    assert key(load_records(out["1"])) == key(records)  # the batch changes no record
    identity = read_run(out["5"])["identity"]
    assert identity["bon_match"] == identity_hash(read_run(run)["identity"]) and identity["config"]["bon_tokens"] == 0
    # resuming against another match run is refused
    other = tmp_path / "power2"
    assert main(eval_argv(spec, data, other, "--seeds", "0-2", "--alpha", "2")) == 0
    capsys.readouterr()
    assert main(bon_argv(spec, data, out["5"], other, "--seeds", "0-2")) == 2
    err = capsys.readouterr().err
    assert "different config" in err and "bon_match" in err and err.count("\n") == 1


BAD_MATCH = [
    (("--seeds", "0-3"), "no record for 4 of the 16"),
    (("--method", "power"), "--bon-match needs --method bon"),
    (("--bon-tokens", "5"), "leave --bon-tokens at 0"),
    (("--raw",), "another chat"),
    (("OTHER_DATA",), "another data"),
    (("MISSING",), "is not a run directory"),
    (("EMPTY",), "--bon-match is empty"),
]


@pytest.mark.parametrize("extra, message", BAD_MATCH)
def test_bad_match_is_a_one_line_error_before_the_model_loads(extra, message, power_run, tmp_path, capsys):
    spec, data, run = power_run
    match = {"MISSING": tmp_path / "nowhere", "EMPTY": ""}.get(extra[0], run)
    if extra == ("--raw",):  # a match run made through a chat template (the toy has none: its runs say chat: false)
        header = json.loads((run / "run.json").read_text())
        (run / "run.json").write_text(json.dumps({**header, "identity": {**header["identity"], "chat": True}}))
    if extra == ("OTHER_DATA",):
        data = write_jsonl(tmp_path / "other.jsonl", [{"problem": "x", "answer": "1", "id": "p0"}])
    flags = [] if extra[0] in ("OTHER_DATA", "MISSING", "EMPTY") else list(extra)  # a later --method wins
    limit = [] if extra[0] == "--seeds" else ["--limit", "1"]
    argv = eval_argv(spec, data, tmp_path / "bon", "--method", "bon", "--bon-match", str(match), *limit, *flags)
    capsys.readouterr()
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("powersample: error:") and message in err, err
    assert not (tmp_path / "bon").exists()
