"""`powersample report`: one markdown table over run directories, and the paper's plots.

Rows are (task, method) where the method's label also names every setting that differs between runs of that method
(α, MCMC steps, T, ..., the backend, model, quantization, prompt format), and the run's identity hash where two
labels would still read alike: no run is hidden behind another's label in the table or a figure. Directories with
the same identity (shards written apart) are merged. Plots, written as PNG (matplotlib, Agg, no pyplot state) per
task:

    passk_<task>.png           pass@k against k per method, unbiased estimator over the seeds (paper Fig. 5)
    loglik_<task>.png          histograms of log-likelihood per token per method (Fig. 4)
    confidence_<task>.png      histograms of confidence (Eq. 13) per method (Fig. 4)
    acc_vs_alpha_<task>.png    accuracy against α, when runs differ in α (Fig. 6)
    acc_vs_mcmc_steps_<task>.png   accuracy against MCMC steps, when runs differ in them (Fig. 6)
    acc_vs_temperature_<task>.png  accuracy and log-likelihood per token against the temperature drawn at, when
                                   runs of a method differ in nothing else
    lengths_<task>.png         generated length per method (p^alpha favours answers that end early)

After the table come its sections: paired comparisons between rows of one task on the (problem, seed) items both
graded (eval.paired); maj@k beside pass@k, and each `eval --vote-match` run against the run it matched
(eval.vote_report); and each row's distribution of output lengths with the share that ended in EOS. A run of
--vote-match is labelled `vote <method>`: its records are votes.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol, Sequence

from powersample.config import SHARED_FIELDS, SPECS, TYPES, SamplerConfig
from powersample.errors import PowerSampleError
from powersample.eval import metrics, paired
from powersample.eval.records import (
    NUMBER,
    RUN_FILE,
    check_fields,
    check_record,
    identity_hash,
    iter_records,
    read_run,
    record_key,
)
from powersample.eval.rows import Row, grid, method_name, num_cell, row_pairs
from powersample.eval.vote_report import voting_sections
from powersample.io import write_bytes_atomic
from powersample.plots import new_figure, png_bytes
from powersample.samplers import registry
from powersample.samplers.registry import MCMC_METHODS, METHODS, PLAIN_METHODS

# the order a label names the sampler's settings in: the paper's two axes (Fig. 6), then the declaration order
LABEL_KEYS = ("alpha", "mcmc_steps", *(name for name in SHARED_FIELDS if name not in ("method", "alpha", "mcmc_steps")))


class ReportSection(Protocol):
    """Results other than eval runs that the report renders after its table; the caller says which (the command
    line hands it `bench --fidelity`'s, tools.fidelity.report.SECTION), so eval imports no tool."""

    def holds(self, run_dir: Path) -> bool:
        """Whether run_dir holds such results."""

    def render(self, run_dir: Path, plot_dir: Path | None) -> tuple[str, list[Path]]:
        """The section's markdown, and the files it wrote into plot_dir (none when it is None)."""


def build_report(
    run_dirs: list[Path], plot_dir: Path | None, sections: Sequence[ReportSection] = ()
) -> tuple[str, list[Path]]:
    """The markdown table, and the paths of the plots written to plot_dir (none when it is None).

    A directory that a section holds renders as that section; it is an eval run too when it has a run.json.
    """
    eval_dirs = [d for d in run_dirs if not any(s.holds(d) for s in sections) or (d / RUN_FILE).is_file()]
    rows = load_rows(eval_dirs)
    if plot_dir is not None:
        make_plot_dir(plot_dir)
    rendered = [s.render(d, plot_dir) for d in run_dirs for s in sections if s.holds(d)]
    table = "\n\n".join([eval_markdown(rows)] * bool(eval_dirs) + [text for text, _ in rendered])
    if plot_dir is None:
        return table, []
    plots = write_plots(rows, plot_dir) + [p for _, copied in rendered for p in copied]
    write_bytes_atomic(plot_dir / "report.md", (table + "\n").encode())
    return table, plots


def make_plot_dir(plot_dir: Path) -> None:
    try:
        plot_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PowerSampleError(f"cannot create plot directory {plot_dir}: {e.strerror}") from None


def load_rows(run_dirs: list[Path]) -> list[Row]:
    """Read every run, merge runs with the same identity, and label them."""
    merged: dict[str, tuple[dict[str, Any], dict[tuple[str, int], dict]]] = {}
    for run_dir in run_dirs:
        identity = read_identity(run_dir)
        _, records = merged.setdefault(identity_hash(identity), (identity, {}))
        for path, line, r in iter_records(run_dir):
            check_record(r, f"{path} line {line}")
            records.setdefault(record_key(r), r)
    identities = [identity for identity, _ in merged.values()]
    rows = [Row(i["task"], label(i, identities), i["config"], tuple(recs.values()), i) for i, recs in merged.values()]
    return sorted(unique_labels(rows), key=lambda row: (row.task, row.label))


def _kinds(kind: type, nullable: bool) -> tuple:
    """check_fields' kinds of a SamplerConfig field of type `kind` (a float may be written as an integer)."""
    return (*(NUMBER if kind is float else (kind,)), *((None,) if nullable else ()))


# What the report reads of a run, checked first so that a damaged or foreign file is a one-line error naming it
# (check_fields' kinds; a record's are the records module's RECORD_FIELDS, which the runner writes by).
IDENTITY_FIELDS = {"task": str, "config": dict, "backend": dict, "chat": bool}
_NEEDED = ("method", "max_new_tokens", "block_size", "mcmc_steps", "alpha")  # what the report computes with
CONFIG_FIELDS = {name: _kinds(TYPES[name], name not in _NEEDED) for name in SPECS}


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


def label(identity: dict[str, Any], all_identities: list[dict[str, Any]]) -> str:
    """The method, plus every setting that tells apart runs of the same method: the sampler's settings first
    (LABEL_KEYS, then the others), then the backend's (engine, model, quantization, device, dtype, ...), the prompt
    format, and the rest of the identity (data, grading).

    A setting is named only when it is not already implied by those named before it, so `alpha=2` does not drag
    along the proposal temperature 1/alpha that follows from it. Runs whose identities differ always get different
    settings named; their labels can still read alike (two models of one file name), which `unique_labels` settles.
    """
    name = method_name(identity["config"]["method"], identity)
    same = [_settings(i) for i in all_identities if method_name(i["config"]["method"], i) == name]
    shown: list[str] = []
    for key in sorted({k for s in same for k in s}, key=_setting_order):
        before = {tuple(s.get(k) for k in shown) for s in same}
        if len({tuple(s.get(k) for k in (*shown, key)) for s in same}) > len(before):
            shown.append(key)
    mine = _settings(identity)
    return " ".join([name, *(_named(key, mine.get(key)) for key in shown)])


def _settings(identity: dict[str, Any]) -> dict[str, Any]:
    """The identity as flat (section, key) settings: ("config", "alpha"), ("backend", "model"), ("chat", ""), ..."""
    out: dict[str, Any] = {}
    for section, value in identity.items():
        if section == "task":  # the table's own column
            continue
        items = value.items() if isinstance(value, dict) else [("", value)]
        out.update({(section, key): json.dumps(v, sort_keys=True) for key, v in items})
    return out


BACKEND_KEYS = ("name", "model", "toy_spec", "quant", "device", "dtype")  # the order the backend's settings show in


def _setting_order(key: tuple[str, str]) -> tuple:
    section, name = key
    if section == "config":
        return (0, LABEL_KEYS.index(name) if name in LABEL_KEYS else len(LABEL_KEYS), name)
    if section == "backend":
        return (1, BACKEND_KEYS.index(name) if name in BACKEND_KEYS else len(BACKEND_KEYS), name)
    return (2 if section == "chat" else 3, 0, section + name)


def _named(key: tuple[str, str], encoded: str | None) -> str:
    """One setting in a label: `alpha=2.0`, `backend=llamacpp`, `model=<file name>`, `chat` or `raw`, ..."""
    section, name = key
    value = None if encoded is None else json.loads(encoded)
    if section == "chat":
        return "chat" if value else "raw"
    if (section, name) == ("backend", "name"):
        name = "backend"
    elif (section, name) == ("backend", "model") and isinstance(value, str):
        value = Path(value).name or value
    name = name or section
    text = "default" if value is None else value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return f"{name}={text if len(text) <= MAX_VALUE else text[: MAX_VALUE - 1] + '…'}"


MAX_VALUE = 40  # characters of a setting's value in a label


def unique_labels(rows: list[Row]) -> list[Row]:
    """The rows, a label that several rows of one task would share suffixed with its run's identity hash, so no row
    is told apart from another by nothing (a figure's legend, the paired comparisons)."""
    seen: dict[tuple[str, str], int] = defaultdict(int)
    for row in rows:
        seen[row.task, row.label] += 1
    return [
        dataclasses.replace(row, label=f"{row.label} ({identity_hash(row.identity)})")
        if seen[row.task, row.label] > 1
        else row
        for row in rows
    ]


HEADER = (
    "task",
    "method",
    "n",
    "accuracy (95% CI)",
    "mean length",
    "log-lik/token",
    "confidence",
    "acceptance",
    "tokens sampled / Eq. 12",
    "wall",
)


def eval_markdown(rows: list[Row]) -> str:
    """The table, then the paired comparisons, the voting sections (eval.vote_report) and the output lengths (each
    left out when it has no line)."""
    parts = [markdown_table(rows), paired_section(rows), *voting_sections(rows), lengths_section(rows)]
    return "\n\n".join(part for part in parts if part)


def markdown_table(rows: list[Row]) -> str:
    return grid(HEADER, [row_cells(row) for row in rows])


def row_cells(row: Row) -> list[str]:
    """The table cells of one row."""
    recs = row.records
    return [
        row.task,
        row.label,
        str(len(recs)),
        accuracy_cell(row.graded),
        num_cell(metrics.mean([len(r["tokens"]) for r in recs]), ".1f"),
        num_cell(metrics.mean([r.get("logp_per_token") for r in recs]), ".3f"),
        num_cell(metrics.mean([r.get("confidence") for r in recs]), ".3f"),
        acceptance_cell(row),
        tokens_cell(row),
        wall_cell(recs),
    ]


def accuracy_cell(graded: list[bool]) -> str:
    if not graded:
        return "—"
    low, high = metrics.wilson_interval(sum(graded), len(graded))
    return f"{sum(graded) / len(graded):.3f} [{low:.3f}, {high:.3f}]"


def acceptance_cell(row: Row) -> str:
    """MH acceptance; "—" where no MH proposal was made (registry.acceptance_rate)."""
    proposals, accepted = sum(r["proposals"] for r in row.records), sum(r["accepted"] for r in row.records)
    return num_cell(registry.acceptance_rate(row.config["method"], proposals, accepted), ".3f")


def wall_cell(records: Sequence[dict[str, Any]]) -> str:
    """The sampling time (sampling_seconds); "≤" marks an upper bound."""
    seconds, exact = sampling_seconds(records)
    return ("" if exact else "≤") + _duration(seconds)


def sampling_seconds(records: Sequence[dict[str, Any]]) -> tuple[float, bool]:
    """(sampling time summed over batches, whether exact). A record's wall_seconds is its batch's time up to its own
    last chain, so a batch (the records of one batch_id) counts once, at its largest. Records without a batch_id
    (written before it existed) count one by one, which overstates up to --batch times: then not exact."""
    batches: dict[str, float] = {}
    alone = [r["wall_seconds"] for r in records if not isinstance(r.get("batch_id"), str)]
    for r in records:
        if isinstance(r.get("batch_id"), str):
            batches[r["batch_id"]] = max(batches.get(r["batch_id"], 0.0), r["wall_seconds"])
    return sum(batches.values()) + sum(alone), not alone


def tokens_cell(row: Row) -> str:
    c = row.config
    bon = c["method"] == "bon"  # best-of-N spends its budget: Eq. 12's by default, else its own (per record)
    estimate = metrics.estimated_tokens(
        c["max_new_tokens"], c["block_size"], c["mcmc_steps"], bon or c["method"] in MCMC_METHODS
    )
    if bon and c.get("bon_tokens"):
        estimate = metrics.mean([r.get("config", c).get("bon_tokens", c["bon_tokens"]) for r in row.records])
    if "vote_match" in row.identity:  # a vote spends its matched budget
        estimate = metrics.mean([r["vote"]["budget"] for r in row.records if r.get("vote")]) or estimate
    return f"{num_cell(metrics.mean([r['tokens_generated'] for r in row.records]), '.1f')} / {estimate:.1f}"


# --- paired comparisons and output lengths -------------------------------------------------------------------

PAIRED_HEADER = (
    "task",
    "A",
    "B",
    "n (problems)",
    "accuracy A",
    "accuracy B",
    "B − A (95% CI)",
    "A only / B only",
    "McNemar p",
)
PAIRED_NOTE = (
    "B − A: paired bootstrap over problems (all seeds of a problem resampled together). McNemar's exact "
    "test counts the discordant items as independent, which seeds of one problem are not: with several "
    "seeds per problem read the interval."
)


def paired_section(rows: list[Row]) -> str:
    """B against A for pairs of rows of a task, on the (problem, seed) items both graded; "" when there are none."""
    compared = [(a, b, result) for a, b in row_pairs(rows) if (result := paired.compare(a.verdicts, b.verdicts))]
    if not compared:
        return ""
    cells = [paired_cells(a, b, result) for a, b, result in compared]
    several = any(result.n > result.clusters for _, _, result in compared)
    return "\n\n".join(["## Paired comparisons", grid(PAIRED_HEADER, cells)] + [PAIRED_NOTE] * several)


def paired_cells(a: Row, b: Row, result: paired.Paired) -> list[str]:
    low, high = result.interval
    return [
        a.task,
        a.label,
        b.label,
        f"{result.n} ({result.clusters})",
        f"{result.accuracy_a:.3f}",
        f"{result.accuracy_b:.3f}",
        f"{result.difference:+.3f} [{low:+.3f}, {high:+.3f}]",
        f"{result.a_only} / {result.b_only}",
        f"{result.p_value:.3g}",
    ]


LENGTH_HEADER = ("task", "method", "n", "mean", "median", "10%", "90%", "ended in EOS")


def lengths_section(rows: list[Row]) -> str:
    """Generated tokens per sample (the final EOS included, as in the table's mean length), per row."""
    cells = [length_cells(row) for row in rows if row.records]
    return "\n\n".join(["## Output lengths", grid(LENGTH_HEADER, cells)]) if cells else ""


def length_cells(row: Row) -> list[str]:
    lengths = [len(r["tokens"]) for r in row.records]
    median, low, high = metrics.percentiles(lengths, (50, 10, 90))
    eos = eos_share(row.records)
    return [
        row.task,
        row.label,
        str(len(lengths)),
        f"{metrics.mean(lengths):.1f}",
        f"{median:.1f}",
        f"{low:.1f}",
        f"{high:.1f}",
        "—" if eos is None else f"{eos:.3f}",
    ]


def eos_share(records: Iterable[dict[str, Any]]) -> float | None:
    """The share of samples that ended in EOS rather than at max_new_tokens; None when no record says."""
    reasons = [r["finish_reason"] for r in records if r.get("finish_reason") is not None]
    return sum(reason == "eos" for reason in reasons) / len(reasons) if reasons else None


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
            save_figure(fig, path)
            written.append(path)
    return written


def _task_figures(task: str, rows: list[Row]) -> Iterable[tuple[str, Any]]:
    if any(row.graded for row in rows):
        yield "passk", pass_at_k_figure(task, rows)
    yield "loglik", histogram_figure(task, rows, "logp_per_token", "log-likelihood per token (nats)")
    if any(r.get("confidence") is not None for row in rows for r in row.records):
        yield "confidence", histogram_figure(task, rows, "confidence", "confidence (Eq. 13)")
    if any(row.records for row in rows):
        yield "lengths", lengths_figure(task, rows)
    for sweep in SWEEPS:
        if _varies(rows, sweep):
            yield f"acc_vs_{sweep.name}", sweep_figure(task, rows, sweep)


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
    fig, ax = figure()
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

    fig, ax = figure()
    values = [(row.label, [r[key] for r in row.records if r.get(key) is not None]) for row in rows]  # a run each
    pooled = [v for _, vs in values for v in vs]
    bins = np.histogram_bin_edges(pooled, bins=min(30, max(5, len(pooled) // 4)))
    for name, vs in values:
        if vs:
            ax.hist(vs, bins=bins, alpha=0.5, label=name)
    ax.set(xlabel=xlabel, ylabel="samples", title=f"{task}: {xlabel}")
    ax.legend(fontsize=8)
    return fig


def lengths_figure(task: str, rows: list[Row]) -> Any:
    """Generated length per method as boxes: median and quartiles, whiskers at the 10% and 90% points (the
    table's), the mean as a triangle."""
    fig, ax = figure()
    shown = [row for row in rows if row.records]
    ax.boxplot(
        [[len(r["tokens"]) for r in row.records] for row in shown], whis=(10, 90), showmeans=True, showfliers=False
    )
    ax.set_xticks(range(1, len(shown) + 1), [row.label for row in shown], rotation=20, ha="right", fontsize=8)
    ax.set(ylabel="generated tokens", title=f"{task}: output length")
    return fig


def _apart_from_temperature(identity: dict[str, Any]) -> dict[str, Any]:
    """The identity without what only sets the temperature tokens are drawn at: the proposal temperature, and for a
    plain method (one draw from q) alpha too."""
    drop = {"proposal_temperature", *(["alpha"] if identity["config"]["method"] in PLAIN_METHODS else [])}
    return {**identity, "config": {k: v for k, v in identity["config"].items() if k not in drop}}


@dataclass(frozen=True)
class Sweep:
    """A plot of accuracy against one setting of the resolved config (Fig. 6)."""

    key: str  # the config field on the x axis
    name: str  # in the file name, acc_vs_<name>_<task>.png, and on the axis
    methods: tuple[str, ...]  # methods it affects, a line each; the others are drawn as references
    # the identity without the setting: a line holds the runs equal in it, so they differ in nothing else;
    # None: a line holds every run of its method
    apart: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    loglik: bool = False  # a second panel: mean log-likelihood per token against the setting


SWEEPS = (
    Sweep("alpha", "alpha", ("power", "low-temp")),
    Sweep("mcmc_steps", "mcmc_steps", ("power", "max-swap")),
    # what tokens are drawn at (registry.temperature, resolved into the config): every method draws at one
    Sweep("proposal_temperature", "temperature", METHODS, apart=_apart_from_temperature, loglik=True),
)


def sweep_figure(task: str, rows: list[Row], sweep: Sweep) -> Any:
    """Accuracy with its Wilson interval against one setting, a line per method it affects; others as references.
    With `sweep.loglik`, the mean log-likelihood per token beside it."""
    fig, *axes = figure(1 + sweep.loglik)
    for name, points in _sweep_points(rows, sweep).items():
        if points[0][1].config["method"] not in sweep.methods:
            axes[0].axhline(_accuracy(points[0][1]), linestyle="--", color="gray", label=f"{name} (reference)")
            continue
        _accuracy_line(axes[0], name, points)
        if sweep.loglik:
            _loglik_line(axes[1], name, points)
    xlabel = sweep.name.replace("_", " ")
    axes[0].set(xlabel=xlabel, ylabel="accuracy", title=f"{task}: accuracy against {sweep.name}", ylim=(0, 1.02))
    if sweep.loglik:
        axes[1].set(
            xlabel=xlabel, ylabel="mean log-likelihood per token (nats)", title=f"{task}: log-likelihood per token"
        )
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:  # a panel may be empty (no log-likelihoods recorded)
            ax.legend(fontsize=8)
    return fig


def _accuracy(row: Row) -> float:
    return sum(row.graded) / len(row.graded)


def _accuracy_line(ax: Any, name: str, points: list[tuple[float, Row]]) -> None:
    xs, accs = [x for x, _ in points], [_accuracy(row) for _, row in points]
    bounds = [metrics.wilson_interval(sum(row.graded), len(row.graded)) for _, row in points]
    errors = [
        [a - lo for a, (lo, _) in zip(accs, bounds, strict=True)],
        [hi - a for a, (_, hi) in zip(accs, bounds, strict=True)],
    ]
    ax.errorbar(xs, accs, yerr=errors, marker="o", capsize=3, label=name)


def _loglik_line(ax: Any, name: str, points: list[tuple[float, Row]]) -> None:
    means = [(x, metrics.mean([r.get("logp_per_token") for r in row.records])) for x, row in points]
    shown = [(x, m) for x, m in means if m is not None]
    if shown:
        ax.plot([x for x, _ in shown], [m for _, m in shown], marker="o", label=name)


def _sweep_points(rows: list[Row], sweep: Sweep) -> dict[str, list[tuple[float, Row]]]:
    """Per line, (setting, graded row) sorted by setting."""
    graded = [row for row in rows if row.graded]
    by_line: dict[str, list[tuple[float, Row]]] = defaultdict(list)
    for row, name in zip(graded, _line_names(graded, sweep), strict=True):
        by_line[name].append((row.config[sweep.key], row))
    return {name: sorted(points, key=lambda p: p[0]) for name, points in by_line.items()}


def _line_names(rows: list[Row], sweep: Sweep) -> list[str]:
    """Each row's line: its method, or with `sweep.apart` its label among the identities without the setting (and
    the hash of that identity too when runs apart in a setting the label does not name would share a line)."""
    if sweep.apart is None:
        return [method_name(row.config["method"], row.identity) for row in rows]
    others = [sweep.apart(row.identity) for row in rows]
    names, keys = [label(i, others) for i in others], [identity_hash(i) for i in others]
    clash = {n for n in names if len({k for k, m in zip(keys, names) if m == n}) > 1}
    return [f"{n} ({k})" if n in clash else n for n, k in zip(names, keys)]


def _varies(rows: list[Row], sweep: Sweep) -> bool:
    """Whether graded runs on one line of a method the setting affects differ in it."""
    lines = _sweep_points(rows, sweep).values()
    return any(len({x for x, _ in ps}) > 1 for ps in lines if ps[0][1].config["method"] in sweep.methods)


def _integer_k_axis(ax: Any, most: int) -> None:
    """Integer ticks for k; a log2 scale once there are many (the paper plots k up to 16)."""
    from matplotlib.ticker import MaxNLocator, ScalarFormatter

    if most > 8:
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def figure(panels: int = 1) -> tuple[Any, ...]:
    """A figure and its `panels` axes side by side."""
    fig = new_figure((6 * panels, 4), 100, "plots need matplotlib: pip install 'powersample[eval]' (or use --no-plots)")
    return (fig, *(fig.add_subplot(1, panels, i + 1) for i in range(panels)))


def save_figure(fig: Any, path: Path) -> None:
    """Render the PNG (powersample.plots: Agg, no pyplot, no display) and write it atomically."""
    write_bytes_atomic(path, png_bytes(fig))
