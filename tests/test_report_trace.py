"""`powersample report --trace`: replaying a hand-written chain trace (extensions over two stages, accepted and
rejected MH steps, an SMC event, an unknown event and unknown keys, a second chain), the HTML marking what wrote
each span, the files written, and one-line errors for inconsistent, torn and garbage files."""

from __future__ import annotations

import json
import re

import pytest

from powersample.cli import main
from powersample.eval.trace import Point, Write, acceptance_by_position, replay

PNG = b"\x89PNG\r\n\x1a\n"


def step(stage, n, cut, length, proposal, pieces, accepted, logp, length_after):
    return {
        "event": "step",
        "chain": 0,
        "stage": stage,
        "step": n,
        "cut": cut,
        "length": length,
        "proposal": proposal,
        "pieces": pieces,
        "log_r": -0.5 if accepted else None,
        "terms": {"target": -1.0, "proposal": 0.5, "cut": None},
        "log_u": -1.2,
        "accepted": accepted,
        "logp": logp,
        "length_after": length_after,
    }


EVENTS = [
    {
        "event": "start",
        "chain": 0,
        "prompt": "<script>alert(1)</script>",
        "method": "power",
        "seed": 3,
        "sample_index": 0,
        "config": {"alpha": 4.0},
    },
    {"event": "start", "chain": 1, "prompt": "other", "method": "power", "seed": 4, "sample_index": 1, "config": {}},
    {
        "event": "extend",
        "chain": 0,
        "stage": 1,
        "at": 0,
        "tokens": [1, 2, 3],
        "pieces": ["a", "b", "c"],
        "base_logp": [-1.0, -1.0, -1.0],
        "logp": -3.0,
        "length": 3,
    },
    step(1, 0, 1, 3, [4, 5], ["D", "E"], True, -2.5, 3),  # state a D E
    {"event": "extend", "chain": 1, "stage": 1, "at": 0, "tokens": [9], "pieces": ["z"], "logp": -1.0, "length": 1},
    step(1, 1, 2, 3, [6], ["F"], False, -2.5, 3),
    {"event": "heartbeat", "at": "noon"},  # an event of a kind from the future
    {
        "event": "extend",
        "chain": 0,
        "stage": 2,
        "at": 3,
        "tokens": [7, 8],
        "pieces": ["g", "h"],
        "logp": -4.0,
        "length": 5,
        "future_key": {"x": 1},
    },  # state a D E g h
    {
        "event": "smc",
        "chain": 0,
        "stage": 2,
        "ess": 12.5,
        "log_weights": [0.0, -1.0],
        "resampled": True,
        "ancestors": None,
    },
    step(2, 0, 4, 5, [9], ["<I>"], True, -3.9, 5),  # state a D E g <I>
    step(2, 1, 0, 5, [1, 1, 1], ["x", "y", "z"], False, -3.9, 5),
    {
        "event": "end",
        "chain": 0,
        "tokens": [1, 4, 5, 7, 9],
        "pieces": ["a", "D", "E", "g", "<I>"],
        "logp": -3.9,
        "text": "aDEg<I>",
    },
    {"event": "end", "chain": 1, "tokens": [9], "pieces": ["z"], "logp": -1.0, "text": "z"},
]


def write_trace(path, events, tail=""):
    path.write_text("".join(json.dumps(e) + "\n" for e in events) + tail)
    return path


def test_replay_rebuilds_the_state_and_what_wrote_it(tmp_path):
    r = replay(write_trace(tmp_path / "t.jsonl", EVENTS))
    assert r.chain == 0 and r.start["seed"] == 3
    assert r.tokens == (1, 4, 5, 7, 9) and "".join(r.pieces) == "aDEg<I>"
    assert r.writes == (Write(1, None, 0), Write(1, 0, 1), Write(2, None, 3), Write(2, 0, 4))
    assert r.writers == (0, 1, 1, 2, 3)  # stage 2's "h" was replaced by its step 0
    assert [w.name for w in r.writes] == ["stage 1 extension", "stage 1 step 0", "stage 2 extension", "stage 2 step 0"]
    assert r.points[:2] == (Point(1, None, -3.0), Point(1, 0, -2.5, True, 1, 3))
    assert [p.logp for p in r.points] == [-3.0, -2.5, -2.5, -4.0, -3.9, -3.9]
    assert [p.accepted for p in r.steps] == [True, False, True, False]
    assert r.ess == (12.5,) and r.logp == -3.9
    # cut / length: 1/3, 2/3, 4/5, 0/5 fall in the bins 3, 6, 8 and 0 of ten
    counts = acceptance_by_position(r.steps)
    assert {i: c for i, c in enumerate(counts) if c[0]} == {0: (1, 0), 3: (1, 1), 6: (1, 0), 8: (1, 1)}
    other = replay(tmp_path / "t.jsonl", chain=1)
    assert other.tokens == (9,) and other.steps == [] and other.start["seed"] == 4


