"""The documented promises (docs/backends.md), checked on every cell of the matrix, one level above the backend
seam: through the samplers.

- "Same seed, same samples": each MCMC method's records (tokens, their log p, proposals and acceptances) are the
  same with speculation off and on (`--speculate 0` and 8), and a chain's records do not depend on how many chains
  run beside it.
- eval's "records do not depend on --batch": jobs (prompt, seed) sampled together in one engine run (`sample_many`,
  as `eval --batch N` runs them) give each job the records it gets alone.

Both take a conformance Subject, like the backend checks, and compare log p within the subject's tolerance (0 on
llama.cpp: bit for bit). Resuming an eval is tested on the embedded model and a matrix model (tests/test_promises.py),
not per cell: it replays exactly the records a run writes, so it adds nothing a cell could break.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import numpy as np

from powersample.api import SampleRecord, sample, sample_many
from powersample.backends.conformance import Subject
from powersample.config import SamplerConfig

METHODS = ("power", "max-swap", "power-cut", "power-mtm")  # the methods that accept or reject (MH's log r)
CONFIG = SamplerConfig(max_new_tokens=16, block_size=8, mcmc_steps=2, tries=2)  # two blocks, two MH steps each
TEXTS = ("Name the three primary colors of paint.", "Write one sentence about the sea.")  # plain text, no template
SEED = 11


def same_seed_same_samples_at_any_speculation(s: Subject) -> None:
    """Per MCMC method: chain 0 of 3 at speculate 0 is chain 0 alone at speculate 8: other drafts, other batch
    shapes, the same records (see the module docstring; the same request twice is conformance's
    same_generator_same_continuation)."""
    for method in METHODS:
        config = replace(CONFIG, method=method)
        want = _records(s, config, speculate=0, chains=3)[0]
        have = _records(s, config, speculate=8, chains=1)[0]
        _same_record(s, have, want, f"{method}: chain 0 alone at speculate 8 vs of 3 at speculate 0")


def records_do_not_depend_on_the_batch(s: Subject) -> None:
    """Three (prompt, seed) jobs, sampled together by power at speculate 8, give each job the records it gets alone
    at speculate 0."""
    config = replace(CONFIG, method="power", speculate=8)
    jobs = [(TEXTS[0], 1), (TEXTS[1], 2), (TEXTS[0], 3)]
    together = sample_many(s.backend, jobs, config, num_samples=1, chat=False)
    for job, records in zip(jobs, together):
        [alone] = sample_many(s.backend, [job], replace(config, speculate=0), num_samples=1, chat=False)
        for c, (have, want) in enumerate(zip(_ok(records), _ok(alone))):
            _same_record(s, have, want, f"job {job} chain {c}: batched with 2 others vs alone")


PROMISES = (same_seed_same_samples_at_any_speculation, records_do_not_depend_on_the_batch)


def _records(s: Subject, config: SamplerConfig, speculate: int, chains: int) -> list[SampleRecord]:
    return sample(s.backend, TEXTS[0], replace(config, speculate=speculate), seed=SEED, num_samples=chains, chat=False)


def _ok(records: Sequence[SampleRecord] | Exception) -> Sequence[SampleRecord]:
    if isinstance(records, Exception):
        raise records
    return records


def _same_record(s: Subject, have: SampleRecord, want: SampleRecord, what: str) -> None:
    """The same tokens, proposals and acceptances, and log p within the subject's tolerance."""
    for field in ("tokens", "proposals", "accepted"):
        if getattr(have, field) != getattr(want, field):
            raise AssertionError(f"{what}: {field} {getattr(have, field)} vs {getattr(want, field)}")
    np.testing.assert_allclose(have.token_logp, want.token_logp, atol=s.tolerance, rtol=0, err_msg=f"{what}: log p")
