"""`powersample report`: one markdown table over run directories, and the paper's plots.

Rows are (task, method) where the method's label also names the settings that differ between runs of that method
(α, MCMC steps, T, ...). Directories with the same identity (shards written apart) are merged. Plots, written as
PNG (matplotlib, Agg, no pyplot state) per task:

    passk_<task>.png           pass@k against k per method, unbiased estimator over the seeds (paper Fig. 5)
    loglik_<task>.png          histograms of log-likelihood per token per method (Fig. 4)
    confidence_<task>.png      histograms of confidence (Eq. 13) per method (Fig. 4)
    acc_vs_alpha_<task>.png    accuracy against α, when runs differ in α (Fig. 6)
    acc_vs_mcmc_steps_<task>.png   accuracy against MCMC steps, when runs differ in them (Fig. 6)
"""

from __future__ import annotations

import dataclasses
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Protocol, Sequence

from powersample.config import SamplerConfig
from powersample.errors import PowerSampleError
from powersample.eval import metrics
from powersample.eval.records import RUN_FILE, identity_hash, iter_records, read_run, record_key
from powersample.io import write_bytes_atomic
from powersample.plots import new_figure, png_bytes
from powersample.samplers import registry
from powersample.samplers.registry import MCMC_METHODS

LABEL_KEYS = ("alpha", "mcmc_steps", "max_new_tokens", "block_size", "proposal_temperature", "top_k", "top_p")


@dataclass(frozen=True)
class Row:
    """One (task, method) cell: its records and the config they were made with."""

    task: str
    label: str
    config: dict[str, Any]  # SamplerConfig.resolved()
    records: tuple[dict[str, Any], ...]

    @property
    def graded(self) -> list[bool]:
        return [bool(r["correct"]) for r in self.records if r.get("correct") is not None]


class ReportSection(Protocol):
    """Results other than eval runs that the report renders after its table; the caller says which (the command
    line hands it `bench --fidelity`'s, tools.fidelity.report.SECTION), so eval imports no tool."""

    def holds(self, run_dir: Path) -> bool:
        """Whether run_dir holds such results."""

    def render(self, run_dir: Path, plot_dir: Path | None) -> tuple[str, list[Path]]:
        """The section's markdown, and the files it wrote into plot_dir (none when it is None)."""


def build_report(run_dirs: list[Path], plot_dir: Path | None,
                 sections: Sequence[ReportSection] = ()) -> tuple[str, list[Path]]:
    """The markdown table, and the paths of the plots written to plot_dir (none when it is None).

    A directory that a section holds renders as that section; it is an eval run too when it has a run.json.
    """
    eval_dirs = [d for d in run_dirs if not any(s.holds(d) for s in sections) or (d / RUN_FILE).is_file()]
    rows = load_rows(eval_dirs)
    if plot_dir is not None:
        try:
            plot_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise PowerSampleError(f"cannot create plot directory {plot_dir}: {e.strerror}") from None
    rendered = [s.render(d, plot_dir) for d in run_dirs for s in sections if s.holds(d)]
    table = "\n\n".join([markdown_table(rows)] * bool(eval_dirs) + [text for text, _ in rendered])
    if plot_dir is None:
        return table, []
    plots = write_plots(rows, plot_dir) + [p for _, copied in rendered for p in copied]
    write_bytes_atomic(plot_dir / "report.md", (table + "\n").encode())
    return table, plots


def load_rows(run_dirs: list[Path]) -> list[Row]:
    """Read every run, merge runs with the same identity, and label them."""
    merged: dict[str, tuple[dict[str, Any], dict[tuple[str, int], dict]]] = {}
    for run_dir in run_dirs:
        identity = read_identity(run_dir)
        _, records = merged.setdefault(identity_hash(identity), (identity, {}))
        for path, line, r in iter_records(run_dir):
            check_fields(r, RECORD_FIELDS, f"{path} line {line}", "record")
            records.setdefault(record_key(r), r)
    identities = [identity for identity, _ in merged.values()]
    rows = [Row(i["task"], label(i, identities), i["config"], tuple(recs.values())) for i, recs in merged.values()]
    return sorted(rows, key=lambda row: (row.task, row.label))


