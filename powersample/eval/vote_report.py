"""The report's voting sections: maj@k beside pass@k, and a power run against a vote at equal tokens.

    ## Majority vote (maj@k) and pass@k   per row of a task with a vote rule (tasks.VoteRule), for k = 1, 2, 4, ...
                                         up to the samples per problem (a problem's samples are its seeds'
                                         records): both with a 95% bootstrap interval over problems; then, for
                                         pairs of rows of a task, maj@k B − A on the problems both have, with the
                                         paired bootstrap interval (all of a problem's samples move together)
    ## Power vs a vote at equal tokens   each `eval --vote-match` row against the run it matched, on the
                                         (problem, seed) pairs both graded (eval.paired.compare)

Rows that are votes themselves (--vote-match) are left out of maj@k: their records already vote. How answers are
grouped, the tie-break and the subset estimator are eval.voting's; the section's note says them.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from typing import Callable

import numpy as np

from powersample.errors import PowerSampleError
from powersample.eval import metrics, paired, voting
from powersample.eval.records import identity_hash, record_key
from powersample.eval.rows import Row, grid, num_cell, row_pairs
from powersample.eval.tasks import GradeOptions, Task, get_task

VOTE_HEADER = ("task", "method", "k", "problems", "pass@k (95% CI)", "maj@k (95% CI)")
PAIRED_VOTE_HEADER = ("task", "A", "B", "k", "problems", "maj@k A", "maj@k B", "B − A (95% CI)")
MATCH_HEADER = (
    "task",
    "A (matched run)",
    "B (vote)",
    "n (problems)",
    "tokens/pair A",
    "tokens/pair B",
    "samples/vote",
    "ties broken",
    "accuracy A",
    "accuracy B",
    "B − A (95% CI)",
    "A only / B only",
    "McNemar p",
)
VOTE_NOTE = (
    "maj@k: the answer most of k samples of a problem give, answers grouped by {rules}; a tie goes to the answer "
    "whose samples have the highest mean log p per token, then to the one given first; samples without an answer "
    "abstain. A problem's maj@k is the mean over all C(n, k) of its k-subsets of samples (exact up to "
    f"{voting.MAX_SUBSETS:,} subsets, else that many random ones, seeded); pass@k is the unbiased estimator. "
    f"Intervals: bootstrap over problems ({paired.RESAMPLES:,} resamples, seed {paired.SEED})."
)
MATCH_NOTE = (
    "Each (problem, seed) of B drew base (or low-temp) samples until their tokens reached that pair's "
    "tokens_generated in A, then voted (ties as above; 'ties broken': the share of votes the tie-break decided). "
    "B − A: paired bootstrap over problems."
)


def voting_sections(rows: list[Row]) -> list[str]:
    """The maj@k section and the vote-match section (each left out when it has no line)."""
    return [text for text in (maj_section(rows), match_section(rows)) if text]


def maj_section(rows: list[Row]) -> str:
    """maj@k and pass@k per row, then maj@k paired between rows; and a line per task that has no vote."""
    tasks = {row.task: task for row in rows if row.graded and (task := _task(row.task)) is not None}
    voted = [row for row in rows if row.task in tasks and tasks[row.task].vote and not _is_vote(row)]
    tables = {id(row): problem_ballots(row, tasks[row.task]) for row in voted}
    cells = [line for row in voted for line in maj_cells(row, tables[id(row)])]
    paired_cells = [line for a, b in row_pairs(voted) for line in paired_maj_cells(a, b, tables[id(a)], tables[id(b)])]
    no_vote = [f"{name}: no majority vote ({task.no_vote})." for name, task in tasks.items() if not task.vote]
    if not cells and not no_vote:
        return ""
    rules = "; ".join(sorted({f"{t.vote.name} ({name})" for name, t in tasks.items() if t.vote}))
    parts = ["## Majority vote (maj@k) and pass@k"]
    parts += [grid(VOTE_HEADER, cells), VOTE_NOTE.format(rules=rules)] if cells else []
    parts += [grid(PAIRED_VOTE_HEADER, paired_cells)] if paired_cells else []
    return "\n\n".join(parts + no_vote)


def _task(name: str) -> Task | None:
    try:
        return get_task(name)
    except PowerSampleError:  # a task of another version: no vote rule known here
        return None


def _is_vote(row: Row) -> bool:
    return "vote_match" in row.identity


def problem_ballots(row: Row, task: Task) -> dict[str, voting.Ballots]:
    """Each problem's graded samples (its seeds' records, in seed order) as Ballots, grouped by the task's rule."""
    rule = task.vote
    assert rule is not None
    grading = row.identity.get("grading")
    timeout = grading.get("math_timeout") if isinstance(grading, dict) else None
    options = GradeOptions(math_timeout=timeout) if isinstance(timeout, (int, float)) else GradeOptions()
    same = _cached(lambda a, b: rule.same(a, b, options))
    by_problem: dict[str, list[dict]] = defaultdict(list)
    for r in sorted(row.records, key=lambda r: r["seed"]):
        if r.get("correct") is not None:
            by_problem[str(r["problem_id"])].append(r)
    return {
        pid: voting.ballots(
            [r.get("answer") for r in recs],
            [r["correct"] for r in recs],
            [r.get("logp_per_token") for r in recs],
            same,
        )
        for pid, recs in by_problem.items()
    }


