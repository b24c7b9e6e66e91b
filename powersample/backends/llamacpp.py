"""`llamacpp`: a GGUF model run by llama.cpp (through llama-cpp-python) behind the backend seam (`base.py`).

Per decoding step, `extend` runs ONE llama.cpp decode for every live request (in the batched layout; one per row in
the rows layout, below) and derives both distributions from the logits of every id a row fed:

    log p = logits - logsumexp(logits)                 # base: temperature 1, no truncation (float64), (fed, V)
    log q = proposal_logprobs(log p, proposal)         # proposal: temperature, top-k, top-p, renormalized
    token = draw(log q[j], request.rng)                # all randomness comes from each chain's own generator

Drafts (speculative proposals). A row without a draft feeds one id per step, its next token. A request with a
draft and `speculate` = k > 0 feeds `Row.feed()`: its next token, then up to k guessed tokens, as consecutive
positions of its sequence, with logits for each, so one forward can decode up to k + 1 tokens
(`engine.verify_step`: every token is drawn as without a draft, and the walk goes on while the draws equal the
guess). Rows feeding different numbers of ids share the one decode. After a token that differs from its guess, the
ids fed after it are void: they are cut from the row's sequence (its cells and its tracked ids) before the next
step, so the cache always holds exactly the row's context and kept tokens. A seed gives the same tokens whatever k,
whatever the draft and whatever the batch. Drafts are off unless asked for (`default_speculate`): on the CPU a
forward of k ids costs about k decodes of one.

llama.cpp's own sampler is never used. We drive the low-level C API (our own `llama_batch`, `llama_decode`,
`llama_get_logits_ith`) so that each decode computes exactly the logits rows we read. llama-cpp-python's
`LlamaModel` only lends the model, tokenizer and metadata. It is loaded with the exact kernels of
`llamacpp_kernels.py`: weights in the plain CPU layout (no repack, no AMX), llama.cpp's tiled K-quant matmul off.

Caches. One llama.cpp context holds 2 x max_slots + 1 sequences, each in its own KV stream (`kv_unified=False`).
Slot s owns two (pairs go to slots least recently used first): a lane, where its requests are decoded, and a bank,
so an MH proposal never destroys the current state's cache. A request takes the longest common prefix with its
context from any sequence (another slot's too, so chains share the prompt): from its own lane by cutting it back,
after saving the lane in the bank when the cut loses tokens; from the bank or another sequence by copying it into
the lane (ties go to the lane when the cut is free, else to the bank). Only the context tokens no sequence holds
are prefilled, and at least the last context token is fed again, by the first decoding step, since a cache keeps
no logits. The last sequence is scratch space for `score`, `confidence` and `next_token_logp`. Correctness never
depends on the slot: a foreign slot only costs a longer prefill.

Batching. `extend_continuous` keeps up to max_slots rows decoding: a finished row (EOS or max_tokens) leaves at
once and its chain's next request, from `refill`, joins at the next step. `extend` is the same loop with no refills.
Lanes are sequences 0 .. max_slots - 1 and rows are fed in lane order, because llama.cpp only puts consecutive
sequence ids of separate streams in one physical batch: chains 0..n-1 decode as one batch; gaps left by finished
rows split a step into one physical batch per run of consecutive lanes (same numbers, a little slower).

Same numbers however the work is batched (bit for bit). llama.cpp's quantized CPU kernels quantize activations to
8 bits, so the tiniest change in an attention sum moves log p by up to ~0.5; we keep every row's arithmetic the same
whether it is decoded alone or batched, cached or fresh, prefilled or decoded one token at a time:
- the exact kernels and the decode layout of `llamacpp_kernels.py`: the batched layout only where a probe of the
  loaded model finds that its matmul kernels round alike at every row count (`_rows_disagree`: Q4_1, Q4_K_M, Q8_0 on
  the machines we measured) and llama.cpp runs one thread; else the rows layout, one row per llama_decode and one
  token per micro-batch, where every matmul and attention runs the same one-row kernel (F16 weights, whose tinyBLAS
  kernel takes over from 2 rows; any model at more than one thread, where flash attention splits a lone token's
  keys across threads past 512 cells);
- flash attention, whose per-row kernel skips masked cells (without it a token's keys and values depend on its
  batch);
- micro-batches (n_ubatch) of fewer than 64 tokens: from 64 query rows on, llama.cpp switches to a tiled
  attention kernel that rounds differently;
- one KV stream per sequence rather than one shared pool of cells (`kv_unified`): in a shared pool, freed cells
  are refilled out of position order, and attention summed in another order gives another log p. In a stream of
  its own a sequence's cells stay in position order; a copy is a whole-stream copy, kept in order.
The conformance suite checks it bit for bit (`conformance.log_p_is_batch_invariant`, tolerance 0).

Memory. Every sequence has the same room (llama.cpp gives each KV stream the same size): the KV cache takes
(2 x max_slots + 1) x room x (bytes per token: 23 KB for SmolLM2-135M; 33 x 8192 tokens = 6.2 GB). The room starts
at MIN_ROOM and grows (at least doubling, at most n_ctx) when a request needs more: a new context, every sequence's
cells moved over exactly. It is given back by `release_memory` (the ReleasesMemory capability), which the server's engine calls
whenever it goes idle (not between the turns of a long scoring call and the chains: each turn would grow the room
and prefill the prompt again): a room above KEEP_ROOM goes back to MIN_ROOM, each sequence cut to it and moved
over. Cells moved keep their exact bytes, so no log p changes; only cached prefixes past MIN_ROOM are lost, which
costs a prefill. Rooms up to KEEP_ROOM are kept across runs (re-growing one costs about 0.5 s per GB here), so
ordinary requests keep their caches; `serve --max-context` bounds the room one request may take.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib
import os
import sys
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from powersample.backends import probe
from powersample.backends.embedded import cache_root, embedded_gguf_path, publish
from powersample.backends.engine import Row, check_fits, common_prefix, extend_in_one_run, verify_step
from powersample.backends.llamacpp_kernels import (
    BATCH_TOKENS,
    Layout,
    Placement,
    choose_layout,
    model_params,
    native_opted_in,
    placement,
    prepare_process,
    tiled_setting,
)
from powersample.backends.tokenizer import plain_transcript
from powersample.core.numerics import negative_entropy, ranked_rows
from powersample.core.types import Continuation, ExtendRequest, Poll, Proposal, Ranked, Refill, Tokens
from powersample.errors import PowerSampleError, one_line

GGUF_MAGIC = b"GGUF"  # the first four bytes of every GGUF file
N_BATCH = 512  # most tokens per llama_decode call; longer prefills are fed in chunks
MAX_SLOTS = 16  # rows decoded together at most; each slot owns two sequences
MOST_SLOTS = 127  # llama.cpp allows 256 sequences: 2 per slot + the scratch one
MIN_ROOM = 256  # tokens per sequence the context starts with (llama.cpp rounds up to a multiple of 256)
KEEP_ROOM = 1024  # tokens per sequence kept when a run or scoring call ends; more goes back to MIN_ROOM (docstring)
PROBE_PREFIX, PROBE_TAIL, PROBE_STREAMS = 8, BATCH_TOKENS, 16  # the layout probe's shapes (`_rows_disagree`)
# --quant: llama_ftype. A mix (*_k_m: llama.cpp's own choice per tensor, as in the files users download) keeps its
# mix; every other type is written pure, every tensor of the one type (rows too short for a 256-block type fall back)
QUANTS = {"q8_0": "Q8_0", "q6_k": "Q6_K", "q5_0": "Q5_0", "q4_k_m": "Q4_K_M", "q4_1": "Q4_1", "q4_0": "Q4_0",
          "iq4_nl": "IQ4_NL", "f16": "F16", "bf16": "BF16"}
INSTALL_HINT = "the llamacpp backend needs llama-cpp-python: pip install llama-cpp-python"
LOG_WARN, LOG_ERROR, LOG_CONT = 3, 4, 5  # ggml_log_level (ggml.h): 1 debug, 2 info, 3 warn, 4 error, 5 continued

Item = tuple[int, int, int, bool]  # one batch entry: (token id, position, sequence id, compute its logits)


@dataclass(eq=False)
class _Seq:
    """One sequence of the KV cache: its llama.cpp id and the ids its cells hold (positions 0, 1, ...)."""

    seq_id: int
    ids: list[int] = field(default_factory=list)


@dataclass(eq=False, kw_only=True)
class _Row(Row):
    """One request being decoded (engine.Row), with its sequence: it holds the context up to (not including)
    next_id, which goes at position len(seq.ids)."""

    seq: _Seq

    def feed(self) -> list[int]:
        """engine.Row.feed, at most N_BATCH ids (one llama_decode): a shorter chunk changes no draw, only the
        number of forwards."""
        return super().feed()[:N_BATCH]

    def needs(self) -> list[int]:
        """The ids the row's sequence must hold before its next step, once it has drawn a token: the context and
        every token but the last (its next_id)."""
        return [*self.request.context, *self.tokens[:-1]]


@dataclass(eq=False)
class Weights:
    """A loaded GGUF: llama-cpp-python's LlamaModel (weights, tokenizer), its metadata, and how it was loaded."""

    model: Any  # llama_cpp._internals.LlamaModel
    metadata: dict[str, str]
    threads: int  # llama.cpp's CPU threads, for decoding and prefill alike
    placement: Placement  # where llama.cpp put the weights: the plain CPU layout unless opted out (llamacpp_kernels)
    path: Path  # the GGUF file it was loaded from

    @property
    def native(self) -> bool:
        """True when the user opted out of the exact kernels (llamacpp_kernels)."""
        return self.placement.extra_bufts

    @property
    def experts(self) -> int:
        """The model's experts per MoE layer (GGUF `<arch>.expert_count`); 0 for a dense model."""
        count = self.metadata.get(f"{self.metadata.get('general.architecture', '')}.expert_count", "0")
        return int(count) if count.isdigit() else 0

    @classmethod
    def load(cls, llama_cpp: Any, path: Path, threads: int) -> Weights:
        """Load `path` with the exact kernels (llamacpp_kernels); failures are one-line PowerSampleErrors."""
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

    def __init__(self, weights: Weights, *, n_ctx: int | None = None, max_slots: int = MAX_SLOTS,
                 reuse_cache: bool = True, layout: Layout | None = None, quiet: bool = False):
        if not 1 <= max_slots <= MOST_SLOTS:
            raise PowerSampleError(f"max_slots must be between 1 and {MOST_SLOTS}, got {max_slots}")
        self._lib = _import_llama_cpp()
        self.weights = weights  # model, tokenizer, metadata, threads, placement
        self.llm = weights.model  # llama-cpp-python's LlamaModel: tokenize, detokenize, special tokens
        self.reuse_cache = reuse_cache  # False: every request decodes its whole context afresh, alone (baseline)
        self.max_slots = max_slots
        self.quiet = quiet  # no notes on stderr (the layout probe's)
        self._vocab = self._lib.llama_model_get_vocab(self.llm.model)
        self.n_vocab: int = self.llm.n_vocab()
        self.eos_ids = _eos_ids(self._lib, self._vocab, weights.metadata)
        self.context_length: int | None = n_ctx or self.llm.n_ctx_train()  # the most tokens one sequence may hold
        self._seqs = [_Seq(i) for i in range(2 * max_slots + 1)]  # lanes, banks, scratch (module docstring)
        self._batch = self._lib.llama_batch_init(N_BATCH, 0, 1)
        self.layout = layout or self._choose_layout()  # batched, or one row per decode (llamacpp_kernels); a given
        # layout is for tests and measurements (batched is exact only where the probe says so)
        self._ctx, self._room = self._new_context(min(MIN_ROOM, self.context_length))
        self._memory = self._lib.llama_get_memory(self._ctx)
        self._lanes: OrderedDict[int, int] = OrderedDict()  # slot -> its lane's index, least recently used first
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
        longest request, not with n_ctx: module docstring). n_threads None = half the logical cores
        (llama-cpp-python's own default: one per physical core), for decoding and prefill alike. max_slots: rows
        decoded together. quant: re-quantize the file once to this type (`QUANTS`), cached, and load the copy.
        llama.cpp runs its exact kernels, batched where they allow it (`llamacpp_kernels`).
        llama.cpp's log shows its warnings and errors, only its errors when `quiet` (`route_log`). Every failure is a
        one-line PowerSampleError.
        """
        llama_cpp = _import_llama_cpp()
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
        rows: list[_Row] = []
        waiting = list(requests.items())
        while True:
            waiting += (poll() if poll else {}).items()
            if not (waiting or rows):
                return
            admitted, waiting = _admit(waiting, rows, capacity)
            rows = sorted(rows + self._start(admitted, rows), key=lambda row: row.seq.seq_id)  # lane order
            done = self._step(rows, proposal)
            finished, rows = [rows[b] for b in done], [r for b, r in enumerate(rows) if b not in done]
            for row in finished:
                self.stats.drafted += row.drafted
                self.stats.kept_drafts += row.kept_drafts
                waiting += refill(row.key, row.continuation()).items()

    def _start(self, admitted: list[tuple[int, ExtendRequest]], rows: list[_Row]) -> list[_Row]:
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
            seq = self._target(request.context, self._lane(request.slot, busy_slots))
            self._prefill(seq, request.context[len(seq.ids) : -1], request.halted)
            new_rows.append(_Row(key, request, request.context[-1], seq=seq))
        return new_rows

    def _step(self, rows: list[_Row], proposal: Proposal) -> list[int]:
        """One decoding step: every row feeds `row.feed()` (its next token, then the draft tokens it verifies now),
        all in one llama_decode (one per N_BATCH fed ids, should they exceed it) in the batched layout, one
        llama_decode per row in the rows layout. Returns the indices of the rows that are now finished (EOS or
        max_tokens)."""
        feeds, rows_at = [row.feed() for row in rows], range(len(rows))
        done: list[int] = []
        groups = _fitting([len(fed) for fed in feeds], N_BATCH) if self.layout.batched else [[b] for b in rows_at]
        for group in groups:
            finished = self._forward([rows[b] for b in group], [feeds[b] for b in group], proposal)
            done += [group[b] for b in finished]
        return done

    def _forward(self, rows: list[_Row], feeds: list[list[int]], proposal: Proposal) -> list[int]:
        """One llama_decode of each row's fed ids at the next positions of its sequence, logits for every one; the
        rows' tokens drawn or verified from them (engine.verify_step); void fed ids cut from the cache. Returns the
        indices of the rows now finished."""
        items = [(token, len(row.seq.ids) + j, row.seq.seq_id, True) for row, fed in zip(rows, feeds)
                 for j, token in enumerate(fed)]  # fmt: skip
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

    def _drop_void(self, row: _Row, void: int, live: bool) -> None:
        """Cut the last `void` fed ids (after a replaced draft token) from the row's sequence; a live row whose
        model cannot cut a sequence's tail (recurrent) gets its kept ids prefilled again."""
        if void == 0:
            return
        self._cut(row.seq, len(row.seq.ids) - void)
        if live:
            self._prefill(row.seq, row.needs()[len(row.seq.ids) :])

    def _check_request(self, request: ExtendRequest) -> None:
        self._check_length(len(request.context), request.max_tokens)
        if not request.context:
            raise PowerSampleError("cannot extend an empty context: the prompt encodes to no tokens")

    # --- sequences ------------------------------------------------------------------------------------------------

    def _lane(self, slot: int, busy_slots: set[int]) -> int:
        """The index of `slot`'s lane; a new slot takes a free one, else the least recently used idle slot's."""
        if slot in self._lanes:
            self._lanes.move_to_end(slot)
        elif len(self._lanes) < self.max_slots:
            self._lanes[slot] = len(self._lanes)
        else:
            idle = next(s for s in self._lanes if s not in busy_slots)  # rows <= max_slots: one is always idle
            self._lanes[slot] = self._lanes.pop(idle)
        return self._lanes[slot]

    def _target(self, context: Tokens, k: int) -> _Seq:
        """Lane k, made to hold the longest cached prefix of context[:-1] without losing the state it held.

        Cutting the lane in place is free; when the cut would drop tokens, the lane is first saved in the bank,
        unless the bank holds as long a prefix, which is then copied into the lane instead.
        """
        lane, bank = self._seqs[k], self._seqs[self.max_slots + k]
        if not self.reuse_cache:
            self._cut(lane, 0)
            return lane
        other, common = self._best_source(context, exclude=(lane, bank))
        at_lane, at_bank = common_prefix(lane.ids, context), common_prefix(bank.ids, context)
        best = max(at_lane, at_bank, common)
        keep = min(best, len(context) - 1)
        lossy = len(lane.ids) > keep + 1  # it holds more than a prefix of the context (plus the token re-fed anyway)
        if at_lane == best and not (lossy and at_bank == best):
            if lossy:
                self._copy(lane, bank)
        else:
            self._copy(bank if at_bank == best else other, lane)
        self._cut(lane, keep)
        return lane

    def _best_source(self, ids: Sequence[int], exclude: Sequence[_Seq] = ()) -> tuple[_Seq, int]:
        """(the sequence sharing the longest prefix with ids, that length), among all but `exclude`."""
        candidates = [s for s in self._seqs if s not in exclude]
        common = [common_prefix(s.ids, ids) for s in candidates]
        best = int(np.argmax(common))  # the first maximum
        return candidates[best], common[best]

    def _cut(self, seq: _Seq, keep: int) -> None:
        """Drop the sequence's cells from position `keep` on."""
        if keep >= len(seq.ids):
            return
        if not self._lib.llama_memory_seq_rm(self._memory, seq.seq_id, keep, -1):  # a recurrent model: start over
            self._lib.llama_memory_seq_rm(self._memory, seq.seq_id, -1, -1)  # removing a whole sequence never fails
            keep = 0
        del seq.ids[keep:]

    def _copy(self, source: _Seq, target: _Seq) -> None:
        """Make `target` hold what `source` holds. llama.cpp copies the whole stream at the next decode, before
        that decode runs; nothing is recomputed."""
        self._cut(target, 0)
        if source.ids:
            self._lib.llama_memory_seq_cp(self._memory, source.seq_id, target.seq_id, -1, -1)
            target.ids = list(source.ids)

    def clear_caches(self) -> None:
        """Empty every sequence, so that the next request is evaluated from scratch (e.g. to time a cold start)."""
        self._lib.llama_memory_clear(self._memory, True)
        for seq in self._seqs:
            seq.ids.clear()

    # --- the context ----------------------------------------------------------------------------------------------

    def _new_context(self, room: int, n_seq: int | None = None, micro_batch: int | None = None) -> tuple[Any, int]:
        """(a llama.cpp context with a KV stream of `room` tokens for each of n_seq sequences (default: the
        backend's), micro-batches of `micro_batch` tokens (default: the layout's), the room llama.cpp gave)."""
        lib, n_seq = self._lib, n_seq or len(self._seqs)
        params = lib.llama_context_default_params()
        params.n_threads = params.n_threads_batch = self.weights.threads  # llama.cpp's batch default, every core,
        # spins badly when a core is busy elsewhere
        params.n_ctx, params.n_seq_max, params.kv_unified = room * n_seq, n_seq, False  # a stream per sequence
        params.n_batch, params.n_ubatch = N_BATCH, micro_batch or self.layout.micro_batch
        params.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_ENABLED  # log p independent of batching (docstring)
        ctx = lib.llama_init_from_model(self.llm.model, params)
        if ctx is None:
            raise PowerSampleError(f"llama.cpp could not create a KV cache of {n_seq} x {room} tokens (out of memory?)")
        return ctx, int(lib.llama_n_ctx_seq(ctx))

    def _fit(self, length: int) -> None:
        """Give every sequence room for `length` tokens: a bigger context (at least double), cells moved over."""
        if length > self._room:
            self._resize(min(max(length, 2 * self._room), self.context_length or length))
            self.stats.grown += 1

    def release_memory(self) -> None:
        """A room above KEEP_ROOM back to MIN_ROOM, and the log p buffers, grown by drafts, back to max_slots rows
        (the ReleasesMemory capability; module docstring, Memory)."""
        if self._room > KEEP_ROOM:
            self._resize(min(MIN_ROOM, self.context_length or MIN_ROOM))
            self.stats.given_back += 1
        if len(self._logp) > self.max_slots:
            self._logp, self._exp = np.empty((self.max_slots, self.n_vocab)), np.empty((self.max_slots, self.n_vocab))

    def _resize(self, room: int) -> None:
        """A new context with `room` tokens per sequence; each sequence cut to the room llama.cpp gave, if longer,
        and its cells moved over (the exact bytes), then the old context freed. Only at a point where no copy is
        pending (before `_start`'s copies, or once a decode has run)."""
        ctx, room = self._new_context(room)
        for seq in self._seqs:
            self._cut(seq, room)
            if seq.ids and not _move_cells(self._lib, self._ctx, ctx, seq.seq_id):
                seq.ids.clear()  # could not be moved: it only costs a prefill later
        self._lib.llama_free(self._ctx)
        self._ctx, self._room, self._memory = ctx, room, self._lib.llama_get_memory(ctx)

    # --- the layout -----------------------------------------------------------------------------------------------

    def _choose_layout(self) -> Layout:
        """The decode layout (llamacpp_kernels.choose_layout); the probe's finding is cached per engine build, CPU,
        model file and kernel settings."""
        native, threads, experts = self.weights.native, self.weights.threads, self.weights.experts
        if native or threads > 1 or experts:
            return choose_layout(native, threads, None, experts)
        key = {**_probe_key(self._lib, self.weights.path, self.weights.placement), "finding": "rows-agree"}
        found = probe.remembered(key, self._probe_rows)
        return choose_layout(native, threads, found.get("disagreement"))

    def _probe_rows(self) -> dict[str, str | None]:
        if not self.quiet:
            print(f"powersample: checking once whether {self.weights.path.name}'s llama.cpp kernels round alike at "
                  "every batch shape ...", file=sys.stderr, flush=True)  # fmt: skip
        return {"disagreement": self._rows_disagree()}

    def _rows_disagree(self) -> str | None:
        """Where this model's logits depend on how many rows a micro-batch carries; None when nowhere.

        The same PROBE_TAIL ids after a shared prefix are decoded one per llama_decode (the reference), j at once
        in one sequence (j = 2 .. PROBE_TAIL: a prefill's or a draft's shape), and the first of them in n sequences
        at once (n = 2 .. PROBE_STREAMS: a batch of chains); every logit must be bit-equal to the reference's. The
        kernels are chosen by row count alone, so these shapes cover every choice a micro-batch of up to
        BATCH_TOKENS tokens can make. A temporary context; about 80 decodes.
        """
        ids = [int(t) for t in np.random.default_rng(0).integers(0, self.n_vocab, PROBE_PREFIX + PROBE_TAIL)]
        prefix, tail = ids[:PROBE_PREFIX], ids[PROBE_PREFIX:]
        self._ctx, _ = self._new_context(len(ids), n_seq=PROBE_STREAMS + 1, micro_batch=BATCH_TOKENS)
        self._memory = self._lib.llama_get_memory(self._ctx)
        try:
            self._submit([(t, i, 0, False) for i, t in enumerate(prefix)])
            want = [self._probe_logits([(t, PROBE_PREFIX + i, 0, True)])[0] for i, t in enumerate(tail)]
            for j in range(2, PROBE_TAIL + 1):
                got = self._probe_logits([(t, PROBE_PREFIX + i, 1, True) for i, t in enumerate(tail[:j])], (1,))
                if (gap := _gap(got, want[:j])) is not None:
                    return f"{j} tokens of one sequence vs 1: max |logit change| {gap:.3g}"
            for n in range(2, PROBE_STREAMS + 1):
                got = self._probe_logits([(tail[0], PROBE_PREFIX, s, True) for s in range(1, n + 1)], range(1, n + 1))
                if (gap := _gap(got, want[:1] * n)) is not None:
                    return f"{n} sequences vs 1: max |logit change| {gap:.3g}"
            return None
        finally:
            self._lib.llama_free(self._ctx)
            self._ctx = self._memory = None

    def _probe_logits(self, items: list[Item], fresh: Sequence[int] = ()) -> list[np.ndarray]:
        """The raw logits of one llama_decode of `items`, after resetting the `fresh` sequences to sequence 0's
        prefix (PROBE_PREFIX tokens)."""
        for seq_id in fresh:
            self._lib.llama_memory_seq_rm(self._memory, seq_id, -1, -1)
            self._lib.llama_memory_seq_cp(self._memory, 0, seq_id, -1, -1)
            self._lib.llama_memory_seq_rm(self._memory, seq_id, PROBE_PREFIX, -1)
        self._submit(items)
        return [np.ctypeslib.as_array(self._lib.llama_get_logits_ith(self._ctx, i), shape=(self.n_vocab,)).copy()
                for i in range(len(items))]  # fmt: skip

    # --- decoding -------------------------------------------------------------------------------------------------

    def _prefill(self, seq: _Seq, ids: Sequence[int], halted: Callable[[], bool] = lambda: False) -> None:
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
        self._submit(items)
        self.stats.decode_calls += 1
        self.stats.evaluated_tokens += len(items)

    def _submit(self, items: Sequence[Item]) -> None:
        """One llama_decode of `items`; a failure is a one-line PowerSampleError."""
        batch = self._batch
        batch.n_tokens = len(items)
        for i, (token, pos, seq_id, logits) in enumerate(items):
            batch.token[i] = token
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq_id
            batch.logits[i] = logits
        status = self._lib.llama_decode(self._ctx, batch)
        if status != 0:
            why = "no room left in the KV cache" if status == 1 else f"llama_decode returned {status}"
            raise PowerSampleError(f"llama.cpp could not decode {len(items)} tokens ({why})")

    def _logp_rows(self, indices: Sequence[int]) -> np.ndarray:
        """log p after each given batch index of the last decode: log_softmax in float64, (n, V), a reused buffer."""
        n = len(indices)
        if n > len(self._logp):  # more fed ids than ever before (drafts): grow the buffers once
            self._logp, self._exp = np.empty((n, self.n_vocab)), np.empty((n, self.n_vocab))
        logp, scratch = self._logp[:n], self._exp[:n]
        for b, i in enumerate(indices):
            logp[b] = np.ctypeslib.as_array(self._lib.llama_get_logits_ith(self._ctx, i), shape=(self.n_vocab,))
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
        scratch = self._seqs[-1]
        self._fit(len(ids))
        source, common = self._best_source(ids, exclude=(scratch,))
        if common > common_prefix(scratch.ids, ids):
            self._copy(source, scratch)
        self._cut(scratch, min(common_prefix(scratch.ids, ids), first_output))
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


def _admit(
    waiting: list[tuple[int, ExtendRequest]], rows: list[_Row], capacity: int
) -> tuple[list[tuple[int, ExtendRequest]], list[tuple[int, ExtendRequest]]]:
    """(requests that start now, requests that keep waiting), in order: up to `capacity` rows, one row per slot."""
    busy = {row.request.slot for row in rows}
    admitted, rest = [], []
    for key, request in waiting:
        if len(rows) + len(admitted) < capacity and request.slot not in busy:
            admitted.append((key, request))
            busy.add(request.slot)
        else:
            rest.append((key, request))
    return admitted, rest


def _fitting(sizes: Sequence[int], most: int) -> list[list[int]]:
    """Consecutive runs of indices whose sizes sum to at most `most` each (every size is at most `most`): the rows
    of one step, split into llama_decode calls only when their fed ids exceed one batch."""
    groups: list[list[int]] = []
    total = 0
    for i, size in enumerate(sizes):
        if not groups or total + size > most:
            groups.append([])
            total = 0
        groups[-1].append(i)
        total += size
    return groups


def _gap(got: Sequence[np.ndarray], want: Sequence[np.ndarray]) -> float | None:
    """None when every row of `got` is bit-equal to its row of `want`, else the largest difference."""
    if all(np.array_equal(g, w) for g, w in zip(got, want)):
        return None
    return max(float(np.max(np.abs(g - w))) for g, w in zip(got, want))


def _move_cells(lib: Any, old: Any, new: Any, seq_id: int) -> bool:
    """Copy one sequence's cells (positions, keys, values: the exact bytes) from context `old` to `new`."""
    size = lib.llama_state_seq_get_size(old, seq_id)
    buffer = (ctypes.c_uint8 * size)()
    written = lib.llama_state_seq_get_data(old, buffer, size, seq_id)
    return bool(written) and bool(lib.llama_state_seq_set_data(new, buffer, written, seq_id))


def _import_llama_cpp() -> Any:
    """The llama_cpp module, or a one-line PowerSampleError saying how to install it."""
    try:
        import llama_cpp
    except ModuleNotFoundError as e:
        if e.name not in ("llama_cpp", None):
            raise
        raise PowerSampleError(INSTALL_HINT) from None
    return llama_cpp


class _Log:
    """What of llama.cpp's log reaches stderr: the least level shown, and the level a continued message goes on."""

    least = LOG_WARN
    last = 0
    callback: Any = None  # the C callback, kept alive here: llama.cpp holds only its pointer


def route_log(llama_cpp: Any, quiet: bool) -> None:
    """Send llama.cpp's log (process-wide, as llama.cpp keeps it) to stderr from warnings up, or errors only when
    quiet. Our own callback: llama-cpp-python 0.3.36's reads ggml's levels one off, so its warnings (the SWA cache's
    "using full-size SWA cache" on every load of a sliding-window model) print whatever the verbosity, and its
    errors only when verbose."""
    importlib.import_module("llama_cpp._logger")  # importing it sets its callback: done first, so ours stays
    _Log.least = LOG_ERROR if quiet else LOG_WARN
    if _Log.callback is None:
        _Log.callback = llama_cpp.llama_log_callback(_print_log)
        llama_cpp.llama_log_set(_Log.callback, ctypes.c_void_p(0))


def _print_log(level: int, text: bytes, user_data: Any) -> None:
    level = _Log.last if level == LOG_CONT else level
    _Log.last = level
    if level >= _Log.least:
        sys.stderr.write(text.decode("utf-8", errors="replace"))
        sys.stderr.flush()


def model_path(llama_cpp: Any, model: str | None, quant: str | None) -> Path:
    """The GGUF file to load: `model` (None = the embedded one), re-quantized to `quant` when given."""
    path = embedded_gguf_path() if model is None else _check_gguf(Path(model).expanduser())
    return path if quant is None else requantized(llama_cpp, path, quant)


# -- the probe: does this machine run llama.cpp in-process? (probe.py) ----------------------------------------------

PROBE_CHILD = "import sys; from powersample.backends.llamacpp import probe_child; probe_child(sys.argv[1])"


def probe_outcome(model: str | None, quant: str | None = None) -> probe.Outcome:
    """Whether llama.cpp loads and decodes this model here without crashing: a child process tries it once per
    (llama.cpp build, CPU, model file, placement), and the outcome is cached."""
    llama_cpp = _import_llama_cpp()
    path = model_path(llama_cpp, model, quant)
    return probe.probe(_probe_key(llama_cpp, path, placement(native_opted_in())), _probe_command(path))


def probe_child(path: str) -> None:
    """The probe's child: load `path` as the backend does and decode a few tokens for two batched rows."""
    backend = LlamaCppBackend.load(path, n_ctx=MIN_ROOM, max_slots=2)
    context = backend.encode("Hello", chat=False)
    requests = [ExtendRequest(context, 4, np.random.default_rng(seed), slot=seed) for seed in range(2)]
    backend.extend(requests, Proposal(temperature=1.0))
    backend.close()


def _probe_command(path: Path) -> list[str]:
    return [sys.executable, "-c", PROBE_CHILD, str(path)]


def _probe_key(llama_cpp: Any, path: Path, where: Placement) -> dict[str, str]:
    """What a probe's finding depends on: the engine build, the CPU, the model file, where its weights go and
    whether llama.cpp's tiled matmul is on."""
    library = Path(llama_cpp.__file__).parent / "lib"
    builds = sorted(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in library.iterdir()
                    if f.is_file() and not f.is_symlink())
    source = path.resolve()
    return {
        "engine": f"llama-cpp-python {getattr(llama_cpp, '__version__', '?')}", "build": ";".join(builds),
        "cpu": _cpu_identity(), "model": f"{source}:{source.stat().st_size}:{source.stat().st_mtime_ns}",
        "placement": where.label, "tiled": tiled_setting(),
    }


def _cpu_identity() -> str:
    """The CPU's model name and feature flags (Linux: /proc/cpuinfo), else what the platform module says."""
    import platform

    try:
        info = Path("/proc/cpuinfo").read_text(errors="replace").splitlines()
    except OSError:
        info = []
    fields = {}
    for line in info:
        name, _, value = line.partition(":")
        fields.setdefault(name.strip(), value.strip())
    flags = hashlib.sha256(fields.get("flags", "").encode()).hexdigest()[:16]
    return f"{platform.machine()}|{fields.get('model name', platform.processor())}|{flags}"


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


def _eos_ids(lib: Any, vocab: Any, metadata: dict[str, str]) -> frozenset[int]:
    """The EOS id plus the EOT id where the GGUF declares one.

    Not `llama_vocab_eot`: lacking a declared EOT, llama.cpp guesses one from token texts (SmolLM2: id 0,
    `<|endoftext|>`), where transformers would not stop.
    """
    ids = {int(lib.llama_vocab_eos(vocab)), int(metadata.get("tokenizer.ggml.eot_token_id", -1))}
    return frozenset(i for i in ids if i >= 0)
