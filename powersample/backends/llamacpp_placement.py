"""Where llama.cpp puts a GGUF's weights on the CPU, chosen so that no weight lands in its AMX buffer type.

llama.cpp's CPU backend offers "extra" buffer types for weights, tried in order: `AMX` (Intel Advanced Matrix
Extensions, in builds compiled on an AMX CPU) and then `CPU_REPACK` (weights re-laid out for AVX2/AVX-512 or NEON
kernels). On Sapphire-Rapids-class Xeons the AMX path crashes the process on the first decode (a segfault or an
illegal instruction in `ggml_backend_amx_mul_mat`; upstream llama.cpp issue 20824, unfixed). So on a build whose
CPU backend offers `AMX`, we load the model so that AMX gets no tensor, keeping the repack where we can:

- every weight whose type AMX would take (`AMX_TYPES`) and the repack can take on this CPU (`REPACK_TYPES`, rows
  a multiple of 8) is placed in `CPU_REPACK` explicitly, by a tensor buffer-type override;
- if some AMX-eligible weight is of a type the repack cannot take (the embedded model's Q4_1, for one), an override
  cannot keep it off AMX (llama.cpp re-selects extra buffer types for tensors overridden to the plain CPU type), so
  the model is loaded with no extra buffer types at all (`use_extra_bufts = False`): plain CPU kernels, as a
  machine without AMX runs Q4_1 anyway, since x86 has no Q4_1 repack.

`POWERSAMPLE_LLAMACPP_AMX=1` opts back in to llama.cpp's own choice, AMX included, for a build where upstream fixed
it. The tables mirror `ggml-cpu/amx/common.h` (`qtype_has_amx_kernels`) and `ggml-cpu/repack.cpp`
(`ggml_repack_get_optimal_repack_type`, x86 branches) of the llama.cpp that llama-cpp-python 0.3.36 vendors.
"""

from __future__ import annotations

import ctypes
import functools
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from powersample.errors import PowerSampleError

AMX_OPT_IN = "POWERSAMPLE_LLAMACPP_AMX"  # "1": let llama.cpp use its AMX buffer type (off by default: it crashes)
AMX_TYPES = frozenset({"q4_0", "q4_1", "q8_0", "q4_K", "q5_K", "q6_K", "iq4_xs"})  # weight types AMX takes
REPACK_TYPES = {"q4_0": "avx2", "q4_K": "avx2", "iq4_nl": "avx2", "mxfp4": "avx2", "q2_K": "avx512"}  # x86 repack
TOKEN_EMBD, OUTPUT = "token_embd.weight", "output.weight"  # GGUF names of the embedding and output matrices
REPACK_ROWS = 8  # the x86 repacked layouts interleave 8 rows: a weight whose row count isn't a multiple stays put


@dataclass(frozen=True)
class Tensor:
    """One weight of a GGUF file, as its header describes it."""

    name: str
    type: str  # ggml's type name: "q4_1", "f32", "q4_K", ...
    rows: int  # ne[1]: the number of rows of the matrix (1 for a vector)


@dataclass(frozen=True)
class Engine:
    """What the loaded llama.cpp build offers on this machine."""

    extra_bufts: tuple[str, ...]  # the CPU backend's extra buffer types, in llama.cpp's order ("AMX", "CPU_REPACK")
    features: frozenset[str]  # CPU features the build uses: "avx2", "avx512", "amx_int8"


@dataclass(frozen=True)
class Placement:
    """How to load the model: llama_model_params.use_extra_bufts and the tensors forced into CPU_REPACK."""

    extra_bufts: bool  # False: no extra buffer type at all (no AMX, no repack)
    repack: tuple[str, ...] = ()  # names of the weights placed in CPU_REPACK by override
    reason: str = "llama.cpp's own choice"  # one line, for logs and bench JSON

    @property
    def label(self) -> str:
        """A short name: "default", "repack-override" or "no-extra-bufts"."""
        if not self.extra_bufts:
            return "no-extra-bufts"
        return "repack-override" if self.repack else "default"


def choose_placement(engine: Engine, tensors: Sequence[Tensor], allow_amx: bool) -> Placement:
    """The placement for these weights on this engine (module docstring); a pure function of its arguments."""
    if allow_amx:
        return Placement(True, reason=f"{AMX_OPT_IN}=1: llama.cpp's own choice, AMX included")
    if "AMX" not in engine.extra_bufts:
        return Placement(True, reason="no AMX buffer type in this build: llama.cpp's own choice")
    eligible = [t for t in tensors if t.type in AMX_TYPES and not _lookup_only(t, tensors)]
    stuck = [t for t in eligible if not can_repack(t, engine)]
    if stuck:
        kinds = sorted({f"tied {t.name} ({t.type})" if t.name == TOKEN_EMBD else t.type for t in stuck})
        return Placement(False, reason=f"AMX present and {len(stuck)} weights it would take can't be placed in "
                                       f"CPU_REPACK ({', '.join(kinds)}): no extra buffer types")
    if not eligible:
        return Placement(True, reason="AMX present, but no weight of a type it takes: llama.cpp's own choice")
    if "CPU_REPACK" not in engine.extra_bufts:
        return Placement(False, reason="AMX present and no CPU_REPACK buffer type: no extra buffer types")
    return Placement(True, tuple(t.name for t in eligible),
                     reason=f"AMX present: {len(eligible)} weights placed in CPU_REPACK, none in AMX")


