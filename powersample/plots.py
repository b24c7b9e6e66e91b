"""The one way a plot becomes a PNG: a matplotlib Figure on the Agg canvas (no pyplot state, no display), laid out
tight and saved to bytes, optionally with a 256-colour palette. `powersample report` (eval) and `bench --fidelity`
(tools) both draw through here; the caller writes the bytes (powersample.io.write_bytes_atomic).

matplotlib is an optional dependency (the `eval` extra): it is imported when a figure is made, and its absence is
the caller's one-line error."""

from __future__ import annotations

import io
from typing import Any

from powersample.errors import PowerSampleError


def new_figure(size: tuple[float, float], dpi: int, missing: str) -> Any:
    """An empty matplotlib Figure; `missing` is the PowerSampleError's message when matplotlib is not installed."""
    try:
        from matplotlib.figure import Figure
    except ModuleNotFoundError:
        raise PowerSampleError(missing) from None
    return Figure(figsize=size, dpi=dpi)


def png_bytes(fig: Any, palette: bool = False) -> bytes:
    """The figure as PNG bytes, rendered with the Agg canvas after tight_layout; `palette`: quantized (see below)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return palette_png(buffer.getvalue()) if palette else buffer.getvalue()


def palette_png(png: bytes) -> bytes:
    """The same image with a 256-colour palette: about 4x smaller, and a plot's few colours survive (octree)."""
    from PIL import Image  # a matplotlib dependency

    image = Image.open(io.BytesIO(png)).convert("RGB")
    buffer = io.BytesIO()
    image.quantize(colors=256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE).save(
        buffer, format="PNG", optimize=True
    )
    return buffer.getvalue()
