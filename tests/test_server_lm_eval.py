"""lm-evaluation-harness as a real client: `lm_eval --model local-completions` against a live `powersample serve`
(toy backend) on a generate_until task defined here with local data, whose outputs must be what the server logged;
and on a multiple-choice task (loglikelihood, through the server's /tokenize as lm-eval's tokenizer), whose
log-likelihoods must be the backend's own (the toy's exact ones, and the embedded model's score)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("lm_eval")

from powersample.backends.toy import ToyBackend, ToySpec
from powersample.config import SamplerConfig
from powersample.server.app import Settings, create_app
from powersample.server.background import background_server

# "\n" is likely, so lm-eval's `until: ["\n"]` cuts most samples
SPEC = {
    "vocab": ["4", "2", " is", " the answer", "\n", "<eos>"],
    "eos_id": 5,
    "default": [0.25, 0.2, 0.15, 0.15, 0.2, 0.05],
}
QUESTIONS = [{"question": f"What is {a} + {b}?", "answer": str(a + b)} for a, b in [(2, 2), (1, 1), (3, 1), (2, 0)]]
TASK = """task: powersample_sums
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}} Answer:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 10
  alpha: 2.0
  mcmc_steps: 2
  block_size: 5
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def write_task(
    folder: Path, name: str = "powersample_sums", template: str = TASK, questions: list[dict] = QUESTIONS
) -> Path:
    """A folder for lm-eval's --include_path holding task `name` (its YAML from `template`) over a JSONL file of
    `questions`; each task gets its own folder under `folder`."""
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in questions))
    tasks = folder / f"{name}_tasks"
    tasks.mkdir()
    (tasks / f"{name}.yaml").write_text(template.format(data=data))
    return tasks


def lm_eval_command(url: str, tasks: Path, out: Path) -> list[str]:
    exe = shutil.which("lm_eval") or str(Path(sys.executable).with_name("lm_eval"))
    model_args = (
        f"model=toy-sums,base_url={url}/v1/completions,tokenizer_backend=none,tokenized_requests=False,"
        "num_concurrent=2,max_retries=1"
    )
    return [
        exe,
        "--model",
        "local-completions",
        "--model_args",
        model_args,
        "--tasks",
        "powersample_sums",
        "--include_path",
        str(tasks),
        "--output_path",
        str(out),
        "--log_samples",
    ]


def test_lm_eval_local_completions_runs_against_the_server(tmp_path):
    tasks, log, out = write_task(tmp_path), tmp_path / "server.jsonl", tmp_path / "out"
    backend = ToyBackend(ToySpec.from_dict(SPEC))
    settings = Settings(
        defaults=SamplerConfig(max_new_tokens=16, mcmc_steps=4), model_name="toy-sums", api_key="k3y", output=str(log)
    )
    env = {
        **os.environ,
        "OPENAI_API_KEY": "k3y",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(tmp_path / "hf-datasets"),
        "TOKENIZERS_PARALLELISM": "false",
    }
    with background_server(create_app(backend, settings)) as url:
        run = subprocess.run(
            lm_eval_command(url, tasks, out), env=env, capture_output=True, text=True, timeout=300, check=False
        )
    assert run.returncode == 0, run.stderr[-3000:]
    [samples_file] = out.rglob("samples_powersample_sums_*.jsonl")
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    assert len(samples) == len(QUESTIONS)
    served = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(served) == len(QUESTIONS)
    # what lm-eval got is what the server sent, stop-truncated at "\n"
    assert Counter(s["resps"][0][0] for s in samples) == Counter(r["response_text"] for r in served)
    assert all("\n" not in r["response_text"] for r in served)
    # lm-eval's generation kwargs reached the sampler; its default seed too
    assert {
        (r["config"]["alpha"], r["config"]["mcmc_steps"], r["config"]["block_size"], r["seed"]) for r in served
    } == {(2.0, 2, 5, 1234)}
    assert {r["prompt"] for r in served} == {q["question"] + " Answer:" for q in QUESTIONS}
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    assert "powersample_sums" in results["results"]


# --- loglikelihood: a multiple-choice task through lm-eval's remote tokenizer --------------------------------------

CHARS = [chr(c) for c in range(32, 127)] + ["\n", "<eos>"]  # printable ASCII, one id per character
MC_QUESTIONS = [  # the toy below prefers "Paris" and "4" (right) and "green" (wrong): acc 2/3
    {"question": "Capital of France?", "choices": ["Paris", "Rome", "Oslo"], "answer": 0, "likely": "P"},
    {"question": "What is 2 + 2?", "choices": ["3", "4", "5"], "answer": 1, "likely": "4"},
    {"question": "Colour of the sky?", "choices": ["blue", "green"], "answer": 0, "likely": "g"},
]
MC_TASK = """task: powersample_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}} Answer:"
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


class CharToy(ToyBackend):
    """The toy model with a character tokenizer: a prompt's ids are its characters' (the toy's own `encode` gives
    none), so lm-eval's remote tokenizer (POST /tokenize) has ids to count and send back."""

    def encode(self, prompt, chat=True):
        return tuple(CHARS.index(c) for c in prompt)


