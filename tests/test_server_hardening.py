"""The server under attack and careless use: work budgets, non-finite configs, cross-site requests, slow
and vanishing clients, error headers, and the cost of the per-token text pieces. Toy backend, loopback only."""

from __future__ import annotations

import json
import math
import socket
import threading

import numpy as np
import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
pytest.importorskip("hypothesis")

from hypothesis import given, settings
from hypothesis import strategies as st
from support.server import WORDS, SlowToy, serve, watched_server, word_backend

from powersample.api import SampleRecord
from powersample.backends.toy import ToyBackend, ToySpec
from powersample.config import SamplerConfig
from powersample.errors import PowerSampleError
from powersample.samplers import registry
from powersample.samplers.chain import Chain
from powersample.server import protocol as wire
from powersample.server.http import HttpLimits
from powersample.server.protocol import Limits

SOCKET_TIMEOUT = 20.0  # a failure bound for raw-socket reads: a server that never closes fails the test, not hangs it


def post(url: str, body: dict, path: str = "completions", **kw) -> httpx.Response:
    return httpx.post(f"{url}/v1/{path}", json=body, timeout=60, **kw)


def error_of(resp: httpx.Response) -> dict:
    return resp.json()["error"]


@pytest.fixture(scope="module")
def url():
    with serve(model_name="toy-words") as base:
        yield base


class Gate:
    """A toy backend whose batched calls wait for `release` (after setting `entered`): a request held in flight."""

    def __init__(self):
        self.inner, self.entered, self.release = word_backend(), threading.Event(), threading.Event()
        self.eos_ids, self.context_length = self.inner.eos_ids, None

    def encode(self, prompt, chat=True):
        return ()

    def decode(self, tokens):
        return self.inner.decode(tokens)

    def extend(self, requests, proposal):
        self.entered.set()
        self.release.wait(SOCKET_TIMEOUT)
        return self.inner.extend(requests, proposal)


# --- S4: the work of a request is budgeted, not its chain count ------------------------------------------------------


def test_the_one_request_dos_gets_a_400_before_any_member_exists(monkeypatch):
    spawned = []
    monkeypatch.setattr(Chain, "spawn_rngs", lambda self, n: spawned.append(n) or [])
    backend = SlowToy(delay=0)
    with serve(backend) as base:
        resp = post(base, {"prompt": "x", "method": "power-smc", "particles": 1_000_000, "n": 2, "max_tokens": 1})
        assert resp.status_code == 400
        assert error_of(resp)["param"] == "particles" and "4096" in error_of(resp)["message"]
        assert spawned == [] and backend.batch_sizes == []  # refused before any chain was built or run


@pytest.mark.parametrize(
    "body, param",
    [
        ({"method": "power-mtm", "tries": 11}, "tries"),
        ({"method": "power-rollout", "candidates": 4, "rollouts": 3}, "candidates"),
        ({"method": "power-smc", "particles": 6}, "particles"),
        ({"method": "power", "n": 11}, "n"),
    ],
)
def test_members_past_the_limit_name_their_field(body, param):
    with serve(limits=Limits(max_members=10)) as base:
        resp = post(base, {"prompt": "x", "n": 2, "max_tokens": 2, **body})
        assert resp.status_code == 400 and error_of(resp)["param"] == param
        assert error_of(resp)["code"] == "over_limit"
        assert (
            post(base, {"prompt": "x", "max_tokens": 2, "method": "power-smc", "particles": 5, "n": 2}).status_code
            == 200
        )


def test_members_times_max_tokens_is_budgeted():
    with serve(limits=Limits(max_work=100)) as base:
        over = post(base, {"prompt": "x", "method": "power-smc", "particles": 10, "max_tokens": 11})
        assert over.status_code == 400 and error_of(over)["param"] == "particles"
        assert "110" in error_of(over)["message"]
        long = post(base, {"prompt": "x", "max_tokens": 101})
        assert long.status_code == 400 and error_of(long)["param"] == "max_tokens"
        assert post(base, {"prompt": "x", "method": "power-smc", "particles": 10, "max_tokens": 10}).status_code == 200


def test_mcmc_steps_has_a_limit():
    with serve(limits=Limits(max_mcmc_steps=5)) as base:
        resp = post(base, {"prompt": "x", "mcmc_steps": 6, "max_tokens": 2})
        assert resp.status_code == 400 and error_of(resp)["param"] == "mcmc_steps"
        assert post(base, {"prompt": "x", "mcmc_steps": 5, "max_tokens": 2}).status_code == 200


