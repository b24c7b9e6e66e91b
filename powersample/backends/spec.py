"""Which backend to load: `BackendSpec`, the one description of a backend that every front end builds and every
worker receives (it is frozen and picklable: a Ray actor gets a spec, not the command line).

`auto` is resolved here and nowhere else (`BackendSpec.resolved`): toy when a toy spec is given, llamacpp for a
GGUF model (the embedded one included) on a machine without a GPU when llama-cpp-python is installed and its probe
(`probe.py`) did not crash, else hf. `--quant` means llamacpp. Optional engines are imported lazily; a missing one
is a one-line error naming the pip extra.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from powersample.backends.base import Backend
from powersample.backends.embedded import EMBEDDED_MODEL
from powersample.errors import PowerSampleError

BACKENDS = ("auto", "toy", "hf", "llamacpp", "vllm")
CPU_ONLY = ("toy", "llamacpp")  # engines that never use a GPU
VLLM_OPTIONS = ("tensor_parallel_size", "gpu_memory_utilization", "max_model_len")


@dataclass(frozen=True)
class BackendSpec:
    """An engine and its options. Checked at construction for what needs no engine; `load()` builds the backend."""

    name: str = "auto"  # one of BACKENDS
    model: str | None = None  # local model dir, .gguf file or hub id; None = the embedded SmolLM2-135M-Instruct
    toy_spec: str | None = None  # the toy backend's JSON spec (name "toy", or "auto")
    device: str | None = None  # hf: cpu, cuda, cuda:1, ...; None = cuda if available
    dtype: str | None = None  # hf, vllm: float32, bfloat16, float16 or auto; None = float32 on CPU
    threads: int | None = None  # CPU threads of the engine (hf: torch's, process-wide); None = the engine's own
    quant: str | None = None  # llamacpp: re-quantize the GGUF once to this type (cached) and load the copy
    reuse_cache: bool = True  # False: every request prefills from an empty cache (bench's "scratch" baseline)
    tensor_parallel_size: int | None = None  # vllm: GPUs per engine; None = 1
    gpu_memory_utilization: float | None = None  # vllm: share of memory for weights + KV cache; None = its default
    max_model_len: int | None = None  # vllm: context length of the engine; None = the model's
    quiet: bool = False  # llamacpp: only the engine's errors on stderr, not its warnings (--quiet)

    def __post_init__(self) -> None:
        if self.name not in BACKENDS:
            raise PowerSampleError(f"unknown backend {self.name!r}; choose one of {', '.join(BACKENDS)}")
        if self.threads is not None and self.threads < 1:
            raise PowerSampleError(f"threads must be >= 1, got {self.threads}")
        if self.name != "vllm" and any(v is not None for v in self.engine_options.values()):
            raise PowerSampleError(
                "--tensor-parallel-size, --gpu-memory-utilization and --max-model-len apply to --backend vllm only"
            )
        if self.quant is not None and self.name not in ("auto", "llamacpp"):
            raise PowerSampleError("--quant applies to --backend llamacpp only")
        self._check_engine_options()

    def _check_engine_options(self) -> None:
        """What an engine cannot take, refused before it loads (`auto` is checked again once resolved)."""
        if self.name == "llamacpp" and (self.device not in (None, "cpu") or self.dtype is not None):
            raise PowerSampleError("the llamacpp backend runs the GGUF as it is: --device and --dtype don't apply")
        if self.name == "vllm" and self.device is not None:
            raise PowerSampleError("the vllm backend runs where vLLM's build runs (CPU or GPU): --device doesn't apply")
        if self.name == "vllm" and self.threads is not None:
            raise PowerSampleError("--threads doesn't apply to the vllm backend; set VLLM_CPU_OMP_THREADS_BIND instead")

    @property
    def engine_options(self) -> dict[str, Any]:
        """vLLM's engine options (None where not given)."""
        return {k: getattr(self, k) for k in VLLM_OPTIONS}

    def resolved(self) -> BackendSpec:
        """This spec with `auto` replaced by the engine it means on this machine (see the module docstring)."""
        if self.name != "auto":
            return self
        return dataclasses.replace(self, name=_resolve_auto(self))

    def portable(self) -> BackendSpec:
        """This spec with its local files (model, toy spec) as absolute paths, for a worker whose working directory
        may differ."""
        paths = {
            k: str(Path(v).resolve()) for k in ("model", "toy_spec") if (v := getattr(self, k)) and Path(v).exists()
        }
        return dataclasses.replace(self, **paths)

    def load(self) -> Backend:
        """Build the backend (the slow part: the model loads here)."""
        spec = self.resolved()
        return _LOADERS[spec.name](spec)

    def identity(self) -> dict[str, Any]:
        """How the backend was asked for, for a run's identity: the toy spec counts by content, so editing it starts
        a new eval run; `quant` appears only when given (runs made before it existed keep their hash)."""
        toy = self.name == "toy"
        spec = _file_digest(self.toy_spec) if toy and self.toy_spec else None
        identity = {
            "name": self.name,
            "model": None if toy else self.model,
            "toy_spec": spec,
            "device": self.device,
            "dtype": self.dtype,
        }
        if self.quant:
            identity["quant"] = self.quant
        return identity

    def describe(self) -> str:
        """The model, in words (bench's table and JSON)."""
        if self.name == "toy":
            return f"toy spec {self.toy_spec}"
        return self.model if self.model is not None else f"embedded {EMBEDDED_MODEL}"

    @property
    def cpu_only(self) -> bool:
        """True when the resolved engine never uses a GPU (Ray actors of such an engine ask for none)."""
        return self.resolved().name in CPU_ONLY


