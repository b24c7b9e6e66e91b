"""Majority voting: grouping answers by the task's rule, the tie-break, maj@k against brute force, `eval
--vote-match` end to end on the toy backend (records, resume, batching, bad input), and the report's sections."""

from __future__ import annotations

import json
import math
from collections import Counter
from itertools import combinations
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.eval_toy import eval_argv, write_jsonl, write_spec

from powersample import SamplerConfig, sample
from powersample.backends.toy import ToyBackend, ToySpec
from powersample.cli import main
from powersample.eval import voting
from powersample.eval.records import identity_hash, load_records, read_run
from powersample.eval.report import build_report
from powersample.eval.rows import Row
from powersample.eval.tasks import GradeOptions, get_task
from powersample.eval.vote_match import MAX_VOTE_SEED, sample_seed
from powersample.eval.vote_report import ks, maj_section

T = 6  # eval_toy's max_new_tokens


# --- grouping --------------------------------------------------------------------------------------------------


def math_same(a: str, b: str) -> bool:
    return get_task("math500").vote.same(a, b, GradeOptions())


def test_math500_groups_equivalent_answers_not_equal_strings():
    answers = ["1/2", "2", "0.5", None, "\\frac{1}{2}", "\\dfrac12", "2.0", "x^2+1", "1+x^2"]
    assert voting.group_answers(answers, math_same) == [0, 1, 0, None, 0, 0, 1, 2, 2]


def test_gpqa_groups_by_letter():
    same = lambda a, b: get_task("gpqa").vote.same(a, b, GradeOptions())  # noqa: E731
    assert voting.group_answers(["B", "A", "B", None, "D", "A"], same) == [0, 1, 0, None, 2, 1]


def test_tasks_declare_their_vote_rule():
    assert get_task("math500").vote.name.startswith("math-verify")
    assert get_task("gpqa").vote.name == "the letter"
    assert get_task("humaneval").vote is None and "tests" in get_task("humaneval").no_vote


def test_a_repeated_answer_is_compared_once():
    calls = []

    def same(a, b):
        calls.append((a, b))
        return a == b

    assert voting.group_answers(["x", "y", "x", "y", "x"], same) == [0, 1, 0, 1, 0]
    assert calls == [("x", "y")]


# --- the vote and its tie-break --------------------------------------------------------------------------------


def ballots(answers, correct, scores):
    return voting.ballots(answers, correct, scores, lambda a, b: a == b)


def test_most_votes_win():
    b = ballots(["1", "2", "2", None, None], [True, False, False, False, False], [-0.1, -5, -5, -0.1, -0.1])
    assert voting.vote(b) == 1 and not voting.tie_broken(b) and voting.maj_at_k(b, 5) == 0.0


def test_a_tie_goes_to_the_highest_mean_log_p_then_to_the_earliest_group():
    # "1" and "2" have two votes each; "2"'s samples have the higher mean log p per token (-0.3 against -0.5)
    b = ballots(["1", "2", "1", "2", "3"], [True, False, True, False, False], [-0.2, -0.5, -0.8, -0.1, 0.0])
    assert voting.vote(b) == 1 and voting.tie_broken(b)
    # the mean, not the best sample: "1" holds the best sample (-0.05) but the lower mean (-0.525 against -0.3)
    b = ballots(["1", "2", "1", "2"], [True, False, True, False], [-0.05, -0.5, -1.0, -0.1])
    assert voting.vote(b) == 1
    # an exact tie in both: the answer given first
    b = ballots(["2", "1", "1", "2"], [False, True, True, False], [-0.5, -0.5, -0.5, -0.5])
    assert voting.vote(b) == 0


def test_no_answer_no_vote():
    b = ballots([None, None], [False, False], [None, -1.0])
    assert voting.vote(b) == -1 and voting.maj_at_k(b, 1) == 0.0 and voting.maj_at_k(b, 2) == 0.0


def brute_vote(answers, correct, scores):
    """The rule, written out: most votes, then the highest mean log p per token, then the answer given first."""
    voters = [i for i, a in enumerate(answers) if a is not None]
    if not voters:
        return False
    counts = Counter(answers[i] for i in voters)
    top = max(counts.values())
    order = list(dict.fromkeys(answers[i] for i in voters))
    tied = [a for a in order if counts[a] == top]

    def mean(a):
        return math.fsum(scores[i] for i in voters if answers[i] == a) / counts[a]

    best = max(tied, key=lambda a: (mean(a), -order.index(a)))
    return correct[answers.index(best)]


def brute_maj(answers, correct, scores, k):
    subsets = list(combinations(range(len(answers)), k))
    wins = [brute_vote([answers[i] for i in s], [correct[i] for i in s], [scores[i] for i in s]) for s in subsets]
    return sum(wins) / len(subsets)


