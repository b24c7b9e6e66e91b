"""The trace stream (`stream_options.include_trace`): the chains' trace events as `: trace {json}` SSE comments,
live and before the chunks, equal to what `sample(..., trace=ChainTrace)` records for the same seed; chunks
unchanged; nothing sent unless asked; the openai SDK unaffected; bad requests 400. And GET / (the playground page):
its Content-Security-Policy, the Host guard, and the same-origin rule its POSTs need."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import time
from dataclasses import replace

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from support.server import DEFAULTS, SLOW_POWER, SlowToy, by_index, client, serve, wait_idle, word_backend

from powersample.api import ChainTrace, sample
from powersample.samplers.chain import json_ready
from powersample.server import sse

TRACE = {"stream": True, "stream_options": {"include_trace": True}}
POWER = {"method": "power", "alpha": 2.0, "mcmc_steps": 2, "block_size": 3, "max_tokens": 9}
SMC = {"method": "power-smc", "particles": 3, "block_size": 2, "max_tokens": 6}


@pytest.fixture(scope="module")
def url():
    with serve(model_name="toy-words", stream_keepalive=0.05) as base:
        yield base


def traced(resp: httpx.Response) -> tuple[list[dict], list, list[str]]:
    """The trace events, the `data:` payloads and every non-empty line, in order."""
    lines = [line for line in resp.iter_lines() if line]
    trace = [json.loads(line[len(sse.TRACE) :]) for line in lines if line.startswith(sse.TRACE)]
    data = [
        p if (p := line[len("data: ") :]) == "[DONE]" else json.loads(p) for line in lines if line.startswith("data: ")
    ]
    return trace, data, lines


def post(url: str, path: str, body: dict) -> tuple[list[dict], list, list[str]]:
    with httpx.stream("POST", f"{url}{path}", json=body, timeout=60) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        return traced(resp)


def recorded(prompt: str, extra: dict, seed: int, n: int, first: int = 0) -> list[dict]:
    """What `sample(..., trace=ChainTrace)` records for the request's chains, numbered from `first`, as JSON."""
    config = replace(
        DEFAULTS, max_new_tokens=extra["max_tokens"], **{k: v for k, v in extra.items() if k != "max_tokens"}
    )
    trace = ChainTrace(word_backend())
    sample(word_backend(), prompt, config, seed=seed, num_samples=n, chat=False, trace=trace)
    events = [{**e, "chain": e["chain"] + first} for e in trace.events]
    return json.loads(json.dumps(json_ready(events)))


@pytest.mark.parametrize("extra", [POWER, SMC], ids=["power", "power-smc"])
def test_the_trace_is_what_sample_records_and_comes_before_the_chunks(url, extra):
    prompts = ["x", "the cat"]
    trace, data, lines = post(url, "/v1/completions", {"prompt": prompts, "n": 2, "seed": 4, **extra, **TRACE})
    by_chain = lambda events: sorted(events, key=lambda e: e["chain"])  # noqa: E731 - chains interleave live
    want = recorded("x", extra, 4, 2) + recorded("the cat", extra, 4, 2, first=2)
    assert by_chain(trace) == by_chain(want)
    assert {e["event"] for e in trace} >= ({"start", "extend", "step", "end"} if extra is POWER else {"start", "smc"})
    first_data = next(i for i, line in enumerate(lines) if line.startswith("data: "))
    assert all(not line.startswith(sse.TRACE) for line in lines[first_data:])  # every event before the chunks
    ends = {e["chain"]: e["text"] for e in trace if e["event"] == "end"}
    texts = {c["index"]: c["text"] for chunk in data[:-1] for c in chunk["choices"] if c["text"]}
    assert ends == texts and data[-1] == "[DONE]"


def test_the_chunks_are_those_of_an_untraced_stream_and_nothing_is_sent_unless_asked(url):
    body = {"prompt": "x", "n": 2, "seed": 9, **POWER, "stream": True}
    plain_trace, plain, plain_lines = post(url, "/v1/completions", body)
    trace, data, _ = post(url, "/v1/completions", {**body, "stream_options": {"include_trace": True}})
    off_trace, _, _ = post(url, "/v1/completions", {**body, "stream_options": {"include_trace": False}})
    assert plain_trace == off_trace == [] and not any(line.startswith(sse.TRACE) for line in plain_lines)
    assert trace and len(data) == len(plain)

    def same(chunk):
        if chunk == "[DONE]":
            return chunk
        out = {k: v for k, v in chunk.items() if k not in ("id", "created")}
        if "power_sampling" in out:
            out["power_sampling"] = {k: v for k, v in out["power_sampling"].items() if k != "wall_seconds"}
        return out

    assert [same(c) for c in data] == [same(c) for c in plain]


def test_a_chat_request_traces_its_messages_too(url):
    messages = [{"role": "user", "content": "Hi"}]
    trace, data, _ = post(url, "/v1/chat/completions", {"messages": messages, "seed": 2, **POWER, **TRACE})
    start = trace[0]
    assert start["event"] == "start" and json.loads(start["prompt"]) == messages and start["seed"] == 2
    end = [e for e in trace if e["event"] == "end"]
    content = "".join(c["delta"].get("content") or "" for chunk in data[:-1] for c in chunk["choices"])
    assert len(end) == 1 and end[0]["text"] == content


