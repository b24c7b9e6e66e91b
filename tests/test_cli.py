"""The command line: output, records, and one-line errors with exit code 2 for every bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from support.toy import SPECS, load_spec

from powersample import SamplerConfig, sample
from powersample.backends.toy import ToyBackend
from powersample.cli import main
from powersample.samplers import registry
from powersample.samplers.registry import METHODS

TOY = ["--backend", "toy", "--toy-spec", str(SPECS / "early_eos.json"), "--quiet"]


def run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_sample_prints_text_and_summary_and_writes_records(tmp_path, capsys):
    out_file = tmp_path / "out.jsonl"
    argv = [
        "sample",
        "hello",
        *TOY,
        "--max-new-tokens",
        "4",
        "--block-size",
        "2",
        "--num-samples",
        "3",
        "--seed",
        "5",
        "--output",
        str(out_file),
    ]
    code, out, err = run(argv, capsys)
    assert code == 0 and err == ""
    assert out.count("[sample ") == 3 and "method=power" in out
    records = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert len(records) == 3
    for r in records:
        assert {
            "prompt",
            "text",
            "tokens",
            "logp",
            "tokens_generated",
            "proposals",
            "accepted",
            "wall_seconds",
            "method",
            "config",
            "token_logp",
            "finish_reason",
        } <= set(r)
        assert r["prompt"] == "hello" and r["config"]["block_size"] == 2 and r["config"]["alpha"] == 4.0
    # appending keeps what was there, and the same seed gives the same records
    assert run(argv, capsys)[0] == 0
    again = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert len(again) == 6
    assert [r["tokens"] for r in again[:3]] == [r["tokens"] for r in again[3:]]


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_that_method(method, tmp_path, capsys):
    """The record the CLI writes is the one the API gives for that method: the method's own sampler ran (a
    `base` that ran the power sampler would have made MH proposals and drawn other tokens)."""
    out_file = tmp_path / "out.jsonl"
    argv = [
        "sample",
        "x",
        *TOY,
        "--method",
        method,
        "--max-new-tokens",
        "3",
        "--num-samples",
        "4",
        "--seed",
        "3",
        "--output",
        str(out_file),
    ]
    code, out, _ = run(argv, capsys)
    assert code == 0 and out.count(f"method={method} ") == 4
    got = [json.loads(line) for line in out_file.read_text().splitlines()]
    config = SamplerConfig(method=method, max_new_tokens=3)
    want = sample(ToyBackend(load_spec("early_eos")), "x", config, seed=3, num_samples=4)
    assert [(r["tokens"], r["proposals"], r["tokens_generated"]) for r in got] == [
        (list(w.tokens), w.proposals, w.tokens_generated) for w in want
    ]
    moves = registry.method(method).family in ("mcmc", "bon")  # MH proposals, or bon's candidates
    assert all((r["proposals"] > 0) == moves for r in got)


def test_prompt_file_and_stdin(tmp_path, capsys, monkeypatch):
    """The prompt sampled is the file's text, from a path or from stdin."""
    f, out_file = tmp_path / "p.txt", tmp_path / "out.jsonl"
    f.write_text("a prompt\nover two lines")
    argv = [*TOY, "--max-new-tokens", "2", "--output", str(out_file)]
    assert run(["sample", "--prompt-file", str(f), *argv], capsys)[0] == 0
    monkeypatch.setattr(sys, "stdin", open(f))  # noqa: SIM115 - a real file as stdin, for the test's length
    assert run(["sample", "--prompt-file", "-", *argv], capsys)[0] == 0
    prompts = [json.loads(line)["prompt"] for line in out_file.read_text().splitlines()]
    assert prompts == ["a prompt\nover two lines"] * 2


def test_progress_bar_goes_to_stderr(capsys):
    argv = ["sample", "x", "--backend", "toy", "--toy-spec", str(SPECS / "early_eos.json"), "--max-new-tokens", "3"]
    code, out, err = run(argv, capsys)
    assert code == 0 and "sampling" in err and "100%" in err and "sampling" not in out


BAD = [
    (["--alpha", "0"], "alpha"),
    (["--alpha", "-2"], "alpha"),
    (["--block-size", "0"], "block_size"),
    (["--block-size", "9", "--max-new-tokens", "8"], "block_size"),
    (["--mcmc-steps", "-1"], "mcmc_steps"),
    (["--max-new-tokens", "0"], "max_new_tokens"),
    (["--proposal-temperature", "0"], "proposal_temperature"),
    (["--top-p", "1.5"], "top_p"),
    (["--num-samples", "0"], "num_samples"),
]


