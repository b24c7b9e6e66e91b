"""A bounded load test: 200 requests, 16 at a time, on the toy backend. Zero 5xx, every response valid, nothing
left running afterwards. It prints the latencies (p50/p95) and asserts no timing.

    python -m pytest tests/test_server_load.py -s    # to see the latencies
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from powersample.backends.toy import ToyBackend, ToySpec
from powersample.config import SamplerConfig
from powersample.server.app import Settings, create_app
from powersample.server.background import background_server

REQUESTS, CONCURRENCY = 200, 16
SPEC = {
    "vocab": ["the", " cat", " sat", " on", " mat", ".", "\n", "<eos>"],
    "eos_id": 7,
    "default": [0.2, 0.15, 0.15, 0.15, 0.15, 0.1, 0.08, 0.02],
}


def body(i: int) -> tuple[str, dict]:
    """A mix: completions and chat, power, max-swap and base, n 1-3, stops, logprobs, two alphas."""
    common = {
        "max_tokens": 32,
        "seed": i,
        "n": 1 + i % 3,
        "alpha": [2.0, 4.0][i % 2],
        "mcmc_steps": 4,
        "block_size": 8,
        "method": ["power", "max-swap", "base", "power"][i % 4],
    }
    if i % 5 == 0:
        return "chat/completions", {**common, "messages": [{"role": "user", "content": f"q{i}"}], "logprobs": True}
    return "completions", {**common, "prompt": f"q{i}", "stop": [" mat"] if i % 3 == 0 else None, "logprobs": 1}


def check(path: str, request: dict, reply: dict) -> None:
    choices = reply["choices"]
    assert [c["index"] for c in choices] == list(range(request["n"]))
    for c in choices:
        text = c["message"]["content"] if path == "chat/completions" else c["text"]
        assert c["finish_reason"] in ("stop", "length") and isinstance(text, str)
        if request.get("stop"):
            assert " mat" not in text
    assert reply["power_sampling"]["seed"] == request["seed"] and reply["usage"]["completion_tokens"] >= 0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def test_200_requests_16_at_a_time():
    app = create_app(ToyBackend(ToySpec.from_dict(SPEC)), Settings(defaults=SamplerConfig(), model_name="toy"))
    latencies, statuses = [], []
    with (
        background_server(app) as url,
        httpx.Client(timeout=120, limits=httpx.Limits(max_connections=CONCURRENCY)) as http,
    ):

        def one(i: int) -> None:
            path, request = body(i)
            start = time.perf_counter()
            resp = http.post(f"{url}/v1/{path}", json=request)
            latencies.append(time.perf_counter() - start)
            statuses.append(resp.status_code)
            assert resp.status_code == 200, resp.text
            check(path, request, resp.json())

        with ThreadPoolExecutor(CONCURRENCY) as pool:
            list(pool.map(one, range(REQUESTS)))
        state = http.get(f"{url}/health").json()
    assert len(statuses) == REQUESTS and not [s for s in statuses if s >= 500]
    assert state["chains_in_flight"] == 0 and state["requests_running"] == 0 and state["requests_waiting"] == 0
    time.sleep(0.1)
    assert not [t for t in threading.enumerate() if t.name in ("powersample-engine", "powersample-http")]
    print(
        f"\n{REQUESTS} requests, {CONCURRENCY} concurrent: p50 {percentile(latencies, 0.5) * 1000:.0f} ms, "
        f"p95 {percentile(latencies, 0.95) * 1000:.0f} ms, peak chains in one batch {state['peak_chains']}"
    )
