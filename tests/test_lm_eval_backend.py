"""The lm-evaluation-harness model `powersample` (powersample.integrations.lm_eval) and `powersample lm-eval`.

Through the command, on the toy (tests/data/lm_eval_tasks: a generate_until task and a multiple-choice task on local
JSONL, the toy spec toy_capitals.json): the texts are our sampler's for lm-eval's seed, cut at "\\n", and the
log-likelihoods are the toy's exact ones, read off its spec. On the embedded model (slow): the log-likelihoods are
the backend's `score` of lm-eval's tokens, and the texts those of `powersample sample` with the same seed.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("lm_eval")

from support.toy import ROOT

import powersample.integrations
from powersample.api import sample
from powersample.backends.toy import ToyBackend, ToySpec
from powersample.cli import main
from powersample.config import SamplerConfig
from powersample.errors import PowerSampleError
from powersample.integrations import lm_eval as integration
from powersample.integrations.lm_eval import Job, PowerSampleLM, generate, parse_model_args, request_config, run_cli

TASKS = ROOT / "tests" / "data" / "lm_eval_tasks"
TOY_SPEC = TASKS / "toy_capitals.json"
CAPITALS = [json.loads(line) for line in (TASKS / "capitals.jsonl").read_text().splitlines()]
TOY_ARGS = f"backend=toy,toy_spec={TOY_SPEC},alpha=2,mcmc_steps=2,block_size=2"
TOY_CONFIG = SamplerConfig(alpha=2, mcmc_steps=2, block_size=2, max_new_tokens=4)  # max_gen_toks 4 (the task's)
SEED = 1234  # lm-eval's default seed, the model's default


def run_lm_eval(tmp_path: Path, model_args: str, tasks: str, *extra: str) -> tuple[dict, dict[str, list[dict]], str]:
    """`powersample lm-eval` from the repository root (the tasks' data paths are relative to it), offline: lm-eval's
    results, its logged samples per task (in document order) and its stdout."""
    out = tmp_path / "out"
    argv = ["--model", "powersample", "--model_args", model_args, "--tasks", tasks, "--include_path", str(TASKS)]
    offline = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "datasets")}
    run = powersample_lm_eval(*argv, "--output_path", str(out), "--log_samples", *extra, env=offline)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    samples = {}
    for task in tasks.split(","):
        [path] = out.rglob(f"samples_{task}_*.jsonl")
        samples[task] = sorted((json.loads(line) for line in path.read_text().splitlines()), key=lambda s: s["doc_id"])
    return results, samples, run.stdout


# hf in float32: a score over a prefix the backend reused differs from a fresh one in the last bits (CI saw 1.3e-6
# on a five-token choice), so the model's log-likelihoods equal `score` to float32's precision, not bit for bit.
FP32 = 1e-4


def powersample_lm_eval(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`powersample lm-eval ARGV` in a process of its own (lm-eval sets up its logging on stderr once per process)."""
    command = [sys.executable, "-m", "powersample.cli", "lm-eval", *argv]
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def toy() -> ToyBackend:
    return ToyBackend(ToySpec.load(TOY_SPEC))


# The multiple-choice task's log-likelihoods, read off toy_capitals.json: the toy ignores the question, so each
# choice " X" is scored from the toy's start; the root row gives " Paris" 0.25 (its likeliest token), " Rome" and
# " Oslo" 0.05, " blue" 0.04, " green" 0.08, " light" 0.08, and after " light", " blue" 0.9 (the likeliest there).
CHOICES_WANT = [
    [(math.log(0.25), True), (math.log(0.05), False), (math.log(0.05), False)],
    [(math.log(0.04), False), (math.log(0.08), False)],
    [(math.log(0.04), False), (math.log(0.08) + math.log(0.9), False)],
]
CHOICES_ACC = [1.0, 0.0, 1.0]  # the likeliest choice: " Paris" (right), " green" (wrong), " light blue" (right)


def test_lm_eval_command_on_the_toy_gives_our_samples_and_the_exact_log_likelihoods(tmp_path):
    results, samples, stdout = run_lm_eval(tmp_path, TOY_ARGS, "powersample_capitals,powersample_choices")
    # generate_until: each document's two repeats are chains 0 and 1 of lm-eval's seed, cut at "\n"
    for doc, logged in zip(CAPITALS, samples["powersample_capitals"]):
        records = sample(toy(), f"Capital of {doc['country']}?", TOY_CONFIG, seed=SEED, num_samples=2, chat=False)
        want = [r.text.split("\n")[0] for r in records]
        assert logged["resps"] == [want]
        assert logged["exact_match"] == float(want[0] == " " + doc["capital"])
    capitals = results["results"]["powersample_capitals"]["exact_match,none"]
    assert capitals == pytest.approx(sum(s["exact_match"] for s in samples["powersample_capitals"]) / len(CAPITALS))
    assert 0 < capitals < 1  # the toy's likeliest text, " Paris", is right once in four
    # multiple choice: the toy's exact log p, and whether each token is the likeliest
    for logged, want, acc in zip(samples["powersample_choices"], CHOICES_WANT, CHOICES_ACC):
        have = [(float(ll), greedy == "True") for ll, greedy in logged["filtered_resps"]]
        assert [ll for ll, _ in have] == pytest.approx([ll for ll, _ in want], abs=1e-12)
        assert [greedy for _, greedy in have] == [greedy for _, greedy in want]
        assert logged["acc"] == acc
    assert results["results"]["powersample_choices"]["acc,none"] == pytest.approx(2 / 3)
    assert "|powersample_choices" in stdout  # lm-eval's own table


@pytest.mark.slow
def test_lm_eval_command_on_the_embedded_model_matches_score_and_sample(tmp_path):
    from powersample.backends import load_backend

    args = "backend=hf,method=power,alpha=4,mcmc_steps=2,block_size=2,chat=true"  # chat: no "\n" before the answer
    _, samples, _ = run_lm_eval(tmp_path, args, "powersample_capitals,powersample_choices", "--limit", "1")
    # generated texts: `powersample sample` with the same method, config and seed, cut at "\n" (and <|im_end|>,
    # which lm-eval adds as a stop: decoded text never holds it)
    out = tmp_path / "sample.jsonl"
    argv = ["sample", "Capital of France?", "--backend", "hf", "--seed", str(SEED), "--num-samples", "2"]
    argv += ["--method", "power", "--alpha", "4", "--mcmc-steps", "2", "--block-size", "2", "--max-new-tokens", "4"]
    assert main([*argv, "--output", str(out), "--quiet"]) == 0
    texts = [json.loads(line)["text"].split("\n")[0] for line in out.read_text().splitlines()]
    assert samples["powersample_capitals"][0]["resps"] == [texts]
    assert all(texts)  # words, not an empty cut
    # log-likelihoods: the backend's score of lm-eval's tokens (the context's, then the rest of context + choice's)
    backend = load_backend("hf")
    doc = json.loads((TASKS / "choices.jsonl").read_text().splitlines()[0])
    context = backend.encode(f"{doc['question']} Answer:", False)
    for choice, (ll, _) in zip(doc["choices"], samples["powersample_choices"][0]["filtered_resps"]):
        whole = backend.encode(f"{doc['question']} Answer: {choice}", False)
        assert whole[: len(context)] == context
        assert float(ll) == pytest.approx(math.fsum(backend.score(context, whole[len(context) :])), abs=FP32)
    # a rolling log-likelihood (one window here): the text's score after the EOS token
    lm = PowerSampleLM.from_backend(backend)
    text = "The capital of France is Paris."
    [total] = lm.loglikelihood_rolling([SimpleNamespace(args=(text,))], disable_tqdm=True)
    ids = backend.encode(text, False)
    assert total == pytest.approx(math.fsum(backend.score((min(backend.eos_ids),), ids)), abs=FP32)


# --- the model's pieces, in-process --------------------------------------------------------------------------------


def test_generate_runs_every_request_in_one_engine_run():
    """Chains of different requests decode together: as many backend calls as the longest chain needs alone."""
    jobs = [Job(f"q{seed}", seed, TOY_CONFIG, ("\n",)) for seed in (1, 2, 3, 4)]
    alone = []
    for job in jobs:
        backend = toy()
        [record] = sample(backend, job.prompt, job.config, seed=job.seed, chat=False)
        alone.append((record.text.split("\n")[0], backend.stats.extend_calls))
    together = toy()
    assert generate(together, jobs, chat=False, quiet=True) == [text for text, _ in alone]
    assert together.stats.extend_calls == max(calls for _, calls in alone) < sum(calls for _, calls in alone)


def test_loglikelihood_rolling_and_empty_contexts_on_the_toy():
    lm = PowerSampleLM.from_backend(toy(), TOY_CONFIG)
    [total] = lm.loglikelihood_rolling([SimpleNamespace(args=(" Paris Rome",))], disable_tqdm=True)
    assert total == pytest.approx(math.log(0.25) + math.log(0.02), abs=1e-12)  # " Rome" after " Paris": default
    [(ll, greedy)] = lm.loglikelihood([SimpleNamespace(args=("", " light blue"))], disable_tqdm=True)
    assert (ll, greedy) == (pytest.approx(math.log(0.08) + math.log(0.9), abs=1e-12), False)
    with pytest.raises(PowerSampleError, match="cannot spell 'x'"):
        lm.loglikelihood([SimpleNamespace(args=("Q", " Parisx"))], disable_tqdm=True)


def test_long_pairs_lose_their_first_context_tokens():
    assert integration.fitted((1, 2, 3, 4), (5, 6), 4) == ((3, 4), (5, 6))
    assert integration.fitted((1, 2), (5, 6), None) == ((1, 2), (5, 6))
    with pytest.raises(PowerSampleError, match="does not fit the model's 2-token context"):
        integration.fitted((1,), (5, 6), 2)


def test_model_args_are_parsed_through_the_field_declarations():
    settings = parse_model_args({"backend": "toy", "toy_spec": "x.json", "alpha": 2, "max_new_tokens": 8.0})
    assert (settings.spec.name, settings.spec.toy_spec, settings.seed, settings.chat) == ("toy", "x.json", SEED, False)
    assert settings.config == SamplerConfig(alpha=2.0, max_new_tokens=8)
    ladder = parse_model_args({"alphas": "1,2,4", "method": "power-pt", "replicas": 3, "seed": 7})
    assert (ladder.config.alphas, ladder.config.replicas, ladder.seed) == ("1,2,4", 3, 7)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"alpah": 2}, "model_args: unknown argument 'alpah'; known: backend, model,"),
        ({"alpha": -1}, "model_args: alpha must be between 1e-06 and 1e+06, got -1"),
        ({"mcmc_steps": 2.5}, "model_args: mcmc_steps must be an integer, got 2.5"),
        ({"chat": "maybe"}, "model_args: chat must be true or false, got 'maybe'"),
        ({"backend": "gpt"}, "model_args: unknown backend 'gpt'"),
        ({"method": "nope"}, "model_args: unknown method 'nope'"),
        ({"seed": -1}, "model_args: seed must be an integer >= 0, got -1"),
        ({"block_size": "none", "max_new_tokens": "x"}, "model_args: max_new_tokens must be an integer, got 'x'"),
    ],
)
def test_bad_model_args_are_one_line_errors(args, message):
    with pytest.raises(PowerSampleError) as error:
        parse_model_args(args)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_bad_model_args_through_the_command_exit_2_with_one_line():
    """lm-eval builds the model after indexing its tasks (about 10 s here), then our error ends the command."""
    argv = ["--model", "powersample", "--model_args", "backend=toy,alpah=2", "--tasks", "powersample_choices"]
    run = powersample_lm_eval(*argv, "--include_path", str(TASKS))
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1].startswith("powersample: error: model_args: unknown argument 'alpah'")


