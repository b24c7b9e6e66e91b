"""Running an evaluation: sample every (problem, seed) pair not yet done, grade it, append its record.

The record of each pair is exactly what `powersample sample --seed s` gives for that prompt, whatever was run
before or beside it: each chain draws from its own generator. So pairs are independent: a killed run resumes where
it stopped, and shards or extra seeds can be added later. `batch` pairs are sampled together (`api.sample_many`):
all their chains advance through the same engine calls, which is what keeps a GPU engine busy; a killed run loses
at most the batch in flight.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

from powersample.api import SampleRecord, chat_prompts, sample_many
from powersample.backends import Backend
from powersample.backends.base import has_chat_template
from powersample.config import SamplerConfig
from powersample.errors import PowerSampleError
from powersample.eval import metrics
from powersample.eval.records import (
    SCHEMA,
    check_record,
    discard_opened,
    graded_fields,
    load_records,
    open_run,
    record_key,
    records_path,
)
from powersample.eval.tasks import GradeOptions, Problem, Task, problems_digest
from powersample.io import progress_bar
from powersample.samplers import registry


@dataclass(frozen=True)
class Match:
    """A run whose per-pair token costs budget this one (eval.budget_match: --bon-match, --vote-match)."""

    kind: str  # "bon" or "vote": the option --<kind>-match, and the identity key <kind>_match
    run: str  # the identity hash of the matched run
    budgets: Mapping[tuple[str, int], int]  # tokens per (problem id, seed)


@dataclass(frozen=True)
class EvalPlan:
    """Everything that decides the records of a run, and which of them this process makes."""

    task: Task
    problems: tuple[Problem, ...]  # this process's problems (after --limit and --shard)
    data_digest: str  # hash of the task's whole data set (see tasks.problems_digest)
    seeds: tuple[int, ...]
    config: SamplerConfig
    chat: bool  # prompts through the chat template (False once run on a model without one: run_eval)
    backend: dict[str, Any]  # how the backend was asked for: name, model, toy spec digest, device, dtype
    grading: GradeOptions = GradeOptions()
    shard: tuple[int, int] | None = None  # (index, count)
    match: Match | None = None  # --bon-match or --vote-match: each pair's token budget, from another run

    def identity(self) -> dict[str, Any]:
        """What must match for records to belong in one run (seeds, limit and shard choose among them)."""
        return {
            "schema": SCHEMA,
            "task": self.task.name,
            "data": self.data_digest,
            "chat": self.chat,
            "config": registry.resolved(self.config),
            "backend": self.backend,
            "grading": asdict(self.grading),
            **({f"{self.match.kind}_match": self.match.run} if self.match is not None else {}),
        }

    def unit_config(self, problem: Problem, seed: int) -> SamplerConfig:
        """The config one (problem, seed) is sampled with: the plan's, with its own budget under --bon-match."""
        if self.match is None or self.match.kind != "bon":
            return self.config
        return replace(self.config, bon_tokens=self.match.budgets[(problem.id, seed)])

    @property
    def generator(self) -> str:
        """A name for the outputs: method and model."""
        model = self.backend.get("model") or ("toy" if self.backend.get("name") == "toy" else "SmolLM2-135M-Instruct")
        return f"powersample-{self.config.method}-{Path(str(model)).name}"


@dataclass(frozen=True)
class EvalSummary:
    """How a run ended: the selected pairs' records (resumed ones included)."""

    records: int  # records of the selected pairs now on disk
    resumed: int  # of which were there before this run
    correct: int
    graded: int  # records with a verdict (AlpacaEval has none)
    run_dir: Path


def make_plan(
    task: Task,
    problems: list[Problem],
    *,
    seeds: tuple[int, ...],
    config: SamplerConfig,
    chat: bool,
    backend: dict[str, Any],
    grading: GradeOptions = GradeOptions(),
    limit: int | None = None,
    shard: tuple[int, int] | None = None,
) -> EvalPlan:
    """A plan over `problems` (the task's whole data set, which the identity hashes), selecting with limit and shard."""
    return EvalPlan(
        task=task,
        problems=tuple(select(problems, limit, shard)),
        data_digest=problems_digest(problems),
        seeds=seeds,
        config=config,
        chat=chat,
        backend=backend,
        grading=grading,
        shard=shard,
    )


def select(problems: list[Problem], limit: int | None, shard: tuple[int, int] | None) -> list[Problem]:
    """The first `limit` problems, then every n-th from index i for shard (i, n)."""
    chosen = problems[:limit] if limit is not None else problems
    return chosen[shard[0] :: shard[1]] if shard is not None else chosen


Unit = tuple[Problem, int]  # one (problem, seed): the unit of work, of records and of resuming
MakeRecords = Callable[[list[Unit]], Iterable[dict[str, Any]]]  # units to do -> their records, in any order


def run_eval(
    backend: Backend,
    plan: EvalPlan,
    run_dir: Path,
    quiet: bool = False,
    batch: int = 1,
    max_memory: int | None = None,
) -> EvalSummary:
    """Make every missing record of the plan in run_dir, `batch` pairs sampled together (their chains within
    `max_memory` bytes of KV cache at once: api.sample_many), appending each record as soon as it is graded."""
    if batch < 1:
        raise PowerSampleError(f"batch must be >= 1, got {batch}")
    plan = replace(plan, chat=chat_prompts(backend, plan.chat))  # chat: false for a model without a template
    return run_plan(plan, run_dir, lambda todo: evaluate_batches(backend, plan, todo, batch, max_memory), quiet)