@pytest.mark.parametrize("extra, word", BAD)
def test_bad_options_exit_2_with_one_line(extra, word, capsys):
    code, out, err = run(["sample", "x", *TOY, *extra], capsys)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and word in err and err.startswith("powersample: error:")


@pytest.mark.parametrize(
    "argv, word",
    [
        (["sample", "", *TOY], "empty"),
        (["sample", "  ", *TOY], "empty"),
        (["sample", *TOY], "prompt"),
        (["sample", "x", "--prompt-file", "p.txt", *TOY], "prompt"),
        (["sample", "--prompt-file", "/no/such/file", *TOY], "cannot read"),
        (["sample", "x", "--backend", "toy", "--quiet"], "toy-spec"),
        (["sample", "x", "--backend", "toy", "--toy-spec", "/no/such.json", "--quiet"], "cannot read"),
    ],
)
def test_bad_inputs_exit_2_with_one_line(argv, word, capsys):
    code, out, err = run(argv, capsys)
    assert code == 2 and out == "" and err.count("\n") == 1 and word in err


def test_malformed_toy_spec(tmp_path, capsys):
    spec = tmp_path / "s.json"
    spec.write_text(json.dumps({"vocab": ["a", "<eos>"], "eos_id": 1, "default": [0.5, 0.6]}))
    code, _, err = run(["sample", "x", "--backend", "toy", "--toy-spec", str(spec), "--quiet"], capsys)
    assert code == 2 and "'default' sums to" in err and err.count("\n") == 1


def test_argparse_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["sample", "x", "--alpha", "four"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["sample", "x", "--method", "greedy"])
    assert e.value.code == 2


def test_console_script_has_no_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "powersample.cli", "sample", "x", "--backend", "toy", "--toy-spec", "/nope"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "cannot read" in proc.stderr


def test_unwritable_output_is_a_one_line_error(tmp_path, capsys):
    code, _, err = run(["sample", "x", *TOY, "--max-new-tokens", "2", "--output", str(tmp_path)], capsys)
    assert code == 2 and "cannot write" in err


@pytest.mark.slow
def test_prompt_longer_than_the_context_exits_2(capsys):
    long_prompt = "word " * 9000  # SmolLM2's context is 8192 tokens
    code, out, err = run(["sample", long_prompt, "--quiet", "--max-new-tokens", "8"], capsys)
    assert code == 2 and out == "" and "exceeds the model's context" in err and err.count("\n") == 1


@pytest.mark.slow
@pytest.mark.parametrize("model", ["/no/such/model/dir", "missing.gguf"])
def test_unknown_model_path_exits_2(model, capsys):
    code, out, err = run(["sample", "x", "--quiet", "--model", model], capsys)
    assert code == 2 and out == "" and "unknown model path" in err and err.count("\n") == 1


@pytest.mark.slow
def test_embedded_model_end_to_end(tmp_path, capsys):
    out_file = tmp_path / "o.jsonl"
    argv = [
        "sample",
        "What is 2 + 2?",
        "--quiet",
        "--max-new-tokens",
        "12",
        "--block-count",
        "2",
        "--mcmc-steps",
        "2",
        "--num-samples",
        "2",
        "--output",
        str(out_file),
    ]
    code, out, err = run(argv, capsys)
    assert code == 0 and out.count("[sample ") == 2
    records = [json.loads(line) for line in out_file.read_text().splitlines()]
    for r in records:
        assert 1 <= len(r["tokens"]) <= 12 and r["proposals"] in (2, 4)  # 2 MH steps in each of 1 or 2 stages
        assert r["finish_reason"] == "eos" or len(r["tokens"]) == 12
        assert r["tokens_generated"] >= len(r["tokens"]) and r["wall_seconds"] > 0
    assert run(argv, capsys)[0] == 0  # same seed, same output
    again = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert [r["tokens"] for r in again[:2]] == [r["tokens"] for r in again[2:]]


def test_bad_thread_count_exits_2(capsys):
    code, out, err = run(["sample", "x", *TOY, "--threads", "0"], capsys)
    assert code == 2 and "threads" in err and err.count("\n") == 1


@pytest.mark.slow
def test_threads_option_sets_the_engine_threads(capsys):
    import torch

    before = torch.get_num_threads()
    try:
        code, out, _ = run(
            [
                "sample",
                "2+2=",
                "--backend",
                "hf",
                "--threads",
                "1",
                "--quiet",
                "--max-new-tokens",
                "4",
                "--mcmc-steps",
                "1",
                "--block-count",
                "1",
            ],
            capsys,
        )
        assert code == 0 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
