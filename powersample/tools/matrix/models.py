"""The matrix's model files: built once per machine from configs (no downloads), then reused.

    <cache>/matrix/<key>/<arch>/hf/                 save_pretrained (safetensors, fp32) + the embedded tokenizer
    <cache>/matrix/<key>/<arch>/model.f32.gguf      our conversion (convert.py), where llama.cpp runs the arch
    <cache>/matrix/<key>/<arch>/model.<quant>.gguf  llama.cpp's re-quantized copies, made when first asked for

<cache> is `embedded.cache_root()`; <key> is a digest of everything the files depend on (the arch's config and
seed, the converter's version, transformers', torch's and gguf's versions), so a change builds new files beside the
old ones instead of reusing stale ones. A folder is built in a temporary folder and renamed into place
(`embedded.publish`): a crash never leaves half a model, and concurrent builders agree on one copy.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from powersample.backends.embedded import (
    cache_root,
    embedded_gguf_path,
    embedded_model_dir,
    folder_being_built,
    quiet_loading,
)
from powersample.io import write_json_atomic
from powersample.tools.matrix.archs import Arch, config_kwargs
from powersample.tools.matrix.convert import write_gguf

SEED = 0  # torch's seed for every model's random weights
FORMAT = 2  # the files' layout and the converter's version: bump it when either changes what gets written
F32 = "f32"  # the unquantized GGUF every quant is made from


@dataclass(frozen=True)
class ArchFiles:
    """One architecture's built files."""

    arch: Arch
    folder: Path  # <cache>/matrix/<key>/<arch>

    @property
    def hf(self) -> Path:
        """The transformers folder: fp32 safetensors, config, tokenizer."""
        return self.folder / "hf"

    def gguf(self, quant: str = F32) -> Path:
        """The GGUF of `quant` (F32 or a llamacpp.QUANTS key); made by `quantized` for a quant."""
        return self.folder / f"model.{quant}.gguf"

    def size(self, path: Path) -> int:
        """Bytes on disk of a file, or of every file under a folder."""
        return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def content_key(arch: Arch) -> str:
    """12 hex digits of a digest of what `arch`'s files depend on."""
    import gguf
    import torch
    import transformers

    what = {
        "arch": arch.name,
        "model_type": arch.model_type,
        "config": config_kwargs(arch),
        "seed": SEED,
        "format": FORMAT,
        "gguf_arch": arch.gguf_arch,
        "rope": arch.interleaved_rope,
        "norm": arch.norm_offset,
        "versions": [transformers.__version__, torch.__version__, getattr(gguf, "__version__", "")],
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:12]


def folder(arch: Arch) -> Path:
    """Where `arch`'s files are (or will be): <cache>/matrix/<key>/<arch>."""
    return cache_root() / "matrix" / content_key(arch) / arch.name


def built(arch: Arch) -> ArchFiles:
    """`arch`'s files, building them once (a few seconds) if this machine has none yet."""
    target = folder(arch)
    if not target.is_dir():  # only a finished build is ever renamed to this name
        _build(arch, target)
    return ArchFiles(arch, target)


def quantized(files: ArchFiles, quant: str) -> Path:
    """The GGUF of `quant`, re-quantized once from the F32 one by llama.cpp's quantizer."""
    import llama_cpp

    from powersample.backends.llamacpp import requantized

    return requantized(llama_cpp, files.gguf(), quant, target=files.gguf(quant))


def tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each ggml type a GGUF holds (Q4_K_M: Q4_K, Q6_K, and Q5_0/Q8_0 for short rows); read
    once (gguf's reader takes about 5 s here) and kept beside the file as <file>.types.json."""
    import gguf

    cache = path.with_name(path.name + ".types.json")
    with contextlib.suppress(OSError, ValueError):
        return dict(json.loads(cache.read_text()))
    types = dict(sorted(Counter(t.tensor_type.name for t in gguf.GGUFReader(path).tensors).items()))
    write_json_atomic(cache, types)
    return types


def build_model(arch: Arch) -> Any:
    """`arch` as a transformers model with seeded random weights (fp32, eval mode); the global RNG is untouched."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(arch.model_type, **config_kwargs(arch))
    with torch.random.fork_rng(devices=[]), quiet_loading():
        torch.manual_seed(SEED)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def _build(arch: Arch, target: Path) -> None:
    """Build `arch`'s folder in a temporary folder beside `target`, then rename it into place."""
    with folder_being_built(target) as tmp:
        model = build_model(arch)
        _save_hf(model, tmp / "hf")
        if arch.gguf_arch is not None:
            tensors = {name: t.detach().numpy() for name, t in model.state_dict().items()}
            write_gguf(arch, model.config, tensors, tmp / f"model.{F32}.gguf", embedded_gguf_path())


def _save_hf(model: Any, out: Path) -> None:
    """save_pretrained of the model plus the embedded SmolLM2's tokenizer (and its chat template)."""
    from transformers import AutoTokenizer

    with quiet_loading():
        tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