problems = st.integers(1, 8).flatmap(
    lambda n: st.tuples(
        st.lists(st.sampled_from(["1", "2", "3", None]), min_size=n, max_size=n),
        st.lists(st.sampled_from([-0.5, -0.25, -1.0, -2.0]), min_size=n, max_size=n),  # ties happen
        st.integers(1, n),
    )
)


@settings(max_examples=150, deadline=None)
@given(problems)
def test_maj_at_k_is_the_mean_vote_over_all_k_subsets(problem):
    answers, scores, k = problem
    correct = [a == "2" for a in answers]
    b = ballots(answers, correct, scores)
    assert voting.maj_at_k(b, k) == pytest.approx(brute_maj(answers, correct, scores, k), abs=1e-12)
    if k == 1:  # maj@1 is pass@1
        assert voting.maj_at_k(b, 1) == pytest.approx(sum(correct) / len(correct))


def test_many_subsets_are_estimated_from_seeded_random_ones(monkeypatch):
    answers = ["1", "2", "2", "1", "3", "2", "1", None, "2", "1", "1", "3"]
    correct = [a == "1" for a in answers]
    scores = [-0.1 * i for i in range(12)]
    b = ballots(answers, correct, scores)
    exact = voting.maj_at_k(b, 6, "p")  # C(12, 6) = 924 subsets: enumerated
    assert exact == pytest.approx(brute_maj(answers, correct, scores, 6))
    monkeypatch.setattr(voting, "MAX_SUBSETS", 400)
    estimate = voting.maj_at_k(b, 6, "p")
    assert estimate == voting.maj_at_k(b, 6, "p") and abs(estimate - exact) < 0.08  # seeded, and close
    assert voting.k_subsets(12, 6, "p").shape == (400, 6)
    assert all(len(set(row)) == 6 for row in voting.k_subsets(12, 6, "p").tolist())


def test_ks_double_up_to_the_samples():
    assert ks(1) == [1] and ks(4) == [1, 2, 4] and ks(6) == [1, 2, 4, 6] and ks(0) == []


# --- eval --vote-match ------------------------------------------------------------------------------------------


@pytest.fixture
def power_run(tmp_path):
    spec = write_spec(tmp_path)
    rows = [{"problem": f"What is {i}?", "answer": str(i % 2 + 1), "id": f"p{i}"} for i in range(4)]
    data = write_jsonl(tmp_path / "math.jsonl", rows)
    run = tmp_path / "power"
    assert main(eval_argv(spec, data, run, "--seeds", "0-2")) == 0
    return spec, data, run


def vote_argv(spec: Path, data: Path, out: Path, match: Path, *extra: str) -> list[str]:
    return eval_argv(spec, data, out, "--method", "base", "--vote-match", str(match), *extra)


def comparable(records):
    return sorted((r["problem_id"], r["seed"], r["tokens"], r["vote"], r["answer"], r["correct"]) for r in records)


def test_vote_match_draws_each_pairs_power_cost_and_votes(power_run, tmp_path):
    spec, data, run = power_run
    costs = {(r["problem_id"], r["seed"]): r["tokens_generated"] for r in load_records(run)}
    out = {}
    for batch in ("1", "5"):
        out[batch] = tmp_path / f"vote{batch}"
        assert main(vote_argv(spec, data, out[batch], run, "--seeds", "0-2", "--batch", batch)) == 0
    records = load_records(out["5"])
    assert len(records) == 12 and comparable(load_records(out["1"])) == comparable(records)  # batch changes nothing
    backend = ToyBackend(ToySpec.load(spec))
    base = SamplerConfig(method="base", max_new_tokens=T, block_count=2, mcmc_steps=2)
    for r in records:
        vote = r["vote"]
        budget, samples = costs[(r["problem_id"], r["seed"])], vote["samples"]
        assert vote["budget"] == budget and r["proposals"] == len(samples) and r["accepted"] == 0
        spent = [len(s["tokens"]) for s in samples]
        assert r["tokens_generated"] == sum(spent) and sum(spent[:-1]) < budget <= sum(spent)  # the crossing one
        for j, s in enumerate(samples):  # sample j is what `sample --seed s + j * 2^32` draws
            [want] = sample(backend, r["prompt"], base, seed=sample_seed(r["seed"], j))
            assert s["tokens"] == list(want.tokens)
        b = ballots(
            [s["answer"] for s in samples], [s["correct"] for s in samples], [s["logp_per_token"] for s in samples]
        )
        won = voting.vote(b)
        assert r["correct"] == (won >= 0 and b.right[won]) and vote["groups"] == len(b.right)
        assert r["answer"] == (samples[b.groups.index(won)]["answer"] if won >= 0 else None)
        assert r["tokens"] == samples[vote["shown"]]["tokens"]
    [first] = sample(backend, records[0]["prompt"], base, seed=records[0]["seed"])
    assert records[0]["vote"]["samples"][0]["tokens"] == list(first.tokens)  # sample 0: the pair's own seed
    identity = read_run(out["5"])["identity"]
    assert identity["vote_match"] == identity_hash(read_run(run)["identity"]) and "bon_match" not in identity


