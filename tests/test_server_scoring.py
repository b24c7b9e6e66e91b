"""Prompt scoring and real alternatives on `/v1/completions` and chat: `echo`, `max_tokens: 0`, token-id prompts,
`logprobs: N` (the N likeliest tokens under the base model), and vLLM's tokenizer endpoints. Exact on the toy model,
checked against `score` and `rank` on the embedded one."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

import powersample
from powersample.backends.toy import ToyBackend, ToySpec
from powersample.config import SamplerConfig
from powersample.server.app import Settings, create_app
from powersample.server.background import background_server

WORDS = {  # ties at 0.15 (ids 1-4): alternatives go by the smaller id
    "vocab": ["the", " cat", " sat", " on", " mat", ".", "\n", "<eos>"],
    "eos_id": 7,
    "default": [0.2, 0.15, 0.15, 0.15, 0.15, 0.1, 0.09, 0.01],
    "next": {"": [0.6, 0.1, 0.1, 0.05, 0.05, 0.05, 0.05, 0.0], "0,1": [0.05, 0.05, 0.7, 0.05, 0.05, 0.05, 0.04, 0.01]},
}
DEFAULTS = SamplerConfig(max_new_tokens=8, block_size=4, mcmc_steps=2)


def toy() -> ToyBackend:
    return ToyBackend(ToySpec.from_dict(WORDS))


def serve(backend=None, **settings):
    settings.setdefault("defaults", DEFAULTS)
    return background_server(create_app(backend or toy(), Settings(**settings)))


def client(url: str, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


def post(url: str, body: dict, path: str = "/v1/completions") -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=120)


def want_top(prefix: list[int], n: int) -> dict[str, float]:
    """The toy's n likeliest next tokens after `prefix`, by brute force over its row (ties by the smaller id)."""
    row = ToySpec.from_dict(WORDS).row(prefix)
    ranked = sorted(range(len(row)), key=lambda t: (-row[t], t))[:n]
    return {WORDS["vocab"][t]: math.log(row[t]) for t in ranked}


def check_offsets(text: str, lp: dict) -> None:
    """Each token's piece sits at its text_offset in the choice's text, and the pieces tile the text."""
    assert "".join(lp["tokens"]) == text
    for piece, offset in zip(lp["tokens"], lp["text_offset"]):
        assert text[offset : offset + len(piece)] == piece


@pytest.fixture(scope="module")
def url():
    with serve(model_name="toy-words") as url:
        yield url


# --- echo, max_tokens 0, token-id prompts ------------------------------------------------------------------------


def test_max_tokens_zero_scores_a_token_id_prompt(url):
    ids = [0, 1, 2, 3]
    resp = post(url, {"prompt": ids, "echo": True, "max_tokens": 0, "logprobs": 2, "n": 2}).json()
    backend = toy()
    assert len(resp["choices"]) == 2 and resp["choices"][0]["logprobs"] == resp["choices"][1]["logprobs"]
    choice = resp["choices"][0]
    lp = choice["logprobs"]
    assert choice["text"] == "the cat sat on" and choice["finish_reason"] == "length"
    check_offsets(choice["text"], lp)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None  # nothing comes before the first
    assert lp["token_logprobs"][1:] == pytest.approx(backend.score(ids[:1], ids[1:]), abs=1e-12)
    for i in range(1, len(ids)):
        top = want_top(ids[:i], 2)
        chosen = {WORDS["vocab"][ids[i]]: lp["token_logprobs"][i]}
        assert lp["top_logprobs"][i] == pytest.approx({**top, **chosen})  # the N likeliest, plus the token itself
        assert list(lp["top_logprobs"][i])[:2] == list(top)  # likeliest first, ties by the smaller id
    assert resp["usage"] == {"prompt_tokens": 4, "completion_tokens": 0, "total_tokens": 4}
    ps = resp["power_sampling"]
    assert ps["chains"] == [] and ps["tokens_sampled"] == 0 and ps["proposals"] == 0
    assert ps["config"]["max_new_tokens"] == 0


