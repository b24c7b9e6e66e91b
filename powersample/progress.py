"""Progress bars on stderr (tqdm), with ETA."""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator

from powersample.config import SamplerConfig
from powersample.samplers import Progress, work_units


@contextlib.contextmanager
def progress_bar(config: SamplerConfig, quiet: bool = False, desc: str = "sampling") -> Iterator[Progress | None]:
    """A tqdm bar over the sampler's work units; yields its update function (None when quiet)."""
    if quiet:
        yield None
        return
    from tqdm import tqdm

    with tqdm(total=work_units(config), desc=desc, unit="round", file=sys.stderr, dynamic_ncols=True) as bar:
        yield bar.update
        bar.update(bar.total - bar.n)  # early stop at EOS finishes the bar
