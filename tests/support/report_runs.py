"""Run directories written directly, for the report's tests: run.json and records.jsonl with the fields the report
reads, so a test says exactly which verdicts and lengths each method has (no sampling)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from powersample import SamplerConfig
from powersample.samplers import registry


def write_run(
    run_dir: Path,
    records: list[dict[str, Any]],
    *,
    task: str = "math500",
    backend: dict[str, Any] | None = None,
    **config: Any,
) -> Path:
    """A run of SamplerConfig(**config) holding `records` (each filled in by `record`)."""
    identity = {
        "schema": 1,
        "task": task,
        "data": "digest",
        "chat": True,
        "grading": {},
        "config": registry.resolved(SamplerConfig(max_new_tokens=16, **config)),
        "backend": backend or {"name": "toy"},
    }
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text(json.dumps({"schema": 1, "identity": identity}))
    (run_dir / "records.jsonl").write_text("".join(json.dumps(record(**r)) + "\n" for r in records))
    return run_dir


def record(
    problem_id: str,
    seed: int = 0,
    correct: bool | None = True,
    length: int = 4,
    finish_reason: str | None = "eos",
    logp_per_token: float | None = -1.0,
    confidence: float | None = None,
) -> dict[str, Any]:
    out = {
        "problem_id": problem_id,
        "seed": seed,
        "tokens": [1] * length,
        "wall_seconds": 0.5,
        "proposals": 2,
        "accepted": 1,
        "tokens_generated": length,
        "correct": correct,
        "logp_per_token": logp_per_token,
        "confidence": confidence,
    }
    return out if finish_reason is None else {**out, "finish_reason": finish_reason}


def verdicts(pattern: str, seeds: int = 1) -> list[dict[str, Any]]:
    """Records of problems p0, p1, ... from a string of 1 (right) and 0 (wrong), seed-major: with 2 seeds and 3
    problems, "110 011" is seed 0 right on p0, p1 and seed 1 right on p1, p2."""
    rows = pattern.split()
    assert len(rows) == seeds
    return [
        {"problem_id": f"p{i}", "seed": s, "correct": c == "1"} for s, row in enumerate(rows) for i, c in enumerate(row)
    ]


def section(markdown: str, title: str) -> list[str]:
    """The table lines of one '## title' section."""
    part = markdown.split(f"## {title}\n\n")[1].split("\n\n")[0]
    return part.splitlines()[2:]
