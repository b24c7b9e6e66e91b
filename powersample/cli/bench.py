"""Command line of `powersample bench`: parse arguments, run `powersample.tools.bench` (or, with --engines, its
engines module; with --fidelity, `powersample.tools.fidelity`), print the table, write the JSON.

Register it with `add_bench_parser(subparsers)`; `powersample.cli.main(['bench', ...])` runs it.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

from powersample.backends.base import Backend
from powersample.cli.options import (
    MAX_SEQUENCES,
    add_backend_options,
    add_memory_option,
    add_sampler_options,
    backend_spec,
    check_members,
    config_from_args,
    load,
    plan_memory,
)
from powersample.config import SamplerConfig
from powersample.errors import PowerSampleError
from powersample.io import progress_bar
from powersample.tools import fidelity
from powersample.tools.bench import (
    PROMPTS,
    BenchOptions,
    BenchResult,
    backend_dict,
    check_writable,
    format_table,
    pick_prompts,
    read_prompts,
    run_bench,
    total_work_units,
    write_json,
)
from powersample.tools.bench import engines as bench_engines
from powersample.tools.bench.table import format_engines
from powersample.tools.common import Update
from powersample.tools.fidelity import DEFAULT_SPECS, FidelityOptions, ToyTarget
from powersample.tools.fidelity.model import model_units
from powersample.tools.fidelity.toy import toy_units
from powersample.tools.machine import device_of

FIDELITY_HELP = """Toy mode (the default): TV distance to the exact p^alpha against tokens sampled, for every
registered method over a sweep of its knobs, on enumerable toy specs. Model mode (with --backend hf or llamacpp,
or --model): base log-likelihood per token of the outputs against tokens sampled and wall per sample. The sweeps
are fixed; of the sampler options only --alpha and --max-new-tokens apply (T default: 6 for toy specs, 48 for a
model; --quick: 8 for a model). Methods with no registered sampler are skipped and named in the output. Every
sweep is also read at one matched token budget: that of power with 1 block and 16 steps (toy), or 4 blocks and 4
steps (model)."""
FIDELITY_REFUSED = {
    "mcmc_steps": "--mcmc-steps",
    "block_size": "--block-size",
    "block_count": "--block-count",
    "chains": "--chains",
    "json_path": "--json",
}  # bench flags that --fidelity does not use
FULL = {"max_new_tokens": 192, "block_size": 48, "mcmc_steps": 4, "prompts": 3, "chains": 8}  # the default profile
QUICK = {"max_new_tokens": 16, "block_size": 8, "mcmc_steps": 2, "prompts": 1, "chains": 2}  # --quick, for CI

DESCRIPTION = """Measure power sampling against plain decoding and against regenerating from scratch, in one run:
plain decoding at batch 1 and K, power sampling with K chains and with 1 chain, and the same 1-chain run on a
backend that prefills every request from an empty cache. Prints a table with the targets it is judged by; --json
writes every raw number. Defaults: alpha 4, T=192, B=48, 4 MH steps, 3 built-in prompts, K=8 chains; --quick: T=16,
B=8, 2 steps, 1 prompt, 2 chains. Explicit flags override either profile."""


def add_bench_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `bench` on the `powersample` subparsers."""
    p = subparsers.add_parser(
        "bench", help="benchmark power sampling (speed, memory, targets)", description=DESCRIPTION
    )
    add_sampler_options(p)
    add_backend_options(p)
    add_memory_option(p)
    g = p.add_argument_group("bench")
    g.add_argument("--prompts", type=int, help="how many prompts (default 3, or every line of --prompt-file)")
    g.add_argument("--prompt-file", help="one prompt per line (default: built-in math and reasoning prompts)")
    g.add_argument("--chains", type=int, help="K, chains per prompt in the batched phases (default 8)")
    g.add_argument("--repeats", type=int, default=1, help="run every phase R times, report medians (default 1)")
    g.add_argument("--json", dest="json_path", metavar="PATH", help="write every raw number to this JSON file")
    g.add_argument("--quick", action="store_true", help="tiny run for CI: T=16, B=8, 2 steps, 1 prompt, 2 chains")
    g.add_argument("--seed", type=int, default=0, help="prompt i uses seed + i in every phase (default 0)")
    g.add_argument("--raw", action="store_true", help="send the prompts as-is, without the chat template")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.add_argument(
        "--engines",
        metavar="A,B,...",
        help="compare engine configurations side by side, taking turns: NAME[:KEY=VALUE...] with keys "
        "threads, dtype, quant, device (e.g. llamacpp,llamacpp:quant=iq4_nl,hf:dtype=bfloat16); "
        "--threads, --dtype and --device apply to every candidate that sets none of its own; "
        "runs plain decoding at batch 1 and power sampling with 1 and K chains",
    )
    add_fidelity_options(p)
    # None = "not given": filled from the FULL or QUICK profile by options_from_args
    p.set_defaults(handler=_cmd_bench, max_new_tokens=None, block_size=None, block_count=None, mcmc_steps=None)
    return p