@pytest.mark.parametrize(
    ("method", "temperature", "max_tokens", "block_size"),
    [("base", 0, 8, None), ("base", 0.5, 8, None), ("base", 1.0, 8, None), ("power", 0, 4, 8), ("power", 0.7, 16, 4)],
)
def test_generation_kwargs_are_read_as_the_server_reads_a_request(method, temperature, max_tokens, block_size):
    pytest.importorskip("pydantic")
    from powersample.server.protocol import CompletionBody, sampler_config

    base = SamplerConfig(method=method, block_size=block_size, max_new_tokens=32)
    kwargs = {"temperature": temperature, "max_gen_toks": max_tokens}
    body = CompletionBody(prompt="x", temperature=temperature, max_tokens=max_tokens)
    assert request_config(base, dict(kwargs)) == sampler_config(body, base)[0]


def test_generation_kwargs_override_fields_and_default_to_greedy():
    base = SamplerConfig(method="base")
    assert request_config(base, {}).top_k == 1  # lm-eval's default temperature, 0
    assert request_config(base, {"do_sample": True}) == base  # the method's own temperature
    assert request_config(SamplerConfig(), {"alpha": 2, "mcmc_steps": "3"}) == SamplerConfig(alpha=2, mcmc_steps=3)
    with pytest.raises(PowerSampleError, match="^alpha must be between"):
        request_config(SamplerConfig(), {"alpha": 0})


