"""The FastAPI app: OpenAI's `/v1/completions` and `/v1/chat/completions` over the batching engine, and vLLM's
tokenizer endpoints (`/tokenize`, `/detokenize`, `/tokenizer_info`) that lm-evaluation-harness uses as its tokenizer.

A handler reads and checks the body (size first, then JSON, then types and limits), encodes the prompt, builds one
sampler program per chain (`n` chains per prompt, seeded as `powersample sample --seed S --num-samples n` seeds
them, so the same seed gives the same samples), and submits them to the engine as one Job. It then waits for the
job while watching the client: a client that disconnects, or a request past the timeout, stops the job (its chains
free their slots at their next request boundary: see `engine.py`). With `stream: true` the request is checked just
as fully before the stream starts (a bad one still gets its JSON error); see `sse.py` for what the stream sends.
Reading a body, the API key and the error handlers are in `requests.py`; waiting on the engine in `waiting.py`.

Log-probs with alternatives (`logprobs` N >= 1) and echoed prompts are scored once the chains have ended: one
`Ranking.rank` per sample over its final tokens (and its prompt, with echo), run on the engine thread as a `Call`
(engine.py), like every other use of the backend. `echo` with `max_tokens: 0` runs only that: no chain.

Every failure is OpenAI's error JSON: 400 for bad fields and limits (naming the field), 401 without the API key,
403 for a foreign Host or Origin (see `guard.py`), 404 for unknown paths, 405 for a wrong HTTP method (with Allow),
408 for a body that does not arrive in time, 413 for an oversized body, 415 for a body that is not
application/json, 429 when the engine is full (with Retry-After), 504 past the request timeout, 503 for requests
stopped by a shutdown, 501 for GET /metrics without prometheus-client, and 500 only for a failure of the engine
itself. Once a stream has started, a failure is one `data: {"error": {...}}` event (the same body) and the stream
ends.

GET / is the playground (`playground.py`): a static page, public, that runs a chain with the trace stream
(`stream_options.include_trace`: `live.py` carries the chains' events from the engine thread to the stream).

GET /metrics (Prometheus text format, see `metrics.py`) follows the API-key rule of /v1/* and /openapi.json: with a
key it needs the key too, unless the server runs with `metrics_public` (--metrics-public) for a scraper inside a
private network. Its counters hold no prompt or text, but they tell an outsider how busy the server is.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Callable, Generator, Sequence
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from powersample.api import SampleRecord, chain_record, make_chains
from powersample.backends import BackendSpec
from powersample.backends.base import Backend, ChatMessages, Ranking, Vocabulary, capability, has_chat_template
from powersample.backends.engine import check_fits
from powersample.backends.tokenizer import plain_transcript, transcript_stops
from powersample.config import SamplerConfig
from powersample.core.types import Ranked, Tokens
from powersample.errors import PowerSampleError, one_line
from powersample.io import append_jsonl, notice_once
from powersample.samplers import programs, registry
from powersample.samplers.registry import PLAIN_METHODS
from powersample.server import protocol as wire
from powersample.server import schema, sse
from powersample.server.engine import Engine, Job, Stopped
from powersample.server.guard import add_guards
from powersample.server.live import Feed, end_events, trace_feed
from powersample.server.metrics import MISSING, CountRequests, Metrics, make_metrics
from powersample.server.playground import add_playground
from powersample.server.protocol import ApiError, ChatBody, CompletionBody, DetokenizeBody, Limits, TokenizeBody
from powersample.server.requests import JsonResponse, add_error_handlers, authenticate, key_ok, read_json
from powersample.server.waiting import POLL_SECONDS, on_engine, results, submit, timeout_error, wait_job, watch

Render = Callable[[list[wire.Output], bool], list[dict]]  # a streamed request's outputs (and whether its text
# streamed live, so chat roles went out already) -> its last chunks (sse.py)


@dataclass(frozen=True)
class Settings:
    """What `powersample serve` was started with."""

    defaults: SamplerConfig = field(default_factory=SamplerConfig)  # a request's fields override these
    model_name: str = "powersample"  # the id /v1/models lists and responses carry
    backend: BackendSpec | None = None  # the engine serving, resolved (None: a backend built in code)
    api_key: str | None = None  # None = no authentication
    limits: Limits = field(default_factory=Limits)
    output: str | None = None  # append one JSON record per returned sample to this JSONL file
    bind_host: str = "127.0.0.1"  # the address served: requests must name it (or a loopback name) as their Host
    allowed_hosts: tuple[str, ...] = ()  # further Host names allowed; "*" = any (see guard.py)
    cors_origin: str | None = None  # the one web origin allowed to call the server from a browser; None = none
    body_timeout: float = 30.0  # seconds for a request's body to arrive once its headers have; then 408
    metrics_public: bool = False  # GET /metrics without the API key (for a scraper inside a private network)
    stream_keepalive: float = 5.0  # seconds between SSE keep-alive comments while a streamed request's chains run


@dataclass(frozen=True)
class _Plan:
    """A checked request, ready to run: its prompts' texts and ids, the config, the seed and the chain count."""

    texts: list[str]  # what each record's `prompt` says (chat: the messages as JSON)
    prompt_ids: list[Tokens]
    config: SamplerConfig
    seed: int
    n: int
    ignored: list[str]
    work: int  # members x max_tokens (protocol.check_budget)
    deadline: float  # time.monotonic() past which the request is stopped (504)
    logprobs: int | None = None  # alternatives per token (protocol.wanted_logprobs); None: no log-probs
    echo: bool = False  # each choice starts with its prompt (completions)
    id_prompts: bool = False  # the prompts came as token ids (an echo's text is then their decoded pieces)
    final_eos: bool = False  # a sample's final EOS is among its returned tokens (completions: protocol.finish)
    transcript: tuple[str, ...] = ()  # chat sent as a plain transcript: the role lines that end a reply (its stops)