# What the report reads of a run, checked first so that a damaged or foreign file is a one-line error naming it.
# A type, or a tuple of types where None means the field may be null or absent.
_NUMBER = (int, float)
IDENTITY_FIELDS = {"task": str, "config": dict, "backend": dict, "chat": bool}
CONFIG_FIELDS = {"method": str, "max_new_tokens": int, "block_size": int, "mcmc_steps": int, "alpha": _NUMBER,
                 **{k: (*_NUMBER, None) for k in LABEL_KEYS if k not in ("max_new_tokens", "block_size", "mcmc_steps",
                                                                       "alpha")}}  # fmt: skip
RECORD_FIELDS = {"problem_id": (str, int), "tokens": list, "wall_seconds": _NUMBER, "proposals": int, "accepted": int,
                 "tokens_generated": int, "correct": (bool, None), "logp_per_token": (*_NUMBER, None),
                 "confidence": (*_NUMBER, None)}  # fmt: skip


def read_identity(run_dir: Path) -> dict[str, Any]:
    """run.json's identity, with every field the report uses checked."""
    identity = read_run(run_dir)["identity"]
    where = str(run_dir / RUN_FILE)
    check_fields(identity, IDENTITY_FIELDS, where, "identity")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", identity["task"]):  # it names the plot files
        raise PowerSampleError(f"{where}: identity has a bad 'task' {identity['task'][:40]!r}")
    config = identity["config"]
    check_fields(config, CONFIG_FIELDS, where, "identity.config")
    known = {f.name for f in dataclasses.fields(SamplerConfig)}
    try:  # the one validation of a config: ranges too (a block size of 0 would divide by zero)
        registry.check(SamplerConfig(**{k: v for k, v in config.items() if k in known}))
    except (PowerSampleError, TypeError) as e:
        raise PowerSampleError(f"{where}: identity.config is not a valid sampler config ({e})") from None
    return identity


def check_fields(obj: dict[str, Any], fields: dict[str, Any], where: str, what: str) -> None:
    """A one-line error naming `where` and the first field of `obj` that is missing or of the wrong type."""
    for key, kinds in fields.items():
        kinds = kinds if isinstance(kinds, tuple) else (kinds,)
        value = obj.get(key)
        if value is None and None in kinds:
            continue
        types = tuple(k for k in kinds if k is not None)
        wrong_bool = isinstance(value, bool) and bool not in types
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        sane = not number or abs(value) <= MAX_MAGNITUDE  # False for inf and NaN too; no float conversion
        if value is None or not isinstance(value, types) or wrong_bool or not sane:
            shown = [k for k in kinds if not (k is int and float in kinds)]  # int or float: "a number"
            names = " or ".join("null" if k is None else _TYPE_NAMES[k] for k in shown)
            problem = "has no" if key not in obj else "has a bad"
            raise PowerSampleError(f"{where}: {what} {problem} {key!r} (expected {names})")


MAX_MAGNITUDE = 2**53  # numbers beyond are no measurement: sums and means of them would overflow floats
_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true/false", list: "a list",
               dict: "an object"}  # fmt: skip


def label(identity: dict[str, Any], all_identities: list[dict[str, Any]]) -> str:
    """The method, plus the settings that tell apart runs of the same method (and the model, if it differs).

    A setting is named only when it is not already implied by those named before it, so `alpha=2` does not
    drag along the proposal temperature 1/alpha that follows from it.
    """
    same = [i for i in all_identities if i["config"]["method"] == identity["config"]["method"]]
    shown: list[str] = []
    for key in LABEL_KEYS:
        before = {tuple(i["config"].get(k) for k in shown) for i in same}
        if len({tuple(i["config"].get(k) for k in (*shown, key)) for i in same}) > len(before):
            shown.append(key)
    parts = [identity["config"]["method"], *(f"{k}={identity['config'].get(k)}" for k in shown)]
    if len({repr(i["backend"]) for i in same}) > 1:
        parts.append(f"model={identity['backend'].get('model') or identity['backend'].get('name')}")
    if len({i["chat"] for i in same}) > 1:
        parts.append("chat" if identity["chat"] else "raw")
    return " ".join(parts)


