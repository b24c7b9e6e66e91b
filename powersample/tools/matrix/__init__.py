"""`powersample conformance --matrix`: every conformance check on every (engine x architecture x quant) cell.

Tiny random-weight models of the architectures users run (llama, qwen2, qwen3, gemma2, gemma3, mistral, phi3,
qwen3_moe) are built offline from transformers configs, converted to GGUF by our own writer, re-quantized by
llama.cpp, and each engine that can run a cell runs `powersample.backends.conformance.CHECKS` on it. The result is
a support table: per cell and check, pass / fail (why) / does not apply (why), and the cells not built here (why).

One concern per module:

    archs.py      the architectures: shared shape, each one's config, what llama.cpp needs to know of it
    models.py     building and caching the files: the transformers folder, the F32 GGUF, the quantized copies
    convert.py    our HF -> GGUF writer (metadata per architecture, tensor names and transforms, tokenizer keys)
    agreement.py  is a conversion right: llama.cpp's log p of the F32 GGUF against transformers' fp32 log p
    cells.py      the cells, which this machine can build, and each cell's conformance Subject
    run.py        run_matrix: the runner, and its result dataclasses
    table.py      the Markdown support table and the JSON

The command line is powersample.cli.conformance.
"""

from powersample.tools.matrix.archs import ARCHS, Arch
from powersample.tools.matrix.cells import ENGINES, MATRIX_QUANTS, Cell
from powersample.tools.matrix.run import MatrixOptions, MatrixResult, run_matrix, total_units
from powersample.tools.matrix.table import render_table, write_json

__all__ = [
    "ARCHS",
    "ENGINES",
    "MATRIX_QUANTS",
    "Arch",
    "Cell",
    "MatrixOptions",
    "MatrixResult",
    "render_table",
    "run_matrix",
    "total_units",
    "write_json",
]