def mc_toy() -> CharToy:
    """Uniform characters, except that after each question's context and the space before a choice, its `likely`
    character has p = 0.9."""
    uniform = [1 / len(CHARS)] * len(CHARS)
    rows = {}
    for q in MC_QUESTIONS:
        after = CharToy.encode(None, f"{q['question']} Answer: ")
        rows[",".join(map(str, after))] = [0.9 if c == q["likely"] else 0.1 / (len(CHARS) - 1) for c in CHARS]
    return CharToy(ToySpec.from_dict({"vocab": CHARS, "eos_id": len(CHARS) - 1, "default": uniform, "next": rows}))


def run_mc(url: str, tasks: Path, out: Path, key: str, env_dir: Path) -> list[dict]:
    """`lm_eval` on the multiple-choice task with its default tokenizer (auto: the server's /tokenize) and requests
    sent as token ids; the logged samples, in document order."""
    exe = shutil.which("lm_eval") or str(Path(sys.executable).with_name("lm_eval"))
    model_args = f"model=powersample,base_url={url}/v1/completions,auth_token={key},max_retries=1"
    command = [
        exe,
        "--model",
        "local-completions",
        "--model_args",
        model_args,
        "--tasks",
        "powersample_mc",
        "--include_path",
        str(tasks),
        "--output_path",
        str(out),
        "--log_samples",
    ]
    env = {
        **os.environ,
        "OPENAI_API_KEY": key,
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(env_dir / "hf-datasets"),
        "TOKENIZERS_PARALLELISM": "false",
    }
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Using remote tokenizer" in run.stderr, run.stderr[-3000:]
    [samples_file] = out.rglob("samples_powersample_mc_*.jsonl")
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    return sorted(samples, key=lambda s: s["doc_id"])


def exact_loglikelihoods(backend, question: dict) -> list[tuple[float, bool]]:
    """(sum of log p, every token the likeliest) of each choice after its context, as lm-eval defines them, from the
    backend's own score and rank of the same ids."""
    context = backend.encode(f"{question['question']} Answer:", chat=False)
    out = []
    for choice in question["choices"]:
        continuation = backend.encode(f"{question['question']} Answer: {choice}", chat=False)[len(context) :]
        ranked = backend.rank(context, continuation, 1)
        out.append((math.fsum(backend.score(context, continuation)), all(r.base_logp == r.top[0][1] for r in ranked)))
    return out


def logged(sample: dict) -> list[tuple[float, bool]]:
    """lm-eval's (log-likelihood, is_greedy) of each choice, from its samples log (where they are strings)."""
    return [(float(ll), str(greedy) == "True") for ll, greedy in sample["filtered_resps"]]


def test_lm_eval_multiple_choice_scores_with_the_toys_exact_log_probs(tmp_path):
    backend = mc_toy()
    settings = Settings(defaults=SamplerConfig(max_new_tokens=8, mcmc_steps=1), api_key="k3y")
    with background_server(create_app(backend, settings)) as url:
        samples = run_mc(
            url, write_task(tmp_path, "powersample_mc", MC_TASK, MC_QUESTIONS), tmp_path / "out", "k3y", tmp_path
        )
    assert len(samples) == len(MC_QUESTIONS)
    correct = []
    for sample, question in zip(samples, MC_QUESTIONS):
        want = exact_loglikelihoods(backend, question)
        have = logged(sample)
        assert [ll for ll, _ in have] == pytest.approx([ll for ll, _ in want], abs=1e-9)
        assert [greedy for _, greedy in have] == [greedy for _, greedy in want]
        best = max(range(len(want)), key=lambda j: want[j][0])
        correct.append(best == question["answer"])
        assert sample["acc"] == float(correct[-1])
    assert correct == [True, True, False]  # the toy's log-probs imply acc 2/3
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    assert results["results"]["powersample_mc"]["acc,none"] == pytest.approx(2 / 3)


@pytest.mark.slow
def test_lm_eval_multiple_choice_on_the_embedded_model_gets_score_of_the_same_tokens(tmp_path):
    from powersample.backends import load_backend

    backend = load_backend("auto")
    questions = [{k: v for k, v in q.items() if k != "likely"} for q in MC_QUESTIONS]
    settings = Settings(defaults=SamplerConfig(method="base", max_new_tokens=8), api_key="k3y")
    with background_server(create_app(backend, settings)) as url:
        samples = run_mc(
            url, write_task(tmp_path, "powersample_mc", MC_TASK, questions), tmp_path / "out", "k3y", tmp_path
        )
    for sample, question in zip(samples, questions):
        want = exact_loglikelihoods(backend, question)
        have = logged(sample)
        assert [ll for ll, _ in have] == pytest.approx([ll for ll, _ in want], abs=1e-3)
