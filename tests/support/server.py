"""The server on the toy backend, for the server tests: a word-level toy model, a slow one that counts its batches,
a server in a background thread (plain, or watched for escaped exceptions and error logs), the openai SDK against
it, and readers of its streams."""

from __future__ import annotations

import json
import logging
import threading
import time
from contextlib import contextmanager

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

import powersample
from powersample.backends.toy import ToyBackend, ToySpec
from powersample.config import SamplerConfig
from powersample.server.app import Settings, create_app
from powersample.server.background import background_server
from powersample.server.http import HttpLimits

# Words, so that texts are long enough for stop strings; EOS is likely only after "."
WORDS = {
    "vocab": ["the", " cat", " sat", " on", " mat", ".", "\n", "<eos>"],
    "eos_id": 7,
    "default": [0.2, 0.15, 0.15, 0.15, 0.15, 0.1, 0.09, 0.01],
    "next": {"": [0.6, 0.1, 0.1, 0.05, 0.05, 0.05, 0.05, 0.0]},
}
DEFAULTS = SamplerConfig(max_new_tokens=12, block_size=4, mcmc_steps=3)


def word_backend() -> ToyBackend:
    return ToyBackend(ToySpec.from_dict(WORDS))


class SlowToy:
    """A toy backend that takes `delay` seconds per batched call and records each call's batch size."""

    def __init__(self, delay: float = 0.02, context_length: int | None = None, fail_on: int | None = None):
        self.inner, self.delay, self.context_length, self.fail_on = word_backend(), delay, context_length, fail_on
        self.eos_ids = self.inner.eos_ids
        self.batch_sizes: list[int] = []

    def encode(self, prompt, chat=True):
        return (0,) * len(prompt.split()) if self.context_length else ()  # with a context: only for its check

    def decode(self, tokens):
        return self.inner.decode(tokens)

    def extend(self, requests, proposal):
        self.batch_sizes.append(len(requests))
        time.sleep(self.delay)
        if self.fail_on is not None and any(r.max_tokens == self.fail_on for r in requests):
            raise RuntimeError("engine exploded")
        return self.inner.extend(requests, proposal)  # the prompt never reaches it: encode() gives () here


def serve(backend=None, **settings):
    settings.setdefault("defaults", DEFAULTS)
    return background_server(create_app(backend or word_backend(), Settings(**settings)))


def client(url: str, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def health(url: str) -> dict:
    return httpx.get(f"{url}/health").json()


def wait_idle(url: str, within: float = 10.0) -> dict:
    deadline = time.monotonic() + within
    while True:
        state = health(url)
        if state["chains_in_flight"] == 0 and state["requests_running"] == 0 or time.monotonic() > deadline:
            return state
        time.sleep(0.05)


SLOW_POWER = {"prompt": "x", "max_tokens": 12, "block_size": 1, "mcmc_steps": 50, "n": 2}  # ~600 backend calls


@contextmanager
def watched_server(http: HttpLimits = HttpLimits(), **settings):
    """A toy server whose app reports each finished request (and any exception escaping it), with uvicorn's error
    log collected: no traceback may reach it."""
    settings.setdefault("defaults", DEFAULTS)
    app = create_app(word_backend(), Settings(**settings))
    finished, escaped, logged = threading.Semaphore(0), [], []

    async def watched(scope, receive, send):
        try:
            await app(scope, receive, send)
        except BaseException as e:
            escaped.append(e)
            raise
        finally:
            if scope["type"] == "http":
                finished.release()

    class Collect(logging.Handler):
        def emit(self, record):
            logged.append(record)

    handler = Collect(level=logging.ERROR)
    logging.getLogger("uvicorn.error").addHandler(handler)
    try:
        with background_server(watched, limits=http) as base:
            yield base, finished, escaped, logged
    finally:
        logging.getLogger("uvicorn.error").removeHandler(handler)


def by_index(chunks, text) -> dict[int, str]:
    """The concatenated text of each choice index."""
    texts: dict[int, str] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (text(choice) or "")
    return texts


def events(resp: httpx.Response) -> tuple[list[str], list]:
    """The comment lines and the parsed `data:` payloads of a raw SSE response ("[DONE]" stays a string)."""
    comments, data = [], []
    for line in resp.iter_lines():
        if line.startswith(":"):
            comments.append(line)
        elif line.startswith("data: "):
            payload = line[len("data: ") :]
            data.append(payload if payload == "[DONE]" else json.loads(payload))
    return comments, data


@contextmanager
def embedded_server():
    """The embedded model behind a server: (backend, url). The `embedded` fixture (conftest.py) serves it."""
    backend = powersample.load_backend("auto")
    with serve(
        backend, defaults=SamplerConfig(max_new_tokens=12, block_size=6, mcmc_steps=2), model_name="smollm2"
    ) as url:
        yield backend, url
