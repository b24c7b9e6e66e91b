"""Command line of `powersample conformance --matrix`: parse arguments, run `powersample.tools.matrix`, print the
support table, write the JSON.

Exit status: 0 when every cell built here passes every check that applies (and every conversion agrees), 1 when
one fails, 2 on bad input. Register it with `add_conformance_parser(subparsers)`.
"""

from __future__ import annotations

import argparse

from powersample.cli.bench import _bar
from powersample.errors import PowerSampleError
from powersample.io import check_writable
from powersample.tools.matrix import ARCHS, ENGINES, MATRIX_QUANTS, MatrixOptions, render_table, run_matrix, write_json
from powersample.tools.matrix.cells import THREADS
from powersample.tools.matrix.run import total_units

DESCRIPTION = """Run every backend conformance check (powersample.backends.conformance) on a matrix of tiny
random-weight models of the architectures users run, built offline from transformers configs, converted to GGUF and
re-quantized by llama.cpp: every (engine x architecture x quant) cell an engine supports. Prints a Markdown support
table: per cell and check, pass / fail / does not apply, with the reasons, and the cells not built here with why.
The models are built once per machine into the cache (about 10 s each). Exit 1 when a cell fails a check."""


def add_conformance_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `conformance` on the `powersample` subparsers."""
    p = subparsers.add_parser("conformance", help="the conformance checks on a matrix of models (support table)",
                              description=DESCRIPTION)  # fmt: skip
    p.add_argument("--matrix", action="store_true", help="run the model matrix (the only mode so far)")
    p.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated (default {','.join(ENGINES)})")
    p.add_argument("--archs", default=",".join(ARCHS), help=f"comma-separated (default {','.join(ARCHS)})")
    p.add_argument("--quants", default=",".join(MATRIX_QUANTS),
                   help=f"llamacpp's GGUF types, comma-separated (default {','.join(MATRIX_QUANTS)})")  # fmt: skip
    p.add_argument("--threads", type=int, default=THREADS, help=f"CPU threads of each engine (default {THREADS})")
    p.add_argument("--json", dest="json_path", metavar="PATH", help="write every outcome to this JSON file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=run_conformance)
    return p


def run_conformance(args: argparse.Namespace) -> int:
    """Run the matrix; 0 when it passes, 1 when a built cell fails a check."""
    if not args.matrix:
        raise PowerSampleError("conformance runs on the model matrix only: give --matrix")
    options = MatrixOptions(_names(args.engines), _names(args.archs), _names(args.quants), args.threads)
    if args.json_path:
        check_writable(args.json_path)
    with _bar(total_units(options), "matrix", "unit", args.quiet) as update:
        result = run_matrix(options, update)
    if args.json_path:
        write_json(args.json_path, result)
    print(render_table(result), end="")
    return 0 if result.ok else 1


def _names(text: str) -> tuple[str, ...]:
    """'a, b,c' -> ('a', 'b', 'c')."""
    return tuple(name.strip() for name in text.split(",") if name.strip())
