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
ENTRY = '''    Method("echo", "plain", echo_program, echo_work_units, "a test sampler"),
'''
DRIVE = '''
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
'''


def test_every_knob_belongs_to_one_method_and_is_a_config_field():
    owners = {k: [m.name for m in REGISTRY.values() if k in m.knobs] for k in KNOB_FIELDS}
    assert all(len(o) == 1 for o in owners.values()), owners
    assert set(METHOD_KNOBS) == set(KNOB_FIELDS)
    assert registry.members(SamplerConfig(method="power-rollout", candidates=3, rollouts=5)) == 15
    assert registry.member_field(SamplerConfig(method="power-rollout", candidates=3, rollouts=5)) == "rollouts"
    assert registry.proposal(SamplerConfig(method="base", alpha=4)).temperature == 1.0
    assert registry.proposal(SamplerConfig(method="low-temp", alpha=4)).temperature == 0.25


def test_a_new_sampler_is_one_file_and_one_registry_entry(tmp_path):
    """Add `echo` to a copy of the package, touching nothing else, and use it through the CLI and the server."""
    shutil.copytree(REPO / "powersample", tmp_path / "powersample", ignore=shutil.ignore_patterns("__pycache__"))
    samplers = tmp_path / "powersample" / "samplers"
    (samplers / "echo.py").write_text(ECHO)
    source = (samplers / "registry.py").read_text()
    source = source.replace("from powersample.samplers.mtm import", "from powersample.samplers.echo import "
                            "echo_program, echo_work_units\nfrom powersample.samplers.mtm import", 1)
    anchor = "\n)}  # fmt: skip"
    assert anchor in source
    (samplers / "registry.py").write_text(source.replace(anchor, "\n" + ENTRY.rstrip("\n") + anchor, 1))
    env = {"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    spec = str(SPECS / "early_eos.json")
    sample = subprocess.run([sys.executable, "-m", "powersample.cli", "sample", "x", "--method", "echo", "--backend",
                             "toy", "--toy-spec", spec, "--max-new-tokens", "3", "--quiet"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert sample.returncode == 0, sample.stderr
    assert "method=echo " in sample.stdout and "accepted=0/0" in sample.stdout
    served = subprocess.run([sys.executable, "-c", DRIVE, spec], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    assert served.returncode == 0, served.stderr
    assert json.loads(served.stdout.splitlines()[-1]) == {"status": 200, "method": "echo", "enum": True}
    assert "echo" not in METHODS  # the copy, not this package, has it


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
