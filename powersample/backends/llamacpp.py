"""`llamacpp`: a GGUF model run by llama.cpp (through llama-cpp-python) behind the backend seam (`base.py`).

`score` and `confidence` (the paper's Eq. 13) read one logits row per continuation token from a batched decode.
Per new token, `extend` runs ONE llama.cpp decode and derives both distributions from its last logits row:

    log p = logits - logsumexp(logits)                 # base: temperature 1, no truncation (float64)
    log q = proposal_logprobs(log p, proposal)         # proposal: temperature, top-k, top-p, renormalized
    token = draw(log q, request.rng)                   # all randomness comes from the chain's own generator

llama.cpp's own sampler is never used. We drive the low-level C API (our own `llama_batch`, `llama_decode`,
`llama_get_logits_ith`) so that each decode computes exactly the logits rows we read: the last one when extending,
one per continuation token when scoring. `Llama.scores` is never read: with `logits_all=False` it stays zero, and
`logits_all=True` costs n_ctx x vocab x 4 bytes (1.6 GB for SmolLM2 at n_ctx 8192) for no gain in speed.

Caches. Slot s uses KV cache s % n_caches (a llama.cpp context each, all sharing the model's weights), which holds
the ids it was fed. A request cuts the cache back to its longest common prefix with the request's tokens
(`llama_memory_seq_rm`) and decodes only the rest, always at least one token, so a logits row read was computed
for this very prefix and is never a stale one. Correctness never depends on the slot: a foreign cache only costs a
longer prefill. A cache costs ~180 MB at n_ctx 8192 for SmolLM2-135M and ~0.1 s to create; sharing one cache among
chains would instead re-read each chain's generated tokens on every switch, and a batched prefill here is only
about 2x faster per token than decoding.

Flash attention is on because without it llama.cpp's CPU kernels give a token's keys and values slightly different
values when it is decoded alone or in a batch (log p then moved by up to ~0.5), so log p would depend on how the
cache was filled; with it, sampling, scoring and rewinding give bit-identical log-probs.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from powersample.backends.base import (
    Continuation,
    ExtendRequest,
    Proposal,
    Tokens,
    draw,
    negative_entropy,
    proposal_logprobs,
)
from powersample.backends.embedded import embedded_gguf_path
from powersample.errors import PowerSampleError

GGUF_MAGIC = b"GGUF"  # the first four bytes of every GGUF file
N_BATCH = 512  # most tokens per llama_decode call; longer inputs are fed in chunks
N_CACHES = 4  # KV caches (llama.cpp contexts) kept; slot s uses cache s % N_CACHES
INSTALL_HINT = "the llamacpp backend needs llama-cpp-python: pip install llama-cpp-python"


@dataclass
class _Cache:
    """One llama.cpp context (its KV cache, sequence 0) and the token ids it holds, in order."""

    ctx: Any  # llama_context_p
    memory: Any  # llama_memory_t of ctx
    ids: list[int] = field(default_factory=list)


class LlamaCppBackend:
    """Sampling and scoring with a GGUF model through llama.cpp, one KV cache per slot. See the module docstring."""

    def __init__(self, llm: Any, n_caches: int = N_CACHES, reuse_cache: bool = True):
        self._lib = _import_llama_cpp()
        self.reuse_cache = reuse_cache  # False: every request decodes its whole context afresh (bench baseline)
        self.llm = llm  # a llama_cpp.Llama; its own context serves as cache 0
        self._vocab = self._lib.llama_model_get_vocab(llm.model)
        self.n_vocab: int = llm.n_vocab()
        self.eos_ids = _eos_ids(self._lib, self._vocab, llm.metadata)
        self.context_length: int | None = llm.n_ctx()
        self._caches: list[_Cache | None] = [_Cache(llm.ctx, self._lib.llama_get_memory(llm.ctx))]
        self._caches += [None] * (max(1, n_caches) - 1)  # the others are created on first use
        self._batch = self._lib.llama_batch_init(N_BATCH, 0, 1)
        self._scratch = np.empty(self.n_vocab)  # (V,) float64, for exp() inside _logp_row
        self.evaluated_tokens = 0  # tokens fed to llama_decode, all caches; tests check cache reuse with it

    @classmethod
    def load(
        cls,
        model: str | None,
        *,
        n_ctx: int | None = None,
        n_threads: int | None = None,
        n_caches: int = N_CACHES,
        reuse_cache: bool = True,
    ) -> LlamaCppBackend:
        """Load a GGUF file: None = the embedded SmolLM2-135M-Instruct (Q4_1).

        n_ctx None = the model's training context; n_threads None = half the logical cores (llama-cpp-python's own
        default: one per physical core), for decoding and prefill alike. Every failure is a one-line
        PowerSampleError.
        """
        llama_cpp = _import_llama_cpp()
        path = embedded_gguf_path() if model is None else _check_gguf(Path(model).expanduser())
        threads = n_threads or max(1, (os.cpu_count() or 2) // 2)
        try:
            llm = llama_cpp.Llama(
                model_path=str(path),
                n_ctx=n_ctx or 0,  # 0 = the model's training context
                n_batch=N_BATCH,
                n_threads=threads,
                n_threads_batch=threads,  # its default, every core, spins badly when a core is busy elsewhere
                logits_all=False,  # Llama.scores stays unused; we read rows with llama_get_logits_ith
                flash_attn=True,  # makes log p independent of how the cache was filled (module docstring)
                verbose=False,
            )
        except Exception as e:  # noqa: BLE001 - every loader failure becomes one line, never a traceback
            raise PowerSampleError(f"cannot load model {path}: {_one_line(e)}") from None
        return cls(llm, n_caches, reuse_cache)

    def close(self) -> None:
        """Free the extra contexts and the batch (the Llama frees its own context and the model); then unusable."""
        lib, caches, batch = self._lib, getattr(self, "_caches", []), getattr(self, "_batch", None)
        for cache in caches[1:]:
            if cache is not None:
                lib.llama_free(cache.ctx)
        self._caches, self._batch = caches[:1], None
        if batch is not None:
            lib.llama_batch_free(batch)

    def __del__(self) -> None:
        if hasattr(self, "_lib"):
            self.close()

    def encode(self, prompt: str, chat: bool = True) -> Tokens:
        """Prompt ids; with `chat` and a chat template, the prompt is one user message plus the assistant header.

        Special tokens written in the text (the template's `<|im_start|>`, ...) are parsed as special tokens, as
        transformers does; BOS is added only to a plain prompt whose model asks for it (a template writes its own).
        """
        template = self.llm.metadata.get("tokenizer.chat_template")
        if chat and template:
            text, add_bos = self._render_chat(template, prompt), False
        else:
            text, add_bos = prompt, bool(self._lib.llama_vocab_get_add_bos(self._vocab))
        ids = self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True) if text else []
        if not ids and self.llm.token_bos() >= 0:
            ids = [self.llm.token_bos()]  # an empty prompt: sample unconditionally from BOS
        return tuple(int(t) for t in ids)

    def decode(self, tokens: Sequence[int]) -> str:
        """Text of `tokens`; special (control) tokens render as nothing."""
        return self.llm.detokenize(list(tokens), special=False).decode("utf-8", errors="replace")

    def extend(self, requests: Sequence[ExtendRequest], proposal: Proposal) -> list[Continuation]:
        """One continuation per request, in order (batch 1: one request after another)."""
        return [self._extend_one(r, proposal) for r in requests]

    def score(self, context: Sequence[int], continuation: Sequence[int]) -> tuple[float, ...]:
        """log p of each continuation token, in the cache sharing the longest prefix with context + continuation."""
        return tuple(float(logp[token]) for logp, token in self._rows(context, continuation))

    def confidence(self, context: Sequence[int], continuation: Sequence[int]) -> tuple[float, ...]:
        """Sum_x p log p of the base next-token distribution before each continuation token (the paper's Eq. 13)."""
        return tuple(float(negative_entropy(logp)) for logp, _ in self._rows(context, continuation))

    def next_token_logp(self, context: Sequence[int]) -> np.ndarray:
        """Base log p over the whole vocabulary for the token after `context`: (V,) float64. For tests and tools."""
        if not context:
            raise PowerSampleError("cannot score after an empty context: there are no logits for a first token")
        ids = list(context)
        return self._next_logp(self._best_cache(ids), ids)

    def clear_caches(self) -> None:
        """Empty every KV cache, so that the next request is evaluated from scratch (e.g. to time a cold start)."""
        for cache in self._caches:
            if cache is not None:
                self._rewind(cache, 0)

    def _extend_one(self, request: ExtendRequest, proposal: Proposal) -> Continuation:
        """Draw up to max_tokens tokens from q after request.context, stopping right after an EOS."""
        self._check_length(len(request.context), request.max_tokens)
        if not request.context:
            raise PowerSampleError("cannot extend an empty context: the prompt encodes to no tokens")
        cache, ids = self._cache(request.slot), list(request.context)
        if not self.reuse_cache:
            self._rewind(cache, 0)
        tokens: list[int] = []
        base_logp: list[float] = []
        proposal_logq: list[float] = []
        while True:
            logp = self._next_logp(cache, ids)  # (V,)
            logq = proposal_logprobs(logp, proposal)
            token = draw(logq, request.rng)
            tokens.append(token)
            base_logp.append(float(logp[token]))
            proposal_logq.append(float(logq[token]))
            if token in self.eos_ids or len(tokens) == request.max_tokens:
                break
            ids.append(token)  # the next _feed decodes just this token
        return Continuation(tuple(tokens), tuple(base_logp), tuple(proposal_logq))

    def _cache(self, slot: int) -> _Cache:
        """The cache serving `slot`, creating its context on first use."""
        index = slot % len(self._caches)
        cache = self._caches[index]
        if cache is None:
            ctx = self._lib.llama_init_from_model(self.llm.model, self.llm.context_params)
            if ctx is None:
                raise PowerSampleError(f"llama.cpp could not create a context for cache {index} (out of memory?)")
            cache = self._caches[index] = _Cache(ctx, self._lib.llama_get_memory(ctx))
        return cache

    def _rows(self, context: Sequence[int], continuation: Sequence[int]) -> Iterator[tuple[np.ndarray, int]]:
        """(base log p row (V,), the token it predicts) before each continuation token, from the best cache."""
        if not continuation:
            return
        self._check_length(len(context), len(continuation))
        if not context:
            raise PowerSampleError("cannot score after an empty context: there are no logits for a first token")
        ids = list(context) + list(continuation)
        cache = self._best_cache(ids)
        for i, pos in self._feed(cache, ids, first_output=len(context) - 1, end_output=len(ids) - 1):
            yield self._logp_row(cache, i), ids[pos + 1]

    def _best_cache(self, ids: list[int]) -> _Cache:
        """The existing cache sharing the longest prefix with `ids` (for requests without a slot)."""
        return max((c for c in self._caches if c is not None), key=lambda c: _common_prefix(c.ids, ids))

    def _next_logp(self, cache: _Cache, ids: list[int]) -> np.ndarray:
        """log p of the token after `ids`, leaving `cache` holding exactly `ids`: (V,)."""
        ((last, _),) = self._feed(cache, ids, first_output=len(ids) - 1, end_output=len(ids))
        return self._logp_row(cache, last)

    def _feed(self, cache: _Cache, ids: list[int], first_output: int, end_output: int) -> Iterator[tuple[int, int]]:
        """Make `cache` hold `ids`, computing logits at positions [first_output, end_output).

        The cache is first cut back to its common prefix with `ids`, but never past first_output, so every position
        whose logits we read is decoded now. Yields (batch index, position) for each such position right after its
        chunk is decoded; read the row before advancing the iterator.
        """
        keep = min(_common_prefix(cache.ids, ids), first_output)
        self._rewind(cache, keep)
        for start in range(keep, len(ids), N_BATCH):
            chunk = ids[start : start + N_BATCH]
            wanted = range(max(first_output, start), min(end_output, start + len(chunk)))
            self._decode(cache, chunk, [pos - start for pos in wanted])
            yield from ((pos - start, pos) for pos in wanted)

    def _rewind(self, cache: _Cache, keep: int) -> None:
        """Drop every cached position from `keep` on (keys, values and ids)."""
        if keep == len(cache.ids):
            return
        if not self._lib.llama_memory_seq_rm(cache.memory, 0, keep, -1):  # e.g. a recurrent model: start over
            self._lib.llama_memory_clear(cache.memory, True)
            keep = 0
        del cache.ids[keep:]

    def _decode(self, cache: _Cache, chunk: list[int], outputs: Sequence[int]) -> None:
        """Append `chunk` (<= N_BATCH ids) to the cache in one llama_decode, with logits at batch indices `outputs`."""
        batch, past, wanted = self._batch, len(cache.ids), set(outputs)
        batch.n_tokens = len(chunk)
        for i, token in enumerate(chunk):
            batch.token[i] = token
            batch.pos[i] = past + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = i in wanted
        status = self._lib.llama_decode(cache.ctx, batch)
        if status != 0:
            raise PowerSampleError(f"llama.cpp could not decode {len(chunk)} tokens (llama_decode returned {status})")
        cache.ids.extend(chunk)
        self.evaluated_tokens += len(chunk)

    def _logp_row(self, cache: _Cache, i: int) -> np.ndarray:
        """log p of the token after batch index i of the cache's last decode: log_softmax in float64, (V,)."""
        pointer = self._lib.llama_get_logits_ith(cache.ctx, i)
        logp = np.ctypeslib.as_array(pointer, shape=(self.n_vocab,)).astype(np.float64)  # a copy of the float32 row
        logp -= logp.max()
        np.exp(logp, out=self._scratch)  # reused: a fresh 400 KB temporary per token costs ~0.3 ms of page faults
        logp -= np.log(self._scratch.sum())  # log p = logits - logsumexp(logits)
        return logp

    def _render_chat(self, template: str, prompt: str) -> str:
        """The chat template applied to one user message, rendered the way transformers' apply_chat_template does."""
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        formatter = Jinja2ChatFormatter(
            template, eos_token=self._piece(self.llm.token_eos()), bos_token=self._piece(self.llm.token_bos())
        )
        return formatter(messages=[{"role": "user", "content": prompt}]).prompt

    def _piece(self, token: int) -> str:
        """The text of one (possibly special) token; '' for -1, llama.cpp's 'none'."""
        return self.llm.detokenize([token], special=True).decode("utf-8", errors="replace") if token >= 0 else ""

    def _check_length(self, context: int, new: int) -> None:
        if self.context_length is not None and context + new > self.context_length:
            raise PowerSampleError(
                f"{context} context tokens + {new} new tokens exceed the model's context length ({self.context_length})"
            )


def _import_llama_cpp() -> Any:
    """The llama_cpp module, or a one-line PowerSampleError saying how to install it."""
    try:
        import llama_cpp
    except ModuleNotFoundError as e:
        if e.name not in ("llama_cpp", None):
            raise
        raise PowerSampleError(INSTALL_HINT) from None
    return llama_cpp


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


def _eos_ids(lib: Any, vocab: Any, metadata: dict[str, str]) -> frozenset[int]:
    """The EOS id plus the EOT id where the GGUF declares one.

    Not `llama_vocab_eot`: lacking a declared EOT, llama.cpp guesses one from token texts (SmolLM2: id 0,
    `<|endoftext|>`), where transformers would not stop.
    """
    ids = {int(lib.llama_vocab_eos(vocab)), int(metadata.get("tokenizer.ggml.eot_token_id", -1))}
    return frozenset(i for i in ids if i >= 0)


def _common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix; the usual case (b extends a) is one C-speed list comparison."""
    if len(a) <= len(b) and a == b[: len(a)]:
        return len(a)
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _one_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."
