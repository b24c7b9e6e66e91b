"""`powersample eval` / `report` on the toy backend: records, resume after SIGKILL, config safety, shards, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.eval_toy import eval_argv
from support.toy import SPECS

from powersample import SamplerConfig, sample
from powersample.backends.toy import ToyBackend, ToySpec
from powersample.cli import main as run_eval_cli
from powersample.cli.eval import parse_seeds, parse_shard
from powersample.eval.records import load_records
from powersample.eval.runner import make_plan, run_eval
from powersample.eval.tasks import get_task

REPO = Path(__file__).resolve().parent.parent
# A toy "model" whose tokens are boxed answers, so records get graded both ways.
BOXED_SPEC = {
    "vocab": ["The answer is ", "\\boxed{1}", "\\boxed{\\frac12}", "<eos>"],
    "eos_id": 3,
    "default": [0.1, 0.4, 0.3, 0.2],
    "next": {"": [0.5, 0.3, 0.2, 0.0]},
}


@pytest.fixture
def files(tmp_path):
    spec = tmp_path / "boxed.json"
    spec.write_text(json.dumps(BOXED_SPEC))
    data = tmp_path / "math.jsonl"
    data.write_text(
        "".join(
            json.dumps({"problem": f"What is {i}/2?", "answer": "0.5" if i % 2 else "1", "id": f"p{i}"}) + "\n"
            for i in range(6)
        )
    )
    return spec, data


def toy(spec) -> list[str]:
    return ["--backend", "toy", "--toy-spec", str(spec)]


def read_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]


def test_records_hold_the_sample_the_grade_and_the_confidence(files, tmp_path, capsys):
    spec, data = files
    out = tmp_path / "run"
    assert run_eval_cli(eval_argv(spec, data, out, "--seeds", "0-2")) == 0
    assert "18 records (0 resumed)" in capsys.readouterr().out
    records = read_lines(out)
    assert len(records) == 18 and len({(r["problem_id"], r["seed"]) for r in records}) == 18
    backend = ToyBackend(ToySpec.load(spec))
    config = SamplerConfig(max_new_tokens=6, block_count=2, mcmc_steps=2)
    for r in records:
        assert {
            "prompt",
            "completion",
            "answer",
            "correct",
            "gold",
            "tokens",
            "token_logp",
            "logp",
            "finish_reason",
            "tokens_generated",
            "proposals",
            "accepted",
            "acceptance_rate",
            "wall_seconds",
            "config",
            "method",
            "seed",
            "task",
            "problem_id",
            "logp_per_token",
            "confidence",
            "grade_detail",
        } <= set(r)
        [want] = sample(backend, r["prompt"], config, seed=r["seed"])  # identical to a plain `sample` call
        assert r["tokens"] == list(want.tokens) and r["completion"] == want.text
        assert r["logp_per_token"] == pytest.approx(want.logp / len(want.tokens))
        conf = backend.confidence((), want.tokens)
        assert r["confidence"] == pytest.approx(sum(conf) / len(conf))
        assert r["correct"] == (r["answer"] is not None and (r["answer"] == "1") == (r["gold"] == "1"))
    assert {r["correct"] for r in records} == {True, False}


class NoConfidence:
    """A backend without the optional `confidence` method."""

    def __init__(self, inner):
        self._inner = inner
        self.eos_ids, self.context_length = inner.eos_ids, inner.context_length

    def __getattr__(self, name):
        if name == "confidence":
            raise AttributeError(name)
        return getattr(self._inner, name)


@pytest.mark.parametrize("method", ["power", "power-smc", "base"])
def test_records_do_not_depend_on_the_batch(method, files, tmp_path, capsys):
    """--batch N samples N (problem, seed) pairs through shared engine calls; each record is still exactly what
    `powersample sample --seed s` gives for its prompt."""
    spec, data = files
    runs = {}
    for batch in (1, 5):
        out = tmp_path / f"batch{batch}"
        argv = eval_argv(spec, data, out, "--seeds", "0-2", "--method", method, "--batch", str(batch))
        assert run_eval_cli(argv) == 0
        runs[batch] = sorted((r["problem_id"], r["seed"], r["tokens"], r["logp"]) for r in read_lines(out))
    assert runs[1] == runs[5] and len(runs[1]) == 18


def test_confidence_is_null_without_backend_support(files, tmp_path):
    spec, data = files
    task = get_task("math500")
    plan = make_plan(
        task,
        task.load(str(data), True),
        seeds=(0,),
        config=SamplerConfig(max_new_tokens=4),
        chat=True,
        backend={"name": "toy"},
        limit=2,
    )
    summary = run_eval(NoConfidence(ToyBackend(ToySpec.load(spec))), plan, tmp_path / "run", quiet=True)
    records = load_records(tmp_path / "run")
    assert summary.records == 2 and [r["confidence"] for r in records] == [None, None]


class Exploding(NoConfidence):
    """A backend whose engine fails from its (after + 1)-th extend call on."""

    def __init__(self, inner, after: int = 0):
        super().__init__(inner)
        self.calls, self.after = 0, after

    def extend(self, requests, proposal):
        self.calls += 1
        if self.calls > self.after:
            raise RuntimeError("engine exploded")
        return self._inner.extend(requests, proposal)


def test_a_run_that_fails_before_its_first_record_leaves_no_run_directory(files, tmp_path):
    spec, data = files
    task, toy = get_task("math500"), ToyBackend(ToySpec.load(spec))

    def run(out, seeds, backend):
        plan = make_plan(
            task,
            task.load(str(data), True),
            seeds=seeds,
            chat=True,
            backend={"name": "toy"},
            limit=3,
            config=SamplerConfig(method="base", max_new_tokens=4),
        )
        return run_eval(backend, plan, out, quiet=True)

    with pytest.raises(RuntimeError, match="engine exploded"):  # as the hf engine crashed on a first batch
        run(tmp_path / "new" / "run", (0,), Exploding(toy))
    assert not (tmp_path / "new" / "run").exists() and (tmp_path / "new").exists()
    given = tmp_path / "given"  # --output-dir made by the user: kept, and left empty
    given.mkdir()
    with pytest.raises(RuntimeError):
        run(given, (0,), Exploding(toy))
    assert given.is_dir() and not list(given.iterdir())
    assert run(given, (0,), toy).records == 3  # a later run starts afresh there
    before = {p.name: p.read_bytes() for p in given.iterdir()}
    with pytest.raises(RuntimeError):  # resuming with one more seed, failing at once: the run is kept whole
        run(given, (0, 1), Exploding(toy))
    assert {p.name: p.read_bytes() for p in given.iterdir()} == before
    with pytest.raises(RuntimeError):  # failing after this run's first record: kept
        run(tmp_path / "later", (0,), Exploding(toy, after=1))
    assert len(load_records(tmp_path / "later")) == 1


def test_rerun_skips_finished_records_and_extends(files, tmp_path, capsys):
    spec, data = files
    out = tmp_path / "run"
    assert run_eval_cli(eval_argv(spec, data, out, "--seeds", "0-1")) == 0
    first = (out / "records.jsonl").read_text()
    assert run_eval_cli(eval_argv(spec, data, out, "--seeds", "0-1")) == 0
    assert (out / "records.jsonl").read_text() == first  # nothing redone
    assert run_eval_cli(eval_argv(spec, data, out, "--seeds", "0-2")) == 0  # one more seed: only the new records
    assert "18 records (12 resumed)" in capsys.readouterr().out.splitlines()[-1]
    assert (out / "records.jsonl").read_text().startswith(first) and len(read_lines(out)) == 18


def test_a_different_config_is_refused(files, tmp_path, capsys):
    spec, data = files
    out = tmp_path / "run"
    assert run_eval_cli(eval_argv(spec, data, out)) == 0
    before = (out / "records.jsonl").read_text()
    capsys.readouterr()
    for extra in (["--alpha", "2"], ["--method", "base"], ["--code-timeout", "3"]):  # --raw: test_eval_chat.py
        assert run_eval_cli(eval_argv(spec, data, out, *extra)) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "different config" in err
    other_data = tmp_path / "other.json"
    other_data.write_text(json.dumps([{"problem": "x", "answer": "1"}]))
    assert run_eval_cli(eval_argv(spec, other_data, out)) == 2 and "data" in capsys.readouterr().err
    assert (out / "records.jsonl").read_text() == before


def test_limit_and_shards_split_the_problems(files, tmp_path, capsys):
    spec, data = files
    out = tmp_path / "run"
    for shard in ("0/2", "1/2"):
        assert run_eval_cli(eval_argv(spec, data, out, "--limit", "5", "--shard", shard, "--seeds", "0,3")) == 0
    files_written = sorted(p.name for p in out.glob("records*.jsonl"))
    assert files_written == ["records.shard-0-of-2.jsonl", "records.shard-1-of-2.jsonl"]
    keys = sorted((r["problem_id"], r["seed"]) for r in load_records(out))
    assert keys == sorted((f"p{i}", s) for i in range(5) for s in (0, 3))
    assert run_eval_cli(eval_argv(spec, data, out, "--limit", "5", "--seeds", "0,3")) == 0  # unsharded: all done
    assert "10 records (10 resumed)" in capsys.readouterr().out.splitlines()[-1]


def test_resume_after_sigkill_loses_nothing_and_duplicates_nothing(tmp_path):
    spec = tmp_path / "boxed.json"
    spec.write_text(json.dumps(BOXED_SPEC))
    data = tmp_path / "math.json"
    data.write_text(json.dumps([{"problem": f"q{i}", "answer": str(i % 3)} for i in range(100)]))
    argv = [sys.executable, "-m", "powersample.cli", *eval_argv(spec, data, tmp_path / "run", "--seeds", "0-19")]
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    records = tmp_path / "run" / "records.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if records.exists() and records.read_bytes().count(b"\n") >= 30:
            break
        time.sleep(0.005)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-500:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with open(records, "ab") as f:  # as if killed in the middle of a line
        f.write(b'{"problem_id": "0", "seed": 5, "tok')
    killed_at = len(load_records(tmp_path / "run"))
    assert 30 <= killed_at < 2000
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"2000 records ({killed_at} resumed)" in done.stdout
    lines = records.read_text().splitlines()
    rows = [json.loads(line) for line in lines]  # every line parses: the torn one was cut off
    keys = [(r["problem_id"], r["seed"]) for r in rows]
    assert len(keys) == len(set(keys)) == 2000
    clean = tmp_path / "clean"
    argv_clean = [sys.executable, "-m", "powersample.cli", *eval_argv(spec, data, clean, "--seeds", "0-19")]
    assert subprocess.run(argv_clean, cwd=REPO, capture_output=True, timeout=300).returncode == 0
    want = {(r["problem_id"], r["seed"]): (r["tokens"], r["correct"]) for r in load_records(clean)}
    assert {k: (r["tokens"], r["correct"]) for k, r in zip(keys, rows, strict=True)} == want


def test_humaneval_run_survives_hostile_programs(tmp_path, capsys):
    """Completions that loop, allocate 10 GB or write outside their directory fail; the run goes on."""
    data = tmp_path / "he.jsonl"
    data.write_text(
        json.dumps(
            {
                "task_id": "T/0",
                "prompt": "def one():\n",
                "entry_point": "one",
                "test": "def check(f):\n    assert f() == 1\n",
            }
        )
        + "\n"
    )
    escape = tmp_path / "escaped.txt"
    vocab = [
        "    while True: pass\n",
        "    x = bytearray(10 * 1024 ** 3)\n",
        f"    open({str(escape)!r}, 'w').write('x')\n",
        "    return 1\n",
        "<eos>",
    ]
    spec = tmp_path / "code.json"
    spec.write_text(
        json.dumps(
            {"vocab": vocab, "eos_id": 4, "default": [0, 0, 0, 0, 1.0], "next": {"": [0.25, 0.25, 0.25, 0.25, 0]}}
        )
    )
    out = tmp_path / "run"
    argv = [
        "eval",
        "--task",
        "humaneval",
        "--data",
        str(data),
        *toy(spec),
        "--method",
        "base",
        "--raw",
        "--max-new-tokens",
        "2",
        "--seeds",
        "0-11",
        "--code-timeout",
        "2",
        "--output-dir",
        str(out),
        "--quiet",
    ]
    assert run_eval_cli(argv) == 0
    records = load_records(out)
    assert len(records) == 12 and not escape.exists()
    for r in records:
        assert r["correct"] == (r["completion"] == "    return 1\n"), r
    assert len({r["completion"] for r in records}) >= 3


def test_alpacaeval_run_writes_outputs(tmp_path):
    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps([{"instruction": f"Say {w}."} for w in ("hi", "bye")]))
    out = tmp_path / "run"
    argv = [
        "eval",
        "--task",
        "alpacaeval",
        "--data",
        str(data),
        *toy(SPECS / "early_eos.json"),
        "--seeds",
        "0-1",
        "--max-new-tokens",
        "4",
        "--output-dir",
        str(out),
        "--quiet",
    ]
    assert run_eval_cli(argv) == 0
    rows = json.loads((out / "alpaca_eval_outputs.seed1.json").read_text())
    assert [r["instruction"] for r in rows] == ["Say hi.", "Say bye."]
    assert all(set(r) == {"instruction", "output", "generator", "dataset"} for r in rows)


def test_report_table_and_plots(files, tmp_path, capsys):
    spec, data = files
    runs = []
    for extra in (["--alpha", "1"], ["--alpha", "4"], ["--method", "base"], ["--mcmc-steps", "4"]):
        runs.append(tmp_path / f"run{len(runs)}")
        argv = eval_argv(spec, data, runs[-1], "--seeds", "0-3", *extra)
        argv[argv.index("--mcmc-steps") + 1] = extra[1] if extra[0] == "--mcmc-steps" else "2"
        assert run_eval_cli(argv) == 0
    capsys.readouterr()
    plots = tmp_path / "plots"
    assert run_eval_cli(["report", *map(str, runs), "--plot-dir", str(plots)]) == 0
    out = capsys.readouterr().out
    table, paired, votes, lengths = out.strip().split("\n\n## ")  # the table, then its three sections
    lines = table.splitlines()
    assert paired.startswith("Paired comparisons") and lengths.startswith("Output lengths")
    assert votes.startswith("Majority vote (maj@k) and pass@k") and "| power alpha=4.0 mcmc_steps=2 | 4 |" in votes
    assert lines[0].startswith("| task | method | n | accuracy (95% CI)") and len(lines) == 2 + 4
    assert any("| power alpha=1.0 mcmc_steps=2 |" in line for line in lines)
    assert any("| base |" in line for line in lines)
    assert any("mcmc_steps=4" in line for line in lines)
    names = {p.name for p in plots.glob("*.png")}
    assert names == {
        "passk_math500.png",
        "loglik_math500.png",
        "confidence_math500.png",
        "lengths_math500.png",
        "acc_vs_alpha_math500.png",
        "acc_vs_mcmc_steps_math500.png",
    }
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in plots.glob("*.png"))
    assert (plots / "report.md").read_text().strip() == out.strip()
    assert run_eval_cli(["report", str(tmp_path / "nothing-here"), "--no-plots"]) == 2


BAD = [
    (["--task", "mmlu"], "unknown task"),
    (["--task", "math500", "--data", "/nonexistent/math.json"], "cannot read"),
    (["--task", "math500", "--data", "MALFORMED"], "neither JSON nor JSONL"),
    (["--task", "gpqa"], "gated"),
    (["--task", "math500", "--data", "GOOD", "--shard", "2/2"], "--shard"),
    (["--task", "math500", "--data", "GOOD", "--shard", "x"], "--shard"),
    (["--task", "math500", "--data", "GOOD", "--seeds", "3-1"], "--seeds"),
    (["--task", "math500", "--data", "GOOD", "--seeds", "a,b"], "--seeds"),
    (["--task", "math500", "--data", "GOOD", "--limit", "0"], "--limit"),
    (["--task", "math500", "--data", "GOOD", "--alpha", "0"], "alpha"),
    (["--task", "math500", "--data", "GOOD", "--code-timeout", "0"], "code-timeout"),
    (["--task", "math500", "--data", "GOOD", "--batch", "0"], "--batch"),
]


@pytest.mark.parametrize("args, word", BAD)
def test_bad_input_is_one_line_and_exit_2(args, word, files, tmp_path, capsys):
    spec, data = files
    malformed = tmp_path / "bad.json"
    malformed.write_text("{[oops")
    args = [str(data) if a == "GOOD" else str(malformed) if a == "MALFORMED" else a for a in args]
    code = run_eval_cli(["eval", *args, *toy(spec), "--output-dir", str(tmp_path / "run"), "--quiet"])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("powersample: error:") and word in err, err
    assert not (tmp_path / "run").exists()


def test_module_entry_point_reports_errors(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "powersample.cli", "eval", "--task", "nope"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (
        done.returncode == 2
        and done.stderr.strip()
        == "powersample: error: unknown task 'nope'; choose one of math500, humaneval, gpqa, alpacaeval"
    )


def test_parse_seeds_and_shard():
    assert parse_seeds("0-7") == tuple(range(8))
    assert parse_seeds("0,2,5") == (0, 2, 5) and parse_seeds("3") == (3,) and parse_seeds("5, 0-2,2") == (0, 1, 2, 5)
    assert parse_shard("0/4") == (0, 4) and parse_shard("3/4") == (3, 4) and parse_shard(None) is None


def test_one_writer_per_records_file(tmp_path):
    from powersample.errors import PowerSampleError
    from powersample.eval.records import RecordWriter

    path = tmp_path / "records.jsonl"
    hold = "import fcntl, sys, time\nf = open(sys.argv[1] + '.lock', 'a')\nfcntl.flock(f, fcntl.LOCK_EX)\n"
    hold += "print('locked', flush=True)\n"
    holder = subprocess.Popen([sys.executable, "-c", hold + "time.sleep(60)", str(path)], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"locked\n"
        with pytest.raises(PowerSampleError, match="another eval is writing"):
            RecordWriter(path)
    finally:
        holder.kill()
        holder.wait()
    with RecordWriter(path) as writer:  # free once the other process is gone
        writer.write({"problem_id": "b", "seed": 0})
    assert path.read_text().count("\n") == 1


def test_add_eval_parsers_plugs_into_another_parser(files, tmp_path):
    import argparse

    from powersample.cli.eval import add_eval_parsers

    parser = argparse.ArgumentParser(prog="powersample")
    add_eval_parsers(parser.add_subparsers(dest="command", required=True))
    spec, data = files
    args = parser.parse_args(eval_argv(spec, data, tmp_path / "run", "--seeds", "0-1", "--limit", "2"))
    assert args.handler(args) == 0 and len(load_records(tmp_path / "run")) == 4
    args = parser.parse_args(["report", str(tmp_path / "run"), "--no-plots"])
    assert args.handler(args) == 0


def test_a_run_made_before_a_sampler_field_existed_resumes(files, tmp_path, capsys):
    """A run.json written before power-pt's knobs were declared has no `replicas`: at its default, the run resumes;
    set otherwise, it is another config."""
    spec, data = files
    out = tmp_path / "run"
    assert run_eval_cli(eval_argv(spec, data, out, "--seeds", "0")) == 0
    run = json.loads((out / "run.json").read_text())
    for name in ("replicas", "alphas", "alpha_min"):
        del run["identity"]["config"][name]
    (out / "run.json").write_text(json.dumps(run))
    before = (out / "records.jsonl").read_text()
    assert run_eval_cli(eval_argv(spec, data, out, "--seeds", "0")) == 0
    assert (out / "records.jsonl").read_text() == before  # nothing redone
    capsys.readouterr()
    assert run_eval_cli(eval_argv(spec, data, out, "--seeds", "0", "--replicas", "2")) == 2
    assert "replicas" in capsys.readouterr().err