def test_echo_with_sampling_covers_the_prompt_then_the_sample(url):
    ids = [0, 1]
    resp = post(url, {"prompt": ids, "echo": True, "max_tokens": 5, "logprobs": 3, "seed": 4}).json()
    choice = resp["choices"][0]
    lp = choice["logprobs"]
    check_offsets(choice["text"], lp)
    assert choice["text"].startswith("the cat") and lp["tokens"][:2] == ["the", " cat"]
    vocab = {**{v: t for t, v in enumerate(WORDS["vocab"])}, "": 7}  # a final EOS comes back with the piece ""
    tokens = [vocab[p] for p in lp["tokens"]]
    sample = tokens[2:]
    assert 1 <= len(sample) <= 5 and resp["usage"]["completion_tokens"] >= len(sample)
    assert lp["token_logprobs"][2:] == pytest.approx(toy().score(ids, sample), abs=1e-12)
    for i in range(1, len(tokens)):  # alternatives on prompt and generated tokens alike: the real top 3
        top = want_top(tokens[:i], 3)
        assert {k: v for k, v in lp["top_logprobs"][i].items() if k in top} == pytest.approx(top)
        assert len(lp["top_logprobs"][i]) == 3 + (lp["tokens"][i] not in top)
    # the chain's own log p is the sample's
    assert resp["power_sampling"]["chains"][0]["logp"] == pytest.approx(sum(lp["token_logprobs"][2:]))


def test_a_completions_final_eos_is_its_last_logprob_and_a_chats_is_not():
    coin = ToyBackend(ToySpec.from_dict({"vocab": ["a", "<eos>"], "eos_id": 1, "default": [0.5, 0.5]}))
    with serve(coin) as url:
        body = {"max_tokens": 4, "n": 8, "seed": 0, "method": "base", "logprobs": 1}
        resp = post(url, {**body, "prompt": "x"}).json()
        chat = post(
            url, {**body, "messages": [{"role": "user", "content": "x"}], "logprobs": True}, "/v1/chat/completions"
        ).json()
    ended = [c["logprobs"] for c in resp["choices"] if c["finish_reason"] == "stop"]
    assert ended and all(
        lp["tokens"][-1] == "" and lp["token_logprobs"][-1] == pytest.approx(math.log(0.5)) for lp in ended
    )
    assert sum(len(c["logprobs"]["tokens"]) for c in resp["choices"]) == resp["usage"]["completion_tokens"]
    assert all(e["token"] == "a" for c in chat["choices"] for e in c["logprobs"]["content"])


def test_echo_of_a_text_prompt_prepends_it_and_shifts_the_offsets(url):
    plain = post(url, {"prompt": "Once:", "max_tokens": 4, "logprobs": 1, "seed": 9}).json()["choices"][0]
    echoed = post(url, {"prompt": "Once:", "max_tokens": 4, "logprobs": 1, "seed": 9, "echo": True}).json()
    choice = echoed["choices"][0]
    assert choice["text"] == "Once:" + plain["text"]  # the toy encodes no prompt tokens: only its text comes back
    assert choice["logprobs"]["tokens"] == plain["logprobs"]["tokens"]
    assert choice["logprobs"]["text_offset"] == [o + len("Once:") for o in plain["logprobs"]["text_offset"]]
    assert choice["logprobs"]["token_logprobs"] == plain["logprobs"]["token_logprobs"]


def test_echo_without_logprobs_and_with_logprobs_zero(url):
    body = {"prompt": [[0, 1], [2]], "echo": True, "max_tokens": 3, "seed": 2}
    bare = post(url, body).json()["choices"]
    assert [c["logprobs"] for c in bare] == [None, None]
    assert bare[0]["text"].startswith("the cat") and bare[1]["text"].startswith(" sat")
    zero = post(url, {**body, "logprobs": 0}).json()["choices"]
    assert [c["text"] for c in zero] == [c["text"] for c in bare]  # same seed, same samples
    lp = zero[0]["logprobs"]
    assert lp["top_logprobs"] is None and lp["token_logprobs"][0] is None
    assert lp["token_logprobs"][1] == pytest.approx(math.log(0.15))  # " cat" after "the": the default row
    check_offsets(zero[0]["text"], lp)


