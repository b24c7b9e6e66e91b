"""Command line of `powersample serve`. Register it with `add_serve_parser(subparsers)`; it parses and dispatches."""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import os
import socket
import sys
from pathlib import Path

from powersample.backends import BackendSpec
from powersample.cli.options import (
    add_backend_options,
    add_memory_option,
    add_sampler_options,
    backend_spec,
    config_from_args,
    load,
    plan_memory,
)
from powersample.errors import PowerSampleError
from powersample.io import append_jsonl
from powersample.samplers import registry

DESCRIPTION = """Serve power sampling over the OpenAI API: POST /v1/completions and /v1/chat/completions, GET
/v1/models, /health and /metrics (Prometheus; with the key unless --metrics-public). The sampler options
below are the defaults a request's fields override (method, alpha, mcmc_steps, block_size,
block_count, proposal_temperature, top_k, top_p, speculate, every method's knobs, max_tokens). Binds 127.0.0.1
unless told otherwise; with --api-key (or POWERSAMPLE_API_KEY) every request needs 'Authorization: Bearer KEY' (GET
/health answers a bare {"status": "ok"} without it, for liveness probes). Requests must be application/json and name
this server as their Host (DNS-rebinding protection; --allowed-host adds names); no web origin may call it unless
--cors-origin allows one."""

# the flag of each limit, where it is not --<field>
_FLAGS = {
    "max_tokens": "--max-tokens-limit",
    "max_mcmc_steps": "--max-mcmc-steps",
    "keep_alive": "--keep-alive-timeout",
}


def add_serve_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from powersample.server.http import HttpLimits
    from powersample.server.protocol import Limits

    d, h = Limits(), HttpLimits()
    p = subparsers.add_parser("serve", help="OpenAI-compatible server", description=DESCRIPTION)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default %(default)s)")
    p.add_argument(
        "--api-key",
        default=os.environ.get("POWERSAMPLE_API_KEY"),
        help="require 'Authorization: Bearer KEY' (default: $POWERSAMPLE_API_KEY, else none; an empty key is refused)",
    )
    p.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a further name requests may give as their Host (repeatable; '*' = any). Allowed always: "
        "the --host address and loopback names (localhost, 127.0.0.1, ::1)",
    )
    p.add_argument(
        "--cors-origin",
        metavar="ORIGIN",
        help="let web pages from ORIGIN (e.g. http://localhost:3000) call the server; default: none",
    )
    p.add_argument(
        "--metrics-public",
        action="store_true",
        help="serve GET /metrics (Prometheus) without the API key, for a scraper inside a private network "
        "(default: /metrics needs the key when the server has one)",
    )
    p.add_argument("--model-name", help="the model id /v1/models lists (default: the model file's name)")
    p.add_argument("--output", help="append one JSON record per returned sample to this JSONL file")
    p.add_argument("--quiet", action="store_true", help="no access log")
    g = p.add_argument_group("limits")
    g.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes, help="request body (default %(default)s)")
    g.add_argument(
        "--max-tokens-limit",
        type=int,
        default=d.max_tokens,
        help="largest max_tokens a request may ask for (default %(default)s)",
    )
    g.add_argument("--max-n", type=int, default=d.max_n, help="largest n (default %(default)s)")
    g.add_argument(
        "--max-prompts",
        type=int,
        default=d.max_prompts,
        help="most prompts in one completions request (default %(default)s)",
    )
    g.add_argument(
        "--request-timeout",
        type=float,
        default=d.request_timeout,
        help="seconds before a request's chains are stopped and it gets 504 (default %(default)s)",
    )
    g.add_argument(
        "--max-queued-chains",
        type=int,
        default=d.max_queued_chains,
        help="chains waiting or running at once; more gets 429 (default %(default)s)",
    )
    g.add_argument(
        "--max-members",
        type=int,
        default=d.max_members,
        help="sequences in one request: prompts x n x particles (power-smc), tries (power-mtm) or "
        "candidates x rollouts (power-rollout); more gets 400 (default %(default)s)",
    )
    g.add_argument(
        "--max-work",
        type=int,
        default=d.max_work,
        help="sequences x max_tokens of one request; more gets 400 (default %(default)s)",
    )
    g.add_argument(
        "--max-queued-work",
        type=int,
        default=d.max_queued_work,
        help="sequences x max_tokens of every request waiting or running; more gets 429 (default %(default)s)",
    )
    g.add_argument(
        "--max-mcmc-steps",
        type=int,
        default=d.max_mcmc_steps,
        help="largest mcmc_steps a request may ask for (default %(default)s)",
    )
    g.add_argument(
        "--max-context",
        type=int,
        default=d.max_context,
        help="most prompt tokens + max_tokens of one request, below the model's own context; more gets "
        "400 (default %(default)s; while one runs, llama.cpp gives each of its 33 KV sequences that room)",
    )
    g.add_argument(
        "--header-timeout",
        type=float,
        default=h.header_timeout,
        help="seconds for a request's headers to arrive; then the socket is closed (default %(default)s)",
    )
    g.add_argument(
        "--body-timeout",
        type=float,
        default=h.body_timeout,
        help="seconds for a request's body to arrive after its headers; then 408 (default %(default)s)",
    )
    g.add_argument(
        "--keep-alive-timeout",
        type=float,
        default=h.keep_alive,
        help="seconds an idle kept-alive connection stays open (default %(default)s)",
    )
    g.add_argument(
        "--stream-keepalive",
        type=float,
        default=5.0,
        help="seconds between SSE keep-alive comments while a streamed request's chains run (default %(default)s)",
    )
    g.add_argument(
        "--max-connections",
        type=int,
        default=h.max_connections,
        help="connections or requests at once; more get 503 (default %(default)s)",
    )
    add_sampler_options(p)
    add_backend_options(p)
    add_memory_option(p)
    p.set_defaults(handler=_cmd_serve)
    return p


