"""`powersample eval` and `powersample report`. Functions here only parse arguments and dispatch.

`add_eval_parsers(subparsers)` registers both subcommands on the main parser (`powersample.cli`).
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path
from typing import Any

from powersample.cli.options import (
    add_backend_options,
    add_memory_option,
    add_sampler_options,
    backend_spec,
    check_members,
    config_from_args,
    load,
    plan_memory,
)
from powersample.errors import PowerSampleError
from powersample.eval.tasks import TASK_NAMES, GradeOptions

MAX_SEEDS = 100_000  # a typo like 0-99999999 should fail fast, not allocate


def add_eval_parsers(subparsers: Any) -> None:
    """Register `eval` and `report` on an argparse subparsers object."""
    e = subparsers.add_parser(
        "eval",
        help="evaluate a sampler on a task",
        description="Evaluate a sampler on a task: one JSONL record per (problem, seed), resumable.",
    )
    e.add_argument("--task", required=True, help=f"one of {', '.join(TASK_NAMES)}")
    e.add_argument("--data", help="data file (MATH500: JSON/JSONL; GPQA: CSV; AlpacaEval: JSON; HumanEval: JSONL)")
    e.add_argument("--seeds", default="0", help="seeds to run: 0-7, 0,2,5 or 3 (default 0)")
    e.add_argument("--limit", help="only the first N problems")
    e.add_argument("--shard", help="I/N: only shard I (0-based) of N, every N-th problem from the I-th")
    e.add_argument("--output-dir", help="run directory (default runs/<task>-<method>-<config hash>)")
    e.add_argument("--raw", action="store_true", help="no chat template: the prompt format for base models")
    e.add_argument(
        "--batch",
        type=int,
        default=8,
        help="(problem, seed) pairs sampled together, their chains "
        "sharing every engine call (default %(default)s; records do not depend on it)",
    )
    e.add_argument(
        "--bon-match",
        metavar="RUN_DIR",
        help="--method bon: each (problem, seed)'s token budget is "
        "its tokens_generated in RUN_DIR, a run of the same task and data (e.g. a power run)",
    )
    e.add_argument(
        "--vote-match",
        metavar="RUN_DIR",
        help="--method base or low-temp: for each (problem, seed), draw samples until their tokens reach its "
        "tokens_generated in RUN_DIR (a run of the same task and data), then take a majority vote (math500, gpqa)",
    )
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    g = e.add_argument_group("grading")
    g.add_argument("--code-timeout", type=float, default=GradeOptions.code_timeout, help="seconds per program")
    g.add_argument("--code-memory-mb", type=int, default=GradeOptions.code_memory_mb, help="address space (MB)")
    g.add_argument("--math-timeout", type=float, default=GradeOptions.math_timeout, help="seconds per answer")
    add_ray_options(e)
    add_sampler_options(e)
    add_backend_options(e)
    add_memory_option(e)
    e.set_defaults(handler=cmd_eval)
    r = subparsers.add_parser(
        "report",
        help="tabulate and plot eval runs",
        description="Markdown table and plots of one or more eval run directories, or of a chain trace.",
    )
    r.add_argument("run_dirs", nargs="*", help="run directories written by `powersample eval`")
    r.add_argument("--plot-dir", default="report", help="where PNG plots and report.md go (default ./report)")
    r.add_argument("--no-plots", action="store_true", help="print the table only")
    r.add_argument(
        "--trace",
        metavar="FILE",
        help="a chain trace (`powersample sample --trace`): its summary, and "
        "trace_chain<N>.png/.html/.md in --plot-dir",
    )
    r.add_argument("--chain", type=int, metavar="N", help="the trace's chain to show (default: its first)")
    r.set_defaults(handler=cmd_report)


def add_ray_options(e: argparse.ArgumentParser) -> None:
    g = e.add_argument_group("Ray (data-parallel; pip install 'powersample[ray]')")
    g.add_argument(
        "--ray",
        nargs="?",
        const="",
        metavar="ADDRESS",
        help="spread the (problem, seed) units over Ray actors: no ADDRESS = start a local Ray (or join "
        "$RAY_ADDRESS), auto = the cluster running here, else HOST:PORT or ray://HOST:PORT; an "
        "address that does not answer within 10 s is refused",
    )  # distributed.CONNECT_TIMEOUT
    g.add_argument(
        "--workers", metavar="N", help="Ray actors, one backend each (default: one per GPU, else one per CPU)"
    )
    g.add_argument(
        "--gpus-per-worker",
        metavar="G",
        help="GPUs per actor (default 1 when the cluster has GPUs, 0 for the toy and llamacpp engines)",
    )
    g.add_argument("--cpus-per-worker", metavar="C", help="CPUs per actor (default 1)")
    g.add_argument(
        "--ray-temp-dir", metavar="DIR", help="Ray's temp and log directory when starting a local Ray (default Ray's)"
    )


def cmd_eval(args: argparse.Namespace) -> int:
    """Validate everything, load the data, check the run directory, then load the model and run."""
    from powersample.eval.runner import make_plan, run_eval
    from powersample.eval.tasks import get_task

    config, spec = config_from_args(args), backend_spec(args)
    if args.batch < 1:
        raise PowerSampleError(f"--batch must be >= 1, got {args.batch}")
    ray_options = parse_ray_options(args)
    seeds, shard, limit = parse_seeds(args.seeds), parse_shard(args.shard), parse_limit(args.limit)
    grading = _grade_options(args)
    check_paths(args)
    task = get_task(args.task)
    problems = task.load(args.data, not args.raw)
    plan = make_plan(
        task,
        problems,
        seeds=seeds,
        config=config,
        chat=not args.raw,
        backend=spec.identity(),
        grading=grading,
        shard=shard,
        limit=limit,
    )
    plan = _matched(plan, args)
    check_members(config, min(args.batch, len(plan.problems) * len(seeds)), "--batch")  # pairs sampled at once
    run_dir = Path(args.output_dir) if args.output_dir else default_run_dir(plan)
    precheck_run_dir(run_dir, plan.identity(), shard)
    if not args.quiet:
        print(f"powersample: {len(plan.problems)} problems x {len(seeds)} seeds -> {run_dir}", file=sys.stderr)
    if ray_options is None:  # resolved once, for the plan and the load (`auto`'s probe speaks once); Ray's workers
        spec = spec.resolved()  # resolve `auto` on their own machines
    budget = plan_memory(args, spec, config)  # one chain that cannot fit is refused before the model loads
    if ray_options is None:
        summary = run_eval(load(spec, args.quiet), plan, run_dir, args.quiet, batch=args.batch, max_memory=budget)
    else:
        from powersample.eval.distributed import run_eval_ray

        summary = run_eval_ray(spec.portable(), plan, run_dir, ray_options, args.quiet, batch=args.batch)
    accuracy = f"accuracy {summary.correct}/{summary.graded}" if summary.graded else "not graded here"
    print(
        f"{task.name} {config.method}: {summary.records} records ({summary.resumed} resumed), {accuracy}; "
        f"run directory {run_dir}"
    )
    return 0


def _matched(plan: Any, args: argparse.Namespace) -> Any:
    """The plan with its per-pair budgets under --bon-match or --vote-match (at most one of them)."""
    from powersample.eval.budget_match import match_plan

    given = [(kind, run) for kind, run in (("bon", args.bon_match), ("vote", args.vote_match)) if run is not None]
    if len(given) > 1:
        raise PowerSampleError("--bon-match and --vote-match exclude each other")
    return match_plan(plan, Path(given[0][1]), given[0][0]) if given else plan


def cmd_report(args: argparse.Namespace) -> int:
    """eval's report over the directories, with `bench --fidelity` results as sections of it; and a trace's."""
    from powersample.eval.report import build_report
    from powersample.eval.trace_report import trace_report
    from powersample.tools.fidelity.report import SECTION as FIDELITY

    if not args.run_dirs and args.trace is None:
        raise PowerSampleError("report needs run directories, or a chain trace (--trace FILE)")
    if args.chain is not None and args.trace is None:
        raise PowerSampleError("--chain needs --trace")
    dirs, plot_dir = [Path(d) for d in args.run_dirs], None if args.no_plots else Path(args.plot_dir)
    shown, plots = build_report(dirs, plot_dir, sections=(FIDELITY,)) if dirs else ("", [])
    if args.trace is not None:
        summary, written = trace_report(Path(args.trace), args.chain, plot_dir)
        shown, plots = "\n\n".join(filter(None, (shown, summary))), plots + written
    print(shown)
    for path in plots:
        print(f"powersample: wrote {path}", file=sys.stderr)
    return 0


def parse_seeds(spec: str) -> tuple[int, ...]:
    """'0-7' -> 0..7, '0,2,5' -> (0, 2, 5), '3' -> (3,); parts may mix ('0-3,8'). Sorted, no duplicates."""
    seeds: set[int] = set()
    for part in str(spec).split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m or (m.group(2) is not None and int(m.group(2)) < int(m.group(1))):
            raise PowerSampleError(f"bad --seeds {spec!r}: use a seed (3), a range (0-7) or a list (0,2,5)")
        low, high = int(m.group(1)), int(m.group(2) or m.group(1))
        if high - low + len(seeds) >= MAX_SEEDS:
            raise PowerSampleError(f"bad --seeds {spec!r}: more than {MAX_SEEDS} seeds")
        seeds.update(range(low, high + 1))
    return tuple(sorted(seeds))


def parse_shard(spec: str | None) -> tuple[int, int] | None:
    """'I/N' -> (I, N) with 0 <= I < N; None when not sharding."""
    if spec is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", spec)
    if not m or int(m.group(2)) < 1 or int(m.group(1)) >= int(m.group(2)):
        raise PowerSampleError(f"bad --shard {spec!r}: use I/N with N >= 1 and 0 <= I < N (e.g. 0/4)")
    return int(m.group(1)), int(m.group(2))


def parse_limit(spec: str | None) -> int | None:
    if spec is None:
        return None
    if not re.fullmatch(r"\s*\d+\s*", spec) or int(spec) < 1:
        raise PowerSampleError(f"bad --limit {spec!r}: must be an integer >= 1")
    return int(spec)


def parse_ray_options(args: argparse.Namespace) -> Any:
    """A `distributed.RayOptions` for --ray (checking that Ray imports), None without it."""
    ray_only = {
        "--workers": args.workers,
        "--gpus-per-worker": args.gpus_per_worker,
        "--cpus-per-worker": args.cpus_per_worker,
        "--ray-temp-dir": args.ray_temp_dir,
    }
    if args.ray is None:
        given = [name for name, value in ray_only.items() if value is not None]
        if given:
            raise PowerSampleError(f"{given[0]} needs --ray")
        return None
    from powersample.eval.distributed import RayOptions, require_ray

    workers = None if args.workers is None else _number("--workers", args.workers, integer=True, low=1)
    gpus = None if args.gpus_per_worker is None else _number("--gpus-per-worker", args.gpus_per_worker, low=0)
    cpus = 1.0 if args.cpus_per_worker is None else _number("--cpus-per-worker", args.cpus_per_worker, low=0)
    require_ray()
    address = args.ray.strip() or None
    return RayOptions(address, workers, gpus, cpus, args.ray_temp_dir)


def _number(option: str, text: str, *, low: float, integer: bool = False) -> Any:
    """An integer >= low, or a finite number >= low, from an option's text."""
    try:
        value = int(text) if integer else float(text)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or value < low:
        raise PowerSampleError(f"bad {option} {text!r}: must be {'an integer' if integer else 'a number'} >= {low}")
    return value