HEADER = ("task", "method", "n", "accuracy (95% CI)", "mean length", "log-lik/token", "confidence", "acceptance",
          "tokens sampled / Eq. 12", "wall")  # fmt: skip


def markdown_table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(row_cells(row)) + " |" for row in rows]
    return "\n".join(lines)


def row_cells(row: Row) -> list[str]:
    """The table cells of one row."""
    recs = row.records
    return [
        row.task, row.label, str(len(recs)), accuracy_cell(row.graded),
        _num(metrics.mean([len(r["tokens"]) for r in recs]), ".1f"),
        _num(metrics.mean([r.get("logp_per_token") for r in recs]), ".3f"),
        _num(metrics.mean([r.get("confidence") for r in recs]), ".3f"),
        acceptance_cell(row), tokens_cell(row), _duration(sum(r["wall_seconds"] for r in recs)),
    ]  # fmt: skip


def accuracy_cell(graded: list[bool]) -> str:
    if not graded:
        return "—"
    low, high = metrics.wilson_interval(sum(graded), len(graded))
    return f"{sum(graded) / len(graded):.3f} [{low:.3f}, {high:.3f}]"


def acceptance_cell(row: Row) -> str:
    proposals = sum(r["proposals"] for r in row.records)
    return f"{sum(r['accepted'] for r in row.records) / proposals:.3f}" if proposals else "—"


def tokens_cell(row: Row) -> str:
    c = row.config
    mcmc = c["method"] in MCMC_METHODS
    estimate = metrics.estimated_tokens(c["max_new_tokens"], c["block_size"], c["mcmc_steps"], mcmc)
    return f"{_num(metrics.mean([r['tokens_generated'] for r in row.records]), '.1f')} / {estimate:.1f}"


