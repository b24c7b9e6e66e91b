"""Memory planned, not discovered: the KV cache a run's chains hold, from the model's config, against a budget.

A sequence's KV cache holds, per token, a key and a value on every attention layer: layers x 2 x kv_heads x
head_dim x the cache's bytes per number. A layer that keeps only a sliding window holds at most `window` tokens (a
backend that keeps every position, as hf does, plans them as full layers). A linear-attention (recurrent) layer
keeps a state whose size does not grow with the tokens: it is not planned here (hf refuses such layers anyway).

One sequence of a chain is a `member` (an MCMC chain has one; power-smc one per particle, power-mtm one per try,
power-pt one per replica: `registry.members`). Each member holds `buffers` copies of its cache:

- hf: two buffers per slot (so an MH proposal never destroys the current state's cache) plus the row's copy in
  the decoding batch (stacked while it decodes): 3;
- llama.cpp: two sequences per slot (its lane and its bank): 2, in f16 (its default cache type);
- vLLM: its own block manager owns the KV cache (sized by --gpu-memory-utilization up front) and preempts
  sequences that do not fit, so no plan is made for it here.

A chain's bytes = buffers x members x the KV bytes of one sequence at the run's tokens (prompt + max_new_tokens).
The Scheduler (samplers/driver.py) starts chains only while their bytes fit the budget; the rest wait.

The engine's fixed overhead (weights, the logits rows of a forward: rows x vocab x 4 bytes) is not in the plan:
the default budget is a share of the memory free before the weights load, so it leaves room for them.
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from powersample.errors import PowerSampleError

DEFAULT_SHARE = 0.5  # the default budget: this share of the memory free when the run starts (RAM, or the GPU's)
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}  # bytes per number of a cache dtype
HF_BUFFERS = 3  # hf: two buffers per slot plus the decoding batch's copy of the row
LLAMACPP_BUFFERS = 2  # llama.cpp: a lane and a bank per slot
LLAMACPP_CACHE_BYTES = 2  # llama.cpp's default KV cache type, f16
_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"^\s*([0-9]+\.?[0-9]*(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")


@dataclass(frozen=True)
class KVLayout:
    """The KV cache of one sequence on an engine, per token, and how many copies of it one member holds."""

    full: int  # bytes per token over the layers that keep every position
    windows: tuple[tuple[int, int], ...] = ()  # (bytes per token, window) of each sliding layer that keeps its window
    buffers: int = 1  # copies of a sequence's cache one member holds (hf 3, llama.cpp 2)

    def sequence_bytes(self, tokens: int) -> int:
        """Bytes of one sequence's cache holding `tokens` tokens."""
        return self.full * tokens + sum(b * min(tokens, w) for b, w in self.windows)

    @property
    def per_token(self) -> int:
        """Bytes per token while every window is still filling (the most a token costs)."""
        return self.full + sum(b for b, _ in self.windows)


@dataclass(frozen=True)
class Plan:
    """What a run's chains hold, and how many fit at once."""

    per_token: int  # KV bytes per token of one sequence (B)
    per_chain: int  # buffers x members x one sequence at `tokens` (B)
    tokens: int  # prompt + max_new_tokens (a lower bound before the prompt is encoded)
    members: int  # sequences one chain holds (registry.members)
    buffers: int  # copies of each sequence's cache (KVLayout.buffers)
    budget: int | None  # bytes the chains may hold at once; None = unlimited

    @property
    def chains_at_once(self) -> int | None:
        """Most chains in flight at once; None = unlimited."""
        if self.budget is None:
            return None
        return self.budget // self.per_chain if self.per_chain else None

    def check(self) -> None:
        """One line when a single chain cannot fit the budget."""
        if self.budget is not None and self.per_chain > self.budget:
            raise PowerSampleError(
                f"one chain needs {size_text(self.per_chain)} of KV cache ({self.terms()}), more than "
                f"the memory budget {size_text(self.budget)}: raise --max-memory, or lower max_new_tokens or "
                "the members per chain"
            )

    def line(self) -> str:
        """The plan in words (the run's start line)."""
        at_once = self.chains_at_once
        fits = "unlimited" if self.budget is None else f"budget {size_text(self.budget)}"
        many = "" if at_once is None else f", {at_once} chains at once"
        return f"memory plan: {size_text(self.per_chain)} per chain ({self.terms()}), {fits}{many}"

    def terms(self) -> str:
        """The product a chain's bytes come from, in words."""
        members = f"{self.members} member{'s' if self.members != 1 else ''}"
        return f"{self.buffers} buffers x {members} x {self.tokens} tokens x {size_text(self.per_token)}/token"

    def to_dict(self) -> dict[str, int | None]:
        return {
            "bytes_per_token": self.per_token,
            "bytes_per_chain": self.per_chain,
            "tokens": self.tokens,
            "members": self.members,
            "buffers": self.buffers,
            "budget_bytes": self.budget,
            "chains_at_once": self.chains_at_once,
        }


