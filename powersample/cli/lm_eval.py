"""Command line of `powersample lm-eval`: lm-evaluation-harness's own command line, with the model `powersample`
registered (powersample.integrations.lm_eval).

Every argument after `lm-eval` is lm-eval's, handed over unparsed (`powersample lm-eval --help` is lm-eval's help).
Without lm-eval installed it is a one-line error, exit 2. Register it with `add_lm_eval_parser(subparsers)`.
"""

from __future__ import annotations

import argparse
from typing import Sequence

from powersample.errors import PowerSampleError

COMMAND = "lm-eval"
HELP = "lm-evaluation-harness's command line, with --model powersample (every argument is lm-eval's)"


def add_lm_eval_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `lm-eval` on the `powersample` subparsers; `passthrough` supplies its arguments."""
    p = subparsers.add_parser(COMMAND, help=HELP, add_help=False)
    p.set_defaults(handler=run_lm_eval, lm_eval_args=[])
    return p


def passthrough(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(what `powersample`'s parser reads, lm-eval's arguments): after `lm-eval`, everything is lm-eval's, options
    such as --help included, so argparse never sees them."""
    argv = list(argv)
    return (argv[:1], argv[1:]) if argv[:1] == [COMMAND] else (argv, [])


def run_lm_eval(args: argparse.Namespace) -> int:
    try:
        from powersample.integrations import lm_eval  # registers the model `powersample`
    except ModuleNotFoundError as e:
        if not (e.name or "").startswith("lm_eval"):
            raise
        raise PowerSampleError("powersample lm-eval needs lm-evaluation-harness: pip install lm-eval") from None
    return lm_eval.run_cli(args.lm_eval_args)
