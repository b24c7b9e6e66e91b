"""What the eval tests share: a toy model whose answers are \\boxed{1} or \\boxed{2}, a tiny sampler profile, and
the `powersample eval` command line over them."""

from __future__ import annotations

import json
from pathlib import Path

SPEC = {
    "vocab": ["The answer is ", "\\boxed{1}", "\\boxed{2}", "<eos>"],
    "eos_id": 3,
    "default": [0.1, 0.4, 0.3, 0.2],
    "next": {"": [0.5, 0.3, 0.2, 0.0]},
}
SAMPLER = ["--max-new-tokens", "6", "--block-count", "2", "--mcmc-steps", "2"]


def write_spec(directory: Path) -> Path:
    path = directory / "spec.json"
    path.write_text(json.dumps(SPEC))
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def eval_argv(spec: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "eval",
        "--task",
        "math500",
        "--data",
        str(data),
        "--backend",
        "toy",
        "--toy-spec",
        str(spec),
        *SAMPLER,
        "--output-dir",
        str(out),
        "--quiet",
        *extra,
    ]
