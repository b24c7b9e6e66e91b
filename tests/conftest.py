import os
import sys

import pytest
from support.toy import load_spec

from powersample.backends.toy import ToyBackend


@pytest.fixture
def toy_backend():
    return lambda name: ToyBackend(load_spec(name))


@pytest.fixture(scope="module")
def embedded():
    """The embedded model behind a server, (backend, url): one per module that asks (the server tests)."""
    from support.server import embedded_server  # needs the serve extra

    with embedded_server() as served:
        yield served


# -- a vLLM engine's process must not abort at interpreter teardown ------------------------------------------------
# After every vLLM test has passed, the interpreter's teardown sometimes aborts the process ("terminate called
# without an active exception", exit 134: a C++ thread of the engine still joinable when its owner is destroyed),
# which turns a green run red. Once pytest has printed its summary, a session that started vLLM engines stops them
# and leaves with pytest's own exit status, skipping that teardown.
_EXIT_STATUS: list[int] = []


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