def can_repack(tensor: Tensor, engine: Engine) -> bool:
    """Whether llama.cpp's x86 repack takes this weight on this CPU (else it would stay unset and crash).

    Never the token embedding: its name also covers the row lookup of the input layer, which a repacked layout
    cannot serve, so an override by name would break the lookup.
    """
    needs = REPACK_TYPES.get(tensor.type)
    return (tensor.name != TOKEN_EMBD and needs is not None and needs in engine.features
            and tensor.rows % REPACK_ROWS == 0)


def _lookup_only(tensor: Tensor, tensors: Sequence[Tensor]) -> bool:
    """The token embedding of a model with its own output matrix: only looked up by row, which AMX never takes.
    (A model without `output.weight` ties its output to the embedding, and that matrix product AMX would take.)"""
    return tensor.name == TOKEN_EMBD and any(t.name == OUTPUT for t in tensors)


def amx_opted_in(environ: Mapping[str, str] = os.environ) -> bool:
    """True when the user set POWERSAMPLE_LLAMACPP_AMX=1 (any other value, or none, keeps AMX off)."""
    return environ.get(AMX_OPT_IN, "").strip() == "1"


# -- applying a placement ----------------------------------------------------------------------------------------


class _Override(ctypes.Structure):
    """llama.h's struct llama_model_tensor_buft_override: a regex and the buffer type for tensors matching it."""

    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


@dataclass(frozen=True)
class ModelParams:
    """llama_model_params for a placement, with the override array they point into (keep both alive together)."""

    params: Any  # llama_cpp.llama_model_params
    overrides: Any = None  # the NULL-terminated _Override array, or None


def model_params(llama_cpp: Any, placement: Placement) -> ModelParams:
    """llama_cpp.llama_model_params carrying `placement`."""
    params = llama_cpp.llama_model_default_params()
    params.use_extra_bufts = placement.extra_bufts
    if not placement.repack:
        return ModelParams(params)
    repack = _ggml(llama_cpp).extra_buft_pointers().get("CPU_REPACK")
    if repack is None:
        raise PowerSampleError("llama.cpp offers no CPU_REPACK buffer type here; cannot place the weights safely")
    entries = [(f"^{_escape(name)}$".encode(), repack) for name in placement.repack] + [(None, None)]
    overrides = (_Override * len(entries))(*entries)
    params.tensor_buft_overrides = ctypes.addressof(overrides)
    return ModelParams(params, overrides)


def _escape(name: str) -> str:
    """A tensor name as an ECMAScript regex matching exactly it (names hold letters, digits, '.', '_')."""
    return "".join("\\" + c if not (c.isalnum() or c == "_") else c for c in name)


# -- what the engine offers ----------------------------------------------------------------------------------------


def engine_info(llama_cpp: Any) -> Engine:
    """The extra buffer types and CPU features of the llama.cpp build that llama_cpp loaded."""
    ggml = _ggml(llama_cpp)
    return Engine(tuple(ggml.extra_buft_pointers()), ggml.features())


def placement_for(llama_cpp: Any, path: Path) -> Placement:
    """The placement of the GGUF at `path` on this machine's llama.cpp build (module docstring)."""
    if amx_opted_in():
        return choose_placement(Engine((), frozenset()), (), allow_amx=True)
    engine = engine_info(llama_cpp)
    if "AMX" not in engine.extra_bufts:  # nothing to avoid: skip reading the header
        return choose_placement(engine, (), allow_amx=False)
    return choose_placement(engine, read_tensors(path, _ggml(llama_cpp).type_name), allow_amx=False)


