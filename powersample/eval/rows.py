"""What the report's sections share: a row of runs, markdown grids, and which rows are compared."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any, Iterable, Sequence

from powersample.eval.paired import Item
from powersample.eval.records import record_key

MAX_ALL_PAIRS = 6  # a task with more rows compares each with its first row only (else the lines grow as rows^2)


def method_name(method: str, identity: dict[str, Any]) -> str:
    """The method a row's label starts with: `vote base` for a --vote-match run of base (its records are votes)."""
    return ("vote " if "vote_match" in identity else "") + method


@dataclass(frozen=True)
class Row:
    """One (task, method) cell: its records and the config they were made with."""

    task: str
    label: str
    config: dict[str, Any]  # SamplerConfig.resolved()
    records: tuple[dict[str, Any], ...]
    identity: dict[str, Any] = field(default_factory=dict)  # the run's (run.json), config included

    @property
    def graded(self) -> list[bool]:
        return [bool(r["correct"]) for r in self.records if r.get("correct") is not None]

    @property
    def verdicts(self) -> dict[Item, bool]:
        """Each graded record's verdict by (problem, seed): what paired comparisons match on."""
        return {record_key(r): bool(r["correct"]) for r in self.records if r.get("correct") is not None}


def grid(header: Sequence[str], cells: Iterable[Sequence[str]]) -> str:
    """A markdown table: the header, then a line per row of cells."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(line) + " |" for line in cells])


def row_pairs(rows: list[Row]) -> list[tuple[Row, Row]]:
    """Pairs of graded rows of one task: all of them up to MAX_ALL_PAIRS rows, else each row against the first."""
    by_task: dict[str, list[Row]] = defaultdict(list)
    for row in rows:
        if row.graded:
            by_task[row.task].append(row)
    pairs = []
    for task_rows in by_task.values():
        many = len(task_rows) > MAX_ALL_PAIRS
        pairs += [(task_rows[0], b) for b in task_rows[1:]] if many else list(combinations(task_rows, 2))
    return pairs


def num_cell(value: float | None, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)
