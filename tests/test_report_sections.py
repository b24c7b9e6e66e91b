"""The report's output-length section and plot, and the accuracy-against-temperature plot, which is drawn exactly
when runs of a method differ in the temperature they draw at and in nothing else."""

from __future__ import annotations

import pytest
from support.report_runs import section, verdicts, write_run

from powersample.eval import metrics
from powersample.eval.report import SWEEPS, build_report, load_rows, sweep_figure

PNG = b"\x89PNG\r\n\x1a\n"


def lengths_run(run_dir, lengths, reasons, **config):
    records = [
        {"problem_id": f"p{i}", "length": n, "finish_reason": r} for i, (n, r) in enumerate(zip(lengths, reasons))
    ]
    return write_run(run_dir, records, **config)


def test_output_lengths_section_and_plot(tmp_path):
    runs = [
        lengths_run(tmp_path / "base", [1, 2, 3, 4, 10], ["eos", "eos", "length", "eos", "length"], method="base"),
        lengths_run(tmp_path / "power", [6, 6, 6], [None, None, None], method="power"),
    ]
    text, plots = build_report(runs, tmp_path / "plots")
    # numpy's linear rule: the 10% point sits 0.4 of the way from 1 to 2, the 90% point 0.6 of the way from 4 to 10
    assert section(text, "Output lengths") == [
        "| math500 | base | 5 | 4.0 | 3.0 | 1.4 | 7.6 | 0.600 |",
        "| math500 | power | 3 | 6.0 | 6.0 | 6.0 | 6.0 | — |",
    ]
    assert metrics.percentiles([1, 2, 3, 4, 10], (50, 10, 90)) == pytest.approx([3.0, 1.4, 7.6])
    lengths = tmp_path / "plots" / "lengths_math500.png"
    assert lengths in plots and lengths.read_bytes()[:8] == PNG


def temperature_plot(tmp_path, *configs: dict) -> bool:
    """Whether the report of runs with these configs (one each, all graded) draws accuracy against temperature."""
    runs = [write_run(tmp_path / f"run{i}", verdicts("1010"), **c) for i, c in enumerate(configs)]
    _, plots = build_report(runs, tmp_path / "plots")
    return (tmp_path / "plots" / "acc_vs_temperature_math500.png") in plots


@pytest.mark.parametrize(
    "configs, drawn",
    [
        # low-temp at alpha 2 and 4 draws at 1/2 and 1/4: alpha acts through the temperature alone
        ([dict(method="low-temp", alpha=2.0), dict(method="low-temp", alpha=4.0)], True),
        ([dict(method="power", alpha=4.0), dict(method="power", alpha=4.0, proposal_temperature=0.5)], True),
        # alpha also changes power's target: these differ in more than the temperature
        ([dict(method="power", alpha=1.0), dict(method="power", alpha=4.0)], False),
        (
            [dict(method="power", alpha=4.0), dict(method="power", alpha=4.0, proposal_temperature=0.5, mcmc_steps=3)],
            False,
        ),
        (
            [
                dict(method="power", alpha=4.0),
                dict(method="power", alpha=4.0, proposal_temperature=0.5, backend={"name": "toy", "model": "other"}),
            ],
            False,
        ),
        # base always draws at 1, whatever its alpha; and different methods are not one sweep
        ([dict(method="base", alpha=1.0), dict(method="base", alpha=4.0)], False),
        ([dict(method="base"), dict(method="low-temp", alpha=2.0)], False),
    ],
)
def test_temperature_plot_exactly_when_runs_differ_only_in_temperature(tmp_path, configs, drawn):
    assert temperature_plot(tmp_path, *configs) is drawn


def test_temperature_plot_lines(tmp_path):
    runs = [
        write_run(tmp_path / "t1", verdicts("1000"), method="low-temp", alpha=1.0),
        write_run(
            tmp_path / "t4",
            [{"problem_id": f"p{i}", "correct": i < 3, "logp_per_token": -0.5 - i} for i in range(4)],
            method="low-temp",
            alpha=4.0,
        ),
        write_run(tmp_path / "t2", verdicts("1100"), method="low-temp", alpha=2.0),
        write_run(tmp_path / "power", verdicts("1111"), method="power", alpha=4.0),
    ]
    fig = sweep_figure("math500", load_rows(runs), next(s for s in SWEEPS if s.name == "temperature"))
    accuracy, loglik = fig.axes
    lines = {line.get_label(): line for line in loglik.get_lines()}
    assert set(lines) == {"low-temp", "power"}
    assert list(lines["low-temp"].get_xdata()) == [0.25, 0.5, 1.0]
    assert list(lines["low-temp"].get_ydata()) == [-2.0, -1.0, -1.0]  # mean of -0.5 .. -3.5; the others' -1
    assert list(lines["power"].get_xdata()) == [0.25]
    drawn = {bars.get_label(): list(bars.lines[0].get_ydata()) for bars in accuracy.containers}  # errorbar lines
    assert drawn == {"low-temp": [0.75, 0.5, 0.25], "power": [1.0]}


def test_bon_rows_show_no_acceptance_and_their_budget(tmp_path):
    """best-of-N counts candidates as proposals but accepts nothing; its token column's estimate is its budget."""
    from support.report_runs import write_run

    from powersample.eval.report import acceptance_cell, load_rows, tokens_cell

    run = write_run(tmp_path / "bon", [{"problem_id": "p0"}, {"problem_id": "p1"}], method="bon", bon_tokens=40)
    [row] = load_rows([run])
    assert acceptance_cell(row) == "—"
    assert tokens_cell(row) == "4.0 / 40.0"
