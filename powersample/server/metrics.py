"""`GET /metrics`: the server's counters in the Prometheus text format (prometheus-client, the `serve` extra).

Each app has its own `CollectorRegistry` (never the process-wide default), so two servers in one process, or the
many apps of a test run, never share a counter. The metrics:

- `powersample_requests_total{endpoint, status}` (counter): every response, errors included (400, 401, 403, 404,
  413, 429, 504, ...). `endpoint` is one of the server's paths (`ENDPOINTS`), or "other" for any unknown path, so
  the labels stay few whatever clients send.
- `powersample_request_latency_seconds{endpoint}` (histogram): from the request's arrival to its response.
- `powersample_tokens_sampled_total{method}` (counter): every token the chains drew, rejected proposals included
  (the records' `tokens_generated`, the response's `power_sampling.tokens_sampled`).
- `powersample_tokens_kept_total{method}` (counter): the tokens of the returned samples (after stop strings: the
  responses' `usage.completion_tokens`).
- `powersample_proposals_total{method}`, `powersample_accepted_total{method}` (counters): MH proposals and their
  acceptances, as the records count them.
- `powersample_chains_in_flight` (gauge): chains waiting or running in the engine (as /health's `chains_in_flight`).
- `powersample_chains_queued` (gauge): those of them still waiting for the engine to admit them.

The sample counters move only for requests that return samples: a request stopped (504, 499, 503) or failed drew
tokens too, but its chains' records never come back.

Without prometheus-client the server runs as before and /metrics answers 501 naming the extra to install.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from powersample.api import SampleRecord

ENDPOINTS = (
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/models",
    "/health",
    "/metrics",
    "/openapi.json",
    "/tokenize",
    "/detokenize",
    "/tokenizer_info",
)
# seconds: a /health answers in milliseconds, a power-sampling request in seconds to minutes (timeout 600 s)
LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
MISSING = "GET /metrics needs prometheus-client: pip install 'powersample[serve]'"


class Metrics:
    """The app's registry and its metrics; `gauges()` reads `(chains in flight, chains queued)` at scrape time."""

    def __init__(self, gauges: Callable[[], tuple[int, int]]):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "powersample_requests", "HTTP responses, by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.latency = Histogram(
            "powersample_request_latency_seconds",
            "seconds from a request's arrival to its response",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.sampled = Counter(
            "powersample_tokens_sampled",
            "tokens drawn by the chains, rejected proposals included",
            ["method"],
            registry=r,
        )
        self.kept = Counter("powersample_tokens_kept", "tokens of the returned samples", ["method"], registry=r)
        self.proposals = Counter("powersample_proposals", "MH proposals", ["method"], registry=r)
        self.accepted = Counter("powersample_accepted", "MH proposals accepted", ["method"], registry=r)
        in_flight = Gauge("powersample_chains_in_flight", "chains waiting or running in the engine", registry=r)
        queued = Gauge("powersample_chains_queued", "chains waiting for the engine to admit them", registry=r)
        in_flight.set_function(lambda: gauges()[0])
        queued.set_function(lambda: gauges()[1])

    def count_samples(self, method: str, records: Sequence[SampleRecord], kept_tokens: int) -> None:
        """One request's returned samples: their records, and the tokens the client got."""
        self.sampled.labels(method).inc(sum(r.tokens_generated for r in records))
        self.kept.labels(method).inc(kept_tokens)
        self.proposals.labels(method).inc(sum(r.proposals for r in records))
        self.accepted.labels(method).inc(sum(r.accepted for r in records))

    def observe(self, path: str, status: int, seconds: float) -> None:
        endpoint = path if path in ENDPOINTS else "other"
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def exposition(self) -> tuple[bytes, str]:
        """The text format and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def make_metrics(gauges: Callable[[], tuple[int, int]]) -> Metrics | None:
    """The app's metrics, or None when prometheus-client is not installed."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        return None
    return Metrics(gauges)


class CountRequests:
    """ASGI middleware (the outermost, so Host refusals count too) observing every HTTP response once: its status
    and the seconds until its last body part, counted just before that part is sent (so a client that has its
    answer finds it counted). A handler that raises without answering counts as 500 (Starlette's
    ServerErrorMiddleware, outside this one, answers it so)."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status, seen = time.perf_counter(), [500], [False]

        def observe() -> None:
            if not seen[0]:
                seen[0] = True
                self.metrics.observe(scope["path"], status[0], time.perf_counter() - start)

        async def sent(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                observe()
            await send(message)

        try:
            await self.app(scope, receive, sent)
        finally:
            observe()  # no response, or one cut short
