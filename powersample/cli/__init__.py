"""The command line: `powersample sample | eval | report | bench | serve | conformance | lm-eval`, one module per
subcommand, and `options.py` for the options they share (`lm-eval` passes every argument after it to lm-eval's own
command line). The top layer: nothing in the library imports it."""

from __future__ import annotations

import argparse
import errno
import os
import sys
from typing import Sequence

from powersample.cli.bench import add_bench_parser
from powersample.cli.conformance import add_conformance_parser
from powersample.cli.eval import add_eval_parsers
from powersample.cli.lm_eval import add_lm_eval_parser, passthrough
from powersample.cli.sample import add_sample_parser
from powersample.cli.serve import add_serve_parser
from powersample.errors import PowerSampleError
from powersample.io import quiet_notices

EXIT_USAGE = 2
SILENT_COMMANDS = {"serve"}  # nothing on stdout: a closed one loses nothing
DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO}  # a write the disk refused


def main(argv: Sequence[str] | None = None) -> int:
    ours, theirs = passthrough(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(ours)
    if theirs:
        args.lm_eval_args = theirs
    never_opened = _hold_closed_stdout()
    try:
        with quiet_notices(getattr(args, "quiet", False)):  # report has no --quiet
            code = args.handler(args)
        if not never_opened:
            sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's final flush
        elif args.command not in SILENT_COMMANDS:  # `>&-`: as a pipe closed before the first line
            raise BrokenPipeError
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
    except OSError as e:
        if e.errno not in DISK_ERRORS:
            raise
        _drop_stdout()  # stdout on the full disk: its final flush would fail again
        print(f"powersample: error: cannot write: {e.strerror}", file=sys.stderr)
        return EXIT_USAGE


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="powersample", description="Sample from p(x)^alpha of a language model.")
    sub = parser.add_subparsers(dest="command", required=True)
    add_sample_parser(sub)
    add_bench_parser(sub)
    add_eval_parsers(sub)
    add_serve_parser(sub)
    add_conformance_parser(sub)
    add_lm_eval_parser(sub)
    return parser


def _hold_closed_stdout() -> bool:
    """Whether stdout was never opened (`>&-`: sys.stdout is None). Then descriptor 1 is put on /dev/null, so that no
    file this process opens later (a records file) takes descriptor 1 and receives what is meant for stdout."""
    if sys.stdout is not None:
        return False
    try:
        os.fstat(1)
    except OSError:  # closed: the next descriptor opened would be 1 (or 0, when stdin is closed too)
        devnull = os.open(os.devnull, os.O_WRONLY)
        if devnull != 1:
            os.dup2(devnull, 1)
            os.close(devnull)
    return True


def _drop_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush does not fail on the closed pipe again."""
    if sys.stdout is None:  # never opened: nothing to flush
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a real file (tests); nothing to flush
        pass
    finally:
        os.close(devnull)
