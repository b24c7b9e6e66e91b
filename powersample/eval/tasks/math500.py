"""MATH500: the 500-problem MATH test subset of the paper, graded by final-answer equivalence (math-verify).

Data: `--data FILE` (JSON or JSONL with `problem` or `prompt`, and `answer`; the shared MATH500.json works), or
else `HuggingFaceH4/MATH-500` through `datasets` when the hub is reachable.
"""

from __future__ import annotations

from powersample.errors import PowerSampleError
from powersample.eval import math_grader
from powersample.eval.data import Place, check_unique_ids, field, read_records
from powersample.eval.tasks import Grade, GradeOptions, Problem, Task, VoteRule

# The paper's prompt for base models; instruct models get the same text through their chat template.
PROMPT = (
    "Can you solve the following math problem? {problem} "
    "Please reason step by step, and put your final answer within \\boxed{{}}."
)
HUB_ID = "HuggingFaceH4/MATH-500"


def load(data: str | None, chat: bool) -> list[Problem]:
    """Problems from `data`, or from the hub when no file is given."""
    rows = read_records(data) if data else [(Place("record", i), row) for i, row in enumerate(_from_hub(), 1)]
    source = data or HUB_ID
    problems, ids = [], []
    for i, (place, row) in enumerate(rows):
        text = field(row, ("problem", "prompt"), source, place)
        gold = field(row, ("answer",), source, place)
        pid = str(row.get("unique_id") or row.get("id") or i)
        problems.append(Problem(id=pid, prompt=PROMPT.format(problem=text), gold=gold))
        ids.append((place, pid))
    check_unique_ids(source, ids)
    return problems


def grade(problem: Problem, completion: str, options: GradeOptions) -> Grade:
    """Correct when the last \\boxed{} answer is equivalent to the gold answer."""
    answer = math_grader.last_boxed(completion)
    if answer is None:
        return Grade(answer=None, correct=False, detail="no boxed answer")
    correct, why = math_grader.equivalent(problem.gold or "", answer, options.math_timeout)
    return Grade(answer=answer, correct=correct, detail=why)


def _from_hub() -> list[dict]:
    try:
        import datasets
    except ModuleNotFoundError:
        raise PowerSampleError(f"math500 needs --data FILE, or `pip install datasets` to fetch {HUB_ID}") from None
    try:
        return [dict(row) for row in datasets.load_dataset(HUB_ID, split="test")]
    except Exception as e:  # noqa: BLE001 - offline, gated, renamed: all mean "give me a file"
        raise PowerSampleError(f"cannot load {HUB_ID} ({type(e).__name__}); pass --data FILE") from None


def same_answer(a: str, b: str, options: GradeOptions) -> bool:
    """Whether two boxed answers are one vote: math-verify equivalence (so 1/2, 0.5 and \\frac{1}{2} are one),
    under the grading's timeout (a timeout counts as different)."""
    return a.strip() == b.strip() or math_grader.equivalent(a, b, options.math_timeout)[0]


TASK = Task(
    name="math500", load=load, grade=grade, vote=VoteRule("math-verify equivalence of the boxed answers", same_answer)
)
