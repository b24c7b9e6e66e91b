"""A bounded schemathesis run against the served OpenAPI document (`/openapi.json`), on the toy backend, over
loopback: a fixed seed, every check (positive_data_acceptance included), over a thousand cases. It must end with
zero 5xx, zero responses outside the document (status codes, headers, content types, bodies), every schema-valid
body served (2xx), every schema-invalid one refused, and no exception or error log in the server.

The document states each field's real range under this server's limits and vocabulary, and the rules that join
fields where JSON Schema can (schema.openapi). The one it cannot is the request's budget, a product of fields
(prompts x n x members x max_tokens; bon's token budget): support/fuzz_hooks.py drops a positive_data_acceptance failure
only when the server's own budget rule refuses that very body with that very message.

The same run by hand, at any size (see docs/serving.md):

    PYTHONPATH=.:tests SCHEMATHESIS_HOOKS=support.fuzz_hooks schemathesis run http://127.0.0.1:8000/openapi.json \
        --checks all --max-examples 60 --seed 1 -w 1

(the hooks read their FUZZ_DEFAULTS and FUZZ_LIMITS: start the server with them, or leave the hooks out and
read a 400 "the request asks for ..." as the budget rule).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("schemathesis")

from support.fuzz_hooks import FUZZ_DEFAULTS, FUZZ_LIMITS
from support.server import watched_server

pytestmark = pytest.mark.fuzz

CASES_PER_OPERATION = 60  # with the coverage phase's cases: about 1,200 in all, in about a minute on 2 cores
# One worker: with -w 2, schemathesis's threads compile hypothesis code at once, which Python 3.11 does not survive
# ("SystemError: AST constructor recursion depth mismatch", a schemathesis Runtime Error, never the server's)


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
        command = [
            *schemathesis_command(),
            "run",
            f"{base}/openapi.json",
            "--checks",
            "all",
            "--max-examples",
            str(CASES_PER_OPERATION),
            "--seed",
            "1",
            "-w",
            "1",
            "--no-color",
            "--generation-database",
            "none",
            "--request-timeout",
            "30",
        ]
        tests = Path(__file__).parent
        paths = os.pathsep.join([str(tests.parent), str(tests), os.environ.get("PYTHONPATH", "")])
        env = {**os.environ, "PYTHONPATH": paths, "SCHEMATHESIS_HOOKS": "support.fuzz_hooks"}
        run = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    report = run.stdout + run.stderr
    assert run.returncode == 0, report[-6000:]
    generated = re.search(r"(\d+) generated, (\d+) passed", report)
    assert generated and generated.group(1) == generated.group(2) and int(generated.group(1)) >= 1000, report[-3000:]
    assert escaped == [] and [r.getMessage() for r in logged] == []
