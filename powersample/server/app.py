"""The FastAPI app: OpenAI's `/v1/completions` and `/v1/chat/completions` over the batching engine, and vLLM's
tokenizer endpoints (`/tokenize`, `/detokenize`, `/tokenizer_info`) that lm-evaluation-harness uses as its tokenizer.

A handler reads and checks the body (size first, then JSON, then types and limits), encodes the prompt and adapts
the body into one `generation.Generation`; `generation.Pipeline` runs it (the chains on the engine, then stop
truncation, echo and ranked log-probs) and answers it in the endpoint's shape (`formats.py`; with `stream: true`,
server-sent events: `sse.py`). With `stream: true` the request is checked just as fully before the stream starts (a
bad one still gets its JSON error). Reading a body, the API key and the error handlers are in `requests.py`;
waiting on the engine in `waiting.py`.

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
import time
from collections.abc import Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import Response

import powersample
from powersample.backends import BackendSpec
from powersample.backends.base import Backend, ChatMessages, Ranking, Vocabulary, capability, has_chat_template
from powersample.backends.engine import check_fits
from powersample.backends.tokenizer import plain_transcript, transcript_stops
from powersample.config import SamplerConfig
from powersample.core.types import Tokens
from powersample.errors import PowerSampleError
from powersample.io import notice_once
from powersample.server import formats, schema
from powersample.server import protocol as wire
from powersample.server.engine import Engine
from powersample.server.generation import Generation, Pipeline
from powersample.server.guard import add_guards
from powersample.server.metrics import MISSING, CountRequests, make_metrics
from powersample.server.playground import add_playground
from powersample.server.protocol import ApiError, ChatBody, CompletionBody, DetokenizeBody, Limits, TokenizeBody
from powersample.server.requests import JsonResponse, add_error_handlers, authenticate, key_ok, read_json


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
    max_memory: int | None = None  # bytes of KV cache the chains in flight may hold (--max-memory); None = no limit


def create_app(backend: Backend, settings: Settings = Settings()) -> FastAPI:
    """The server's app over `backend`; the engine thread starts and stops with the app's lifespan."""
    engine = Engine(backend, settings.max_memory)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.close)

    app = FastAPI(
        title="powersample",
        version=powersample.__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        default_response_class=JsonResponse,
    )
    app.state.engine, app.state.settings = engine, settings
    add_error_handlers(app)
    add_guards(app, settings.bind_host, settings.allowed_hosts, settings.cors_origin)
    metrics = make_metrics(engine.chain_counts)
    if metrics is not None:
        app.add_middleware(CountRequests, metrics=metrics)  # added last: the outermost, so it sees every response
    pipeline = Pipeline(
        backend, engine, settings.limits, settings.model_name, settings.output, settings.stream_keepalive, metrics
    )
    server = _Endpoints(backend, pipeline, settings)
    keyed = [Depends(authenticate(settings.api_key))]
    add_playground(app, settings.defaults)  # GET /: public, a static page holding no data (playground.py)

    @app.get("/health", responses=schema.responses(schema.Health))
    async def health(request: Request) -> dict:
        """Liveness: {"status": "ok"} for anyone; the engine's state too with the API key (or without a key)."""
        if not key_ok(request, settings.api_key):
            return {"status": "ok"}
        return {
            "status": "ok",
            "model": settings.model_name,
            "backend": settings.backend.name if settings.backend else "unknown",
            **engine.stats(),
        }

    @app.get("/v1/models", dependencies=keyed, responses=schema.responses(schema.ModelList))
    async def models() -> dict:
        card = {"id": settings.model_name, "object": "model", "created": server.started, "owned_by": "powersample"}
        return {"object": "list", "data": [card]}

    @app.post(
        "/v1/completions",
        dependencies=keyed,
        openapi_extra=schema.request_body(CompletionBody),
        responses=schema.responses(schema.CompletionResponse, True, schema.CompletionChunk),
    )
    async def completions(request: Request) -> Response:
        return await server.completions(request)

    @app.post(
        "/v1/chat/completions",
        dependencies=keyed,
        openapi_extra=schema.request_body(ChatBody),
        responses=schema.responses(schema.ChatResponse, True, schema.ChatChunk),
    )
    async def chat_completions(request: Request) -> Response:
        return await server.chat(request)

    @app.get("/tokenizer_info", dependencies=keyed, responses=schema.responses(schema.TokenizerInfo))
    async def tokenizer_info() -> dict:
        """What vLLM's /tokenizer_info says that clients read: the EOS token's text (lm-eval's remote tokenizer)."""
        return server.tokenizer_info()

    @app.post(
        "/tokenize",
        dependencies=keyed,
        openapi_extra=schema.request_body(TokenizeBody),
        responses=schema.responses(schema.Tokenized, body=True),
    )
    async def tokenize(request: Request) -> dict:
        return await server.tokenize(request)

    @app.post(
        "/detokenize",
        dependencies=keyed,
        openapi_extra=schema.request_body(DetokenizeBody),
        responses=schema.responses(schema.Detokenized, body=True),
    )
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


NO_TEMPLATE = (
    "the model has no chat template: chat requests go to it as a plain 'role: content' transcript, "
    "each reply ending at the next role line"
)


