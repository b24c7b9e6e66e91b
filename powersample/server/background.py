"""Serve an app from a background thread, on a free loopback port: for tests and notebooks."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from powersample.server.http import HttpLimits, uvicorn_config


@contextmanager
def background_server(
    app: Any, host: str = "127.0.0.1", startup_timeout: float = 30.0, limits: HttpLimits = HttpLimits()
) -> Iterator[str]:
    """Run `app` with uvicorn in a thread, under `limits`; yields its base URL ("http://127.0.0.1:PORT") and shuts
    it down after (the app's lifespan, and with it the engine thread, ends before this returns)."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    server = uvicorn.Server(uvicorn_config(app, limits, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="powersample-http", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + startup_timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
