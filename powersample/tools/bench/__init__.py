"""`powersample bench`: how fast power sampling runs next to plain decoding and next to regenerating from scratch.

Phases, in this order, on the same prompts with the same seeds (prompt i uses seed + i everywhere):

    plain-1    method `base`, 1 chain per prompt                    the backend's decoding rate at batch 1
    plain-K    method `base`, K chains per prompt                   ... at batch K: the limit for K chains
    power-K    the MCMC config, K chains per prompt (batched), speculation off
    speculative-K  power-K with speculative proposals (--speculate, default 8): the same samples, other forwards
    power-1    the MCMC config, 1 chain per prompt, speculation off
    speculative-1  power-1 with speculative proposals
    scratch-1  power-1 on a second backend loaded with reuse_cache=False: every request prefills its whole
               context from an empty cache, one request at a time (the paper's approach)

Rates count every sampled token, rejected proposals included (`SampleRecord.tokens_generated`), over the
sampling wall (`SampleRecord.wall_seconds`: model loading and tokenization excluded). Each backend first samples
a few tokens untimed (warm-up). Over repeats, a phase reports the median wall and the median token count.
Peak RSS is `ru_maxrss` after each phase; the second backend is loaded only after speculative-1, so the peaks of
the first six phases hold one model.

One concern per module, in the order data flows:

    options.py   BenchOptions (validated once), the built-in prompts, a prompt file
    phases.py    the five phases; CallStats (one sample() call) and PhaseResult (its medians over repeats)
    run.py       run_bench: loading, warm-up, the phases' calls, progress and the partial result after each call
    result.py    BenchResult and its JSON
    eq12.py      Eq. 12's estimate (samplers.power.eq12_tokens) next to the tokens actually sampled
    targets.py   the ratios a run is judged by, met or missed
    table.py     the printed tables (bench's, and bench --engines')
    files.py     the result file: checked writable first, rewritten atomically (powersample.io)
    engines.py   bench --engines: engine configurations side by side, taking turns, with their KL divergence

The machine description (CPUs, torch, RSS) is tools.machine, shared with bench --fidelity; the command line is
powersample.cli.bench.
"""

from powersample.tools.bench.eq12 import eq12_summary, eq12_tokens_per_sample, expected_tokens_full_length
from powersample.tools.bench.files import check_writable, write_json
from powersample.tools.bench.options import PROMPTS, WARMUP_TOKENS, BenchOptions, pick_prompts, read_prompts
from powersample.tools.bench.phases import CallStats, Phase, PhaseResult, phases
from powersample.tools.bench.result import BenchResult, backend_dict
from powersample.tools.bench.run import run_bench, run_call, total_work_units, warm_up
from powersample.tools.bench.table import format_table
from powersample.tools.bench.targets import Target

__all__ = [
    "PROMPTS",
    "WARMUP_TOKENS",
    "BenchOptions",
    "BenchResult",
    "CallStats",
    "Phase",
    "PhaseResult",
    "Target",
    "backend_dict",
    "check_writable",
    "eq12_summary",
    "eq12_tokens_per_sample",
    "expected_tokens_full_length",
    "format_table",
    "phases",
    "pick_prompts",
    "read_prompts",
    "run_bench",
    "run_call",
    "total_work_units",
    "warm_up",
    "write_json",
]
