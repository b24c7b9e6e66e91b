"""The HTTP server's own limits, set deliberately (uvicorn's defaults leave a slow client's socket open forever):
a request's headers must arrive within `header_timeout` seconds of the connection (or of its first byte, on a
kept-alive one), its body within `body_timeout` more, idle kept-alive connections close after `keep_alive`, and
past `max_connections` connections or requests at once new requests get 503 (uvicorn's `limit_concurrency`, counted
as uvicorn counts it), answered as every other error is: OpenAI's error JSON, with Retry-After (`over_capacity`),
where uvicorn's own answer is a plain-text "Service Unavailable".
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from powersample.server.protocol import ApiError, json_bytes

BODY_GRACE = 1.0  # seconds past body_timeout before the socket is closed: the app answers 408 first when it reads
RETRY_AFTER = 1  # seconds a 503 for too many connections tells the client to wait


@dataclass(frozen=True)
class HttpLimits:
    """What one connection may take (see the module docstring)."""

    header_timeout: float = 10.0  # seconds for a request's headers to arrive
    body_timeout: float = 30.0  # seconds for its body to arrive after the headers (the app answers 408)
    keep_alive: float = 5.0  # seconds an idle kept-alive connection stays open
    max_connections: int = 512  # connections or requests at once; more get 503
    max_header_bytes: int = 65_536  # the request line and headers (h11's max incomplete event size)

    def check(self) -> None:
        """Raise ValueError naming the first bad field."""
        for name in ("header_timeout", "body_timeout", "keep_alive"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("max_connections", "max_header_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def uvicorn_config(app: Any, limits: HttpLimits = HttpLimits(), **options: Any):
    """A uvicorn Config serving `app` under `limits` (options: host, port, log_level, ...)."""
    import uvicorn

    return uvicorn.Config(
        app,
        http=protocol_class(limits),
        timeout_keep_alive=limits.keep_alive,
        limit_concurrency=limits.max_connections,
        h11_max_incomplete_event_size=limits.max_header_bytes,
        timeout_graceful_shutdown=5,
        **options,
    )


def protocol_class(limits: HttpLimits) -> type:
    """uvicorn's h11 protocol with a deadline on receiving each request: `header_timeout` for the headers, then
    `body_timeout` (+ BODY_GRACE) for the body; a connection past it is closed (the app sees a disconnect)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class TimedH11Protocol(H11Protocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            limit, self.limit_concurrency = self.limit_concurrency, None  # uvicorn's check off: ours answers JSON
            if limit is not None:
                self.app = over_capacity(self.app, lambda: len(self.connections) >= limit or len(self.tasks) > limit)

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            self._timer: asyncio.TimerHandle | None = None
            self._phase: str | None = None
            super().connection_made(transport)
            self._arm("headers")

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            state = self.conn.their_state
            if state is h11.IDLE:
                self._arm("headers")  # no-op while a partial request's timer runs: trickling does not extend it
            elif state is h11.SEND_BODY:
                self._arm("body")
            else:
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self.conn.their_state is not h11.SEND_BODY:  # an unread body keeps its deadline
                self._disarm()  # idle now: uvicorn's keep-alive timer takes over

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self, phase: str) -> None:
            if self._phase == phase:
                return
            self._disarm()
            delay = limits.header_timeout if phase == "headers" else limits.body_timeout + BODY_GRACE
            self._phase, self._timer = phase, self.loop.call_later(delay, self._expire)

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
            self._timer, self._phase = None, None

        def _expire(self) -> None:
            self._timer = self._phase = None
            if not self.transport.is_closing():
                self.transport.close()

    return TimedH11Protocol


def over_capacity(app: Any, full: Any) -> Any:
    """`app`, except that while `full()` an HTTP request gets 503 in OpenAI's error JSON, with Retry-After and
    `Connection: close` (uvicorn's limit_concurrency check, which this replaces, answers plain text). `full` runs
    inside the request's own task, so the task count it sees includes this request (hence uvicorn's `>=` is `>`)."""

    async def guarded(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not full():
            await app(scope, receive, send)
            return
        error = ApiError(
            503,
            "the server is at its limit of connections or requests at once; retry later",
            kind="server_error",
            code="too_many_connections",
        )
        logging.getLogger("uvicorn.error").warning("Exceeded concurrency limit.")  # as uvicorn's own check logs it
        body = json_bytes(error.body())
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"retry-after", str(RETRY_AFTER).encode()),
            (b"connection", b"close"),
        ]
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    return guarded