def add_fidelity_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("fidelity per compute (--fidelity)", FIDELITY_HELP)
    g.add_argument("--fidelity", action="store_true", help="measure fidelity per compute instead of speed")
    g.add_argument(
        "--spec",
        action="append",
        metavar="NAME|PATH",
        help=f"toy target: a shipped spec name or a JSON file; repeatable (default: {' and '.join(DEFAULT_SPECS)})",
    )
    g.add_argument(
        "--samples",
        type=int,
        help="toy: samples per setting (default 1000, --quick 200); model: samples per prompt (default 4, --quick 1)",
    )
    g.add_argument("--methods", metavar="A,B,...", help="only these methods' settings (default: every method)")
    g.add_argument(
        "--output-dir",
        default="fidelity",
        help="where fidelity_<toy|model>.{json,md,png} and fidelity_toy_<spec>.png go (default ./fidelity)",
    )


def options_from_args(args: argparse.Namespace) -> BenchOptions:
    """The validated options: explicit flags, else the --quick or full profile."""
    profile = QUICK if args.quick else FULL
    config = bench_config(args, profile)
    chains = profile["chains"] if args.chains is None else args.chains
    check_members(config, chains, "--chains")
    return BenchOptions(
        config=config,
        prompts=bench_prompts(args, profile),
        backend=backend_spec(args).resolved(),  # both loads, and the JSON, name one engine
        chains=chains,
        repeats=args.repeats,
        seed=args.seed,
        chat=not args.raw,
        quick=args.quick,
    )


def bench_config(args: argparse.Namespace, profile: dict) -> SamplerConfig:
    """SamplerConfig from the flags, with the profile's T, B and N where they were not given."""
    filled = argparse.Namespace(**vars(args))
    for key in ("max_new_tokens", "mcmc_steps"):
        if getattr(args, key) is None:
            setattr(filled, key, profile[key])
    if args.block_size is None and args.block_count is None:  # the profile's B, clipped to a smaller given T
        filled.block_size = min(profile["block_size"], filled.max_new_tokens)
    if args.block_count is None:
        filled.block_count = SamplerConfig().block_count
    return config_from_args(filled)


def bench_prompts(args: argparse.Namespace, profile: dict) -> tuple[str, ...]:
    """--prompts N of the built-in list, or of --prompt-file's lines (all of them unless N or --quick)."""
    if args.prompt_file is None:
        count = profile["prompts"] if args.prompts is None else args.prompts
        return pick_prompts(PROMPTS, count, "the built-in list")
    available = read_prompts(args.prompt_file)
    count = args.prompts if args.prompts is not None else (1 if args.quick else None)
    return pick_prompts(available, count, args.prompt_file)


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.fidelity:
        return _cmd_fidelity(args)
    if args.engines:
        return _cmd_engines(args)
    options = options_from_args(args)  # validate before the (slow) model load
    plan_memory(args, options.backend, options.config)  # one chain that cannot fit is refused now
    if args.json_path:
        check_writable(args.json_path)
    if not args.quiet:
        print(f"powersample: loading the {options.backend.name} backend...", file=sys.stderr)
    latest: list[BenchResult] = []
    try:
        with _bar(total_work_units(options), "bench", "round", args.quiet) as update:
            result = run_bench(options, update, lambda r: _keep(r, latest, args.json_path))
    except KeyboardInterrupt:
        if latest:  # the partial JSON is on disk already; show its table too
            print(format_table(latest[-1]))
        raise
    if args.json_path:
        write_json(args.json_path, result)
    print(format_table(result))
    return 0


def _cmd_engines(args: argparse.Namespace) -> int:
    """`bench --engines`: the candidates side by side (tools/bench/engines.py)."""
    if args.backend != "auto" or args.toy_spec or args.quant:
        raise PowerSampleError("--engines names its own backends and options: drop --backend, --toy-spec, --quant")
    given = {"threads": args.threads, "dtype": args.dtype, "device": args.device}  # for candidates without their own
    candidates = bench_engines.parse_candidates(args.engines, args.model, given, quiet=args.quiet)
    options = replace(options_from_args(args), backend=candidates[0].backend)  # validate before loading
    if args.json_path:
        check_writable(args.json_path)

    def keep(result: bench_engines.EnginesResult) -> None:  # the partial JSON after each call
        if args.json_path:
            write_json(args.json_path, result)

    with _bar(bench_engines.total_units(options, candidates), "engines", "call", args.quiet) as update:
        result = bench_engines.run_engines(options, candidates, update, keep)
    if args.json_path:
        write_json(args.json_path, result)
    print(format_engines(result))
    return 0


