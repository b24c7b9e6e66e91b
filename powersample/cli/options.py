"""The options that several subcommands share: the sampler's (derived from the sampler registry) and the backend's
(which build a BackendSpec). Argparse stays here, at the edge: everything inward gets plain values."""

from __future__ import annotations

import argparse
import sys

from powersample.backends import BACKENDS, Backend, BackendSpec, memory
from powersample.backends.llamacpp import QUANTS
from powersample.config import SHARED_FIELDS, SPECS, TYPES, SamplerConfig
from powersample.errors import PowerSampleError
from powersample.samplers import registry
from powersample.samplers.registry import METHODS, REGISTRY

MAX_SEQUENCES = 1_000_000  # chains x members per chain in one run: each member has its own generator (~2 KB), and
# numpy refuses dimensions past 2^63 long before (a traceback, not an answer)


def add_sampler_options(p: argparse.ArgumentParser) -> None:
    """One option per shared SamplerConfig field, in declaration order, then one per method knob (registry order);
    --block-size and --block-count exclude each other."""
    d = SamplerConfig()
    g = p.add_argument_group("sampler")
    blocks = g.add_mutually_exclusive_group()
    for name in SHARED_FIELDS:
        _add_field(blocks if name in ("block_size", "block_count") else g, name, d, SPECS[name].help)
    add_knob_options(g, d)


def add_knob_options(g: argparse._ArgumentGroup, defaults: SamplerConfig) -> None:
    """One option per method knob, in registry order: `--tries` for power-mtm's `tries`, and so on."""
    for entry in REGISTRY.values():
        for name in entry.knobs:
            _add_field(g, name, defaults, f"{entry.name}: {SPECS[name].help}")


def _add_field(g: argparse._ActionsContainer, name: str, defaults: SamplerConfig, help: str) -> None:
    """The option of one SamplerConfig field, as its declaration says."""
    spec = SPECS[name]
    kind, choices = (None, METHODS) if name == "method" else (TYPES[name], None)
    g.add_argument(
        option(name),
        type=kind,
        default=getattr(defaults, name),
        metavar=spec.metavar,
        choices=choices,
        help=f"{help} ({spec.shown})",
    )


def option(field: str) -> str:
    """The command-line option of a SamplerConfig field."""
    return "--" + field.replace("_", "-")


def add_backend_options(p: argparse.ArgumentParser, threads: bool = True) -> None:
    """The backend options (`threads` False: the caller declares its own --threads)."""
    g = p.add_argument_group("backend")
    g.add_argument(
        "--backend",
        choices=BACKENDS,
        default="auto",
        help="engine; auto = llamacpp for GGUF models on CPU when installed, else hf; vllm = the vLLM engine "
        "(default auto)",
    )
    g.add_argument("--model", help="local model dir, .gguf file or hub id (default: embedded SmolLM2-135M-Instruct)")
    g.add_argument("--toy-spec", help="toy model JSON spec (with --backend toy)")
    g.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    g.add_argument("--dtype", help="hf, vllm: float32, bfloat16, float16 or auto (default: float32 on CPU)")
    if threads:
        g.add_argument("--threads", type=int, help="CPU threads of the engine (default: the engine's own)")
    g.add_argument(
        "--quant",
        choices=QUANTS,
        help="llamacpp: re-quantize the GGUF once to this type (cached) and load the copy; see docs/performance.md",
    )
    add_vllm_options(g)


def add_memory_option(p: argparse.ArgumentParser) -> None:
    """--max-memory: the memory budget of the chains in flight (plan_memory)."""
    p.add_argument(
        "--max-memory",
        metavar="SIZE",
        help="most KV cache the chains in flight may hold (2GiB, 500MB, bytes); the rest wait. A chain that cannot "
        f"fit is refused before the model loads (default {memory.DEFAULT_SHARE:g} of the memory free at the start: "
        "RAM, or the GPU's on CUDA; not for vllm, whose engine sizes its own cache)",
    )


def add_vllm_options(g: argparse._ArgumentGroup) -> None:
    """vLLM's engine options (--backend vllm only); None = the backend's defaults."""
    g.add_argument("--tensor-parallel-size", type=int, help="vllm: GPUs per engine (default 1)")
    g.add_argument(
        "--gpu-memory-utilization",
        type=float,
        help="vllm: share of memory for weights + KV cache (default 0.9 on GPU, 0.3 on CPU)",
    )
    g.add_argument("--max-model-len", type=int, help="vllm: context length of the engine (default: the model's)")


def config_from_args(args: argparse.Namespace) -> SamplerConfig:
    """The validated SamplerConfig of the sampler options, with the method's own checks done now, before any
    model loads (power-rollout's refusal of a proposal temperature would otherwise come after the load)."""
    config = SamplerConfig(**{name: getattr(args, name) for name in (*SHARED_FIELDS, *registry.METHOD_KNOBS)})
    registry.check(config)
    check_members(config, 1)
    return config


def check_members(config: SamplerConfig, chains: int, option_name: str = "--num-samples") -> None:
    """A one-line error instead of a run that cannot start: chains x members per chain within MAX_SEQUENCES."""
    members = registry.members(config)
    total = chains * members
    if total > MAX_SEQUENCES:
        knobs = registry.method(config.method).members
        per_chain = f" x {' x '.join(option(k) for k in knobs)} ({members})" if knobs else ""
        raise PowerSampleError(
            f"{option_name} ({chains}){per_chain} asks for {total} sequences at once; at most "
            f"{MAX_SEQUENCES} (run more commands with other seeds)"
        )


def backend_spec(args: argparse.Namespace) -> BackendSpec:
    """The BackendSpec of the backend options (checked now, before any model loads), quiet with --quiet."""
    return BackendSpec(
        args.backend,
        model=args.model,
        toy_spec=args.toy_spec,
        device=args.device,
        dtype=args.dtype,
        threads=args.threads,
        quant=args.quant,
        tensor_parallel_size=args.tensor_parallel_size,
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_model_len=args.max_model_len,
        quiet=args.quiet,
    )


def plan_memory(args: argparse.Namespace, spec: BackendSpec, config: SamplerConfig) -> int | None:
    """The run's memory budget (--max-memory; default memory.DEFAULT_SHARE of the memory free now), with one
    chain's plan from the model's config checked against it before the model loads (a one-line refusal; the prompt
    is not counted yet, the API counts it once encoded) and said on stderr; None where the engine plans no memory
    (toy, vllm) and no --max-memory is given."""
    given = memory.parse_size(args.max_memory) if args.max_memory is not None else None
    spec = spec.resolved()
    layout = memory.planned_layout(spec.name, spec.model, spec.dtype, spec.device)
    if layout is None:
        return given
    cuda = spec.name == "hf" and memory.on_cuda(spec.device)
    budget = given if given is not None else memory.default_budget(spec.device or "cuda" if cuda else None)
    plan = memory.plan(layout, config.max_new_tokens, registry.members(config), budget)
    plan.check()
    if not args.quiet:
        print(f"powersample: {plan.line()}", file=sys.stderr, flush=True)
    return budget


def load(spec: BackendSpec, quiet: bool) -> Backend:
    """Load the backend, saying which engine on stderr first (the load can take a while)."""
    spec = spec.resolved()
    if not quiet:
        print(f"powersample: loading the {spec.name} backend...", file=sys.stderr, flush=True)
    return spec.load()
