import os
import sys
from pathlib import Path

import pytest

from powersample.backends import conformance
from powersample.backends.toy import ToyBackend, ToySpec

SPECS = Path(__file__).resolve().parent.parent / "powersample" / "toy_specs"
SHARED_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def load_spec(name: str) -> ToySpec:
    return ToySpec.load(SPECS / f"{name}.json")


@pytest.fixture
def toy_backend():
    return lambda name: ToyBackend(load_spec(name))


# -- a vLLM engine's process must not abort at interpreter teardown ------------------------------------------------
# After every vLLM test has passed, the interpreter's teardown sometimes aborts the process ("terminate called
# without an active exception", exit 134: a C++ thread of the engine still joinable when its owner is destroyed),
# which turns a green run red. Once pytest has printed its summary, a session that started vLLM engines stops them
# and leaves with pytest's own exit status, skipping that teardown.
_EXIT_STATUS: list[int] = []


def run_check(check, subject: conformance.Subject) -> None:
    """One conformance check; a check that does not apply to the subject is a skip, saying why."""
    try:
        check(subject)
    except conformance.NotApplicable as e:
        pytest.skip(str(e))


def pytest_sessionfinish(session, exitstatus) -> None:
    _EXIT_STATUS.append(int(exitstatus))


def pytest_unconfigure(config) -> None:
    engines = sys.modules.get("powersample.backends.vllm")
    if engines is None or "vllm" not in sys.modules or not _EXIT_STATUS:
        return
    engines.shutdown_engines()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_EXIT_STATUS[-1])
