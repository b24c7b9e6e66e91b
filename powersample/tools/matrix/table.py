"""The matrix's support table (Markdown) and its JSON.

One row per built cell, a column per check (numbered; the legend names them): ✓ pass, ✗ fail, – does not apply.
Cells this machine does not build are rows too, grouped by engine and reason. Below: the request hints each engine
honours, each failure and each not-applicable reason in one line, then the conversions (agreement with
transformers, sizes, tensor types).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Any

from powersample.tools.common import write_result_json
from powersample.tools.matrix.agreement import LENGTH, ROUTING_FLIPS, SEQUENCES, TOLERANCE, Agreement
from powersample.tools.matrix.archs import ARCHS
from powersample.tools.matrix.run import FAIL, NOT_APPLICABLE, PASS, CellResult, MatrixResult

MARK = {PASS: "✓", FAIL: "✗", NOT_APPLICABLE: "–"}
MB = 1e6


def render_table(result: MatrixResult) -> str:
    """The whole report, in Markdown."""
    parts = [
        _summary(result),
        _legend(result),
        _cells(result),
        _hints(result),
        _failures(result),
        _not_applicable(result),
        _conversions(result),
    ]
    return "\n\n".join(p for p in parts if p) + "\n"


def to_dict(result: MatrixResult) -> dict[str, Any]:
    """Every field of the result, plus whether it passed."""
    return {"ok": result.ok, **asdict(result)}


def write_json(path: str | Path, result: MatrixResult) -> None:
    """The result as JSON, atomically."""
    write_result_json(Path(path), to_dict(result))


# --- sections ---------------------------------------------------------------------------------------------------


def _summary(result: MatrixResult) -> str:
    built = [c for c in result.cells if not c.not_built]
    failed = [c for c in built if c.failures]
    bad = [a.arch for a in result.archs if a.agreement and not a.agreement.ok]
    verdict = (
        f"{len(failed)} cells fail"
        if failed
        else "no cell was built here"
        if not built
        else "every built cell passes every check that applies"
    )
    verdict += f"; the conversion of {', '.join(bad)} disagrees with transformers" if bad else ""
    return (
        f"{len(result.cells)} cells ({len(built)} built here) x {len(result.checks)} checks, "
        f"{result.wall_seconds:.0f} s, started {result.started}: **{verdict}**."
    )


def _legend(result: MatrixResult) -> str:
    names = " · ".join(f"{i} `{name}`" for i, name in enumerate(result.checks, 1))
    return f"Checks: {names}.\n\n✓ passes · ✗ fails · – does not apply (why: below)"


def _cells(result: MatrixResult) -> str:
    numbers = list(range(1, len(result.checks) + 1))
    rows = [
        "| engine | arch | quant | " + " | ".join(map(str, numbers)) + " | cell |",
        "|---|---|---|" + ":-:|" * len(numbers) + "---|",
    ]
    for c in result.cells:
        if not c.not_built:
            marks = [MARK[o.status] for o in c.outcomes]
            rows.append(
                f"| {c.cell.engine} | {c.cell.arch} | {c.cell.quant} | " + " | ".join(marks) + f" | {_verdict(c)} |"
            )
    blank = " | ".join("" for _ in numbers)
    for (engine, reason), group in _not_built_groups(result).items():
        archs = ", ".join(dict.fromkeys(c.cell.arch for c in group))
        quants = ", ".join(dict.fromkeys(c.cell.quant for c in group))
        rows.append(f"| {engine} | {archs} | {quants} | {blank} | not built here: {reason} |")
    return "\n".join(rows)


def _hints(result: MatrixResult) -> str:
    """Per engine, the request hints its backend honours (checked by `hints_change_forwards_not_draws`)."""
    engines = {c.cell.engine: c.hints for c in result.cells if not c.not_built and c.outcomes}
    if not engines:
        return ""
    return "Hints honoured: " + " · ".join(f"{name}: {', '.join(hints) or 'none'}" for name, hints in engines.items())


def _failures(result: MatrixResult) -> str:
    lines = []
    for c in result.cells:
        by_reason: dict[str, list[int]] = defaultdict(list)
        for i, o in enumerate(c.outcomes, 1):
            if o.status == FAIL:
                by_reason[o.reason].append(i)
        lines += [f"- {c.cell.name}, {_checks(numbers)}: {reason}" for reason, numbers in by_reason.items()]
    return "### Failures\n\n" + "\n".join(lines) if lines else ""


def _not_applicable(result: MatrixResult) -> str:
    where: dict[tuple[int, str], list[str]] = defaultdict(list)
    for c in result.cells:
        for i, o in enumerate(c.outcomes, 1):
            if o.status == NOT_APPLICABLE:
                where[(i, o.reason)].append(c.cell.name)
    lines = [
        f"- {i} `{result.checks[i - 1]}` on {_cells_named(names)}: {reason}"
        for (i, reason), names in sorted(where.items())
    ]
    return "### Not applicable\n\n" + "\n".join(lines) if lines else ""


def _conversions(result: MatrixResult) -> str:
    if not any(a.folder for a in result.archs):
        return ""
    quants = list(dict.fromkeys(q for a in result.archs for q in a.sizes if q != "hf"))
    rows = [
        f"### Models and conversions\n\nThe conversion: llama.cpp's log p of the F32 GGUF against transformers' "
        f"fp32 log p of the same ids, at {SEQUENCES} x {LENGTH - 1} positions: the largest and the median |Δ| in "
        f"nats, and how many positions are past {TOLERANCE} (none may be; in an MoE, a near-tied router may pick "
        f"other experts at {ROUTING_FLIPS:.0%} of them). Sizes on disk in MB.\n",
        "| " + " | ".join(["arch", "exercises", "conversion", "hf", *quants]) + " |",
        "|---|---|---|---|" + "---|" * len(quants),
    ]
    for a in result.archs:
        if not a.folder:
            continue
        sizes = [f"{a.sizes[q] / MB:.1f}" if q in a.sizes else "" for q in ("hf", *quants)]
        rows.append("| " + " | ".join([a.arch, ARCHS[a.arch].note, _agreement(a.agreement), *sizes]) + " |")
    mixes = [
        f"- {a.arch} {q}: " + ", ".join(f"{n} {t}" for t, n in types.items())
        for a in result.archs
        for q, types in a.tensor_types.items()
        if q.endswith("_m")
    ]
    if mixes:
        rows.append("\nTensor types of the mixes (llama.cpp's per-tensor choice; short rows fall back):\n")
        rows += mixes
    return "\n".join(rows)


# --- helpers ----------------------------------------------------------------------------------------------------


def _agreement(a: Agreement | None) -> str:
    if a is None:
        return "–"
    past = f", {a.past_tolerance} of {a.positions} past" if a.past_tolerance else ""
    return f"max {a.max_gap:.3f}, median {a.median_gap:.4f}{past} {'✓' if a.ok else '✗'}"


def _verdict(c: CellResult) -> str:
    failed = len(c.failures)
    return f"**{failed} failed** ({c.seconds:.0f} s)" if failed else f"pass ({c.seconds:.0f} s)"


def _not_built_groups(result: MatrixResult) -> dict[tuple[str, str], list[CellResult]]:
    groups: dict[tuple[str, str], list[CellResult]] = defaultdict(list)
    for c in result.cells:
        if c.not_built:
            groups[(c.cell.engine, c.not_built)].append(c)
    return groups


def _checks(numbers: list[int]) -> str:
    return ("check " if len(numbers) == 1 else "checks ") + ", ".join(map(str, numbers))


def _cells_named(names: list[str]) -> str:
    return ", ".join(names) if len(names) <= 4 else f"{len(names)} cells ({', '.join(names[:3])}, ...)"