def create_app(backend: Backend, settings: Settings = Settings()) -> FastAPI:
    """The server's app over `backend`; the engine thread starts and stops with the app's lifespan."""
    engine = Engine(backend)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.close)

    app = FastAPI(title="powersample", version=_version(), lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None, default_response_class=JsonResponse)  # fmt: skip
    app.state.engine, app.state.settings = engine, settings
    add_error_handlers(app)
    add_guards(app, settings.bind_host, settings.allowed_hosts, settings.cors_origin)
    metrics = make_metrics(engine.chain_counts)
    if metrics is not None:
        app.add_middleware(CountRequests, metrics=metrics)  # added last: the outermost, so it sees every response
    server = _Server(backend, engine, settings, metrics)
    keyed = [Depends(authenticate(settings.api_key))]
    add_playground(app, settings.defaults)  # GET /: public, a static page holding no data (playground.py)

    @app.get("/health", responses=schema.responses(schema.Health))
    async def health(request: Request) -> dict:
        """Liveness: {"status": "ok"} for anyone; the engine's state too with the API key (or without a key)."""
        if not key_ok(request, settings.api_key):
            return {"status": "ok"}
        return {"status": "ok", "model": settings.model_name, "backend": settings.backend.name if settings.backend else "unknown", **engine.stats()}

    @app.get("/v1/models", dependencies=keyed, responses=schema.responses(schema.ModelList))
    async def models() -> dict:
        card = {"id": settings.model_name, "object": "model", "created": server.started, "owned_by": "powersample"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions", dependencies=keyed, openapi_extra=schema.request_body(CompletionBody),
              responses=schema.responses(schema.CompletionResponse, True, schema.CompletionChunk))  # fmt: skip
    async def completions(request: Request) -> Response:
        return _respond(await server.completions(request))

    @app.post("/v1/chat/completions", dependencies=keyed, openapi_extra=schema.request_body(ChatBody),
              responses=schema.responses(schema.ChatResponse, True, schema.ChatChunk))  # fmt: skip
    async def chat_completions(request: Request) -> Response:
        return _respond(await server.chat(request))

    @app.get("/tokenizer_info", dependencies=keyed, responses=schema.responses(schema.TokenizerInfo))
    async def tokenizer_info() -> dict:
        """What vLLM's /tokenizer_info says that clients read: the EOS token's text (lm-eval's remote tokenizer)."""
        return server.tokenizer_info()

    @app.post("/tokenize", dependencies=keyed, openapi_extra=schema.request_body(TokenizeBody),
              responses=schema.responses(schema.Tokenized, body=True))  # fmt: skip
    async def tokenize(request: Request) -> dict:
        return await server.tokenize(request)

    @app.post("/detokenize", dependencies=keyed, openapi_extra=schema.request_body(DetokenizeBody),
              responses=schema.responses(schema.Detokenized, body=True))  # fmt: skip
    async def detokenize(request: Request) -> dict:
        return await server.detokenize(request)

    @app.get("/openapi.json", dependencies=keyed, include_in_schema=False)
    async def openapi() -> dict:
        vocab = capability(backend, Vocabulary)
        return schema.openapi(app, settings.limits, vocab.vocab_size() if vocab is not None else None)

    @app.get("/metrics", dependencies=[] if settings.metrics_public else keyed, include_in_schema=False)
    async def metrics_text() -> Response:
        """The Prometheus text format (see metrics.py). It needs the API key as /v1/* does, unless the server runs
        with --metrics-public; 501 without prometheus-client."""
        if metrics is None:
            raise ApiError(501, MISSING, kind="server_error", code="metrics_unavailable")
        text, content_type = metrics.exposition()
        return Response(text, media_type=content_type)

    return app


