"""`stream: true`: OpenAI's server-sent events, built from a request's outputs.

A power method resamples earlier tokens until its chain ends, so none of its text is final before then. A streamed
request therefore gets SSE comments (`: keep-alive`, every `Settings.stream_keepalive` seconds) while its chains
run, then for each choice: (chat only) a chunk with the role, one chunk with the whole text (and its log-probs when
asked for), and a chunk with its finish_reason. The stream's last choice chunk also carries `power_sampling`; with
`stream_options.include_usage` a chunk with `usage` and no choices follows (and every other chunk has
`usage: null`, as OpenAI sends them); then `data: [DONE]`.

The plain methods (`base`, `low-temp`) stream their text as it is drawn, when no log-probs are asked for: each run
of tokens the engine draws (`Report.on_draw`, through `Chain.on_draw`: the live-text channel, apart from the
trace) goes through the choice's `deltas.TextStream`, and the text it releases is one content chunk (`LiveText`).
At the end each choice gets what is left of its final text and its finish_reason. With log-probs they stream as the
power methods do.

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
from typing import Any

from pydantic import BaseModel

from powersample.server.deltas import TextStream
from powersample.server.formats import Format, dump, opening
from powersample.server.protocol import Output, json_bytes

KEEPALIVE = b": keep-alive\n\n"  # an SSE comment: clients ignore it, proxies see traffic
DONE = b"data: [DONE]\n\n"
TRACE = ": trace "  # the prefix of a trace event's comment line
MEDIA_TYPE = "text/event-stream"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering of the events


def event(data: BaseModel | dict) -> bytes:
    """One `data:` event: a model's JSON (`formats.dump`), or an error's body."""
    return b"data: " + (dump(data) if isinstance(data, BaseModel) else json_bytes(data)) + b"\n\n"


def trace(item: dict) -> bytes:
    """One trace event as an SSE comment line (JSON escapes every newline, so the JSON stays on it)."""
    return TRACE.encode() + json_bytes(item) + b"\n\n"


class Chunks:
    """The chunks of one stream: the same id, created and model on each; `usage: null` on each when the stream ends
    with a usage chunk."""

    def __init__(self, fmt: Format, head: dict[str, Any], usage: bool):
        self.fmt, self.usage = fmt, usage
        self.head = {**head, "object": fmt.chunk_kind}

    def event(self, choices: list[BaseModel], **extra: Any) -> bytes:
        return event(self.fmt.chunk(**self.head, choices=choices, **({"usage": None} if self.usage else {}), **extra))

    def end(self, choices: Sequence[BaseModel], power_sampling: BaseModel, usage: BaseModel) -> list[bytes]:
        """The events of a stream's end: one chunk per choice, `power_sampling` on the last, the usage chunk (with
        include_usage) and [DONE]."""
        events = [self.event([c]) for c in choices[:-1]] + [self.event([choices[-1]], power_sampling=power_sampling)]
        if self.usage:
            events.append(event(self.fmt.chunk(**self.head, choices=[], usage=usage)))
        return events + [DONE]


class LiveText:
    """The text chunks of a streamed plain request while its chains run: each choice's text as its tokens are drawn,
    through a `TextStream`, so what is sent is always a prefix of the final text."""

    def __init__(self, chunks: Chunks, decode: Callable[[Sequence[int]], str], stops: Sequence[str], choices: int):
        self.chunks = chunks
        self.streams = [TextStream(decode, stops) for _ in range(choices)]

    def opening(self) -> list[bytes]:
        """Chat: each choice's role chunk, before any text (completions: nothing)."""
        return [self.chunks.event(role) for i in range(len(self.streams)) if (role := opening(self.chunks.fmt, i))]

    def draw(self, choice: int, tokens: Sequence[int]) -> list[bytes]:
        """The chunk of the text that choice's newly drawn tokens release (none when they release nothing)."""
        text = self.streams[choice].add(tokens)
        return [self.chunks.event([self.chunks.fmt.delta(choice, text, None, None)])] if text else []

    def rest(self, outputs: Sequence[Output]) -> list[Output]:
        """The outputs with only the text not sent yet, for the stream's last chunks."""
        return [replace(out, text=stream.finish(out.text)) for out, stream in zip(outputs, self.streams)]
