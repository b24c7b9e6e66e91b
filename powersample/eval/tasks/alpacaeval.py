"""AlpacaEval 2.0: open-ended instructions, judged later by `alpaca_eval` (it needs an API key), not here.

Data: `--data FILE`, the alpaca_eval JSON (a list of {"instruction", ...}; JSONL works too). The run writes
`alpaca_eval_outputs.seed<S>.json` per seed in the run directory: a list of {instruction, output, generator,
dataset} that `alpaca_eval --model_outputs FILE` judges.
"""

from __future__ import annotations

from pathlib import Path

from powersample.errors import PowerSampleError
from powersample.eval.data import check_unique_ids, field, read_records
from powersample.eval.tasks import Grade, GradeOptions, Problem, Task
from powersample.io import write_json_atomic


def load(data: str | None, chat: bool) -> list[Problem]:
    """One problem per instruction, sent as-is."""
    if data is None:
        raise PowerSampleError("alpacaeval needs --data FILE (the alpaca_eval JSON of instructions)")
    problems, ids = [], []
    for i, (place, row) in enumerate(read_records(data)):
        instruction = field(row, ("instruction",), data, place)
        extra = {"dataset": str(row.get("dataset", "alpaca_eval"))}
        problems.append(Problem(id=str(row.get("id", i)), prompt=instruction, gold=None, extra=extra))
        ids.append((place, problems[-1].id))
    check_unique_ids(data, ids)
    return problems


def grade(problem: Problem, completion: str, options: GradeOptions) -> Grade:
    """No verdict here: the output is the completion, judged by alpaca_eval."""
    return Grade(answer=completion.strip(), correct=None, detail="judged by alpaca_eval")


def export(run_dir: Path, problems: list[Problem], records: list[dict], generator: str) -> None:
    """Write alpaca_eval_outputs.seed<S>.json for every seed with records, in problem order (atomically)."""
    by_key = {(r["problem_id"], r["seed"]): r for r in records}
    for seed in sorted({r["seed"] for r in records}):
        rows = [_output_row(p, by_key[(p.id, seed)], generator) for p in problems if (p.id, seed) in by_key]
        write_json_atomic(run_dir / f"alpaca_eval_outputs.seed{seed}.json", rows)


def _output_row(problem: Problem, record: dict, generator: str) -> dict:
    return {
        "instruction": problem.prompt,
        "output": record["completion"].strip(),
        "generator": generator,
        "dataset": problem.extra.get("dataset", "alpaca_eval"),
    }


TASK = Task(name="alpacaeval", load=load, grade=grade, export=export, no_vote="open-ended answers, judged elsewhere")
