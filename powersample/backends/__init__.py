"""Engines behind the backend seam (`base.py`). Optional engines are imported lazily."""

from __future__ import annotations

from powersample.backends.base import Backend, Continuation, ExtendRequest, Proposal
from powersample.errors import PowerSampleError

BACKENDS = ("toy", "hf")


def load_backend(
    name: str = "hf",
    *,
    model: str | None = None,
    toy_spec: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    reuse_cache: bool = True,
) -> Backend:
    """Build a backend by name. `model` None means the embedded SmolLM2-135M-Instruct (hf).

    reuse_cache=False makes every request prefill its whole context from an empty cache, one request at a time:
    the "regenerate from scratch" baseline of `powersample bench` (the paper's approach). Exact either way.
    """
    if name == "toy":
        from powersample.backends.toy import ToyBackend, ToySpec

        if toy_spec is None:
            raise PowerSampleError("the toy backend needs --toy-spec FILE")
        return ToyBackend(ToySpec.load(toy_spec))
    if name == "hf":
        hf = _import_extra("powersample.backends.hf", "hf")
        return hf.HFBackend.load(model, device=device, dtype=dtype, reuse_cache=reuse_cache)
    raise PowerSampleError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")


def _import_extra(module: str, extra: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("powersample"):
            raise
        raise PowerSampleError(
            f"the {extra} backend needs {e.name!r}: pip install 'powersample[{extra}]'"
        ) from None


__all__ = ["Backend", "Continuation", "ExtendRequest", "Proposal", "load_backend", "BACKENDS"]
