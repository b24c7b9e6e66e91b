from pathlib import Path

import pytest

from powersample.backends.toy import ToyBackend, ToySpec

SPECS = Path(__file__).resolve().parent.parent / "powersample" / "toy_specs"
SHARED_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def load_spec(name: str) -> ToySpec:
    return ToySpec.load(SPECS / f"{name}.json")


@pytest.fixture
def toy_backend():
    return lambda name: ToyBackend(load_spec(name))
