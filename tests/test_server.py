"""`powersample serve`: the openai SDK against a live server (toy and embedded model), bad input, auth, limits,
timeouts, disconnects and batching."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np
import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from support.server import DEFAULTS, SLOW_POWER, WORDS, SlowToy, client, serve, wait_idle, word_backend

import powersample
from powersample.backends.toy import ToyBackend, ToySpec
from powersample.config import SamplerConfig
from powersample.samplers import registry
from powersample.server.protocol import Limits


@pytest.fixture(scope="module")
def toy_url():
    with serve(model_name="toy-words") as url:
        yield url


# --- the openai SDK on the toy backend -------------------------------------------------------------------------------


def test_completions_equal_powersample_sample_with_the_same_seed(toy_url):
    extra = {"alpha": 2.0, "mcmc_steps": 2, "block_size": 3, "method": "power"}
    resp = client(toy_url).completions.create(
        model="toy-words", prompt="x", n=3, seed=5, max_tokens=9, extra_body=extra
    )
    config = SamplerConfig(alpha=2.0, mcmc_steps=2, block_size=3, max_new_tokens=9)
    want = powersample.sample(word_backend(), "x", config, seed=5, num_samples=3, chat=False)
    assert [c.text for c in sorted(resp.choices, key=lambda c: c.index)] == [r.text for r in want]
    assert resp.object == "text_completion" and resp.model == "toy-words"
    ps = resp.model_extra["power_sampling"]
    assert ps["config"]["alpha"] == 2.0 and ps["config"]["block_size"] == 3 and ps["seed"] == 5
    assert ps["proposals"] == sum(r.proposals for r in want) and ps["accepted"] == sum(r.accepted for r in want)
    assert ps["tokens_sampled"] == sum(r.tokens_generated for r in want)
    assert ps["acceptance_rate"] == pytest.approx(ps["accepted"] / ps["proposals"])
    assert resp.usage.completion_tokens == sum(len(r.tokens) for r in want)


@pytest.mark.parametrize(
    "extra",
    [
        {"method": "power-smc", "particles": 5, "ess_threshold": 0.9, "alpha_ramp": 2, "block_size": 2},
        {"method": "power-mtm", "tries": 3, "mcmc_steps": 2, "block_size": 3},
        {"method": "power-rollout", "candidates": 2, "rollouts": 2, "rollout_horizon": 2, "block_size": 1},
    ],
)
def test_every_method_and_its_knobs_through_extra_body(toy_url, extra):
    resp = client(toy_url).completions.create(
        model="toy-words", prompt="x", n=2, seed=4, max_tokens=5, extra_body=extra
    )
    ps = resp.model_extra["power_sampling"]
    assert all(ps["config"][k] == v for k, v in extra.items()) and not ps.get("ignored")
    knobs = {k: v for k, v in extra.items() if k != "method"}
    config = SamplerConfig(method=extra["method"], max_new_tokens=5, **knobs)
    want = powersample.sample(word_backend(), "x", config, seed=4, num_samples=2, chat=False)
    assert [c.text for c in sorted(resp.choices, key=lambda c: c.index)] == [r.text for r in want]


def test_seed_gives_the_same_samples_and_other_seeds_differ(toy_url):
    def texts(seed):
        resp = client(toy_url).completions.create(model="m", prompt="x", n=4, seed=seed, max_tokens=12)
        return [c.text for c in resp.choices]

    first = texts(11)
    assert texts(11) == first
    assert any(texts(s) != first for s in (12, 13, 14))
    assert len(set(first)) > 1  # n chains are independent


def test_no_seed_picks_a_random_one_and_reports_it(toy_url):
    resp = client(toy_url).completions.create(model="m", prompt="x", max_tokens=6)
    seed = resp.model_extra["power_sampling"]["seed"]
    again = client(toy_url).completions.create(model="m", prompt="x", max_tokens=6, seed=seed)
    assert again.choices[0].text == resp.choices[0].text


def test_chat_completion_with_logprobs(toy_url):
    resp = client(toy_url).chat.completions.create(
        model="m",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        n=2,
        seed=3,
        logprobs=True,
        top_logprobs=1,
        extra_body={"method": "max-swap", "mcmc_steps": 2},
    )
    assert resp.object == "chat.completion" and len(resp.choices) == 2
    for choice in resp.choices:
        assert choice.message.role == "assistant"
        pieces = [entry.token for entry in choice.logprobs.content]
        assert "".join(pieces) == choice.message.content
        for entry in choice.logprobs.content:  # top_logprobs: the likeliest token under the base model, not the drawn
            [best] = entry.top_logprobs
            assert entry.logprob <= best.logprob <= 0 and (best.token != entry.token or best.logprob == entry.logprob)
    assert resp.model_extra["power_sampling"]["method"] == "max-swap"


def test_stop_strings_cut_the_text_and_its_logprobs(toy_url):
    full = client(toy_url).completions.create(model="m", prompt="x", seed=2, max_tokens=12, logprobs=1)
    text = full.choices[0].text
    stop = next(w for w in (" sat", " on", " mat", " cat", ".") if w in text[1:])
    cut = client(toy_url).completions.create(
        model="m", prompt="x", seed=2, max_tokens=12, logprobs=1, stop=[stop, "zzz"]
    )
    choice = cut.choices[0]
    assert choice.text == text[: text.find(stop)] and choice.finish_reason == "stop"
    assert "".join(choice.logprobs.tokens) == choice.text
    assert choice.logprobs.text_offset == [
        len("".join(choice.logprobs.tokens[:i])) for i in range(len(choice.logprobs.tokens))
    ]
    assert choice.logprobs.token_logprobs == full.choices[0].logprobs.token_logprobs[: len(choice.logprobs.tokens)]


def test_finish_reason_length_and_eos(toy_url):
    resp = client(toy_url).completions.create(
        model="m", prompt="x", n=8, seed=0, max_tokens=2, extra_body={"method": "base"}
    )
    assert {c.finish_reason for c in resp.choices} == {"length"}
    spec = dict(WORDS, default=[0, 0, 0, 0, 0, 0, 0, 1.0])
    with serve(ToyBackend(ToySpec.from_dict(spec))) as url:
        resp = client(url).completions.create(model="m", prompt="x", seed=0, max_tokens=5)
        assert resp.choices[0].finish_reason == "stop" and resp.choices[0].text == "the"


def test_temperature_zero_is_greedy_for_plain_methods_and_ignored_for_power(toy_url):
    texts = {
        client(toy_url)
        .completions.create(model="m", prompt="x", seed=s, max_tokens=5, temperature=0, extra_body={"method": "base"})
        .choices[0]
        .text
        for s in range(4)
    }
    assert texts == {"thethethethethe"}  # "the" is the likeliest token everywhere
    resp = client(toy_url).completions.create(model="m", prompt="x", seed=1, max_tokens=5, temperature=0)
    assert "temperature" in resp.model_extra["power_sampling"]["ignored"]
    low = client(toy_url).completions.create(
        model="m", prompt="x", max_tokens=5, temperature=0.5, top_p=0.9, extra_body={"method": "base"}
    )
    config = low.model_extra["power_sampling"]["config"]
    assert (config["method"], config["proposal_temperature"], config["top_p"]) == ("low-temp", 0.5, 0.9)


def test_models_and_health(toy_url):
    models = client(toy_url).models.list()
    assert [m.id for m in models.data] == ["toy-words"]
    state = wait_idle(toy_url)
    assert state["status"] == "ok" and state["engine_alive"] and state["chains_in_flight"] == 0


def test_list_prompts_give_n_choices_each(toy_url):
    resp = client(toy_url).completions.create(model="m", prompt=["a", "b"], n=2, seed=4, max_tokens=6)
    assert [c.index for c in resp.choices] == [0, 1, 2, 3]
    texts = [c.text for c in resp.choices]
    assert texts[:2] == texts[2:]  # the toy model ignores the prompt, and each prompt's chains use the same seeds


def test_null_fields_take_their_defaults(toy_url):
    nulls = {"n": None, "echo": None, "stream": None, "max_tokens": None, "stop": None, "logprobs": None}
    resp = httpx.post(f"{toy_url}/v1/completions", json={"prompt": "x", **nulls})
    assert resp.status_code == 200 and len(resp.json()["choices"]) == 1


def test_unknown_fields_are_ignored_and_listed(toy_url):
    resp = httpx.post(f"{toy_url}/v1/completions", json={"prompt": "x", "max_tokens": 3, "do_sample": False})
    assert resp.status_code == 200 and resp.json()["power_sampling"]["ignored"] == ["do_sample"]


def test_what_the_served_document_allows_is_served(toy_url):
    """Bodies inside the document's ranges that the server once refused: a whole number written 2.0, a block past
    max_tokens (one block), a proposal temperature for a method that draws at tau = 1 (ignored and listed)."""
    resp = httpx.post(
        f"{toy_url}/v1/completions",
        json={"prompt": "x", "max_tokens": 4.0, "n": 2.0, "seed": 5.0, "block_size": 99, "alpha": 2},
    )
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert len(out["choices"]) == 2 and out["power_sampling"]["seed"] == 5
    assert out["power_sampling"]["config"]["block_size"] == 4 and out["power_sampling"]["config"]["alpha"] == 2.0
    resp = httpx.post(
        f"{toy_url}/v1/completions",
        json={"prompt": "x", "max_tokens": 2, "method": "power-rollout", "proposal_temperature": 0.5},
    )
    assert resp.status_code == 200 and resp.json()["power_sampling"]["ignored"] == ["proposal_temperature"]


# --- bad input: 4xx with OpenAI's error JSON, never a 5xx --------------------------------------------------------


BAD = [
    ("completions", b'{"prompt": "x",', 400, None, "invalid_json"),
    ("completions", b"[1, 2]", 400, None, None),
    ("completions", b'{"prompt": "x", "alpha": NaN}', 400, None, "invalid_json"),
    ("completions", b"\xff\xfe\x00", 400, None, "invalid_json"),
    ("completions", b"[" * 100_000 + b"]" * 100_000, 400, None, "invalid_json"),
    ("completions", b'{"prompt": "x", "alpha": Infinity}', 400, None, "invalid_json"),
    ("completions", {"prompt": "x", "alpha": True}, 400, "alpha", "invalid_type"),
    ("completions", {"prompt": None}, 400, "prompt", "missing_field"),
    ("completions", {"max_tokens": 3}, 400, "prompt", "missing_field"),
    ("completions", {"prompt": "x", "n": "2"}, 400, "n", "invalid_type"),
    ("completions", {"prompt": "x", "max_tokens": 2.5}, 400, "max_tokens", "invalid_type"),
    ("completions", {"prompt": 7}, 400, "prompt", "invalid_type"),
    ("completions", {"prompt": "x", "alpha": "4"}, 400, "alpha", "invalid_type"),
    ("completions", {"prompt": "x", "method": "magic"}, 400, "method", None),
    ("completions", {"prompt": "x", "alpha": 0}, 400, "alpha", None),
    ("completions", {"prompt": "x", "alpha": -1.5}, 400, "alpha", None),
    ("completions", {"prompt": "x", "mcmc_steps": -1}, 400, "mcmc_steps", None),
    ("completions", {"prompt": "x", "block_size": 10**6, "max_tokens": 4}, 400, "block_size", "over_limit"),
    ("completions", {"prompt": "x", "temperature": 1e-9}, 400, "temperature", None),
    ("completions", {"prompt": "x", "proposal_temperature": 0}, 400, "proposal_temperature", None),
    ("completions", {"prompt": "x", "top_p": 1.5}, 400, "top_p", None),
    ("completions", {"prompt": "x", "temperature": -1}, 400, "temperature", None),
    ("completions", {"prompt": "  "}, 400, "prompt", None),
    ("completions", {"prompt": []}, 400, "prompt", None),
    ("completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens", None),
    ("completions", {"prompt": "x", "max_tokens": 100000}, 400, "max_tokens", None),
    ("completions", {"prompt": "x", "n": 100}, 400, "n", None),
    ("completions", {"prompt": "x", "n": 0}, 400, "n", None),
    ("completions", {"prompt": "x", "seed": -3}, 400, "seed", None),
    ("completions", {"prompt": "x", "stop": ""}, 400, "stop", None),
    ("completions", {"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options", None),
    ("completions", {"prompt": "x", "stream": "yes"}, 400, "stream", "invalid_type"),
    ("completions", {"prompt": "x", "echo": True, "max_tokens": 0, "stream": True}, 400, "stream", None),
    ("completions", {"prompt": [0, 8]}, 400, "prompt", "invalid_token_id"),
    ("completions", {"prompt": [[0], []]}, 400, "prompt", None),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens", None),
    ("completions", {"prompt": "x", "logprobs": 9}, 400, "logprobs", None),
    ("chat/completions", {"messages": []}, 400, "messages", None),
    ("chat/completions", {"messages": [{"role": "user", "content": ""}]}, 400, "messages", None),
    ("chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages", None),
    ("chat/completions", {"messages": "hi"}, 400, "messages", "invalid_type"),
    (
        "chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 10**6},
        400,
        "max_completion_tokens",
        None,
    ),
]


@pytest.mark.parametrize("path, body, status, param, code", BAD)
def test_bad_input_gets_a_4xx_with_an_openai_error(toy_url, path, body, status, param, code):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    resp = httpx.post(f"{toy_url}/v1/{path}", content=content, headers={"content-type": "application/json"})
    assert resp.status_code == status
    error = resp.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"] and error["param"] == param
    if code:
        assert error["code"] == code


def test_the_body_size_limit_holds_with_and_without_content_length():
    with serve(limits=Limits(max_body_bytes=2000)) as url:
        big = json.dumps({"prompt": "x" * 5000}).encode()
        resp = httpx.post(f"{url}/v1/completions", content=big)
        assert resp.status_code == 413 and resp.json()["error"]["code"] == "body_too_large"
        streamed = httpx.post(f"{url}/v1/completions", content=iter([big[:1500], big[1500:]]))  # chunked
        assert streamed.status_code == 413
        assert httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200


def test_unknown_paths_and_methods():
    with serve() as url:
        assert httpx.get(f"{url}/v1/nothing").status_code == 404
        assert httpx.get(f"{url}/v1/nothing").json()["error"]["type"] == "not_found_error"
        assert httpx.get(f"{url}/v1/completions").status_code == 405


def test_the_api_key_is_required_on_every_endpoint():
    with serve(api_key="s3cret") as url:
        for method, path in [
            ("GET", "/openapi.json"),
            ("GET", "/v1/models"),
            ("POST", "/v1/completions"),
            ("POST", "/v1/chat/completions"),
            ("GET", "/tokenizer_info"),
            ("POST", "/tokenize"),
            ("POST", "/detokenize"),
        ]:
            for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "s3cret"}):
                resp = httpx.request(method, url + path, json={"prompt": "x"}, headers=headers)
                assert resp.status_code == 401 and resp.json()["error"]["type"] == "authentication_error"
            # /health is the one exception: a bare liveness answer without the key, the details behind it
            for headers in ({}, {"authorization": "Bearer wrong"}):
                assert httpx.get(f"{url}/health", headers=headers).json() == {"status": "ok"}
            detail = httpx.get(f"{url}/health", headers={"authorization": "Bearer s3cret"}).json()
            assert detail["status"] == "ok" and detail["engine_alive"] and "chains_in_flight" in detail
        with pytest.raises(openai.AuthenticationError):
            client(url, key="wrong").completions.create(model="m", prompt="x", max_tokens=2)
        resp = client(url, key="s3cret").completions.create(model="m", prompt="x", max_tokens=2)
        assert resp.choices[0].finish_reason in ("stop", "length")


def test_a_prompt_too_long_for_the_context_is_a_400():
    with serve(SlowToy(delay=0, context_length=8)) as url:
        resp = httpx.post(f"{url}/v1/completions", json={"prompt": "a b c", "max_tokens": 6})
        assert resp.status_code == 400 and resp.json()["error"]["code"] == "context_length_exceeded"


def test_a_request_past_max_context_is_a_400_naming_the_limit():
    with serve(SlowToy(delay=0, context_length=100), limits=Limits(max_context=8)) as url:
        resp = httpx.post(f"{url}/v1/completions", json={"prompt": "a b c", "max_tokens": 6})
        error = resp.json()["error"]
        assert resp.status_code == 400 and (error["code"], error["param"]) == ("context_length_exceeded", "prompt")
        assert "--max-context of 8 tokens" in error["message"]
        assert httpx.post(f"{url}/v1/completions", json={"prompt": "a b c", "max_tokens": 5}).status_code == 200
        chat = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "a " * 9}]})
        assert chat.status_code == 400 and chat.json()["error"]["param"] == "messages"


def test_a_full_engine_answers_429():
    with serve(limits=Limits(max_queued_chains=2)) as url:
        resp = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "n": 3})
        assert resp.status_code == 429 and resp.json()["error"]["type"] == "rate_limit_error"


def test_an_engine_failure_is_a_500_and_the_server_goes_on():
    with serve(SlowToy(delay=0, fail_on=7)) as url:
        bad = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 7, "method": "base"})
        assert bad.status_code == 500 and bad.json()["error"]["code"] == "engine_error"
        good = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 5, "method": "base"})
        assert good.status_code == 200
        assert wait_idle(url)["chains_in_flight"] == 0


# --- timeouts, disconnects, batching -----------------------------------------------------------------------------


def test_a_request_past_its_timeout_gets_504_and_frees_its_chains():
    backend = SlowToy(delay=0.01)
    with serve(backend, limits=Limits(request_timeout=0.3)) as url:
        resp = httpx.post(f"{url}/v1/completions", json=SLOW_POWER)
        assert resp.status_code == 504 and resp.json()["error"]["code"] == "timeout"
        state = wait_idle(url)
        assert state["chains_in_flight"] == 0 and state["requests_running"] == 0
        calls = len(backend.batch_sizes)
        time.sleep(0.2)
        assert len(backend.batch_sizes) == calls < 200  # stopped long before the ~600 calls of a full run


def test_a_client_that_disconnects_frees_its_chains():
    backend = SlowToy(delay=0.01)
    with serve(backend) as url:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/completions", json=SLOW_POWER, timeout=0.3)
        state = wait_idle(url)
        assert state["chains_in_flight"] == 0 and state["requests_running"] == 0
        calls = len(backend.batch_sizes)
        time.sleep(0.2)
        assert len(backend.batch_sizes) == calls < 200
        assert httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 3}).status_code == 200


def test_concurrent_requests_share_batches_and_keep_their_samples():
    backend = SlowToy(delay=0.01)
    bodies = [
        {"prompt": "x", "max_tokens": 8, "block_size": 2, "mcmc_steps": 3, "seed": s, "n": 1 + s % 2} for s in range(8)
    ]
    with serve(backend) as url:
        with ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(lambda b: httpx.post(f"{url}/v1/completions", json=b, timeout=60), bodies))
        state = wait_idle(url)
    assert all(r.status_code == 200 for r in replies)
    assert max(backend.batch_sizes) > 2 and state["peak_chains"] > 2  # requests joined each other's batches
    assert len(backend.batch_sizes) < sum(len(r.json()["choices"]) for r in replies) * 3 * 4  # far fewer calls
    for body, reply in zip(bodies, replies):
        config = replace(DEFAULTS, max_new_tokens=8, block_size=2, mcmc_steps=3)
        want = powersample.sample(word_backend(), "x", config, seed=body["seed"], num_samples=body["n"], chat=False)
        assert [c["text"] for c in reply.json()["choices"]] == [r.text for r in want]


def test_requests_with_different_proposals_all_get_served():
    backend = SlowToy(delay=0.005)
    bodies = [
        {"prompt": "x", "max_tokens": 6, "seed": s, "alpha": [2.0, 4.0, 8.0][s % 3], "mcmc_steps": 2} for s in range(9)
    ]
    with serve(backend) as url:
        with ThreadPoolExecutor(9) as pool:
            replies = list(pool.map(lambda b: httpx.post(f"{url}/v1/completions", json=b, timeout=60), bodies))
        assert wait_idle(url)["chains_in_flight"] == 0
    assert [r.status_code for r in replies] == [200] * 9
    assert [r.json()["power_sampling"]["config"]["proposal_temperature"] for r in replies[:3]] == [0.5, 0.25, 0.125]


def test_shutdown_leaves_no_engine_thread():
    before = {t.name for t in threading.enumerate()}
    with serve() as url:
        httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 3})
        assert any(t.name == "powersample-engine" for t in threading.enumerate())
    time.sleep(0.1)
    assert "powersample-engine" not in {t.name for t in threading.enumerate()} - before


# --- the embedded model -------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_embedded_model_completions_match_powersample_sample(embedded):
    backend, url = embedded
    prompt = "The capital of France is"
    resp = client(url).completions.create(
        model="smollm2",
        prompt=prompt,
        n=2,
        seed=7,
        max_tokens=12,
        extra_body={"alpha": 4.0, "mcmc_steps": 2, "block_size": 6},
    )
    config = SamplerConfig(alpha=4.0, mcmc_steps=2, block_size=6, max_new_tokens=12)
    want = powersample.sample(backend, prompt, config, seed=7, num_samples=2, chat=False)
    assert [c.text for c in resp.choices] == [r.text for r in want]
    again = client(url).completions.create(
        model="smollm2",
        prompt=prompt,
        n=2,
        seed=7,
        max_tokens=12,
        extra_body={"alpha": 4.0, "mcmc_steps": 2, "block_size": 6},
    )
    assert [c.text for c in again.choices] == [c.text for c in resp.choices]


@pytest.mark.slow
def test_embedded_model_chat_uses_the_chat_template(embedded):
    backend, url = embedded
    messages = [{"role": "user", "content": "What is 2 + 2? Answer with a number."}]
    resp = client(url).chat.completions.create(
        model="smollm2", messages=messages, seed=1, max_tokens=8, logprobs=True, extra_body={"method": "base"}
    )
    want = powersample.sample(backend, messages[0]["content"], SamplerConfig(method="base", max_new_tokens=8), seed=1)
    choice = resp.choices[0]
    assert choice.message.content == want[0].text
    assert [e.logprob for e in choice.logprobs.content] == pytest.approx(
        list(want[0].token_logp[: len(choice.logprobs.content)])
    )
    assert resp.usage.prompt_tokens == len(backend.encode(messages[0]["content"], True))
    system = [{"role": "system", "content": "You answer in French."}] + messages
    rendered = backend.decode(backend.encode_messages(system))
    assert "You answer in French." in rendered and rendered.index("French") < rendered.index("2 + 2")


@pytest.fixture(scope="module")
def hf_backend():
    pytest.importorskip("transformers")
    return powersample.load_backend("hf", threads=1)


@pytest.mark.slow
def test_hf_and_llamacpp_render_conversations_alike(hf_backend):
    pytest.importorskip("llama_cpp")
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "2+2?"},
    ]
    hf, llama = hf_backend, powersample.load_backend("llamacpp")
    assert hf.encode_messages(conversation) == llama.encode_messages(conversation)
    one = [{"role": "user", "content": "Hi"}]
    assert hf.encode_messages(one) == hf.encode("Hi", True) and llama.encode_messages(one) == llama.encode("Hi", True)


class GatedToy(SlowToy):
    """A SlowToy whose first engine call signals `entered`, then waits for `release`: jobs submitted in between
    are queued while the first one holds the engine, with no sleep deciding the order."""

    def __init__(self):
        super().__init__(delay=0.0)
        self.entered, self.release = threading.Event(), threading.Event()

    def extend(self, requests, proposal):
        if not self.entered.is_set():
            self.entered.set()
            assert self.release.wait(30), "the test never released the engine"
        return super().extend(requests, proposal)


def test_the_engine_serves_proposals_in_turn_without_starving_any():
    from powersample.samplers import Chain, programs
    from powersample.server.engine import Engine, Job

    backend, finished, all_done = GatedToy(), [], threading.Event()
    engine = Engine(backend)

    def done(name: str) -> None:
        finished.append(name)
        if len(finished) == 3:
            all_done.set()

    def job(name: str, alpha: float, steps: int) -> Job:
        config = replace(DEFAULTS, alpha=alpha, mcmc_steps=steps)
        progs = programs(backend, (), config, [Chain(np.random.default_rng(0), slot=0)])
        return Job(progs, registry.proposal(config), time.monotonic() + 60, lambda outcomes: done(name))

    engine.start()
    try:
        engine.submit(job("A", 2.0, 6))  # a long run with alpha 2's proposal
        assert backend.entered.wait(30)  # A holds the engine now
        engine.submit(job("B", 4.0, 1))  # another proposal: it must not wait behind later alpha-2 jobs
        engine.submit(job("C", 2.0, 1))
        backend.release.set()
        assert all_done.wait(30)
    finally:
        engine.close()
    assert finished == ["A", "B", "C"] and engine.chains_in_flight() == 0


# --- the command line ---------------------------------------------------------------------------------------------


def test_serve_command_line_starts_serves_and_stops(tmp_path):
    import signal
    import socket
    import subprocess
    import sys

    spec = tmp_path / "words.json"
    spec.write_text(json.dumps(WORDS))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "served.jsonl"
    cmd = [
        sys.executable,
        "-m",
        "powersample.cli",
        "serve",
        "--backend",
        "toy",
        "--toy-spec",
        str(spec),
        "--port",
        str(port),
        "--max-new-tokens",
        "6",
        "--api-key",
        "k",
        "--output",
        str(log),
        "--quiet",
    ]
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/health", headers={"authorization": "Bearer k"}).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, server.communicate()[1]
            time.sleep(0.1)
        resp = client(url, key="k").completions.create(model="words", prompt="x", n=2, seed=3)
        assert resp.model == "toy:words" and resp.model_extra["power_sampling"]["config"]["max_new_tokens"] == 6
    finally:
        server.send_signal(signal.SIGINT)
        _, err = server.communicate(timeout=30)
    assert server.returncode == 0, err
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["response_text"] for r in rows] == [c.text for c in resp.choices] and rows[0]["seed"] == 3


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--max-n", "0"], "--max-n must be >= 1"),
        (["--request-timeout", "0"], "--request-timeout must be > 0"),
        (["--max-new-tokens", "50", "--max-tokens-limit", "10"], "exceeds --max-tokens-limit"),
        (["--alpha", "0"], "alpha must be"),
        (["--port", "70000"], "--port must be"),
        (["--max-tokens-limit", "0"], "--max-tokens-limit must be >= 1, got 0"),
        (["--max-members", "0"], "--max-members must be >= 1"),
        (["--max-work", "-1"], "--max-work must be >= 1"),
        (["--max-context", "0"], "--max-context must be >= 1"),
        (["--header-timeout", "0"], "--header-timeout must be > 0"),
        (["--keep-alive-timeout", "-1"], "--keep-alive-timeout must be > 0"),
        (["--stream-keepalive", "0"], "--stream-keepalive must be > 0"),
        (["--mcmc-steps", "20", "--max-mcmc-steps", "10"], "--mcmc-steps (20) exceeds --max-mcmc-steps (10)"),
        (
            ["--method", "power-smc", "--particles", "5000"],
            "--particles gives 5000 sequences per chain, over --max-members",
        ),
        (["--alpha", "5e-324"], "alpha must be between"),
        (["--proposal-temperature", "1e-310"], "proposal_temperature must be between"),
        (["--api-key", ""], "--api-key (or $POWERSAMPLE_API_KEY) is empty"),
        (["--host", "no such host!"], "--host 'no such host!' is not an address of this machine"),
        (["--host", "192.0.2.1"], "cannot listen on 192.0.2.1:8000"),  # TEST-NET: not this machine's
    ],
)
def test_serve_rejects_bad_options_before_loading(flags, message, capsys):
    from powersample.cli import main

    assert main(["serve", "--backend", "toy", "--toy-spec", "missing.json", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_serve_on_a_busy_port_exits_2_before_loading(capsys):
    import socket

    from powersample.cli import main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--backend", "toy", "--toy-spec", "missing.json", "--port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


@pytest.mark.slow
def test_hf_backend_batches_concurrent_requests(hf_backend):
    backend = hf_backend
    bodies = [
        {
            "prompt": f"Count to {k}:",
            "max_tokens": 6,
            "block_size": 3,
            "mcmc_steps": 1,
            "seed": k,
            "n": 2,
            "logprobs": 0,
        }
        for k in range(3)
    ]
    with serve(backend) as url:
        with ThreadPoolExecutor(3) as pool:
            replies = list(pool.map(lambda b: httpx.post(f"{url}/v1/completions", json=b, timeout=120), bodies))
        state = wait_idle(url)
    assert [r.status_code for r in replies] == [200] * 3 and state["chains_in_flight"] == 0
    for reply in replies:
        for choice in reply.json()["choices"]:
            assert "".join(choice["logprobs"]["tokens"]) == choice["text"]
            assert all(lp <= 0 for lp in choice["logprobs"]["token_logprobs"])
    tokens = sum(r.json()["power_sampling"]["tokens_sampled"] for r in replies)
    assert backend.stats.decode_forwards < tokens  # chains of different requests shared forwards
