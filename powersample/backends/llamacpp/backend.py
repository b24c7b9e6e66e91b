"""`LlamaCppBackend`: the backend seam (`base.py`) on a GGUF model through llama.cpp's C API. The package docstring
(`__init__.py`) says how it decodes, batches, caches and keeps log p the same whatever the batch.

Here: loading, text, the decoding loop (`_run`: admit, step, retire), scoring in the scratch sequence, and the
context's memory (room grown and given back). The KV-cache bookkeeping is `kvcache.py`, the rows `decode.py`, the
C calls `context.py`, the layout and crash probes `probing.py`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from powersample.backends.engine import check_fits, extend_in_one_run, verify_step
from powersample.backends.llamacpp import context
from powersample.backends.llamacpp.context import N_BATCH, Item, LlamaMemory
from powersample.backends.llamacpp.decode import LaneRow, Waiting, admit, fitting
from powersample.backends.llamacpp.files import Weights, model_path
from powersample.backends.llamacpp.kernels import Layout
from powersample.backends.llamacpp.kvcache import Seq, SeqCache
from powersample.backends.llamacpp.library import import_llama_cpp, route_log
from powersample.backends.llamacpp.probing import layout_for
from powersample.backends.memory import LLAMACPP_BUFFERS, LLAMACPP_CACHE_BYTES, KVLayout, counted_layout
from powersample.backends.tokenizer import plain_transcript
from powersample.core.numerics import negative_entropy, ranked_rows
from powersample.core.types import Continuation, ExtendRequest, Poll, Proposal, Ranked, Refill, Tokens
from powersample.errors import PowerSampleError

MAX_SLOTS = 16  # rows decoded together at most; each slot owns two sequences
MOST_SLOTS = 127  # llama.cpp allows 256 sequences: 2 per slot + the scratch one
MIN_ROOM = 256  # tokens per sequence the context starts with (llama.cpp rounds up to a multiple of 256)
KEEP_ROOM = 1024  # tokens per sequence kept when a run or scoring call ends; more goes back to MIN_ROOM (Memory)


@dataclass
class LlamaCppStats:
    """Diagnostics (not part of the seam): what the backend has done since it was built."""

    evaluated_tokens: int = 0  # tokens fed to llama_decode; tests check cache reuse with it
    decode_calls: int = 0  # llama_decode calls; tests check that one serves every row of a step
    forwards: int = 0  # llama_decode calls of decoding steps (not prefills or scoring): the sequential forwards
    fed_tokens: int = 0  # ids those forwards fed: next tokens and draft tokens, void ones included
    drafted: int = 0  # draft tokens verified (kept or replaced), summed over finished rows
    kept_drafts: int = 0  # of those, kept
    grown: int = 0  # times the context was re-created with more room per sequence
    given_back: int = 0  # times it was re-created with less (KEEP_ROOM)


class LlamaCppBackend:
    """Sampling and scoring with a GGUF model through llama.cpp; batched decoding, two sequences per slot."""

    HINTS = frozenset({"speculate", "floor"})  # engine.Row: drafts verified per forward, a row below its floor leaves

    def __init__(
        self,
        weights: Weights,
        *,
        n_ctx: int | None = None,
        max_slots: int = MAX_SLOTS,
        reuse_cache: bool = True,
        layout: Layout | None = None,
        quiet: bool = False,
    ):
        if not 1 <= max_slots <= MOST_SLOTS:
            raise PowerSampleError(f"max_slots must be between 1 and {MOST_SLOTS}, got {max_slots}")
        self._lib = import_llama_cpp()
        self.weights = weights  # model, tokenizer, metadata, threads, placement
        self.llm = weights.model  # llama-cpp-python's LlamaModel: tokenize, detokenize, special tokens
        self.reuse_cache = reuse_cache  # False: every request decodes its whole context afresh, alone (baseline)
        self.max_slots = max_slots
        self.quiet = quiet  # no notes on stderr (the layout probe's)
        self._vocab = self._lib.llama_model_get_vocab(self.llm.model)
        self.n_vocab: int = self.llm.n_vocab()
        self.eos_ids = _eos_ids(self._lib, self._vocab, weights.metadata)
        self.context_length: int | None = n_ctx or self.llm.n_ctx_train()  # the most tokens one sequence may hold
        self._batch = self._lib.llama_batch_init(N_BATCH, 0, 1)
        self.layout = layout or layout_for(self._lib, weights, self.n_vocab, quiet)  # batched, or one row per
        # decode (kernels.py); a given layout is for tests and measurements (batched is exact only where the probe
        # says so)
        self._ctx, self._room = self._new_context(min(MIN_ROOM, self.context_length))
        self.cache = SeqCache(self._memory(), max_slots, reuse_cache)  # which sequence holds what (kvcache.py)
        self._logp = np.empty((max_slots, self.n_vocab))  # (fed, V) float64, reused: fresh pages cost ~0.3 ms a row
        self._exp = np.empty((max_slots, self.n_vocab))  # (fed, V) scratch for exp(); both grow with drafts
        self.stats = LlamaCppStats()  # diagnostics, for tests and tools

    @classmethod
    def load(
        cls,
        model: str | None,
        *,
        n_ctx: int | None = None,
        n_threads: int | None = None,
        max_slots: int = MAX_SLOTS,
        reuse_cache: bool = True,
        quant: str | None = None,
        quiet: bool = False,
    ) -> LlamaCppBackend:
        """Load a GGUF file: None = the embedded SmolLM2-135M-Instruct (Q4_1).

        n_ctx: the most tokens one sequence may hold; None = the model's training context (memory grows with the
        longest request, not with n_ctx: the package docstring, Memory). n_threads None = half the logical cores
        (llama-cpp-python's own default: one per physical core), for decoding and prefill alike. max_slots: rows
        decoded together. quant: re-quantize the file once to this type (`QUANTS`), cached, and load the copy.
        llama.cpp runs its exact kernels, batched where they allow it (`kernels.py`).
        llama.cpp's log shows its warnings and errors, only its errors when `quiet` (`route_log`). Every failure is a
        one-line PowerSampleError.
        """
        llama_cpp = import_llama_cpp()
        route_log(llama_cpp, quiet)
        path = model_path(llama_cpp, model, quant)
        weights = Weights.load(llama_cpp, path, n_threads or max(1, (os.cpu_count() or 2) // 2))
        n_ctx = n_ctx or int(llama_cpp.llama_model_n_ctx_train(weights.model.model))
        return cls(weights, n_ctx=n_ctx, max_slots=max_slots, reuse_cache=reuse_cache, quiet=quiet)

    def close(self) -> None:
        """Free the context and the batch (the Llama frees its own context and the model); then unusable."""
        lib, ctx, batch = self._lib, getattr(self, "_ctx", None), getattr(self, "_batch", None)
        self._ctx, self._batch = None, None
        if ctx is not None:
            lib.llama_free(ctx)
        if batch is not None:
            lib.llama_batch_free(batch)

    def __del__(self) -> None:
        # At interpreter exit llama_cpp's module globals may be gone before us (llama_free is None by then): leave
        # the memory to the OS rather than print a traceback.
        if hasattr(self, "_lib") and not sys.is_finalizing():
            self.close()

    def encode(self, prompt: str, chat: bool = True) -> Tokens:
        """Prompt ids; with `chat` and a chat template, the prompt is one user message plus the assistant header.

        Special tokens written in the text (the template's `<|im_start|>`, ...) are parsed as special tokens, as
        transformers does; BOS is added only to a plain prompt whose model asks for it (a template writes its own).
        """
        template = self.weights.metadata.get("tokenizer.chat_template")
        if chat and template:
            text, add_bos = self._render_chat(template, prompt), False
        else:
            text, add_bos = prompt, bool(self._lib.llama_vocab_get_add_bos(self._vocab))
        ids = self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True) if text else []
        if not ids and self.llm.token_bos() >= 0:
            ids = [self.llm.token_bos()]  # an empty prompt: sample unconditionally from BOS
        return tuple(int(t) for t in ids)

    def encode_messages(self, messages: Sequence[Mapping[str, str]]) -> Tokens:
        """Ids of a chat conversation ({"role", "content"} dicts) plus the assistant header, through the chat
        template; a model without one gets the plain transcript "role: content" per line, then "assistant:"."""
        template = self.weights.metadata.get("tokenizer.chat_template")
        if not template:
            return self.encode(plain_transcript(messages), chat=False)
        text = self._render_messages(template, messages)
        return tuple(int(t) for t in self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))

    def default_speculate(self) -> int:
        """0: drafts only when asked (base.Speculation). llama.cpp's CPU kernels cost about k single-token decodes
        for a forward of k tokens (k = 8: 7x one decode, the embedded Q4_1 at 1 thread; q8_0 and q4_0 alike), so
        a drafted token is never cheaper than a decoded one."""
        return 0

    def decode(self, tokens: Sequence[int]) -> str:
        """Text of `tokens`; special (control) tokens render as nothing."""
        return self.llm.detokenize(list(tokens), special=False).decode("utf-8", errors="replace")

    def vocab_size(self) -> int:
        return self.n_vocab

    def token_text(self, token: int) -> str:
        """One id's text, special tokens spelled out (the `Vocabulary` capability)."""
        return self._piece(token)

    # --- extending ------------------------------------------------------------------------------------------------

    def kv_layout(self) -> KVLayout:
        """KV bytes per token in f16, a lane and a bank per slot (backends/memory.py: the PlansMemory capability)."""
        lib, model = self._lib, self.llm.model
        heads, kv_heads = lib.llama_model_n_head(model), lib.llama_model_n_head_kv(model)
        head_dim = lib.llama_model_n_embd(model) // heads
        return counted_layout(
            lib.llama_model_n_layer(model), kv_heads, head_dim, LLAMACPP_CACHE_BYTES, LLAMACPP_BUFFERS
        )

    def extend(self, requests: Sequence[ExtendRequest], proposal: Proposal) -> list[Continuation]:
        """One continuation per request, in order, decoded together (one llama_decode per step for all rows).

        Requests sharing a slot run one after another, in order; so do all requests when reuse_cache is False."""
        return extend_in_one_run(self._run, requests, proposal)

    def extend_continuous(
        self, requests: Mapping[int, ExtendRequest], proposal: Proposal, refill: Refill, poll: Poll | None = None
    ) -> None:
        """Decode `requests` (by key) as one batch that stays full: when a row finishes, refill(key, continuation)
        gives the requests that start now, and poll() those that arrived; they join the batch at the next step."""
        self._run(dict(requests), proposal, refill, poll)

    def _run(self, requests: dict[int, ExtendRequest], proposal: Proposal, refill: Refill, poll: Poll | None = None):
        """The decoding loop: admit waiting requests (up to the capacity, one row per slot), step, retire rows."""
        capacity = self.max_slots if self.reuse_cache else 1
        rows: list[LaneRow] = []
        waiting = list(requests.items())
        while True:
            waiting += (poll() if poll else {}).items()
            if not (waiting or rows):
                return
            admitted, waiting = admit(waiting, rows, capacity)
            rows = sorted(rows + self._start(admitted, rows), key=lambda row: row.seq.seq_id)  # lane order
            done = self._step(rows, proposal)
            finished, rows = [rows[b] for b in done], [r for b, r in enumerate(rows) if b not in done]
            for row in finished:
                self.stats.drafted += row.drafted
                self.stats.kept_drafts += row.kept_drafts
                waiting += refill(row.key, row.continuation()).items()

    def _start(self, admitted: Waiting, rows: list[LaneRow]) -> list[LaneRow]:
        """Rows for the admitted requests, each one's sequence found and prefilled up to its last context token.

        Rows start one after another, so a row whose prefix another new row just prefilled (the shared prompt)
        copies it instead of prefilling it again.
        """
        for _, request in admitted:
            self._check_request(request)
        if admitted:  # before any copy below: a copy lands at the next decode, and growing reads the cells
            self._fit(max(len(request.context) + request.max_tokens for _, request in admitted))
        busy_slots = {row.request.slot for row in rows} | {request.slot for _, request in admitted}
        new_rows = []
        for key, request in admitted:
            seq = self.cache.claim(request.context, request.slot, busy_slots)
            self._prefill(seq, request.context[len(seq.ids) : -1], request.halted)
            new_rows.append(LaneRow(key, request, request.context[-1], seq=seq))
        return new_rows

    def _step(self, rows: list[LaneRow], proposal: Proposal) -> list[int]:
        """One decoding step: every row feeds `row.feed()` (its next token, then the draft tokens it verifies now),
        all in one llama_decode (one per N_BATCH fed ids, should they exceed it) in the batched layout, one
        llama_decode per row in the rows layout. Returns the indices of the rows that are now finished (EOS or
        max_tokens)."""
        feeds, rows_at = [row.feed() for row in rows], range(len(rows))
        done: list[int] = []
        groups = fitting([len(fed) for fed in feeds], N_BATCH) if self.layout.batched else [[b] for b in rows_at]
        for group in groups:
            finished = self._forward([rows[b] for b in group], [feeds[b] for b in group], proposal)
            done += [group[b] for b in finished]
        return done

    def _forward(self, rows: list[LaneRow], feeds: list[list[int]], proposal: Proposal) -> list[int]:
        """One llama_decode of each row's fed ids at the next positions of its sequence, logits for every one; the
        rows' tokens drawn or verified from them (engine.verify_step); void fed ids cut from the cache. Returns the
        indices of the rows now finished."""
        items = [
            (token, len(row.seq.ids) + j, row.seq.seq_id, True)
            for row, fed in zip(rows, feeds)
            for j, token in enumerate(fed)
        ]
        self._decode(items)
        self.stats.forwards += 1
        self.stats.fed_tokens += len(items)
        for row, fed in zip(rows, feeds):
            row.seq.ids.extend(fed)  # its cells now hold the ids just fed
        logp = self._logp_rows(range(len(items)))
        ends = np.cumsum([len(fed) for fed in feeds]).tolist()
        per_row = [logp[end - len(fed) : end] for fed, end in zip(feeds, ends)]  # (len(fed), V) each
        done, valid = verify_step(rows, per_row, proposal, self.eos_ids)
        for b, (row, fed) in enumerate(zip(rows, feeds)):
            self._drop_void(row, len(fed) - valid[b], live=b not in done)
        return done

    def _drop_void(self, row: LaneRow, void: int, live: bool) -> None:
        """Cut the last `void` fed ids (after a replaced draft token) from the row's sequence; a live row whose
        model cannot cut a sequence's tail (recurrent) gets its kept ids prefilled again."""
        if void == 0:
            return
        self.cache.cut(row.seq, len(row.seq.ids) - void)
        if live:
            self._prefill(row.seq, row.needs()[len(row.seq.ids) :])

    def _check_request(self, request: ExtendRequest) -> None:
        self._check_length(len(request.context), request.max_tokens)
        if not request.context:
            raise PowerSampleError("cannot extend an empty context: the prompt encodes to no tokens")

    def clear_caches(self) -> None:
        """Empty every sequence, so that the next request is evaluated from scratch (e.g. to time a cold start)."""
        self.cache.clear()

    # --- the context ----------------------------------------------------------------------------------------------

    def _new_context(self, room: int) -> tuple[Any, int]:
        """(a llama.cpp context with `room` tokens for each sequence, in the layout's micro-batches, the room
        llama.cpp gave)."""
        return context.new_context(self._lib, self.weights, room, 2 * self.max_slots + 1, self.layout.micro_batch)

    def _memory(self) -> LlamaMemory:
        return LlamaMemory(self._lib, self._lib.llama_get_memory(self._ctx))

    def _fit(self, length: int) -> None:
        """Give every sequence room for `length` tokens: a bigger context (at least double), cells moved over."""
        if length > self._room:
            self._resize(min(max(length, 2 * self._room), self.context_length or length))
            self.stats.grown += 1

    def release_memory(self) -> None:
        """A room above KEEP_ROOM back to MIN_ROOM, and the log p buffers, grown by drafts, back to max_slots rows
        (the ReleasesMemory capability; the package docstring, Memory)."""
        if self._room > KEEP_ROOM:
            self._resize(min(MIN_ROOM, self.context_length or MIN_ROOM))
            self.stats.given_back += 1
        if len(self._logp) > self.max_slots:
            self._logp, self._exp = np.empty((self.max_slots, self.n_vocab)), np.empty((self.max_slots, self.n_vocab))

    def _resize(self, room: int) -> None:
        """A new context with `room` tokens per sequence; each sequence cut to the room llama.cpp gave, if longer,
        and its cells moved over (the exact bytes), then the old context freed. Only at a point where no copy is
        pending (before `_start`'s copies, or once a decode has run)."""
        old, (new, self._room) = self._ctx, self._new_context(room)
        self._ctx = new
        self.cache.move(self._memory(), self._room, lambda seq_id: context.move_cells(self._lib, old, new, seq_id))
        self._lib.llama_free(old)

    # --- decoding -------------------------------------------------------------------------------------------------

    def _prefill(self, seq: Seq, ids: Sequence[int], halted: Callable[[], bool] = lambda: False) -> None:
        """Append `ids` to the sequence, in chunks of N_BATCH tokens, computing no logits; stopped between two chunks
        once `halted()` (a request's halt: its row then runs one forward on the cells it has, and is cut)."""
        for start in range(0, len(ids), N_BATCH):
            if start and halted():
                return
            chunk, past = ids[start : start + N_BATCH], len(seq.ids)
            self._decode([(token, past + i, seq.seq_id, False) for i, token in enumerate(chunk)])
            seq.ids.extend(chunk)

    def _decode(self, items: Sequence[Item]) -> None:
        """One llama_decode of `items` (at most N_BATCH), entries as many as tokens; counted in `stats`."""
        context.submit(self._lib, self._ctx, self._batch, items)
        self.stats.decode_calls += 1
        self.stats.evaluated_tokens += len(items)

    def _logp_rows(self, indices: Sequence[int]) -> np.ndarray:
        """log p after each given batch index of the last decode: log_softmax in float64, (n, V), a reused buffer."""
        n = len(indices)
        if n > len(self._logp):  # more fed ids than ever before (drafts): grow the buffers once
            self._logp, self._exp = np.empty((n, self.n_vocab)), np.empty((n, self.n_vocab))
        logp, scratch = self._logp[:n], self._exp[:n]
        for b, i in enumerate(indices):
            logp[b] = context.logits(self._lib, self._ctx, i, self.n_vocab)
        logp -= logp.max(axis=1, keepdims=True)
        np.exp(logp, out=scratch)
        logp -= np.log(scratch.sum(axis=1, keepdims=True))  # log p = logits - logsumexp(logits)
        return logp

    # --- scoring --------------------------------------------------------------------------------------------------

    def score(self, context: Sequence[int], continuation: Sequence[int]) -> tuple[float, ...]:
        """log p of each continuation token, decoded in the scratch sequence after the longest cached prefix."""
        return tuple(float(logp[token]) for logp, token in self._rows(context, continuation))

    def confidence(self, context: Sequence[int], continuation: Sequence[int]) -> tuple[float, ...]:
        """Sum_x p log p of the base next-token distribution before each continuation token (the paper's Eq. 13)."""
        return tuple(float(negative_entropy(logp)) for logp, _ in self._rows(context, continuation))

    def rank(self, context: Sequence[int], continuation: Sequence[int], n: int) -> tuple[Ranked, ...]:
        """Each continuation token's log p and the n likeliest tokens before it (the `Ranking` capability), decoded
        as `score` decodes them."""
        return ranked_rows(self._rows(context, continuation), n)

    def next_token_logp(self, context: Sequence[int]) -> np.ndarray:
        """Base log p over the whole vocabulary for the token after `context`: (V,) float64. For tests and tools."""
        if not context:
            raise PowerSampleError("cannot score after an empty context: there are no logits for a first token")
        self._check_length(len(context), 0)
        ((logp, _),) = self._scratch_rows(list(context), first_output=len(context) - 1)
        return logp.copy()

    def _rows(self, context: Sequence[int], continuation: Sequence[int]) -> Iterator[tuple[np.ndarray, int]]:
        """(base log p row (V,), the token it predicts) before each continuation token."""
        if not continuation:
            return
        self._check_length(len(context), len(continuation))
        if not context:
            raise PowerSampleError("cannot score after an empty context: there are no logits for a first token")
        ids = list(context) + list(continuation)
        for logp, pos in self._scratch_rows(ids[:-1], first_output=len(context) - 1):
            yield logp, ids[pos + 1]

    def _scratch_rows(self, ids: list[int], first_output: int) -> Iterator[tuple[np.ndarray, int]]:
        """(log p row (V,), position) after each position from first_output to the end of `ids`.

        The scratch sequence takes the longest cached prefix (of any sequence), never past first_output, so every
        row read is decoded now; rows are yielded right after their chunk's decode (read one before advancing).
        """
        self._fit(len(ids))
        scratch = self.cache.for_scoring(ids, first_output)
        for start in range(len(scratch.ids), len(ids), N_BATCH):
            chunk, wanted = ids[start : start + N_BATCH], range(max(first_output, start), start + N_BATCH)
            self._decode([(t, start + i, scratch.seq_id, start + i in wanted) for i, t in enumerate(chunk)])
            scratch.ids.extend(chunk)
            for pos in range(wanted.start, start + len(chunk)):
                yield self._logp_rows([pos - start])[0], pos

    # --- text -----------------------------------------------------------------------------------------------------

    def _render_chat(self, template: str, prompt: str) -> str:
        """The chat template applied to one user message, rendered the way transformers' apply_chat_template does."""
        return self._render_messages(template, [{"role": "user", "content": prompt}])

    def _render_messages(self, template: str, messages: Sequence[Mapping[str, str]]) -> str:
        """The chat template applied to a conversation, plus the assistant header."""
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        formatter = Jinja2ChatFormatter(
            template, eos_token=self._piece(self.llm.token_eos()), bos_token=self._piece(self.llm.token_bos())
        )
        return formatter(messages=[dict(m) for m in messages]).prompt

    def _piece(self, token: int) -> str:
        """The text of one (possibly special) token; '' for -1, llama.cpp's 'none'."""
        return self.llm.detokenize([token], special=True).decode("utf-8", errors="replace") if token >= 0 else ""

    def _check_length(self, context: int, new: int) -> None:
        check_fits(self.context_length, context, new)


def _eos_ids(lib: Any, vocab: Any, metadata: dict[str, str]) -> frozenset[int]:
    """The EOS id plus the EOT id where the GGUF declares one.

    Not `llama_vocab_eot`: lacking a declared EOT, llama.cpp guesses one from token texts (SmolLM2: id 0,
    `<|endoftext|>`), where transformers would not stop.
    """
    ids = {int(lib.llama_vocab_eos(vocab)), int(metadata.get("tokenizer.ggml.eot_token_id", -1))}
    return frozenset(i for i in ids if i >= 0)
