"""The command line: `powersample sample | eval | report | bench | serve | conformance`, one module per subcommand, and
`options.py` for the options they share. The top layer: nothing in the library imports it."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from powersample.cli.bench import add_bench_parser
from powersample.cli.conformance import add_conformance_parser
from powersample.cli.eval import add_eval_parsers
from powersample.cli.sample import add_sample_parser
from powersample.cli.serve import add_serve_parser
from powersample.errors import PowerSampleError
from powersample.io import quiet_notices

EXIT_USAGE = 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with quiet_notices(getattr(args, "quiet", False)):  # report has no --quiet
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="powersample", description="Sample from p(x)^alpha of a language model.")
    sub = parser.add_subparsers(dest="command", required=True)
    add_sample_parser(sub)
    add_bench_parser(sub)
    add_eval_parsers(sub)
    add_serve_parser(sub)
    add_conformance_parser(sub)
    return parser


def _drop_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush does not fail on the closed pipe again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a real file (tests); nothing to flush
        pass
    finally:
        os.close(devnull)
