"""`powersample report --trace FILE [--chain N]`: one chain of a trace (eval.trace), shown three ways.

trace_chain<N>.md     the summary the command prints: stages, steps, acceptance, accepted cuts, acceptance by
                      cut position, final log p, and the final text with the spans of accepted steps in [[...]]
trace_chain<N>.html   the final text token by token, each span coloured by the extension or accepted MH step
                      that wrote it last, with a legend (one self-contained page, every text escaped)
trace_chain<N>.png    log p of the state across extensions and steps (stage boundaries dotted, accepted and
                      rejected steps marked apart); acceptance by relative cut position; power-smc's ESS per block
"""

from __future__ import annotations

import html
import json
import re
from itertools import groupby
from pathlib import Path
from typing import Any

from powersample.eval.report import figure, grid, make_plot_dir, save_figure
from powersample.eval.trace import Replay, acceptance_by_position, replay
from powersample.io import write_bytes_atomic

BINS = 10  # bins of the relative cut position


def trace_report(path: Path, chain: int | None, plot_dir: Path | None) -> tuple[str, list[Path]]:
    """The markdown summary of one chain, and the files written into plot_dir (none when it is None)."""
    replayed = replay(path, chain)
    text = summary(path, replayed)
    if plot_dir is None:
        return text, []
    make_plot_dir(plot_dir)
    stem = plot_dir / f"trace_chain{replayed.chain}"
    md, page, png = (stem.with_name(stem.name + suffix) for suffix in (".md", ".html", ".png"))
    write_bytes_atomic(md, (text + "\n").encode())
    write_bytes_atomic(page, html_page(path, replayed).encode())
    save_figure(trace_figure(replayed), png)
    return text, [md, page, png]


def spans(r: Replay) -> list[tuple[int, str]]:
    """The final text as (write index, text) runs of consecutive tokens that one write left there."""
    runs = groupby(zip(r.writers, r.pieces), key=lambda wp: wp[0])
    return [(writer, "".join(piece for _, piece in run)) for writer, run in runs]


# --- markdown --------------------------------------------------------------------------------------------------

SUMMARY_HEADER = ("stages", "MH steps", "accepted", "acceptance", "final log p", "final tokens", "SMC blocks")


def summary(path: Path, r: Replay) -> str:
    """Markdown: what the chain did, and its final text with the spans of accepted steps in [[...]]."""
    marked = "".join(f"[[{text}]]" if r.writes[w].step is not None else text for w, text in spans(r))
    parts = [
        f"## Trace of chain {r.chain} ({path.name})",
        _about(r.start),
        grid(SUMMARY_HEADER, [_counts(r)]),
        "Accepted cuts (stage.step: cut / length): " + _accepted_cuts(r),
        _position_table(r),
        "Final text; spans written by accepted MH steps are in [[...]]:",
        _fenced(marked),
    ]
    return "\n\n".join(part for part in parts if part)


def _counts(r: Replay) -> list[str]:
    """The cells of SUMMARY_HEADER."""
    steps = r.steps
    accepted = sum(bool(p.accepted) for p in steps)
    return [
        str(len({p.stage for p in r.points})),
        str(len(steps)),
        str(accepted),
        f"{accepted / len(steps):.3f}" if steps else "—",
        "—" if r.logp is None else f"{r.logp:.3f}",
        str(len(r.tokens)),
        str(len(r.ess)),
    ]


def _about(start: dict[str, Any]) -> str:
    """The start event's method, seed and sample, and the prompt's first 200 characters."""
    shown = [f"{key} {start[key]}" for key in ("method", "seed", "sample_index") if key in start]
    prompt = start.get("prompt")
    if isinstance(prompt, str):
        shown.append("prompt " + json.dumps(prompt[:200] + ("…" if len(prompt) > 200 else "")))
    return ", ".join(shown)


def _accepted_cuts(r: Replay) -> str:
    cuts = [f"{p.stage}.{p.step}: {p.cut} / {p.length}" for p in r.steps if p.accepted]
    return ", ".join(cuts) if cuts else "none"


def _position_table(r: Replay) -> str:
    """Acceptance per bin of cut / length; "" without steps."""
    if not r.steps:
        return ""
    cells = [
        [f"{i / BINS:.1f}–{(i + 1) / BINS:.1f}", str(n), str(a), f"{a / n:.3f}" if n else "—"]
        for i, (n, a) in enumerate(acceptance_by_position(r.steps, BINS))
    ]
    return grid(("cut / length", "steps", "accepted", "acceptance"), cells)


def _fenced(text: str) -> str:
    """A code block that the text cannot close: its fence is longer than any run of backticks in it."""
    fence = "`" * max(3, 1 + max((len(run) for run in re.findall(r"`+", text)), default=0))
    return f"{fence}text\n{text}\n{fence}"


# --- html ------------------------------------------------------------------------------------------------------

STYLE = (
    "body{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em}"
    ".text{white-space:pre-wrap;font-family:monospace;line-height:1.7;border:1px solid #ccc;padding:1em}"
    ".step{outline:1px solid #666}.swatch{display:inline-block;width:2em;margin-right:.5em}"
)


