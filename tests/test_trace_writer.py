"""`powersample sample --trace FILE`: the events the samplers record, written as JSONL, replay into the samples."""

from __future__ import annotations

import json

import pytest
from support.toy import SPECS, load_spec

from powersample.api import make_chains
from powersample.backends.toy import ToyBackend
from powersample.cli import main
from powersample.config import SamplerConfig
from powersample.eval.trace import replay
from powersample.samplers import programs


def sample_with_trace(tmp_path, method: str, *extra: str) -> tuple[list[dict], list[dict]]:
    trace, out = tmp_path / "trace.jsonl", tmp_path / "out.jsonl"
    code = main(
        [
            "sample",
            "q",
            "--backend",
            "toy",
            "--toy-spec",
            str(SPECS / "eos_trap.json"),
            "--method",
            method,
            "--max-new-tokens",
            "4",
            "--block-count",
            "2",
            "--mcmc-steps",
            "3",
            "--num-samples",
            "3",
            "--quiet",
            "--trace",
            str(trace),
            "--output",
            str(out),
            *extra,
        ]
    )
    assert code == 0
    events = [json.loads(line) for line in trace.read_text().splitlines()]
    return events, [json.loads(line) for line in out.read_text().splitlines()]


@pytest.mark.parametrize("method", ["power", "power-cut", "max-swap"])
def test_mh_traces_replay_into_the_samples(tmp_path, method):
    events, records = sample_with_trace(tmp_path, method)
    assert {e["chain"] for e in events} == {0, 1, 2}
    for chain, record in enumerate(records):
        mine = [e for e in events if e["chain"] == chain]
        assert mine[0]["event"] == "start" and mine[-1]["event"] == "end"
        steps = [e for e in mine if e["event"] == "step"]
        assert len(steps) == record["proposals"] and sum(e["accepted"] for e in steps) == record["accepted"]
        assert mine[-1]["tokens"] == record["tokens"]
        assert all(len(e["pieces"]) == len(e["proposal"]) for e in steps)
    state = replay(tmp_path / "trace.jsonl", chain=1)  # the report replays it and checks it against "end"
    assert list(state.tokens) == records[1]["tokens"]


@pytest.mark.parametrize("method", ["base", "low-temp"])
def test_plain_traces_note_the_tokens_as_they_are_drawn(tmp_path, method):
    events, records = sample_with_trace(tmp_path, method, "--max-new-tokens", "12")
    for chain, record in enumerate(records):
        draws = [e for e in events if e["chain"] == chain and e["event"] == "draw"]
        assert [t for e in draws for t in e["tokens"]] == record["tokens"]
        assert all(len(e["tokens"]) == 1 and len(e["pieces"]) == 1 for e in draws)  # the toy reports every token
    assert [e["event"] for e in events if e["chain"] == 0][-1] == "end"


def test_untraced_plain_chains_ask_for_no_reports():
    backend = ToyBackend(load_spec("eos_trap"))
    program = programs(backend, (), SamplerConfig(method="base", max_new_tokens=4), make_chains(0, 1))[0]
    assert next(program).report.on_draw is None  # a plain chain's one request


def test_smc_traces_weights_per_block(tmp_path):
    events, _ = sample_with_trace(
        tmp_path, "power-smc", "--particles", "4", "--ess-threshold", "1.0", "--proposal-temperature", "1.0"
    )
    smc = [e for e in events if e["event"] == "smc"]
    for chain in range(3):
        stages = [e["stage"] for e in smc if e["chain"] == chain]
        assert stages == list(range(1, len(stages) + 1)) and stages
    assert all(len(e["log_weights"]) == 4 and 0 < e["ess"] <= 4 + 1e-9 for e in smc)
    assert all(len(e["ancestors"]) == 4 for e in smc if e["resampled"])
    assert any(e["resampled"] for e in smc) and not all(e["resampled"] for e in smc)


def test_an_unwritable_trace_path_fails_before_sampling(tmp_path, capsys):
    code = main(
        [
            "sample",
            "q",
            "--backend",
            "toy",
            "--toy-spec",
            str(SPECS / "eos_trap.json"),
            "--quiet",
            "--trace",
            str(tmp_path / "missing" / "t.jsonl"),
        ]
    )
    assert code == 2 and "cannot write" in capsys.readouterr().err
