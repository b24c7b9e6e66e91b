"""Fidelity results in `powersample report`: each mode's table and its PNG.

eval's report knows nothing of this tool: it takes report sections (eval.report.ReportSection: `holds(dir)` and
`render(dir, plot_dir)`), and the command line (cli.eval's `report`) hands it SECTION. So eval never imports a tool
and a tool never imports eval.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from powersample.errors import PowerSampleError
from powersample.io import write_bytes_atomic
from powersample.tools.fidelity.files import paths
from powersample.tools.fidelity.options import MODES
from powersample.tools.fidelity.table import render_table


def has_fidelity(path: Path) -> bool:
    """Whether a directory holds fidelity results (fidelity_toy.json or fidelity_model.json)."""
    return any(paths(path, mode)["json"].is_file() for mode in MODES)


def fidelity_section(path: Path, plot_dir: Path | None) -> tuple[str, list[Path]]:
    """Markdown for `powersample report`: each mode's table and its PNG (copied into plot_dir when given, so the
    report's links resolve next to report.md). Returns the markdown and the PNGs copied."""
    parts, copied = [], []
    for mode in MODES:
        files = paths(path, mode)
        if not files["json"].is_file():
            continue
        data = _read_json(files["json"])
        parts += [
            f"## Fidelity per compute ({'exact toy targets' if mode == 'toy' else 'model'}): {path}",
            "",
            render_table(data),
            "",
        ]
        if files["png"].is_file():
            parts += [f"![fidelity per compute, {mode}]({_place_png(files['png'], plot_dir, copied)})", ""]
    return "\n".join(parts).rstrip(), copied


class FidelitySection:
    """The fidelity results of a directory, as a section of `powersample report` (eval.report.ReportSection)."""

    def holds(self, run_dir: Path) -> bool:
        return has_fidelity(run_dir)

    def render(self, run_dir: Path, plot_dir: Path | None) -> tuple[str, list[Path]]:
        return fidelity_section(run_dir, plot_dir)


SECTION = FidelitySection()


def _place_png(png: Path, plot_dir: Path | None, copied: list[Path]) -> str:
    """The link to the PNG: its copy in plot_dir (atomic) when there is one, else the file where it is."""
    if plot_dir is None:
        return str(png)
    target = plot_dir / png.name
    try:
        data = png.read_bytes()
    except OSError as e:
        raise PowerSampleError(f"cannot read {png}: {e.strerror}") from None
    write_bytes_atomic(target, data)
    copied.append(target)
    return target.name


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PowerSampleError(f"cannot read fidelity results {path}: {e}") from None
    if not isinstance(data, dict) or data.get("mode") not in MODES:
        raise PowerSampleError(f"{path} is not a fidelity result (no 'mode' of {', '.join(MODES)})")
    return data
