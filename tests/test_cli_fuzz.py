"""A property of the whole command line: whatever argv a user types, `powersample` exits 0 or 2 and
never shows a traceback.

argv is built from the real option names of every subcommand (read off the parser, so new options are fuzzed too) with
values that are wrong in every way a careless user manages (empty, non-numeric, huge, non-finite, negative, subnormal, a
directory, a binary file, a deeply nested JSON file, a missing file), plus garbage tokens. Everything runs in-process on
the toy backend with a toy model that stops within a few tokens, inside a scratch directory, so it stays fast. Bounds
that keep it fast and safe, not blind spots of the property: no engine but the toy one, no Ray, no HumanEval sandbox
runs, small workloads (T, steps, chains, samples), `serve` never actually listens, and paths are only the prepared ones
(nothing is written outside the scratch directory).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from powersample.cli import build_parser, main

# EOS within a few tokens (a chain ends soon, whatever T is), yet rows that differ, so the samplers really work
TINY = {
    "vocab": ["a", "b", "<eos>"],
    "eos_id": 2,
    "default": [0.1, 0.1, 0.8],
    "next": {"": [0.42, 0.58, 0.0], "0": [0.92, 0.04, 0.04], "1": [0.3, 0.2, 0.5]},
}
WORKLOAD = {
    "max_new_tokens",
    "block_size",
    "mcmc_steps",
    "tries",
    "particles",
    "candidates",
    "rollouts",
    "rollout_horizon",
    "alpha_ramp",
    "num_samples",
    "prompts",
    "chains",
    "repeats",
    "samples",
}
PATHS = {
    "toy_spec",
    "data",
    "prompt_file",
    "output",
    "output_dir",
    "json_path",
    "spec",
    "plot_dir",
    "model",
    "ray_temp_dir",
    "trace",
    "bon_match",
    "vote_match",
}
# Ray starts a cluster and --matrix builds every model of the matrix (each has its own lane); help is argparse's
# own exit 0
LEFT_OUT = {"--ray", "--matrix", "-h", "--help"}
ENGINES = ("auto", "hf", "llamacpp", "vllm")  # would load a real model: only the toy runs here
NUMBERS = [
    "0",
    "-1",
    "1",
    "2",
    "-0",
    "0.5",
    "1.5",
    "nan",
    "inf",
    "-inf",
    "1e308",
    "1e309",
    "5e-324",
    "1e-310",
    "9" * 30,
    "-" + "9" * 30,
    "0x10",
    "1_000",
    " 3",
    "3 ",
    "",
    " ",
    "x",
    "1e3",
    "٣",
]
SMALL = ["-2", "-1", "0", "1", "2", "3", "x", "", "1.5", "nan"]
TEXT = st.text(alphabet=st.characters(blacklist_characters="/\\~\x00", blacklist_categories=("Cs",)), max_size=8)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> dict:
    """The scratch directory and the paths a value may name."""
    root = tmp_path_factory.mktemp("cli-fuzz")
    (root / "tiny.json").write_text(json.dumps(TINY))
    (root / "deep.json").write_text("[" * 100_000)
    (root / "binary.bin").write_bytes(bytes(range(256)) * 4)
    (root / "digits.json").write_text('{"vocab": ["a"], "eos_id": ' + "7" * 5000 + "}")
    (root / "data.jsonl").write_text('{"problem": "1+1", "answer": "2"}\n{"problem": "2+2", "answer": "4"}\n')
    (root / "dup.jsonl").write_text(
        '{"problem": "1", "answer": "1", "id": "p"}\n{"problem": "2", "answer": "2", "id": "p"}\n'
    )
    (root / "empty.txt").write_text("")
    (root / "prompts.txt").write_text("2+2=\nName a color.\n")
    (root / "adir").mkdir()
    run = root / "run"
    argv = [
        "eval",
        "--task",
        "math500",
        "--data",
        str(root / "data.jsonl"),
        "--backend",
        "toy",
        "--toy-spec",
        str(root / "tiny.json"),
        "--quiet",
        "--output-dir",
        str(run),
    ]
    assert main(argv) == 0
    names = [
        "tiny.json",
        "deep.json",
        "binary.bin",
        "digits.json",
        "data.jsonl",
        "dup.jsonl",
        "empty.txt",
        "prompts.txt",
        "adir",
        "run",
        "missing.json",
        "new-out",
        "run/records.jsonl",
        "run/run.json",
    ]
    return {"root": root, "paths": names}


def commands() -> dict[str, list]:
    """Each subcommand's options, as the parser has them (not `lm-eval`'s: its arguments are lm-eval's own command
    line's, tested in test_lm_eval_backend.py)."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {
        name: [a for a in p._actions if a.option_strings and not set(a.option_strings) & LEFT_OUT]
        for name, p in sub.choices.items()
        if name != "lm-eval"
    }


COMMANDS = commands()


