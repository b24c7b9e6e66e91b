"""`eval` + `report` end to end on the embedded model (hf backend), for HumanEval and MATH500, tiny settings."""

from __future__ import annotations

import json

import pytest
from support.toy import SHARED_DATA

from powersample.cli import main as run_eval_cli
from powersample.eval.records import load_records

MATH500 = SHARED_DATA / "MATH500.json"
SMALL = ["--limit", "3", "--max-new-tokens", "24", "--block-count", "2", "--mcmc-steps", "1", "--quiet"]


def eval_and_report(tmp_path, capsys, task: str, extra: list[str]) -> str:
    run_dir, plots = tmp_path / task, tmp_path / "report"
    assert run_eval_cli(["eval", "--task", task, *extra, *SMALL, "--output-dir", str(run_dir)]) == 0
    records = load_records(run_dir)
    assert len(records) == 3 and {r["task"] for r in records} == {task}
    for r in records:
        assert 1 <= len(r["tokens"]) <= 24 and isinstance(r["correct"], bool)
        assert r["logp_per_token"] < 0 and r["tokens_generated"] >= len(r["tokens"])
        assert r["confidence"] is None or r["confidence"] <= 0
    assert json.loads((run_dir / "run.json").read_text())["identity"]["task"] == task
    capsys.readouterr()
    assert run_eval_cli(["report", str(run_dir), "--plot-dir", str(plots)]) == 0
    assert {p.name for p in plots.glob("*.png")} >= {f"passk_{task}.png", f"loglik_{task}.png"}
    return capsys.readouterr().out


@pytest.mark.slow
def test_humaneval_on_the_embedded_model(tmp_path, capsys):
    assert "| humaneval | power | 3 |" in eval_and_report(tmp_path, capsys, "humaneval", [])


@pytest.mark.slow
@pytest.mark.skipif(not MATH500.exists(), reason=f"shared data file {MATH500} is absent")
def test_math500_on_the_embedded_model(tmp_path, capsys):
    assert "| math500 | power | 3 |" in eval_and_report(tmp_path, capsys, "math500", ["--data", str(MATH500)])
