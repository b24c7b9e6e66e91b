"""`stream: true`: OpenAI's server-sent events on both endpoints (the openai SDK and raw httpx), keep-alives while
the chains run, errors before and after the stream starts, disconnects, and streamed text equal to the
non-streamed text for the same seed."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import replace

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from support.server import SLOW_POWER, SlowToy, by_index, client, events, serve, wait_idle, word_backend

from powersample.backends.toy import ToyBackend
from powersample.server import schema
from powersample.server.protocol import Limits

CHAT = [{"role": "user", "content": "Hi"}]
POWER = {"method": "power", "alpha": 2.0, "mcmc_steps": 2, "block_size": 3}
METHODS = [POWER, {"method": "base"}, {"method": "power-smc", "particles": 3, "block_size": 2}, {"method": "bon"}]


@pytest.fixture(scope="module")
def toy_url():
    with serve(model_name="toy-words", stream_keepalive=0.05) as url:
        yield url


def last_choice_chunks(chunks) -> dict[int, object]:
    last = {}
    for chunk in chunks:
        for choice in chunk.choices:
            last[choice.index] = (chunk, choice)
    return last


# --- the openai SDK ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra", METHODS, ids=lambda e: e["method"])
def test_streamed_completions_equal_the_non_streamed_ones(toy_url, extra):
    args = dict(model="toy-words", prompt="x", n=2, seed=5, max_tokens=9, extra_body=extra)
    want = client(toy_url).completions.create(**args)
    chunks = list(client(toy_url).completions.create(**args, stream=True, stream_options={"include_usage": True}))
    assert by_index(chunks, lambda c: c.text) == {c.index: c.text for c in want.choices}
    assert len({(c.id, c.created, c.model) for c in chunks}) == 1 and chunks[0].model == "toy-words"
    assert all(c.object == "text_completion" for c in chunks)
    last = last_choice_chunks(chunks)
    assert {i: ch.finish_reason for i, (_, ch) in last.items()} == {c.index: c.finish_reason for c in want.choices}
    ps = chunks[-2].model_extra["power_sampling"]  # the last choice chunk, before the usage chunk
    assert ps["method"] == extra["method"] and ps["seed"] == 5
    assert {k: ps[k] for k in ("proposals", "accepted", "tokens_sampled", "chains")} == {
        k: want.model_extra["power_sampling"][k] for k in ("proposals", "accepted", "tokens_sampled", "chains")
    }
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == want.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])


@pytest.mark.parametrize("extra", [POWER, {"method": "base"}], ids=lambda e: e["method"])
def test_streamed_chat_equals_the_non_streamed_chat(toy_url, extra):
    args = dict(model="m", messages=CHAT, n=2, seed=3, max_tokens=10, logprobs=True, top_logprobs=1, extra_body=extra)
    want = client(toy_url).chat.completions.create(**args)
    chunks = list(client(toy_url).chat.completions.create(**args, stream=True))
    assert all(c.object == "chat.completion.chunk" and c.usage is None for c in chunks)  # no usage unless asked
    assert by_index(chunks, lambda c: c.delta.content) == {c.index: c.message.content for c in want.choices}
    firsts = {}
    for chunk in chunks:
        for choice in chunk.choices:
            firsts.setdefault(choice.index, choice)
    assert sorted(firsts) == [0, 1] and all(f.delta.role == "assistant" for f in firsts.values())
    last = last_choice_chunks(chunks)
    assert {i: ch.finish_reason for i, (_, ch) in last.items()} == {c.index: c.finish_reason for c in want.choices}
    assert chunks[-1].model_extra["power_sampling"]["method"] == extra["method"]
    streamed = [ch.logprobs for c in chunks for ch in c.choices if ch.index == 0 and ch.logprobs]
    assert [e.logprob for lp in streamed for e in lp.content] == [e.logprob for e in want.choices[0].logprobs.content]


def test_stop_strings_cut_the_streamed_text_as_the_non_streamed(toy_url):
    full = client(toy_url).completions.create(model="m", prompt="x", seed=2, max_tokens=12).choices[0].text
    stop = next(w for w in (" sat", " on", " mat", " cat", ".") if w in full[1:])
    args = dict(model="m", prompt="x", seed=2, max_tokens=12, stop=[stop])
    want = client(toy_url).completions.create(**args).choices[0]
    chunks = list(client(toy_url).completions.create(**args, stream=True))
    assert by_index(chunks, lambda c: c.text) == {0: want.text} and want.text == full[: full.find(stop)]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_every_chunk_fits_the_served_document(toy_url):
    for path, model, body in [
        ("completions", schema.CompletionChunk, {"prompt": "x", "logprobs": 1}),
        ("chat/completions", schema.ChatChunk, {"messages": CHAT, "logprobs": True}),
    ]:
        body = {**body, "stream": True, "stream_options": {"include_usage": True}, "n": 2, "max_tokens": 5}
        with httpx.stream("POST", f"{toy_url}/v1/{path}", json=body, timeout=60) as resp:
            assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
            _, data = events(resp)
        assert data[-1] == "[DONE]" and len(data) > 3
        for chunk in data[:-1]:
            model.model_validate(chunk)


# --- base and low-temp: the text as it is drawn -----------------------------------------------------------------


class Gated(ToyBackend):
    """A toy whose chains pause after their `after`-th token until the test opens the gate (or 20 s pass): a stream
    that sends text only at the end can then not show any before the gate opens."""

    def __init__(self, after: int = 3):
        super().__init__(word_backend().spec)
        self.after, self.gate, self.waited = after, threading.Event(), []

    def extend(self, requests, proposal):
        paused = [replace(r, report=replace(r.report, on_draw=self._pausing(r.report.on_draw))) for r in requests]
        return super().extend(paused, proposal)

    def _pausing(self, report):
        count = [0]

        def on_draw(tokens):
            if report is not None:
                report(tokens)
            count[0] += len(tokens)
            if count[0] == self.after:
                self.waited.append(self.gate.wait(20))

        return on_draw


def live_text_arrives_before_the_chain_ends(path: str, body: dict) -> tuple[list, Gated, dict]:
    """The stream's data payloads (the gate opens once the first non-empty text has arrived), the backend, and the
    non-streamed response."""
    backend = Gated()
    with serve(backend) as url:
        with httpx.stream("POST", f"{url}/v1/{path}", json={**body, "stream": True}, timeout=60) as resp:
            data = []
            for line in resp.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    data.append(json.loads(line[len("data: ") :]))
                    choice = (data[-1]["choices"] or [{}])[0]
                    if choice.get("text") or (choice.get("delta") or {}).get("content"):
                        backend.gate.set()
        plain = {k: v for k, v in body.items() if k != "stream_options"}
        want = httpx.post(f"{url}/v1/{path}", json=plain, timeout=60).json()  # the gate is open by now
    return data, backend, want


@pytest.mark.parametrize("method", ["base", "low-temp"])
@pytest.mark.parametrize("path", ["completions", "chat/completions"])
def test_plain_methods_stream_their_text_as_it_is_drawn(path, method):
    body = {
        "max_tokens": 12,
        "n": 2,
        "seed": 4,
        "method": method,
        "stop": [" mat"],
        "stream_options": {"include_usage": True},
        **({"prompt": "x"} if path == "completions" else {"messages": CHAT}),
    }
    data, backend, want = live_text_arrives_before_the_chain_ends(path, body)
    assert backend.waited and all(backend.waited)  # every chain paused mid-way, and the client's text opened it
    chat = path.startswith("chat")
    texts = {}
    for chunk in data[:-1]:
        for c in chunk["choices"]:
            texts[c["index"]] = texts.get(c["index"], "") + ((c["delta"].get("content") or "") if chat else c["text"])
    final = {c["index"]: c["message"]["content"] if chat else c["text"] for c in want["choices"]}
    assert texts == final
    model = schema.ChatChunk if chat else schema.CompletionChunk
    for chunk in data[:-1]:
        model.model_validate(chunk)
        assert chunk["usage"] is None
    assert data[-1]["usage"] == want["usage"] and data[-2]["power_sampling"]["method"] == method
    if chat:  # each choice's role comes once, first
        roles = [c["index"] for chunk in data for c in chunk["choices"] if "role" in c["delta"]]
        assert sorted(roles) == [0, 1] and data[0]["choices"][0]["delta"]["role"] == "assistant"
    finishes = {c["index"]: c["finish_reason"] for chunk in data for c in chunk["choices"] if c["finish_reason"]}
    assert finishes == {c["index"]: c["finish_reason"] for c in want["choices"]}


def test_an_echoed_plain_stream_is_the_echoed_text(toy_url):
    args = dict(model="m", prompt="the cat", seed=6, max_tokens=8, echo=True, extra_body={"method": "base"})
    want = client(toy_url).completions.create(**args).choices[0].text
    chunks = list(client(toy_url).completions.create(**args, stream=True))
    assert by_index(chunks, lambda c: c.text) == {0: want} and want.startswith("the cat")


def test_plain_methods_with_logprobs_send_their_text_at_the_end():
    body = {"prompt": "x", "max_tokens": 12, "seed": 4, "method": "base", "logprobs": 1}
    backend = Gated()
    backend.gate.set()  # nothing to wait for
    with serve(backend) as url:
        with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=60) as resp:
            _, data = events(resp)
    texts = [c["text"] for chunk in data[:-1] for c in chunk["choices"] if c["text"]]
    assert len(texts) == 1 and data[0]["choices"][0]["logprobs"]["tokens"]  # one chunk: the text with its log-probs


# --- keep-alives, errors and disconnects -------------------------------------------------------------------------


def test_keep_alives_arrive_while_a_slow_chain_runs():
    with serve(SlowToy(delay=0.01), stream_keepalive=0.05) as url:
        with httpx.stream(
            "POST", f"{url}/v1/completions", json={**SLOW_POWER, "n": 1, "mcmc_steps": 20, "stream": True}, timeout=60
        ) as resp:
            assert resp.status_code == 200
            lines = [line for line in resp.iter_lines() if line]
    first_data = next(i for i, line in enumerate(lines) if line.startswith("data: "))
    assert first_data >= 3 and all(line == ": keep-alive" for line in lines[:first_data])
    assert lines[-1] == "data: [DONE]" and not any(line.startswith(":") for line in lines[first_data:])


@pytest.mark.parametrize(
    "body, param, code",
    [
        ({"prompt": "x", "stream": True, "n": 0}, "n", None),
        ({"prompt": "x", "stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options", "invalid_type"),
        ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options", None),
        ({"prompt": "x", "stream": True, "method": "magic"}, "method", None),
        ({"prompt": " ", "stream": True}, "prompt", None),
    ],
)
def test_a_bad_streamed_request_gets_a_json_error_before_any_stream(toy_url, body, param, code):
    resp = httpx.post(f"{toy_url}/v1/completions", json=body)
    assert resp.status_code == 400 and resp.headers["content-type"] == "application/json"
    error = resp.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    if code:
        assert error["code"] == code


def test_a_full_engine_is_a_429_before_any_stream():
    with serve(limits=Limits(max_queued_chains=2)) as url:
        resp = httpx.post(f"{url}/v1/chat/completions", json={"messages": CHAT, "n": 3, "stream": True})
        assert resp.status_code == 429 and resp.json()["error"]["type"] == "rate_limit_error"


def test_a_failure_after_the_stream_started_is_one_error_event():
    with serve(SlowToy(delay=0, fail_on=7), stream_keepalive=0.05) as url:
        body = {"prompt": "x", "max_tokens": 7, "method": "base", "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as resp:
            assert resp.status_code == 200
            _, data = events(resp)
        assert len(data) == 1 and data[0]["error"]["code"] == "engine_error" and "Traceback" not in json.dumps(data)
        with pytest.raises(openai.APIError, match="engine exploded"):
            list(
                client(url).completions.create(
                    model="m", prompt="x", max_tokens=7, stream=True, extra_body={"method": "base"}
                )
            )
        assert httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 5}).status_code == 200


def test_a_streamed_request_past_its_timeout_ends_with_a_timeout_event_and_frees_its_chains():
    backend = SlowToy(delay=0.01)
    with serve(backend, limits=Limits(request_timeout=0.3), stream_keepalive=0.05) as url:
        with httpx.stream("POST", f"{url}/v1/completions", json={**SLOW_POWER, "stream": True}, timeout=60) as resp:
            comments, data = events(resp)
        assert comments and len(data) == 1 and data[0]["error"]["code"] == "timeout"
        assert wait_idle(url)["chains_in_flight"] == 0
        calls = len(backend.batch_sizes)
        time.sleep(0.2)
        assert len(backend.batch_sizes) == calls < 200


def test_a_client_that_leaves_a_stream_frees_its_chains():
    backend = SlowToy(delay=0.01)
    with serve(backend, stream_keepalive=0.05) as url:
        with httpx.stream("POST", f"{url}/v1/completions", json={**SLOW_POWER, "stream": True}, timeout=60) as resp:
            lines = resp.iter_lines()  # kept: a dropped iterator closes the connection when collected
            assert next(lines) == ": keep-alive"
            assert health_chains(url) == 2  # the chains are running
        # leaving the block closes the connection mid-stream
        state = wait_idle(url)
        assert state["chains_in_flight"] == 0 and state["requests_running"] == 0
        calls = len(backend.batch_sizes)
        time.sleep(0.2)
        assert len(backend.batch_sizes) == calls < 200  # stopped long before the ~600 calls of a full run
        assert httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 3}).status_code == 200


def health_chains(url: str) -> int:
    return httpx.get(f"{url}/health").json()["chains_in_flight"]


# --- the embedded model -------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_embedded_model_streams_the_non_streamed_text(embedded):
    _, url = embedded
    for extra in ({"alpha": 4.0, "mcmc_steps": 2, "block_size": 6}, {"method": "base"}):
        args = dict(
            model="smollm2",
            messages=[{"role": "user", "content": "Name a colour."}],
            n=2,
            seed=7,
            max_tokens=12,
            stop=["\n"],
            extra_body=extra,
        )
        want = client(url).chat.completions.create(**args)
        chunks = list(client(url).chat.completions.create(**args, stream=True))
        assert by_index(chunks, lambda c: c.delta.content) == {c.index: c.message.content for c in want.choices}