def test_vote_match_resumes(power_run, tmp_path, capsys):
    spec, data, run = power_run
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert main(vote_argv(spec, data, whole, run, "--seeds", "0-2")) == 0
    assert main(vote_argv(spec, data, part, run, "--seeds", "0-2", "--limit", "2")) == 0
    lines = (part / "records.jsonl").read_text().splitlines(keepends=True)
    (part / "records.jsonl").write_text("".join(lines[:-1]) + lines[-1][:40])  # a torn last record
    capsys.readouterr()
    assert main(vote_argv(spec, data, part, run, "--seeds", "0-2")) == 0
    assert "12 records (5 resumed)" in capsys.readouterr().out
    assert comparable(load_records(part)) == comparable(load_records(whole))
    other = tmp_path / "power2"  # resuming against another match run is refused
    assert main(eval_argv(spec, data, other, "--seeds", "0-2", "--alpha", "2")) == 0
    capsys.readouterr()
    assert main(vote_argv(spec, data, part, other, "--seeds", "0-2")) == 2
    err = capsys.readouterr().err
    assert "different config" in err and "vote_match" in err and err.count("\n") == 1


BAD_VOTE = [
    ("MISSING", (), "--vote-match: ", "is not a run directory"),
    ("NOT_A_RUN", (), "--vote-match: ", "is not a run directory"),
    ("EMPTY", (), "--vote-match is empty", ""),
    ("RUN", ("--method", "power"), "--vote-match draws with --method base or low-temp", "not power"),
    ("RUN", ("--seeds", "0-3"), "--vote-match", "no record for 4 of the 16"),
    ("RUN", ("--seeds", str(MAX_VOTE_SEED)), "--vote-match needs seeds below", ""),
    ("RUN", ("--bon-match", "RUN"), "--bon-match and --vote-match exclude each other", ""),
]


@pytest.mark.parametrize("where, extra, message, more", BAD_VOTE)
def test_bad_vote_match_is_a_one_line_error_before_the_model_loads(
    where, extra, message, more, power_run, tmp_path, capsys
):
    spec, data, run = power_run
    (tmp_path / "plain").mkdir()
    match = {"MISSING": tmp_path / "nowhere", "NOT_A_RUN": tmp_path / "plain", "EMPTY": "", "RUN": run}[where]
    extra = tuple(str(run) if x == "RUN" else x for x in extra)
    limit = () if "--seeds" in extra else ("--limit", "1")
    capsys.readouterr()
    assert main(vote_argv(spec, data, tmp_path / "vote", match, *limit, *extra)) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("powersample: error:"), err
    assert message in err and more in err, err
    assert not (tmp_path / "vote").exists()


def test_humaneval_has_no_vote(tmp_path, capsys):
    spec = write_spec(tmp_path)
    row = {"task_id": "h0", "prompt": "def f():\n", "test": "def check(c):\n    pass\n", "entry_point": "f"}
    data = write_jsonl(tmp_path / "he.jsonl", [row])
    argv = eval_argv(spec, data, tmp_path / "vote", "--method", "base", "--vote-match", str(tmp_path))
    argv[argv.index("math500")] = "humaneval"
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "humaneval has no majority vote" in err and err.count("\n") == 1


# --- the report --------------------------------------------------------------------------------------------------


def section(report: str, title: str) -> str:
    return report.split(f"## {title}")[1].split("\n## ")[0]


def test_report_shows_maj_at_k_and_pairs_the_vote_with_its_matched_run(power_run, tmp_path):
    spec, data, run = power_run
    vote = tmp_path / "vote"
    assert main(vote_argv(spec, data, vote, run, "--seeds", "0-2")) == 0
    report, _ = build_report([run, vote], None)
    maj = section(report, "Majority vote (maj@k) and pass@k")
    lines = [line for line in maj.splitlines() if line.startswith("| math500 |")]
    assert [line.split(" | ")[2] for line in lines] == ["1", "2", "3"]  # k = 1, 2, then the 3 seeds; no vote row
    assert all(" power " in line for line in lines) and "highest mean log p per token" in maj
    k1 = lines[0].split(" | ")
    assert k1[4].split()[0] == k1[5].split()[0]  # maj@1 = pass@1
    matched = section(report, "Power vs a vote at equal tokens")
    [line] = [line for line in matched.splitlines() if line.startswith("| math500 |")]
    cells = line.split(" | ")
    assert cells[1] == "power" and cells[2] == "vote base" and cells[3] == "12 (4)"
    costs = [r["tokens_generated"] for r in load_records(run)]
    assert float(cells[4]) == pytest.approx(sum(costs) / 12, abs=0.05) and float(cells[5]) >= float(cells[4])
    ties = [r["vote"]["tie_break"] for r in load_records(vote)]
    assert float(cells[7]) == pytest.approx(sum(ties) / 12, abs=0.0005)
    alone, _ = build_report([vote], None)
    assert "is not in this report" in section(alone, "Power vs a vote at equal tokens")