def html_page(path: Path, r: Replay) -> str:
    """One self-contained page: the final text, each span coloured by what wrote it, and the legend."""
    body = "".join(_span(r, w, text) for w, text in spans(r))
    title = html.escape(f"chain {r.chain} of {path.name}")
    return (
        f'<!doctype html>\n<html><head><meta charset="utf-8"><title>{title}</title><style>{STYLE}</style>'
        f"</head><body>\n<h1>{title}</h1>\n<p>{html.escape(_about(r.start))}</p>\n<p>{_stats(r)}</p>\n"
        f'<div class="text">{body}</div>\n<h2>What wrote each span</h2>\n{_legend(r)}\n</body></html>\n'
    )


def _stats(r: Replay) -> str:
    """One line: SUMMARY_HEADER's counts, each named."""
    return html.escape("; ".join(f"{name}: {cell}" for name, cell in zip(SUMMARY_HEADER, _counts(r))))


def _span(r: Replay, w: int, text: str) -> str:
    kind = "extend" if r.writes[w].step is None else "step"
    return (
        f'<span class="{kind}" data-write="{w}" title="{html.escape(r.writes[w].name)}" '
        f'style="background:{_colour(r, w)}">{html.escape(text)}</span>'
    )


def _legend(r: Replay) -> str:
    """A line per write that the final text still holds, and how many accepted steps were overwritten."""
    shown = sorted(set(r.writers))
    items = [
        f'<li><span class="swatch" style="background:{_colour(r, w)}">&nbsp;</span>{html.escape(r.writes[w].name)}'
        f": tokens {r.writers.index(w)}–{_last(r, w)}</li>"
        for w in shown
    ]
    gone = sum(1 for w, write in enumerate(r.writes) if write.step is not None and w not in shown)
    return f"<ul>{''.join(items)}</ul>\n<p>{gone} accepted step(s) overwritten later.</p>"


def _last(r: Replay, w: int) -> int:
    return len(r.writers) - 1 - r.writers[::-1].index(w)


def _colour(r: Replay, w: int) -> str:
    """Extensions in greys alternating by stage; accepted steps each in its own hue (golden-angle apart)."""
    write = r.writes[w]
    if write.step is None:
        return ("#eeeeee", "#d4d4d4")[write.stage % 2]
    rank = sum(1 for earlier in r.writes[:w] if earlier.step is not None)
    return f"hsl({137.508 * rank % 360:.0f}, 75%, 78%)"


# --- plot ------------------------------------------------------------------------------------------------------


def trace_figure(r: Replay) -> Any:
    fig, *axes = figure(2 + bool(r.ess))
    _logp_panel(axes[0], r)
    _acceptance_panel(axes[1], r)
    if r.ess:
        blocks = range(1, len(r.ess) + 1)
        axes[2].plot(blocks, r.ess, marker="o")
        axes[2].set_xticks(blocks if len(blocks) <= 20 else blocks[:: len(blocks) // 10])
        axes[2].set(xlabel="block", ylabel="effective sample size", title="power-smc: ESS per block")
    return fig


def _logp_panel(ax: Any, r: Replay) -> None:
    """log p after each extension and step; a dotted line before each extension (a stage boundary)."""
    ax.plot(range(len(r.points)), [p.logp for p in r.points], color="0.75", linewidth=1, zorder=1)
    marks = (
        ("extension", lambda p: p.step is None, "s", "black"),
        ("accepted", lambda p: p.accepted, "o", "green"),
        ("rejected", lambda p: p.accepted is False, "x", "red"),
    )
    for name, chosen, marker, colour in marks:
        xs = [x for x, p in enumerate(r.points) if chosen(p)]
        if xs:
            ax.scatter(xs, [r.points[x].logp for x in xs], marker=marker, color=colour, label=name, zorder=2, s=20)
    for x, p in enumerate(r.points):
        if p.step is None and x:
            ax.axvline(x - 0.5, linestyle=":", color="gray", linewidth=1)
    ax.set(xlabel="event (extensions and MH steps)", ylabel="log p of the state (nats)", title=f"chain {r.chain}")
    if r.points:
        ax.legend(fontsize=8)


def _acceptance_panel(ax: Any, r: Replay) -> None:
    """Acceptance rate per bin of cut / length, each bar labelled accepted/steps."""
    counts = acceptance_by_position(r.steps, BINS)
    centres = [(i + 0.5) / BINS for i in range(BINS)]
    ax.bar(centres, [a / n if n else 0.0 for n, a in counts], width=0.9 / BINS)
    for x, (n, a) in zip(centres, counts):
        if n:
            ax.text(x, min(a / n, 1.0) + 0.02, f"{a}/{n}", ha="center", fontsize=7)
    ax.set(
        xlabel="cut / length (where the proposal starts)",
        ylabel="acceptance rate",
        xlim=(0, 1),
        ylim=(0, 1.1),
        title="acceptance by cut position" + ("" if r.steps else " (no MH steps)"),
    )
