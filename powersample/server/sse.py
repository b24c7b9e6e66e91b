"""`stream: true`: OpenAI's server-sent events, built from a request's finished outputs.

A power method resamples earlier tokens until its chain ends, so none of its text is final before then. A streamed
request therefore gets SSE comments (`: keep-alive`, every `Settings.stream_keepalive` seconds) while its chains
run, then for each choice: (chat only) a chunk with the role, one chunk with the whole text (and its log-probs when
asked for), and a chunk with its finish_reason. The stream's last choice chunk also carries `power_sampling`; with
`stream_options.include_usage` a chunk with `usage` and no choices follows (and every other chunk has
`usage: null`, as OpenAI sends them); then `data: [DONE]`.

The plain methods (`base`, `low-temp`) stream their text as it is drawn, when no log-probs are asked for: their
chains are traced, each run of tokens the engine draws (a "draw" event, `ExtendRequest.on_draw`) goes through the
choice's `deltas.TextStream`, and the text it releases is one content chunk (`LiveText`). At the end each choice
gets what is left of its final text and its finish_reason. With log-probs they stream as the power methods do.

Every chunk has the same `id`, `created` and `model`. The text streamed is the text a non-streamed request with
the same seed returns (stop strings cut it the same way: `protocol.finish`).

The trace extension (`stream_options: {"include_trace": true}`) adds each chain's trace events as they happen, before
the chunks: one SSE comment line `: trace {json}` per event, the JSON being the event `powersample sample --trace`
writes (`api.ChainTrace`: start, extend, step, smc, end, with `pieces`), its "chain" the choice index, non-finite
numbers as null. Comments, because every SSE client skips them: the openai SDK parses every `data:` event as a chunk,
whatever its `event:` name, so a named event would reach its users as a broken chunk; with comments an SDK user who
turns the trace on still gets exactly the usual chunks. A client that wants the trace reads the lines that start
with `: trace `.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

from powersample.server import protocol as wire
from powersample.server.deltas import TextStream

KEEPALIVE = b": keep-alive\n\n"  # an SSE comment: clients ignore it, proxies see traffic
DONE = b"data: [DONE]\n\n"
TRACE = ": trace "  # the prefix of a trace event's comment line
MEDIA_TYPE = "text/event-stream"
CHAT_CHUNK = "chat.completion.chunk"  # the `object` of a chat stream's chunks
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering of the events


def event(data: dict) -> bytes:
    """One `data:` event (non-finite numbers as null: `protocol.json_bytes`)."""
    return b"data: " + wire.json_bytes(data) + b"\n\n"


def trace(item: dict) -> bytes:
    """One trace event as an SSE comment line (JSON escapes every newline, so the JSON stays on it)."""
    return TRACE.encode() + wire.json_bytes(item) + b"\n\n"


def head(kind: str, model: str) -> dict:
    """id, object, created and model shared by every chunk of one stream; kind is "text_completion" or
    "chat.completion"."""
    envelope = wire.envelope(kind, model)
    return {**envelope, "object": CHAT_CHUNK if kind == "chat.completion" else "text_completion"}


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


def chat_chunks(top: dict, outputs: Sequence[wire.Output], logprobs: bool, top_logprobs: int,
                role: bool = True) -> list[dict]:  # fmt: skip
    """Per choice: the role (unless it was sent already: `role` False), its text (with its log-probs when asked
    for), then its finish_reason."""

    def chunk(i: int, delta: dict, lp: dict | None = None, finish: str | None = None) -> dict:
        return {**top, "choices": [{"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish}]}

    chunks = []
    for i, out in enumerate(outputs):
        if role:
            chunks.append(chunk(i, {"role": "assistant", "content": ""}))
        if out.text:
            chunks.append(chunk(i, {"content": out.text}, wire.chat_logprobs(out, top_logprobs) if logprobs else None))
        chunks.append(chunk(i, {}, finish=out.finish_reason))
    return chunks


class LiveText:
    """The text chunks of a streamed plain request while its chains run: each choice's text as its tokens are drawn
    (the chains' "draw" events), through a `TextStream`, so what is sent is always a prefix of the final text."""

    def __init__(self, top: dict, decode: Callable[[Sequence[int]], str], stops: Sequence[str], choices: int,
                 usage: bool):  # fmt: skip
        self.top, self.chat, self.usage = top, top["object"] == CHAT_CHUNK, usage
        self.streams = [TextStream(decode, stops) for _ in range(choices)]

    def opening(self) -> list[bytes]:
        """Chat: each choice's role chunk, before any text (completions: nothing)."""
        return [self._event(i, {"role": "assistant", "content": ""}) for i in range(len(self.streams)) if self.chat]

    def draw(self, item: dict) -> list[bytes]:
        """The chunk of the text a "draw" trace event releases (none when it releases nothing)."""
        text = self.streams[item["chain"]].add(item["tokens"])
        return [self._event(item["chain"], {"content": text} if self.chat else text)] if text else []

    def rest(self, outputs: Sequence[wire.Output]) -> list[wire.Output]:
        """The outputs with only the text not sent yet, for the stream's last chunks."""
        return [replace(out, text=stream.finish(out.text)) for out, stream in zip(outputs, self.streams)]

    def _event(self, index: int, delta: dict | str) -> bytes:
        choice = {"index": index, "delta": delta} if self.chat else {"index": index, "text": delta}
        chunk = {**self.top, "choices": [{**choice, "logprobs": None, "finish_reason": None}]}
        return event({**chunk, "usage": None} if self.usage else chunk)


def finish(chunks: list[dict], top: dict, power_sampling: dict, usage: dict | None) -> list[bytes]:
    """The events of a stream's end: the chunks, `power_sampling` on the last one, the usage chunk (when `usage` is
    given) and [DONE]."""
    chunks = [*chunks[:-1], {**chunks[-1], "power_sampling": power_sampling}]
    if usage is not None:
        chunks = [{**c, "usage": None} for c in chunks] + [{**top, "choices": [], "usage": usage}]
    return [event(c) for c in chunks] + [DONE]