def evaluate_batches(
    backend: Backend, plan: EvalPlan, todo: list[Unit], batch: int, max_memory: int | None = None
) -> Iterator[dict[str, Any]]:
    """The records of `todo`, sampled `batch` units at a time. Records of one batch share a `batch_id` (unique
    across processes and resumes): their wall_seconds all count from the batch's start, so the batch took the
    largest of them (what the report sums). A model without a chat template gets plain prompts, and records that say
    so (run_eval, and a Ray driver, have said so once already). Under --vote-match a unit's record is a vote
    (vote_match.vote_batches)."""
    plan = replace(plan, chat=plan.chat and has_chat_template(backend))
    if plan.match is not None and plan.match.kind == "vote":
        from powersample.eval.vote_match import vote_batches

        yield from vote_batches(backend, plan, todo, batch)
        return
    for first in range(0, len(todo), batch):
        units = todo[first : first + batch]
        sampled = sample_many(
            backend,
            [(p.prompt, s) for p, s in units],
            plan.config,
            chat=plan.chat,
            configs=[plan.unit_config(p, s) for p, s in units],
            max_memory=max_memory,
        )
        batch_id = uuid.uuid4().hex[:16]
        for (problem, _), outcome in zip(units, sampled):
            if isinstance(outcome, PowerSampleError):
                raise PowerSampleError(f"{plan.task.name} problem {problem.id}: {outcome}") from None
            yield {**grade_record(backend, plan, problem, outcome[0]), "batch_id": batch_id}


def run_plan(plan: EvalPlan, run_dir: Path, make_records: MakeRecords, quiet: bool = False) -> EvalSummary:
    """Open run_dir, find the plan's units not done yet, and append the records `make_records` yields for them.

    `make_records` is this process's loop (`run_eval`) or a pool of workers (`distributed.py`); either way only
    this function writes. A record for a unit that is done already, or not in the plan, is dropped, so a unit is
    written once even when a worker that died had finished it. A run that fails before its first record takes back
    what opening it created (records.discard_opened): no run directory is left that holds nothing.
    """
    meta = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "generator": plan.generator}
    wanted = {(p.id, s) for p in plan.problems for s in plan.seeds}
    # The lock first: what is done is read while no one else can add to it, so two runs never both do a unit.
    writer, opened = open_run(run_dir, plan.identity(), meta, records_path(run_dir, plan.shard))
    with writer:
        done = {record_key(r): r for r in load_records(run_dir) if record_key(r) in wanted}
        resumed = len(done)
        todo = [(p, s) for p in plan.problems for s in plan.seeds if (p.id, s) not in done]
        tally = _Tally.of(done.values())
        try:
            with _bar(plan, len(wanted), resumed, tally, quiet) as update:
                for record in make_records(todo):
                    key = record_key(record)
                    if key in done or key not in wanted:
                        continue
                    writer.write(record)
                    done[key] = record
                    tally.add(record)
                    update(tally)
        except BaseException:
            if len(done) == resumed:  # not one record written
                discard_opened(run_dir, writer.path, opened)
            raise
    if plan.task.export is not None:
        plan.task.export(run_dir, list(plan.problems), load_records(run_dir), plan.generator)
    return EvalSummary(len(wanted), resumed, tally.correct, tally.graded, run_dir)


def grade_record(backend: Backend, plan: EvalPlan, problem: Problem, sampled: SampleRecord) -> dict[str, Any]:
    """Grade one sample and build its record."""
    start = time.perf_counter()
    grade = plan.task.grade(problem, sampled.text, plan.grading)
    graded_in = time.perf_counter() - start
    record = sampled.to_dict()
    record["completion"] = record.pop("text")
    record.update(
        **graded_fields(plan, problem, grade, graded_in),
        logp_per_token=metrics.per_token(sampled.logp, len(sampled.tokens)),
        confidence=metrics.confidence(backend, problem.prompt, plan.chat, sampled),
    )
    check_record(record, f"problem {problem.id!r}")  # what the report will read back
    return record


@dataclass
class _Tally:
    """Running accuracy for the progress bar."""

    correct: int = 0
    graded: int = 0

    @classmethod
    def of(cls, records: Any) -> _Tally:
        tally = cls()
        for r in records:
            tally.add(r)
        return tally

    def add(self, record: dict[str, Any]) -> None:
        if record.get("correct") is not None:
            self.graded += 1
            self.correct += bool(record["correct"])

    def text(self) -> str:
        return f"acc={self.correct}/{self.graded}={self.correct / self.graded:.3f}" if self.graded else ""


@contextlib.contextmanager
def _bar(plan: EvalPlan, total: int, done: int, tally: _Tally, quiet: bool) -> Iterator[Any]:
    """A progress bar over (problem, seed) pairs, with ETA and the running accuracy; yields its update function."""
    desc = f"{plan.task.name} {plan.config.method}"
    with progress_bar(total, desc, "sample", initial=done, quiet=quiet) as bar:
        if bar is None:
            yield lambda tally: None
            return
        bar.set_postfix_str(tally.text())

        def update(tally: _Tally) -> None:
            bar.set_postfix_str(tally.text(), refresh=False)
            bar.update(1)

        yield update