class _Ggml:
    """The few ggml C functions we need, from the shared libraries llama-cpp-python ships."""

    FEATURES = ("avx2", "avx512", "amx_int8")  # ggml_cpu_has_<name>() of the CPU backend

    def __init__(self, lib_dir: Path):
        self.ggml = ctypes.CDLL(str(_library(lib_dir, "ggml")))  # the same handles llama_cpp loaded (dlopen)
        self.cpu = ctypes.CDLL(str(_library(lib_dir, "ggml-cpu")))
        g = self.ggml
        g.ggml_backend_dev_by_type.restype, g.ggml_backend_dev_by_type.argtypes = ctypes.c_void_p, [ctypes.c_int]
        g.ggml_backend_dev_backend_reg.restype = ctypes.c_void_p
        g.ggml_backend_dev_backend_reg.argtypes = [ctypes.c_void_p]
        g.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
        g.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        g.ggml_backend_buft_name.restype, g.ggml_backend_buft_name.argtypes = ctypes.c_char_p, [ctypes.c_void_p]
        g.ggml_type_name.restype, g.ggml_type_name.argtypes = ctypes.c_char_p, [ctypes.c_int]

    def type_name(self, type_id: int) -> str:
        """ggml's name of a tensor type id ("q4_1", "f32", ...); "type<N>" for an id this build doesn't know."""
        name = self.ggml.ggml_type_name(type_id)
        return name.decode() if name else f"type{type_id}"

    def extra_buft_pointers(self) -> dict[str, int]:
        """{name: buffer type pointer} of the CPU device's extra buffer types, in llama.cpp's order."""
        g = self.ggml
        device = g.ggml_backend_dev_by_type(0)  # GGML_BACKEND_DEVICE_TYPE_CPU
        if not device:
            return {}
        address = g.ggml_backend_reg_get_proc_address(g.ggml_backend_dev_backend_reg(device),
                                                      b"ggml_backend_dev_get_extra_bufts")
        if not address:
            return {}
        get = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)(address)
        bufts, found = get(device), {}
        for i in range(64):  # a NULL-terminated array; a handful of entries at most
            if not bufts or not bufts[i]:
                break
            found[g.ggml_backend_buft_name(bufts[i]).decode()] = bufts[i]
        return found

    def features(self) -> frozenset[str]:
        found = set()
        for name in self.FEATURES:
            function = getattr(self.cpu, f"ggml_cpu_has_{name}", None)
            if function is not None:
                function.restype = ctypes.c_int
                if function():
                    found.add(name)
        return frozenset(found)


_GGML: dict[str, _Ggml] = {}


def _ggml(llama_cpp: Any) -> _Ggml:
    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    if str(lib_dir) not in _GGML:
        llama_cpp.llama_backend_init()  # registers the CPU backend before we ask for its device
        _GGML[str(lib_dir)] = _Ggml(lib_dir)
    return _GGML[str(lib_dir)]


def _library(lib_dir: Path, name: str) -> Path:
    for candidate in (f"lib{name}.so", f"lib{name}.dylib", f"{name}.dll"):
        if (lib_dir / candidate).exists():
            return lib_dir / candidate
    raise PowerSampleError(f"llama-cpp-python's {name} library is missing from {lib_dir}; reinstall it")


# -- reading a GGUF header -----------------------------------------------------------------------------------------

_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}  # GGUF value types
_STRING, _ARRAY = 8, 9


def read_tensors(path: Path, type_name: Any) -> tuple[Tensor, ...]:
    """The weights a GGUF file declares (name, ggml type name, rows), from its header alone; remembered per file
    version, since a load reads it twice (probe key, then placement).

    type_name maps a ggml type id to its name (ggml's own `ggml_type_name`, so new types need no table here).
    """
    try:
        stat = path.stat()
    except OSError as e:
        raise PowerSampleError(f"cannot load model {path}: {e.strerror}") from None
    return _read_tensors(path, stat.st_size, stat.st_mtime_ns, type_name)


@functools.lru_cache(maxsize=8)
def _read_tensors(path: Path, size: int, mtime_ns: int, type_name: Any) -> tuple[Tensor, ...]:
    try:
        with path.open("rb") as f:
            magic, version = f.read(4), _unpack(f, "I")
            if magic != b"GGUF" or version < 2:
                raise ValueError("not a GGUF v2+ file")
            n_tensors, n_kv = _unpack(f, "Q"), _unpack(f, "Q")
            for _ in range(n_kv):
                _string(f)
                _skip_value(f, _unpack(f, "I"))
            return tuple(_tensor(f, type_name) for _ in range(n_tensors))
    except (OSError, struct.error, ValueError) as e:  # UnicodeDecodeError is a ValueError
        raise PowerSampleError(f"cannot load model {path}: its GGUF header is unreadable ({e})") from None


def _tensor(f: BinaryIO, type_name: Any) -> Tensor:
    name = _string(f)
    dims = [_unpack(f, "Q") for _ in range(_unpack(f, "I"))]
    type_id = _unpack(f, "I")
    _unpack(f, "Q")  # the data offset
    return Tensor(name, type_name(type_id), dims[1] if len(dims) > 1 else 1)


def _unpack(f: BinaryIO, code: str) -> Any:
    size = struct.calcsize("<" + code)
    data = f.read(size)
    if len(data) != size:
        raise ValueError("truncated header")
    return struct.unpack("<" + code, data)[0]


def _string(f: BinaryIO) -> str:
    length = _unpack(f, "Q")
    if length > 1 << 24:
        raise ValueError("implausible string length")
    data = f.read(length)
    if len(data) != length:
        raise ValueError("truncated header")
    return data.decode("utf-8")


def _skip_value(f: BinaryIO, kind: int) -> None:
    if kind in _SCALARS:
        f.seek(struct.calcsize("<" + _SCALARS[kind]), os.SEEK_CUR)
    elif kind == _STRING:
        f.seek(_unpack(f, "Q"), os.SEEK_CUR)
    elif kind == _ARRAY:
        item, count = _unpack(f, "I"), _unpack(f, "Q")
        if item in _SCALARS:
            f.seek(count * struct.calcsize("<" + _SCALARS[item]), os.SEEK_CUR)
        else:
            for _ in range(count):
                _skip_value(f, item)
    else:
        raise ValueError(f"unknown GGUF value type {kind}")
