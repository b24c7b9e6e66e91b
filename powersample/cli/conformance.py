"""Command line of `powersample conformance`: `--matrix` runs `powersample.tools.matrix`, prints the support table
and writes the JSON; `--gaps` measures how far one backend's log p moves with the shape of its forwards.

Exit status: 0 when every cell built here passes every check that applies (and every conversion agrees), 1 when
one fails, 2 on bad input; `--gaps` measures and exits 0. Register it with `add_conformance_parser(subparsers)`.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from powersample.backends import conformance
from powersample.cli.bench import _bar
from powersample.cli.options import add_backend_options, backend_spec, load
from powersample.errors import PowerSampleError
from powersample.io import check_writable, write_json_atomic
from powersample.tools.matrix import ARCHS, ENGINES, MATRIX_QUANTS, MatrixOptions, render_table, run_matrix, write_json
from powersample.tools.matrix.cells import THREADS
from powersample.tools.matrix.run import total_units

DESCRIPTION = """Run every backend conformance check (powersample.backends.conformance) on a matrix of tiny
random-weight models of the architectures users run, built offline from transformers configs, converted to GGUF and
re-quantized by llama.cpp: every (engine x architecture x quant) cell an engine supports. Prints a Markdown support
table: per cell and check, pass / fail / does not apply, with the reasons, and the cells not built here with why.
The models are built once per machine into the cache (about 10 s each). Exit 1 when a cell fails a check.

--gaps instead loads one backend (the backend options) and measures conformance.batch_invariance_gaps: the same
16-token continuation (a tau = 1/4 proposal) decoded alone, as row 0 of batches of 2, 4 and 8, verified against
drafts at k = 1, 4 and 8, and prefilled by score; per shape, the largest change of log p and of log q against the
lone decode (0: bit-equal)."""
GAPS_PROMPT = "Name the three primary colors of paint, and say why mixing two of them gives a secondary color."


def add_conformance_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `conformance` on the `powersample` subparsers."""
    p = subparsers.add_parser(
        "conformance", help="the conformance checks on a matrix of models (support table)", description=DESCRIPTION
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--matrix", action="store_true", help="run the model matrix")
    mode.add_argument("--gaps", action="store_true", help="measure one backend's log p gaps between forward shapes")
    p.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated (default {','.join(ENGINES)})")
    p.add_argument("--archs", default=",".join(ARCHS), help=f"comma-separated (default {','.join(ARCHS)})")
    p.add_argument(
        "--quants",
        default=",".join(MATRIX_QUANTS),
        help=f"llamacpp's GGUF types, comma-separated (default {','.join(MATRIX_QUANTS)})",
    )
    p.add_argument(
        "--threads",
        type=int,
        help=f"CPU threads of each engine (default: {THREADS} with --matrix, the engine's own with --gaps)",
    )
    p.add_argument("--json", dest="json_path", metavar="PATH", help="write every outcome to this JSON file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_backend_options(p, threads=False)
    p.set_defaults(handler=run_conformance)
    return p


def run_conformance(args: argparse.Namespace) -> int:
    """Run the matrix (0 when it passes, 1 when a built cell fails a check), or measure --gaps (0)."""
    if args.gaps:
        return run_gaps(args)
    if not args.matrix:
        raise PowerSampleError("give --matrix (the model matrix) or --gaps (one backend's batch-invariance gaps)")
    options = MatrixOptions(
        _names(args.engines), _names(args.archs), _names(args.quants), THREADS if args.threads is None else args.threads
    )
    if args.json_path:
        check_writable(args.json_path)
    with _bar(total_units(options), "matrix", "unit", args.quiet) as update:
        result = run_matrix(options, update)
    if args.json_path:
        write_json(args.json_path, result)
    print(render_table(result), end="")
    return 0 if result.ok else 1


def run_gaps(args: argparse.Namespace) -> int:
    """Load the backend, print each forward shape's largest |log p change| against the lone decode (and the JSON)."""
    if args.json_path:
        check_writable(args.json_path)
    backend = load(replace(backend_spec(args), threads=args.threads), args.quiet)
    prompt = backend.encode(GAPS_PROMPT)
    gaps = conformance.batch_invariance_gaps(conformance.Subject(backend, prompt))
    layout = getattr(getattr(backend, "layout", None), "label", None)  # llamacpp's decode layout
    worst = {name: max(g[name] for g in gaps.values()) for name in ("base_logp", "proposal_logq")}
    print(
        f"{type(backend).__name__}{f' ({layout} layout)' if layout else ''}, {len(prompt)}-token prompt: largest "
        f"change vs the lone decode, log p {worst['base_logp']:.3g} nats, log q (tau 1/4) "
        f"{worst['proposal_logq']:.3g}\n"
    )
    print(conformance.describe_hints(backend) + "\n")
    print("| forward shape | max abs log p change (nats) | max abs log q change |\n|---|---|---|")
    print(
        "".join(f"| {shape} | {g['base_logp']:.3g} | {g['proposal_logq']:.3g} |\n" for shape, g in gaps.items()), end=""
    )
    if args.json_path:
        write_json_atomic(Path(args.json_path), {"backend": type(backend).__name__, "layout": layout, "gaps": gaps})
    return 0


def _names(text: str) -> tuple[str, ...]:
    """'a, b,c' -> ('a', 'b', 'c')."""
    return tuple(name.strip() for name in text.split(",") if name.strip())
