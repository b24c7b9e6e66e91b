"""The sampler registry is the one place a method is declared: adding one is a file plus one entry, and every
front end (CLI options, server request fields and its OpenAPI enum, eval, the family checks) follows."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from support.toy import SPECS, load_spec

from powersample.config import KNOB_FIELDS, SamplerConfig
from powersample.samplers import registry
from powersample.samplers.registry import METHOD_KNOBS, METHODS, REGISTRY
from powersample.server import protocol as wire

REPO = Path(__file__).resolve().parent.parent

ECHO = '''"""A test sampler: one draw from q, like `low-temp`, to show what adding a method takes."""

from __future__ import annotations

from powersample.config import SamplerConfig
from powersample.core.types import ExtendRequest, Tokens
from powersample.samplers.chain import Chain
from powersample.samplers.driver import Program


def echo_program(prompt: Tokens, config: SamplerConfig, chain: Chain, eos_ids: frozenset[int]) -> Program:
    cont = yield ExtendRequest(prompt, config.max_new_tokens, chain.rng, chain.slot)
    chain.append(cont)
    chain.tokens_generated += len(cont.tokens)
    return chain.result()


def echo_work_units(config: SamplerConfig) -> int:
    return 1
'''
ENTRY = """    Method("echo", "plain", echo_program, echo_work_units, "a test sampler"),
"""
DRIVE = """
import json, sys
from fastapi.testclient import TestClient
from powersample.backends import load_backend
from powersample.server.app import Settings, create_app
app = create_app(load_backend("toy", toy_spec=sys.argv[1]), Settings(allowed_hosts=("testserver",)))
with TestClient(app) as client:
    reply = client.post("/v1/completions", json={"prompt": "x", "method": "echo", "max_tokens": 3, "seed": 1})
    enum = client.get("/openapi.json").json()
print(json.dumps({"status": reply.status_code, "method": reply.json()["power_sampling"]["method"],
                  "enum": "echo" in json.dumps(enum)}))
"""


def test_every_knob_belongs_to_one_method_and_is_a_config_field():
    owners = {k: [m.name for m in REGISTRY.values() if k in m.knobs] for k in KNOB_FIELDS}
    assert all(len(o) == 1 for o in owners.values()), owners
    assert set(METHOD_KNOBS) == set(KNOB_FIELDS)
    assert registry.members(SamplerConfig(method="power-rollout", candidates=3, rollouts=5)) == 15
    assert registry.member_field(SamplerConfig(method="power-rollout", candidates=3, rollouts=5)) == "rollouts"
    assert registry.proposal(SamplerConfig(method="base", alpha=4)).temperature == 1.0
    assert registry.proposal(SamplerConfig(method="low-temp", alpha=4)).temperature == 0.25


def package_with(tmp_path: Path, module: str, source: str, imports: str, entry: str, fields: str = "") -> dict:
    """A copy of the package under tmp_path with one sampler file added (`module`.py, importing `imports` from it),
    one registry entry, and `fields` (SamplerConfig declarations, one per new knob) added to the config; nothing
    else edited. Returns the environment that imports the copy."""
    shutil.copytree(REPO / "powersample", tmp_path / "powersample", ignore=shutil.ignore_patterns("__pycache__"))
    samplers = tmp_path / "powersample" / "samplers"
    (samplers / f"{module}.py").write_text(source)
    registry_source = (samplers / "registry.py").read_text()
    registry_source = registry_source.replace(
        "from powersample.samplers.mtm import",
        f"from powersample.samplers.{module} import {imports}\nfrom powersample.samplers.mtm import",
        1,
    )
    anchor = "\n)}  # fmt: skip"
    assert anchor in registry_source
    (samplers / "registry.py").write_text(registry_source.replace(anchor, "\n" + entry.rstrip("\n") + anchor, 1))
    if fields:
        config = tmp_path / "powersample" / "config.py"
        last = "\n\n    def __post_init__(self) -> None:\n        for name, spec in SPECS.items():"
        assert last in config.read_text()
        config.write_text(config.read_text().replace(last, "\n" + fields.rstrip("\n") + last, 1))
    return {"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}


def test_a_new_sampler_is_one_file_and_one_registry_entry(tmp_path):
    """Add `echo` to a copy of the package, touching nothing else, and use it through the CLI and the server."""
    env = package_with(tmp_path, "echo", ECHO, "echo_program, echo_work_units", ENTRY)
    spec = str(SPECS / "early_eos.json")
    sample = subprocess.run(
        [
            sys.executable,
            "-m",
            "powersample.cli",
            "sample",
            "x",
            "--method",
            "echo",
            "--backend",
            "toy",
            "--toy-spec",
            spec,
            "--max-new-tokens",
            "3",
            "--quiet",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert sample.returncode == 0, sample.stderr
    assert "method=echo " in sample.stdout and "accepted=0/0" in sample.stdout
    served = subprocess.run(
        [sys.executable, "-c", DRIVE, spec], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert served.returncode == 0, served.stderr
    assert json.loads(served.stdout.splitlines()[-1]) == {"status": 200, "method": "echo", "enum": True}
    assert "echo" not in METHODS  # the copy, not this package, has it


# A sampler with knobs: `temper`, the temperature it draws at (a ranged float), and `copies`, the sequences one chain
# holds (a member-setting int). What its author writes: this file, one registry entry, one declaration per knob.
TEMPERED = (
    ECHO.replace("echo_", "tempered_")
    + """

