"""`powersample sample`: sample completions of a prompt. Functions here only parse arguments and dispatch."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from powersample.api import ChainTrace, SampleRecord, check_prompt, check_returns, sample, sampling_bar
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
from powersample.config import SamplerConfig
from powersample.errors import PowerSampleError
from powersample.io import append_jsonl, check_writable, write_bytes_atomic
from powersample.samplers import registry


def add_sample_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "sample", help="sample completions of a prompt", description="Sample completions of a prompt."
    )
    p.add_argument("prompt", nargs="?", help="the prompt (or use --prompt-file)")
    p.add_argument("--prompt-file", help="read the prompt from this file ('-' = stdin)")
    p.add_argument("--raw", action="store_true", help="send the prompt as-is, without the chat template")
    add_sampler_options(p)
    add_backend_options(p)
    add_memory_option(p)
    p.add_argument("--num-samples", type=int, default=1, help="independent samples (chains run batched)")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, config and backend => same output)")
    p.add_argument("--output", help="append one JSON record per sample to this JSONL file")
    p.add_argument(
        "--trace",
        metavar="FILE",
        help="write every chain's steps to this JSONL file (MH steps: cut, "
        "proposal, log r and its terms, accepted; SMC weights); `powersample report --trace FILE` plots it",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--return-particles",
        action="store_true",
        help="power-smc: also put every particle with its weight in the records",
    )
    p.add_argument(
        "--return-replicas",
        action="store_true",
        help="power-pt: also put every replica's state with its alpha in the records",
    )
    p.set_defaults(handler=cmd_sample)


def cmd_sample(args: argparse.Namespace) -> int:
    config, spec = config_from_args(args), backend_spec(args)  # validate before the (slow) model load
    check_sample_args(args, config)
    prompt = read_prompt(args)
    if args.output:
        append_jsonl(args.output, [])  # fail on an unwritable path now, not after sampling
    if args.trace:
        check_writable(Path(args.trace))  # the same for the trace (written whole, atomically, at the end)
    spec = spec.resolved()  # once, for the plan and the load: `auto`'s probe of llama.cpp speaks once
    budget = plan_memory(args, spec, config)
    backend = load(spec, args.quiet)
    trace = ChainTrace(backend) if args.trace else None
    with sampling_bar(config, args.quiet, chains=args.num_samples) as progress:
        records = sample(
            backend,
            prompt,
            config,
            seed=args.seed,
            num_samples=args.num_samples,
            chat=not args.raw,
            progress=progress,
            return_particles=args.return_particles,
            trace=trace,
            return_replicas=args.return_replicas,
            max_memory=budget,
        )
    if args.output:  # first: the records are kept even if printing fails (a closed pipe)
        append_jsonl(args.output, [r.to_dict() for r in records])
    if trace is not None:
        write_bytes_atomic(Path(args.trace), trace.jsonl())
    for r in records:
        print(r.text)
        print(summary_line(r, len(records)))
    return 0


def check_sample_args(args: argparse.Namespace, config: SamplerConfig) -> None:
    """What `api.sample` would refuse, refused before the model loads (same messages)."""
    if args.num_samples < 1:
        raise PowerSampleError(f"num_samples must be >= 1, got {args.num_samples}")
    check_members(config, args.num_samples)
    if args.seed < 0:
        raise PowerSampleError(f"seed must be an integer >= 0, got {args.seed}")
    check_returns(config, args.return_particles, args.return_replicas)


def read_prompt(args: argparse.Namespace) -> str:
    if (args.prompt is None) == (args.prompt_file is None):
        raise PowerSampleError("give a prompt either as an argument or with --prompt-file, not both or neither")
    prompt = args.prompt if args.prompt_file is None else _read_file(args.prompt_file)
    check_prompt(prompt)
    try:  # bytes that are not UTF-8 in argv arrive as lone surrogates; a prompt file with them is refused too
        prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise PowerSampleError("the prompt is not UTF-8 text") from None
    return prompt


def _read_file(path: str) -> str:
    try:
        return sys.stdin.read() if path == "-" else Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise PowerSampleError(f"cannot read prompt file {path}: {e}") from None


def summary_line(r: SampleRecord, total: int) -> str:
    bon = registry.method(r.method).family == "bon"  # its proposals are candidates, none accepted or rejected
    moves = f"candidates={r.proposals}" if bon else f"accepted={r.accepted}/{r.proposals}"
    return (
        f"[sample {r.sample_index + 1}/{total}] method={r.method} tokens={len(r.tokens)} ({r.finish_reason}) "
        f"logp={r.logp:.2f} {moves} tokens_sampled={r.tokens_generated} wall={r.wall_seconds:.1f}s"
    )