def test_scoring_agrees_with_a_streamed_echo(url):
    body = {"prompt": [0, 1], "echo": True, "max_tokens": 4, "logprobs": 2, "seed": 5}
    whole = post(url, body).json()["choices"][0]
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=60) as resp:
        events = [json.loads(line[6:]) for line in resp.iter_lines() if line.startswith("data: {")]
    streamed = [c for e in events for c in e["choices"] if c["text"]]
    assert [(c["text"], c["logprobs"]) for c in streamed] == [(whole["text"], whole["logprobs"])]


def test_chat_top_logprobs_are_the_real_alternatives(url):
    resp = post(
        url,
        {
            "messages": [{"role": "user", "content": "hi"}],
            "logprobs": True,
            "top_logprobs": 3,
            "max_tokens": 4,
            "seed": 1,
            "method": "max-swap",
        },
        "/v1/chat/completions",
    ).json()
    vocab = {v: t for t, v in enumerate(WORDS["vocab"])}
    content = resp["choices"][0]["logprobs"]["content"]
    tokens = [vocab[e["token"]] for e in content]
    for i, entry in enumerate(content):
        top = want_top(tokens[:i], 3)
        assert [t["token"] for t in entry["top_logprobs"]] == list(top)
        assert [t["logprob"] for t in entry["top_logprobs"]] == pytest.approx(list(top.values()))


def test_the_openai_sdk_scores_a_prompt(url):
    resp = client(url).completions.create(model="m", prompt=[0, 1, 2], echo=True, logprobs=3, max_tokens=0)
    lp = resp.choices[0].logprobs
    assert resp.choices[0].text == "the cat sat" and lp.tokens == ["the", " cat", " sat"]
    assert lp.token_logprobs[0] is None and lp.token_logprobs[2] == pytest.approx(math.log(0.7))
    assert lp.top_logprobs[0] is None and list(lp.top_logprobs[2])[0] == " sat"
    assert resp.usage.completion_tokens == 0 and lp.text_offset == [0, 3, 7]


# --- bad requests, and backends without the capabilities ----------------------------------------------------------


class Minimal:
    """A backend with the required seam only: no Ranking, no Vocabulary."""

    def __init__(self):
        self.inner = toy()
        self.eos_ids, self.context_length = self.inner.eos_ids, None

    def encode(self, prompt, chat=True):
        return (0,)

    def decode(self, tokens):
        return self.inner.decode(tokens)

    def extend(self, requests, proposal):
        return self.inner.extend(requests, proposal)

    def score(self, context, continuation):
        return self.inner.score(context, continuation)


BAD = [
    ({"prompt": [0, 8], "echo": True, "max_tokens": 0}, "prompt", "outside the vocabulary"),
    ({"prompt": [[0], [-1]]}, "prompt", "outside the vocabulary"),
    ({"prompt": [0, "a"]}, "prompt", "valid"),
    ({"prompt": [[0], []]}, "prompt", "empty"),
    ({"prompt": [0], "max_tokens": 0}, "max_tokens", "0 only with echo"),
    ({"prompt": [0], "max_tokens": 0, "echo": True, "stream": True}, "stream", "not streamed"),
    ({"prompt": [0], "max_tokens": -1, "echo": True}, "max_tokens", "between 1"),
    ({"prompt": [0], "echo": "yes"}, "echo", "valid boolean"),
    ({"prompt": [0], "logprobs": 6, "echo": True}, "logprobs", "between 0 and 5"),
]


@pytest.mark.parametrize("body, param, message", BAD)
def test_bad_scoring_requests_are_one_line_400s(url, body, param, message):
    resp = post(url, body)
    error = resp.json()["error"]
    assert resp.status_code == 400 and error["param"] == param and message in error["message"]
    assert "\n" not in error["message"]


