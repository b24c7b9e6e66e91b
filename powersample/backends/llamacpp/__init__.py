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
`kernels.py`: weights in the plain CPU layout (no repack, no AMX), llama.cpp's tiled K-quant matmul off.

Caches (`kvcache.py`). One llama.cpp context holds 2 x max_slots + 1 sequences, each in its own KV stream
(`kv_unified=False`): per slot a lane and a bank, plus one scratch sequence for `score`, `confidence` and
`next_token_logp`. A request takes the longest cached prefix of its context from any sequence. Only the context
tokens no sequence holds are prefilled, and at least the last context token is fed again, by the first decoding
step, since a cache keeps no logits.

Batching. `extend_continuous` keeps up to max_slots rows decoding: a finished row (EOS or max_tokens) leaves at
once and its chain's next request, from `refill`, joins at the next step. `extend` is the same loop with no refills.
Lanes are sequences 0 .. max_slots - 1 and rows are fed in lane order, because llama.cpp only puts consecutive
sequence ids of separate streams in one physical batch: chains 0..n-1 decode as one batch; gaps left by finished
rows split a step into one physical batch per run of consecutive lanes (same numbers, a little slower).

Same numbers however the work is batched (bit for bit). llama.cpp's quantized CPU kernels quantize activations to
8 bits, so the tiniest change in an attention sum moves log p by up to ~0.5; we keep every row's arithmetic the same
whether it is decoded alone or batched, cached or fresh, prefilled or decoded one token at a time:
- the exact kernels and the decode layout of `kernels.py`: the batched layout only where a probe of the loaded
  model finds that its matmul kernels round alike at every row count (`probing.rows_disagree`: Q4_1, Q4_K_M, Q8_0
  on the machines we measured) and llama.cpp runs one thread; else the rows layout, one row per llama_decode and one
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
cells moved over exactly. It is given back by `release_memory` (the ReleasesMemory capability), which the server's
engine calls whenever it goes idle (not between the turns of a long scoring call and the chains: each turn would
grow the room and prefill the prompt again): a room above KEEP_ROOM goes back to MIN_ROOM, each sequence cut to it
and moved over. Cells moved keep their exact bytes, so no log p changes; only cached prefixes past MIN_ROOM are lost,
which costs a prefill. Rooms up to KEEP_ROOM are kept across runs (re-growing one costs about 0.5 s per GB here), so
ordinary requests keep their caches; `serve --max-context` bounds the room one request may take.

The modules, each one concept: `backend.py` (LlamaCppBackend: loading, text, the decoding loop, scoring, memory),
`kvcache.py` (which sequence holds what, what to cut and copy: pure logic, no llama_cpp), `decode.py` (the rows of
a decoding step), `context.py` (the C calls on a llama.cpp context), `kernels.py` (which kernels and layout: pure
decisions), `probing.py` (the crash and layout probes), `child.py` (the crash probe's child), `files.py` (GGUF
paths, the re-quantized copies, loading the weights), `library.py` (importing llama_cpp, its log).
"""

from powersample.backends.llamacpp.backend import KEEP_ROOM, MAX_SLOTS, MIN_ROOM, LlamaCppBackend, LlamaCppStats
from powersample.backends.llamacpp.child import probe_child
from powersample.backends.llamacpp.context import N_BATCH
from powersample.backends.llamacpp.files import QUANTS, Weights, model_path, requantized
from powersample.backends.llamacpp.library import INSTALL_HINT, route_log
from powersample.backends.llamacpp.probing import probe_outcome

__all__ = [
    "INSTALL_HINT",
    "KEEP_ROOM",
    "MAX_SLOTS",
    "MIN_ROOM",
    "N_BATCH",
    "QUANTS",
    "LlamaCppBackend",
    "LlamaCppStats",
    "Weights",
    "model_path",
    "probe_child",
    "probe_outcome",
    "requantized",
    "route_log",
]