def test_the_work_in_flight_is_budgeted_and_a_429_says_when_to_retry():
    backend = Gate()
    with serve(backend, limits=Limits(max_queued_work=40, retry_after=3)) as base:
        with httpx.Client(timeout=60) as http:
            first = threading.Thread(
                target=http.post,
                args=(f"{base}/v1/completions",),
                kwargs={"json": {"prompt": "x", "max_tokens": 12, "n": 3}},
            )
            first.start()
            assert backend.entered.wait(SOCKET_TIMEOUT)  # 36 of the 40 in flight
            busy = post(base, {"prompt": "x", "max_tokens": 5})
            backend.release.set()
            first.join(SOCKET_TIMEOUT)
        assert busy.status_code == 429 and busy.headers["retry-after"] == "3"
        assert error_of(busy)["type"] == "rate_limit_error"
        assert post(base, {"prompt": "x", "max_tokens": 5}).status_code == 200  # the budget is given back


def test_a_full_engine_429_carries_retry_after():
    with serve(limits=Limits(max_queued_chains=2)) as base:
        resp = post(base, {"prompt": "x", "n": 3})
        assert resp.status_code == 429 and resp.headers["retry-after"] == "1"


# --- S1, S2, S3, S12: configs with non-finite derived values, huge counts, an empty method --------------------------


@pytest.mark.parametrize(
    "field, value",
    [
        ("alpha", 5e-324),
        ("alpha", 1e-310),
        ("alpha", 1e300),
        ("proposal_temperature", 5e-324),
        ("proposal_temperature", 1e-310),
        ("proposal_temperature", 1e300),
    ],
)
def test_scales_whose_reciprocal_overflows_are_400s(url, field, value):
    for method in ("power", "power-smc", "low-temp"):
        resp = post(url, {"prompt": "x", "max_tokens": 3, "method": method, field: value})
        assert resp.status_code == 400 and error_of(resp)["param"] == field, resp.text


@pytest.mark.parametrize(
    "field",
    [
        "tries",
        "particles",
        "candidates",
        "rollouts",
        "mcmc_steps",
        "top_k",
        "block_count",
        "alpha_ramp",
        "rollout_horizon",
    ],
)
@pytest.mark.parametrize("value", [2**63, 2**64 + 1, 10**30])
def test_counts_past_int64_are_400s(url, field, value):
    method = {
        "tries": "power-mtm",
        "particles": "power-smc",
        "candidates": "power-rollout",
        "rollouts": "power-rollout",
        "alpha_ramp": "power-smc",
        "rollout_horizon": "power-rollout",
    }
    resp = post(url, {"prompt": "x", "max_tokens": 3, "method": method.get(field, "power"), field: value})
    assert resp.status_code == 400 and error_of(resp)["param"] == field, resp.text


@pytest.mark.parametrize(
    "extra",
    [
        {"alpha": 1e6},
        {"alpha": 1e-6},
        {"proposal_temperature": 1e-6},
        {"proposal_temperature": 1e6},
        {"alpha": 1e6, "alpha_ramp": 3},
    ],
)
def test_power_smc_at_the_edges_of_the_scales_has_finite_weights(url, extra):
    resp = post(
        url, {"prompt": "x", "max_tokens": 6, "method": "power-smc", "particles": 8, "block_size": 1, "n": 2, **extra}
    )
    assert resp.status_code == 200, resp.text
    assert all(math.isfinite(c["logp"]) for c in resp.json()["power_sampling"]["chains"])


def test_an_empty_method_is_unknown(url):
    resp = post(url, {"prompt": "x", "method": ""})
    assert resp.status_code == 400 and error_of(resp)["param"] == "method"


@settings(max_examples=300, deadline=None)
@given(
    alpha=st.floats(allow_nan=True, allow_infinity=True),
    tau=st.none() | st.floats(),
    method=st.sampled_from(["power", "power-smc", "low-temp", "base", "max-swap"]),
)
def test_every_config_that_constructs_has_finite_json_values(alpha, tau, method):
    try:
        config = SamplerConfig(method=method, alpha=alpha, proposal_temperature=tau)
    except PowerSampleError:
        return
    json.dumps(registry.resolved(config), allow_nan=False)  # raises on Infinity / NaN
    assert math.isfinite(1 / registry.temperature(config)) and math.isfinite(config.alpha * -1e4)


