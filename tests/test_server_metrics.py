"""GET /metrics: the counters move by exactly what known requests did, the gauges follow the engine, the API-key
rule both ways, per-app registries, and a 501 without prometheus-client."""

from __future__ import annotations

import sys
import threading
import time

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families
from support.server import SlowToy, serve

KEY = {"Authorization": "Bearer sekrit"}


def scrape(url: str, headers: dict | None = None) -> dict:
    """{(sample name, sorted label pairs): value} of one scrape."""
    resp = httpx.get(f"{url}/metrics", headers=headers)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/plain; version=")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(resp.text)
        for s in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def moved(before: dict, after: dict, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def complete(url: str, headers: dict | None = None, **fields) -> httpx.Response:
    body = {"model": "toy", "prompt": "x", **fields}
    return httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=60)


def test_power_completions_move_the_counters_by_what_their_responses_report():
    with serve() as url:
        before = scrape(url)
        replies = [complete(url, seed=s, n=2, max_tokens=9, method="power", mcmc_steps=2).json() for s in (3, 4)]
        after = scrape(url)
    ps = [r["power_sampling"] for r in replies]
    assert moved(before, after, "powersample_requests_total", endpoint="/v1/completions", status="200") == 2
    assert moved(before, after, "powersample_request_latency_seconds_count", endpoint="/v1/completions") == 2
    assert moved(before, after, "powersample_tokens_sampled_total", method="power") == sum(
        p["tokens_sampled"] for p in ps
    )
    kept = sum(r["usage"]["completion_tokens"] for r in replies)
    assert kept > 0 and moved(before, after, "powersample_tokens_kept_total", method="power") == kept
    assert moved(before, after, "powersample_proposals_total", method="power") == sum(p["proposals"] for p in ps) > 0
    assert moved(before, after, "powersample_accepted_total", method="power") == sum(p["accepted"] for p in ps)
    assert sum(p["tokens_sampled"] for p in ps) >= kept


def test_a_streamed_completion_counts_like_a_plain_one():
    """The same request streamed and not: the counters move alike (the stream's samples are counted once)."""
    fields = {"seed": 5, "n": 2, "max_tokens": 9, "method": "power", "mcmc_steps": 2}
    with serve() as url:
        start = scrape(url)
        plain = complete(url, **fields).json()
        middle = scrape(url)
        with httpx.stream(
            "POST", f"{url}/v1/completions", json={"model": "toy", "prompt": "x", "stream": True, **fields}, timeout=60
        ) as resp:
            assert resp.status_code == 200 and resp.read().endswith(b"data: [DONE]\n\n")
        end = scrape(url)
    for name in (
        "powersample_tokens_sampled_total",
        "powersample_tokens_kept_total",
        "powersample_proposals_total",
        "powersample_accepted_total",
    ):
        assert moved(start, middle, name, method="power") == moved(middle, end, name, method="power") > 0, name
    assert (
        moved(middle, end, "powersample_tokens_sampled_total", method="power")
        == plain["power_sampling"]["tokens_sampled"]
    )
    assert moved(middle, end, "powersample_requests_total", endpoint="/v1/completions", status="200") == 1


def test_a_chat_completion_counts_under_its_endpoint_and_method():
    with serve() as url:
        body = {
            "model": "toy",
            "messages": [{"role": "user", "content": "x"}],
            "n": 2,
            "seed": 7,
            "max_tokens": 6,
            "method": "power-mtm",
            "tries": 2,
        }
        reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).json()
        after = scrape(url)
    ps = reply["power_sampling"]
    assert value(after, "powersample_requests_total", endpoint="/v1/chat/completions", status="200") == 1
    assert value(after, "powersample_tokens_sampled_total", method="power-mtm") == ps["tokens_sampled"] > 0
    assert value(after, "powersample_tokens_kept_total", method="power-mtm") == reply["usage"]["completion_tokens"]
    assert value(after, "powersample_proposals_total", method="power-mtm") == ps["proposals"]
    assert value(after, "powersample_accepted_total", method="power-mtm") == ps["accepted"]


