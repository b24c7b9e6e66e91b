"""A model without a chat template. The toy and every engine say so alike (backends.base.has_chat_template); a chat
prompt then goes as plain text with one notice per process, eval records chat: false, and serve sends a chat as a
plain transcript whose role lines end the reply, saying so in power_sampling. On the toy, and on real tokenizers
(the embedded model's, its template removed) under hf and llama.cpp."""

from __future__ import annotations

import json

import pytest
from support.eval_toy import eval_argv, write_jsonl, write_spec

import powersample.io
from powersample import SamplerConfig, sample
from powersample.api import NO_TEMPLATE
from powersample.backends.base import has_chat_template
from powersample.backends.tokenizer import plain_transcript
from powersample.backends.toy import ToyBackend, ToySpec
from powersample.cli import main
from powersample.eval.records import load_records, read_run

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient

from powersample.server.app import NO_TEMPLATE as SERVE_NO_TEMPLATE
from powersample.server.app import Settings, create_app

# Says "Sure.", then writes the user's next turn itself, as a chat model given a bare transcript does.
TALKER = {
    "vocab": ["Sure.", "\nuser:", " thanks", "<eos>"],
    "eos_id": 3,
    "default": [0.0, 0.0, 0.5, 0.5],
    "next": {"": [1.0, 0.0, 0.0, 0.0], "0": [0.0, 1.0, 0.0, 0.0]},
}
BASE = SamplerConfig(method="base", max_new_tokens=4)
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]


@pytest.fixture(autouse=True)
def fresh_notices(monkeypatch):
    """A process shows each notice once: each test starts as a fresh process would."""
    monkeypatch.setattr(powersample.io._Notices, "shown", set())
    monkeypatch.setattr(powersample.io._Notices, "quiet", False)


def test_the_toy_has_no_template_and_chat_prompts_say_so_once(capsys):
    toy = ToyBackend(ToySpec.from_dict(TALKER))
    assert not has_chat_template(toy)
    for seed in range(3):
        sample(toy, "Hi", BASE, seed=seed)
    sample(toy, "Hi", BASE, chat=False)
    assert capsys.readouterr().err == f"powersample: {NO_TEMPLATE}\n"


def test_eval_records_chat_false_and_raw_is_the_same_run(tmp_path, capsys):
    data = write_jsonl(tmp_path / "math.jsonl", [{"problem": f"q{i}", "answer": "1"} for i in range(5)])
    spec, out = write_spec(tmp_path), tmp_path / "run"
    loud = [a for a in eval_argv(spec, data, out, "--seeds", "0-1", "--batch", "3") if a != "--quiet"]
    assert main(loud) == 0
    assert capsys.readouterr().err.count(NO_TEMPLATE) == 1  # once per run, not per prompt or batch
    assert read_run(out)["identity"]["chat"] is False
    assert [r["chat"] for r in load_records(out)] == [False] * 10
    for extra in (["--raw"], []):  # the same prompts either way: the same run, every record resumed
        assert main(eval_argv(spec, data, out, "--seeds", "0-1", *extra)) == 0
        out_text, err = capsys.readouterr()
        assert "10 records (10 resumed)" in out_text and err == ""  # --quiet: no notice either


@pytest.fixture
def talker(capsys):
    app = create_app(ToyBackend(ToySpec.from_dict(TALKER)), Settings(allowed_hosts=("testserver",)))
    assert capsys.readouterr().err == f"powersample: {SERVE_NO_TEMPLATE}\n"
    with TestClient(app) as client:
        yield client


def test_serve_ends_a_transcript_reply_at_the_next_role_line(talker):
    body = {"messages": MESSAGES, "method": "base", "max_tokens": 4, "seed": 1}
    reply = talker.post("/v1/chat/completions", json=body).json()
    [choice] = reply["choices"]
    assert choice["message"]["content"] == "Sure." and choice["finish_reason"] == "stop"
    assert reply["power_sampling"]["transcript"] == {"stop": ["\nsystem:", "\nuser:", "\nassistant:"]}
    streamed = talker.post("/v1/chat/completions", json={**body, "stream": True}).text
    chunks = [json.loads(line[6:]) for line in streamed.splitlines() if line.startswith("data: {")]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == "Sure."
    assert chunks[-1]["power_sampling"]["transcript"]["stop"][1] == "\nuser:"
    completion = talker.post("/v1/completions", json={"prompt": "Hi", "method": "base", "max_tokens": 4}).json()
    assert completion["choices"][0]["text"].startswith("Sure.\nuser:")  # a completion has no turns to end
    assert "transcript" not in completion["power_sampling"]


# --- real tokenizers without a template ---------------------------------------------------------------------------


@pytest.mark.slow
def test_hf_tokenizer_without_a_template(capsys):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from powersample.backends.embedded import embedded_model_dir
    from powersample.backends.hf import HFBackend

    tokenizer = transformers.AutoTokenizer.from_pretrained(embedded_model_dir())
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()  # HFBackend refuses training mode
    assert has_chat_template(HFBackend(model, tokenizer))
    tokenizer.chat_template = None
    backend = HFBackend(model, tokenizer)
    assert not has_chat_template(backend)
    [record] = sample(backend, "Hi", BASE, seed=3)
    assert record.tokens == sample(backend, "Hi", BASE, seed=3, chat=False)[0].tokens
    assert capsys.readouterr().err.count(NO_TEMPLATE) == 1


@pytest.mark.slow
def test_llama_cpp_model_without_a_template(tmp_path, capsys):
    pytest.importorskip("llama_cpp")
    pytest.importorskip("gguf")
    from support.gguf_models import tiny_gemma2

    from powersample.backends.llamacpp import LlamaCppBackend

    load = lambda template: LlamaCppBackend.load(  # noqa: E731
        str(tiny_gemma2(tmp_path / f"{template}.gguf", chat_template=template)), n_ctx=256, max_slots=2
    )
    assert has_chat_template(load(True))
    backend = load(False)
    assert not has_chat_template(backend)
    capsys.readouterr()
    with TestClient(create_app(backend, Settings(allowed_hosts=("testserver",)))) as client:
        tokens = client.post("/tokenize", json={"messages": MESSAGES}).json()["tokens"]
        reply = client.post("/v1/chat/completions", json={"messages": MESSAGES, "method": "base", "max_tokens": 3})
    assert tuple(tokens) == backend.encode(plain_transcript(MESSAGES), chat=False)
    assert reply.json()["power_sampling"]["transcript"]["stop"] == ["\nsystem:", "\nuser:", "\nassistant:"]
    assert capsys.readouterr().err.count(SERVE_NO_TEMPLATE) == 1