def value_for(action, paths: list[str]) -> st.SearchStrategy[str]:
    """A value for one option: mostly wrong, sometimes right."""
    if action.dest == "backend":
        return st.sampled_from(["toy"] * 5 + ["TOY", "", "nope"])
    if action.dest == "task":
        return st.sampled_from(["math500", "math500", "gpqa", "alpacaeval", "MATH500", "", "nope"])
    if action.dest in WORKLOAD:
        return st.sampled_from(SMALL)
    if action.dest in PATHS:
        return st.one_of(st.sampled_from(paths), st.sampled_from(paths), TEXT)
    choices = [str(c) for c in action.choices or ()]
    kinds = [st.sampled_from(NUMBERS), TEXT, st.sampled_from(paths)]
    if choices:
        kinds = [st.sampled_from(choices)] * 3 + kinds  # mostly a valid choice, to get past argparse
    elif action.type is int:
        kinds = [st.integers(-3, 10).map(str), st.integers(-(2**70), 2**70).map(str)] * 2 + kinds
    elif action.type is float:
        kinds = [st.floats(allow_nan=True, allow_infinity=True).map(repr), st.floats(0, 2).map(repr)] * 2 + kinds
    if action.dest == "seeds":
        kinds.append(st.sampled_from(["0-2", "3-1", "0,2", "0-99999999", "1,,2", "-1"]))
    if action.dest in ("limit", "shard"):
        kinds.append(st.sampled_from(["1", "1/2", "2/2", "0/0", "x/y", "1/" + "9" * 30]))
    return st.one_of(kinds)


GARBAGE = st.one_of(
    TEXT.filter(lambda t: t.split("=")[0] not in ("--ray", *ENGINES, "humaneval")),
    st.sampled_from(["-", "--", "--x", "=", "-q", "--quiet", "--raw", "0", "-1", "nan"]),
)


@st.composite
def argvs(draw, paths: list[str]) -> list[str]:
    command = draw(st.sampled_from(sorted(COMMANDS)))
    options = COMMANDS[command]
    argv = [command]
    if command == "report":
        argv += draw(
            st.lists(st.sampled_from(["run", "run", "adir", "missing.json", "tiny.json"]), min_size=1, max_size=2)
        )
    elif command == "sample":
        argv += draw(st.lists(TEXT, max_size=1))  # the prompt, maybe none
    base = {"eval": ["--task", "math500", "--data", "data.jsonl"], "bench": ["--samples", "3"]}.get(
        command, []
    )  # --fidelity: 3 samples per setting, not 1000
    if command != "report":
        base += ["--backend", "toy", "--toy-spec", "tiny.json", "--quiet"]
    argv += base
    for _ in range(draw(st.integers(0, 4))):
        action = draw(st.sampled_from(options + [a for a in options if a.dest in PATHS] * 4))  # files: often
        name = draw(st.sampled_from(action.option_strings))
        if action.nargs == 0:
            argv.append(name)
        elif draw(st.booleans()):
            argv.append(f"{name}={draw(value_for(action, paths))}")
        else:
            argv += [name, draw(value_for(action, paths))]
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2]))):
        argv.insert(draw(st.integers(1, len(argv))), draw(GARBAGE))
    return argv


def run_cli(argv: list[str]) -> tuple[int, str]:
    """main(argv) as the console script runs it: the exit code (SystemExit included) and stderr."""
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse
            code = e.code if isinstance(e.code, int) else 2
    return code, err.getvalue()


@pytest.fixture(scope="module")
def no_listening():
    """`serve` with good arguments would listen forever: stop just before uvicorn serves."""
    uvicorn = pytest.importorskip("uvicorn")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(uvicorn.Server, "run", lambda *args, **kwargs: None)
        yield


@pytest.mark.fuzz
def test_any_argv_exits_0_or_2_without_a_traceback(scratch, no_listening):
    cwd = os.getcwd()
    os.chdir(scratch["root"])  # relative paths and default output directories land in the scratch directory
    try:
        check_argvs(scratch["paths"])
    finally:
        os.chdir(cwd)


def check_argvs(paths: list[str]) -> None:
    @settings(
        max_examples=300,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(argvs(paths))
    def property_(argv: list[str]) -> None:
        code, err = run_cli(argv)
        assert code in (0, 2), (argv, code, err[-2000:])
        assert "Traceback" not in err, (argv, err[-2000:])

    property_()


@pytest.mark.fuzz
def test_the_fuzzer_reaches_every_command_and_both_outcomes(scratch, no_listening):
    """The property is not vacuous: the strategy reaches every subcommand, and both good and bad argv."""
    cwd = os.getcwd()
    os.chdir(scratch["root"])
    seen: set[tuple[str, int]] = set()
    try:

        @settings(
            max_examples=60,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=[HealthCheck.too_slow],
        )
        @given(argvs(scratch["paths"]))
        def collect(argv: list[str]) -> None:
            seen.add((argv[0], run_cli(argv)[0]))

        collect()
    finally:
        os.chdir(cwd)
    assert {c for c, _ in seen} == set(COMMANDS)
    assert {code for _, code in seen} == {0, 2}


def test_the_paths_are_those_prepared(scratch):
    assert all(not Path(p).is_absolute() and ".." not in p for p in scratch["paths"])