def tempered_temperature(config: SamplerConfig) -> float:
    return config.temper
"""
)
TEMPERED_ENTRY = """    Method("tempered", "plain", tempered_program, tempered_work_units, "a test sampler with knobs",
           knobs=("temper", "copies"), temperature=tempered_temperature),
"""
TEMPERED_FIELDS = """    temper: float = knob(1.5, "the temperature drawn at", lo=0, hi=10, lo_open=True)
    copies: int = knob(2, "sequences per chain", lo=1, members=True)
"""
DRIVE_KNOBS = """
import contextlib, io, json, sys
from fastapi.testclient import TestClient
from powersample.backends import load_backend
from powersample.cli import main
from powersample.server.app import Settings, create_app

def cli(*argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()

toy = ["--backend", "toy", "--toy-spec", sys.argv[1], "--max-new-tokens", "3", "--quiet"]
bad = {"ok": [], "hot": ["--temper", "20"], "cold": ["--temper", "0"], "none": ["--copies", "0"]}
result = {"help": cli("sample", "--help")[1],
          "cli": {k: cli("sample", "x", "--method", "tempered", *toy, *v) for k, v in bad.items()}}
app = create_app(load_backend("toy", toy_spec=sys.argv[1]), Settings(allowed_hosts=("testserver",)))
with TestClient(app) as client:
    cases = {"ok": {}, "hot": {"temper": 20}, "many": {"copies": 10**6}, "none": {"copies": 0},
             "budget": {"copies": 3000, "n": 2}}
    for name, extra in cases.items():
        reply = client.post("/v1/completions", json={"prompt": "x", "method": "tempered", "max_tokens": 3, **extra})
        answer = reply.json()
        result[name] = [reply.status_code, answer.get("error"), answer.get("power_sampling", {}).get("config")]
    body = client.get("/openapi.json").json()["components"]["schemas"]["CompletionBody"]["properties"]
    result["openapi"] = {k: body[k]["anyOf"][0] for k in ("temper", "copies")}
print(json.dumps(result))
"""


def test_a_new_sampler_with_knobs_is_one_file_one_entry_and_a_declaration_per_knob(tmp_path):
    """`tempered`'s two knobs, declared once in SamplerConfig, become CLI options with their help and one-line
    range errors, request fields with their 400s, member caps and /openapi.json ranges, with nothing else edited."""
    env = package_with(
        tmp_path,
        "tempered",
        TEMPERED,
        "tempered_program, tempered_temperature, tempered_work_units",
        TEMPERED_ENTRY,
        TEMPERED_FIELDS,
    )
    run = subprocess.run(
        [sys.executable, "-c", DRIVE_KNOBS, str(SPECS / "early_eos.json")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout.splitlines()[-1])
    help_text = " ".join(got["help"].split())
    assert "--temper TEMPER tempered: the temperature drawn at (default 1.5)" in help_text
    assert "--copies COPIES tempered: sequences per chain (default 2)" in help_text
    cli = got["cli"]
    assert cli["ok"][0] == 0 and "method=tempered " in cli["ok"][1], cli["ok"]
    for case, message in {
        "hot": "temper must be in (0, 10], got 20.0",
        "cold": "temper must be in (0, 10], got 0.0",
        "none": "copies must be >= 1, got 0",
    }.items():
        code, _, err = cli[case]
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (case, err)
    status, _, config = got["ok"]
    assert status == 200 and config["temper"] == 1.5 and config["copies"] == 2 and config["proposal_temperature"] == 1.5
    assert got["hot"][:2] == [
        400,
        {
            "message": "temper must be in (0, 10], got 20.0",
            "type": "invalid_request_error",
            "param": "temper",
            "code": None,
        },
    ]
    assert got["none"][0] == 400 and got["none"][1]["param"] == "copies"
    assert got["many"][0] == 400 and got["many"][1]["param"] == "copies" and got["many"][1]["code"] == "over_limit"
    max_members = wire.Limits().max_members
    assert got["budget"][0] == 400 and got["budget"][1]["param"] == "copies"  # 2 x 3000 members: the budget's cap
    assert got["budget"][1]["message"].startswith("the request asks for 6000 sequences")
    assert got["openapi"] == {
        "temper": {"type": "number", "exclusiveMinimum": 0, "maximum": 10},
        "copies": {"type": "integer", "minimum": 1, "maximum": max_members},
    }


def test_acceptance_rate_is_null_where_no_mh_proposal_was_made():
    """One definition for records, the report, the server and bench: a rate only for MCMC runs that proposed."""
    assert registry.acceptance_rate("power", 4, 3) == 0.75
    assert registry.acceptance_rate("power", 0, 0) is None  # mcmc_steps 0
    for method in ("base", "low-temp", "bon", "power-smc", "power-rollout"):
        assert registry.acceptance_rate(method, 5, 0) is None, method


def test_a_plain_record_says_null_not_zero():
    from powersample import sample
    from powersample.backends.toy import ToyBackend

    [record] = sample(ToyBackend(load_spec("eos_trap")), "x", SamplerConfig(method="base", max_new_tokens=3))
    assert record.acceptance_rate is None and '"acceptance_rate": null' in json.dumps(record.to_dict())