class _Endpoints:
    """Each endpoint's body adapted into one `Generation` (generation.py runs it), and the tokenizer endpoints."""

    def __init__(self, backend: Backend, pipeline: Pipeline, settings: Settings):
        self.backend, self.pipeline, self.settings = backend, pipeline, settings
        self.started = int(time.time())
        self.chat_template = has_chat_template(backend)
        if not self.chat_template:
            notice_once(NO_TEMPLATE)

    async def completions(self, request: Request) -> Response:
        body, deadline = await self._body(request, CompletionBody)
        config, ignored = wire.sampler_config(body, self.settings.defaults)
        prompts, scoring = wire.prompt_list(body), wire.scores_only(body)
        work = 0 if scoring else wire.check_budget(config, len(prompts), body.n, self.settings.limits)
        new = 0 if scoring else config.max_new_tokens
        ids, texts = await asyncio.to_thread(self._encoded, prompts, new)  # off the event loop: tokenizers can be slow
        gen = _generation(
            body,
            texts,
            ids,
            config,
            ignored,
            work,
            deadline,
            logprobs=body.logprobs,
            echo=body.echo,
            id_prompts=not isinstance(prompts[0], str),
            final_eos=True,
            scoring=scoring,
        )
        return await self._answer(request, gen, "logprobs", formats.COMPLETIONS)

    async def chat(self, request: Request) -> Response:
        body, deadline = await self._body(request, ChatBody)
        config, ignored = wire.sampler_config(body, self.settings.defaults)
        work = wire.check_budget(config, 1, body.n, self.settings.limits)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        ids, transcript = await asyncio.to_thread(encode_messages, self.backend, messages, self.chat_template)
        ids = self._checked(ids, config.max_new_tokens, "messages")
        gen = _generation(
            body,
            [json.dumps(messages)],
            [ids],
            config,
            ignored,
            work,
            deadline,
            logprobs=wire.wanted_logprobs(body),
            transcript=transcript,
        )
        return await self._answer(request, gen, "top_logprobs", formats.CHAT)

    async def _body(self, request: Request, model: type[wire._Body]) -> tuple[Any, float]:
        """The request's body, parsed and within the limits, and its deadline (counted from its arrival)."""
        deadline = time.monotonic() + self.settings.limits.request_timeout
        body = wire.parse_body(model, await self._read(request))
        wire.check_limits(body, self.settings.limits)
        return body, deadline

    async def _answer(self, request: Request, gen: Generation, param: str, fmt: formats.Format) -> Response:
        """A 400 before any work when the request asks for alternatives the backend cannot rank; else the answer."""
        if gen.logprobs and capability(self.backend, Ranking) is None:
            raise ApiError(
                400,
                f"{param} >= 1 needs a backend that ranks tokens (the Ranking capability); this one "
                f"gives only each token's log p: ask for {param} 0",
                param=param,
            )
        return await self.pipeline.answer(request, gen, fmt)

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
            raise ApiError(
                400,
                "this server's backend does not say what its token ids are (the Vocabulary capability): send text",
                param=param,
            )
        size = vocab.vocab_size()
        bad = next((t for t in ids if not 0 <= t < size), None)
        if bad is not None:
            raise ApiError(
                400,
                f"token id {bad} is outside the vocabulary (ids 0 to {size - 1})",
                param=param,
                code="invalid_token_id",
            )
        return tuple(ids)

    def _checked(self, ids: Tokens, new: int, param: str) -> Tokens:
        try:
            check_fits(self.backend.context_length, len(ids), new, knob="max_tokens")
        except PowerSampleError as e:
            raise ApiError(400, str(e), param=param, code="context_length_exceeded") from None
        if len(ids) + new > (most := self.settings.limits.max_context):
            raise ApiError(
                400,
                f"the prompt is {len(ids)} tokens; with max_tokens={new} it exceeds this server's "
                f"--max-context of {most} tokens",
                param=param,
                code="context_length_exceeded",
            )
        return ids

    async def _read(self, request: Request) -> Any:
        return await read_json(request, self.settings.limits.max_body_bytes, self.settings.body_timeout)

    # --- the tokenizer endpoints (vLLM's shapes) -----------------------------------------------------------------

    def tokenizer_info(self) -> dict:
        vocab = capability(self.backend, Vocabulary)
        eos = vocab.token_text(min(self.backend.eos_ids)) if vocab is not None and self.backend.eos_ids else None
        return {
            "eos_token": eos or None,
            "model_max_length": self.backend.context_length,
            "vocab_size": vocab.vocab_size() if vocab is not None else None,
        }

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
        return {
            "count": len(ids),
            "max_model_len": self.backend.context_length,
            "tokens": list(ids),
            "token_strs": None,
        }

    async def detokenize(self, request: Request) -> dict:
        body = wire.parse_body(DetokenizeBody, await self._read(request))
        ids = self._vocabulary_ids(body.tokens, "tokens")
        return {"prompt": await asyncio.to_thread(self.backend.decode, ids)}


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


def _generation(
    body: wire._Body,
    texts: Sequence[str],
    ids: Sequence[Tokens],
    config: SamplerConfig,
    ignored: Sequence[str],
    work: int,
    deadline: float,
    transcript: Sequence[str] = (),
    **what: Any,
) -> Generation:
    """The fields both endpoints set alike: the seed (a random one when the body has none), the stops (the body's,
    and a plain transcript's role lines) and the stream options."""
    options = body.stream_options
    return Generation(
        tuple(texts),
        tuple(ids),
        config,
        body.seed if body.seed is not None else wire.new_seed(),
        body.n,
        deadline,
        tuple(ignored),
        work,
        tuple(wire.stop_strings(body)) + tuple(transcript),
        transcript=tuple(transcript),
        stream=bool(body.stream),
        usage_chunk=bool(options and options.include_usage),
        traced=bool(options and options.include_trace),
        **what,
    )
