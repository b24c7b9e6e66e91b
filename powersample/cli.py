"""Command line: `powersample sample ...`. Functions here only parse arguments and dispatch."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Sequence

from powersample.api import check_prompt
from powersample.config import METHOD_KNOBS, METHODS, SamplerConfig
from powersample.errors import PowerSampleError

EXIT_USAGE = 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = args.handler(args)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's final flush
        return code
    except PowerSampleError as e:
        print(f"powersample: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("powersample: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # stdout closed early (`| head`): stop quietly, as the shell's own tools do
        _drop_stdout()
        return 128 + 13  # 128 + SIGPIPE


def _drop_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush does not fail on the closed pipe again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a real file (tests); nothing to flush
        pass
    finally:
        os.close(devnull)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="powersample", description="Sample from p(x)^alpha of a language model.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("sample", help="sample completions of a prompt", description="Sample completions of a prompt.")
    p.add_argument("prompt", nargs="?", help="the prompt (or use --prompt-file)")
    p.add_argument("--prompt-file", help="read the prompt from this file ('-' = stdin)")
    p.add_argument("--raw", action="store_true", help="send the prompt as-is, without the chat template")
    add_sampler_options(p)
    add_backend_options(p)
    p.add_argument("--num-samples", type=int, default=1, help="independent samples (chains run batched)")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, config and backend => same output)")
    p.add_argument("--output", help="append one JSON record per sample to this JSONL file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--return-particles", action="store_true",
                   help="power-smc: also put every particle with its weight in the records")
    p.set_defaults(handler=_cmd_sample)
    from powersample.bench_cli import add_bench_parser  # local: these modules import this one
    from powersample.eval.cli import add_eval_parsers
    from powersample.server.cli import add_serve_parser

    add_bench_parser(sub)
    add_eval_parsers(sub)
    add_serve_parser(sub)
    return parser


def add_sampler_options(p: argparse.ArgumentParser) -> None:
    d = SamplerConfig()
    g = p.add_argument_group("sampler")
    g.add_argument("--method", choices=METHODS, default=d.method, help="sampling method (default: power)")
    g.add_argument("--alpha", type=float, default=d.alpha, help="power alpha of the target p^alpha (default 4)")
    g.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="T (default %(default)s)")
    blocks = g.add_mutually_exclusive_group()
    blocks.add_argument("--block-size", type=int, help="block size B (default T / block count)")
    blocks.add_argument("--block-count", type=int, default=d.block_count, help="number of blocks T/B (default 16)")
    g.add_argument("--mcmc-steps", type=int, default=d.mcmc_steps, help="MH steps per stage (default 10)")
    g.add_argument("--proposal-temperature", type=float, help="proposal temperature tau (default 1/alpha)")
    g.add_argument("--top-k", type=int, default=d.top_k, help="proposal top-k (default off)")
    g.add_argument("--top-p", type=float, default=d.top_p, help="proposal top-p (default off)")
    g.add_argument("--tries", type=int, default=d.tries, help="power-mtm: proposals per MH step (default %(default)s)")
    g.add_argument("--particles", type=int, default=d.particles, help="power-smc: particles (default %(default)s)")
    g.add_argument("--ess-threshold", type=float, default=d.ess_threshold,
                   help="power-smc: resample when ESS < this x particles (default %(default)s)")
    g.add_argument("--alpha-ramp", type=int, default=d.alpha_ramp,
                   help="power-smc: tokens over which alpha ramps up from 1 (default 0 = off)")
    g.add_argument("--candidates", type=int, default=d.candidates,
                   help="power-rollout: K likeliest next tokens weighed per step (default %(default)s)")
    g.add_argument("--rollouts", type=int, default=d.rollouts,
                   help="power-rollout: M rollouts per candidate (default %(default)s)")
    g.add_argument("--rollout-horizon", type=int, default=d.rollout_horizon,
                   help="power-rollout: tokens per rollout (default 0 = up to T)")


def add_backend_options(p: argparse.ArgumentParser) -> None:
    from powersample.backends import BACKENDS
    from powersample.backends.llamacpp import QUANTS

    g = p.add_argument_group("backend")
    g.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="engine; auto = llamacpp for GGUF models on CPU when installed, else hf; vllm = the vLLM engine "
                        "(default auto)")
    g.add_argument("--model", help="local model dir, .gguf file or hub id (default: embedded SmolLM2-135M-Instruct)")
    g.add_argument("--toy-spec", help="toy model JSON spec (with --backend toy)")
    g.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    g.add_argument("--dtype", help="hf, vllm: float32, bfloat16, float16 or auto (default: float32 on CPU)")
    g.add_argument("--threads", type=int, help="CPU threads of the engine (default: the engine's own)")
    g.add_argument("--quant", choices=QUANTS, help="llamacpp: re-quantize the GGUF once to this type (cached) and "
                                                   "load the copy; see the README's Performance section")
    add_vllm_options(g)


def add_vllm_options(g: argparse._ArgumentGroup) -> None:
    """vLLM's engine options (--backend vllm only); None = the backend's defaults."""
    g.add_argument("--tensor-parallel-size", type=int, help="vllm: GPUs per engine (default 1)")
    g.add_argument("--gpu-memory-utilization", type=float,
                   help="vllm: share of memory for weights + KV cache (default 0.9 on GPU, 0.3 on CPU)")
    g.add_argument("--max-model-len", type=int, help="vllm: context length of the engine (default: the model's)")


def config_from_args(args: argparse.Namespace) -> SamplerConfig:
    """The validated SamplerConfig of the sampler options, with the method's own checks done now, before any
    model loads (power-rollout's refusal of a proposal temperature would otherwise come after the load)."""
    config = SamplerConfig(
        method=args.method,
        alpha=args.alpha,
        max_new_tokens=args.max_new_tokens,
        block_size=args.block_size,
        block_count=args.block_count,
        mcmc_steps=args.mcmc_steps,
        proposal_temperature=args.proposal_temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        **{name: getattr(args, name) for name in METHOD_KNOBS},
    )
    if config.method == "power-rollout":
        from powersample.samplers.rollout import check_config

        check_config(config)
    check_members(config, 1)
    return config


MAX_SEQUENCES = 1_000_000  # chains x members per chain in one run: each member has its own generator (~2 KB), and
# numpy refuses dimensions past 2^63 long before (a traceback, not an answer)


def check_members(config: SamplerConfig, chains: int, option: str = "--num-samples") -> None:
    """A one-line error instead of a run that cannot start: chains x members per chain within MAX_SEQUENCES."""
    total = chains * config.members
    if total > MAX_SEQUENCES:
        knob = {"power-smc": "--particles", "power-mtm": "--tries", "power-rollout": "--candidates x --rollouts"}
        per_chain = f" x {knob[config.method]} ({config.members})" if config.method in knob else ""
        raise PowerSampleError(f"{option} ({chains}){per_chain} asks for {total} sequences at once; at most "
                               f"{MAX_SEQUENCES} (run more commands with other seeds)")  # fmt: skip


def check_sample_args(args: argparse.Namespace, config: SamplerConfig) -> None:
    """What `api.sample` would refuse, refused before the model loads (same messages)."""
    if args.num_samples < 1:
        raise PowerSampleError(f"num_samples must be >= 1, got {args.num_samples}")
    check_members(config, args.num_samples)
    if args.seed < 0:
        raise PowerSampleError(f"seed must be an integer >= 0, got {args.seed}")
    if args.return_particles and config.method != "power-smc":
        raise PowerSampleError(f"return_particles needs method power-smc, not {config.method}")


def backend_from_args(args: argparse.Namespace):
    from powersample.backends import load_backend, resolve_auto

    quant = getattr(args, "quant", None)
    name = args.backend
    if name == "auto":  # --quant means llamacpp
        name = "llamacpp" if quant else resolve_auto(args.model, args.device, args.toy_spec)
    if not args.quiet:
        print(f"powersample: loading the {name} backend...", file=sys.stderr, flush=True)
    return load_backend(name, model=args.model, toy_spec=args.toy_spec, device=args.device, dtype=args.dtype,
                        threads=args.threads, quant=quant, **vllm_options(args))


def vllm_options(args: argparse.Namespace) -> dict:
    """The vllm engine options given on the command line (None where not given)."""
    keys = ("tensor_parallel_size", "gpu_memory_utilization", "max_model_len")
    return {k: getattr(args, k, None) for k in keys}


def _cmd_sample(args: argparse.Namespace) -> int:
    from powersample.api import sample
    from powersample.progress import progress_bar

    config = config_from_args(args)  # validate before the (slow) model load
    check_sample_args(args, config)
    prompt = read_prompt(args)
    if args.output:
        append_jsonl(args.output, [])  # fail on an unwritable path now, not after sampling
    backend = backend_from_args(args)
    with progress_bar(config, args.quiet, chains=args.num_samples) as progress:
        records = sample(backend, prompt, config, seed=args.seed, num_samples=args.num_samples,
                         chat=not args.raw, progress=progress, return_particles=args.return_particles)
    if args.output:  # first: the records are kept even if printing fails (a closed pipe)
        append_jsonl(args.output, [r.to_dict() for r in records])
    for r in records:
        print(r.text)
        print(summary_line(r, len(records)))
    return 0


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


def summary_line(r, total: int) -> str:
    return (
        f"[sample {r.sample_index + 1}/{total}] method={r.method} tokens={len(r.tokens)} ({r.finish_reason}) "
        f"logp={r.logp:.2f} accepted={r.accepted}/{r.proposals} tokens_sampled={r.tokens_generated} "
        f"wall={r.wall_seconds:.1f}s"
    )


def append_jsonl(path: str, rows: list[dict]) -> None:
    """Append rows, flushed and fsynced, so existing records are never lost. Every row is encoded first, and a
    non-finite number refused: a bare Infinity or NaN would make the file invalid JSON."""
    try:
        lines = "".join(json.dumps(row, allow_nan=False) + "\n" for row in rows)
    except ValueError:
        raise PowerSampleError(f"not writing {path}: a record holds a non-finite number") from None
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(lines)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise PowerSampleError(f"cannot write {path}: {e.strerror}") from None


if __name__ == "__main__":
    sys.exit(main())
