"""Command line of `powersample serve`. Register it with `add_serve_parser(subparsers)`; it parses and dispatches."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from pathlib import Path

from powersample.cli import (
    add_backend_options,
    add_sampler_options,
    append_jsonl,
    backend_from_args,
    config_from_args,
)
from powersample.errors import PowerSampleError

DESCRIPTION = """Serve power sampling over the OpenAI API: POST /v1/completions and /v1/chat/completions, GET
/v1/models and /health. The sampler options below are the defaults a request's fields override (method, alpha,
mcmc_steps, block_size, block_count, proposal_temperature, top_k, top_p, max_tokens). Binds 127.0.0.1 unless told
otherwise; with --api-key (or POWERSAMPLE_API_KEY) every request needs 'Authorization: Bearer KEY'."""


def add_serve_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from powersample.server.protocol import Limits

    d = Limits()
    p = subparsers.add_parser("serve", help="OpenAI-compatible server", description=DESCRIPTION)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default %(default)s)")
    p.add_argument("--api-key", default=os.environ.get("POWERSAMPLE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $POWERSAMPLE_API_KEY, else none)")
    p.add_argument("--model-name", help="the model id /v1/models lists (default: the model file's name)")
    p.add_argument("--output", help="append one JSON record per returned sample to this JSONL file")
    p.add_argument("--quiet", action="store_true", help="no access log")
    g = p.add_argument_group("limits")
    g.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes, help="request body (default %(default)s)")
    g.add_argument("--max-tokens-limit", type=int, default=d.max_tokens,
                   help="largest max_tokens a request may ask for (default %(default)s)")
    g.add_argument("--max-n", type=int, default=d.max_n, help="largest n (default %(default)s)")
    g.add_argument("--max-prompts", type=int, default=d.max_prompts,
                   help="most prompts in one completions request (default %(default)s)")
    g.add_argument("--request-timeout", type=float, default=d.request_timeout,
                   help="seconds before a request's chains are stopped and it gets 504 (default %(default)s)")
    g.add_argument("--max-queued-chains", type=int, default=d.max_queued_chains,
                   help="chains waiting or running at once; more gets 429 (default %(default)s)")
    add_sampler_options(p)
    add_backend_options(p)
    p.set_defaults(handler=_cmd_serve)
    return p


def _cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from powersample.server.app import create_app
    except ModuleNotFoundError as e:
        raise PowerSampleError(f"serve needs {e.name!r}: pip install 'powersample[serve]'") from None
    settings = _settings(args)  # validate before the (slow) model load
    if args.output:
        append_jsonl(args.output, [])  # fail on an unwritable path now
    _warn_if_exposed(args.host, args.api_key)
    backend = backend_from_args(args)
    app = create_app(backend, settings)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning" if args.quiet else "info",
                timeout_graceful_shutdown=5)  # fmt: skip
    return 0


def _settings(args: argparse.Namespace):
    from powersample.server.app import Settings
    from powersample.server.protocol import Limits

    limits = Limits(args.max_body_bytes, args.max_tokens_limit, args.max_n, args.max_prompts,
                    request_timeout=args.request_timeout, max_queued_chains=args.max_queued_chains)  # fmt: skip
    for name in ("max_body_bytes", "max_tokens", "max_n", "max_prompts", "max_queued_chains"):
        if getattr(limits, name) < 1:
            raise PowerSampleError(f"--{name.replace('_', '-')} must be >= 1")
    if not limits.request_timeout > 0:
        raise PowerSampleError(f"--request-timeout must be > 0, got {limits.request_timeout}")
    if not 0 < args.port < 65536:
        raise PowerSampleError(f"--port must be between 1 and 65535, got {args.port}")
    config = config_from_args(args)
    if config.max_new_tokens > limits.max_tokens:
        raise PowerSampleError(f"--max-new-tokens ({config.max_new_tokens}) exceeds --max-tokens-limit "
                               f"({limits.max_tokens})")  # fmt: skip
    from powersample.backends import resolve_auto

    backend = resolve_auto(args.model, args.device, args.toy_spec) if args.backend == "auto" else args.backend
    return Settings(defaults=config, model_name=args.model_name or _model_name(args), backend_name=backend,
                    api_key=args.api_key or None, limits=limits, output=args.output)  # fmt: skip


def _model_name(args: argparse.Namespace) -> str:
    if args.toy_spec:
        return f"toy:{Path(args.toy_spec).stem}"
    if args.model is None:
        return "SmolLM2-135M-Instruct"
    return Path(args.model).name if Path(args.model).expanduser().exists() else args.model


def _warn_if_exposed(host: str, api_key: str | None) -> None:
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback and not api_key:
        print(f"powersample: warning: serving on {host} without --api-key: anyone who can reach it can use it",
              file=sys.stderr)