# --- S9: cross-site requests --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data", None]
)
def test_a_body_that_is_not_json_typed_gets_415(url, content_type):
    headers = {"content-type": content_type} if content_type else {}
    resp = httpx.post(f"{url}/v1/completions", content=b'{"prompt": "x", "max_tokens": 2}', headers=headers)
    assert resp.status_code == 415 and error_of(resp)["code"] == "unsupported_media_type"
    typed = {"content-type": "application/json; charset=utf-8"}
    assert (
        httpx.post(f"{url}/v1/completions", content=b'{"prompt": "x", "max_tokens": 2}', headers=typed).status_code
        == 200
    )


@pytest.mark.parametrize(
    "host, status",
    [
        ("evil.example", 403),
        ("evil.example:8000", 403),
        ("127.0.0.1.nip.io", 403),
        ("localhost", 200),
        ("localhost:1234", 200),
        ("127.0.0.1", 200),
        ("[::1]:80", 200),
        ("api.localhost", 200),
        ("127.9.9.9", 200),
    ],
)
def test_the_host_must_be_this_server(url, host, status):
    resp = post(url, {"prompt": "x", "max_tokens": 2}, headers={"host": host})
    assert resp.status_code == status
    if status == 403:
        assert error_of(resp)["code"] == "forbidden_host" and "--allowed-host" in error_of(resp)["message"]
        assert httpx.get(f"{url}/health", headers={"host": host}).status_code == 403


def test_allowed_hosts_and_a_wildcard_bind():
    with serve(allowed_hosts=("models.lan",)) as base:
        assert post(base, {"prompt": "x", "max_tokens": 2}, headers={"host": "models.lan:8000"}).status_code == 200
        assert post(base, {"prompt": "x", "max_tokens": 2}, headers={"host": "other.lan"}).status_code == 403
    with serve(bind_host="0.0.0.0") as base:
        assert post(base, {"prompt": "x", "max_tokens": 2}, headers={"host": "any.name"}).status_code == 200


def test_cors_is_off_by_default_and_one_origin_can_be_allowed(url):
    page = {"origin": "https://evil.example"}
    resp = post(url, {"prompt": "x", "max_tokens": 2}, headers=page)
    assert resp.status_code == 403 and "access-control-allow-origin" not in resp.headers
    with serve(cors_origin="http://localhost:3000") as base:
        ok = {"origin": "http://localhost:3000"}
        preflight = httpx.options(
            f"{base}/v1/completions",
            headers={**ok, "access-control-request-method": "POST", "access-control-request-headers": "content-type"},
        )
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "http://localhost:3000"
        resp = post(base, {"prompt": "x", "max_tokens": 2}, headers=ok)
        assert resp.status_code == 200 and resp.headers["access-control-allow-origin"] == "http://localhost:3000"
        assert post(base, {"prompt": "x", "max_tokens": 2}, headers=page).status_code == 403


# --- S7: 405 with Allow ---------------------------------------------------------------------------------------------


def test_a_wrong_method_gets_405_with_allow(url):
    resp = httpx.get(f"{url}/v1/completions")
    assert resp.status_code == 405 and resp.headers["allow"] == "POST"
    assert httpx.post(f"{url}/v1/models", json={}).headers["allow"] == "GET"


# --- S5, S6: clients that vanish mid-body, and slow ones ------------------------------------------------------------


def connect(base: str) -> socket.socket:
    host, port = base.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=SOCKET_TIMEOUT)
    return sock


