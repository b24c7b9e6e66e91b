"""What both tools share: the progress callback, one-line input checks, the untimed warm-up, the run's date and
the result JSON."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any, Callable

from powersample.api import sample
from powersample.backends.base import Backend
from powersample.config import SamplerConfig
from powersample.errors import PowerSampleError
from powersample.io import write_json_atomic

Update = Callable[[str, int], None]  # (what runs now, finished work units): drives a progress bar
WARMUP_TOKENS = 4  # untimed tokens each backend samples first (first-call allocations, lazy initialization)


def check(ok: bool, message: str) -> None:
    """A bad input, as the one-line PowerSampleError `message`."""
    if not ok:
        raise PowerSampleError(message)


def tick(update: Update | None, what: str) -> None:
    """One more unit done, now running `what`."""
    if update:
        update(what, 1)


def warm_up(backend: Backend, prompt: str, max_new_tokens: int, seed: int, chat: bool) -> None:
    """Sample a few plain tokens untimed, so that first-call costs (allocations, lazy init) stay out of the timings."""
    config = SamplerConfig(method="base", max_new_tokens=min(WARMUP_TOKENS, max_new_tokens))
    sample(backend, prompt, config, seed=seed, chat=chat)


def utc_now() -> str:
    """When a run started: ISO 8601, UTC, to the second."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def write_result_json(path: Path, data: dict[str, Any]) -> None:
    """A tool's result, atomically (io.write_json_atomic): keys in the order they were built, indented by 2, and
    non-finite ratios written as NaN as they always were (a phase with no wall time divides by zero)."""
    write_json_atomic(path, data, sort_keys=False, allow_nan=True)