def test_a_backend_without_the_capabilities_says_so_and_serves_the_rest():
    with serve(Minimal()) as url:
        resp = post(url, {"prompt": "x", "logprobs": 2, "max_tokens": 2})
        assert resp.status_code == 400 and "Ranking" in resp.json()["error"]["message"]
        chat = post(
            url,
            {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 1},
            "/v1/chat/completions",
        )
        assert chat.status_code == 400 and chat.json()["error"]["param"] == "top_logprobs"
        ids = post(url, {"prompt": [0, 1], "max_tokens": 2})
        assert ids.status_code == 400 and "Vocabulary" in ids.json()["error"]["message"]
        assert post(url, {"tokens": [0]}, "/detokenize").status_code == 400
        # log p alone needs only score: echo with logprobs 0 works
        ok = post(url, {"prompt": "x", "echo": True, "max_tokens": 2, "logprobs": 0, "seed": 1})
        assert ok.status_code == 200 and ok.json()["choices"][0]["logprobs"]["token_logprobs"][0] is None
        assert httpx.get(url + "/tokenizer_info").json()["eos_token"] is None


# --- the tokenizer endpoints ---------------------------------------------------------------------------------------


def test_tokenizer_endpoints_in_vllms_shapes(url):
    info = httpx.get(url + "/tokenizer_info").json()
    assert info == {"eos_token": "<eos>", "model_max_length": None, "vocab_size": 8}
    assert post(url, {"prompt": "anything", "add_special_tokens": False}, "/tokenize").json() == {
        "count": 0,
        "max_model_len": None,
        "tokens": [],
        "token_strs": None,
    }  # the toy encodes no prompt
    chat = post(url, {"messages": [{"role": "user", "content": "hi"}]}, "/tokenize").json()
    assert chat["tokens"] == []
    assert post(url, {"tokens": [0, 1, 7]}, "/detokenize").json() == {"prompt": "the cat"}


@pytest.mark.parametrize(
    "path, body, status",
    [
        ("/tokenize", {}, 400),
        ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, 400),
        ("/tokenize", {"prompt": 5}, 400),
        ("/tokenize", {"messages": [{"role": "wizard", "content": "b"}]}, 400),
        ("/tokenize", [1], 400),
        ("/detokenize", {"tokens": [0, 99]}, 400),
        ("/detokenize", {"tokens": "0"}, 400),
        ("/detokenize", {}, 400),
    ],
)
def test_bad_tokenizer_bodies_are_4xx(url, path, body, status):
    resp = httpx.post(url + path, content=json.dumps(body), headers={"content-type": "application/json"})
    assert resp.status_code == status and resp.json()["error"]["type"] == "invalid_request_error"
    assert httpx.post(url + path, content=b"{", headers={"content-type": "application/json"}).status_code == 400
    assert httpx.post(url + path, content=b"{}", headers={"content-type": "text/plain"}).status_code == 415


def test_metrics_count_the_tokenizer_endpoints():
    pytest.importorskip("prometheus_client")
    with serve() as url:
        post(url, {"prompt": "x"}, "/tokenize")
        post(url, {"tokens": [99]}, "/detokenize")
        httpx.get(url + "/tokenizer_info")
        text = httpx.get(url + "/metrics").text
    assert 'powersample_requests_total{endpoint="/tokenize",status="200"} 1.0' in text
    assert 'powersample_requests_total{endpoint="/detokenize",status="400"} 1.0' in text
    assert 'powersample_requests_total{endpoint="/tokenizer_info",status="200"} 1.0' in text


# --- the embedded model ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    backend, log = powersample.load_backend("auto"), tmp_path_factory.mktemp("served") / "samples.jsonl"
    with serve(
        backend,
        defaults=SamplerConfig(max_new_tokens=8, block_size=4, mcmc_steps=1),
        model_name="smollm2",
        output=str(log),
    ) as url:
        yield backend, url, log


