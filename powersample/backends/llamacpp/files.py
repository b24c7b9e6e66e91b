"""The llamacpp backend's model files: which GGUF to load (the embedded one, a user's, or a re-quantized copy, made
once and cached), and loading it with the exact kernels (`kernels.py`)."""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from powersample.backends.embedded import cache_root, embedded_gguf_path, publish
from powersample.backends.llamacpp.kernels import Placement, model_params, native_opted_in, placement, prepare_process
from powersample.errors import PowerSampleError, one_line

GGUF_MAGIC = b"GGUF"  # the first four bytes of every GGUF file
# --quant: llama_ftype. A mix (*_k_m: llama.cpp's own choice per tensor, as in the files users download) keeps its
# mix; every other type is written pure, every tensor of the one type (rows too short for a 256-block type fall back)
QUANTS = {
    "q8_0": "Q8_0",
    "q6_k": "Q6_K",
    "q5_0": "Q5_0",
    "q4_k_m": "Q4_K_M",
    "q4_1": "Q4_1",
    "q4_0": "Q4_0",
    "iq4_nl": "IQ4_NL",
    "f16": "F16",
    "bf16": "BF16",
}


@dataclass(eq=False)
class Weights:
    """A loaded GGUF: llama-cpp-python's LlamaModel (weights, tokenizer), its metadata, and how it was loaded."""

    model: Any  # llama_cpp._internals.LlamaModel
    metadata: dict[str, str]
    threads: int  # llama.cpp's CPU threads, for decoding and prefill alike
    placement: Placement  # where llama.cpp put the weights: the plain CPU layout unless opted out (kernels.py)
    path: Path  # the GGUF file it was loaded from

    @property
    def native(self) -> bool:
        """True when the user opted out of the exact kernels (kernels.py)."""
        return self.placement.extra_bufts

    @property
    def experts(self) -> int:
        """The model's experts per MoE layer (GGUF `<arch>.expert_count`); 0 for a dense model."""
        count = self.metadata.get(f"{self.metadata.get('general.architecture', '')}.expert_count", "0")
        return int(count) if count.isdigit() else 0

    @classmethod
    def load(cls, llama_cpp: Any, path: Path, threads: int) -> Weights:
        """Load `path` with the exact kernels (kernels.py); failures are one-line PowerSampleErrors."""
        from llama_cpp import _internals
        from llama_cpp._logger import set_verbose

        set_verbose(False)
        native = native_opted_in()
        prepare_process(native)
        where = placement(native)
        try:
            model = _internals.LlamaModel(path_model=str(path), params=model_params(llama_cpp, where), verbose=False)
        except Exception as e:  # noqa: BLE001 - every loader failure becomes one line, never a traceback
            raise PowerSampleError(f"cannot load model {path}: {one_line(e)}") from None
        return cls(model, model.metadata(), threads, where, path)


def model_path(llama_cpp: Any, model: str | None, quant: str | None) -> Path:
    """The GGUF file to load: `model` (None = the embedded one), re-quantized to `quant` when given."""
    path = embedded_gguf_path() if model is None else _check_gguf(Path(model).expanduser())
    return path if quant is None else requantized(llama_cpp, path, quant)


def requantized(llama_cpp: Any, path: Path, quant: str, target: Path | None = None) -> Path:
    """A copy of `path` with its tensors re-quantized to `quant` (llama.cpp's quantizer: every tensor of the one type,
    or llama.cpp's own mix for a *_k_m type), made once and cached at `target`, by default in
    $POWERSAMPLE_CACHE/models as <name>.<quant>-<digest>.gguf; written to a temporary file and renamed into place."""
    if quant not in QUANTS:
        raise PowerSampleError(f"unknown --quant {quant!r}; choose one of {', '.join(QUANTS)}")
    source = path.resolve()
    stat = source.stat()
    digest = hashlib.sha256(f"{source}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = target or cache_root() / "models" / f"{path.stem}.{quant}-{digest}.gguf"  # one per source version
    if target.is_file():
        return target
    from llama_cpp._logger import set_verbose

    set_verbose(False)  # the quantizer logs every tensor
    print(f"powersample: re-quantizing {path.name} to {quant} once into {target} ...", file=sys.stderr, flush=True)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{QUANTS[quant]}")
    params.allow_requantize = True  # from quantized weights too
    params.pure = not quant.endswith("_m")  # a mix is llama.cpp's per-tensor choice; else one type throughout
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
        os.close(fd)
    except OSError as e:
        raise PowerSampleError(f"cannot write to {target.parent} ({e.strerror}); set POWERSAMPLE_CACHE") from None
    try:
        if llama_cpp.llama_model_quantize(str(path).encode(), tmp.encode(), params) != 0:
            raise PowerSampleError(f"llama.cpp could not re-quantize {path} to {quant}")
        return publish(Path(tmp), target)
    finally:
        Path(tmp).unlink(missing_ok=True)  # a no-op once renamed


def _check_gguf(path: Path) -> Path:
    """`path` itself if it is a readable GGUF file, else a one-line PowerSampleError."""
    if not path.is_file():
        raise PowerSampleError(f"unknown model path {str(path)!r}: no such GGUF file")
    try:
        with path.open("rb") as f:
            magic = f.read(len(GGUF_MAGIC))
    except OSError as e:
        raise PowerSampleError(f"cannot read {path}: {e.strerror}") from None
    if magic != GGUF_MAGIC:
        raise PowerSampleError(f"{path} is not a GGUF file (it does not start with {GGUF_MAGIC!r})")
    return path