def _cached(same: Callable[[str, str], bool]) -> Callable[[str, str], bool]:
    return functools.lru_cache(maxsize=None)(same)


def ks(most: int) -> list[int]:
    """k = 1, 2, 4, ... up to `most`, and `most` itself."""
    out = [1 << i for i in range(most.bit_length())]
    return out + [most] * (most >= 1 and most not in out)


def maj_cells(row: Row, table: dict[str, voting.Ballots]) -> list[list[str]]:
    """A line per k: problems with at least k samples, their mean pass@k and maj@k with bootstrap intervals."""
    lines = []
    for k in ks(max((len(b) for b in table.values()), default=0)):
        chosen = {pid: b for pid, b in table.items() if len(b) >= k}
        passes = [metrics.pass_at_k(len(b), sum(b.correct), k) for b in chosen.values()]
        majs = [voting.maj_at_k(b, k, pid) for pid, b in chosen.items()]
        lines.append([row.task, row.label, str(k), str(len(chosen)), _interval_cell(passes), _interval_cell(majs)])
    return lines


def paired_maj_cells(
    a: Row, b: Row, table_a: dict[str, voting.Ballots], table_b: dict[str, voting.Ballots]
) -> list[list[str]]:
    """maj@k of B against A on the problems where both have at least k samples, for the k both reach."""
    lines = []
    shared = sorted(set(table_a) & set(table_b))
    for k in ks(min((min(len(table_a[p]), len(table_b[p])) for p in shared), default=0)):
        maj_a = np.array([voting.maj_at_k(table_a[p], k, p) for p in shared])
        maj_b = np.array([voting.maj_at_k(table_b[p], k, p) for p in shared])
        low, high = bootstrap(maj_b - maj_a)
        diff = float(np.mean(maj_b - maj_a))
        cells = [a.task, a.label, b.label, str(k), str(len(shared)), f"{maj_a.mean():.3f}", f"{maj_b.mean():.3f}"]
        lines.append([*cells, f"{diff:+.3f} [{low:+.3f}, {high:+.3f}]"])
    return lines


def bootstrap(values: np.ndarray) -> tuple[float, float]:
    """95% bootstrap interval of the mean of per-problem values, resampling problems (eval.paired's bootstrap)."""
    clusters = np.arange(len(values))
    return paired.cluster_bootstrap(clusters, values, paired.RESAMPLES, np.random.default_rng(paired.SEED))


def _interval_cell(values: list[float]) -> str:
    if not values:
        return "—"
    low, high = bootstrap(np.asarray(values, dtype=float))
    return f"{np.mean(values):.3f} [{low:.3f}, {high:.3f}]"


def match_section(rows: list[Row]) -> str:
    """Each --vote-match row against the run it matched, when that run is in the report (else a line saying so)."""
    by_hash = {(row.task, identity_hash(row.identity)): row for row in rows}
    cells, missing = [], []
    for vote in (row for row in rows if _is_vote(row)):
        matched = by_hash.get((vote.task, vote.identity["vote_match"]))
        result = paired.compare(matched.verdicts, vote.verdicts) if matched else None
        if matched is None or result is None:
            missing.append(f"{vote.label}: the run it matched ({vote.identity['vote_match']}) is not in this report.")
            continue
        cells.append(match_cells(matched, vote, result))
    if not cells and not missing:
        return ""
    table = [grid(MATCH_HEADER, cells), MATCH_NOTE] if cells else []
    return "\n\n".join(["## Power vs a vote at equal tokens", *table, *missing])


def match_cells(a: Row, b: Row, result: paired.Paired) -> list[str]:
    """The matched run A against the vote B on the pairs both graded."""
    both = set(a.verdicts) & set(b.verdicts)
    tokens_a = metrics.mean([r["tokens_generated"] for r in a.records if record_key(r) in both])
    tokens_b = metrics.mean([r["tokens_generated"] for r in b.records if record_key(r) in both])
    votes = [r["vote"] for r in b.records if record_key(r) in both and r.get("vote")]
    samples = metrics.mean([len(v["samples"]) for v in votes])
    ties = metrics.mean([float(v["tie_break"]) for v in votes])
    low, high = result.interval
    return [
        a.task,
        a.label,
        b.label,
        f"{result.n} ({result.clusters})",
        num_cell(tokens_a, ".1f"),
        num_cell(tokens_b, ".1f"),
        num_cell(samples, ".1f"),
        num_cell(ties, ".3f"),
        f"{result.accuracy_a:.3f}",
        f"{result.accuracy_b:.3f}",
        f"{result.difference:+.3f} [{low:+.3f}, {high:+.3f}]",
        f"{result.a_only} / {result.b_only}",
        f"{result.p_value:.3g}",
    ]
