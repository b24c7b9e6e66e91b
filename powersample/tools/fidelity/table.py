"""The markdown tables of a fidelity result (printed, written to fidelity_<mode>.md, and in `powersample report`)."""

from __future__ import annotations

from typing import Any


def render_table(data: dict[str, Any]) -> str:
    return toy_table(data) if data["mode"] == "toy" else model_table(data)


def toy_table(data: dict[str, Any]) -> str:
    """Markdown: one table per toy target, then the skipped methods."""
    parts = [_title(data)]
    for t in data["targets"]:
        parts += [
            (
                f"\n**{t['spec']}** (T={t['max_new_tokens']}, {t['support']} sequences; TV of "
                f"{data['samples']} exact samples: mean {t['floor']:.4f} = the floor, 95% under "
                f"{t['floor_q95']:.4f})\n"
            ),
            "| method | knobs | TV | TV floor | tokens/sample | calls |",
            "|---|---|---|---|---|---|",
        ]
        parts += [
            f"| {p['method']} | {_knobs(p)} | {p['tv']:.4f} | {t['floor']:.4f} | "
            f"{p['tokens_per_sample']:.1f} | {_opt(p['calls'], 'd')} |"
            for p in t["points"]
        ]
        parts += _matched_lines(t.get("matched"))
    return "\n".join(parts + _skipped_lines(data))


def model_table(data: dict[str, Any]) -> str:
    """Markdown: one row per setting on the model, then the skipped methods."""
    head = (
        "| method | knobs | samples | log-lik/token | mean length | EOS | tokens sampled/sample | "
        "wall s/sample | wall / base | vs reference, paired |"
    )
    rows = [
        f"| {p['method']} | {_knobs(p)} | {p['samples']} | {p['logp_per_token']:.3f}{_se(p)} | "
        f"{p['mean_length']:.1f} | {p['eos_fraction']:.0%} | {p['tokens_per_sample']:.1f} | "
        f"{p['wall_per_sample']:.2f} | {_opt(p['wall_vs_base'], '.2f', 'x')} | {_gap(p.get('vs_reference'))} |"
        for p in data["points"]
    ]
    matched = _matched_lines(data.get("matched"))
    return "\n".join([_title(data), "", head, "|" + "---|" * 10, *rows, *matched, *_skipped_lines(data)])


def _matched_lines(matched: dict[str, Any] | None) -> list[str]:
    """Every curve at the reference's token budget (budget.py): its best point within, its cheapest one over."""
    if not matched:
        return []
    toy = matched["measure"] == "tv"
    name = "TV" if toy else "log-lik/token"
    ref = matched["reference"]
    return [
        (
            f"\nAt the token budget of {ref['method']} {_knobs(ref)}: {matched['tokens_per_sample']:.1f} tokens "
            f"sampled per sample (within: at most {matched['slack']:g}x that; over: the cheapest point above"
            f"{'' if toy else '; this setting is the reference of the paired column above'})\n"
        ),
        f"| curve | within: knobs | {name} | tokens/sample | over: knobs | {name} | tokens/sample |",
        "|---|---|---|---|---|---|---|",
        *(
            f"| {c['curve']} | {_brief(c['within'], matched['measure'])} | {_brief(c['over'], matched['measure'])} |"
            for c in matched["curves"]
        ),
    ]


def _brief(point: dict[str, Any] | None, measure: str) -> str:
    if point is None:
        return "- | - | -"
    fmt = ".4f" if measure == "tv" else ".3f"
    return f"{_knobs(point)} | {point[measure]:{fmt}} | {point['tokens_per_sample']:.1f}"


def _gap(gap: dict[str, Any] | None) -> str:
    """The paired gap in log-lik per token to the reference setting (model.py), with its standard error."""
    if gap is None:
        return "-"
    return f"{gap['mean']:+.3f}" + ("" if gap["se"] is None else f" ± {gap['se']:.3f}")


def _se(point: dict[str, Any]) -> str:
    se = point.get("logp_per_token_se")  # absent from results written before it was recorded
    return "" if se is None else f" ± {se:.3f}"


def _title(data: dict[str, Any]) -> str:
    state = "" if data.get("complete") else " [PARTIAL: not every setting finished]"
    if data["mode"] == "toy":
        return (
            f"Fidelity per compute on exact toy targets: TV to p^alpha (alpha={data['alpha']:g}) of "
            f"{data['samples']} samples per setting, seed {data['seed']}{state}"
        )
    b = data["backend"]
    return (
        f"Fidelity per compute on {b['model']} ({b['name']}{', ' + b['device'] if b.get('device') else ''}, "
        f"{data['machine']['cpu_count']} CPUs): alpha={data['alpha']:g}, T={data['max_new_tokens']}, "
        f"{len(data['prompts'])} prompt(s) x {data['samples']} seed(s), one sample per call; load average "
        f"{_load(data['machine'].get('load_average_start'))} at the start, {_load(data.get('load_average_end'))} "
        f"at the end{state}"
    )


def _load(values: list[float] | None) -> str:
    return "-" if not values else f"{values[0]:.1f}"


def _knobs(point: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in point["knobs"].items()) or "-"


def _skipped_lines(data: dict[str, Any]) -> list[str]:
    return [f"\n- {s['method']}: {s['reason']}" for s in data.get("skipped", [])]


def _opt(value: float | None, fmt: str, unit: str = "") -> str:
    return "-" if value is None else format(value, fmt) + unit
