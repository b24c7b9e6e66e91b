"""Every curve at one token budget: the tokens a reference setting spends per sample (settings.TOY_REFERENCE,
settings.MODEL_REFERENCE), and per curve its best point within that budget and its cheapest point over it.

No interpolation: each number is a measured point, shown with the tokens it spent, so "at power's budget" can be
read off the JSON as it was measured.
"""

from __future__ import annotations

from typing import Any

from powersample.tools.fidelity.settings import Setting

SLACK = 1.10  # a point "within" the budget spends at most this x the reference's tokens per sample (power-pt with
# K replicas spends about K x power's tokens at the same steps, so its points rarely land on the budget exactly)

# per mode: the measure, and whether higher is better
MEASURES = {"toy": ("tv", False), "model": ("logp_per_token", True)}


def matched_budget(points: list[dict[str, Any]], reference: Setting, mode: str) -> dict[str, Any] | None:
    """The curves at the reference's tokens per sample; None when the reference was not measured."""
    ref = next((p for p in points if reference.same(p)), None)
    if ref is None:
        return None
    budget = ref["tokens_per_sample"]
    curves: dict[str, list[dict[str, Any]]] = {}
    for p in points:
        curves.setdefault(p["curve"], []).append(p)
    return {
        "reference": {"method": ref["method"], "knobs": ref["knobs"]},
        "tokens_per_sample": budget,
        "slack": SLACK,
        "measure": MEASURES[mode][0],
        "curves": [_at_budget(name, ps, budget, mode) for name, ps in curves.items()],
    }


def _at_budget(curve: str, points: list[dict[str, Any]], budget: float, mode: str) -> dict[str, Any]:
    """One curve: its best point spending <= SLACK x budget tokens, and its cheapest point spending more."""
    measure, higher = MEASURES[mode]
    within = [p for p in points if p["tokens_per_sample"] <= SLACK * budget]
    over = [p for p in points if p["tokens_per_sample"] > SLACK * budget]
    best = max(within, key=lambda p: p[measure] if higher else -p[measure], default=None)
    cheapest = min(over, key=lambda p: p["tokens_per_sample"], default=None)
    return {"curve": curve, "within": _brief(best, measure), "over": _brief(cheapest, measure)}


def _brief(point: dict[str, Any] | None, measure: str) -> dict[str, Any] | None:
    if point is None:
        return None
    return {"knobs": point["knobs"], "tokens_per_sample": point["tokens_per_sample"], measure: point[measure]}
