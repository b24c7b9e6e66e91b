"""The fidelity plots: TV (toy) or log-likelihood per token (model) against what it cost, one curve per sweep, and a
dotted line at the matched token budget (budget.py). A toy result has one figure with a panel per target, and one
figure per target.
Rendered to palette PNG bytes through powersample.plots, the one PNG path it shares with `powersample report`."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from powersample.plots import new_figure, png_bytes

MISSING = "the fidelity plot needs matplotlib: pip install 'powersample[eval]'"


def figure_png(data: dict[str, Any]) -> bytes:
    """The result's plot as a 256-colour PNG."""
    return png_bytes(toy_figure(data) if data["mode"] == "toy" else model_figure(data), palette=True)


def toy_figure(data: dict[str, Any]) -> Any:
    """TV against tokens per sample (log-log), one panel per target, one curve per method sweep, floor dashed."""
    targets = data["targets"]
    fig = _figure(len(targets), 6.0)
    colors = _colors([p for t in targets for p in t["points"]])
    for ax, t in zip(fig.axes, targets, strict=True):
        for curve, points in _curves(t["points"]).items():
            _plot_curve(ax, points, "tokens_per_sample", "tv", curve, colors[curve])
        ax.axhline(t["floor"], linestyle="--", color="gray", label=f"TV floor: mean of {data['samples']} exact samples")
        _budget_line(ax, t.get("matched"))
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="tokens sampled per sample",
            ylabel="TV to exact p^alpha",
            title=f"{t['spec']} (T={t['max_new_tokens']}, alpha={data['alpha']:g})",
        )
        low, high = ax.get_ylim()
        ax.axhspan(low, t["floor_q95"], color="gray", alpha=0.12, label="within sampling noise (95%)")
        ax.set_ylim(low, high)
        _plain_ticks(ax)
    _legend(fig)
    return fig


def model_figure(data: dict[str, Any]) -> Any:
    """Log-likelihood per token against tokens sampled and against wall per sample, one curve per sweep."""
    fig = _figure(2, 5.0)
    colors = _colors(data["points"])
    for ax, x, label in zip(
        fig.axes,
        ("tokens_per_sample", "wall_per_sample"),
        ("tokens sampled per sample", "wall per sample (s)"),
        strict=True,
    ):
        for curve, points in _curves(data["points"]).items():
            _plot_curve(ax, points, x, "logp_per_token", curve, colors[curve])
        ax.set(xscale="log", xlabel=label, ylabel="base log-likelihood per token")
        if x == "tokens_per_sample":
            _budget_line(ax, data.get("matched"))
        _plain_ticks(ax)
    base = next((p["wall_per_sample"] for p in data["points"] if p["method"] == "base"), None)
    if base:
        fig.axes[1].axvline(2 * base, linestyle="--", color="gray", label="2x the wall of a base sample")
    fig.suptitle(f"{data['backend']['model']}, T={data['max_new_tokens']}, alpha={data['alpha']:g}", fontsize=9)
    _legend(fig)
    return fig


def target_pngs(data: dict[str, Any]) -> dict[str, bytes]:
    """A toy result's plot of each target alone, by the target's spec name."""
    return {t["spec"]: figure_png(data | {"targets": [t]}) for t in data["targets"]}


def _legend(fig: Any) -> None:
    """One legend right of the last panel, with every panel's entries once (the budget line is on some only)."""
    entries: dict[str, Any] = {}
    for ax in fig.axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            entries.setdefault(label, handle)
    fig.axes[-1].legend(
        list(entries.values()), list(entries), fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5)
    )


def _budget_line(ax: Any, matched: dict[str, Any] | None) -> None:
    """A dotted vertical line at the matched token budget (budget.py), when the reference was measured."""
    if matched:
        ref = matched["reference"]
        knobs = " ".join(f"{k}={v}" for k, v in ref["knobs"].items())
        ax.axvline(
            matched["tokens_per_sample"], linestyle=":", color="black", label=f"budget of {ref['method']} {knobs}"
        )


def _curves(points: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for p in points:
        out[p["curve"]].append(p)
    return out


def _colors(points: list[dict[str, Any]]) -> dict[str, Any]:
    """One colour per curve, the same in every panel (tab10, or tab20 past ten curves)."""
    from matplotlib import colormaps

    names = list(dict.fromkeys(p["curve"] for p in points))
    cmap = colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {name: cmap(i % cmap.N) for i, name in enumerate(names)}


def _plain_ticks(ax: Any) -> None:
    """Tick labels like 0.03 and 100 rather than 3x10^-2 on the log axes."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    for axis in (ax.xaxis, ax.yaxis):
        if axis.get_scale() == "log":
            axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            axis.set_minor_formatter(NullFormatter())


def _plot_curve(ax: Any, points: list[dict[str, Any]], x: str, y: str, label: str, color: str) -> None:
    """A line through the points in order of x, each annotated with its swept knob's value."""
    points = sorted(points, key=lambda p: p[x])
    ys = [max(p[y], 1e-4) if y == "tv" else p[y] for p in points]  # a TV of 0 would vanish on a log axis
    ax.plot([p[x] for p in points], ys, marker="o", markersize=4, label=label, color=color)
    for p, yv in zip(points, ys, strict=True):
        if p["swept"]:
            ax.annotate(
                str(p["knobs"][p["swept"]]),
                (p[x], yv),
                fontsize=6,
                xytext=(3, 3),
                textcoords="offset points",
                color=color,
            )


def _figure(panels: int, width: float) -> Any:
    fig = new_figure((width * panels + 2.5, 4.5), 90, MISSING)
    for i in range(panels):
        fig.add_subplot(1, panels, i + 1)
    return fig