def plan(layout: KVLayout, tokens: int, members: int, budget: int | None) -> Plan:
    """The plan of chains of `members` sequences of `tokens` tokens each on an engine of `layout`."""
    per_chain = layout.buffers * members * layout.sequence_bytes(tokens)
    return Plan(layout.per_token, per_chain, tokens, members, layout.buffers, budget)


# --- from a model's config ---------------------------------------------------------------------------------------


def hf_layout(config: Any, dtype_bytes: int, keeps_windows: bool = False, buffers: int = HF_BUFFERS) -> KVLayout:
    """The layout of a transformers config (its text config for a multimodal one). `keeps_windows` False: sliding
    layers keep every position too (hf's caches do: backends/hf.py)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    per_layer = 2 * kv_heads * head_dim * dtype_bytes
    types = getattr(text, "layer_types", None) or ["full_attention"] * text.num_hidden_layers
    window = getattr(text, "sliding_window", None)
    full = sum(per_layer for t in types if t == "full_attention" or (t == "sliding_attention" and not keeps_windows))
    sliding = sum(1 for t in types if t == "sliding_attention") if keeps_windows and window else 0
    return KVLayout(full, ((per_layer * sliding, window),) if sliding else (), buffers)


def gguf_layout(path: str | Path, cache_bytes: int = LLAMACPP_CACHE_BYTES, buffers: int = LLAMACPP_BUFFERS) -> KVLayout:
    """The layout of a GGUF file, read from its metadata without loading the weights: n_layer x (n_embd_k_gqa +
    n_embd_v_gqa) x the cache's bytes per number (llama.cpp's f16 by default; hf's dtype for a converted copy)."""
    try:
        fields = gguf_metadata(path)
    except (OSError, ValueError, struct.error) as e:
        raise PowerSampleError(f"cannot read the GGUF metadata of {path}: {e}") from None
    arch = fields.get("general.architecture")
    layers, heads = fields.get(f"{arch}.block_count"), fields.get(f"{arch}.attention.head_count")
    if not isinstance(layers, int) or heads is None:
        raise PowerSampleError(f"{path}: the GGUF metadata names no layer or head count for {arch!r}")
    kv_heads = fields.get(f"{arch}.attention.head_count_kv", heads)
    per_head = fields[f"{arch}.embedding_length"] // (heads if isinstance(heads, int) else max(heads))
    k = fields.get(f"{arch}.attention.key_length", per_head)
    v = fields.get(f"{arch}.attention.value_length", per_head)
    kv = kv_heads if isinstance(kv_heads, list) else [kv_heads] * layers  # per layer where the file says so
    return KVLayout(sum(h * (k + v) for h in kv) * cache_bytes, (), buffers)


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9  # GGUF value types besides the scalars
_MAGIC = b"GGUF"


def gguf_metadata(path: str | Path) -> dict[str, Any]:
    """The key-value metadata of a GGUF file (version 2 or 3), read from its header alone: no tensor is touched.
    String arrays (the vocabulary) are skipped and read as None; number arrays are lists."""
    with open(path, "rb") as f:
        if f.read(4) != _MAGIC:
            raise ValueError("not a GGUF file")
        _version, _tensors, count = struct.unpack("<IQQ", f.read(20))
        out = {}
        for _ in range(count):
            key = _string(f)
            out[key] = _value(f, struct.unpack("<I", f.read(4))[0])
        return out


