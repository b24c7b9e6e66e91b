"""Paired comparisons in `powersample report`: the exact McNemar test against hand values and exact integer sums,
the cluster bootstrap (covers, is reproducible, is degenerate when it must be, and does not shrink when a
problem's seeds are copies of each other), and the section as build_report renders it."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
from support.report_runs import section, verdicts, write_run

from powersample.eval import paired
from powersample.eval.report import build_report
from powersample.eval.rows import MAX_ALL_PAIRS


def exact_mcnemar(b: int, c: int) -> float:
    n = b + c
    return min(1.0, float(2 * Fraction(sum(math.comb(n, k) for k in range(min(b, c) + 1)), 2**n))) if n else 1.0


def test_mcnemar_hand_values():
    assert paired.mcnemar_exact(1, 9) == pytest.approx(0.021484375, rel=1e-12)  # 2 * (1 + 10) / 2^10
    assert paired.mcnemar_exact(9, 1) == paired.mcnemar_exact(1, 9)
    assert paired.mcnemar_exact(0, 5) == pytest.approx(0.0625, rel=1e-12)  # 2 / 2^5
    assert paired.mcnemar_exact(7, 7) == 1.0 and paired.mcnemar_exact(0, 0) == 1.0 and paired.mcnemar_exact(0, 1) == 1.0
    with pytest.raises(ValueError):
        paired.mcnemar_exact(-1, 3)


@pytest.mark.parametrize("b, c", [(3, 4), (2, 11), (37, 61), (0, 40), (150, 210), (499, 560)])
def test_mcnemar_matches_the_exact_integer_sum(b, c):
    assert paired.mcnemar_exact(b, c) == pytest.approx(exact_mcnemar(b, c), rel=1e-9)


def test_mcnemar_large_counts_do_not_overflow():
    assert paired.mcnemar_exact(10**6, 10**6) == 1.0
    assert paired.mcnemar_exact(0, 5000) == 0.0  # 2^-4999 underflows to 0, not to an error or NaN
    b, c = 10**6, 10**6 + 5000  # the normal approximation is good here: z = (|b - c| - 1) / sqrt(b + c)
    z = (c - b - 1) / math.sqrt(b + c)
    assert paired.mcnemar_exact(b, c) == pytest.approx(math.erfc(z / math.sqrt(2)), rel=0.02)


def items(right: list[bool], seeds: int = 1, name: str = "p") -> dict[tuple[str, int], bool]:
    """Verdicts of problems p0.. with each seed a copy of the problem's verdict."""
    return {(f"{name}{i}", s): r for i, r in enumerate(right) for s in range(seeds)}


def test_bootstrap_covers_the_true_difference_and_is_reproducible():
    rng = np.random.default_rng(7)
    a, b = rng.random(400) < 0.5, rng.random(400) < 0.7  # true difference 0.2
    result = paired.compare(items(list(a)), items(list(b)))
    assert result.n == result.clusters == 400
    assert result.difference == pytest.approx(b.mean() - a.mean())
    low, high = result.interval
    assert low < 0.2 < high and low < result.difference < high
    assert 0.08 < high - low < 0.2  # about 2 * 1.96 * sqrt((.25 + .21) / 400)
    assert paired.compare(items(list(a)), items(list(b))) == result  # the fixed seed: the same report twice
    assert paired.compare(items(list(a)), items(list(b)), seed=1).interval != result.interval
    assert (result.a_only, result.b_only) == (int(np.sum(a & ~b)), int(np.sum(b & ~a)))


def test_bootstrap_is_degenerate_when_every_item_has_the_same_difference():
    same = paired.compare(items([True, False, True]), items([True, False, True]))
    assert same.interval == (0.0, 0.0) and same.difference == 0.0 and same.p_value == 1.0
    better = paired.compare(items([False] * 5, seeds=3), items([True] * 5, seeds=3))
    assert better.interval == (1.0, 1.0) and better.difference == 1.0 and (better.a_only, better.b_only) == (0, 15)


def test_copied_seeds_do_not_narrow_the_clustered_interval():
    """Eight seeds that copy each problem's verdict add no information: resampling problems gives the interval of one
    seed per problem, while resampling items as if independent would shrink it by about sqrt(8)."""
    rng = np.random.default_rng(3)
    a, b = list(rng.random(60) < 0.4), list(rng.random(60) < 0.6)
    one = paired.compare(items(a), items(b))
    copies = paired.compare(items(a, seeds=8), items(b, seeds=8))
    assert (copies.n, copies.clusters) == (480, 60)
    assert copies.interval == pytest.approx(one.interval, abs=1e-12)
    flat = {(f"{p}/{s}", 0): v for (p, s), v in items(a, seeds=8).items()}  # each item its own cluster
    independent = paired.compare(flat, {(f"{p}/{s}", 0): v for (p, s), v in items(b, seeds=8).items()})
    width = lambda r: r.interval[1] - r.interval[0]  # noqa: E731
    assert width(independent) < 0.5 * width(copies)
    assert 2.3 < width(copies) / width(independent) < 3.4  # sqrt(8) = 2.83


