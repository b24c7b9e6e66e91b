"""The toy specs shipped with the package, a continuous toy backend, the shared data folder, and the conformance
suite's runner for pytest."""

from __future__ import annotations

from pathlib import Path

import pytest

from powersample.backends import conformance
from powersample.backends.toy import ToyBackend, ToySpec

ROOT = Path(__file__).resolve().parents[2]  # the repository
SPECS = ROOT / "powersample" / "toy_specs"
SHARED_DATA = ROOT.parent / "shared" / "data"


def load_spec(name: str) -> ToySpec:
    return ToySpec.load(SPECS / f"{name}.json")


def run_check(check, subject: conformance.Subject) -> None:
    """One conformance check; a check that does not apply to the subject is a skip, saying why."""
    try:
        check(subject)
    except conformance.NotApplicable as e:
        pytest.skip(str(e))


class ContinuousToy(ToyBackend):
    """A toy backend that serves requests continuously, newest first (not in lockstep rounds, nor in their order)."""

    def extend_continuous(self, requests, proposal, refill, poll=None):
        queue = list(requests.items())
        while queue:
            key, request = queue.pop()
            [cont] = self.extend([request], proposal)
            queue += refill(key, cont).items()
