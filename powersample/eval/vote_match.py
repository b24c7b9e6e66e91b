"""`eval --vote-match RUN_DIR`: a majority vote at the token cost of another run, pair by pair.

For each (problem, seed), samples are drawn with this run's method (base, or low-temp) until their tokens reach the
pair's budget (its record's tokens_generated in RUN_DIR, budget_match.py); the sample that crosses the budget is
kept, so there is at least one. Sample j of seed s is what `powersample sample --seed s + j * 2^32` draws (j = 0:
what `--seed s` draws), so a record does not depend on the batch or on what ran beside it. Every sample is graded,
and the task's vote rule groups their answers (eval.voting); the record's answer and verdict are the vote's.

The record has the shape of any other: its sample fields (tokens, completion, log p, finish reason, confidence) are
those of the winning group's first sample (of the first sample when all abstained), proposals = samples drawn,
accepted = 0 and tokens_generated = the tokens of all samples. Its `vote` keeps the budget, the winner's votes, the
number of groups, whether the tie-break decided, and every sample's answer, verdict, tokens and log p per token
(records.VOTE_FIELDS).

Rounds. Each round draws, for every pair of the batch still short of its budget, ceil(remaining / T) samples (at
most MAX_ROUND): a sample holds at most T tokens, so all of them are needed before the budget can be crossed, and no
sample is drawn in vain (bon's rule, samplers/bon.py). All samples of a round share the engine's calls.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterator

from powersample.api import SampleRecord, sample_many
from powersample.backends import Backend
from powersample.errors import PowerSampleError
from powersample.eval import metrics, voting
from powersample.eval.records import check_record, graded_fields
from powersample.eval.tasks import Grade, Problem

MAX_ROUND = 64  # most samples one pair draws in one round (the engine's batch holds a round's rows at once)
VOTE_METHODS = ("base", "low-temp")  # what a vote draws its samples with
MAX_VOTE_SEED = 2**32  # sample j of seed s is drawn with seed s + j * MAX_VOTE_SEED, so seeds must be below it
Unit = tuple[Problem, int]  # runner.Unit; plans are runner.EvalPlan (not imported: the runner imports this module)


def sample_seed(seed: int, j: int) -> int:
    """The seed sample j of a pair's seed is drawn with: seed itself for the first."""
    return seed + j * MAX_VOTE_SEED


@dataclass
class Drawn:
    """A pair's samples so far."""

    budget: int
    samples: list[SampleRecord] = field(default_factory=list)
    wall: float = 0.0  # seconds from the batch's start to the end of the round that crossed the budget

    @property
    def remaining(self) -> int:
        return self.budget - sum(s.tokens_generated for s in self.samples)


def vote_batches(backend: Backend, plan: Any, todo: list[Unit], batch: int) -> Iterator[dict[str, Any]]:
    """The vote records of `todo`, `batch` pairs drawn together (their records share a batch_id)."""
    assert plan.match is not None
    for first in range(0, len(todo), batch):
        units = todo[first : first + batch]
        drawn = draw(backend, plan, units)
        batch_id = uuid.uuid4().hex[:16]
        for (problem, seed), pair in zip(units, drawn):
            yield {**vote_record(backend, plan, (problem, seed), pair), "batch_id": batch_id}


def draw(backend: Backend, plan: Any, units: list[Unit]) -> list[Drawn]:
    """Every pair's samples, in rounds, until its tokens reach its budget."""
    assert plan.match is not None
    drawn = [Drawn(plan.match.budgets[(p.id, s)]) for p, s in units]
    start, t = time.perf_counter(), plan.config.max_new_tokens
    while any(d.remaining > 0 for d in drawn):
        jobs, owners = [], []
        for (problem, seed), d in zip(units, drawn):
            if d.remaining > 0:
                k = min(MAX_ROUND, -(-d.remaining // t))
                jobs += [(problem.prompt, sample_seed(seed, len(d.samples) + j)) for j in range(k)]
                owners += [(problem, d)] * k
        outcomes = sample_many(backend, jobs, plan.config, chat=plan.chat)
        for (problem, d), outcome in zip(owners, outcomes):
            if isinstance(outcome, PowerSampleError):
                raise PowerSampleError(f"{plan.task.name} problem {problem.id}: {outcome}") from None
            d.samples.append(outcome[0])
            d.wall = time.perf_counter() - start
    return drawn


def vote_record(backend: Backend, plan: Any, unit: Unit, pair: Drawn) -> dict[str, Any]:
    """Grade every sample, vote, and build the pair's record."""
    problem, seed = unit
    start = time.perf_counter()
    grades = [plan.task.grade(problem, s.text, plan.grading) for s in pair.samples]
    rule = plan.task.vote
    assert rule is not None
    scores = [metrics.per_token(s.logp, len(s.tokens)) for s in pair.samples]
    b = voting.ballots(
        [g.answer for g in grades], [g.correct for g in grades], scores, lambda x, y: rule.same(x, y, plan.grading)
    )
    won = voting.vote(b)
    shown = b.groups.index(won) if won >= 0 else 0  # the sample the record shows
    chosen, grade = pair.samples[shown], grades[shown] if won >= 0 else Grade(None, False, "no sample had an answer")
    record = chosen.to_dict()
    record["completion"] = record.pop("text")
    record.update(
        seed=seed,
        sample_index=0,
        wall_seconds=pair.wall,
        tokens_generated=sum(s.tokens_generated for s in pair.samples),
        proposals=len(pair.samples),
        accepted=0,
        **graded_fields(plan, problem, grade, time.perf_counter() - start),
        logp_per_token=scores[shown],
        confidence=metrics.confidence(backend, problem.prompt, plan.chat, chosen),
        vote={**vote_summary(pair, grades, scores, b, won), "shown": shown},
    )
    check_record(record, f"problem {problem.id!r}")
    return record


def vote_summary(
    pair: Drawn, grades: list[Grade], scores: list[float | None], b: voting.Ballots, won: int
) -> dict[str, Any]:
    """The record's `vote` (records.VOTE_FIELDS)."""
    samples = [
        {
            "answer": g.answer,
            "correct": g.correct,
            "tokens": list(s.tokens),
            "logp_per_token": score,
            "finish_reason": s.finish_reason,
        }
        for s, g, score in zip(pair.samples, grades, scores)
    ]
    votes = sum(g == won for g in b.groups) if won >= 0 else 0
    return {
        "budget": pair.budget,
        "votes": votes,
        "groups": len(b.right),
        "tie_break": voting.tie_broken(b),
        "samples": samples,
    }
