"""The human-readable reports: bench's phases, Eq. 12 and targets, and bench --engines' side-by-side table."""

from __future__ import annotations

from powersample.tools.bench.engines import EngineRow, EnginesResult
from powersample.tools.bench.eq12 import POWER_PHASES
from powersample.tools.bench.result import BenchResult


def format_table(result: BenchResult) -> str:
    """The human-readable report: phases, Eq. 12, and each target with met / missed."""
    return "\n".join(
        [
            _header(result),
            "",
            *_phase_rows(result),
            *_paired_line(result),
            "",
            *_eq12_lines(result),
            "",
            *_target_rows(result),
        ]
    )


def _paired_line(result: BenchResult) -> list[str]:
    """Whether each speculative phase drew its plain twin's samples (drafts change no token; an engine's batched
    numerics may flip a rare draw)."""
    return [
        f"{name} drew the same samples as {p['of']}: {p['same']} of {p['compared']}"
        for name, p in result.same_samples().items()
    ]


def _header(result: BenchResult) -> str:
    o, c = result.options, result.options.config
    state = "" if result.complete else " [PARTIAL: not every phase finished]"
    where = f" on {result.device}" if result.device else ""
    return (
        f"powersample bench: {o.backend.name} ({o.backend.describe()}){where}, "
        f"{result.machine['cpu_count']} CPUs; {c.method} alpha={c.alpha:g} T={c.max_new_tokens} "
        f"B={c.block} N={c.mcmc_steps}; {len(o.prompts)} prompt(s), K={o.chains}, "
        f"{o.repeats} repeat(s){state}"
    )


def _phase_rows(result: BenchResult) -> list[str]:
    head = (
        f"{'phase':<44} {'samples':>7} {'tokens':>8} {'wall s':>8} {'tokens/s':>9} {'s/sample':>9} "
        f"{'accept':>7} {'fwd/sample':>10} {'kept/fwd':>8} {'peak RSS MB':>11}"
    )
    rows = [head]
    for p in result.phases:
        acc = "-" if p.acceptance_rate is None else f"{p.acceptance_rate:.2f}"
        fwd = "-" if p.forwards_per_sample is None else f"{p.forwards_per_sample:.0f}"
        kept = "-" if p.kept_drafts_per_forward is None else f"{p.kept_drafts_per_forward:.2f}"
        rows.append(
            f"{p.phase.label:<44} {p.samples:>7} {p.tokens_sampled:>8.0f} {p.wall_seconds:>8.1f} "
            f"{p.tokens_per_second:>9.2f} {p.wall_per_sample:>9.2f} {acc:>7} {fwd:>10} {kept:>8} "
            f"{p.peak_rss_kb / 1024:>11.0f}"
        )
    return rows


def _eq12_lines(result: BenchResult) -> list[str]:
    e = result.eq12()
    lines = [
        f"Eq. 12 tokens sampled per sample: N*T^2/(4B) + T = {e['estimate_tokens_per_sample']:.0f} "
        f"(exact mean if nothing ends at EOS: {e['expected_tokens_per_sample_full_length']:.0f})"
    ]
    for name in POWER_PHASES:
        if name in e:
            a = e[name]
            lines.append(
                f"  actual, {name}: {a['actual_tokens_per_sample']:.0f} per sample (mean length "
                f"{a['mean_length']:.0f}, {a['eos_fraction']:.0%} ended at EOS; early EOS lowers it)"
            )
    return lines


def _target_rows(result: BenchResult) -> list[str]:
    rows = [f"{'target':<48} {'value':>8} {'target':>9}  status"]
    for t in result.targets():
        rows.append(
            f"{t.label:<48} {t.value:>8.3f} {t.op + ' ' + format(t.target, 'g'):>9}  {'met' if t.met else 'MISSED'}"
        )
    return rows


# -- bench --engines ---------------------------------------------------------------------------------------------


def format_engines(result: EnginesResult) -> str:
    """The side-by-side table: per candidate, tokens/s of each phase (rejected proposals included: comparable across
    engines whose samples differ in length), wall per sample, and power-1 tokens/s relative to the first."""
    lines = [_engines_header(result), "", _ENGINE_COLUMNS]
    first = _rate(result.rows[0], "power-1") if result.rows else None
    lines += [_engine_row(row, first, reference=i == 0) for i, row in enumerate(result.rows)]
    lines += ["", *(f"{r.candidate.spec}: {r.placement}" for r in result.rows if r.placement)]
    return "\n".join(lines)


_ENGINE_COLUMNS = (
    f"{'engine':<28} {'plain-1 tok/s':>13} {'power-1 tok/s':>13} {'power-K tok/s':>13} "
    f"{'power-1 s/sample':>16} {'vs first':>8} {'KL nats/tok':>11}"
)


def _engines_header(result: EnginesResult) -> str:
    o, c = result.options, result.options.config
    state = "" if result.complete else " [PARTIAL]"
    return (
        f"powersample bench --engines: {c.method} alpha={c.alpha:g} T={c.max_new_tokens} B={c.block} "
        f"N={c.mcmc_steps}; {len(o.prompts)} prompt(s), K={o.chains}, {o.repeats} repeat(s), "
        f"{result.machine['cpu_count']} CPUs, load average {result.machine['load_average_start'][0]:.1f} at "
        f"start{state}"
    )


def _engine_row(row: EngineRow, first: float | None, reference: bool) -> str:
    """One candidate's line; the reference (first) candidate's KL from itself is 0 by definition."""
    one = _rate(row, "power-1")
    speed = f"{one / first:.2f}x" if first and one else "-"
    kl = "0" if reference else _num(row.kl, 3)
    return (
        f"{row.candidate.spec:<28} {_num(_rate(row, 'plain-1')):>13} {_num(one):>13} "
        f"{_num(_rate(row, 'power-K')):>13} {_num(_wall(row, 'power-1')):>16} {speed:>8} {kl:>11}"
    )


def _rate(row: EngineRow, name: str) -> float | None:
    phase = row.phase(name)
    return phase.tokens_per_second if phase else None


def _wall(row: EngineRow, name: str) -> float | None:
    phase = row.phase(name)
    return phase.wall_per_sample if phase else None


def _num(value: float | None, digits: int = 2) -> str:
    """The value to `digits` decimals, "-" for None; never a signed zero ("-0.000" for an estimate of about 0)."""
    if value is None:
        return "-"
    text = f"{value:.{digits}f}"
    return text.lstrip("-") if float(text) == 0 else text