def _cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from powersample.server.app import create_app
    except ModuleNotFoundError as e:
        raise PowerSampleError(f"serve needs {e.name!r}: pip install 'powersample[serve]'") from None
    from powersample.server.http import uvicorn_config

    spec = backend_spec(args)
    settings, http = _settings(args, spec), _http_limits(args)  # validate before the (slow) model load
    settings = dataclasses.replace(settings, max_memory=plan_memory(args, settings.backend, settings.defaults))
    if args.output:
        append_jsonl(args.output, [])  # fail on an unwritable path now
    sock = _listen(args.host, args.port)  # a bad or busy address fails now, before the model loads
    _warn_if_exposed(args.host, args.api_key)
    with sock:
        backend = load(settings.backend, args.quiet)
        app = create_app(backend, settings)
        config = uvicorn_config(app, http, log_level="warning" if args.quiet else "info")
        try:
            uvicorn.Server(config).run(sockets=[sock])
        except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it shut down on (as uvicorn.run swallows it)
            pass
    return 0


def _listen(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port), for uvicorn to serve on; a PowerSampleError (exit 2) when it cannot be."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except (socket.gaierror, UnicodeError) as e:
        raise PowerSampleError(f"--host {host!r} is not an address of this machine: {e}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise PowerSampleError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def _http_limits(args: argparse.Namespace):
    from powersample.server.http import HttpLimits

    limits = HttpLimits(args.header_timeout, args.body_timeout, args.keep_alive_timeout, args.max_connections)
    try:
        limits.check()
    except ValueError as e:
        name = str(e).split(" ", 1)[0]
        raise PowerSampleError(f"{_flag(name)} {str(e).split(' ', 1)[1]}") from None
    return limits


def _flag(name: str) -> str:
    return _FLAGS.get(name, "--" + name.replace("_", "-"))


def _settings(args: argparse.Namespace, spec: BackendSpec):
    from powersample.server.app import Settings
    from powersample.server.protocol import Limits

    limits = Limits(
        args.max_body_bytes,
        args.max_tokens_limit,
        args.max_n,
        args.max_prompts,
        request_timeout=args.request_timeout,
        max_queued_chains=args.max_queued_chains,
        max_members=args.max_members,
        max_work=args.max_work,
        max_queued_work=args.max_queued_work,
        max_mcmc_steps=args.max_mcmc_steps,
        max_context=args.max_context,
    )
    for name in (
        "max_body_bytes",
        "max_tokens",
        "max_n",
        "max_prompts",
        "max_queued_chains",
        "max_members",
        "max_work",
        "max_queued_work",
        "max_context",
    ):
        if getattr(limits, name) < 1:
            raise PowerSampleError(f"{_flag(name)} must be >= 1, got {getattr(limits, name)}")
    if limits.max_mcmc_steps < 0:
        raise PowerSampleError(f"--max-mcmc-steps must be >= 0, got {limits.max_mcmc_steps}")
    if not limits.request_timeout > 0:
        raise PowerSampleError(f"--request-timeout must be > 0, got {limits.request_timeout}")
    if not args.stream_keepalive > 0:
        raise PowerSampleError(f"--stream-keepalive must be > 0, got {args.stream_keepalive}")
    if not 0 < args.port < 65536:
        raise PowerSampleError(f"--port must be between 1 and 65535, got {args.port}")
    _check_guard_flags(args.allowed_host, args.cors_origin)
    if args.api_key == "":
        raise PowerSampleError(
            "--api-key (or $POWERSAMPLE_API_KEY) is empty, which would turn authentication "
            "off; give a key, or leave both unset to serve without one"
        )
    config = config_from_args(args)
    _check_defaults(config, limits)
    return Settings(
        defaults=config,
        model_name=args.model_name or _model_name(args),
        backend=spec.resolved(),
        api_key=args.api_key,
        limits=limits,
        output=args.output,
        bind_host=args.host,
        allowed_hosts=tuple(args.allowed_host),
        cors_origin=args.cors_origin,
        body_timeout=args.body_timeout,
        metrics_public=args.metrics_public,
        stream_keepalive=args.stream_keepalive,
    )


def _check_guard_flags(allowed_hosts: list[str], cors_origin: str | None) -> None:
    """An empty --allowed-host or --cors-origin (a shell variable left unset) is refused: it names nothing, and an
    empty origin would match a request whose Origin header is empty."""
    if any(not name.strip() for name in allowed_hosts):
        raise PowerSampleError("--allowed-host is empty: give a host name (or '*' for any), or leave the flag out")
    if cors_origin is not None and not cors_origin.strip():
        raise PowerSampleError(
            "--cors-origin is empty: give an origin such as http://localhost:3000, or leave the "
            "flag out (no web page may call the server)"
        )


def _check_defaults(config, limits) -> None:
    """The sampler defaults must fit the limits, or every request that keeps them would get a 400."""
    if config.max_new_tokens > limits.max_tokens:
        raise PowerSampleError(
            f"--max-new-tokens ({config.max_new_tokens}) exceeds --max-tokens-limit ({limits.max_tokens})"
        )
    if config.method in registry.MCMC_METHODS and config.mcmc_steps > limits.max_mcmc_steps:
        raise PowerSampleError(f"--mcmc-steps ({config.mcmc_steps}) exceeds --max-mcmc-steps ({limits.max_mcmc_steps})")
    members = registry.members(config)
    if members > limits.max_members:
        raise PowerSampleError(
            f"--{registry.member_field(config)} gives {members} sequences per chain, over "
            f"--max-members ({limits.max_members})"
        )
    if members * config.max_new_tokens > limits.max_work:
        raise PowerSampleError(
            f"one chain's sequences x --max-new-tokens ({members * config.max_new_tokens}) "
            f"exceeds --max-work ({limits.max_work})"
        )


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
        print(
            f"powersample: warning: serving on {host} without --api-key: anyone who can reach it can use it",
            file=sys.stderr,
        )