def test_every_response_counts_errors_included_and_its_latency_too():
    with serve() as url:
        before = scrape(url)
        assert complete(url, n=0).status_code == 400
        assert (
            httpx.post(f"{url}/v1/completions", content=b"{", headers={"content-type": "application/json"}).status_code
            == 400
        )
        assert httpx.get(f"{url}/v1/nothing").status_code == 404
        assert httpx.get(f"{url}/some/{'x' * 50}").status_code == 404
        assert httpx.get(f"{url}/v1/completions").status_code == 405
        assert httpx.post(f"{url}/v1/chat/completions", content=b"x" * 2_000_000).status_code == 413
        assert httpx.get(f"{url}/health", headers={"host": "evil.example"}).status_code == 403
        assert httpx.get(f"{url}/v1/models").status_code == 200
        after = scrape(url)
    want = {
        ("/v1/completions", "400"): 2,
        ("other", "404"): 2,
        ("/v1/completions", "405"): 1,
        ("/v1/chat/completions", "413"): 1,
        ("/health", "403"): 1,
        ("/v1/models", "200"): 1,
    }
    for (endpoint, status), count in want.items():
        assert moved(before, after, "powersample_requests_total", endpoint=endpoint, status=status) == count
    for endpoint in ("/v1/completions", "other", "/v1/chat/completions", "/health", "/v1/models"):
        total = sum(c for (e, _), c in want.items() if e == endpoint)
        assert moved(before, after, "powersample_request_latency_seconds_count", endpoint=endpoint) == total
    endpoints = {dict(labels).get("endpoint") for name, labels in after if name == "powersample_requests_total"}
    assert endpoints <= {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics", "other"}
    assert value(after, "powersample_tokens_sampled_total", method="power") == 0  # no samples were returned


def test_metrics_needs_the_api_key_like_v1_and_a_401_counts():
    with serve(api_key="sekrit") as url:
        refused = httpx.get(f"{url}/metrics")
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{url}/v1/models").status_code == 401
        after = scrape(url, KEY)
    assert value(after, "powersample_requests_total", endpoint="/metrics", status="401") == 1
    assert value(after, "powersample_requests_total", endpoint="/v1/models", status="401") == 1


def test_metrics_public_serves_it_without_the_key_and_nothing_else():
    with serve(api_key="sekrit", metrics_public=True) as url:
        assert httpx.get(f"{url}/v1/models").status_code == 401
        assert complete(url).status_code == 401
        after = scrape(url)
    assert value(after, "powersample_requests_total", endpoint="/v1/completions", status="401") == 1


def test_the_gauges_are_zero_when_idle_and_count_chains_running_and_waiting():
    backend = SlowToy(delay=0.05)
    with serve(backend) as url:
        idle = scrape(url)
        assert value(idle, "powersample_chains_in_flight") == 0 and value(idle, "powersample_chains_queued") == 0
        # a different proposal waits until the first request's run drains (engine.py): one queued, one running
        jobs = [
            {"n": 2, "seed": 1, "max_tokens": 12},
            {"n": 3, "seed": 2, "max_tokens": 4, "proposal_temperature": 0.9},
        ]
        statuses: list[int] = []
        threads = [
            threading.Thread(target=lambda j=job: statuses.append(complete(url, **j).status_code)) for job in jobs
        ]
        seen = []
        for t in threads:
            t.start()
            time.sleep(0.1)
        deadline = time.monotonic() + 30
        while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
            s = scrape(url)
            seen.append((value(s, "powersample_chains_in_flight"), value(s, "powersample_chains_queued")))
            time.sleep(0.02)
        for t in threads:
            t.join(30)
        done = scrape(url)
    assert statuses == [200, 200]
    assert max(f for f, _ in seen) > 0 and (5, 3) in seen  # 2 running + 3 waiting for their turn
    assert all(q <= f for f, q in seen)
    assert value(done, "powersample_chains_in_flight") == 0 and value(done, "powersample_chains_queued") == 0


def test_two_servers_in_one_process_keep_their_own_counters():
    with serve() as first, serve() as second:
        httpx.get(f"{first}/v1/models")
        httpx.get(f"{first}/v1/models")
        a, b = scrape(first), scrape(second)
    assert value(a, "powersample_requests_total", endpoint="/v1/models", status="200") == 2
    assert value(b, "powersample_requests_total", endpoint="/v1/models", status="200") == 0


def test_metrics_is_not_in_the_openapi_document():
    with serve() as url:
        assert "/metrics" not in httpx.get(f"{url}/openapi.json").json()["paths"]


def test_without_prometheus_client_metrics_answers_501_and_the_rest_works(monkeypatch):
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # `import prometheus_client` raises ImportError
    with serve(api_key="sekrit") as url:
        assert httpx.get(f"{url}/metrics").status_code == 401  # the key rule first: nothing to tell an outsider
        resp = httpx.get(f"{url}/metrics", headers=KEY)
        assert resp.status_code == 501
        error = resp.json()["error"]
        assert "pip install 'powersample[serve]'" in error["message"] and "\n" not in error["message"]
        assert error["code"] == "metrics_unavailable"
        assert complete(url, headers=KEY, seed=1, max_tokens=4).status_code == 200
        assert httpx.get(f"{url}/health").json() == {"status": "ok"}


@pytest.mark.parametrize("flags, public", [([], False), (["--metrics-public"], True)])
def test_the_metrics_public_flag_reaches_the_settings(flags, public):
    from powersample.cli import build_parser
    from powersample.cli.options import backend_spec
    from powersample.cli.serve import _settings

    args = build_parser().parse_args(["serve", "--backend", "toy", "--toy-spec", "missing.json", *flags])
    assert _settings(args, backend_spec(args)).metrics_public is public
