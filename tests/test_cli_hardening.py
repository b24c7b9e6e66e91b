"""Issue 12 on the command line: every bad input a careless user gives sample, bench and serve is one line on
stderr and exit 2 (C1, C2, C5, C8), found before the model loads where it does not need the model."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from support.toy import SPECS

from powersample.cli import main

REPO = Path(__file__).resolve().parent.parent
SPEC = str(SPECS / "early_eos.json")
TOY = ["--backend", "toy", "--toy-spec", SPEC]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_line_error(code: int, capsys, *words: str) -> str:
    out, err = capsys.readouterr()
    assert code == 2 and out == "", (code, out, err)
    assert err.count("\n") == 1 and err.startswith("powersample: error:") and "Traceback" not in err, err
    assert all(w in err for w in words), err
    return err


@pytest.fixture
def bad_specs(tmp_path) -> dict[str, Path]:
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000)
    binary = tmp_path / "binary.json"
    binary.write_bytes(Path("/bin/ls").read_bytes()[:4096] if Path("/bin/ls").exists() else b"\x7fELF\xff\xfe\x00")
    digits = tmp_path / "digits.json"
    digits.write_text('{"vocab": ["a", "<eos>"], "eos_id": ' + "7" * 5000 + ', "default": [0.5, 0.5]}')
    big_int = tmp_path / "big_int.json"  # parses (under the digit limit) but is too large for a float
    big_int.write_text('{"vocab": ["a", "<eos>"], "eos_id": 1, "default": [' + "9" * 400 + ", 0]}")
    return {"deep": deep, "binary": binary, "digits": digits, "big_int": big_int}


# --- C1, C2: toy specs that are not JSON, or not a spec --------------------------------------------------------


@pytest.mark.parametrize(
    "kind, words",
    [
        ("deep", ["nested too deeply"]),
        ("binary", ["not UTF-8"]),
        ("digits", ["integer string conversion"]),
        ("big_int", ["finite numbers"]),
    ],
)
@pytest.mark.parametrize("command", ["sample", "bench", "serve"])
def test_a_bad_toy_spec_is_one_line(command, kind, words, bad_specs, capsys):
    spec = str(bad_specs[kind])
    argv = {
        "sample": ["sample", "x", "--backend", "toy", "--toy-spec", spec, "--quiet"],
        "bench": ["bench", "--quick", "--backend", "toy", "--toy-spec", spec, "--quiet"],
        "serve": ["serve", "--backend", "toy", "--toy-spec", spec, "--quiet", "--port", str(free_port())],
    }[command]
    one_line_error(main(argv), capsys, "toy spec", *words)


@pytest.mark.parametrize("kind", ["deep", "binary", "digits", "big_int"])
def test_a_bad_fidelity_spec_is_one_line(kind, bad_specs, capsys):
    one_line_error(main(["bench", "--fidelity", "--spec", str(bad_specs[kind]), "--quiet"]), capsys, "toy spec")


# --- C5: a non-finite derived value never reaches a record -------------------------------------------------------


@pytest.mark.parametrize("alpha", ["5e-324", "1e-310"])
def test_a_subnormal_alpha_is_refused_and_nothing_is_written(alpha, tmp_path, capsys):
    out = tmp_path / "records.jsonl"
    code = main(["sample", "x", *TOY, "--quiet", "--alpha", alpha, "--output", str(out)])
    one_line_error(code, capsys, "alpha")
    assert not out.exists() or out.read_text() == ""


def test_records_are_never_written_with_non_finite_numbers(tmp_path):
    from powersample.errors import PowerSampleError
    from powersample.io import append_jsonl

    out = tmp_path / "records.jsonl"
    append_jsonl(str(out), [{"a": 1.0}])
    with pytest.raises(PowerSampleError, match="non-finite"):
        append_jsonl(str(out), [{"a": 2.0}, {"a": float("inf")}])
    assert [json.loads(line) for line in out.read_text().splitlines()] == [{"a": 1.0}]  # nothing half-written


# --- C8: what does not need the model is refused before it loads --------------------------------------------------


@pytest.mark.parametrize(
    "extra, word",
    [
        (["--num-samples", "0"], "num_samples"),
        (["--seed", "-1"], "seed"),
        (["--return-particles"], "power-smc"),
        (["--method", "power-rollout", "--proposal-temperature", "0.5"], "proposal_temperature"),
    ],
)
def test_sample_refuses_before_loading(extra, word, capsys):
    # no --quiet: the "loading the backend" line would show if the model were loaded first
    err = one_line_error(main(["sample", "x", *TOY, *extra]), capsys, word)
    assert "loading" not in err


def test_eval_and_bench_refuse_rollout_temperature_before_loading(tmp_path, capsys):
    rollout = ["--method", "power-rollout", "--proposal-temperature", "0.5"]
    data = tmp_path / "d.jsonl"
    data.write_text('{"problem": "1+1", "answer": "2"}\n')
    argv = ["eval", "--task", "math500", "--data", str(data), *TOY, *rollout, "--output-dir", str(tmp_path / "r")]
    one_line_error(main(argv), capsys, "proposal_temperature")
    assert not (tmp_path / "r").exists()
    err = one_line_error(main(["bench", "--quick", *TOY, *rollout]), capsys, "proposal_temperature")
    assert "loading" not in err


@pytest.mark.parametrize("method", ["power-mtm", "power-smc"])
@pytest.mark.parametrize("tau", ["5e-324", "1e-310"])
def test_a_subnormal_proposal_temperature_is_refused(method, tau, capsys):
    code = main(["sample", "x", *TOY, "--quiet", "--method", method, "--proposal-temperature", tau])
    one_line_error(code, capsys, "proposal_temperature")


# --- a closed stdout (`powersample ... | head`) ------------------------------------------------------------------


@pytest.mark.parametrize("many", [False, True])  # the text fits the buffer (fails at the final flush) or not
def test_a_closed_stdout_is_quiet_and_keeps_the_records(many, tmp_path):
    out = tmp_path / "records.jsonl"
    read, write = os.pipe()
    os.close(read)  # closed before the child starts: its first write to stdout fails, every time
    argv = [
        sys.executable,
        "-m",
        "powersample.cli",
        "sample",
        "x",
        *TOY,
        "--quiet",
        "--output",
        str(out),
        "--num-samples",
        "3000" if many else "1",
    ]
    try:
        done = subprocess.run(argv, cwd=REPO, stdout=write, stderr=subprocess.PIPE, text=True, timeout=300)
    finally:
        os.close(write)
    assert done.returncode == 141 and done.stderr == "", done.stderr
    assert len(out.read_text().splitlines()) == (3000 if many else 1)


def test_report_into_a_closed_pipe_is_quiet(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"problem": "1+1", "answer": "2"}\n')
    run = tmp_path / "run"
    assert main(["eval", "--task", "math500", "--data", str(data), *TOY, "--quiet", "--output-dir", str(run)]) == 0
    read, write = os.pipe()
    os.close(read)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "powersample.cli", "report", str(run), "--no-plots"],
            cwd=REPO,
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    finally:
        os.close(write)
    assert done.returncode == 141 and done.stderr == "", done.stderr


def test_a_toy_vocab_with_a_lone_surrogate_is_refused(tmp_path, capsys):
    spec = tmp_path / "surrogate.json"
    spec.write_text('{"vocab": ["\\ud800", "<eos>"], "eos_id": 1, "default": [0.0, 1.0], "next": {"": [1.0, 0.0]}}')
    one_line_error(main(["sample", "x", "--backend", "toy", "--toy-spec", str(spec), "--quiet"]), capsys, "surrogate")


def test_a_prompt_that_is_not_utf8_is_refused(capsys):
    one_line_error(main(["sample", "caf\udce9", *TOY, "--quiet"]), capsys, "not UTF-8")  # b"caf\xe9" in argv


# --- counts past what a run can hold (numpy: "Maximum allowed dimension exceeded") ------------------------------

HUGE = "9" * 20


@pytest.mark.parametrize(
    "argv, word",
    [
        (["sample", "x", "--method", "power-smc", "--particles", HUGE], "particles must be < 2^62"),
        (["sample", "x", "--method", "power-mtm", "--tries", HUGE], "tries must be < 2^62"),
        (["sample", "x", "--method", "power-rollout", "--candidates", HUGE], "candidates must be < 2^62"),
        (["sample", "x", "--method", "power-rollout", "--rollouts", HUGE], "rollouts must be < 2^62"),
        (["sample", "x", "--num-samples", HUGE], "--num-samples"),
        (["sample", "x", "--method", "power-smc", "--particles", "1000", "--num-samples", "1001"], "--num-samples"),
        (["bench", "--quick", "--chains", HUGE], "--chains"),
        (["bench", "--fidelity", "--quick", "--samples", HUGE], "--samples"),
        (["bench", "--fidelity", "--quick", "--alpha", "5e-324"], "alpha"),
        (["serve", "--method", "power-smc", "--particles", HUGE], "particles must be < 2^62"),
    ],
)
def test_counts_too_large_to_run_are_one_line(argv, word, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # bench --fidelity writes ./fidelity once past its checks
    uvicorn = pytest.importorskip("uvicorn")
    monkeypatch.setattr(uvicorn.Server, "run", lambda *a, **k: pytest.fail("serve got past its checks"))
    one_line_error(main([*argv, *TOY, "--quiet"]), capsys, word)


def test_the_cap_is_on_sequences_at_once():
    from powersample import SamplerConfig
    from powersample.cli.options import MAX_SEQUENCES, check_members
    from powersample.errors import PowerSampleError

    smc = SamplerConfig(method="power-smc", particles=64)
    check_members(smc, MAX_SEQUENCES // 64)  # exactly at the cap: allowed
    with pytest.raises(PowerSampleError, match="asks for 1000000064 sequences"):
        check_members(smc, MAX_SEQUENCES // 64 * 1000 + 1)
    check_members(SamplerConfig(method="power"), MAX_SEQUENCES)


def test_a_stage_list_too_long_to_build_is_one_line(capsys):
    """T = 10^18 with B = 1 used to hang building 10^18 stage caps before the first token."""
    from powersample import SamplerConfig
    from powersample.errors import PowerSampleError

    with pytest.raises(PowerSampleError, match="stages; at most"):
        SamplerConfig(max_new_tokens=10**18, block_size=1)
    assert len(SamplerConfig(max_new_tokens=10**18, block_size=10**14).stage_caps()) == 10**4
    one_line_error(
        main(["sample", "x", *TOY, "--max-new-tokens", str(10**18), "--block-size", "1"]), capsys, "stages; at most"
    )
