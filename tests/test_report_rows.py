"""The report's rows: their labels name every setting in which runs of a method differ, the backend's too, and no
run disappears from a table or figure when two labels would read alike; wall time counts each batch once."""

from __future__ import annotations

from pathlib import Path

from support.report_runs import write_run

from powersample.eval.records import identity_hash
from powersample.eval.report import (
    build_report,
    histogram_figure,
    lengths_figure,
    load_rows,
    pass_at_k_figure,
    sampling_seconds,
    wall_cell,
)

GGUF = "/models/gemma-3-4b-pt-Q4_K_M.gguf"


def scored(n: int, logp: float, first: int = 0) -> list[dict]:
    """n graded records with this log-likelihood and confidence, problems p<first>, p<first + 1>, ..."""
    return [
        {"problem_id": f"p{first + i}", "correct": i % 2 == 0, "logp_per_token": logp + i / 10, "confidence": logp / 2}
        for i in range(n)
    ]


def drawn(rows) -> dict[str, list]:
    """Per figure, what it draws for each run: histogram bars' totals by legend label, curves, boxes."""
    out = {}
    for key in ("logp_per_token", "confidence"):
        ax = histogram_figure("math500", rows, key, key).axes[0]
        _, labels = ax.get_legend_handles_labels()  # one histogram (container of bars) per label, in order
        out[key] = [(name, sum(bar.get_height() for bar in bars)) for name, bars in zip(labels, ax.containers)]
    out["passk"] = [line.get_label() for line in pass_at_k_figure("math500", rows).axes[0].get_lines()]
    out["lengths"] = [t.get_text() for t in lengths_figure("math500", rows).axes[0].get_xticklabels()]
    return out


def test_runs_differing_only_in_backend_are_told_apart_everywhere(tmp_path):
    hf = write_run(tmp_path / "hf", scored(4, -1.0), backend={"name": "hf", "model": GGUF})
    cpp = write_run(tmp_path / "cpp", scored(3, -2.0), backend={"name": "llamacpp", "model": GGUF})
    rows = load_rows([hf, cpp])
    assert [row.label for row in rows] == ["power backend=hf", "power backend=llamacpp"]
    seen = drawn(rows)
    assert seen["logp_per_token"] == seen["confidence"] == [("power backend=hf", 4), ("power backend=llamacpp", 3)]
    assert seen["passk"] == seen["lengths"] == ["power backend=hf", "power backend=llamacpp"]
    text, _ = build_report([hf, cpp], None)
    assert "| math500 | power backend=hf | 4 |" in text and "| math500 | power backend=llamacpp | 3 |" in text


def test_labels_name_every_setting_that_differs(tmp_path):
    runs = [
        write_run(tmp_path / "a", scored(2, -1.0), backend={"name": "llamacpp", "model": GGUF}),
        write_run(tmp_path / "b", scored(2, -1.0), backend={"name": "llamacpp", "model": GGUF, "quant": "q8_0"}),
        write_run(tmp_path / "c", scored(2, -1.0), backend={"name": "llamacpp", "model": "/m/other.gguf"}),
        write_run(tmp_path / "d", scored(2, -1.0), backend={"name": "hf", "model": GGUF, "dtype": "bfloat16"}),
        write_run(tmp_path / "e", scored(2, -1.0), speculate=4, backend={"name": "hf", "model": GGUF}),
    ]
    # the sampler's settings first, then the backend's; a setting already implied is left out (d's dtype here)
    gemma = "model=gemma-3-4b-pt-Q4_K_M.gguf"
    assert sorted(row.label for row in load_rows(runs)) == [
        f"power speculate=4 backend=hf {gemma} quant=default",
        f"power speculate=default backend=hf {gemma} quant=default",
        f"power speculate=default backend=llamacpp {gemma} quant=default",
        f"power speculate=default backend=llamacpp {gemma} quant=q8_0",
        "power speculate=default backend=llamacpp model=other.gguf quant=default",
    ]


def test_labels_that_read_alike_are_told_apart_by_the_run(tmp_path):
    """Two models of one file name in different folders: the label names the file, and then the run's hash."""
    a = write_run(tmp_path / "a", scored(4, -1.0), backend={"name": "hf", "model": "/x/model.gguf"})
    b = write_run(tmp_path / "b", scored(3, -2.0), backend={"name": "hf", "model": "/y/model.gguf"})
    rows = load_rows([a, b])
    hashes = sorted(identity_hash(row.identity) for row in rows)
    assert sorted(row.label for row in rows) == [f"power model=model.gguf ({h})" for h in hashes]
    assert sorted(total for _, total in drawn(rows)["logp_per_token"]) == [3, 4]


def test_identical_configs_in_two_directories_are_one_row_with_every_record(tmp_path):
    """Shards written apart (the same identity): one row, both directories' records, none dropped from a figure."""
    a = write_run(tmp_path / "a", scored(4, -1.0))
    b = write_run(tmp_path / "b", scored(3, -2.0, first=4))
    [row] = load_rows([a, b])
    assert len(row.records) == 7 and drawn([row])["logp_per_token"] == [("power", 7)]
    _, plots = build_report([a, b], tmp_path / "plots")
    assert {Path(p).name for p in plots} >= {"loglik_math500.png", "confidence_math500.png", "passk_math500.png"}


def test_wall_counts_each_batch_once_at_its_longest():
    """A record's wall_seconds runs from its batch's start to its own last chain: a batch of three that took 12 s
    says 10, 12 and 11, not 33."""
    batches = [("a", 10.0), ("a", 12.0), ("a", 11.0), ("b", 5.0)]
    records = [{"batch_id": b, "wall_seconds": w} for b, w in batches]
    assert wall_cell(records) == "17.0s"
    assert wall_cell(records + [{"wall_seconds": 2.0}]) == "≤19.0s"  # a record of old: counted alone, a bound
    assert wall_cell([{"wall_seconds": 300.0}] * 2) == "≤0:10:00"


def test_eval_records_name_their_batch_and_the_report_counts_it_once(tmp_path):
    import json

    from support.eval_toy import eval_argv, write_jsonl, write_spec

    from powersample.cli import main

    data = write_jsonl(tmp_path / "math.jsonl", [{"problem": f"q{i}", "answer": "1"} for i in range(3)])
    out = tmp_path / "run"
    assert main(eval_argv(write_spec(tmp_path), data, out, "--seeds", "0-1", "--batch", "4")) == 0
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    sizes = {}
    for r in records:
        sizes[r["batch_id"]] = sizes.get(r["batch_id"], 0) + 1
    assert sorted(sizes.values()) == [2, 4]  # 6 (problem, seed) pairs, 4 at a time
    [row] = load_rows([out])
    want = sum(max(r["wall_seconds"] for r in records if r["batch_id"] == b) for b in sizes)
    assert sampling_seconds(row.records) == (want, True) and want < sum(r["wall_seconds"] for r in records)