def test_stops_are_until_and_the_eos_text_cut_as_the_server_cuts():
    lm = PowerSampleLM.from_backend(toy(), TOY_CONFIG)
    job = lm._job("q", {"until": ["\n", ""], "seed": 5, "max_gen_toks": 3})
    assert (job.stops, job.seed, job.config.max_new_tokens, job.config.block) == (("\n", "<eos>"), 5, 3, 2)
    with pytest.raises(PowerSampleError, match="^gen_kwargs: until must be a string or a list"):
        lm._job("q", {"until": 3})


def test_lm_eval_help_is_lm_evals_own():
    run = powersample_lm_eval("--help")
    assert run.returncode == 0
    assert "Language Model Evaluation Harness" in run.stdout


def test_without_lm_eval_the_command_is_one_line_and_exit_2(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` raises ModuleNotFoundError
    monkeypatch.delitem(sys.modules, "powersample.integrations.lm_eval")  # imported above: imported again
    monkeypatch.delattr(powersample.integrations, "lm_eval")
    assert main(["lm-eval", "--model", "powersample"]) == 2
    assert capsys.readouterr().err == (
        "powersample: error: powersample lm-eval needs lm-evaluation-harness: pip install lm-eval\n"
    )


def test_the_package_and_its_command_line_import_without_lm_eval():
    code = "import sys, powersample, powersample.cli; print('lm_eval' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "False"


def test_lm_evals_own_errors_are_one_line_unless_verbosity_is_given(monkeypatch):
    import lm_eval.__main__

    def missing_task():
        raise ValueError("Tasks not found: nonexistent_task")

    monkeypatch.setattr(lm_eval.__main__, "cli_evaluate", missing_task)
    with pytest.raises(PowerSampleError) as error:
        run_cli(["--tasks", "nonexistent_task"])
    assert str(error.value) == ("lm-eval: Tasks not found: nonexistent_task (--verbosity DEBUG shows its traceback)")
    with pytest.raises(ValueError, match="^Tasks not found"):
        run_cli(["--tasks", "nonexistent_task", "--verbosity", "DEBUG"])
