"""The machine a run measured on, for the result JSON: CPUs, platform, Python, torch, load and peak memory."""

from __future__ import annotations

import os
import platform
import resource
import sys
from typing import Any

from powersample.backends.base import Backend


def machine_info(load_average: tuple[float, ...]) -> dict[str, Any]:
    """CPUs, platform, Python, torch (if installed), the load when the run started."""
    return {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor(),
        "python": platform.python_version(),
        "torch": torch_info(),
        "load_average_start": list(load_average),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }


def torch_info() -> dict[str, Any] | None:
    """torch's version, and its thread count once a backend imported it (the toy bench never imports torch)."""
    from importlib import metadata

    try:
        version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        return None
    torch = sys.modules.get("torch")
    return {"version": version, "threads": torch.get_num_threads() if torch else None}


def peak_rss_kb() -> int:
    """The process's peak resident memory so far (ru_maxrss: KB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def device_of(backend: Backend) -> str | None:
    """Where the backend runs, when it says (hf has a device; the toy backend does not)."""
    device = getattr(backend, "device", None)
    return None if device is None else str(device)