def test_report_trace_writes_summary_html_and_plot(tmp_path, capsys):
    trace = write_trace(tmp_path / "t.jsonl", EVENTS, tail='{"event": "step", "chain": 0, "sta')  # torn last line
    plots = tmp_path / "plots"
    assert main(["report", "--trace", str(trace), "--plot-dir", str(plots)]) == 0
    out = capsys.readouterr().out
    assert "| 2 | 4 | 2 | 0.500 | -3.900 | 5 | 1 |" in out  # stages, steps, accepted, rate, log p, tokens, SMC
    assert "Accepted cuts (stage.step: cut / length): 1.0: 1 / 3, 2.0: 4 / 5" in out
    assert "```text\na[[DE]]g[[<I>]]\n```" in out
    assert "| 0.3–0.4 | 1 | 1 | 1.000 |" in out and "| 0.6–0.7 | 1 | 0 | 0.000 |" in out
    assert (plots / "trace_chain0.md").read_text().strip() == out.strip()
    assert (plots / "trace_chain0.png").read_bytes()[:8] == PNG
    page = (plots / "trace_chain0.html").read_text()
    spans = re.findall(r'<span class="(\w+)" data-write="(\d)" title="([^"]+)" style="[^"]+">([^<]*)</span>', page)
    assert spans == [
        ("extend", "0", "stage 1 extension", "a"),
        ("step", "1", "stage 1 step 0", "DE"),
        ("extend", "2", "stage 2 extension", "g"),
        ("step", "3", "stage 2 step 0", "&lt;I&gt;"),
    ]
    assert "<I>" not in page and "<script>" not in page and "&lt;script&gt;" in page  # every text escaped
    assert "stage 2 step 0: tokens 4–4" in page and "0 accepted step(s) overwritten later" in page


def test_chain_option_and_no_plots(tmp_path, capsys):
    trace = write_trace(tmp_path / "t.jsonl", EVENTS)
    assert main(["report", "--trace", str(trace), "--chain", "1", "--plot-dir", str(tmp_path / "p")]) == 0
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == [
        "trace_chain1.html",
        "trace_chain1.md",
        "trace_chain1.png",
    ]
    assert "```text\nz\n```" in capsys.readouterr().out
    assert main(["report", "--trace", str(trace), "--no-plots", "--plot-dir", str(tmp_path / "none")]) == 0
    assert "a[[DE]]g[[<I>]]" in capsys.readouterr().out and not (tmp_path / "none").exists()


def test_an_overwritten_step_leaves_no_span(tmp_path):
    events = [
        EVENTS[0],
        EVENTS[2],
        step(1, 0, 1, 3, [4, 5], ["D", "E"], True, -2.5, 3),
        step(1, 1, 0, 3, [6], ["F"], True, -1.0, 1),
    ]
    r = replay(write_trace(tmp_path / "t.jsonl", events))
    assert r.tokens == (6,) and r.writers == (2,)  # no end event: the replayed state stands


def bad(tmp_path, capsys, argv, content):
    path = tmp_path / "t.jsonl"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        write_trace(path, content) if isinstance(content, list) else path.write_text(content)
    code = main(["report", *argv, "--plot-dir", str(tmp_path / "plots")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("powersample: error: ") and "\n" not in err and "Traceback" not in err
    return err


def replaced(index, **change):
    return [dict(e, **change) if i == index else e for i, e in enumerate(EVENTS)]


@pytest.mark.parametrize(
    "content, argv, words",
    [
        (replaced(11, tokens=[1, 4, 5, 7, 8]), [], "is inconsistent: chain 0, line 12: its 5 final tokens differ"),
        (replaced(3, cut=4), [], "is inconsistent: chain 0, line 4: it starts at token 4 of a state of 3"),
        (replaced(3, length=9), [], "is inconsistent: chain 0, line 4: it says the state has 9 tokens"),
        (replaced(2, at=2), [], "is inconsistent"),
        (replaced(3, pieces=["D"]), [], "line 4: stage 1 step 0 needs 'pieces', one string per token"),
        (replaced(2, tokens=[1, "2", 3]), [], "line 3: stage 1 extension has tokens that are not a list of integers"),
        (
            [{k: v for k, v in EVENTS[2].items() if k != "at"}],
            [],
            "line 1: extend event has no 'at' (expected an integer)",
        ),
        (replaced(3, accepted="yes"), [], "line 4: step event has a bad 'accepted' (expected true/false)"),
        (EVENTS + [EVENTS[0]], [], "chain starts again"),
        (EVENTS, ["--chain", "5"], "has no chain 5 (it has 0, 1)"),
        ("this is not JSON\n", [], "line 1 is not valid JSON"),
        ("[1, 2]\n", [], "line 1 is not an event"),
        (b"\x89PNG\r\n\x1a\n\x00\xff\xfe", [], "line 1 is not valid JSON"),
        ("", [], "holds no chain events"),
        ('{"event": "heartbeat"}\n{"event": "start", "chain": 0, "prompt": "q"', [], "holds no chain events"),
        (None, [], "cannot read trace"),
    ],
)
def test_bad_traces_are_one_line_errors(tmp_path, capsys, content, argv, words):
    assert words in bad(tmp_path, capsys, ["--trace", str(tmp_path / "t.jsonl"), *argv], content)


def test_report_needs_run_directories_or_a_trace(tmp_path, capsys):
    assert "needs run directories, or a chain trace" in bad(tmp_path, capsys, [], None)
    assert "--chain needs --trace" in bad(tmp_path, capsys, [str(tmp_path), "--chain", "0"], None)