def default_run_dir(plan: Any) -> Path:
    from powersample.eval.records import identity_hash

    return Path("runs") / f"{plan.task.name}-{plan.config.method}-{identity_hash(plan.identity())}"


def precheck_run_dir(run_dir: Path, identity: dict[str, Any], shard: tuple[int, int] | None = None) -> None:
    """Refuse a directory holding another config, or one that another eval of this shard is writing, before the
    (slow) model load. A run asked with chat prompts may find its directory saying chat: false (its model has no
    chat template, which only the loaded model tells: the run checks again once it is known)."""
    from powersample.eval.records import (
        RUN_FILE,
        check_identity,
        check_unlocked,
        identity_diffs,
        read_run,
        records_path,
    )

    if run_dir.exists() and not run_dir.is_dir():
        raise PowerSampleError(f"--output-dir {run_dir} is not a directory")
    if (run_dir / RUN_FILE).exists():
        have = read_run(run_dir).get("identity")
        if not (identity["chat"] and not identity_diffs(have, {**identity, "chat": False})):
            check_identity(run_dir, have, identity)
    check_unlocked(records_path(run_dir, shard))


MAX_TIMEOUT = 86_400.0  # a day per program or answer: more is a typo, and must fit the sandbox's CPU rlimit
MAX_MEMORY_MB = 1 << 30  # a petabyte: more does not fit an rlimit once in bytes


def _grade_options(args: argparse.Namespace) -> GradeOptions:
    timeouts = (args.code_timeout, args.math_timeout)
    if not all(math.isfinite(t) and 0 < t <= MAX_TIMEOUT for t in timeouts):
        raise PowerSampleError(f"--code-timeout and --math-timeout must be > 0 and at most {MAX_TIMEOUT:g} seconds")
    if not 64 <= args.code_memory_mb <= MAX_MEMORY_MB:
        raise PowerSampleError(f"--code-memory-mb must be between 64 and {MAX_MEMORY_MB}")
    return GradeOptions(args.code_timeout, args.code_memory_mb, args.math_timeout)


def check_paths(args: argparse.Namespace) -> None:
    """An empty path would silently mean another thing (--data: the hub; --output-dir: the default directory)."""
    paths = {
        "--data": args.data,
        "--output-dir": args.output_dir,
        "--bon-match": args.bon_match,
        "--vote-match": args.vote_match,
    }
    for option, value in paths.items():
        if value is not None and not value.strip():
            raise PowerSampleError(f"{option} is empty")
