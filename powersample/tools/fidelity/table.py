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
    return "\n".join(parts + _skipped_lines(data))


def model_table(data: dict[str, Any]) -> str:
    """Markdown: one row per setting on the model, then the skipped methods."""
    head = (
        "| method | knobs | samples | log-lik/token | mean length | EOS | tokens sampled/sample | "
        "wall s/sample | wall / base |"
    )
    rows = [
        f"| {p['method']} | {_knobs(p)} | {p['samples']} | {p['logp_per_token']:.3f} | "
        f"{p['mean_length']:.1f} | {p['eos_fraction']:.0%} | {p['tokens_per_sample']:.1f} | "
        f"{p['wall_per_sample']:.2f} | {_opt(p['wall_vs_base'], '.2f')}x |"
        for p in data["points"]
    ]
    return "\n".join([_title(data), "", head, "|" + "---|" * 9, *rows, *_skipped_lines(data)])


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


def _opt(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)
