"""Issue 12 on the eval side: duplicate problem ids (C6), and every bad input of eval and report is a one-line
error with exit 2 (C1-C4), never a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support.eval_toy import eval_argv, write_jsonl, write_spec

from powersample.cli import main
from powersample.errors import PowerSampleError
from powersample.eval.records import load_records


@pytest.fixture
def spec(tmp_path) -> Path:
    return write_spec(tmp_path)


def one_line_error(capsys, *words: str) -> str:
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and err.startswith("powersample: error:"), err
    assert "Traceback" not in err and all(w in err for w in words), err
    return err


# --- C6: duplicate problem ids ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rows, places",
    [
        ([{"problem": "1+1", "answer": "2", "id": "p"}, {"problem": "3+3", "answer": "6", "id": "p"}], "lines 1 and 2"),
        ([{"problem": "1+1", "answer": "2"}, {"problem": "3+3", "answer": "6", "id": "0"}], "lines 1 and 2"),
        (
            [
                {"problem": "a", "answer": "1", "id": "x"},
                {"problem": "b", "answer": "1"},
                {"problem": "c", "answer": "1", "id": "x"},
            ],
            "lines 1 and 3",
        ),
    ],
)
def test_duplicate_problem_ids_are_refused(rows, places, spec, tmp_path, capsys):
    data = write_jsonl(tmp_path / "dup.jsonl", rows)
    assert main(eval_argv(spec, data, tmp_path / "run")) == 2
    one_line_error(capsys, str(data), "duplicate problem id", places)
    assert not (tmp_path / "run").exists()


def test_duplicate_ids_in_a_json_list_name_the_records(spec, tmp_path, capsys):
    data = tmp_path / "dup.json"
    data.write_text(
        json.dumps(
            [
                {"problem": "1+1", "answer": "2", "id": "p"},
                {"problem": "3", "answer": "3"},
                {"problem": "3+3", "answer": "6", "id": "p"},
            ]
        )
    )
    assert main(eval_argv(spec, data, tmp_path / "run")) == 2
    one_line_error(capsys, "duplicate problem id 'p'", "records 1 and 3")


def test_duplicate_ids_in_gpqa_and_alpacaeval(spec, tmp_path, capsys):
    from powersample.eval.tasks.gpqa import COLUMNS

    csv = tmp_path / "gpqa.csv"
    row = "Q?,right,w1,w2,w3,r1"
    csv.write_text(",".join(COLUMNS) + ",Record ID\n" + row + "\n" + row + "\n")
    argv = eval_argv(spec, csv, tmp_path / "run")
    argv[argv.index("math500")] = "gpqa"
    assert main(argv) == 2
    one_line_error(capsys, "duplicate problem id 'r1'", "rows 2 and 3")
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": "a", "id": 1}, {"instruction": "b"}, {"instruction": "c", "id": 1}]))
    argv = eval_argv(spec, alpaca, tmp_path / "run")
    argv[argv.index("math500")] = "alpacaeval"
    assert main(argv) == 2
    one_line_error(capsys, "duplicate problem id '1'", "records 1 and 2")


def test_duplicate_ids_in_humaneval_data(tmp_path):
    from powersample.eval.tasks import get_task

    row = {"task_id": "t/1", "prompt": "def f():\n", "test": "def check(f):\n    pass\n", "entry_point": "f"}
    data = write_jsonl(tmp_path / "he.jsonl", [row, {**row, "prompt": "def g():\n"}])
    with pytest.raises(PowerSampleError, match=r"duplicate problem id 't/1' \(lines 1 and 2\)"):
        get_task("humaneval").load(str(data), False)
    write_jsonl(data, [{**row, "test": 3}])
    with pytest.raises(PowerSampleError, match="test must be text"):
        get_task("humaneval").load(str(data), False)


# --- C1, C4: data and records files that are not what they should be ---------------------------------------------


def test_deeply_nested_data_is_one_line(spec, tmp_path, capsys):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000)
    assert main(eval_argv(spec, deep, tmp_path / "run")) == 2
    one_line_error(capsys, str(deep))
    jsonl = tmp_path / "deep.jsonl"
    jsonl.write_text('{"problem": "1+1", "answer": "2"}\n' + "[" * 100_000 + "\n")
    assert main(eval_argv(spec, jsonl, tmp_path / "run")) == 2
    one_line_error(capsys, "line 2", "nested too deeply")
    assert not (tmp_path / "run").exists()


def test_a_deeply_nested_toy_spec_in_eval_is_one_line(tmp_path, capsys):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000)
    data = write_jsonl(tmp_path / "d.jsonl", [{"problem": "1+1", "answer": "2"}])
    assert main(eval_argv(deep, data, tmp_path / "run")) == 2
    one_line_error(capsys, "toy spec", "nested too deeply")


@pytest.fixture
def run_dir(spec, tmp_path, capsys) -> Path:
    data = write_jsonl(tmp_path / "d.jsonl", [{"problem": f"q{i}", "answer": "1"} for i in range(3)])
    out = tmp_path / "run"
    assert main(eval_argv(spec, data, out)) == 0
    capsys.readouterr()
    return out


def test_a_deeply_nested_record_line_is_skipped_as_foreign(run_dir, capsys):
    with open(run_dir / "records.jsonl", "a") as f:
        f.write("[" * 100_000 + "\n")
    assert len(load_records(run_dir)) == 3
    assert main(["report", str(run_dir), "--no-plots"]) == 0


def test_records_file_that_is_a_directory(spec, run_dir, tmp_path, capsys):
    (run_dir / "records.jsonl").rename(run_dir / "moved")
    (run_dir / "records.jsonl").mkdir()
    assert main(["report", str(run_dir), "--no-plots"]) == 2
    one_line_error(capsys, "records.jsonl")
    data = write_jsonl(tmp_path / "d.jsonl", [{"problem": f"q{i}", "answer": "1"} for i in range(3)])
    assert main(eval_argv(spec, data, run_dir)) == 2
    one_line_error(capsys, "records.jsonl")


# --- C3: report trusts nothing it reads ---------------------------------------------------------------------------


def edit_run(run_dir: Path, edit) -> None:
    path = run_dir / "run.json"
    header = json.loads(path.read_text())
    edit(header)
    path.write_text(json.dumps(header))


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda h: h.update(identity={}), ["run.json", "'task'"]),
        (lambda h: h["identity"].pop("config"), ["run.json", "'config'"]),
        (lambda h: h["identity"].update(config=[]), ["run.json", "'config'"]),
        (lambda h: h["identity"]["config"].pop("method"), ["run.json", "'method'"]),
        (lambda h: h["identity"]["config"].update(max_new_tokens="6"), ["run.json", "'max_new_tokens'"]),
        (lambda h: h["identity"]["config"].update(alpha=[4]), ["run.json", "'alpha'"]),
        (lambda h: h["identity"].update(chat=[]), ["run.json", "'chat'"]),
        (lambda h: h["identity"].update(task="../../escaped"), ["run.json", "'task'"]),  # it names plot files
        (lambda h: h["identity"]["config"].update(block_size=0), ["run.json", "block_size"]),  # divides
        (lambda h: h["identity"]["config"].update(max_new_tokens=10**400), ["run.json", "'max_new_tokens'"]),
        (lambda h: h["identity"]["config"].update(method="nope"), ["run.json", "unknown method"]),
    ],
)
def test_report_refuses_a_damaged_run_json(edit, words, run_dir, capsys):
    edit_run(run_dir, edit)
    assert main(["report", str(run_dir), "--no-plots"]) == 2
    one_line_error(capsys, *words)


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda r: r.pop("tokens"), ["has no 'tokens'"]),
        (lambda r: r.update(tokens=3), ["'tokens'"]),
        (lambda r: r.pop("wall_seconds"), ["'wall_seconds'"]),
        (lambda r: r.update(proposals="many"), ["'proposals'"]),
        (lambda r: r.update(correct="yes"), ["'correct'"]),
        (lambda r: r.update(logp_per_token=float("inf")), ["'logp_per_token'"]),
        (lambda r: r.update(problem_id=["p"]), ["'problem_id'"]),
        (lambda r: r.update(tokens_generated=10**4000), ["'tokens_generated'"]),  # no float holds it
        (lambda r: r.update(wall_seconds=1e308), ["'wall_seconds'"]),  # sums overflow
        (lambda r: r.update(logp_per_token=-1e308), ["'logp_per_token'"]),
    ],
)
def test_report_refuses_a_damaged_record(edit, words, run_dir, capsys):
    path = run_dir / "records.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    edit(records[1])
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(["report", str(run_dir), "--no-plots"]) == 2
    one_line_error(capsys, f"{path} line 2", *words)


@pytest.mark.parametrize("content", [b"\xff\xfe not text", b"[" * 100_000, b"{}", b'{"identity": 3}'])
def test_report_refuses_a_run_json_that_is_not_json(content, run_dir, capsys):
    (run_dir / "run.json").write_bytes(content)
    assert main(["report", str(run_dir), "--no-plots"]) == 2
    one_line_error(capsys, "run.json")


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--data", ""], ["--data is empty"]),  # else: a download of the hub's MATH-500
        (["--output-dir", " "], ["--output-dir is empty"]),
        (["--code-timeout", "1e308"], ["--code-timeout"]),  # the sandbox's CPU rlimit would overflow
        (["--code-memory-mb", "9" * 20], ["--code-memory-mb"]),
        (["--math-timeout", "1e20"], ["--math-timeout"]),
    ],
)
def test_eval_options_out_of_range(extra, words, spec, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where a relative path like " " would land
    data = write_jsonl(tmp_path / "d.jsonl", [{"problem": "1+1", "answer": "2"}])
    argv = eval_argv(spec, data, tmp_path / "run")
    for i in range(0, len(extra), 2):  # replace a given option's value, else add it
        if extra[i] in argv:
            argv[argv.index(extra[i]) + 1] = extra[i + 1]
        else:
            argv += extra[i : i + 2]
    assert main(argv) == 2
    one_line_error(capsys, *words)
    assert not (tmp_path / "run").exists()


def test_the_largest_code_limits_still_run(spec, tmp_path, capsys):
    row = {"task_id": "t/0", "prompt": "def f():\n", "test": "def check(f):\n    assert f() == 1\n", "entry_point": "f"}
    data = write_jsonl(tmp_path / "he.jsonl", [row])
    argv = eval_argv(spec, data, tmp_path / "run", "--code-timeout", "86400")
    argv[argv.index("math500")] = "humaneval"
    assert main(argv) == 0  # the largest allowed limits still run
    assert len(load_records(tmp_path / "run")) == 1


def test_a_batch_too_large_to_hold_is_one_line(spec, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [{"problem": f"q{i}", "answer": "1"} for i in range(3)])
    argv = eval_argv(spec, data, tmp_path / "run", "--method", "power-smc", "--particles", "500000", "--batch", "8")
    assert main(argv) == 2  # 3 pairs at once x 500,000 particles
    one_line_error(capsys, "--batch (3)", "--particles")
