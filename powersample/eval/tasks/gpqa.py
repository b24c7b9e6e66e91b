"""GPQA Diamond: 198 graduate-level multiple-choice questions, graded by the letter the model ends on.

The data set is gated, so it comes from `--data FILE`: a CSV in the official layout (`Question`,
`Correct Answer`, `Incorrect Answer 1..3`; `Record ID` is used as the problem id when present). The four choices
are shuffled per question with a generator seeded by the question's id, so every method and seed sees the same
order. The answer is the last standalone letter A-D in the completion.
"""

from __future__ import annotations

import random
import re
import zlib

from powersample.errors import PowerSampleError
from powersample.eval.data import Place, check_unique_ids, read_csv
from powersample.eval.tasks import Grade, GradeOptions, Problem, Task, VoteRule

COLUMNS = ("Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3")
LETTERS = "ABCD"
PROMPT = (
    "Answer the following multiple choice question. Think step by step, and end your response with "
    "'The answer is X' where X is one of A, B, C or D.\n\n{question}\n\n{choices}"
)
_LETTER = re.compile(r"(?<![A-Za-z0-9])([A-D])(?![A-Za-z0-9])")


def load(data: str | None, chat: bool) -> list[Problem]:
    """Questions with shuffled choices; the gold answer is the correct choice's letter."""
    if data is None:
        raise PowerSampleError("gpqa is gated: download GPQA Diamond yourself and pass its CSV with --data FILE")
    problems, ids = [], []
    for i, row in enumerate(read_csv(data, COLUMNS)):
        pid = (row.get("Record ID") or "").strip() or str(i)
        ids.append((Place("row", i + 2), pid))
        choices = [row[c].strip() for c in COLUMNS[1:]]
        if not row["Question"].strip() or not all(choices):
            raise PowerSampleError(f"{data}: row {i + 2} has an empty question or choice")
        order = shuffled_order(pid)
        listed = "\n".join(f"{LETTERS[k]}) {choices[j]}" for k, j in enumerate(order))
        gold = LETTERS[order.index(0)]  # choice 0 is the correct answer
        prompt = PROMPT.format(question=row["Question"].strip(), choices=listed)
        problems.append(Problem(id=pid, prompt=prompt, gold=gold, extra={"order": order}))
    check_unique_ids(data, ids)
    return problems


def shuffled_order(problem_id: str) -> list[int]:
    """A permutation of the four choices, fixed by the problem id (stable across runs and Python versions)."""
    order = [0, 1, 2, 3]
    random.Random(zlib.crc32(problem_id.encode())).shuffle(order)
    return order


def last_letter(text: str) -> str | None:
    """The last A, B, C or D that stands alone (not inside a word), or None."""
    found = _LETTER.findall(text)
    return found[-1] if found else None


def grade(problem: Problem, completion: str, options: GradeOptions) -> Grade:
    letter = last_letter(completion)
    if letter is None:
        return Grade(answer=None, correct=False, detail="no letter A-D")
    return Grade(answer=letter, correct=letter == problem.gold, detail="" if letter == problem.gold else "wrong")


def same_letter(a: str, b: str, options: GradeOptions) -> bool:
    """One vote per letter."""
    return a == b


TASK = Task(name="gpqa", load=load, grade=grade, vote=VoteRule("the letter", same_letter))