def _num(value: float | None, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


# --- plots -----------------------------------------------------------------------------------------------------


def write_plots(rows: list[Row], plot_dir: Path) -> list[Path]:
    """Every plot that the rows support, per task."""
    written = []
    by_task: dict[str, list[Row]] = defaultdict(list)
    for row in rows:
        by_task[row.task].append(row)
    for task, task_rows in by_task.items():
        for name, fig in _task_figures(task, task_rows):
            path = plot_dir / f"{name}_{task}.png"
            _save(fig, path)
            written.append(path)
    return written


def _task_figures(task: str, rows: list[Row]) -> Iterable[tuple[str, Any]]:
    if any(row.graded for row in rows):
        yield "passk", pass_at_k_figure(task, rows)
    yield "loglik", histogram_figure(task, rows, "logp_per_token", "log-likelihood per token (nats)")
    if any(r.get("confidence") is not None for row in rows for r in row.records):
        yield "confidence", histogram_figure(task, rows, "confidence", "confidence (Eq. 13)")
    for key in ("alpha", "mcmc_steps"):
        if _varies(rows, key):
            yield f"acc_vs_{key}", sweep_figure(task, rows, key)


def pass_at_k_curve(records: Iterable[dict[str, Any]]) -> list[tuple[int, float]]:
    """(k, mean pass@k over problems) for k = 1 .. the most samples any problem has."""
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for r in records:
        if r.get("correct") is not None:
            counts[r["problem_id"]][0] += 1
            counts[r["problem_id"]][1] += bool(r["correct"])
    most = max((n for n, _ in counts.values()), default=0)
    curve = [(k, metrics.mean_pass_at_k([tuple(v) for v in counts.values()], k)) for k in range(1, most + 1)]
    return [(k, v) for k, v in curve if v is not None]


def pass_at_k_figure(task: str, rows: list[Row]) -> Any:
    fig, ax = _figure()
    for row in rows:
        curve = pass_at_k_curve(row.records)
        if curve:
            ax.plot([k for k, _ in curve], [v for _, v in curve], marker="o", label=row.label)
    ax.set(xlabel="k", ylabel="pass@k", title=f"{task}: pass@k", ylim=(0, 1.02))
    _integer_k_axis(ax, max((len(line.get_xdata()) for line in ax.get_lines()), default=1))
    ax.legend(fontsize=8)
    return fig


def histogram_figure(task: str, rows: list[Row], key: str, xlabel: str) -> Any:
    """Overlaid histograms of one per-sample quantity, on bins shared by all methods so they compare."""
    import numpy as np

    fig, ax = _figure()
    values = {row.label: [r[key] for r in row.records if r.get(key) is not None] for row in rows}
    pooled = [v for vs in values.values() for v in vs]
    bins = np.histogram_bin_edges(pooled, bins=min(30, max(5, len(pooled) // 4)))
    for name, vs in values.items():
        if vs:
            ax.hist(vs, bins=bins, alpha=0.5, label=name)
    ax.set(xlabel=xlabel, ylabel="samples", title=f"{task}: {xlabel}")
    ax.legend(fontsize=8)
    return fig


SWEEPS = {"alpha": ("power", "low-temp"), "mcmc_steps": ("power", "max-swap")}  # methods each setting affects


def sweep_figure(task: str, rows: list[Row], key: str) -> Any:
    """Accuracy with its Wilson interval against one setting, a line per method it affects; others as references."""
    fig, ax = _figure()
    for method, points in _sweep_points(rows, key).items():
        xs, accs = [x for x, _ in points], [sum(g) / len(g) for _, g in points]
        if method not in SWEEPS[key]:
            ax.axhline(accs[0], linestyle="--", color="gray", label=f"{method} (reference)")
            continue
        bounds = [metrics.wilson_interval(sum(g), len(g)) for _, g in points]
        errors = [[a - lo for a, (lo, _) in zip(accs, bounds, strict=True)],
                  [hi - a for a, (_, hi) in zip(accs, bounds, strict=True)]]  # fmt: skip
        ax.errorbar(xs, accs, yerr=errors, marker="o", capsize=3, label=method)
    ax.set(xlabel=key.replace("_", " "), ylabel="accuracy", title=f"{task}: accuracy against {key}", ylim=(0, 1.02))
    ax.legend(fontsize=8)
    return fig


def _sweep_points(rows: list[Row], key: str) -> dict[str, list[tuple[float, list[bool]]]]:
    """Per method, (setting, verdicts) sorted by setting."""
    by_method: dict[str, list[tuple[float, list[bool]]]] = defaultdict(list)
    for row in rows:
        if row.graded:
            by_method[row.config["method"]].append((row.config[key], row.graded))
    return {m: sorted(points, key=lambda p: p[0]) for m, points in by_method.items()}


def _varies(rows: list[Row], key: str) -> bool:
    """Whether graded runs of a method that `key` affects differ in it."""
    points = _sweep_points(rows, key)
    return any(len({x for x, _ in points.get(m, [])}) > 1 for m in SWEEPS[key])


def _integer_k_axis(ax: Any, most: int) -> None:
    """Integer ticks for k; a log2 scale once there are many (the paper plots k up to 16)."""
    from matplotlib.ticker import MaxNLocator, ScalarFormatter

    if most > 8:
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _figure() -> tuple[Any, Any]:
    fig = new_figure((6, 4), 100, "plots need matplotlib: pip install 'powersample[eval]' (or use --no-plots)")
    return fig, fig.add_subplot()


def _save(fig: Any, path: Path) -> None:
    """Render the PNG (powersample.plots: Agg, no pyplot, no display) and write it atomically."""
    write_bytes_atomic(path, png_bytes(fig))