def _string(f: Any) -> str:
    (n,) = struct.unpack("<Q", f.read(8))
    return f.read(n).decode("utf-8", "replace")


def _value(f: Any, kind: int) -> Any:
    if kind in _SCALARS:
        fmt = _SCALARS[kind]
        return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]
    if kind == _STRING:
        return _string(f)
    if kind != _ARRAY:
        raise ValueError(f"unknown GGUF value type {kind}")
    item, n = struct.unpack("<IQ", f.read(12))
    if item in _SCALARS:
        fmt = _SCALARS[item]
        return list(struct.unpack(f"<{n}{fmt[1]}", f.read(n * struct.calcsize(fmt))))
    for _ in range(n):  # strings (or nested arrays): skipped
        _value(f, item)
    return None


def counted_layout(layers: int, kv_heads: int, head_dim: int, cache_bytes: int, buffers: int) -> KVLayout:
    """The layout of `layers` layers of `kv_heads` key and value heads of `head_dim` numbers of `cache_bytes`."""
    return KVLayout(layers * 2 * kv_heads * head_dim * cache_bytes, (), buffers)


def planned_layout(engine: str, model: str | None, dtype: str | None, device: str | None) -> KVLayout | None:
    """The layout an engine will have, from the model's config, before the weights load (BackendSpec's resolved
    name and options); None where no plan is made (toy, vLLM, a hub id not in the local cache)."""
    from powersample.backends.embedded import embedded_gguf_path
    from powersample.backends.hub import dtype_name

    gguf = model is None or model.endswith(".gguf")
    path = embedded_gguf_path() if model is None else Path(model).expanduser()
    if engine == "llamacpp":
        return gguf_layout(path)
    if engine != "hf":
        return None
    name = dtype_name(dtype, "bfloat16" if on_cuda(device) else "float32")
    if gguf:
        return gguf_layout(path, DTYPE_BYTES.get(name, 4), HF_BUFFERS)
    config = _local_config(str(path) if path.is_dir() else model)
    if config is None:
        return None
    numbers = DTYPE_BYTES.get(name) or DTYPE_BYTES.get(str(getattr(config, "dtype", "")).removeprefix("torch."), 4)
    return hf_layout(config, numbers)


def _local_config(model: str) -> Any:
    """A transformers config from a folder or the local hub cache (no download); None when there is none."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model, local_files_only=True)
    except (OSError, ValueError):
        return None


def on_cuda(device: str | None) -> bool:
    """Whether hf runs on CUDA on `device` (None: hf's default, cuda when available)."""
    if device is not None:
        return device.startswith("cuda")
    import torch

    return bool(torch.cuda.is_available())


# --- budgets -----------------------------------------------------------------------------------------------------


def parse_size(text: str) -> int:
    """Bytes of "2GiB", "500MB", "1.5e9" or "123456" (KB/MB/GB/TB = powers of 1000, KiB/MiB/GiB/TiB of 1024)."""
    match = _SIZE.match(str(text))
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise PowerSampleError(f"--max-memory must be a size such as 2GiB, 500MB or a number of bytes, got {text!r}")
    size = int(float(match.group(1)) * _UNITS[unit])
    if size < 1:
        raise PowerSampleError(f"--max-memory must be at least 1 byte, got {text!r}")
    return size


def size_text(n: int) -> str:
    """Bytes in words: "1.5 GiB", "12.0 MiB", "512 B"."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def default_budget(device: str | None, share: float = DEFAULT_SHARE) -> int:
    """`share` of the memory free now: the GPU's on a CUDA device (torch.cuda.mem_get_info), else the RAM's."""
    if device is not None and device.startswith("cuda"):
        import torch  # only for a CUDA device, which needs torch anyway

        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free * share)
    return int(free_ram() * share)


def free_ram() -> int:
    """Bytes of RAM available now (MemAvailable on Linux, else the free pages)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
