"""Progress bars on stderr (tqdm), with ETA."""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator

from powersample.config import SamplerConfig
from powersample.samplers import Progress, work_units


@contextlib.contextmanager
def progress_bar(
    config: SamplerConfig, quiet: bool = False, desc: str = "sampling", chains: int = 1
) -> Iterator[Progress | None]:
    """A tqdm bar over the backend requests of `chains` chains; yields its update function (None when quiet)."""
    if quiet:
        yield None
        return
    from tqdm import tqdm

    total = work_units(config) * chains
    with tqdm(total=total, desc=desc, unit="req", file=sys.stderr, dynamic_ncols=True) as bar:
        yield bar.update
        bar.update(bar.total - bar.n)  # chains that stop early at EOS finish the bar