def _resolve_auto(spec: BackendSpec) -> str:
    if spec.quant is not None:
        return "llamacpp"  # a re-quantized GGUF is llama.cpp's
    if spec.toy_spec is not None:
        return "toy"
    gguf = spec.model is None or spec.model.endswith(".gguf")
    cpu = spec.device in (None, "cpu") and not _has_cuda()
    if not (gguf and cpu and importlib.util.find_spec("llama_cpp") is not None):
        return "hf"
    outcome = _import_extra("powersample.backends.llamacpp", "llamacpp").probe_outcome(spec.model)
    if outcome.ok:
        return "llamacpp"
    print(
        f"powersample: llama.cpp crashed on this machine when probed ({outcome.detail}); using the hf backend "
        f"instead (to probe again, delete {outcome.path})",
        file=sys.stderr,
        flush=True,
    )
    return "hf"


def _load_toy(spec: BackendSpec) -> Backend:
    toy = _import_extra("powersample.backends.toy", "toy")
    if spec.toy_spec is None:
        raise PowerSampleError("the toy backend needs --toy-spec FILE")
    return toy.ToyBackend(toy.ToySpec.load(spec.toy_spec))


def _load_hf(spec: BackendSpec) -> Backend:
    hf = _import_extra("powersample.backends.hf", "hf")
    return hf.HFBackend.load(
        spec.model, device=spec.device, dtype=spec.dtype, reuse_cache=spec.reuse_cache, threads=spec.threads
    )


def _load_llamacpp(spec: BackendSpec) -> Backend:
    """llama.cpp in-process, refused in one line where its probe crashed on this machine (probe.py)."""
    llamacpp = _import_extra("powersample.backends.llamacpp", "llamacpp")
    outcome = llamacpp.probe_outcome(spec.model, spec.quant)
    if not outcome.ok:
        raise PowerSampleError(
            f"llama.cpp crashed on this machine when probed ({outcome.detail}), so the llamacpp "
            f"backend would crash too: use --backend hf (to probe again, delete {outcome.path})"
        )
    return llamacpp.LlamaCppBackend.load(
        spec.model, reuse_cache=spec.reuse_cache, n_threads=spec.threads, quant=spec.quant, quiet=spec.quiet
    )


def _load_vllm(spec: BackendSpec) -> Backend:
    """vLLM picks its device itself, and its CPU build sets its threads by environment (BackendSpec refuses
    --device and --threads)."""
    try:
        vllm = _import_extra("powersample.backends.vllm", "vllm")
    except PowerSampleError as e:
        raise PowerSampleError(f"{e} (on a CPU-only machine: 'powersample[vllm-cpu]')") from None
    tp = spec.tensor_parallel_size
    return vllm.VLLMBackend.load(
        spec.model,
        dtype=spec.dtype,
        tensor_parallel_size=1 if tp is None else tp,
        gpu_memory_utilization=spec.gpu_memory_utilization,
        max_model_len=spec.max_model_len,
        reuse_cache=spec.reuse_cache,
    )


_LOADERS = {"toy": _load_toy, "hf": _load_hf, "llamacpp": _load_llamacpp, "vllm": _load_vllm}


def _file_digest(path: str) -> str:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
    except OSError as e:
        raise PowerSampleError(f"toy spec: cannot read {path}: {e.strerror}") from None


def _has_cuda() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch  # an engine, not a module of ours: imported only where it is installed

    return torch.cuda.is_available()


def _import_extra(module: str, extra: str):
    """Import an engine module; a missing third-party package is a one-line error naming the pip extra."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("powersample"):
            raise
        raise PowerSampleError(f"the {extra} backend needs {e.name!r}: pip install 'powersample[{extra}]'") from None
