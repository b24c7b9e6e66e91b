"""lm-evaluation-harness as a real client: `lm_eval --model local-completions` against a live `powersample serve`
(toy backend) on a generate_until task defined here with local data; its outputs must be what the server logged."""

from __future__ import annotations

import json
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


def write_task(folder: Path) -> Path:
    data = folder / "sums.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    tasks = folder / "tasks"
    tasks.mkdir()
    (tasks / "powersample_sums.yaml").write_text(TASK.format(data=data))
    return tasks


def lm_eval_command(url: str, tasks: Path, out: Path) -> list[str]:
    exe = shutil.which("lm_eval") or str(Path(sys.executable).with_name("lm_eval"))
    model_args = (f"model=toy-sums,base_url={url}/v1/completions,tokenizer_backend=none,tokenized_requests=False,"
                  "num_concurrent=2,max_retries=1")  # fmt: skip
    return [exe, "--model", "local-completions", "--model_args", model_args, "--tasks", "powersample_sums",
            "--include_path", str(tasks), "--output_path", str(out), "--log_samples"]  # fmt: skip


def test_lm_eval_local_completions_runs_against_the_server(tmp_path):
    tasks, log, out = write_task(tmp_path), tmp_path / "server.jsonl", tmp_path / "out"
    backend = ToyBackend(ToySpec.from_dict(SPEC))
    settings = Settings(defaults=SamplerConfig(max_new_tokens=16, mcmc_steps=4), model_name="toy-sums",
                        api_key="k3y", output=str(log))  # fmt: skip
    env = {**os.environ, "OPENAI_API_KEY": "k3y", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "hf-datasets"), "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    with background_server(create_app(backend, settings)) as url:
        run = subprocess.run(lm_eval_command(url, tasks, out), env=env, capture_output=True, text=True,
                             timeout=300, check=False)
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
    assert {(r["config"]["alpha"], r["config"]["mcmc_steps"], r["config"]["block_size"], r["seed"]) for r in served} \
        == {(2.0, 2, 5, 1234)}  # fmt: skip
    assert {r["prompt"] for r in served} == {q["question"] + " Answer:" for q in QUESTIONS}
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    assert "powersample_sums" in results["results"]
