"""`eval --method bon --bon-match RUN_DIR`: compute-matched best-of-N, pair by pair.

Each (problem, seed) gets as budget (bon_tokens) the tokens that same pair cost in RUN_DIR, a finished run of
another method on the same task, data and prompt format (its record's tokens_generated, rejected proposals
included). Every pair of this run must have a record there: a missing one is an error before any model loads, not a
skip, so that a matched run never silently covers fewer pairs than it claims. The match run's identity hash joins
this run's identity, so resuming against another match run is refused.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from powersample.errors import PowerSampleError
from powersample.eval.records import identity_hash, load_records, read_run, record_key
from powersample.eval.runner import EvalPlan

MATCHED = ("task", "data", "chat")  # identity fields the match run must share: the same prompts


def match_plan(plan: EvalPlan, run_dir: Path) -> EvalPlan:
    """The plan with each of its (problem, seed) budgets read from run_dir's records (one-line errors otherwise)."""
    if plan.config.method != "bon":
        raise PowerSampleError(f"--bon-match needs --method bon, not {plan.config.method}")
    if plan.config.bon_tokens:
        raise PowerSampleError("--bon-match sets each pair's budget; leave --bon-tokens at 0")
    identity = read_run(run_dir)["identity"]
    check_same_prompts(run_dir, identity, plan.identity())
    costs = {record_key(r): r.get("tokens_generated") for r in load_records(run_dir)}
    units = [(p.id, s) for p in plan.problems for s in plan.seeds]
    missing = [u for u in units if u not in costs]
    if missing:
        raise PowerSampleError(
            f"--bon-match {run_dir} has no record for {len(missing)} of the {len(units)} "
            f"(problem, seed) pairs (first: problem {missing[0][0]!r} seed {missing[0][1]}); "
            f"finish them there, or choose --seeds and --limit within it"
        )
    bad = [u for u in units if type(costs[u]) is not int or costs[u] < 1]
    if bad:
        raise PowerSampleError(
            f"--bon-match {run_dir}: the record of problem {bad[0][0]!r} seed {bad[0][1]} has no tokens_generated >= 1"
        )
    return replace(plan, bon_match=identity_hash(identity), budgets={u: costs[u] for u in units})


def check_same_prompts(run_dir: Path, have: dict[str, Any], want: dict[str, Any]) -> None:
    """The match run must be of this task, data set and prompt format: otherwise its costs are another prompt's. A
    match run that says chat: false serves chat prompts too: its model had no chat template, which only the loaded
    model tells of this run's (run_eval then records chat: false here too)."""
    for key in MATCHED:
        if have.get(key) != want[key] and not (key == "chat" and want[key] and have.get(key) is False):
            raise PowerSampleError(
                f"--bon-match {run_dir} is a run with another {key} ({have.get(key)!r} there, {want[key]!r} here)"
            )
