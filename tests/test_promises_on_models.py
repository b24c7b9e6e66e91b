"""The eval promises (docs/evaluation.md) on real engines, on more than one model: records do not depend on
`--batch`, and a run killed with SIGKILL and resumed equals an uninterrupted one, bit for bit (llama.cpp's exact
kernels).

Models: the embedded SmolLM2 (Q4_1) and the model matrix's gemma3 at Q4_K_M (sliding layers, the K-quant mix that
broke both promises before llama.cpp ran its exact kernels: 5 of 10 records differed between --batch 1 and 8, and 3
of 10 after a resume). Per-cell checks of the samplers' promises run in the matrix (tools.matrix.promises).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from powersample.cli import main
from powersample.errors import PowerSampleError

pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
SAMPLER = ["--method", "power", "--max-new-tokens", "12", "--block-size", "4", "--mcmc-steps", "2", "--threads", "1"]
PROBLEMS = [
    {"problem": f"What is {a} + {b}?", "answer": str(a + b), "id": f"p{a}"}
    for a, b in ((3, 4), (12, 30), (7, 8), (21, 5))
]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "sums.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS))
    return path


@pytest.fixture(scope="module", params=["embedded", "gemma3-q4_k_m"])
def model(request) -> list[str]:
    """The --model arguments of each model (none: the embedded one)."""
    if request.param == "embedded":
        try:
            from powersample.backends.embedded import embedded_gguf_path

            embedded_gguf_path()
        except PowerSampleError as e:
            pytest.skip(str(e))
        return []
    pytest.importorskip("transformers")
    from powersample.tools.matrix import ARCHS
    from powersample.tools.matrix.models import built, quantized

    return ["--model", str(quantized(built(ARCHS["gemma3"]), "q4_k_m"))]


def argv(model: list[str], data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "eval",
        "--task",
        "math500",
        "--data",
        str(data),
        "--backend",
        "llamacpp",
        *model,
        *SAMPLER,
        "--seeds",
        "0-1",
        "--output-dir",
        str(out),
        "--quiet",
        *extra,
    ]


def records(out: Path) -> dict[tuple[str, int], tuple]:
    rows = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    return {(r["problem_id"], r["seed"]): (r["tokens"], r["token_logp"], r["accepted"]) for r in rows}


def test_records_do_not_depend_on_the_batch(model, data, tmp_path):
    runs = {}
    for batch in (1, 8):
        assert main(argv(model, data, tmp_path / f"b{batch}", "--batch", str(batch))) == 0
        runs[batch] = records(tmp_path / f"b{batch}")
    assert len(runs[1]) == 8 and runs[1] == runs[8]  # tokens, log p (bit-equal floats) and acceptances


def test_a_killed_run_resumes_to_the_uninterrupted_one(model, data, tmp_path):
    clean = tmp_path / "clean"
    assert main(argv(model, data, clean, "--batch", "2")) == 0
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "powersample.cli", *argv(model, data, out, "--batch", "2")]
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    written, deadline = out / "records.jsonl", time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if written.exists() and written.read_bytes().count(b"\n") >= 2:
            break
        time.sleep(0.01)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-500:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = len(records(out))
    assert 2 <= killed_at < 8
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert f"8 records ({killed_at} resumed)" in done.stdout
    assert records(out) == records(clean)


def test_power_pt_records_do_not_depend_on_the_batch(model, data, tmp_path):
    """power-pt's replicas share each batch with other chains' replicas, at rung temperatures of their own: the
    records are still the same at --batch 1 and 8, swap counts included."""
    pt = ["--method", "power-pt", "--replicas", "2", "--alpha-min", "2"]  # after SAMPLER's --method: it wins
    runs = {}
    for batch in (1, 8):
        assert main(argv(model, data, tmp_path / f"b{batch}", "--batch", str(batch), *pt)) == 0
        rows = [json.loads(line) for line in (tmp_path / f"b{batch}" / "records.jsonl").read_text().splitlines()]
        runs[batch] = {(r["problem_id"], r["seed"]): (r["tokens"], r["token_logp"], r["swaps"]) for r in rows}
    assert len(runs[1]) == 8 and runs[1] == runs[8]
