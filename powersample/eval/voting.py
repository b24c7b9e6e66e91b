"""Majority voting over a problem's samples: grouping answers by the task's rule, the vote, and maj@k.

Grouping. The answers are what grading extracted (the record's `answer`); a sample without one abstains. They are
grouped by the task's VoteRule (tasks.VoteRule: math-verify equivalence for MATH500, the letter for GPQA) greedily in
draw order: an answer joins the first group whose first answer it is the same as, else it starts a new group. A
group is named and judged by its first answer: the vote is correct when that answer was graded correct.

The vote. The group with the most votes wins. A tie goes to the tied group whose voting samples have the highest
mean log p per token (each sample's `logp_per_token`, the per-token mean of its base log p, averaged over the
group's samples in the vote), then to the group whose first sample in the vote was drawn first. A vote where
every sample abstained is wrong.

maj@k. For a problem with n graded samples, maj@k is the probability that the vote of k of them, a uniformly random
k-subset, is correct: the mean over all C(n, k) subsets, enumerated when there are at most MAX_SUBSETS of them, else
estimated by MAX_SUBSETS random subsets drawn with a generator seeded by (problem, k), so a report is reproducible.
Both are unbiased for the same number, as pass@k's estimator is for its own. maj@1 is pass@1
(but where math-verify judged two equivalent answers differently: a group takes its first answer's verdict).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from itertools import combinations
from typing import Callable, Sequence

import numpy as np

MAX_SUBSETS = 10_000  # k-subsets of one problem enumerated; more are estimated from this many random ones
UNKNOWN_SCORE = -1e9  # log p per token of a sample that has none (nothing generated: it has no answer either)


@dataclass(frozen=True)
class Ballots:
    """The samples of one problem, in draw order, as the vote sees them."""

    groups: tuple[int | None, ...]  # each sample's group (None: abstains); groups are numbered as formed
    right: tuple[bool, ...]  # per group: whether its first answer was graded correct
    scores: tuple[float, ...]  # each sample's log p per token
    correct: tuple[bool, ...]  # each sample's own verdict (what pass@k counts)

    def __len__(self) -> int:
        return len(self.groups)


def group_answers(answers: Sequence[str | None], same: Callable[[str, str], bool]) -> list[int | None]:
    """Each answer's group: the first group whose first answer it is `same` as, else a new one; None for no
    answer. An answer string met before goes where it went then (no second comparison)."""
    firsts: list[str] = []
    seen: dict[str, int] = {}
    out: list[int | None] = []
    for answer in answers:
        if answer is None:
            out.append(None)
            continue
        if answer not in seen:
            seen[answer] = next((g for g, first in enumerate(firsts) if same(first, answer)), len(firsts))
            if seen[answer] == len(firsts):
                firsts.append(answer)
        out.append(seen[answer])
    return out


def ballots(
    answers: Sequence[str | None],
    correct: Sequence[bool | None],
    scores: Sequence[float | None],
    same: Callable[[str, str], bool],
) -> Ballots:
    """The Ballots of one problem's samples (answers, verdicts and log p per token, in draw order)."""
    groups = group_answers(answers, same)
    count = 1 + max((g for g in groups if g is not None), default=-1)
    first = [groups.index(g) for g in range(count)]
    return Ballots(
        tuple(groups),
        tuple(bool(correct[i]) for i in first),
        tuple(UNKNOWN_SCORE if s is None else float(s) for s in scores),
        tuple(bool(c) for c in correct),
    )


def winners(b: Ballots, subsets: np.ndarray) -> np.ndarray:
    """The winning group of each subset (rows of sample indices, (m, k)); -1 where every sample abstained."""
    count, m = len(b.right), len(subsets)
    group = np.array([count if g is None else g for g in b.groups])  # (n,) the abstaining get group G
    scores = np.asarray(b.scores)  # (n,)
    votes = np.zeros((m, count + 1))  # (m, G + 1)
    sums = np.zeros((m, count + 1))  # (m, G + 1) summed log p per token of each group's voters
    first = np.full((m, count + 1), np.inf)  # (m, G + 1) each group's first sample in the subset
    rows = np.arange(m)
    for column in subsets.T:  # k columns, so memory stays (m, G)
        np.add.at(votes, (rows, group[column]), 1.0)
        np.add.at(sums, (rows, group[column]), scores[column])
        np.minimum.at(first, (rows, group[column]), column.astype(float))
    votes, sums, first = votes[:, :count], sums[:, :count], first[:, :count]
    top = votes.max(axis=1, initial=0.0)  # (m,)
    tied = (votes == top[:, None]) & (votes > 0)
    mean = np.where(tied, sums / np.maximum(votes, 1.0), -np.inf)  # the tie-break: mean log p per token
    best = tied & (mean == mean.max(axis=1, initial=-np.inf)[:, None])
    won = np.argmin(np.where(best, first, np.inf), axis=1) if count else np.zeros(m, dtype=int)  # then: given first
    return np.where(top > 0, won, -1)


def vote(b: Ballots) -> int:
    """The winning group of all the samples (-1: every one abstained)."""
    return int(winners(b, np.arange(len(b))[None, :])[0])


def tie_broken(b: Ballots) -> bool:
    """Whether the vote of all the samples was decided by the tie-break (two groups or more with the most votes)."""
    counts = np.bincount([g for g in b.groups if g is not None], minlength=len(b.right))
    return bool(counts.size) and int(np.sum(counts == counts.max())) > 1


def maj_at_k(b: Ballots, k: int, key: str = "") -> float:
    """The probability that the vote of a random k-subset of the samples is correct (see the module docstring);
    `key` (the problem id) seeds the random subsets when there are too many to enumerate."""
    if not 1 <= k <= len(b):
        raise ValueError(f"need 1 <= k <= n, got n={len(b)}, k={k}")
    won = winners(b, k_subsets(len(b), k, key))
    right = np.asarray((*b.right, False))  # index -1: no vote, wrong
    return float(np.mean(right[won]))


def k_subsets(n: int, k: int, key: str = "") -> np.ndarray:
    """(m, k) sample indices: every k-subset of n when there are at most MAX_SUBSETS, else MAX_SUBSETS uniformly
    random ones from a generator seeded by (key, n, k)."""
    if math.comb(n, k) <= MAX_SUBSETS:
        return np.array(list(combinations(range(n), k)), dtype=np.int64).reshape(-1, k)
    rng = np.random.default_rng([zlib.crc32(key.encode()), n, k])
    return np.argsort(rng.random((MAX_SUBSETS, n)), axis=1)[:, :k]