def _respond(answer: dict | Response) -> Response:
    return answer if isinstance(answer, Response) else JsonResponse(answer)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("powersample")
    except PackageNotFoundError:
        return "unknown"


SCORE_CHUNK = 256  # tokens one step of a scoring call scores: the engine checks for a stop between steps

NO_TEMPLATE = ("the model has no chat template: chat requests go to it as a plain 'role: content' transcript, "
               "each reply ending at the next role line")  # fmt: skip


class _Server:
    """The two generation endpoints' work, between the HTTP layer and the engine."""

    def __init__(self, backend: Backend, engine: Engine, settings: Settings, metrics: Metrics | None = None):
        self.backend, self.engine, self.settings, self.metrics = backend, engine, settings, metrics
        self.started = int(time.time())
        self._log_lock = threading.Lock()
        self.chat_template = has_chat_template(backend)
        if not self.chat_template:
            notice_once(NO_TEMPLATE)

    async def completions(self, request: Request) -> dict | StreamingResponse:
        deadline = time.monotonic() + self.settings.limits.request_timeout
        body = wire.parse_body(CompletionBody, await self._read(request))
        wire.check_limits(body, self.settings.limits)
        config, ignored = wire.sampler_config(body, self.settings.defaults)
        prompts, scoring = wire.prompt_list(body), wire.scores_only(body)
        work = 0 if scoring else wire.check_budget(config, len(prompts), body.n, self.settings.limits)
        new = 0 if scoring else config.max_new_tokens
        ids, texts = await asyncio.to_thread(self._encoded, prompts, new)  # off the event loop: tokenizers can be slow
        plan = _Plan(texts, ids, config, _seed(body), body.n, ignored, work, deadline, body.logprobs, body.echo,
                     not isinstance(prompts[0], str), final_eos=True)  # fmt: skip
        self._check_ranking(plan, "logprobs")
        if scoring:
            self._check_room(0, _scoring_work(plan, self.settings.limits))
            return await self._prompt_scores(request, plan)
        logprobs = body.logprobs
        if body.stream:
            top = sse.head("text_completion", self.settings.model_name)
            render = lambda outputs, live: sse.completion_chunks(top, outputs, logprobs)  # noqa: E731
            return self._stream(request, plan, body, top, render, logprobs is not None)
        records = await self._run(request, plan)
        outputs = await self._outputs(request, plan, records, wire.stop_strings(body), logprobs is not None)
        response = self._response("text_completion", plan, records, outputs, _completion_choices(outputs, logprobs))
        await self._log(response["id"], records, outputs)
        return response

    async def _prompt_scores(self, request: Request, plan: _Plan) -> dict:
        """echo with max_tokens 0: each prompt's tokens with their log-probs, n equal choices per prompt (scored
        once); no chain runs, so power_sampling has no chains and its config says max_new_tokens 0."""
        empty = wire.Output("", "length", (), (), (), (), 0)
        outputs = await self._score(request, plan, [empty] * (len(plan.prompt_ids) * plan.n))
        response = self._response("text_completion", plan, [], outputs, _completion_choices(outputs, plan.logprobs))
        response["power_sampling"]["config"]["max_new_tokens"] = 0
        return response

    def _encoded(self, prompts: list, new: int) -> tuple[list[Tokens], list[str]]:
        """The prompts' ids (each checked to fit the context with `new` tokens) and texts (an id prompt decoded)."""
        ids = [self._checked(self._prompt_ids(p), new, "prompt") for p in prompts]
        return ids, [p if isinstance(p, str) else self.backend.decode(i) for p, i in zip(prompts, ids)]

    def _prompt_ids(self, prompt: str | list[int]) -> Tokens:
        """A completions prompt's ids: a text encoded, or token ids checked against the vocabulary."""
        return self.backend.encode(prompt, False) if isinstance(prompt, str) else self._vocabulary_ids(prompt, "prompt")

    def _vocabulary_ids(self, ids: Sequence[int], param: str) -> Tokens:
        """`ids` when every one is in the backend's vocabulary, else a 400 naming `param`."""
        vocab = capability(self.backend, Vocabulary)
        if vocab is None:
            raise ApiError(400, "this server's backend does not say what its token ids are (the Vocabulary "
                           "capability): send text", param=param)  # fmt: skip
        size = vocab.vocab_size()
        bad = next((t for t in ids if not 0 <= t < size), None)
        if bad is not None:
            raise ApiError(400, f"token id {bad} is outside the vocabulary (ids 0 to {size - 1})", param=param,
                           code="invalid_token_id")  # fmt: skip
        return tuple(ids)

    def _check_ranking(self, plan: _Plan, param: str) -> None:
        """A 400 before any work when the request asks for alternatives the backend cannot rank."""
        if plan.logprobs and capability(self.backend, Ranking) is None:
            raise ApiError(400, f"{param} >= 1 needs a backend that ranks tokens (the Ranking capability); this one "
                           f"gives only each token's log p: ask for {param} 0", param=param)  # fmt: skip

    async def chat(self, request: Request) -> dict | StreamingResponse:
        deadline = time.monotonic() + self.settings.limits.request_timeout
        body = wire.parse_body(ChatBody, await self._read(request))
        wire.check_limits(body, self.settings.limits)
        config, ignored = wire.sampler_config(body, self.settings.defaults)
        work = wire.check_budget(config, 1, body.n, self.settings.limits)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        ids, transcript = await asyncio.to_thread(encode_messages, self.backend, messages, self.chat_template)
        ids = self._checked(ids, config.max_new_tokens, "messages")
        plan = _Plan([json.dumps(messages)], [ids], config, _seed(body), body.n, ignored, work, deadline,
                     wire.wanted_logprobs(body), transcript=transcript)  # fmt: skip
        self._check_ranking(plan, "top_logprobs")
        want, top = body.logprobs, body.top_logprobs or 0
        if body.stream:
            head = sse.head("chat.completion", self.settings.model_name)
            render = lambda outputs, live: sse.chat_chunks(head, outputs, want, top, role=not live)  # noqa: E731
            return self._stream(request, plan, body, head, render, want)
        records = await self._run(request, plan)
        outputs = await self._outputs(request, plan, records, _stops(body, plan), want)
        choices = [
            {"index": i, "message": {"role": "assistant", "content": o.text, "refusal": None},
             "finish_reason": o.finish_reason, "logprobs": wire.chat_logprobs(o, top) if want else None}
            for i, o in enumerate(outputs)
        ]  # fmt: skip
        response = self._response("chat.completion", plan, records, outputs, choices)
        await self._log(response["id"], records, outputs)
        return response

    def _stream(self, request: Request, plan: _Plan, body: wire._Body, top: dict,
                render: Render, pieces: bool) -> StreamingResponse:  # fmt: skip
        """The SSE response of a checked request: its chains are built here (a 400 or 429 comes before the stream)
        and run once the response starts; with stream_options.include_trace they are traced into its feed, and so
        are those of base and low-temp without log-probs or echo, whose text streams as it is drawn (sse.LiveText)."""
        feed = Feed()
        live = None
        if plan.config.method in PLAIN_METHODS and not pieces and not plan.echo:
            choices = len(plan.prompt_ids) * plan.n
            live = sse.LiveText(top, self.backend.decode, _stops(body, plan), choices, wire.include_usage(body))
        progs = self._programs(plan, feed if wire.include_trace(body) or live else None)
        events = self._events(request, plan, progs, body, top, render, pieces, feed, live)
        return StreamingResponse(events, media_type=sse.MEDIA_TYPE, headers=sse.HEADERS)

    async def _events(self, request: Request, plan: _Plan, progs: list, body: wire._Body, top: dict,
                      render: Render, pieces: bool, feed: Feed,
                      live: sse.LiveText | None) -> AsyncIterator[bytes]:  # fmt: skip
        """Keep-alives (and the trace events, when traced; the text as it is drawn, when live) while the chains run,
        then the chunks and [DONE]; a failure is one error event. A client that leaves cancels this generator
        (Starlette watches for the disconnect), which stops the job."""
        job, future = submit(self.engine, progs, registry.proposal(plan.config), plan.deadline, plan.work)
        start = time.perf_counter()
        try:
            for data in live.opening() if live else ():
                yield data
            async with aclosing(self._running(job, future, plan, feed, wire.include_trace(body), live)) as running:
                async for data in running:
                    yield data
            outcomes = results(future.result(), self.settings.limits.request_timeout)
            records = self._records(plan, outcomes, time.perf_counter() - start)
            for item in end_events(self.backend, records) if wire.include_trace(body) else ():
                yield sse.trace(item)
            outputs = await self._outputs(request, plan, records, _stops(body, plan), pieces)
            usage = wire.usage(_prompt_tokens(plan), outputs) if wire.include_usage(body) else None
            ps = wire.power_sampling(plan.config, plan.seed, records, plan.ignored, plan.transcript)
            self._count(plan, records, outputs)
            chunks = render(live.rest(outputs), True) if live else render(outputs, False)
            for data in sse.finish(chunks, top, ps, usage):
                yield data
            await self._log(top["id"], records, outputs)
        except ApiError as error:
            yield sse.event(error.body())
        except Exception as error:  # noqa: BLE001 - mid-stream, a failure is an error event, never a traceback
            yield sse.event(ApiError(500, f"internal error: {one_line(error)}", kind="server_error").body())
        finally:
            if not future.done():
                job.stop("request abandoned")

    async def _running(self, job: Job, future: asyncio.Future, plan: _Plan, feed: Feed, traced: bool,
                       live: sse.LiveText | None) -> AsyncIterator[bytes]:  # fmt: skip
        """While the chains run: their trace events as they come (when traced), their text as it is drawn (when
        live), and keep-alives when nothing else was sent for `stream_keepalive` seconds; past the deadline the job
        is stopped (504)."""
        beat, keepalive = time.monotonic(), self.settings.stream_keepalive
        async with aclosing(feed.follow(future, min(POLL_SECONDS, keepalive))) as batches:
            async for batch in batches:
                for item in batch:
                    if traced:
                        yield sse.trace(item)
                    for data in live.draw(item) if live and item["event"] == "draw" else ():
                        yield data
                if future.done():
                    return
                if time.monotonic() > plan.deadline:
                    job.stop("timeout")
                    raise timeout_error(self.settings.limits.request_timeout)
                if batch:
                    beat = time.monotonic()  # trace events are traffic too
                elif time.monotonic() - beat >= keepalive:
                    beat = time.monotonic()
                    yield sse.KEEPALIVE

    async def _read(self, request: Request) -> Any:
        return await read_json(request, self.settings.limits.max_body_bytes, self.settings.body_timeout)

    async def _outputs(self, request: Request, plan: _Plan, records: Sequence[SampleRecord], stops: list[str],
                       pieces: bool) -> list[wire.Output]:  # fmt: skip
        """Stop truncation and per-token texts, off the event loop and inside the request's deadline (a client that
        leaves, or the timeout, stops them at the next token); then the echo and alternatives the plan asks for."""

        def work(check: Callable[[], None]) -> list[wire.Output]:
            return [wire.finish(self.backend.decode, r, stops, pieces, check, plan.final_eos) for r in records]

        return await self._score(request, plan, await self._in_thread(request, plan, work))

    async def _score(self, request: Request, plan: _Plan, outputs: list[wire.Output]) -> list[wire.Output]:
        """The outputs with their prompts echoed and their tokens ranked, as the plan asks: the ranking on the engine
        thread (one `rank` per sample: see the module docstring), the texts off the event loop."""
        if not plan.echo and not plan.logprobs:
            return outputs
        prompts = [plan.prompt_ids[j // plan.n] for j in range(len(outputs))]
        rank = lambda: _ranks(self.backend, plan, prompts, outputs)  # noqa: E731
        work, timeout = _scoring_work(plan, self.settings.limits), self.settings.limits.request_timeout
        ranks = await on_engine(request, self.engine, rank, plan.deadline, timeout, work)

        def work(check: Callable[[], None]) -> list[wire.Output]:
            return [_scored(self.backend.decode, plan, j // plan.n, out, rank, check)
                    for j, (out, rank) in enumerate(zip(outputs, ranks))]  # fmt: skip

        return await self._in_thread(request, plan, work)

    async def _in_thread(self, request: Request, plan: _Plan, work: Callable[[Callable[[], None]], Any]) -> Any:
        """work(check) in a thread, inside the request's deadline; `check` raises once the client has left or the
        deadline has passed, so the work stops at its next step."""
        stop = threading.Event()

        def check() -> None:
            if stop.is_set():
                raise Stopped("stopped")

        task = asyncio.ensure_future(asyncio.to_thread(work, check))
        try:
            await watch(request, task, plan.deadline, lambda reason: stop.set(), self.settings.limits.request_timeout)
        finally:
            stop.set()  # a no-op once done; else the thread ends at its next token
            task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved: no "never retrieved" log
        return task.result()

    # --- the tokenizer endpoints (vLLM's shapes) -----------------------------------------------------------------

    def tokenizer_info(self) -> dict:
        vocab = capability(self.backend, Vocabulary)
        eos = vocab.token_text(min(self.backend.eos_ids)) if vocab is not None and self.backend.eos_ids else None
        return {"eos_token": eos or None, "model_max_length": self.backend.context_length,
                "vocab_size": vocab.vocab_size() if vocab is not None else None}  # fmt: skip

    async def tokenize(self, request: Request) -> dict:
        """A prompt's ids as /v1/completions encodes it, or a conversation's as /v1/chat/completions does."""
        body = wire.parse_body(TokenizeBody, await self._read(request))
        if (body.prompt is None) == (body.messages is None):
            raise ApiError(400, "send exactly one of 'prompt' and 'messages'", param="prompt")
        if body.messages is not None:
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
            ids, _ = await asyncio.to_thread(encode_messages, self.backend, messages, self.chat_template)
        else:
            ids = await asyncio.to_thread(self.backend.encode, body.prompt, False)
        return {"count": len(ids), "max_model_len": self.backend.context_length, "tokens": list(ids),
                "token_strs": None}  # fmt: skip

    async def detokenize(self, request: Request) -> dict:
        body = wire.parse_body(DetokenizeBody, await self._read(request))
        ids = self._vocabulary_ids(body.tokens, "tokens")
        return {"prompt": await asyncio.to_thread(self.backend.decode, ids)}

    def _checked(self, ids: Tokens, new: int, param: str) -> Tokens:
        try:
            check_fits(self.backend.context_length, len(ids), new, knob="max_tokens")
        except PowerSampleError as e:
            raise ApiError(400, str(e), param=param, code="context_length_exceeded") from None
        if len(ids) + new > (most := self.settings.limits.max_context):
            raise ApiError(400, f"the prompt is {len(ids)} tokens; with max_tokens={new} it exceeds this server's "
                           f"--max-context of {most} tokens", param=param, code="context_length_exceeded")  # fmt: skip
        return ids

    async def _run(self, request: Request, plan: _Plan) -> list[SampleRecord]:
        """Run every chain of the plan in the engine; one record per (prompt, chain), prompt-major."""
        progs = self._programs(plan)
        start = time.perf_counter()
        job, future = submit(self.engine, progs, registry.proposal(plan.config), plan.deadline, plan.work)
        outcomes = await wait_job(request, job, future, plan.deadline, self.settings.limits.request_timeout)
        return self._records(plan, outcomes, time.perf_counter() - start)

    def _programs(self, plan: _Plan, feed: Feed | None = None) -> list:
        """The plan's chains as sampler programs: 429 when the engine is full, 400 for a method that cannot run.
        With a `feed`, every chain is traced into it, numbered by its choice index (live.trace_feed)."""
        self._check_room(len(plan.prompt_ids) * plan.n, plan.work + _scoring_work(plan, self.settings.limits))
        try:
            return [p for i, ids in enumerate(plan.prompt_ids) for p in self._prompt_programs(plan, i, ids, feed)]
        except PowerSampleError as e:
            raise ApiError(400, str(e), param="method") from None

    def _check_room(self, chains: int, work: int) -> None:
        """429 when `chains` more chains, or `work` more work, would take the engine over its limits."""
        limits = self.settings.limits
        busy = self.engine.chains_in_flight() + chains > limits.max_queued_chains
        if busy or self.engine.work_in_flight() + work > limits.max_queued_work:
            raise ApiError(429, "the server is full (chains or their work in flight at the limit); retry later",
                           kind="rate_limit_error", code="server_busy",
                           headers={"Retry-After": str(limits.retry_after)})  # fmt: skip

    def _prompt_programs(self, plan: _Plan, i: int, ids: Tokens, feed: Feed | None) -> list:
        chains = make_chains(plan.seed, plan.n)
        if feed is not None:
            trace_feed(self.backend, chains, plan.texts[i], plan.config, plan.seed, i * plan.n, feed)
        return programs(self.backend, ids, plan.config, chains)

    def _records(self, plan: _Plan, outcomes: list, wall: float) -> list[SampleRecord]:
        return [
            chain_record(self.backend, plan.texts[k // plan.n], plan.config, plan.seed, k % plan.n, outcome, wall)
            for k, outcome in enumerate(outcomes)
        ]

    def _response(self, kind: str, plan: _Plan, records: Sequence[SampleRecord], outputs, choices) -> dict:
        self._count(plan, records, outputs)
        return {
            **wire.envelope(kind, self.settings.model_name),
            "choices": choices,
            "usage": wire.usage(_prompt_tokens(plan), outputs),
            "power_sampling": wire.power_sampling(plan.config, plan.seed, records, plan.ignored, plan.transcript),
        }

    def _count(self, plan: _Plan, records: Sequence[SampleRecord], outputs) -> None:
        """The samples' tokens, proposals and acceptances, into /metrics (when it is on)."""
        if self.metrics is not None:
            self.metrics.count_samples(plan.config.method, records, sum(o.completion_tokens for o in outputs))

    async def _log(self, request_id: str, records: Sequence[SampleRecord], outputs) -> None:
        """Append the samples (with the text returned and its finish reason) to --output, off the event loop."""
        if not self.settings.output:
            return
        rows = [
            {**r.to_dict(), "request_id": request_id, "response_text": o.text, "response_finish_reason":
             o.finish_reason} for r, o in zip(records, outputs)
        ]  # fmt: skip

        def write() -> None:
            with self._log_lock:
                append_jsonl(self.settings.output, rows)

        await asyncio.to_thread(write)


def encode_messages(backend: Backend, messages: list[dict], template: bool = True) -> tuple[Tokens, tuple[str, ...]]:
    """A conversation's prompt ids, and the stops that end the reply when they are a plain transcript ("role:
    content" lines, then "assistant:"; () otherwise). With the model's chat `template`: the backend's
    `encode_messages` when it has one; else one user message goes through `encode(chat=True)` and longer ones as the
    transcript. A model without a template gets the transcript."""
    chat = capability(backend, ChatMessages) if template else None
    if chat is not None:
        return chat.encode_messages(messages), ()
    if template and len(messages) == 1 and messages[0]["role"] == "user":
        return backend.encode(messages[0]["content"], True), ()
    return backend.encode(plain_transcript(messages), False), transcript_stops(messages)


def _stops(body: wire._Body, plan: _Plan) -> list[str]:
    """Where a choice's text ends: the request's stop strings, and a plain transcript's role lines."""
    return wire.stop_strings(body) + list(plan.transcript)


def _completion_choices(outputs: Sequence[wire.Output], logprobs: int | None) -> list[dict]:
    return [
        {"text": o.text, "index": i, "finish_reason": o.finish_reason,
         "logprobs": wire.completion_logprobs(o, logprobs) if logprobs is not None else None}
        for i, o in enumerate(outputs)
    ]  # fmt: skip


Ranks = tuple[tuple[Ranked, ...] | None, tuple[Ranked, ...] | None]  # (a prompt's tokens after its first, a sample's)


def _scoring_work(plan: _Plan, limits: Limits) -> int:
    """The work of the plan's scoring call (echoed prompts' log p, ranked alternatives): prompt tokens x (1 + the
    alternatives per token), a 400 over the server's per-request limit. 0 when nothing is scored."""
    if plan.logprobs is None or not (plan.echo or plan.logprobs):
        return 0
    work = _prompt_tokens(plan) * (1 + plan.logprobs)
    if work > limits.max_work:
        raise ApiError(400, f"scoring the prompts costs {work} tokens of work ({_prompt_tokens(plan)} prompt tokens x "
                       f"(1 + logprobs {plan.logprobs})); the server's limit is {limits.max_work}", param="prompt",
                       code="over_limit")  # fmt: skip
    return work


def _ranks(backend: Backend, plan: _Plan, prompts: Sequence[Tokens],
           outputs: Sequence[wire.Output]) -> Generator[None, None, list[Ranks]]:  # fmt: skip
    """Per output, what the plan asks to score (on the engine thread, in steps: a Call); equal (prompt, tokens)
    pairs scored once."""
    memo: dict[tuple[Tokens, Tokens], Ranks] = {}
    for prompt, out in zip(prompts, outputs):
        if (prompt, out.tokens) not in memo:
            memo[prompt, out.tokens] = yield from _rank_one(backend, prompt, out.tokens, plan.echo, plan.logprobs)
    return [memo[prompt, out.tokens] for prompt, out in zip(prompts, outputs)]


def _rank_one(backend: Backend, prompt: Tokens, tokens: Tokens, echo: bool,
              n: int | None) -> Generator[None, None, Ranks]:  # fmt: skip
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
    echoed = len(prompt) - len(head)
    return (ranks[:echoed] if echo else None), ranks[echoed:]


def _in_chunks(score: Callable[[Tokens, Tokens], Sequence], context: Tokens,
               rest: Tokens) -> Generator[None, None, tuple]:  # fmt: skip
    """score(context + the tokens of `rest` before a chunk, the chunk) over `rest`, SCORE_CHUNK tokens at a time,
    joined; it yields between chunks, where the engine checks for a stop and serves other work (a backend keeps the
    context it scored last, so each chunk costs its own tokens)."""
    out: list = []
    for start in range(0, len(rest), SCORE_CHUNK):
        if start:
            yield
        out += score(tuple(context) + tuple(rest[:start]), tuple(rest[start : start + SCORE_CHUNK]))
    return tuple(out)


def _scored(decode, plan: _Plan, k: int, out: wire.Output, ranks: Ranks, check: Callable[[], None]) -> wire.Output:
    """One output of prompt k with its ranks applied and its prompt echoed, as the plan asks."""
    prompt_ranks, sample_ranks = ranks
    if sample_ranks is not None:
        out = wire.ranked(decode, out, sample_ranks, check)
    if plan.echo:
        text = None if plan.id_prompts else plan.texts[k]
        out = wire.echoed(decode, out, plan.prompt_ids[k], text, prompt_ranks, bool(plan.logprobs), check)
    return out


def _prompt_tokens(plan: _Plan) -> int:
    return sum(len(ids) for ids in plan.prompt_ids)


def _seed(body: wire._Body) -> int:
    return body.seed if body.seed is not None else wire.new_seed()


