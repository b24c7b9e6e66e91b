"""The cells of the matrix (engine x architecture x quant), which of them this machine can build, and each cell's
conformance `Subject`.

    hf        the safetensors folder in fp32 (quants do not apply); next_logp from an uncached forward of the model
    llamacpp  the GGUF of each quant; next_logp from the backend's scratch sequence (`next_token_logp`)
    vllm      named, not run: its CPU build lives in a separate environment and starts in about a minute per engine

Every subject's prompt is longer than the sliding window (and within the 512-token context), so every check runs
past the window on the sliding architectures.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np

from powersample.backends import conformance
from powersample.backends.llamacpp import QUANTS
from powersample.core.types import Tokens
from powersample.tools.matrix.archs import ARCHS, CONTEXT, SHAPE, WINDOW
from powersample.tools.matrix.models import ArchFiles, quantized

ENGINES = ("hf", "llamacpp", "vllm")
MATRIX_QUANTS = ("f16", "q8_0", "q6_k", "q5_0", "q4_k_m", "q4_1", "q4_0")  # the matrix's default GGUF types
FP32 = "fp32"  # the quant column of engines that run the weights as saved
PROMPT = (
    "Name the three primary colors of paint. Then explain, in two short sentences, why mixing two of them gives "
    "a secondary color, and give one example of each secondary color."
)
HF_PROPOSAL_TOLERANCE = 4 * conformance.TOLERANCE  # 1/tau scales fp32 noise in a cold proposal's log q
LLAMACPP_TOLERANCE = 0.0  # llama.cpp's exact kernels (backends/llamacpp/kernels.py): the same token's log p is the same
# float whatever the forward's shape, so every check compares bit for bit
LONG_PROMPT = 200  # tokens of a sliding architecture's long_prompt: six windows, within CONTEXT with room to decode
THREADS = 1  # CPU threads per engine: on a small shared machine more threads contend (hf: 4x slower at 2 than 1)
NEXT_LOGP_MEMO = 256  # hf next_logp rows kept per cell (49152 float64 each: 100 MB at most)


@dataclass(frozen=True)
class Cell:
    """One engine running one architecture at one quant."""

    engine: str
    arch: str
    quant: str  # a llamacpp.QUANTS key for llamacpp; FP32 for hf and vllm

    @property
    def name(self) -> str:
        return f"{self.engine} {self.arch} {self.quant}"


def cells(engines: tuple[str, ...], archs: tuple[str, ...], quants: tuple[str, ...]) -> list[Cell]:
    """Every cell of the asked engines, architectures and quants, engine by engine, arch by arch."""
    return [
        Cell(engine, arch, quant)
        for engine in engines
        for arch in archs
        for quant in (quants if engine == "llamacpp" else (FP32,))
    ]


def not_built(cell: Cell) -> str:
    """Why this machine does not build `cell` ('' when it does)."""
    arch = ARCHS[cell.arch]
    if cell.engine == "vllm":
        where = "is installed here, but" if _installed("vllm") else "lives in its own environment (.venv-vllm) and"
        return f"vLLM's CPU build {where} starts in about a minute per engine; the matrix does not start it"
    if not all(_installed(m) for m in ("torch", "transformers", "gguf")):
        return "the hf extra (torch, transformers, gguf) is not installed: the matrix builds every model with it"
    if cell.engine == "llamacpp" and arch.gguf_arch is None:
        return arch.no_gguf
    if cell.engine == "llamacpp" and not _installed("llama_cpp"):
        return "llama-cpp-python is not installed (the llamacpp extra)"
    return ""


@contextlib.contextmanager
def subject(cell: Cell, files: ArchFiles, threads: int = THREADS) -> Iterator[conformance.Subject]:
    """`cell`'s backend, loaded with `threads` CPU threads, as a conformance Subject; closed afterwards."""
    opener = {"hf": _hf_subject, "llamacpp": _llamacpp_subject}[cell.engine]
    with opener(cell, files, threads) as s:
        if ARCHS[cell.arch].window and len(s.prompt) <= WINDOW:
            raise AssertionError(f"the prompt ({len(s.prompt)} tokens) must be longer than the window {WINDOW}")
        yield s


@contextlib.contextmanager
def _hf_subject(cell: Cell, files: ArchFiles, threads: int) -> Iterator[conformance.Subject]:
    from powersample.backends.hf import HFBackend

    with torch_threads(threads):
        backend = HFBackend.load(str(files.hf), device="cpu", dtype="float32")
        prompt = backend.encode(PROMPT, chat=True)
        yield conformance.Subject(
            backend,
            prompt,
            proposal_tolerance=HF_PROPOSAL_TOLERANCE,
            next_logp=_fresh_next_logp(backend.model),
            contexts=ragged(prompt),
            draws_per_forward=True,
            long_prompt=long_prompt(cell, prompt),
        )


@contextlib.contextmanager
def _llamacpp_subject(cell: Cell, files: ArchFiles, threads: int) -> Iterator[conformance.Subject]:
    from powersample.backends.llamacpp import LlamaCppBackend

    if cell.quant not in QUANTS:
        raise AssertionError(f"unknown quant {cell.quant!r}")
    backend = LlamaCppBackend.load(str(quantized(files, cell.quant)), n_ctx=CONTEXT, n_threads=threads, quiet=True)
    try:
        prompt = backend.encode(PROMPT, chat=True)
        yield conformance.Subject(
            backend,
            prompt,
            tolerance=LLAMACPP_TOLERANCE,
            next_logp=backend.next_token_logp,
            contexts=ragged(prompt),
            draws_per_forward=True,
            long_prompt=long_prompt(cell, prompt),
        )
    finally:
        backend.close()


def long_prompt(cell: Cell, prompt: Tokens) -> Tokens:
    """For an architecture with a sliding window: the prompt followed by seeded ids (not the special ones) up to
    LONG_PROMPT tokens, several windows long; () for one without."""
    if not ARCHS[cell.arch].window:
        return ()
    filler = np.random.default_rng(23).integers(100, SHAPE["vocab_size"], LONG_PROMPT - len(prompt))
    return prompt + tuple(int(t) for t in filler)


def ragged(prompt: Tokens) -> tuple[Tokens, ...]:
    """The batching check's contexts: the prompt, longer and shorter by a few ids, and one more id."""
    return (prompt, prompt + (28, 314), prompt[:-3], prompt + (11,))


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """torch's CPU threads set to `threads` for the block, then restored (the setting is process-wide)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _fresh_next_logp(model: Any) -> Callable[[Tokens], np.ndarray]:
    """Base log p of the next token after a context, from one uncached forward of `model` (not the backend's code):
    (V,) float64. Checks ask for the same contexts again (a draft's k = 1, 2, 4 draw the same tokens): the rows of
    the last NEXT_LOGP_MEMO contexts are kept."""
    import torch

    @functools.lru_cache(maxsize=NEXT_LOGP_MEMO)
    def row(context: Tokens) -> np.ndarray:
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([list(context)]), use_cache=False).logits[0, -1]  # (V,)
        return torch.log_softmax(logits.double(), dim=-1).numpy()

    return lambda context: row(tuple(context)).copy()


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None
