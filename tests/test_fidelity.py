"""`powersample bench --fidelity`: the exact law, the quick run's files, the order TV puts samplers in on the trap
spec, the report section, and bad input (exit 2). Toy backend only, quick settings; no timing assertions."""

from __future__ import annotations

import json
import math

import pytest
from support.toy import SPECS, load_spec

from powersample.backends.toy import ToyBackend
from powersample.cli import main
from powersample.eval.report import build_report
from powersample.tools import fidelity
from powersample.tools.fidelity import FidelityOptions, Setting, ToyTarget
from powersample.tools.fidelity import settings as fidelity_settings
from powersample.tools.fidelity.toy import toy_point

ALL_SPECS = sorted(p.stem for p in SPECS.glob("*.json"))


def run_cli(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def quick_dir(tmp_path_factory):
    """One quick toy run on the trap spec, shared by the tests that read its files."""
    out = tmp_path_factory.mktemp("fidelity")
    assert main(["bench", "--fidelity", "--quick", "--quiet", "--spec", "fidelity_trap", "--output-dir", str(out)]) == 0
    return out


@pytest.mark.parametrize("name", ALL_SPECS)
@pytest.mark.parametrize("alpha", [1.0, 4.0])
def test_exact_law_sums_to_one_and_matches_enumeration(name, alpha):
    spec = load_spec(name)
    law = fidelity.power_law(spec, alpha, 4)
    assert math.fsum(law.values()) == pytest.approx(1.0, abs=1e-12)
    weights = {s: math.exp(lp) ** alpha for s, lp in spec.sequences(4).items()}  # plain probabilities, no logs
    want = {s: w / math.fsum(weights.values()) for s, w in weights.items()}
    assert law.keys() == want.keys()
    assert max(abs(law[s] - want[s]) for s in law) < 1e-12


def test_exact_law_at_alpha_one_is_the_model():
    spec = load_spec("fidelity_eos")
    law = fidelity.power_law(spec, 1.0, 6)
    for seq, logp in spec.sequences(6).items():
        assert law[seq] == pytest.approx(math.exp(logp), rel=1e-9)


def test_tv_floor_shrinks_with_more_samples():
    law = fidelity.power_law(load_spec("fidelity_trap"), 4.0, 6)
    small, small_q95 = fidelity.tv_floor(law, 50)
    large, _ = fidelity.tv_floor(law, 5000)
    assert 0 < large < small <= small_q95 <= 1
    assert fidelity.tv_distance(law, law) == 0.0
    assert fidelity.tv_distance({(0,): 1.0}, {(1,): 1.0}) == 1.0


def test_quick_run_writes_table_json_and_png(quick_dir):
    files = fidelity.paths(quick_dir, "toy")
    data = json.loads(files["json"].read_text())
    assert data["complete"] is True and data["mode"] == "toy" and data["samples"] == 200
    [target] = data["targets"]
    assert target["spec"] == "fidelity_trap" and 0 < target["floor"] <= target["floor_q95"] < 1
    methods = {p["method"] for p in target["points"]} | {s["method"] for s in data["skipped"]}
    assert methods == {
        "base",
        "low-temp",
        "power",
        "power-cut",
        "bon",
        "power-mtm",
        "power-smc",
        "power-rollout",
        "power-pt",
    }
    for p in target["points"]:
        assert 0 <= p["tv"] <= 1 and p["tokens_per_sample"] >= p["mean_length"] > 0 and p["calls"] >= 1
    table = files["md"].read_text()
    assert "| method | knobs | TV | TV floor | tokens/sample | calls |" in table
    assert files["png"].read_bytes().startswith(b"\x89PNG")
    assert fidelity.target_png(quick_dir, "fidelity_trap").read_bytes().startswith(b"\x89PNG")


def test_quick_run_holds_every_registered_setting_and_the_matched_budget(quick_dir):
    """Every setting of the quick list is a point (or its method is named as skipped), the pooled importance
    weighting among them; every curve appears at the budget of power with one block and 16 steps."""
    data = json.loads(fidelity.paths(quick_dir, "toy")["json"].read_text())
    [target] = data["targets"]
    want = fidelity_settings.toy_settings(6, len(load_spec("fidelity_trap").vocab), quick=True)
    skipped = {s["method"] for s in data["skipped"]}
    have = [(p["method"], p["knobs"]) for p in target["points"]]
    assert have == [(s.method, dict(s.knobs)) for s in want if s.method not in skipped]
    assert {"ess_threshold": 0.0, "particles": 16} in [p["knobs"] for p in target["points"]]
    matched = target["matched"]
    assert matched["reference"] == {"method": "power", "knobs": {"block_count": 1, "mcmc_steps": 16}}
    assert matched["measure"] == "tv" and matched["tokens_per_sample"] > 6
    assert [c["curve"] for c in matched["curves"]] == list(dict.fromkeys(p["curve"] for p in target["points"]))
    for c in matched["curves"]:
        assert (
            c["within"] is None or c["within"]["tokens_per_sample"] <= matched["slack"] * matched["tokens_per_sample"]
        )
        assert c["over"] is None or c["over"]["tokens_per_sample"] > matched["slack"] * matched["tokens_per_sample"]
    assert (
        "At the token budget of power block_count=1 mcmc_steps=16" in fidelity.paths(quick_dir, "toy")["md"].read_text()
    )


def test_power_pt_settings_are_listed_and_run_once_registered():
    """power-pt at K = 2 and 4 replicas is in the sweeps; until its sampler registers, it is skipped with a note."""
    settings = fidelity_settings.toy_settings(6, 6, quick=False)
    pt = [s for s in settings if s.method == "power-pt"]
    assert {dict(s.knobs)["replicas"] for s in pt} == {2, 4}
    assert {dict(s.knobs)["block_count"] for s in pt} == {1, 6}
    assert {dict(s.knobs)["mcmc_steps"] for s in pt} >= {1, 2, 4, 8, 16}
    run, notes = fidelity_settings.split_registered(settings)
    if fidelity_settings.registered("power-pt"):
        assert pt == [s for s in run if s.method == "power-pt"]
        assert all(s.config(4.0, 6).replicas == dict(s.knobs)["replicas"] for s in pt)
    else:
        assert "power-pt" in {n["method"] for n in notes} and not any(s.method == "power-pt" for s in run)
    pooled = [dict(s.knobs) for s in settings if s.curve == "power-smc pooled IW (ess=0)"]
    assert pooled == [{"ess_threshold": 0.0, "particles": n} for n in (4, 16, 64)]


def test_matched_budget_takes_the_best_point_within_and_the_cheapest_over():
    def point(method, knobs, tokens, value, curve=None):
        return {"method": method, "knobs": knobs, "curve": curve or method, "tokens_per_sample": tokens, "tv": value}

    points = [
        point("power", {"block_count": 1, "mcmc_steps": 16}, 50.0, 0.4),
        point("power-smc", {"particles": 4}, 20.0, 0.3),
        point("power-smc", {"particles": 16}, 52.0, 0.2),  # within the slack (SLACK x 50 tokens)
        point("power-smc", {"particles": 64}, 200.0, 0.01),
        point("power-smc", {"particles": 256}, 800.0, 0.005),
        point("bon", {"bon_tokens": 400}, 400.0, 0.5),
    ]
    matched = fidelity.matched_budget(points, fidelity_settings.TOY_REFERENCE, "toy")
    assert matched["tokens_per_sample"] == 50.0
    smc = next(c for c in matched["curves"] if c["curve"] == "power-smc")
    assert smc["within"] == {"knobs": {"particles": 16}, "tokens_per_sample": 52.0, "tv": 0.2}
    assert smc["over"]["knobs"] == {"particles": 64}
    bon = next(c for c in matched["curves"] if c["curve"] == "bon")
    assert bon["within"] is None and bon["over"]["tv"] == 0.5
    assert fidelity.matched_budget(points[1:], fidelity_settings.TOY_REFERENCE, "toy") is None
    model = [p | {"logp_per_token": -p["tv"]} for p in points]  # higher is better on a model
    model[0]["knobs"] = dict(fidelity_settings.MODEL_REFERENCE.knobs)
    smc = fidelity.matched_budget(model, fidelity_settings.MODEL_REFERENCE, "model")["curves"][1]
    assert smc["within"]["knobs"] == {"particles": 16} and smc["within"]["logp_per_token"] == -0.2


def test_unregistered_methods_are_skipped_with_a_note(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(fidelity_settings, "registered", lambda method: method in ("base", "low-temp"))
    code, out, _ = run_cli(
        ["bench", "--fidelity", "--quick", "--quiet", "--spec", "eos_trap", "--output-dir", str(tmp_path)], capsys
    )
    assert code == 0
    data = json.loads(fidelity.paths(tmp_path, "toy")["json"].read_text())
    assert {p["method"] for p in data["targets"][0]["points"]} == {"base", "low-temp"}
    assert [s["method"] for s in data["skipped"]] == [
        "power",
        "power-cut",
        "bon",
        "power-mtm",
        "power-smc",
        "power-rollout",
        "power-pt",
    ]
    assert "power-smc: no sampler registered" in out


def test_methods_picks_the_settings_and_refuses_unknown_names(tmp_path, capsys):
    code, _, _ = run_cli(
        [
            "bench",
            "--fidelity",
            "--quick",
            "--quiet",
            "--spec",
            "eos_trap",
            "--methods",
            "low-temp,power-cut",
            "--output-dir",
            str(tmp_path),
        ],
        capsys,
    )
    assert code == 0
    data = json.loads(fidelity.paths(tmp_path, "toy")["json"].read_text())
    assert {p["method"] for p in data["targets"][0]["points"]} == {"low-temp", "power-cut"}
    assert data["methods"] == ["low-temp", "power-cut"]
    code, _, err = run_cli(
        ["bench", "--fidelity", "--quick", "--methods", "power,nope", "--output-dir", str(tmp_path / "x")], capsys
    )
    assert code == 2 and "unknown nope" in err


def test_power_with_many_steps_beats_low_temp_on_the_trap_spec():
    """Low temperature is myopic and lands in the trap; MH at 16 steps per stage gets close to p^alpha."""
    spec = load_spec("fidelity_trap")
    law = fidelity.power_law(spec, 4.0, 6)
    options = FidelityOptions("toy", 4.0, 6, samples=400, targets=(ToyTarget.resolve("fidelity_trap", 6),))
    backend = ToyBackend(spec)
    low = toy_point(backend, law, Setting("low-temp"), options, 6)
    power = toy_point(backend, law, Setting("power", (("block_count", 6), ("mcmc_steps", 16))), options, 6)
    assert power.tv < 0.5 * low.tv
    assert power.tokens_per_sample > low.tokens_per_sample


def test_model_mode_on_a_toy_backend_renders(tmp_path):
    """The model comparison's code path, with the toy backend standing in for a model."""
    options = FidelityOptions("model", 4.0, 4, samples=2, quick=True, prompts=("p",))
    data = fidelity.run_model(options, ToyBackend(load_spec("eos_trap")), {"name": "toy", "model": "eos_trap"})
    base = next(p for p in data["points"] if p["method"] == "base")
    assert base["wall_vs_base"] == pytest.approx(1.0) and base["samples"] == 2
    assert all(p["logp_per_token"] <= 0 and p["tokens_per_sample"] >= p["mean_length"] for p in data["points"])
    assert all(p["logp_per_token_se"] >= 0 for p in data["points"])
    assert data["matched"] is None  # the quick list has no power with 4 blocks and 4 steps
    written = fidelity.write_outputs(tmp_path, data)
    assert {p.name for p in written} == {"fidelity_model.json", "fidelity_model.md", "fidelity_model.png"}
    text, _ = fidelity.fidelity_section(tmp_path, None)
    assert "log-lik/token" in text and "fidelity_model.png" in text


def test_model_mode_pairs_every_setting_with_the_reference(tmp_path):
    """With power at 4 blocks and 4 steps measured, each setting's gap to it is paired by (prompt, seed), and every
    curve is put at its token budget."""
    options = FidelityOptions("model", 4.0, 4, samples=2, prompts=("p", "q"), methods=("power", "power-smc"))
    data = fidelity.run_model(options, ToyBackend(load_spec("eos_trap")), {"name": "toy", "model": "eos_trap"})
    ref = next(p for p in data["points"] if fidelity_settings.MODEL_REFERENCE.same(p))
    assert ref["vs_reference"] == {"mean": 0.0, "se": 0.0} and ref["samples"] == 4
    assert all(p["vs_reference"]["se"] is not None for p in data["points"])
    assert data["matched"]["tokens_per_sample"] == ref["tokens_per_sample"]
    assert {c["curve"] for c in data["matched"]["curves"]} == {p["curve"] for p in data["points"]}
    assert any(p["knobs"].get("ess_threshold") == 0.0 for p in data["points"])
    table = fidelity.render_table(data)
    assert "vs reference, paired" in table and "At the token budget of power block_count=4 mcmc_steps=4" in table
    fidelity.write_outputs(tmp_path, data)
    assert fidelity.paths(tmp_path, "model")["png"].read_bytes().startswith(b"\x89PNG")


def test_report_renders_the_fidelity_section(quick_dir, tmp_path, capsys):
    table, plots = build_report([quick_dir], tmp_path / "report", sections=(fidelity.SECTION,))
    assert "Fidelity per compute" in table and "| power |" in table
    assert "![fidelity per compute, toy](fidelity_toy.png)" in table
    assert (tmp_path / "report" / "fidelity_toy.png").read_bytes().startswith(b"\x89PNG")
    assert tmp_path / "report" / "fidelity_toy.png" in plots
    assert "Fidelity per compute" in (tmp_path / "report" / "report.md").read_text()
    code, out, _ = run_cli(["report", str(quick_dir), "--no-plots"], capsys)
    assert code == 0 and "TV floor" in out


@pytest.mark.parametrize(
    "argv",
    [
        ["--samples", "0"],
        ["--spec", "no-such-spec"],
        ["--mcmc-steps", "3"],
        ["--json", "x.json"],
        ["--alpha", "0"],
        ["--max-new-tokens", "14"],  # too many sequences to enumerate
        ["--spec", "fidelity_trap", "--backend", "hf"],  # a toy spec with a model backend
    ],
)
def test_bad_input_exits_2(argv, tmp_path, capsys):
    code, _, err = run_cli(["bench", "--fidelity", "--quick", "--quiet", "--output-dir", str(tmp_path), *argv], capsys)
    assert code == 2 and "powersample: error:" in err


def test_malformed_spec_and_results_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"vocab": ["a"], "eos_id": 3}')
    code, _, err = run_cli(
        ["bench", "--fidelity", "--quiet", "--spec", str(bad), "--output-dir", str(tmp_path / "out")], capsys
    )
    assert code == 2 and "toy spec" in err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "fidelity_toy.json").write_text("{not json")
    code, _, err = run_cli(["report", str(broken), "--no-plots"], capsys)
    assert code == 2 and "fidelity results" in err