def test_the_openai_sdk_reads_a_traced_stream_as_the_usual_chunks(url):
    args = dict(model="toy-words", prompt="x", n=2, seed=5, max_tokens=9, extra_body={**POWER})
    want = client(url).completions.create(**args)
    chunks = list(client(url).completions.create(**args, stream=True, stream_options={"include_trace": True}))
    assert all(c.object == "text_completion" for c in chunks)
    assert by_index(chunks, lambda c: c.text) == {c.index: c.text for c in want.choices}


def test_trace_events_arrive_live_while_the_chains_run():
    with serve(SlowToy(delay=0.01), stream_keepalive=5.0) as base:
        body = {**SLOW_POWER, "n": 1, "mcmc_steps": 20, "max_tokens": 6, **TRACE}
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=60) as resp:
            arrivals = [(time.monotonic(), line) for line in resp.iter_lines() if line]
    steps = [t for t, line in arrivals if line.startswith(sse.TRACE) and '"event":"step"' in line]
    first_data = next(t for t, line in arrivals if line.startswith("data: "))
    assert len(steps) == 6 * 20 and first_data - steps[0] > 0.5  # 120 steps of ~10 ms each: the first came early


def test_a_client_that_leaves_a_traced_stream_frees_its_chains():
    backend = SlowToy(delay=0.01)
    with serve(backend) as base:
        with httpx.stream("POST", f"{base}/v1/completions", json={**SLOW_POWER, **TRACE}, timeout=60) as resp:
            lines = resp.iter_lines()
            assert next(lines).startswith(sse.TRACE + '{"event":"start"')
            assert next(line for line in lines if '"event":"step"' in line)  # the chains are running
        state = wait_idle(base)
        assert state["chains_in_flight"] == 0 and state["requests_running"] == 0
        calls = len(backend.batch_sizes)
        time.sleep(0.2)
        assert len(backend.batch_sizes) == calls < 200  # stopped long before the ~600 calls of a full run


@pytest.mark.parametrize(
    "body, param, code",
    [
        ({"prompt": "x", "stream_options": {"include_trace": True}}, "stream_options", None),
        ({"prompt": "x", "stream": False, "stream_options": {"include_trace": True}}, "stream_options", None),
        ({"prompt": "x", "stream": True, "stream_options": {"include_trace": "yes"}}, "stream_options", "invalid_type"),
        ({"prompt": "x", "stream": True, "stream_options": {"include_trace": 1}}, "stream_options", "invalid_type"),
        ({"prompt": "x", **TRACE, "method": "power", "alpha": -1}, "alpha", None),
    ],
)
def test_a_bad_traced_request_is_a_400_before_any_stream(url, body, param, code):
    resp = httpx.post(f"{url}/v1/completions", json=body)
    assert resp.status_code == 400 and resp.headers["content-type"] == "application/json"
    error = resp.json()["error"]
    assert error["param"] == param and "\n" not in error["message"]
    if code:
        assert error["code"] == code


def test_non_finite_numbers_become_null():
    line = sse.trace({"event": "smc", "log_weights": [0.0, float("-inf")], "ess": float("nan")})
    assert line == b': trace {"event":"smc","log_weights":[0.0,null],"ess":null}\n\n'


# --- GET /: the playground page ------------------------------------------------------------------------------------


def test_the_page_is_served_with_a_strict_csp_matching_its_inline_code(url):
    resp = httpx.get(f"{url}/")
    assert resp.status_code == 200 and resp.headers["content-type"] == "text/html; charset=utf-8"
    page, csp = resp.text, resp.headers["content-security-policy"]
    rules = dict(rule.strip().split(" ", 1) for rule in csp.split(";"))
    assert rules["default-src"] == "'none'" and rules["connect-src"] == "'self'"
    for kind in ("script", "style"):
        (code,) = re.findall(rf"<{kind}>(.*?)</{kind}>", page, re.DOTALL)
        digest = base64.b64encode(hashlib.sha256(code.encode()).digest()).decode()
        assert rules[f"{kind}-src"] == f"'sha256-{digest}'"  # that code only: no 'unsafe-inline', no other source
    assert resp.headers["x-content-type-options"] == "nosniff"
    assert '<option value="power-smc"' in page and 'data-method="power-smc"' in page and "{{" not in page
    assert "innerHTML" not in page and "http://" not in page.replace("http://www.w3.org/2000/svg", "")


def test_the_page_is_public_but_follows_the_host_guard():
    with serve(api_key="sekret") as base:
        assert httpx.get(f"{base}/").status_code == 200  # static, holds no data
        assert httpx.get(f"{base}/v1/models").status_code == 401
        assert httpx.get(f"{base}/", headers={"host": "evil.example"}).status_code == 403


def test_the_page_may_post_from_its_own_origin_and_no_other(url):
    host = url.removeprefix("http://")
    body = {"prompt": "x", "max_tokens": 3}
    assert httpx.post(f"{url}/v1/completions", json=body, headers={"origin": url}).status_code == 200
    for origin in ("http://evil.example", f"http://{host.split(':')[0]}:1", "null"):
        assert httpx.post(f"{url}/v1/completions", json=body, headers={"origin": origin}).status_code == 403


def test_a_rebound_name_cannot_post_as_its_own_origin_to_a_server_on_every_address():
    with serve(bind_host="0.0.0.0") as base:
        rebound = {"host": "evil.example:8000", "origin": "http://evil.example:8000"}
        resp = httpx.post(f"{base}/v1/completions", json={"prompt": "x", "max_tokens": 3}, headers=rebound)
        assert resp.status_code == 403 and resp.json()["error"]["code"] == "forbidden_host"
        assert httpx.get(f"{base}/health", headers={"host": "evil.example:8000"}).status_code == 200  # as before