def read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (a socket timeout fails the test)."""
    out = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return out
        if not chunk:
            return out
        out += chunk


HEAD = b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"


def test_a_client_that_leaves_mid_body_leaves_no_traceback():
    with watched_server() as (base, finished, escaped, logged):
        for _ in range(3):
            sock = connect(base)
            sock.sendall(HEAD + b"Content-Length: 1000\r\n\r\n" + b'{"prompt": "x", ')
            sock.close()
        for _ in range(3):
            assert finished.acquire(timeout=SOCKET_TIMEOUT)
        assert post(base, {"prompt": "x", "max_tokens": 2}).status_code == 200
        assert escaped == [] and logged == []


def test_slow_headers_and_bodies_are_cut_off():
    http = HttpLimits(header_timeout=2.0, body_timeout=0.5)  # the headers below follow their connect at once
    with watched_server(http, body_timeout=0.5) as (base, finished, escaped, logged):
        silent = [connect(base) for _ in range(10)]  # slowloris: connect, then nothing
        partial = [connect(base) for _ in range(10)]  # or half the headers
        for sock in partial:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        for sock in silent + partial:
            assert read_all(sock) == b""  # closed by the server
            sock.close()
        body = connect(base)  # headers, then a body that never arrives: 408
        body.sendall(HEAD + b"Content-Length: 100\r\n\r\n{")
        assert read_all(body).startswith(b"HTTP/1.1 408 ")
        unread = connect(base)  # a body the app never reads (404), trickled: the socket is still closed
        unread.sendall(b"POST /nowhere HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n\r\n{")
        assert read_all(unread).startswith(b"HTTP/1.1 404 ")
        assert post(base, {"prompt": "x", "max_tokens": 2}).status_code == 200
        assert escaped == [] and logged == []


# --- S11: per-token pieces are linear and stop with the request ----------------------------------------------------


def record_of(tokens: tuple[int, ...], text: str) -> SampleRecord:
    return SampleRecord(
        prompt="x",
        text=text,
        tokens=tokens,
        token_logp=(-1.0,) * len(tokens),
        logp=-len(tokens),
        finish_reason="length",
        tokens_generated=len(tokens),
        proposals=0,
        accepted=0,
        wall_seconds=0.0,
        method="base",
        seed=0,
        sample_index=0,
        config={},
    )


def test_token_pieces_decode_linearly_and_match_the_prefix_growth():
    backend = word_backend()
    tokens = tuple(int(t) for t in np.random.default_rng(0).integers(0, 7, size=4096))
    decoded = []

    def decode(ids):
        decoded.append(len(ids))
        return backend.decode(ids)

    out = wire.finish(decode, record_of(tokens, backend.decode(tokens)), [], True)
    assert "".join(out.pieces) == out.text and len(out.pieces) == len(tokens)
    assert list(out.pieces[:50]) == [backend.decode(tokens[i : i + 1]) for i in range(50)]
    assert out.offsets == tuple(len("".join(out.pieces[:i])) for i in range(len(tokens)))
    assert len(decoded) <= 2 * len(tokens) and sum(decoded) <= 20 * len(tokens)  # a prefix per token: T^2 / 2


def test_token_pieces_stop_when_asked():
    calls = []

    def check():
        calls.append(1)
        if len(calls) > 5:
            raise RuntimeError("stopped")

    backend = word_backend()
    with pytest.raises(RuntimeError):
        wire.finish(backend.decode, record_of((0,) * 100, backend.decode((0,) * 100)), [], True, check)
    assert len(calls) == 6


class SlowDecode(SlowToy):
    """Decoding a prefix (a token's piece) waits for `release`: the pieces outlast the request's deadline."""

    def __init__(self):
        super().__init__(delay=0)
        self.entered, self.release = threading.Event(), threading.Event()

    def decode(self, tokens):
        if 0 < len(tokens) < 3:  # a piece's window, never a whole sample here (max_tokens 12, no EOS early)
            self.entered.set()
            self.release.wait(SOCKET_TIMEOUT)
        return self.inner.decode(tokens)


def test_token_pieces_run_inside_the_request_timeout():
    backend = SlowDecode()
    spec = dict(WORDS, default=[0.2, 0.2, 0.2, 0.2, 0.2, 0, 0, 0], next={})  # no EOS: every sample is 12 tokens
    backend.inner = ToyBackend(ToySpec.from_dict(spec))
    with serve(backend, limits=Limits(request_timeout=3.0)) as base:
        resp = post(base, {"prompt": "x", "max_tokens": 12, "logprobs": 0, "method": "base"})
        backend.release.set()
    assert backend.entered.is_set() and resp.status_code == 504, resp.text


# --- the served OpenAPI document ---------------------------------------------------------------------------------


def test_the_served_document_describes_the_real_bodies_and_limits():
    with serve(limits=Limits(max_tokens=99, max_n=7)) as base:
        doc = httpx.get(f"{base}/openapi.json").json()
    schemas = doc["components"]["schemas"]
    body = schemas["CompletionBody"]["properties"]
    assert {"prompt", "alpha", "method", "mcmc_steps", "particles", "tries", "candidates", "rollouts"} <= set(body)
    assert {"messages", "max_completion_tokens", "top_logprobs"} <= set(schemas["ChatBody"]["properties"])
    ints = {
        name: next(b for b in body[name].get("anyOf", [body[name]]) if b.get("type") == "integer")
        for name in ("max_tokens", "n")
    }
    assert ints["max_tokens"]["maximum"] == 99 and ints["n"]["maximum"] == 7
    post_op = doc["paths"]["/v1/completions"]["post"]
    assert post_op["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/CompletionBody")
    ok = post_op["responses"]["200"]["content"]["application/json"]["schema"]
    assert (
        ok["$ref"].endswith("/CompletionResponse") and "power_sampling" in schemas["CompletionResponse"]["properties"]
    )
    assert {"400", "413", "415", "429", "504"} <= set(post_op["responses"])
    assert "/openapi.json" not in doc["paths"]
