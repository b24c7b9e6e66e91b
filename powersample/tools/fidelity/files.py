"""A fidelity run's files in its output directory: fidelity_<mode>.json (rewritten atomically after every
setting, `complete` false until the end), fidelity_<mode>.md (the table) and fidelity_<mode>.png (the plot); in toy
mode also fidelity_toy_<spec>.png, the plot of each target alone."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from powersample.errors import PowerSampleError
from powersample.io import write_bytes_atomic
from powersample.tools.common import write_result_json
from powersample.tools.fidelity.plots import figure_png, target_pngs
from powersample.tools.fidelity.table import render_table


def paths(out_dir: Path, mode: str) -> dict[str, Path]:
    return {ext: out_dir / f"fidelity_{mode}.{ext}" for ext in ("json", "md", "png")}


def target_png(out_dir: Path, spec: str) -> Path:
    """The toy plot of one target alone."""
    return out_dir / f"fidelity_toy_{spec}.png"


def prepare_dir(out_dir: Path) -> None:
    """Create the output directory now, and fail now (not after the run) when it cannot be written."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PowerSampleError(f"cannot create output directory {out_dir}: {e.strerror}") from None
    if not os.access(out_dir, os.W_OK):
        raise PowerSampleError(f"cannot write to output directory {out_dir}")


def write_json(out_dir: Path, data: dict[str, Any]) -> None:
    write_result_json(paths(out_dir, data["mode"])["json"], data)


def write_outputs(out_dir: Path, data: dict[str, Any]) -> list[Path]:
    """The JSON, the markdown table and the PNG (and a toy result's PNG per target); returns their paths."""
    files = paths(out_dir, data["mode"])
    write_json(out_dir, data)
    write_bytes_atomic(files["md"], (render_table(data) + "\n").encode())
    write_bytes_atomic(files["png"], figure_png(data))
    singles = target_pngs(data) if data["mode"] == "toy" else {}
    for spec, png in singles.items():
        write_bytes_atomic(target_png(out_dir, spec), png)
    return [*files.values(), *(target_png(out_dir, spec) for spec in singles)]