@contextlib.contextmanager
def _bar(total: int, desc: str, unit: str, quiet: bool) -> Iterator[Update | None]:
    """The tools' progress callback on the one progress bar (io.progress_bar), named after what runs now."""
    with progress_bar(total, desc, unit, quiet=quiet) as bar:
        if bar is None:
            yield None
            return

        def update(text: str, n: int) -> None:
            bar.set_description(text, refresh=False)
            bar.update(n)

        yield update


def _keep(result: BenchResult, latest: list[BenchResult], json_path: str | None) -> None:
    """After each call: remember the partial result and rewrite the JSON, so an interrupted run keeps its data."""
    latest[:] = [result]
    if json_path:
        write_json(json_path, result)


# -- --fidelity --------------------------------------------------------------------------------------------------


def fidelity_mode(args: argparse.Namespace) -> str:
    """toy unless a model engine is asked for (--backend hf|llamacpp, or --model)."""
    return "toy" if args.backend in ("auto", "toy") and args.model is None else "model"


def fidelity_options_from_args(args: argparse.Namespace) -> FidelityOptions:
    """The validated fidelity options; bench-only flags that it would ignore are refused."""
    for key, flag in FIDELITY_REFUSED.items():
        if getattr(args, key) is not None:
            raise PowerSampleError(f"{flag} does not apply to --fidelity (it sweeps its own settings)")
    SamplerConfig(alpha=args.alpha)  # alpha checked as every sampler checks it
    if args.samples is not None and not 1 <= args.samples <= MAX_SEQUENCES:
        raise PowerSampleError(f"--samples must be between 1 and {MAX_SEQUENCES}, got {args.samples}")
    mode = fidelity_mode(args)
    if mode == "toy":
        t = 6 if args.max_new_tokens is None else args.max_new_tokens
        names = (args.spec or []) + ([args.toy_spec] if args.toy_spec else [])
        return FidelityOptions(
            "toy",
            args.alpha,
            t,
            _samples(args, 1000, 200),
            args.seed,
            args.quick,
            targets=tuple(ToyTarget.resolve(n, t) for n in names or DEFAULT_SPECS),
            methods=_methods(args),
        )
    if args.spec:
        raise PowerSampleError("--spec names a toy target; it does not apply with a model backend")
    t = (8 if args.quick else 48) if args.max_new_tokens is None else args.max_new_tokens
    profile = QUICK if args.quick else FULL
    return FidelityOptions(
        "model",
        args.alpha,
        t,
        _samples(args, 4, 1),
        args.seed,
        args.quick,
        prompts=bench_prompts(args, profile),
        chat=not args.raw,
        methods=_methods(args),
    )


def _methods(args: argparse.Namespace) -> tuple[str, ...]:
    return tuple(m.strip() for m in args.methods.split(",") if m.strip()) if args.methods else ()


def _samples(args: argparse.Namespace, full: int, quick: int) -> int:
    return (quick if args.quick else full) if args.samples is None else args.samples


def _cmd_fidelity(args: argparse.Namespace) -> int:
    options = fidelity_options_from_args(args)  # validate before the (slow) model load
    out_dir = Path(args.output_dir)
    fidelity.prepare_dir(out_dir)

    def keep(data: dict) -> None:  # the partial JSON after each setting, so an interrupted run keeps its data
        fidelity.write_json(out_dir, data)

    if options.mode == "toy":
        with _bar(toy_units(options), "fidelity", "run", args.quiet) as update:
            data = fidelity.run_toy(options, update, keep)
    else:
        backend, described = _load_model(args)
        with _bar(model_units(options), "fidelity", "run", args.quiet) as update:
            data = fidelity.run_model(options, backend, described, update, keep)
    written = fidelity.write_outputs(out_dir, data)
    print(fidelity.render_table(data))
    for path in written:
        print(f"powersample: wrote {path}", file=sys.stderr)
    return 0


def _load_model(args: argparse.Namespace) -> tuple[Backend, dict[str, Any]]:
    """The backend of the model comparison, and its description for the JSON."""
    spec = replace(backend_spec(args), toy_spec=None).resolved()
    backend = load(spec, args.quiet)
    return backend, backend_dict(spec, device_of(backend))
