"""One generation request, whichever endpoint it came from, and the one pipeline that runs it.

Each endpoint adapts its body into a `Generation` (app.py); `Pipeline.answer` then runs it and answers it in the
endpoint's `formats` shape:

1. room: a 429 when the engine is full, a 400 for a method that cannot run (before any work, and before a stream
   starts);
2. the chains: one sampler program per chain (`n` per prompt, seeded as `powersample sample --seed S
   --num-samples n` seeds them), submitted to the engine as one Job and waited for while the client is watched (a
   client that leaves, or the deadline, stops the job); `echo` with `max_tokens: 0` runs none;
3. the outputs: each record's text cut at the stops and its tokens' pieces (off the event loop), then the echoed
   prompt and the ranked alternatives, when asked for: one `Ranking.rank` per sample on the engine thread (a
   `Call`), SCORE_CHUNK tokens per step;
4. the answer: the choices, usage and power_sampling as one JSON response, or as the stream's last chunks (`sse.py`),
   after keep-alives, trace events and live text; the samples are counted in /metrics and logged to --output.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Generator, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from powersample.api import SampleRecord, chain_record, make_chains, memory_plan
from powersample.backends.base import Backend, Ranking, capability
from powersample.config import SamplerConfig
from powersample.core.types import Ranked, Tokens
from powersample.errors import PowerSampleError, one_line
from powersample.io import append_jsonl
from powersample.samplers import programs, registry
from powersample.samplers.registry import PLAIN_METHODS
from powersample.server import formats, sse
from powersample.server.engine import Engine, Job, Stopped
from powersample.server.formats import Format
from powersample.server.live import Feed, draw_feed, end_events, trace_feed
from powersample.server.metrics import Metrics
from powersample.server.protocol import ApiError, Limits, Output, echoed, finish, ranked
from powersample.server.requests import JsonResponse
from powersample.server.waiting import POLL_SECONDS, on_engine, results, submit, timeout_error, wait_job, watch

SCORE_CHUNK = 256  # tokens one step of a scoring call scores: the engine checks for a stop between steps
EMPTY = Output("", "length", (), (), (), (), 0)  # a choice of a request that runs no chain (echo, max_tokens 0)


@dataclass(frozen=True)
class Generation:
    """A checked request, ready to run: what to sample, and what to return."""

    texts: tuple[str, ...]  # what each record's `prompt` says (chat: the messages as JSON)
    prompt_ids: tuple[Tokens, ...]
    config: SamplerConfig
    seed: int
    n: int  # chains per prompt
    deadline: float  # time.monotonic() past which the request is stopped (504)
    ignored: tuple[str, ...] = ()  # request fields ignored (power_sampling.ignored)
    work: int = 0  # members x max_tokens (protocol.check_budget)
    stops: tuple[str, ...] = ()  # where a choice's text ends: the stop strings, and a transcript's role lines
    logprobs: int | None = None  # alternatives per token (protocol.wanted_logprobs); None: no log-probs
    echo: bool = False  # each choice starts with its prompt (completions)
    id_prompts: bool = False  # the prompts came as token ids (an echo's text is then their decoded pieces)
    final_eos: bool = False  # a sample's final EOS is among its returned tokens (completions: protocol.finish)
    transcript: tuple[str, ...] = ()  # chat sent as a plain transcript: the role lines that end a reply
    scoring: bool = False  # echo with max_tokens 0: the prompts are scored, no chain runs
    stream: bool = False  # server-sent events (sse.py)
    usage_chunk: bool = False  # stream_options.include_usage: the stream ends with a usage chunk
    traced: bool = False  # stream_options.include_trace: the chains' trace events go out as they happen

    @property
    def choices(self) -> int:
        return len(self.prompt_ids) * self.n

    @property
    def prompt_tokens(self) -> int:
        return sum(len(ids) for ids in self.prompt_ids)

    @property
    def live(self) -> bool:
        """Whether the text streams as it is drawn: a plain method, streamed, without log-probs or echo."""
        return self.stream and self.config.method in PLAIN_METHODS and self.logprobs is None and not self.echo


Results = tuple[list[SampleRecord], list[Output]]  # one record per chain (prompt-major), one output per choice


@dataclass
class Pipeline:
    """The generation endpoints' work, between the HTTP layer and the engine."""

    backend: Backend
    engine: Engine
    limits: Limits
    model_name: str
    output: str | None = None  # append one JSON record per returned sample to this JSONL file
    keepalive: float = 5.0  # seconds between SSE keep-alive comments
    metrics: Metrics | None = None
    _log_lock: threading.Lock = field(default_factory=threading.Lock)

    async def answer(self, request: Request, gen: Generation, fmt: Format) -> Response:
        """Run `gen` and answer it in `fmt`'s shape: one JSON response, or (stream) server-sent events."""
        head = formats.head(fmt.kind, self.model_name)
        if gen.stream:
            return self._stream(request, gen, sse.Chunks(fmt, head, gen.usage_chunk))
        progs, start = self._programs(gen), time.perf_counter()
        outcomes = []
        if progs:
            job, future = submit(
                self.engine, progs, registry.proposal(gen.config), gen.deadline, gen.work, self._sizes(gen)
            )
            outcomes = await wait_job(request, job, future, gen.deadline, self.limits.request_timeout)
        records, outputs = await self._results(request, gen, outcomes, time.perf_counter() - start)
        choices = [formats.choice(fmt, i, out, gen.logprobs) for i, out in enumerate(outputs)]
        body = fmt.response(
            **head,
            choices=choices,
            usage=formats.usage(gen.prompt_tokens, outputs),
            power_sampling=self._power_sampling(gen, records),
        )
        await self._log(head["id"], records, outputs)
        return JsonResponse(body.model_dump(exclude_unset=True))

    def _stream(self, request: Request, gen: Generation, chunks: sse.Chunks) -> StreamingResponse:
        """The SSE response of a checked request: its chains are built here (a 400 or 429 comes before the stream)
        and run once the response starts."""
        feed = Feed()
        live = sse.LiveText(chunks, self.backend.decode, gen.stops, gen.choices) if gen.live else None
        events = self._events(request, gen, self._programs(gen, feed), chunks, feed, live)
        return StreamingResponse(events, media_type=sse.MEDIA_TYPE, headers=sse.HEADERS)

    async def _events(
        self, request: Request, gen: Generation, progs: list, chunks: sse.Chunks, feed: Feed, live: sse.LiveText | None
    ) -> AsyncIterator[bytes]:
        """Keep-alives (and the trace events, when traced; the text as it is drawn, when live) while the chains run,
        then the chunks and [DONE]; a failure is one error event. A client that leaves cancels this generator
        (Starlette watches for the disconnect), which stops the job."""
        job, future = submit(
            self.engine, progs, registry.proposal(gen.config), gen.deadline, gen.work, self._sizes(gen)
        )
        start = time.perf_counter()
        try:
            for data in live.opening() if live else ():
                yield data
            async with aclosing(self._running(job, future, gen, feed, live)) as running:
                async for data in running:
                    yield data
            outcomes = results(future.result(), self.limits.request_timeout)
            records, outputs = await self._results(request, gen, outcomes, time.perf_counter() - start)
            for item in end_events(self.backend, records) if gen.traced else ():
                yield sse.trace(item)
            last = formats.choice_chunks(chunks.fmt, live.rest(outputs) if live else outputs, gen.logprobs, bool(live))
            usage = formats.usage(gen.prompt_tokens, outputs)
            for data in chunks.end(last, self._power_sampling(gen, records), usage):
                yield data
            await self._log(chunks.head["id"], records, outputs)
        except ApiError as error:
            yield sse.event(error.body())
        except Exception as error:  # noqa: BLE001 - mid-stream, a failure is an error event, never a traceback
            yield sse.event(ApiError(500, f"internal error: {one_line(error)}", kind="server_error").body())
        finally:
            if not future.done():
                job.stop("request abandoned")

    async def _running(
        self, job: Job, future: asyncio.Future, gen: Generation, feed: Feed, live: sse.LiveText | None
    ) -> AsyncIterator[bytes]:
        """While the chains run: their trace events and live text as they come, and keep-alives when nothing else
        was sent for `keepalive` seconds; past the deadline the job is stopped (504)."""
        beat = time.monotonic()
        async with aclosing(feed.follow(future, min(POLL_SECONDS, self.keepalive))) as batches:
            async for batch in batches:
                for channel, item in batch:
                    if channel == "trace":
                        yield sse.trace(item)
                    elif live is not None:  # ("draw", (choice, tokens))
                        for data in live.draw(*item):
                            yield data
                if future.done():
                    return
                if time.monotonic() > gen.deadline:
                    job.stop("timeout")
                    raise timeout_error(self.limits.request_timeout)
                if batch:
                    beat = time.monotonic()  # trace events are traffic too
                elif time.monotonic() - beat >= self.keepalive:
                    beat = time.monotonic()
                    yield sse.KEEPALIVE

    def _programs(self, gen: Generation, feed: Feed | None = None) -> list:
        """The request's chains as sampler programs (none when it only scores): 429 when the engine is full, 400 for
        a method that cannot run. With a `feed`, each chain's trace (when traced) and live text (when live) go into
        it, numbered by its choice index."""
        self._check_room(0 if gen.scoring else gen.choices, gen.work + scoring_work(gen, self.limits))
        if gen.scoring:
            return []
        self._sizes(gen)  # 400 now for a chain that could never fit the memory budget
        progs = []
        try:
            for i, ids in enumerate(gen.prompt_ids):
                chains = make_chains(gen.seed, gen.n)
                if feed is not None and gen.traced:
                    trace_feed(self.backend, chains, gen.texts[i], gen.config, gen.seed, i * gen.n, feed)
                if feed is not None and gen.live:
                    draw_feed(chains, i * gen.n, feed)
                progs += programs(self.backend, ids, gen.config, chains)
        except PowerSampleError as e:
            raise ApiError(400, str(e), param="method") from None
        return progs

    def _sizes(self, gen: Generation) -> list[int]:
        """The bytes of KV cache each of the request's chains holds (prompt-major, as its programs): the engine
        starts them within its memory budget. 400 when one chain alone exceeds the budget."""
        try:
            plans = [memory_plan(self.backend, gen.config, len(ids), self.engine.budget) for ids in gen.prompt_ids]
        except PowerSampleError as e:
            raise ApiError(400, str(e), param="max_tokens", code="memory_budget") from None
        return [p.per_chain if p else 0 for p in plans for _ in range(gen.n)]

    def _check_room(self, chains: int, work: int) -> None:
        """429 when `chains` more chains, or `work` more work, would take the engine over its limits."""
        busy = self.engine.chains_in_flight() + chains > self.limits.max_queued_chains
        if busy or self.engine.work_in_flight() + work > self.limits.max_queued_work:
            raise ApiError(
                429,
                "the server is full (chains or their work in flight at the limit); retry later",
                kind="rate_limit_error",
                code="server_busy",
                headers={"Retry-After": str(self.limits.retry_after)},
            )

    async def _results(self, request: Request, gen: Generation, outcomes: list, wall: float) -> Results:
        """The chains' records and the choices' outputs (counted in /metrics, when it is on)."""
        records = [
            chain_record(self.backend, gen.texts[k // gen.n], gen.config, gen.seed, k % gen.n, outcome, wall)
            for k, outcome in enumerate(outcomes)
        ]
        outputs = await self._outputs(request, gen, records)
        if self.metrics is not None:
            self.metrics.count_samples(gen.config.method, records, sum(o.completion_tokens for o in outputs))
        return records, outputs

    def _power_sampling(self, gen: Generation, records: Sequence[SampleRecord]) -> Any:
        ps = formats.power_sampling(gen.config, gen.seed, records, gen.ignored, gen.transcript)
        if gen.scoring:
            ps.config["max_new_tokens"] = 0  # no chain ran: it sampled no token
        return ps

    async def _outputs(self, request: Request, gen: Generation, records: Sequence[SampleRecord]) -> list[Output]:
        """Stop truncation and per-token texts, off the event loop and inside the request's deadline (a client that
        leaves, or the timeout, stops them at the next token); then the echo and alternatives asked for, the ranking
        on the engine thread (one `rank` per sample), the texts off the event loop."""
        pieces = gen.logprobs is not None

        def cut(check: Callable[[], None]) -> list[Output]:
            return [finish(self.backend.decode, r, gen.stops, pieces, check, gen.final_eos) for r in records]

        outputs = [EMPTY] * gen.choices if gen.scoring else await self._in_thread(request, gen, cut)
        if not gen.echo and not gen.logprobs:
            return outputs
        prompts = [gen.prompt_ids[j // gen.n] for j in range(len(outputs))]
        rank = lambda: _ranks(self.backend, gen, prompts, outputs)  # noqa: E731
        timeout = self.limits.request_timeout
        ranks = await on_engine(request, self.engine, rank, gen.deadline, timeout, scoring_work(gen, self.limits))

        def scored(check: Callable[[], None]) -> list[Output]:
            return [
                _scored(self.backend.decode, gen, j // gen.n, out, rank, check)
                for j, (out, rank) in enumerate(zip(outputs, ranks))
            ]

        return await self._in_thread(request, gen, scored)

    async def _in_thread(self, request: Request, gen: Generation, work: Callable[[Callable[[], None]], Any]) -> Any:
        """work(check) in a thread, inside the request's deadline; `check` raises once the client has left or the
        deadline has passed, so the work stops at its next step."""
        stop = threading.Event()

        def check() -> None:
            if stop.is_set():
                raise Stopped("stopped")

        task = asyncio.ensure_future(asyncio.to_thread(work, check))
        try:
            await watch(request, task, gen.deadline, lambda reason: stop.set(), self.limits.request_timeout)
        finally:
            stop.set()  # a no-op once done; else the thread ends at its next token
            task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved: no "never retrieved" log
        return task.result()

    async def _log(self, request_id: str, records: Sequence[SampleRecord], outputs: Sequence[Output]) -> None:
        """Append the samples (with the text returned and its finish reason) to --output, off the event loop."""
        if not self.output or not records:
            return
        rows = [
            {
                **r.to_dict(),
                "request_id": request_id,
                "response_text": o.text,
                "response_finish_reason": o.finish_reason,
            }
            for r, o in zip(records, outputs)
        ]

        def write() -> None:
            with self._log_lock:
                append_jsonl(self.output, rows)

        await asyncio.to_thread(write)


def scoring_work(gen: Generation, limits: Limits) -> int:
    """The work of the request's scoring call (echoed prompts' log p, ranked alternatives): prompt tokens x (1 + the
    alternatives per token), a 400 over the server's per-request limit. 0 when nothing is scored."""
    if gen.logprobs is None or not (gen.echo or gen.logprobs):
        return 0
    work = gen.prompt_tokens * (1 + gen.logprobs)
    if work > limits.max_work:
        raise ApiError(
            400,
            f"scoring the prompts costs {work} tokens of work ({gen.prompt_tokens} prompt tokens x "
            f"(1 + logprobs {gen.logprobs})); the server's limit is {limits.max_work}",
            param="prompt",
            code="over_limit",
        )
    return work


Ranks = tuple[tuple[Ranked, ...] | None, tuple[Ranked, ...] | None]  # (a prompt's tokens after its first, a sample's)


def _ranks(
    backend: Backend, gen: Generation, prompts: Sequence[Tokens], outputs: Sequence[Output]
) -> Generator[None, None, list[Ranks]]:
    """Per output, what the request asks to score (on the engine thread, in steps: a Call); equal (prompt, tokens)
    pairs scored once."""
    memo: dict[tuple[Tokens, Tokens], Ranks] = {}
    for prompt, out in zip(prompts, outputs):
        if (prompt, out.tokens) not in memo:
            memo[prompt, out.tokens] = yield from _rank_one(backend, prompt, out.tokens, gen.echo, gen.logprobs)
    return [memo[prompt, out.tokens] for prompt, out in zip(prompts, outputs)]


def _rank_one(
    backend: Backend, prompt: Tokens, tokens: Tokens, echo: bool, n: int | None
) -> Generator[None, None, Ranks]:
    """(the prompt's tokens after the first, when echoed; the sample's tokens, when alternatives are asked for),
    ranked with n alternatives, SCORE_CHUNK tokens per step; None where nothing is needed (the sample's log p came
    with it)."""
    if n is None or not (echo or n):  # echo without log-probs: text only; log p only: it came with the sample
        return None, None
    if not n:  # the echoed prompt's log p
        scores = yield from _in_chunks(backend.score, prompt[:1], prompt[1:])
        return tuple(Ranked(lp, ()) for lp in scores), None
    head = prompt[:1] if echo else prompt
    rank = capability(backend, Ranking).rank  # type: ignore[union-attr]
    ranks = yield from _in_chunks(lambda context, chunk: rank(context, chunk, n), head, prompt[len(head) :] + tokens)
    echoed_tokens = len(prompt) - len(head)
    return (ranks[:echoed_tokens] if echo else None), ranks[echoed_tokens:]


def _in_chunks(
    score: Callable[[Tokens, Tokens], Sequence], context: Tokens, rest: Tokens
) -> Generator[None, None, tuple]:
    """score(context + the tokens of `rest` before a chunk, the chunk) over `rest`, SCORE_CHUNK tokens at a time,
    joined; it yields between chunks, where the engine checks for a stop and serves other work (a backend keeps the
    context it scored last, so each chunk costs its own tokens)."""
    out: list = []
    for start in range(0, len(rest), SCORE_CHUNK):
        if start:
            yield
        out += score(tuple(context) + tuple(rest[:start]), tuple(rest[start : start + SCORE_CHUNK]))
    return tuple(out)


def _scored(decode, gen: Generation, k: int, out: Output, ranks: Ranks, check: Callable[[], None]) -> Output:
    """One output of prompt k with its ranks applied and its prompt echoed, as the request asks."""
    prompt_ranks, sample_ranks = ranks
    if sample_ranks is not None:
        out = ranked(decode, out, sample_ranks, check)
    if gen.echo:
        text = None if gen.id_prompts else gen.texts[k]
        out = echoed(decode, out, gen.prompt_ids[k], text, prompt_ranks, bool(gen.logprobs), check)
    return out
