"""A bounded schemathesis run against the served OpenAPI document (`/openapi.json`), on the toy backend, over
loopback: a fixed seed, a few hundred cases. It must end with zero 5xx, zero responses outside the document (status
codes, headers, content types, bodies) and no exception or error log in the server.

positive_data_acceptance is left out: the document gives the fields' types, not the semantic rules (a non-empty
prompt, limits that depend on the server's flags), so a schema-valid body may rightly get a 400.

The same run by hand, at any size (see the README's Serve section):

    schemathesis run http://127.0.0.1:8000/openapi.json --checks all --exclude-checks positive_data_acceptance \
        --max-examples 300 --seed 1 -w 1
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("schemathesis")

from test_server_hardening import watched_server  # noqa: E402

from powersample.config import SamplerConfig  # noqa: E402
from powersample.server.protocol import Limits  # noqa: E402

CASES_PER_OPERATION = 40
FUZZ_DEFAULTS = SamplerConfig(max_new_tokens=6, block_size=3, mcmc_steps=2)
FUZZ_LIMITS = Limits(max_tokens=16, max_mcmc_steps=4, max_members=64, max_work=512, request_timeout=30)


def schemathesis_command() -> list[str]:
    """The schemathesis CLI of this interpreter's environment."""
    beside = Path(sys.executable).with_name("schemathesis")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("schemathesis")
    if found is None:
        pytest.skip("the schemathesis command is not installed")
    return [found]


def test_schemathesis_finds_no_5xx_and_no_schema_violation(tmp_path):
    with watched_server(defaults=FUZZ_DEFAULTS, limits=FUZZ_LIMITS) as (base, finished, escaped, logged):
        command = [*schemathesis_command(), "run", f"{base}/openapi.json", "--checks", "all", "--exclude-checks",
                   "positive_data_acceptance", "--max-examples", str(CASES_PER_OPERATION), "--seed", "1", "-w", "1",
                   "--no-color", "--generation-database", "none", "--request-timeout", "30"]  # fmt: skip
        run = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    report = run.stdout + run.stderr
    assert run.returncode == 0, report[-6000:]
    generated = re.search(r"(\d+) generated, (\d+) passed", report)
    assert generated and generated.group(1) == generated.group(2) and int(generated.group(1)) >= 100, report[-3000:]
    assert escaped == [] and [r.getMessage() for r in logged] == []
