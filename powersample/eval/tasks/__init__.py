"""Evaluation tasks. Each task is data plus two functions:

    load(data, chat)              -> list[Problem]   # the problems, with the prompt sent to `sample()`
    grade(problem, text, options) -> Grade           # extract the answer from a completion and judge it

and, for a task that can be voted on, its vote rule: which extracted answers (Grade.answer) count as one answer in a
majority vote (eval.voting). One file per task; this module holds the shared types and the registry.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from powersample.errors import PowerSampleError


@dataclass(frozen=True)
class Problem:
    """One problem of a task."""

    id: str  # stable within the task's data (MATH file path, HumanEval task_id, ...)
    prompt: str  # the text sent to sample(), already formatted for the model
    gold: str | None  # the reference answer; None when this task is not graded here
    extra: Mapping[str, Any] = field(default_factory=dict)  # what grading needs besides gold (tests, choices)


@dataclass(frozen=True)
class Grade:
    """The verdict on one completion."""

    answer: str | None  # what was extracted from the completion (None: nothing found)
    correct: bool | None  # None: not graded here (AlpacaEval needs an external judge)
    detail: str = ""  # why, in a few words: "no boxed answer", "timed out", "AssertionError: ..."


@dataclass(frozen=True)
class GradeOptions:
    """Limits for grading; they can change verdicts, so they are part of a run's identity."""

    code_timeout: float = 10.0  # seconds of wall time a HumanEval program may run
    code_memory_mb: int = 1024  # its address-space limit
    math_timeout: float = 10.0  # seconds math-verify may spend on one completion


@dataclass(frozen=True)
class VoteRule:
    """How a task's answers are grouped for a majority vote. The answers are what grading extracted (Grade.answer,
    the record's `answer`): a sample without one abstains. Two answers are one vote when `same(a, b, options)`; a
    group is named, and judged, by its first answer (eval.voting.group_answers)."""

    name: str  # what the report says the answers were grouped by
    same: Callable[[str, str, GradeOptions], bool]


@dataclass(frozen=True)
class Task:
    """A named task: its loader and its grader, and its vote rule (None: its answers cannot be voted on)."""

    name: str
    load: Callable[[str | None, bool], list[Problem]]  # (data path or None, chat) -> problems
    grade: Callable[[Problem, str, GradeOptions], Grade]  # (problem, completion, options) -> verdict
    # (run dir, problems, records, generator name): task-specific outputs after a run (AlpacaEval's outputs file)
    export: Callable[[Path, list[Problem], list[dict], str], None] | None = None
    vote: VoteRule | None = None
    no_vote: str = "answers cannot be voted on"  # why not, for the report, when vote is None


def get_task(name: str) -> Task:
    """The task called `name`, or a one-line error listing the known ones."""
    from powersample.eval.tasks import alpacaeval, gpqa, humaneval, math500

    tasks = {t.name: t for t in (math500.TASK, humaneval.TASK, gpqa.TASK, alpacaeval.TASK)}
    assert tuple(tasks) == TASK_NAMES
    if name not in tasks:
        raise PowerSampleError(f"unknown task {name!r}; choose one of {', '.join(tasks)}")
    return tasks[name]


TASK_NAMES = ("math500", "humaneval", "gpqa", "alpacaeval")


def problems_digest(problems: list[Problem]) -> str:
    """A hash of every problem's content, so a run never mixes records made from different data."""
    blob = json.dumps([asdict(p) for p in problems], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


__all__ = ["Grade", "GradeOptions", "Problem", "Task", "TASK_NAMES", "VoteRule", "get_task", "problems_digest"]
