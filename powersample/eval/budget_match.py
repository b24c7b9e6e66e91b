"""Matching another run's token budget, pair by pair: `eval --bon-match RUN_DIR` and `eval --vote-match RUN_DIR`.

Each (problem, seed) gets as budget the tokens that same pair cost in RUN_DIR, a finished run of another method on
the same task, data and prompt format (its record's tokens_generated, rejected proposals included). Every pair of
this run must have a record there: a missing one is an error before any model loads, not a skip, so that a matched
run never silently covers fewer pairs than it claims. The match run's identity hash joins this run's identity (as
`bon_match` or `vote_match`), so resuming against another match run is refused. What spends the budget:

    bon    --method bon: bon_tokens per pair (one best-of-N sample, samplers/bon.py)
    vote   --method base or low-temp: samples drawn until their tokens reach the budget, then a majority vote
           (eval/vote_match.py)
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from powersample.errors import PowerSampleError
from powersample.eval.records import identity_hash, load_records, read_run, record_key
from powersample.eval.runner import EvalPlan, Match
from powersample.eval.vote_match import MAX_VOTE_SEED, VOTE_METHODS

MATCHED = ("task", "data", "chat")  # identity fields the match run must share: the same prompts
KINDS = ("bon", "vote")


def match_plan(plan: EvalPlan, run_dir: Path, kind: str) -> EvalPlan:
    """The plan with each of its (problem, seed) budgets read from run_dir's records (one-line errors otherwise)."""
    option = f"--{kind}-match"
    check_method(plan, kind, option)
    try:
        identity = read_run(run_dir)["identity"]
    except PowerSampleError as e:
        raise PowerSampleError(f"{option}: {e}") from None
    check_same_prompts(run_dir, identity, plan.identity(), option)
    units = [(p.id, s) for p in plan.problems for s in plan.seeds]
    budgets = read_budgets(run_dir, units, option)
    return replace(plan, match=Match(kind, identity_hash(identity), budgets))


def check_method(plan: EvalPlan, kind: str, option: str) -> None:
    """What spends the budget must fit the kind: bon with its budget left to the match, or a plain method whose
    task has a vote rule."""
    method = plan.config.method
    if kind == "bon":
        if method != "bon":
            raise PowerSampleError(f"{option} needs --method bon, not {method}")
        if plan.config.bon_tokens:
            raise PowerSampleError(f"{option} sets each pair's budget; leave --bon-tokens at 0")
        return
    if method not in VOTE_METHODS:
        raise PowerSampleError(f"{option} draws with --method {' or '.join(VOTE_METHODS)}, not {method}")
    if plan.task.vote is None:
        raise PowerSampleError(f"{option}: {plan.task.name} has no majority vote ({plan.task.no_vote})")
    if max(plan.seeds) >= MAX_VOTE_SEED:
        raise PowerSampleError(f"{option} needs seeds below {MAX_VOTE_SEED}")


def read_budgets(run_dir: Path, units: list[tuple[str, int]], option: str) -> dict[tuple[str, int], int]:
    """tokens_generated of each unit's record in run_dir; a one-line error when one is missing or not >= 1."""
    costs: dict[tuple[str, int], Any] = {record_key(r): r.get("tokens_generated") for r in load_records(run_dir)}
    missing = [u for u in units if u not in costs]
    if missing:
        raise PowerSampleError(
            f"{option} {run_dir} has no record for {len(missing)} of the {len(units)} "
            f"(problem, seed) pairs (first: problem {missing[0][0]!r} seed {missing[0][1]}); "
            f"finish them there, or choose --seeds and --limit within it"
        )
    bad = [u for u in units if type(costs[u]) is not int or costs[u] < 1]
    if bad:
        raise PowerSampleError(
            f"{option} {run_dir}: the record of problem {bad[0][0]!r} seed {bad[0][1]} has no tokens_generated >= 1"
        )
    return {u: costs[u] for u in units}


def check_same_prompts(run_dir: Path, have: dict[str, Any], want: dict[str, Any], option: str) -> None:
    """The match run must be of this task, data set and prompt format: otherwise its costs are another prompt's. A
    match run that says chat: false serves chat prompts too: its model had no chat template, which only the loaded
    model tells of this run's (run_eval then records chat: false here too)."""
    for key in MATCHED:
        if have.get(key) != want[key] and not (key == "chat" and want[key] and have.get(key) is False):
            raise PowerSampleError(
                f"{option} {run_dir} is a run with another {key} ({have.get(key)!r} there, {want[key]!r} here)"
            )