def test_embedded_model_scores_a_text_prompt_as_score_and_rank_do(embedded):
    backend, url, _ = embedded
    prompt = "The capital of France is Paris."
    resp = client(url).completions.create(model="smollm2", prompt=prompt, echo=True, logprobs=3, max_tokens=0)
    lp, ids = resp.choices[0].logprobs, backend.encode(prompt, chat=False)
    assert resp.choices[0].text == prompt and len(lp.tokens) == len(ids) and "".join(lp.tokens) == prompt
    check_offsets(prompt, {"tokens": lp.tokens, "text_offset": lp.text_offset})
    np.testing.assert_allclose(lp.token_logprobs[1:], backend.score(ids[:1], ids[1:]), atol=1e-4)
    for entry, ranked in zip(lp.top_logprobs[1:], backend.rank(ids[:1], ids[1:], 3)):
        assert list(entry.values())[:3] == pytest.approx([p for _, p in ranked.top], abs=1e-4)
        assert list(entry)[:3] == [backend.decode([t]) for t, _ in ranked.top]
    tokenized = post(url, {"prompt": prompt, "add_special_tokens": False}, "/tokenize").json()
    assert tokenized["tokens"] == list(ids) and tokenized["max_model_len"] == backend.context_length
    assert post(url, {"tokens": list(ids)}, "/detokenize").json() == {"prompt": prompt}
    assert (
        post(url, {"prompt": list(ids), "echo": True, "max_tokens": 0, "logprobs": 3}).json()["choices"][0]["logprobs"]
        == resp.choices[0].logprobs.model_dump()
    )  # the same prompt as ids scores the same
    info = httpx.get(url + "/tokenizer_info").json()
    assert info["eos_token"] and info["vocab_size"] == backend.vocab_size()


def test_embedded_model_generated_alternatives_are_real(embedded):
    backend, url, log = embedded
    prompt = "Name a colour:"
    resp = post(url, {"prompt": prompt, "max_tokens": 6, "logprobs": 2, "seed": 3, "alpha": 2.0}).json()
    lp, ids = resp["choices"][0]["logprobs"], backend.encode(prompt, chat=False)
    [served] = [r for r in map(json.loads, log.read_text().splitlines()) if r["request_id"] == resp["id"]]
    sample = tuple(t for t in served["tokens"] if t not in backend.eos_ids)
    ranked = backend.rank(ids, sample, 2)  # the final tokens, ranked after the chain ended
    assert len(lp["tokens"]) == len(sample)
    np.testing.assert_allclose(lp["token_logprobs"], [r.base_logp for r in ranked], atol=1e-4)
    np.testing.assert_allclose(lp["token_logprobs"], served["token_logp"][: len(sample)], atol=1e-4)
    for entry, r, piece in zip(lp["top_logprobs"], ranked, lp["tokens"]):
        assert list(entry.values())[:2] == pytest.approx([p for _, p in r.top], abs=1e-4)
        assert len(entry) == 2 + (piece not in list(entry)[:2])


# --- the engine runs calls on its own thread ---------------------------------------------------------------------


def test_engine_calls_run_on_the_engine_thread_and_answer_failures_and_deadlines():
    import queue
    import threading
    import time

    from powersample.server.engine import Call, Engine, Stopped

    def once(work):  # a call of one step
        def steps():
            return work()
            yield  # unreachable: makes steps a generator

        return steps

    engine, got = Engine(toy()), queue.Queue()
    engine.start()
    try:
        engine.call(Call(once(lambda: threading.current_thread().name), time.monotonic() + 10, got.put))
        assert got.get(timeout=10) == "powersample-engine"  # the thread that owns the backend
        engine.call(Call(once(lambda: 1 / 0), time.monotonic() + 10, got.put))
        assert isinstance(got.get(timeout=10), ZeroDivisionError)  # a failed call is its answer; the engine goes on
        engine.call(Call(once(lambda: "ran"), time.monotonic() - 1, got.put))  # past its deadline: never runs
        late = got.get(timeout=10)
        assert isinstance(late, Stopped) and str(late) == "timeout"
        engine.call(Call(once(lambda: "still serving"), time.monotonic() + 10, got.put))
        assert got.get(timeout=10) == "still serving"
    finally:
        engine.close()
