"""`powersample bench --fidelity`: how close each sampler gets to p^alpha, against what it costs.

Two modes, one list of settings each (a method plus the knobs it sweeps); a method with no registered sampler in
this version is skipped and named in the output, never given a number.

    toy     On exact toy targets: per setting, TV(empirical law of S samples, exact p^alpha) against tokens sampled
            per sample, next to the TV floor of S exact samples (toy.py).
    model   On a real model (the embedded one by default): per setting, base log-likelihood per token against
            tokens sampled and wall per sample (model.py).

Both also put every curve at one token budget, a reference setting's (budget.py), so that methods are compared at
equal cost.

One concern per module:

    exact.py     the exact p^alpha law over an enumerable toy spec, empirical laws, TV distance and its floor
                 (also the tests' exact laws: tests/exact_laws.py imports them)
    settings.py  the sweeps: Setting, the toy and model lists, which methods have a registered sampler
    options.py   FidelityOptions (validated once), ToyTarget (a shipped spec or a JSON file), the result header
    toy.py       toy mode: run_toy, one ToyPoint per setting and target
    model.py     model mode: run_model, the settings taking turns per (prompt, seed)
    budget.py    every curve at one matched token budget (power's, at the settings the issue 26 targets name)
    table.py     the markdown tables
    plots.py     the matplotlib figures (PNG bytes through powersample.plots)
    files.py     the output directory: fidelity_<mode>.{json,md,png} and fidelity_toy_<spec>.png, written atomically
    report.py    the section of `powersample report` (handed to eval's report by the command line)

The command line is powersample.cli.bench.
"""

from powersample.tools.fidelity.budget import matched_budget
from powersample.tools.fidelity.exact import Law, empirical_law, power_law, tv_distance, tv_floor
from powersample.tools.fidelity.files import paths, prepare_dir, target_png, write_json, write_outputs
from powersample.tools.fidelity.model import run_model
from powersample.tools.fidelity.options import DEFAULT_SPECS, FidelityOptions, ToyTarget
from powersample.tools.fidelity.report import SECTION, fidelity_section, has_fidelity
from powersample.tools.fidelity.settings import Setting
from powersample.tools.fidelity.table import render_table
from powersample.tools.fidelity.toy import run_toy

__all__ = [
    "DEFAULT_SPECS",
    "SECTION",
    "FidelityOptions",
    "Law",
    "Setting",
    "ToyTarget",
    "empirical_law",
    "fidelity_section",
    "has_fidelity",
    "matched_budget",
    "paths",
    "power_law",
    "prepare_dir",
    "render_table",
    "run_model",
    "run_toy",
    "target_png",
    "tv_distance",
    "tv_floor",
    "write_json",
    "write_outputs",
]