def enumerated_interval(sums: list[int], size: int) -> tuple[float, float]:
    """The 2.5% and 97.5% quantiles of the exact cluster-bootstrap law: every one of the K^K draws of K clusters."""
    k = len(sums)
    means = sorted(sum(sums[i] for i in draw) / (size * k) for draw in itertools.product(range(k), repeat=k))
    return means[math.ceil(0.025 * len(means)) - 1], means[math.ceil(0.975 * len(means)) - 1]


@pytest.mark.parametrize(
    "a, b",
    [
        ("0011 0101", "1111 0111"),
        ("0011 0101", "1100 1100"),
        ("1100 1100", "1111 0111"),
        ("10010 00110", "11011 10111"),
    ],
)
def test_bootstrap_matches_the_enumerated_resamples(a, b):
    """On a few problems the bootstrap's law can be listed whole; 10,000 resamples find its quantiles (none of these
    cases has a quantile where the law's distribution function is within 0.01 of 2.5% or 97.5%)."""
    left, right = ({(r["problem_id"], r["seed"]): r["correct"] for r in verdicts(v, 2)} for v in (a, b))
    sums = [sum(right[p, s] - left[p, s] for s in range(2)) for p in sorted({p for p, _ in left})]
    assert paired.compare(left, right).interval == enumerated_interval(sums, 2)


def test_no_shared_items_is_no_comparison():
    assert paired.compare(items([True]), items([True], name="q")) is None


def test_report_renders_paired_comparisons(tmp_path):
    runs = [
        write_run(tmp_path / "base", verdicts("0011 0101", seeds=2), method="base"),
        write_run(tmp_path / "power", verdicts("1111 0111", seeds=2), method="power"),
        write_run(tmp_path / "low", verdicts("1100 1100", seeds=2), method="low-temp"),
    ]
    text, _ = build_report(runs, None)
    lines = section(text, "Paired comparisons")
    # base 4/8, power 7/8: power alone right on three items, never the reverse, so McNemar's p = 2 / 2^3. Per problem
    # B - A sums to 1, 1, 1, 0 over its 2 seeds; the interval's ends are those of the exact bootstrap law (see
    # test_bootstrap_matches_the_enumerated_resamples). low-temp against power: 1 / 4 discordant, p = 2 * 6 / 2^5.
    assert lines == [
        "| math500 | base | low-temp | 8 (4) | 0.500 | 0.500 | +0.000 [-0.750, +0.750] | 3 / 3 | 1 |",
        "| math500 | base | power | 8 (4) | 0.500 | 0.875 | +0.375 [+0.125, +0.500] | 0 / 3 | 0.25 |",
        "| math500 | low-temp | power | 8 (4) | 0.500 | 0.875 | +0.375 [-0.250, +1.000] | 1 / 4 | 0.375 |",
    ]
    assert "McNemar's exact test counts the discordant items as independent" in text  # several seeds per problem
    one_seed = [
        write_run(tmp_path / "b1", verdicts("0011"), method="base"),
        write_run(tmp_path / "p1", verdicts("1111"), method="power"),
    ]
    text, _ = build_report(one_seed, None)
    assert section(text, "Paired comparisons") == [
        "| math500 | base | power | 4 (4) | 0.500 | 1.000 | +0.500 [+0.000, +1.000] | 0 / 2 | 0.5 |"
    ]
    assert "counts the discordant items as independent" not in text


def test_only_shared_items_are_paired_and_ungraded_runs_are_left_out(tmp_path):
    runs = [
        write_run(tmp_path / "base", verdicts("0011 0101", seeds=2), method="base"),
        write_run(tmp_path / "power", verdicts("1111"), method="power"),
        write_run(tmp_path / "alpaca", verdicts("1111"), method="power", task="alpaca_eval"),
    ]
    (runs[2] / "records.jsonl").write_text((runs[2] / "records.jsonl").read_text().replace("true", "null"))
    lines = section(build_report(runs, None)[0], "Paired comparisons")
    assert lines == ["| math500 | base | power | 4 (4) | 0.500 | 1.000 | +0.500 [+0.000, +1.000] | 0 / 2 | 0.5 |"]
    text, _ = build_report(runs[2:], None)
    assert "Paired comparisons" not in text


def test_many_rows_are_each_compared_with_the_first(tmp_path):
    runs = [write_run(tmp_path / f"a{a}", verdicts("1010"), method="power", alpha=float(a)) for a in range(1, 9)]
    assert len(runs) > MAX_ALL_PAIRS
    lines = section(build_report(runs, None)[0], "Paired comparisons")
    pairs = [line.split(" | ")[1:3] for line in lines]
    assert pairs == [["power alpha=1.0", f"power alpha={a}.0"] for a in range(2, 9)]
    few = section(build_report(runs[:MAX_ALL_PAIRS], None)[0], "Paired comparisons")
    assert len(few) == MAX_ALL_PAIRS * (MAX_ALL_PAIRS - 1) // 2  # every pair
