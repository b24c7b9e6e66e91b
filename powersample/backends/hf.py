"""`hf`: a Hugging Face transformers causal LM behind the backend seam (`base.py`).

Per new token, `extend` runs ONE forward pass for all requests together and derives both distributions from
its logits:

    log p = log_softmax(logits)                        # base: temperature 1, no truncation (float64)
    log q = proposal_logprobs(log p, proposal)         # proposal: temperature, top-k, top-p, renormalized
    token = draw(log q, request.rng)                   # all randomness comes from the chain's own generator

Caches. Each slot (chain) owns two KV buffers, so an MH step never destroys the current state's cache: a request
reuses the buffer with the longest common prefix with its context (any slot's, so chains share the prompt's
prefill), crops it there, and writes into the slot's other buffer when cropping in place would lose tokens. Only
the context tokens no buffer holds are prefilled, and at least the last context token is fed again since a cache
keeps no logits. Correctness never depends on the slot: a foreign slot only costs a longer prefill.

Every layer's cache keeps every position, sliding-window layers included: our caches are plain DynamicLayers
(`DynamicCache()` without the model's config), never transformers' DynamicSlidingWindowLayer, which keeps only the
last window - 1 positions and its own position counter. So any prefix of a buffer can be resumed (MH rewinds to a
random point of a sequence far longer than a window), and cropping a cache or cutting columns out of it is plain
slicing with no other bookkeeping. The window is the mask's business instead (`_Attention`): a sliding layer costs
the memory of a full-attention one, and its attention reads the masked columns too.

Masks. Each cache column has the position of its id in its row's sequence, or none (-1): left padding, a shorter
feed's right padding, a void draft id. A query at position p sees its row's columns at positions <= p, and on a
sliding-window layer only those > p - window: transformers' own rule (`kv_idx > q_idx - sliding_window`), counted in
positions rather than columns, so padding and holes never take a key out of a row's window nor let one in. A model
whose layers all attend fully gets the 2D mask of the columns each row sees, and builds its causal mask itself, as
transformers does for any padded batch; a model with sliding-window layers gets one 4D mask per layer type (a dict
where the types differ, as Gemma 2/3's forward accepts), in its attention implementation's form (sdpa, eager).

Batching. After the (batch-1) prefills every row has its pending ids (`Row.feed()`: the next token, then up to
`speculate` draft tokens, within the rows' share of FEED_BUDGET ids per forward), so the decoding loop stacks the
rows' caches left-padded into one DynamicCache and runs one forward per step for all rows: rows feeding fewer ids
are padded on the right, the masks say which cache columns each row sees, and position ids are each row's own. Base
log p comes from the logits of every fed id. After `engine.verify_step`, a row's fed ids after a token that differs
from its guess are void: they become holes (columns no row uses are cropped off at once; a batch with many holes is
restacked). Finished rows (EOS, their max_tokens, or below their floor) leave the batch at once and their caches go
back to their buffers holding exactly the valid ids.

Models the caller holds. `from_transformers(model, tokenizer)` wraps a model loaded elsewhere (any device or dtype,
accelerate's `device_map` included) after checking it, and `HFBackend.load` loads one by path. Either way the backend
never moves, casts or copies the weights and never changes the model's mode: ids go to the input embeddings'
execution device, each layer's cache stays where its layer computes it, and a model in training mode is refused.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from powersample.backends.embedded import converted_gguf, embedded_model_dir, quiet_loading
from powersample.backends.engine import Row, check_fits, common_prefix, extend_in_one_run, verify_step
from powersample.backends.hub import dtype_name, eos_ids, is_hub_id
from powersample.backends.memory import KVLayout, hf_layout
from powersample.backends.tokenizer import encode_message_ids, encode_prompt_ids
from powersample.core.numerics import ranked_rows
from powersample.core.types import Continuation, ExtendRequest, Poll, Proposal, Ranked, Refill, Tokens
from powersample.errors import PowerSampleError, one_line

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}  # by
# hub.dtype_name; "auto" = whatever the checkpoint says
KV = tuple[tuple[torch.Tensor, torch.Tensor], ...]  # per layer (keys, values), each (1, heads, L, head_dim)
SPECULATE = 8  # draft tokens per forward when the sampler leaves it to the engine (Speculation): on a GPU a forward
# of 9 ids costs about one of 1; on the CPU about 1.7x (fp32, README Performance), still a gain at 2.6 tokens/forward
FEED_BUDGET = {"cpu": 16, "cuda": 512}  # ids one decoding forward feeds at most, all rows' draft tokens included
# (each row feeds its next token whatever the budget): on the CPU a forward of 16 ids costs about 2.2x one of 1, of
# 32 about 4.4x, so a batch of many rows leaves no room for drafts; other devices take cuda's
_CACHE_LAYERS = {"DynamicLayer", "DynamicSlidingWindowLayer"}  # the cache layers of full and sliding attention
HOLES_RESTACK = 4  # a batch with holes is restacked when more than 1/HOLES_RESTACK of its columns lie beyond what its
# longest row needs (holes under the longest row cost nothing: the batch is that wide anyway)


@dataclass
class _Buffer:
    """A cached prefix: the ids it holds and their keys and values (None when empty), every position on every layer."""

    ids: list[int] = field(default_factory=list)
    kv: KV | None = None

    def cropped(self, keep: int) -> KV | None:
        """The first `keep` positions of the cache (views, no copy)."""
        if keep == 0 or self.kv is None:
            return None
        return tuple((k[:, :, :keep], v[:, :, :keep]) for k, v in self.kv)


@dataclass(frozen=True)
class _Attention:
    """The attention masks of a cached forward, built from each cache column's position in its row's sequence (-1:
    the row has no id there). See the module docstring, Masks."""

    windows: Mapping[str, int | None] | None  # layer type -> its sliding window, None = full attention; None: no
    # layer slides, and the model builds its causal mask from our 2D one
    implementation: str  # the model's attention implementation: sdpa takes boolean 4D masks, eager additive ones
    dtype: torch.dtype  # of an additive mask

    @classmethod
    def of(cls, model: Any) -> _Attention:
        """The model's layer types and windows; a one-line error for layers our caches cannot serve."""
        windows = _layer_windows(model.config)
        implementation = model.config._attn_implementation
        if windows is not None and implementation not in ("sdpa", "eager"):
            raise PowerSampleError(
                f"the hf backend runs sliding-window models with attn_implementation sdpa or eager, "
                f"not {implementation}"
            )
        return cls(windows, implementation, model.dtype)

    def masks(self, columns: torch.Tensor, queries: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        """The `attention_mask` of a forward whose keys have positions `columns` (B, K), the fed ids' last, and whose
        queries have positions `queries` (B, T)."""
        seen = columns >= 0  # (B, K)
        if self.windows is None:
            return seen.long()  # (B, K): the model's causal mask over the columns, which hold each row in order
        distance = queries[:, :, None] - columns[:, None, :]  # (B, T, K): how far back each key lies
        causal = seen[:, None, :] & (distance >= 0)
        masks = {
            kind: self._form(causal if window is None else causal & (distance < window))
            for kind, window in self.windows.items()
        }
        return next(iter(masks.values())) if len(masks) == 1 else masks

    def _form(self, visible: torch.Tensor) -> torch.Tensor:
        """(B, T, K) booleans as the attention implementation takes them: (B, 1, T, K), boolean for sdpa, for eager
        0 where visible and the dtype's minimum elsewhere (as transformers' eager_mask)."""
        if self.implementation == "sdpa":
            return visible[:, None]
        return torch.zeros((), dtype=self.dtype, device=visible.device).masked_fill(
            ~visible[:, None], torch.finfo(self.dtype).min
        )


def _layer_windows(config: Any) -> dict[str, int | None] | None:
    """Each attention layer type of the model -> its sliding window (None: full attention), or None when every layer
    attends fully. Types as the model's forward names them (`config.layer_types`; a model without them has one kind).
    Chunked, linear and KV-sharing layers are a one-line PowerSampleError: their masks or caches are not ours."""
    text = config.get_text_config(decoder=True)
    window = getattr(text, "sliding_window", None)
    types = getattr(text, "layer_types", None) or ["full_attention" if window is None else "sliding_attention"]
    unknown = sorted(set(types) - {"full_attention", "sliding_attention"})
    if getattr(text, "attention_chunk_size", None):
        unknown.append("chunked attention")
    if not unknown:  # KV sharing and the like show in the cache transformers builds for the model
        unknown = sorted({type(layer).__name__ for layer in DynamicCache(config=config).layers} - _CACHE_LAYERS)
    if unknown:
        raise PowerSampleError(
            f"the hf backend serves full and sliding-window attention layers only; this "
            f"{text.model_type} model has {', '.join(unknown)}"
        )
    windows = {kind: (window if kind == "sliding_attention" else None) for kind in dict.fromkeys(types)}
    return windows if any(w is not None for w in windows.values()) else None


@dataclass(eq=False, kw_only=True)
class _Row(Row):
    """One request being decoded (engine.Row), with its cache's buffer and the ids the cache holds."""

    buffer: _Buffer  # receives the row's cache when it finishes
    ids: list[int]  # ids the row's cache holds; next_id goes at position len(ids)


class _Batch:
    """The rows being decoded, their caches stacked in one DynamicCache, with the position of each column's id.

    Invariant: row b's cache holds `rows[b].ids` in the columns where `positions[b]` is >= 0, in order: positions[b]
    runs 0, 1, ..., len(ids) - 1 over them. Its other columns (-1) are its left padding, the right padding of a chunk
    it fed fewer ids into than another row, and its void fed ids (after a replaced draft token)."""

    def __init__(self, attention: _Attention, device: torch.device):
        self.attention, self.device = attention, device
        self.rows: list[_Row] = []
        self.cache: DynamicCache | None = None
        self.positions = torch.zeros(0, 0, dtype=torch.long, device=device)  # (B, width)

    def add(self, new_rows: list[_Row]) -> None:
        """Restack every row's cache (the running rows' from the batch, the new rows' from their buffers),
        left-padded with no holes."""
        kvs = [self._kv(b) for b in range(len(self.rows))] + [r.buffer.kv for r in new_rows]
        self.rows += new_rows
        lengths = [len(r.ids) for r in self.rows]
        self.cache, width = _stack(kvs, lengths)
        self.positions = self._span([width - n for n in lengths], lengths, width, start=[0] * len(lengths))

    def inputs(self, budget: int) -> tuple[list[list[int]], torch.Tensor, Any, torch.Tensor]:
        """(each row's fed ids, input ids (B, T), attention mask (`_Attention.masks`), position ids (B, T)) for the
        next step: T is the longest feed; a shorter one is padded on the right with its last id, which no query sees.
        The rows' feeds share `budget` ids: each row feeds its next token and up to budget // rows - 1 draft tokens."""
        feeds = [r.feed(budget // len(self.rows) - 1) for r in self.rows]
        t = max(map(len, feeds))
        ids = torch.tensor([fed + fed[-1:] * (t - len(fed)) for fed in feeds], device=self.device)
        queries = torch.tensor(
            [[len(r.ids) + min(j, len(fed) - 1) for j in range(t)] for r, fed in zip(self.rows, feeds)],
            device=self.device,
        )
        fed = self._span([0] * len(feeds), [len(f) for f in feeds], t, start=[len(r.ids) for r in self.rows])
        return feeds, ids, self.attention.masks(torch.cat([self.positions, fed], dim=1), queries), queries

    def advance(self, feeds: list[list[int]], valid: list[int]) -> None:
        """After the forward over `feeds`: each row's cache holds its first valid[b] fed ids; the rest are holes.
        Columns no row uses are cropped off; if holes remain in many columns, the rows are restacked without them."""
        starts = [len(r.ids) for r in self.rows]
        for row, fed, n in zip(self.rows, feeds, valid):
            row.ids += fed[:n]
        t, used = max(map(len, feeds)), max(valid)
        self.positions = torch.cat([self.positions, self._span([0] * len(valid), valid, used, start=starts)], dim=1)
        if used < t:  # the chunk's last columns hold only void ids and padding
            self.cache.crop(used - t)
        holes = self.positions.shape[1] - max(len(r.ids) for r in self.rows)  # columns beyond the longest row's need
        if min(valid) < used and HOLES_RESTACK * holes > self.positions.shape[1]:
            self.add([])

    def take(self, b: int) -> KV:
        """Row b's cache as a copy, exactly its ids (views would pin the whole batch's tensors)."""
        return self._kv(b)

    def drop(self, gone: list[int]) -> None:
        keep = [b for b in range(len(self.rows)) if b not in set(gone)]
        if len(keep) < len(self.rows) and keep:
            self.cache.batch_select_indices(torch.tensor(keep))  # CPU indices index a layer on any device
        self.rows = [self.rows[b] for b in keep]
        self.positions = self.positions[keep]
        if not keep:
            self.cache = None

    def _kv(self, b: int) -> KV:
        """Row b's keys and values at the columns it holds (a copy): (1, heads, len(ids), head_dim) per layer, each on
        its layer's device (a sharded model's layers live on several)."""
        columns = (self.positions[b] >= 0).nonzero()[:, 0]
        return tuple(
            (layer.keys[b : b + 1].index_select(2, at), layer.values[b : b + 1].index_select(2, at))
            for layer in self.cache.layers
            for at in [columns.to(layer.keys.device)]
        )

    def _span(self, offsets: list[int], counts: list[int], width: int, start: list[int]) -> torch.Tensor:
        """(B, width) positions: row b's columns offsets[b] ... offsets[b] + counts[b] - 1 hold positions start[b],
        start[b] + 1, ...; its other columns none (-1)."""
        j = torch.arange(width, device=self.device)[None] - torch.tensor(offsets, device=self.device)[:, None]
        inside = (j >= 0) & (j < torch.tensor(counts, device=self.device)[:, None])
        return torch.where(inside, j + torch.tensor(start, device=self.device)[:, None], -1)


@dataclass
class HFStats:
    """Diagnostics (not part of the seam): what the backend has done since it was built."""

    prefilled_tokens: int = 0  # context tokens fed to the model by extend(); tests check cache reuse with it
    decode_forwards: int = 0  # batched decoding forwards; tests check that chains share them
    fed_tokens: int = 0  # ids fed by the decoding forwards: each row's next token and the draft tokens after it
    drafted: int = 0  # draft tokens verified, summed over finished rows
    kept_drafts: int = 0  # of those, kept

    @property
    def forwards(self) -> int:
        """The decoding forwards under the toy backend's name for them (ToyStats.forwards), so tools read one name."""
        return self.decode_forwards


class HFBackend:
    """Sampling and scoring with a transformers causal LM; batched decoding, two KV buffers per slot.

    It uses the model as it is: never moves, casts or copies its weights, nor changes its mode (a model in training
    mode is refused). Inputs go to the device of the input embeddings, where a sharded model (`device_map`) takes
    them; each layer's cache stays on its layer's device. `tokenizer` None serves token ids only (what
    `model.generate(custom_generate=...)` needs): encoding and decoding text is then a one-line error.
    """

    HINTS = frozenset({"speculate", "floor"})  # drafts verified within FEED_BUDGET; rows below their floor leave

    def __init__(
        self, model: Any, tokenizer: Any | None, reuse_cache: bool = True, eos_ids: Iterable[int] | None = None
    ):
        _check_eval(model)
        self.model = model
        self.tokenizer = tokenizer
        self.device = _input_device(model)
        self.eos_ids = _eos_ids(model, tokenizer) if eos_ids is None else frozenset(int(i) for i in eos_ids)
        self.context_length: int | None = getattr(_text_config(model), "max_position_embeddings", None)
        self.reuse_cache = reuse_cache  # False: every request prefills its whole context alone (bench baseline)
        self._buffers: dict[int, tuple[_Buffer, _Buffer]] = {}
        self._scoring = _Buffer()  # what score/rank/confidence fed last (see _fresh_logp)
        self._forward_args = _forward_arguments(model)
        self._attention = _Attention.of(model)  # which keys each query sees, per layer type
        self._budget = FEED_BUDGET.get(self.device.type, FEED_BUDGET["cuda"])
        self.stats = HFStats()  # diagnostics, for tests and tools

    @classmethod
    def load(
        cls,
        model: str | None,
        *,
        device: str | None = None,
        dtype: str | None = None,
        reuse_cache: bool = True,
        threads: int | None = None,
    ) -> HFBackend:
        """Load `model`: None = the embedded SmolLM2, a local folder, a .gguf file, or a hub id.

        device None = cuda when available, else cpu; dtype None = float32 on cpu, bfloat16 on cuda; threads sets
        torch's CPU threads for the whole process (None = torch's default). Every failure is a one-line
        PowerSampleError.
        """
        if threads is not None:
            torch.set_num_threads(threads)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        torch_dtype = _parse_dtype(dtype, device)
        folder = _resolve_model(model)
        is_hub = model is not None and not Path(model).expanduser().exists()
        try:
            with quiet_loading():
                lm = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype)
                tokenizer = AutoTokenizer.from_pretrained(folder)
                lm = lm.to(device).eval()  # our own copy (from_pretrained leaves it in eval mode already)
        except Exception as e:  # noqa: BLE001 - every loader failure becomes one line, never a traceback
            what = f"unknown model path or hub id {model!r}" if is_hub else f"cannot load model {model or folder}"
            raise PowerSampleError(f"{what}: {one_line(e)}") from None
        return cls(lm, tokenizer, reuse_cache=reuse_cache)

    def encode(self, prompt: str, chat: bool = True) -> Tokens:
        """Prompt ids; with `chat` and a chat template, the prompt is one user message plus the assistant header."""
        return encode_prompt_ids(self._text(), prompt, chat)

    def default_speculate(self) -> int:
        """Draft tokens per forward when the sampler leaves it to the engine (base.Speculation)."""
        return SPECULATE

    def encode_messages(self, messages: Sequence[Mapping[str, str]]) -> Tokens:
        """Ids of a chat conversation plus the assistant header (see backends/tokenizer.py)."""
        return encode_message_ids(self._text(), messages)

    def decode(self, tokens: Sequence[int]) -> str:
        return self._text().decode(list(tokens), skip_special_tokens=True)

    def vocab_size(self) -> int:
        """Ids both the tokenizer and the model's embedding know (the `Vocabulary` capability)."""
        return min(len(self._text()), self.model.get_input_embeddings().num_embeddings)

    def token_text(self, token: int) -> str:
        return self._text().decode([token], skip_special_tokens=False)

    def kv_layout(self) -> KVLayout:
        """KV bytes per token, three buffers per slot (backends/memory.py: the PlansMemory capability)."""
        return hf_layout(self.model.config, self.model.dtype.itemsize)

    def _text(self) -> Any:
        """The tokenizer, or a one-line error for a backend of token ids only."""
        if self.tokenizer is None:
            raise PowerSampleError("this backend has no tokenizer: pass one to from_transformers to use text")
        return self.tokenizer

    @torch.inference_mode()
    def extend(self, requests: Sequence[ExtendRequest], proposal: Proposal) -> list[Continuation]:
        """One continuation per request, in order, decoded together (one forward per step for all rows)."""
        if len({r.slot for r in requests}) < len(requests):  # rows of one slot would share a buffer: one by one
            return [self.extend([r], proposal)[0] for r in requests]
        return extend_in_one_run(self.extend_continuous, requests, proposal)

    @torch.inference_mode()
    def extend_continuous(
        self, requests: Mapping[int, ExtendRequest], proposal: Proposal, refill: Refill, poll: Poll | None = None
    ) -> None:
        """Decode `requests` (by key) as one batch that stays full: when a row finishes, refill(key, continuation)
        gives the requests that start now, and poll() those that arrived; they join the batch at the next step."""
        batch, incoming = _Batch(self._attention, self.device), list(requests.items())
        while True:
            incoming += (poll() if poll else {}).items()
            if not (incoming or batch.rows):
                return
            if incoming:
                _check_slots(incoming, batch.rows)
                batch.add([self._start(key, request) for key, request in incoming])
                incoming = []
            feeds, ids, mask, positions = batch.inputs(self._budget)
            logits = self._forward(ids, batch.cache, mask, positions, keep=ids.shape[1])  # (B, T, V)
            self.stats.decode_forwards += 1
            self.stats.fed_tokens += sum(map(len, feeds))
            done, valid = verify_step(batch.rows, _fed_logp(logits, feeds), proposal, self.eos_ids)
            batch.advance(feeds, valid)
            finished = [(batch.rows[b], batch.take(b)) for b in done]
            batch.drop(done)
            for row, kv in finished:
                row.buffer.kv, row.buffer.ids = kv, row.ids
                self.stats.drafted += row.drafted
                self.stats.kept_drafts += row.kept_drafts
                incoming += refill(row.key, row.continuation()).items()

    @torch.inference_mode()
    def score(self, context: Sequence[int], continuation: Sequence[int]) -> tuple[float, ...]:
        """log p of each continuation token, from one forward after the scoring buffer's prefix (_fresh_logp)."""
        if not continuation:
            return ()
        logp = self._fresh_logp(context, continuation)  # (T, V)
        picked = logp.gather(-1, torch.tensor(list(continuation), device=logp.device)[:, None])[:, 0]
        return tuple(picked.cpu().tolist())

    @torch.inference_mode()
    def rank(self, context: Sequence[int], continuation: Sequence[int], n: int) -> tuple[Ranked, ...]:
        """Each continuation token's log p and the n likeliest tokens before it (the `Ranking` capability), from the
        forward `score` makes."""
        if not continuation:
            return ()
        logp = self._fresh_logp(context, continuation).cpu().numpy()  # (T, V) float64
        return ranked_rows(zip(logp, continuation), n)

    @torch.inference_mode()
    def confidence(self, context: Sequence[int], continuation: Sequence[int]) -> tuple[float, ...]:
        """Sum_x p log p of the next-token distribution before each continuation token (Eq. 13)."""
        if not continuation:
            return ()
        logp = self._fresh_logp(context, continuation)  # (T, V)
        return tuple(torch.special.xlogy(logp.exp(), logp.exp()).sum(-1).cpu().tolist())

    def _fresh_logp(self, context: Sequence[int], continuation: Sequence[int]) -> torch.Tensor:
        """Base log p (float64) of the next token before each continuation token: (T, V), from one forward after
        the longest prefix the scoring buffer holds (it keeps what it was fed last: a long prompt scored in chunks
        costs each chunk's tokens, and the samples of one prompt share its prefill)."""
        if not context:
            raise PowerSampleError("cannot score after an empty context: the prompt encodes to no tokens")
        self._check_length(len(context), len(continuation))
        ids = list(context) + list(continuation)
        buffer = self._scoring if self.reuse_cache else _Buffer()
        keep = min(common_prefix(buffer.ids, ids), len(context) - 1)
        cache, width = _stack([buffer.cropped(keep)], [keep])
        fed = torch.tensor([ids[keep:-1]], device=self.device)  # from the last context token on, at least
        if keep:
            columns = torch.arange(width + fed.shape[1], device=self.device)[None]  # (1, K): no padding, no holes
            mask, positions = self._attention.masks(columns, columns[:, width:]), columns[:, width:]
        else:  # nothing cached: transformers' own masks, a reference independent of ours (tests score against it)
            mask = positions = None
        logits = self._forward(fed, cache, mask, positions, keep=len(continuation))[0]  # (T, V)
        buffer.kv, buffer.ids = tuple((la.keys, la.values) for la in cache.layers), ids[:-1]
        return torch.log_softmax(logits.double(), dim=-1)

    # --- caches ---------------------------------------------------------------------------------------------------

    def _target(self, request: ExtendRequest) -> _Buffer:
        """Point one of the slot's buffers at the longest cached prefix of the context, without losing the other.

        The source is the buffer (of any slot) sharing the most leading ids with the context. It is cropped in place
        when that loses nothing, else its prefix (views) goes to the slot's other buffer.
        """
        own = self._buffers.setdefault(request.slot, (_Buffer(), _Buffer()))
        candidates = [*own, *(b for s, pair in self._buffers.items() if s != request.slot for b in pair)]
        source = max(candidates, key=lambda b: common_prefix(b.ids, request.context))  # first best: own buffers
        keep = min(common_prefix(source.ids, request.context), len(request.context) - 1)
        if source in own and len(source.ids) <= keep + 1:
            target = source  # it holds a prefix of the context (plus at most the token we re-feed anyway)
        else:
            target = min((b for b in own if b is not source), key=lambda b: common_prefix(b.ids, request.context))
        target.kv, target.ids = source.cropped(keep), list(request.context[:keep])
        return target

    def _start(self, key: int, request: ExtendRequest) -> _Row:
        """A row for `request`: its cache found (or, for the baseline, empty) and prefilled up to the last token."""
        self._check_length(len(request.context), request.max_tokens)
        if not request.context:
            raise PowerSampleError("cannot extend an empty context: the prompt encodes to no tokens")
        buffer = self._target(request) if self.reuse_cache else _Buffer()
        self._prefill(buffer, request.context[:-1])
        return _Row(key, request, request.context[-1], buffer=buffer, ids=list(buffer.ids))

    def _prefill(self, buffer: _Buffer, ids: Sequence[int]) -> None:
        """Feed what `buffer` lacks of `ids` (it holds a prefix of them), at batch 1."""
        missing = list(ids[len(buffer.ids) :])
        self.stats.prefilled_tokens += len(missing) + 1  # + the last context token, fed by the first decoding step
        if missing:
            cache, width = _stack([buffer.kv], [len(buffer.ids)])
            columns = torch.arange(width + len(missing), device=self.device)[None]  # (1, K): no padding, no holes
            mask = self._attention.masks(columns, columns[:, width:])
            self._forward(torch.tensor([missing], device=self.device), cache, mask, columns[:, width:])
            buffer.kv, buffer.ids = tuple((la.keys, la.values) for la in cache.layers), buffer.ids + missing

    def _forward(
        self, ids: torch.Tensor, cache: DynamicCache, mask: Any, positions: torch.Tensor | None, keep: int = 1
    ) -> torch.Tensor:
        """Feed ids (B, T) after the cache; logits (B, keep, V) of the next token after each row's last `keep` ids."""
        args = self._forward_args
        _check_eval(self.model)  # the user may have switched their model back to training since
        kwargs = {args["cache"]: cache, **({"logits_to_keep": keep} if args["logits_to_keep"] else {})}
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **kwargs)
        return out.logits[:, -keep:]

    def _check_length(self, context: int, new: int) -> None:
        check_fits(self.context_length, context, new)


def _check_slots(incoming: list[tuple[int, ExtendRequest]], rows: list[_Row]) -> None:
    """Rows decoding together need distinct slots (a slot's buffers hold one row's cache)."""
    slots = [r.slot for _, r in incoming] + [row.request.slot for row in rows]
    if len(set(slots)) < len(slots):
        raise ValueError("extend_continuous needs one slot per request in flight")


def _fed_logp(logits: torch.Tensor, feeds: list[list[int]]) -> list[np.ndarray]:
    """Base log p (float64) after each fed id, per row: (len(feeds[b]), V), from the chunk's logits (B, T, V). Only
    the rows' own positions are converted (a shorter feed's padding is not)."""
    if logits.shape[1] == 1:
        picked = logits[:, 0]
    else:
        rows = torch.tensor([b for b, fed in enumerate(feeds) for _ in fed], device=logits.device)
        columns = torch.tensor([j for fed in feeds for j in range(len(fed))], device=logits.device)
        picked = logits[rows, columns]  # (sum of feeds, V)
    logp = torch.log_softmax(picked.double(), dim=-1).cpu().numpy()
    return np.split(logp, np.cumsum([len(fed) for fed in feeds])[:-1])


def _stack(kvs: list[KV | None], lengths: list[int]) -> tuple[DynamicCache, int]:
    """Per-row caches stacked left-padded to a common width into one DynamicCache; returns (cache, width). Without
    the model's config every layer is a DynamicLayer holding all its columns (sliding ones too: see the docstring)."""
    width = max(lengths)
    cache = DynamicCache()
    if width:
        reference = next(kv for kv in kvs if kv is not None)
        for layer, (k0, v0) in enumerate(reference):
            keys = torch.cat([_left_pad(kv, layer, 0, width, k0) for kv in kvs])
            values = torch.cat([_left_pad(kv, layer, 1, width, v0) for kv in kvs])
            cache.update(keys, values, layer)
    return cache, width


def _left_pad(kv: KV | None, layer: int, which: int, width: int, like: torch.Tensor) -> torch.Tensor:
    """One row's keys or values at `layer`, zero-padded on the left to `width` positions: (1, H, width, D)."""
    if kv is None:
        return like.new_zeros(1, like.shape[1], width, like.shape[3])
    t = kv[layer][which]
    return torch.nn.functional.pad(t, (0, 0, width - t.shape[2], 0)) if t.shape[2] < width else t


def _parse_dtype(dtype: str | None, device: str) -> torch.dtype | str:
    """The torch dtype for a --dtype spelling (hub.DTYPES); None = float32 on cpu, bfloat16 elsewhere."""
    return TORCH_DTYPES[dtype_name(dtype, "float32" if device.startswith("cpu") else "bfloat16")]


def _resolve_model(model: str | None) -> str:
    """The folder or hub id for from_pretrained; a .gguf file's converted copy (converted once, then cached)."""
    if model is None:
        return str(embedded_model_dir())
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return str(converted_gguf(path))
    if path.is_dir():
        return str(path)
    if path.exists():
        raise PowerSampleError(f"{model} is neither a model folder nor a .gguf file")
    if not is_hub_id(model):
        raise PowerSampleError(f"unknown model path or hub id {model!r}: no such file or folder")
    return model  # a hub id; load() turns a failed download into a one-line error


def _forward_arguments(model: Any) -> dict[str, Any]:
    """What model.forward accepts: its KV-cache keyword (`cache` in newer transformers 5.x, else `past_key_values`),
    and whether it takes `logits_to_keep` (which spares computing logits for positions we never read)."""
    params = inspect.signature(model.forward).parameters
    return {"cache": "cache" if "cache" in params else "past_key_values", "logits_to_keep": "logits_to_keep" in params}


def _eos_ids(model: Any, tokenizer: Any | None) -> frozenset[int]:
    """EOS ids from the model's generation config (an int or a list) plus the tokenizer's EOS."""
    generation = getattr(model, "generation_config", None)
    return eos_ids(getattr(tokenizer, "eos_token_id", None), getattr(generation, "eos_token_id", None))


def _text_config(model: Any) -> Any:
    """The config of the model's text decoder (the model's own config for a plain causal LM)."""
    return model.config.get_text_config(decoder=True)


def _input_device(model: Any) -> torch.device:
    """Where the model takes its input ids: the input embeddings' execution device. Under accelerate's hooks
    (`device_map`, offloading) that is the hook's execution device (an offloaded weight sits on `meta`), else the
    embedding weight's own device."""
    embeddings = model.get_input_embeddings()
    device = getattr(getattr(embeddings, "_hf_hook", None), "execution_device", None)
    return torch.device(device) if device is not None else embeddings.weight.device


def from_transformers(
    model: Any, tokenizer: Any | None = None, *, eos_ids: Iterable[int] | None = None, reuse_cache: bool = True
) -> HFBackend:
    """An HFBackend around a model (and tokenizer) the caller already holds, checked first (one-line
    PowerSampleErrors): a causal LM in eval mode, with its weights loaded, and a tokenizer of the same vocabulary.
    `eos_ids` None = the model's generation config's EOS ids plus the tokenizer's."""
    _check_causal_lm(model)
    vocabulary = model.get_input_embeddings().num_embeddings
    _check_tokenizer(tokenizer, vocabulary)
    if eos_ids is not None:
        eos_ids = list(eos_ids)
        if not all(isinstance(i, int) and 0 <= i < vocabulary for i in eos_ids):
            raise PowerSampleError(f"eos_ids must be token ids in [0, {vocabulary}), got {eos_ids}")
    return HFBackend(model, tokenizer, reuse_cache=reuse_cache, eos_ids=eos_ids)


def _check_causal_lm(model: Any) -> None:
    """A one-line error unless `model` is a transformers causal LM (a decoder with a language-model head)."""
    if not (hasattr(model, "config") and callable(getattr(model, "get_input_embeddings", None))):
        raise PowerSampleError(f"expected a transformers causal LM (AutoModelForCausalLM), got {type(model).__name__}")
    name = type(model).__name__
    if getattr(model.config, "is_encoder_decoder", False):
        raise PowerSampleError(f"{name} is an encoder-decoder model: power sampling needs a causal LM")
    if callable(getattr(model, "can_generate", None)) and not model.can_generate():
        raise PowerSampleError(f"{name} has no language-model head: load the model with AutoModelForCausalLM")
    if _input_device(model).type == "meta":
        raise PowerSampleError(f"{name}'s weights are on the meta device: load them before sampling")


def _check_tokenizer(tokenizer: Any | None, vocabulary: int) -> None:
    """A one-line error unless `tokenizer` (None: ids only) is a tokenizer whose ids the model's embedding holds."""
    if tokenizer is None:
        return
    if not (callable(tokenizer) and callable(getattr(tokenizer, "decode", None))):
        raise PowerSampleError(f"expected a transformers tokenizer (AutoTokenizer), got {type(tokenizer).__name__}")
    special = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    size = max([len(tokenizer)] + [i + 1 for i in special if i is not None])  # ids the tokenizer may produce
    if size > vocabulary:
        raise PowerSampleError(
            f"the tokenizer has {size} ids but the model's embedding only {vocabulary}: they belong to different models"
        )


TRAINING = "the model is in training mode, where dropout makes log p random: call model.eval() first"


def _check_eval(model: Any) -> None:
    """A one-line error for a model in training mode (we never switch the caller's model to eval ourselves)."""
    if getattr(model, "training", False):
        raise PowerSampleError(TRAINING)
