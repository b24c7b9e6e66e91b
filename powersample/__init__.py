"""powersample: sample from the power distribution p(x)^alpha of a language model.

Karan & Du (2025), "Reasoning with Sampling: Your Base Model is Smarter Than You Think", arXiv 2510.14901.

    import powersample
    backend = powersample.load_backend("hf")               # the embedded SmolLM2-135M-Instruct
    config = powersample.SamplerConfig(alpha=4.0, max_new_tokens=128)
    [record] = powersample.sample(backend, "What is 12 * 13?", config, seed=0)
    print(record.text, record.logp, record.acceptance_rate)

A model you already hold (any device, dtype or device_map): `backend = powersample.from_transformers(model, tokenizer)`.
"""

from powersample.api import SampleRecord, sample
from powersample.backends import from_transformers, load_backend
from powersample.config import SamplerConfig
from powersample.errors import PowerSampleError
from powersample.samplers.registry import METHODS


def _installed_version() -> str:
    """The version pyproject.toml declares, as installed (the one source); "unknown" when run from a bare tree."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("powersample")
    except PackageNotFoundError:
        return "unknown"


__version__ = _installed_version()

__all__ = [
    "METHODS",
    "PowerSampleError",
    "SampleRecord",
    "SamplerConfig",
    "from_transformers",
    "load_backend",
    "sample",
    "__version__",
]