def test_report_says_humaneval_has_no_vote():
    record = {"problem_id": "h0", "seed": 0, "correct": True, "answer": "x", "logp_per_token": -1.0}
    row = Row("humaneval", "base", {}, (record,), {"task": "humaneval"})
    assert "humaneval: no majority vote (programs are graded by tests" in maj_section([row])


def test_a_damaged_vote_is_a_one_line_error(power_run, tmp_path, capsys):
    spec, data, run = power_run
    vote = tmp_path / "vote"
    assert main(vote_argv(spec, data, vote, run, "--limit", "1")) == 0
    record = json.loads((vote / "records.jsonl").read_text())
    record["vote"]["samples"][0]["tokens"] = "many"
    (vote / "records.jsonl").write_text(json.dumps(record) + "\n")
    capsys.readouterr()
    assert main(["report", str(vote), "--no-plots"]) == 2
    err = capsys.readouterr().err
    assert "vote sample 0 has a bad 'tokens'" in err and err.count("\n") == 1


GPQA_SPEC = {
    "vocab": ["The answer is", " A", " B", "<eos>"],
    "eos_id": 3,
    "default": [0.1, 0.4, 0.3, 0.2],
    "next": {"": [0.6, 0.2, 0.2, 0.0]},
}


def test_gpqa_votes_by_letter_end_to_end(tmp_path):
    spec = tmp_path / "gpqa_spec.json"
    spec.write_text(json.dumps(GPQA_SPEC))
    header = "Record ID,Question,Correct Answer,Incorrect Answer 1,Incorrect Answer 2,Incorrect Answer 3\n"
    rows = "".join(f"q{i},Which is {i}?,{i},x{i},y{i},z{i}\n" for i in range(3))
    data = tmp_path / "gpqa.csv"
    data.write_text(header + rows)
    run, vote = tmp_path / "power", tmp_path / "vote"

    def argv(out, *extra):
        args = eval_argv(spec, data, out, "--seeds", "0-3", *extra)
        args[args.index("math500")] = "gpqa"
        return args

    assert main(argv(run)) == 0
    assert main(argv(vote, "--method", "base", "--vote-match", str(run))) == 0
    for r in load_records(vote):
        letters = [s["answer"] for s in r["vote"]["samples"]]
        assert set(letters) <= {"A", "B", None} and r["answer"] in (*letters, None)
        voters = Counter(a for a in letters if a is not None)
        if voters:
            assert voters[r["answer"]] == max(voters.values()) == r["vote"]["votes"]
            assert r["vote"]["groups"] == len(voters)
    report, _ = build_report([run, vote], None)
    assert "the letter (gpqa)" in section(report, "Majority vote (maj@k) and pass@k")
    assert "| gpqa | power | vote base | 12 (3) |" in section(report, "Power vs a vote at equal tokens")


@pytest.mark.slow
def test_vote_match_on_the_embedded_model(tmp_path):
    """The embedded model through llama.cpp, two MATH500 problems, T = 16: a power run, a vote at its tokens."""
    from support.toy import SHARED_DATA

    pytest.importorskip("llama_cpp")
    math500 = SHARED_DATA / "MATH500.json"
    if not math500.exists():
        pytest.skip(f"shared data file {math500} is absent")
    small = ["--task", "math500", "--data", str(math500), "--backend", "llamacpp", "--limit", "2", "--seeds", "0-1"]
    small += ["--max-new-tokens", "16", "--block-count", "2", "--mcmc-steps", "1", "--quiet"]
    run, vote = tmp_path / "power", tmp_path / "vote"
    assert main(["eval", *small, "--output-dir", str(run)]) == 0
    assert main(["eval", *small, "--method", "base", "--vote-match", str(run), "--output-dir", str(vote)]) == 0
    costs = {(r["problem_id"], r["seed"]): r["tokens_generated"] for r in load_records(run)}
    records = load_records(vote)
    assert len(records) == 4
    for r in records:
        spent = [len(s["tokens"]) for s in r["vote"]["samples"]]
        assert sum(spent[:-1]) < costs[(r["problem_id"], r["seed"])] == r["vote"]["budget"] <= sum(spent)
    report, _ = build_report([run, vote], None)
    assert "| math500 | power | vote base | 4 (2) |" in section(report, "Power vs a vote at equal tokens")
