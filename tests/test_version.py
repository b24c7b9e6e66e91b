"""The version is written once, in pyproject.toml; everything else reads it back."""

import pathlib

import pytest
import tomllib

import powersample

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_version_has_one_source():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert powersample.__version__ == declared
    assert "__version__ =" not in (ROOT / "powersample" / "__init__.py").read_text().replace(
        "__version__ = _installed_version()", ""
    )


def test_served_version_is_the_package_version():
    pytest.importorskip("fastapi")
    from powersample.backends.toy import ToyBackend, ToySpec
    from powersample.server.app import create_app

    spec = ToySpec.from_dict({"vocab": ["a", "<eos>"], "eos_id": 1, "default": [0.5, 0.5]})
    assert create_app(ToyBackend(spec)).openapi()["info"]["version"] == powersample.__version__
