"""Engines behind the backend seam (`base.py`). Optional engines are imported lazily."""

from __future__ import annotations

import sys

from powersample.backends.base import Backend
from powersample.core.types import Continuation, ExtendRequest, Proposal
from powersample.errors import PowerSampleError

BACKENDS = ("auto", "toy", "hf", "llamacpp", "vllm")


def load_backend(
    name: str = "auto",
    *,
    model: str | None = None,
    toy_spec: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    reuse_cache: bool = True,
    threads: int | None = None,
    tensor_parallel_size: int | None = None,
    gpu_memory_utilization: float | None = None,
    max_model_len: int | None = None,
    quant: str | None = None,
) -> Backend:
    """Build a backend by name. `model` None means the embedded SmolLM2-135M-Instruct.

    "auto" picks toy when toy_spec is given, else the fastest available engine: llamacpp for a GGUF model (the embedded one included) on a machine
    without a GPU when llama-cpp-python is installed, else hf.

    reuse_cache=False makes every request prefill its whole context from an empty cache, one request at a time:
    the "regenerate from scratch" baseline of `powersample bench` (the paper's approach). Exact either way.
    threads sets the CPU threads (hf: torch's, for the whole process; llamacpp: llama.cpp's); None = the engine's
    default. On a small shared machine one thread can be much faster than two.
    tensor_parallel_size, gpu_memory_utilization and max_model_len are vLLM's engine options (vllm only; None =
    the backend's defaults, which run on a CPU-only machine too). quant (llamacpp only) re-quantizes the GGUF once
    to that type, cached, and loads the copy.

    llama.cpp is first tried in a child process, once per machine, engine build and model (`probe.py`): if that
    crashes, "auto" falls back to hf with a one-line warning and "llamacpp" is refused with a one-line error.
    """
    if threads is not None and threads < 1:
        raise PowerSampleError(f"threads must be >= 1, got {threads}")
    vllm_options = {"tensor_parallel_size": tensor_parallel_size, "gpu_memory_utilization": gpu_memory_utilization,
                    "max_model_len": max_model_len}
    if name != "vllm" and any(v is not None for v in vllm_options.values()):
        raise PowerSampleError("--tensor-parallel-size, --gpu-memory-utilization and --max-model-len apply to "
                               "--backend vllm only")
    if quant is not None and name not in ("auto", "llamacpp"):
        raise PowerSampleError("--quant applies to --backend llamacpp only")
    if quant is not None:
        name = "llamacpp"  # a re-quantized GGUF is llama.cpp's
    if name == "auto":
        name = resolve_auto(model, device, toy_spec)
    if name == "toy":
        from powersample.backends.toy import ToyBackend, ToySpec

        if toy_spec is None:
            raise PowerSampleError("the toy backend needs --toy-spec FILE")
        return ToyBackend(ToySpec.load(toy_spec))
    if name == "hf":
        hf = _import_extra("powersample.backends.hf", "hf")
        return hf.HFBackend.load(model, device=device, dtype=dtype, reuse_cache=reuse_cache, threads=threads)
    if name == "llamacpp":
        if device not in (None, "cpu") or dtype is not None:
            raise PowerSampleError("the llamacpp backend runs the GGUF as it is: --device and --dtype don't apply")
        llamacpp = _import_extra("powersample.backends.llamacpp", "llamacpp")
        _require_probe(llamacpp, model, quant)
        return llamacpp.LlamaCppBackend.load(model, reuse_cache=reuse_cache, n_threads=threads, quant=quant)
    if name == "vllm":
        return _load_vllm(model, device, dtype, reuse_cache, threads, vllm_options)
    raise PowerSampleError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")


def resolve_auto(model: str | None, device: str | None, toy_spec: str | None = None) -> str:
    """The engine "auto" means for this model and device (see load_backend); toy when a toy spec is given.

    llamacpp for a GGUF model on a CPU-only machine with llama-cpp-python installed, unless its probe crashed on this
    machine: then hf, with one line on stderr saying why."""
    import importlib.util

    if toy_spec is not None:
        return "toy"
    gguf = model is None or model.endswith(".gguf")
    cpu = device in (None, "cpu") and not _has_cuda()
    if not (gguf and cpu and importlib.util.find_spec("llama_cpp") is not None):
        return "hf"
    outcome = _import_extra("powersample.backends.llamacpp", "llamacpp").probe_outcome(model)
    if outcome.ok:
        return "llamacpp"
    print(f"powersample: llama.cpp crashed on this machine when probed ({outcome.detail}); using the hf backend "
          f"instead (to probe again, delete {outcome.path})", file=sys.stderr, flush=True)
    return "hf"


def _require_probe(llamacpp, model: str | None, quant: str | None) -> None:
    """Refuse, in one line, to run llama.cpp in-process where its probe crashed (probe.py)."""
    outcome = llamacpp.probe_outcome(model, quant)
    if not outcome.ok:
        raise PowerSampleError(f"llama.cpp crashed on this machine when probed ({outcome.detail}), so the llamacpp "
                               f"backend would crash too: use --backend hf (to probe again, delete {outcome.path})")


def _load_vllm(model, device, dtype, reuse_cache, threads, options) -> Backend:
    """The vllm backend; vLLM picks its device itself, and its CPU build sets its threads by environment."""
    if device is not None:
        raise PowerSampleError("the vllm backend runs where vLLM's build runs (CPU or GPU): --device doesn't apply")
    if threads is not None:
        raise PowerSampleError("--threads doesn't apply to the vllm backend; set VLLM_CPU_OMP_THREADS_BIND instead")
    try:
        vllm = _import_extra("powersample.backends.vllm", "vllm")
    except PowerSampleError as e:
        raise PowerSampleError(f"{e} (on a CPU-only machine: 'powersample[vllm-cpu]')") from None
    tp = options["tensor_parallel_size"]
    return vllm.VLLMBackend.load(
        model, dtype=dtype, tensor_parallel_size=1 if tp is None else tp,
        gpu_memory_utilization=options["gpu_memory_utilization"], max_model_len=options["max_model_len"],
        reuse_cache=reuse_cache,
    )


def _has_cuda() -> bool:
    try:
        import torch
    except ModuleNotFoundError:
        return False
    return torch.cuda.is_available()


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
