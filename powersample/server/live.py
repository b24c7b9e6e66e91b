"""Live events from the engine thread to one request's async generator.

Sampler programs run on the engine thread and report what happens to their chain there (`Chain.note`). A `Feed`
carries such events to the request's handler on the event loop: `push` (any thread) hands each one over with
`loop.call_soon_threadsafe`, so the engine never waits on the request, and `follow` gives the handler the events in
batches as they arrive, until the job's future is done. The job's outcome is settled through the same loop queue
after its last event (`waiting.submit`), so once the future is done every event is already in the feed.

`trace_feed` attaches a chain trace (`api.ChainTrace`, the events `sample --trace` writes) to a request's chains;
the streamed request then sends them before its chunks (`sse.trace`). `draw_feed` attaches the live-text channel of
plain chains (the tokens they draw, `Chain.on_draw`), which a streamed request turns into text chunks (`sse.LiveText`).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Sequence
from typing import Any

from powersample.api import ChainTrace, trace_chains
from powersample.backends.base import Backend
from powersample.config import SamplerConfig
from powersample.samplers import Chain

Event = tuple[str, Any]  # (channel, payload): ("trace", a trace event) or ("draw", (choice, tokens))


class Feed:
    """Events pushed from any thread, read in order on the event loop that made the feed."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._items: deque[Event] = deque()
        self._ready = asyncio.Event()

    def push(self, item: Event) -> None:
        """Hand `item` to the loop; safe from any thread, never blocks. Dropped once the loop is gone (shutdown)."""
        try:
            self._loop.call_soon_threadsafe(self._take, item)
        except RuntimeError:  # the event loop is closed: nobody reads any more
            pass

    def _take(self, item: Event) -> None:
        self._items.append(item)
        self._ready.set()

    def pop(self) -> list[Event]:
        """Every event that has arrived, oldest first (none: [])."""
        items = list(self._items)
        self._items.clear()
        self._ready.clear()
        return items

    async def follow(self, done: asyncio.Future, tick: float) -> AsyncIterator[list[Event]]:
        """Batches of events as they arrive, and [] after `tick` seconds without any, until `done` is done; then
        the last batch (possibly [])."""
        while not done.done():
            waiter = asyncio.ensure_future(self._ready.wait())
            try:
                await asyncio.wait({done, waiter}, timeout=tick, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
            if not done.done():
                yield self.pop()
        yield self.pop()


def trace_feed(
    backend: Backend, chains: Sequence[Chain], prompt: str, config: SamplerConfig, seed: int, first: int, feed: Feed
) -> None:
    """Trace one prompt's chains into `feed` as ("trace", event): their "start" events now, the sampler's events as
    the engine thread makes them; chain j is numbered first + j (the request's choice index)."""
    trace_chains(ChainTrace(backend, sink=lambda item: feed.push(("trace", item))), chains, prompt, config, seed, first)


def draw_feed(chains: Sequence[Chain], first: int, feed: Feed) -> None:
    """Each chain's live text into `feed` as ("draw", (choice index first + j, the tokens drawn)): the live-text
    channel (`Chain.on_draw`), apart from the trace."""
    for j, chain in enumerate(chains):
        chain.on_draw = lambda tokens, k=first + j: feed.push(("draw", (k, tuple(tokens))))


def end_events(backend: Backend, records: Sequence) -> list[dict[str, Any]]:
    """Each record's "end" event (its tokens, log p and whole text, before stop strings cut it), numbered by its
    choice index."""
    trace = ChainTrace(backend)
    for k, record in enumerate(records):
        trace.end(k, tokens=list(record.tokens), logp=record.logp, text=record.text)
    return trace.events
