"""`stream: true`: OpenAI's server-sent events, built from a request's finished outputs.

A power method resamples earlier tokens until its chain ends, so none of its text is final before then. A streamed
request therefore gets SSE comments (`: keep-alive`, every `Settings.stream_keepalive` seconds) while its chains
run, then for each choice: (chat only) a chunk with the role, one chunk with the whole text (and its log-probs when
asked for), and a chunk with its finish_reason. The stream's last choice chunk also carries `power_sampling`; with
`stream_options.include_usage` a chunk with `usage` and no choices follows (and every other chunk has
`usage: null`, as OpenAI sends them); then `data: [DONE]`.

The plain methods (`base`, `low-temp`) stream the same way: a plain chain is one backend request for all its tokens
(`samplers/plain.py`), and the backend interface has no per-token callback to stream them from as they are drawn.

Every chunk has the same `id`, `created` and `model`. The text streamed is the text a non-streamed request with
the same seed returns (stop strings cut it the same way: `protocol.finish`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from powersample.server import protocol as wire

KEEPALIVE = b": keep-alive\n\n"  # an SSE comment: clients ignore it, proxies see traffic
DONE = b"data: [DONE]\n\n"
MEDIA_TYPE = "text/event-stream"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering of the events


def event(data: dict) -> bytes:
    """One `data:` event."""
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def head(kind: str, model: str) -> dict:
    """id, object, created and model shared by every chunk of one stream; kind is "text_completion" or
    "chat.completion"."""
    envelope = wire.envelope(kind, model)
    return {**envelope, "object": "chat.completion.chunk" if kind == "chat.completion" else "text_completion"}


def completion_chunks(top: dict, outputs: Sequence[wire.Output], logprobs: int | None) -> list[dict]:
    """Per choice: its text (with its log-probs when asked for), then its finish_reason."""
    chunks = []
    for i, out in enumerate(outputs):
        if out.text:
            lp = wire.completion_logprobs(out, logprobs) if logprobs is not None else None
            chunks.append({**top, "choices": [{"index": i, "text": out.text, "logprobs": lp, "finish_reason": None}]})
        chunks.append({**top, "choices": [{"index": i, "text": "", "logprobs": None,
                                           "finish_reason": out.finish_reason}]})  # fmt: skip
    return chunks


def chat_chunks(top: dict, outputs: Sequence[wire.Output], logprobs: bool, top_logprobs: int) -> list[dict]:
    """Per choice: the role, its text (with its log-probs when asked for), then its finish_reason."""

    def chunk(i: int, delta: dict, lp: dict | None = None, finish: str | None = None) -> dict:
        return {**top, "choices": [{"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish}]}

    chunks = []
    for i, out in enumerate(outputs):
        chunks.append(chunk(i, {"role": "assistant", "content": ""}))
        if out.text:
            chunks.append(chunk(i, {"content": out.text}, wire.chat_logprobs(out, top_logprobs) if logprobs else None))
        chunks.append(chunk(i, {}, finish=out.finish_reason))
    return chunks


def finish(chunks: list[dict], top: dict, power_sampling: dict, usage: dict | None) -> list[bytes]:
    """The events of a stream's end: the chunks, `power_sampling` on the last one, the usage chunk (when `usage` is
    given) and [DONE]."""
    chunks = [*chunks[:-1], {**chunks[-1], "power_sampling": power_sampling}]
    if usage is not None:
        chunks = [{**c, "usage": None} for c in chunks] + [{**top, "choices": [], "usage": usage}]
    return [event(c) for c in chunks] + [DONE]
