"""Issue 12 on the eval side: duplicate problem ids (C6), and every bad input of eval and report is a one-line
error with exit 2 (C1-C4), never a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from powersample.cli import main
from powersample.errors import PowerSampleError

SPEC = {"vocab": ["The answer is ", "\\boxed{1}", "\\boxed{2}", "<eos>"], "eos_id": 3,
        "default": [0.1, 0.4, 0.3, 0.2], "next": {"": [0.5, 0.3, 0.2, 0.0]}}  # fmt: skip
SAMPLER = ["--max-new-tokens", "6", "--block-count", "2", "--mcmc-steps", "2"]


@pytest.fixture
def spec(tmp_path) -> Path:
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(SPEC))
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def eval_argv(spec: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["eval", "--task", "math500", "--data", str(data), "--backend", "toy", "--toy-spec", str(spec), *SAMPLER,
            "--output-dir", str(out), "--quiet", *extra]  # fmt: skip


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
        ([{"problem": "a", "answer": "1", "id": "x"}, {"problem": "b", "answer": "1"},
          {"problem": "c", "answer": "1", "id": "x"}], "lines 1 and 3"),  # fmt: skip
    ],
)
def test_duplicate_problem_ids_are_refused(rows, places, spec, tmp_path, capsys):
    data = write_jsonl(tmp_path / "dup.jsonl", rows)
    assert main(eval_argv(spec, data, tmp_path / "run")) == 2
    one_line_error(capsys, str(data), "duplicate problem id", places)
    assert not (tmp_path / "run").exists()


def test_duplicate_ids_in_a_json_list_name_the_records(spec, tmp_path, capsys):
    data = tmp_path / "dup.json"
    data.write_text(json.dumps([{"problem": "1+1", "answer": "2", "id": "p"}, {"problem": "3", "answer": "3"},
                                {"problem": "3+3", "answer": "6", "id": "p"}]))  # fmt: skip
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
